//! Winograd's F(m x m, 3x3) for the wide 3x3 convolutions (stride 1, dilation 1) of
//! [`super::conv::DirectConv`], in two forms: F(4x4, 3x3) makes each 4x4 block of output
//! pixels with 36 products per (channel, output) pair instead of 144, F(2x2, 3x3) each 2x2
//! block with 16 instead of 36. The larger tile does 1.8x less work in the product kernel
//! but its transformed kernels take 36/16 the memory, so the planner gives it to the
//! convolutions over large planes, where the time goes (ops/conv.rs).
//!
//! With `U = G g Gᵀ` (the 3x3 kernel, transformed once at planning), `V = Bᵀ d B` (an
//! (m+2)x(m+2) input patch) and `Y = Aᵀ M A` (the m x m outputs), the (m+2)² positions `ξ`
//! of the transform are independent products `M[ξ] = V[ξ] · U[ξ]` over the channels: a
//! block of tiles makes `V[ξ]` (tiles × channels, row-major) and one call of the product
//! kernel per position makes `M[ξ]` (tiles × outputs).
//!
//! The transforms work on whole channel vectors (the input band is pixel-major, as the
//! tap path reads it): the column transform once per m output rows over the whole padded
//! width, the row transform per tile, the output transform per tile into m pixel-major
//! output rows, which `DirectConv` then turns channel-major as for the tap path. The bias
//! rides on `U[(1,1)]`: in both forms `Aᵀ` has ones in its second column, so it reaches
//! every output of the tile exactly once.
//!
//! Numerically F(2x2, 3x3) has only ±1 and 1/2; F(4x4, 3x3) (points 0, ±1, ±2) rounds more,
//! in proportion to the outputs, and is the form other CPU libraries settle on (F(6x6, 3x3)
//! loses digits). The unit tests hold both to tract's convolution, the parity test the
//! whole models to onnxruntime.

use crate::kernels::gemm::{gemm, Packed, PANEL};

/// Bytes of one block's `V` and `M` together: small enough to stay in L2 beside the
/// weights of the position being multiplied.
const BLOCK_BYTES: usize = 256 << 10;

/// Which of Winograd's forms a convolution runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// F(2x2, 3x3).
    F2,
    /// F(4x4, 3x3).
    F4,
}

impl Form {
    /// Output rows (and columns) one tile makes.
    pub fn tile(self) -> usize {
        match self {
            Form::F2 => 2,
            Form::F4 => 4,
        }
    }

    /// Positions of the transform: the input rows (and columns) a tile reads, squared.
    fn positions(self) -> usize {
        (self.tile() + 2).pow(2)
    }
}

/// G of F(2x2, 3x3).
const G2: [[f64; 3]; 4] = [[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]];
/// G of F(4x4, 3x3).
const G4: [[f64; 3]; 6] = [
    [0.25, 0.0, 0.0],
    [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
    [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
    [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
    [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
    [0.0, 0.0, 1.0],
];

/// The transformed kernels, each `[channels][outputs]` packed for the product kernel.
pub struct Weights {
    form: Form,
    channels: usize,
    /// Outputs padded to whole panels: the width of the product rows.
    outputs: usize,
    positions: Vec<Packed>,
}

impl Weights {
    /// From an `OIHW` 3x3 kernel and a bias per output; `None` unless the outputs fill
    /// whole panels.
    pub fn new(kernel: &[f32], bias: &[f32], outputs: usize, channels: usize, form: Form) -> Option<Self> {
        if !outputs.is_multiple_of(PANEL) || kernel.len() != outputs * channels * 9 || bias.len() != outputs {
            return None;
        }
        let count = form.positions();
        // `[ξ][channel][output]`.
        let mut u = vec![0f32; count * channels * outputs];
        for o in 0..outputs {
            for c in 0..channels {
                let g = &kernel[(o * channels + c) * 9..][..9];
                let t = match form {
                    Form::F2 => transform_kernel(g, &G2),
                    Form::F4 => transform_kernel(g, &G4),
                };
                for (xi, v) in t.iter().enumerate() {
                    u[(xi * channels + c) * outputs + o] = *v;
                }
            }
        }
        let plane = channels * outputs;
        let bias_at = form.tile() + 2 + 1;
        let positions = (0..count)
            .map(|xi| {
                // The bias at (1, 1) only (see the module's comment).
                let b = if xi == bias_at { bias.to_vec() } else { vec![0.0; outputs] };
                Packed::from_inputs_major(&u[xi * plane..][..plane], b, channels, outputs)
            })
            .collect::<Option<Vec<_>>>()?;
        Some(Weights { form, channels, outputs, positions })
    }

    /// Outputs per product row (padded to whole panels).
    pub fn outputs(&self) -> usize {
        self.outputs
    }

    /// The form it runs as.
    pub fn form(&self) -> Form {
        self.form
    }

    /// `m = form().tile()` output rows, pixel-major, one after the other in `out` (each
    /// `[x][outputs]`, `out.len() / m` values, at least `m * ceil(out_w / m)` pixels), from
    /// the `m + 2` pixel-major input rows at the start of `rows` (each `padded_w` pixels of
    /// `channels`, its zero padding included; `out_w = padded_w - 2`).
    pub fn rows(&self, rows: &[f32], padded_w: usize, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if crate::kernels::cpu().avx2() {
            // SAFETY: the CPU has the features.
            return unsafe { self.rows_avx2(rows, padded_w, out) };
        }
        self.rows_with(rows, padded_w, out)
    }

    /// The same loops compiled for AVX2: the transforms are additions over channel
    /// vectors, twice as wide there as in the x86-64 baseline's SSE2.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn rows_avx2(&self, rows: &[f32], padded_w: usize, out: &mut [f32]) {
        self.rows_with(rows, padded_w, out)
    }

    #[inline(always)]
    fn rows_with(&self, rows: &[f32], padded_w: usize, out: &mut [f32]) {
        match self.form {
            Form::F2 => self.rows_in(Transforms { input: input2, output: output2 }, rows, padded_w, out),
            Form::F4 => self.rows_in(Transforms { input: input4, output: output4 }, rows, padded_w, out),
        }
    }

    /// [`Self::rows`] with a form's transforms: `S` = m + 2 points, `T` = m outputs.
    #[inline(always)]
    fn rows_in<const S: usize, const T: usize, I, O>(
        &self,
        form: Transforms<I, O>,
        rows: &[f32],
        padded_w: usize,
        out: &mut [f32],
    ) where
        I: Fn([f32; S]) -> [f32; S] + Copy,
        O: Fn([f32; S]) -> [f32; T] + Copy,
    {
        let (c, n) = (self.channels, self.outputs);
        let out_w = padded_w - 2;
        let tiles = out_w.div_ceil(T);
        // The last tile of a width not a multiple of m reads past the padding: zero columns.
        let cols = T * tiles + 2;
        let block = (BLOCK_BYTES / (4 * S * S * (c + n))).clamp(12, tiles.max(12));
        // Taken out and put back rather than borrowed in a closure: a closure is a
        // function of its own, compiled without this one's target features.
        let mut scratch = SCRATCH.take();
        let Scratch { columns, v, m, down } = &mut scratch;
        columns.resize(S * cols * c, 0.0);
        v.resize(S * S * block * c, 0.0);
        m.resize(S * S * block * n, 0.0);
        down.resize(T * S * n, 0.0);
        column_transform(form.input, rows, padded_w * c, cols * c, columns);
        let per_row = out.len() / T;
        for t0 in (0..tiles).step_by(block) {
            let count = block.min(tiles - t0);
            let from = Columns { data: columns, stride: cols * c, c };
            row_transform::<S, T>(form.input, from, t0..t0 + count, v);
            for (xi, w) in self.positions.iter().enumerate() {
                gemm(&v[xi * block * c..][..count * c], w, &mut m[xi * block * n..][..count * n]);
            }
            let products = Products { m, position: block * n, n, count };
            let into = OutRows { out: &mut *out, per_row, first: T * t0 * n };
            output_transform(form.output, products, down, into);
        }
        SCRATCH.set(scratch);
    }
}

/// A form's one-dimensional transforms: `Bᵀ d` and `Aᵀ m`.
#[derive(Clone, Copy)]
struct Transforms<I, O> {
    input: I,
    output: O,
}

#[derive(Default)]
struct Scratch {
    /// `Bᵀ d` of the input rows: `[i][column][channel]`.
    columns: Vec<f32>,
    /// `V[ξ][tile][channel]` of one block of tiles.
    v: Vec<f32>,
    /// `M[ξ][tile][output]` of one block.
    m: Vec<f32>,
    /// `Aᵀ M` of one tile: `[output row][column][output]`.
    down: Vec<f32>,
}

thread_local! {
    /// Kept between calls: fresh buffers would cost page faults on every band of rows.
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

/// Frees this thread's buffers (at the end of a run: [`super::RunScope`]); the bytes they held.
pub(crate) fn release_scratch() -> usize {
    let Scratch { columns, v, m, down } = SCRATCH.take();
    [columns, v, m, down].iter().map(|v| v.capacity() * size_of::<f32>()).sum()
}

/// `G g Gᵀ` of one 3x3 kernel `g` (row-major), row-major `S x S`, worked in f64.
fn transform_kernel<const S: usize>(g: &[f32], gm: &[[f64; 3]; S]) -> Vec<f32> {
    let mut u = vec![0f32; S * S];
    for i in 0..S {
        for j in 0..S {
            let mut sum = 0f64;
            for a in 0..3 {
                for b in 0..3 {
                    sum += gm[i][a] * f64::from(g[a * 3 + b]) * gm[j][b];
                }
            }
            u[i * S + j] = sum as f32;
        }
    }
    u
}

/// `Bᵀ d` of F(2x2, 3x3). Bᵀ = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]].
#[inline(always)]
fn input2([d0, d1, d2, d3]: [f32; 4]) -> [f32; 4] {
    [d0 - d2, d1 + d2, d2 - d1, d1 - d3]
}

/// `Aᵀ m` of F(2x2, 3x3). Aᵀ = [[1, 1, 1, 0], [0, 1, -1, -1]].
#[inline(always)]
fn output2([m0, m1, m2, m3]: [f32; 4]) -> [f32; 2] {
    [m0 + m1 + m2, m1 - m2 - m3]
}

/// `Bᵀ d` of F(4x4, 3x3). Bᵀ = [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0],
/// [0, 4, -4, -1, 1, 0], [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]].
#[inline(always)]
fn input4([d0, d1, d2, d3, d4, d5]: [f32; 6]) -> [f32; 6] {
    let (a, b) = (d4 - 4.0 * d2, d3 - 4.0 * d1);
    let (e, f) = (d4 - d2, 2.0 * (d3 - d1));
    [4.0 * d0 - 5.0 * d2 + d4, a + b, a - b, e + f, e - f, 4.0 * d1 - 5.0 * d3 + d5]
}

/// `Aᵀ m` of F(4x4, 3x3). Aᵀ = [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0],
/// [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]].
#[inline(always)]
fn output4([m0, m1, m2, m3, m4, m5]: [f32; 6]) -> [f32; 4] {
    let (p1, d1, p3, d3) = (m1 + m2, m1 - m2, m3 + m4, m3 - m4);
    [m0 + p1 + p3, d1 + 2.0 * d3, p1 + 4.0 * p3, d1 + 8.0 * d3 + m5]
}

/// `Bᵀ d` down the columns: `out[i]` from the `S` input rows (each `stride` long in
/// `rows`), over the first `len` values; past the input's `stride`, zeros.
#[inline(always)]
fn column_transform<const S: usize>(
    input: impl Fn([f32; S]) -> [f32; S],
    rows: &[f32],
    stride: usize,
    len: usize,
    out: &mut [f32],
) {
    let width = stride.min(len);
    let r: [&[f32]; S] = std::array::from_fn(|i| &rows[i * stride..][..width]);
    let Some(mut o) = runs_mut::<S>(out, len, 0, len) else { return };
    for x in 0..width {
        let t = input(std::array::from_fn(|i| r[i][x]));
        for (o, t) in o.iter_mut().zip(t) {
            o[x] = t;
        }
    }
    for o in o {
        o[width..].fill(0.0);
    }
}

/// `N` disjoint runs of `len` values in `buf`, `stride` apart from `at`; None when `buf`
/// is too short. (The transforms write several rows at once.)
#[inline(always)]
fn runs_mut<const N: usize>(buf: &mut [f32], stride: usize, at: usize, len: usize) -> Option<[&mut [f32]; N]> {
    let mut runs = buf.chunks_mut(stride).map(|run| run.get_mut(at..at + len));
    let found: [Option<&mut [f32]>; N] = std::array::from_fn(|_| runs.next().flatten());
    found.iter().all(Option::is_some).then(|| found.map(Option::unwrap_or_default))
}

/// The column transforms of a band: `data[i]` `stride` apart, `c` values a column.
struct Columns<'a> {
    data: &'a [f32],
    stride: usize,
    c: usize,
}

/// `(Bᵀ d) B` across: `v[S i + j][tile]` for the block of `tiles` (`T` columns apart).
#[inline(always)]
fn row_transform<const S: usize, const T: usize>(
    input: impl Fn([f32; S]) -> [f32; S],
    Columns { data, stride, c }: Columns<'_>,
    tiles: std::ops::Range<usize>,
    v: &mut [f32],
) {
    let block = v.len() / (S * S * c);
    for i in 0..S {
        let row = &data[i * stride..][..stride];
        for (t, tile) in tiles.clone().enumerate() {
            let at = T * tile * c;
            let d: [&[f32]; S] = std::array::from_fn(|k| &row[at + k * c..][..c]);
            let Some(mut dst) = runs_mut::<S>(&mut v[S * i * block * c..], block * c, t * c, c) else { return };
            for k in 0..c {
                let x = input(std::array::from_fn(|j| d[j][k]));
                for (o, x) in dst.iter_mut().zip(x) {
                    o[k] = x;
                }
            }
        }
    }
}

/// Where the output transform writes: m pixel-major rows of `per_row` values in `out`, a
/// block's first tile at `first` in each.
struct OutRows<'a> {
    out: &'a mut [f32],
    per_row: usize,
    first: usize,
}

/// A block's products: `M[ξ]` `position` apart, `n` outputs a tile, `count` tiles.
struct Products<'a> {
    m: &'a [f32],
    position: usize,
    n: usize,
    count: usize,
}

/// `Aᵀ M A` of each tile into its `T` pixels of each of the `T` output rows; `down` holds
/// one tile's `Aᵀ M`.
#[inline(always)]
fn output_transform<const S: usize, const T: usize>(
    output: impl Fn([f32; S]) -> [f32; T],
    Products { m, position, n, count }: Products<'_>,
    down: &mut [f32],
    into: OutRows<'_>,
) {
    for t in 0..count {
        let at = |xi: usize| &m[xi * position + t * n..][..n];
        // Down: down[a][j] for the output rows a.
        for j in 0..S {
            let ms: [&[f32]; S] = std::array::from_fn(|i| at(S * i + j));
            let Some(mut rows) = runs_mut::<T>(down, S * n, j * n, n) else { return };
            for k in 0..n {
                let y = output(std::array::from_fn(|i| ms[i][k]));
                for (r, y) in rows.iter_mut().zip(y) {
                    r[k] = y;
                }
            }
        }
        // Across, into the tile's pixels in each row.
        for (a, sa) in down.chunks_exact(S * n).enumerate() {
            let s: [&[f32]; S] = std::array::from_fn(|j| &sa[j * n..][..n]);
            let row = &mut into.out[a * into.per_row + into.first + T * t * n..][..T * n];
            let Some(mut px) = runs_mut::<T>(row, n, 0, n) else { return };
            for k in 0..n {
                let y = output(std::array::from_fn(|j| s[j][k]));
                for (p, y) in px.iter_mut().zip(y) {
                    p[k] = y;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel transform against the definition `G g Gᵀ`, summed in another order.
    #[test]
    fn kernel_transform_is_g_g_gt() {
        let g: Vec<f32> = (0..9).map(|i| (i as f32 * 0.37).sin()).collect();
        let got = transform_kernel(&g, &G4);
        // G g, then (G g) Gᵀ.
        let mut gg = [[0f64; 3]; 6];
        for (i, row) in gg.iter_mut().enumerate() {
            for (b, v) in row.iter_mut().enumerate() {
                *v = (0..3).map(|a| G4[i][a] * f64::from(g[a * 3 + b])).sum();
            }
        }
        for i in 0..6 {
            for j in 0..6 {
                let want: f64 = (0..3).map(|b| gg[i][b] * G4[j][b]).sum();
                assert!((want as f32 - got[i * 6 + j]).abs() < 1e-6, "({i}, {j}): {want} vs {}", got[i * 6 + j]);
            }
        }
    }

    /// One tile through the three transforms equals the 3x3 correlation of its patch.
    fn tile_is_the_correlation<const S: usize, const T: usize>(
        input: impl Fn([f32; S]) -> [f32; S],
        output: impl Fn([f32; S]) -> [f32; T],
        gm: &[[f64; 3]; S],
    ) {
        let d: Vec<f32> = (0..S * S).map(|i| (i as f32 * 0.71).cos() * 3.0).collect();
        let g: Vec<f32> = (0..9).map(|i| (i as f32 * 0.37).sin()).collect();
        let u = transform_kernel(&g, gm);
        // V = Bᵀ d B: down the columns, then across the rows.
        let mut down = [[0f32; S]; S];
        for x in 0..S {
            for (i, v) in input(std::array::from_fn(|y| d[y * S + x])).iter().enumerate() {
                down[i][x] = *v;
            }
        }
        let v: Vec<[f32; S]> = down.iter().map(|row| input(*row)).collect();
        // Y = Aᵀ (U ⊙ V) A.
        let m: Vec<[f32; S]> = (0..S).map(|i| std::array::from_fn(|j| u[i * S + j] * v[i][j])).collect();
        let col: Vec<[f32; T]> = (0..S).map(|j| output(std::array::from_fn(|i| m[i][j]))).collect();
        for a in 0..T {
            let y = output(std::array::from_fn(|j| col[j][a]));
            for (b, y) in y.iter().enumerate() {
                let want: f32 = (0..9).map(|k| g[k] * d[(a + k / 3) * S + b + k % 3]).sum();
                assert!((y - want).abs() < 1e-4, "F({T}x{T}) at ({a}, {b}): {y} vs {want}");
            }
        }
    }

    #[test]
    fn a_tile_through_the_transforms_is_the_correlation() {
        tile_is_the_correlation(input2, output2, &G2);
        tile_is_the_correlation(input4, output4, &G4);
    }
}
