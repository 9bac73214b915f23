//! Winograd's F(4x4, 3x3) for the wide 3x3 convolutions (stride 1, dilation 1) of
//! [`super::conv::DirectConv`]: each 4x4 block of output pixels costs 36 products per
//! (channel, output) pair instead of 144, so the product kernel does 4x less work.
//!
//! With `U = G g Gᵀ` (the 3x3 kernel, transformed once at planning), `V = Bᵀ d B` (a 6x6
//! input patch) and `Y = Aᵀ M A` (the 4x4 outputs), the 36 positions `ξ` of the 6x6
//! transform are 36 independent products `M[ξ] = V[ξ] · U[ξ]` over the channels: a block
//! of tiles makes `V[ξ]` (tiles × channels, row-major) and one call of the product kernel
//! per position makes `M[ξ]` (tiles × outputs).
//!
//! The transforms work on whole channel vectors (the input band is pixel-major, as the
//! tap path reads it): the column transform once per four output rows over the whole
//! padded width, the row transform per tile, the output transform per tile into four
//! pixel-major output rows, which `DirectConv` then turns channel-major as for the tap
//! path. The bias rides on `U[(1,1)]`: `Aᵀ` has ones in its second column, so it reaches
//! every output of the tile exactly once.
//!
//! Numerically F(4x4, 3x3) (points 0, ±1, ±2) is the form other CPU libraries settle on:
//! F(2x2, 3x3) has only ±1 and 1/2 but 1.8 times the products, F(6x6, 3x3) loses digits. The
//! unit tests hold it to tract's convolution at < 1e-4, the parity test the whole models.

use crate::kernels::gemm::{gemm, Packed, PANEL};

/// Output rows (and columns) one tile makes.
pub const TILE: usize = 4;
/// Input rows (and columns) one tile reads: the tile and the kernel's reach.
const SPAN: usize = TILE + 2;
/// Positions of the 6x6 transform.
const POSITIONS: usize = SPAN * SPAN;
/// Bytes of one block's `V` and `M` together: small enough to stay in L2 beside the
/// weights of the position being multiplied.
const BLOCK_BYTES: usize = 256 << 10;

/// The 36 transformed kernels, each `[channels][outputs]` packed for the product kernel.
pub struct Weights {
    channels: usize,
    /// Outputs padded to whole panels: the width of the product rows.
    outputs: usize,
    positions: Vec<Packed>,
}

impl Weights {
    /// From an `OIHW` 3x3 kernel and a bias per output; `None` unless the outputs fill
    /// whole panels.
    pub fn new(kernel: &[f32], bias: &[f32], outputs: usize, channels: usize) -> Option<Self> {
        if !outputs.is_multiple_of(PANEL) || kernel.len() != outputs * channels * 9 || bias.len() != outputs {
            return None;
        }
        // `[ξ][channel][output]`.
        let mut u = vec![0f32; POSITIONS * channels * outputs];
        for o in 0..outputs {
            for c in 0..channels {
                let g = &kernel[(o * channels + c) * 9..][..9];
                let t = transform_kernel(g);
                for (xi, v) in t.iter().enumerate() {
                    u[(xi * channels + c) * outputs + o] = *v;
                }
            }
        }
        let plane = channels * outputs;
        let positions = (0..POSITIONS)
            .map(|xi| {
                // The bias at (1, 1) only (see the module's comment).
                let b = if xi == SPAN + 1 { bias.to_vec() } else { vec![0.0; outputs] };
                Packed::from_inputs_major(&u[xi * plane..][..plane], b, channels, outputs)
            })
            .collect::<Option<Vec<_>>>()?;
        Some(Weights { channels, outputs, positions })
    }

    /// Outputs per product row (padded to whole panels).
    pub fn outputs(&self) -> usize {
        self.outputs
    }

    /// [`TILE`] output rows, pixel-major, one after the other in `out` (each `[x][outputs]`,
    /// `out.len() / TILE` values, at least `TILE * ceil(out_w / TILE)` pixels), from the
    /// `TILE + 2` pixel-major input rows at the start of `rows` (each `padded_w` pixels of
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
        let (c, n) = (self.channels, self.outputs);
        let out_w = padded_w - 2;
        let tiles = out_w.div_ceil(TILE);
        // The last tile of a width not a multiple of TILE reads past the padding: zero columns.
        let cols = TILE * tiles + 2;
        let block = (BLOCK_BYTES / (4 * POSITIONS * (c + n))).clamp(12, tiles.max(12));
        // Taken out and put back rather than borrowed in a closure: a closure is a
        // function of its own, compiled without this one's target features.
        let mut scratch = SCRATCH.take();
        let Scratch { columns, v, m, down } = &mut scratch;
        columns.resize(SPAN * cols * c, 0.0);
        v.resize(POSITIONS * block * c, 0.0);
        m.resize(POSITIONS * block * n, 0.0);
        down.resize(TILE * SPAN * n, 0.0);
        column_transform(rows, padded_w * c, cols * c, columns);
        let per_row = out.len() / TILE;
        for t0 in (0..tiles).step_by(block) {
            let count = block.min(tiles - t0);
            row_transform(columns, cols * c, c, t0, count, v);
            for (xi, w) in self.positions.iter().enumerate() {
                gemm(&v[xi * block * c..][..count * c], w, &mut m[xi * block * n..][..count * n]);
            }
            let into = Into { out: &mut *out, per_row, first: TILE * t0 * n };
            output_transform(m, block * n, n, count, down, into);
        }
        SCRATCH.set(scratch);
    }
}

#[derive(Default)]
struct Scratch {
    /// `Bᵀ d` of the six input rows: `[i][column][channel]`.
    columns: Vec<f32>,
    /// `V[ξ][tile][channel]` of one block of tiles.
    v: Vec<f32>,
    /// `M[ξ][tile][output]` of one block.
    m: Vec<f32>,
    /// `Aᵀ M` of one tile: `[output row][column][output]`.
    down: Vec<f32>,
}

thread_local! {
    /// Kept between calls: fresh buffers would cost page faults on every four rows.
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

/// Frees this thread's buffers (at the end of a run: [`super::RunScope`]); the bytes they held.
pub(crate) fn release_scratch() -> usize {
    let Scratch { columns, v, m, down } = SCRATCH.take();
    [columns, v, m, down].iter().map(|v| v.capacity() * size_of::<f32>()).sum()
}

/// `G g Gᵀ` of one 3x3 kernel `g` (row-major), row-major 6x6, worked in f64.
fn transform_kernel(g: &[f32]) -> [f32; POSITIONS] {
    // G = [[1/4, 0, 0], [-1/6, -1/6, -1/6], [-1/6, 1/6, -1/6], [1/24, 1/12, 1/6],
    //      [1/24, -1/12, 1/6], [0, 0, 1]].
    let apply = |a: f64, b: f64, c: f64| {
        [
            a / 4.0,
            -(a + b + c) / 6.0,
            -(a - b + c) / 6.0,
            a / 24.0 + b / 12.0 + c / 6.0,
            a / 24.0 - b / 12.0 + c / 6.0,
            c,
        ]
    };
    let g = |i: usize| f64::from(g[i]);
    let mut gg = [[0f64; SPAN]; 3]; // (G g)ᵀ: [column of g][row of G g]
    for (j, col) in gg.iter_mut().enumerate() {
        *col = apply(g(j), g(3 + j), g(6 + j));
    }
    let mut u = [0f32; POSITIONS];
    for i in 0..SPAN {
        let row = apply(gg[0][i], gg[1][i], gg[2][i]);
        for (j, v) in row.iter().enumerate() {
            u[i * SPAN + j] = *v as f32;
        }
    }
    u
}

/// `Bᵀ d` of six values. Bᵀ = [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0],
/// [0, 4, -4, -1, 1, 0], [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]].
#[inline(always)]
fn input_transform([d0, d1, d2, d3, d4, d5]: [f32; SPAN]) -> [f32; SPAN] {
    let (a, b) = (d4 - 4.0 * d2, d3 - 4.0 * d1);
    let (e, f) = (d4 - d2, 2.0 * (d3 - d1));
    [4.0 * d0 - 5.0 * d2 + d4, a + b, a - b, e + f, e - f, 4.0 * d1 - 5.0 * d3 + d5]
}

/// `Aᵀ m` of six values. Aᵀ = [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0],
/// [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]].
#[inline(always)]
fn output_transform_of([m0, m1, m2, m3, m4, m5]: [f32; SPAN]) -> [f32; TILE] {
    let (p1, d1, p3, d3) = (m1 + m2, m1 - m2, m3 + m4, m3 - m4);
    [m0 + p1 + p3, d1 + 2.0 * d3, p1 + 4.0 * p3, d1 + 8.0 * d3 + m5]
}

/// `Bᵀ d` down the columns: `out[i]` from input rows `r0..r5` (each `stride` long in
/// `rows`), over the first `len` values; past the input's `stride`, zeros.
#[inline(always)]
fn column_transform(rows: &[f32], stride: usize, len: usize, out: &mut [f32]) {
    let width = stride.min(len);
    let r: [&[f32]; SPAN] = std::array::from_fn(|i| &rows[i * stride..][..width]);
    let Some(mut o) = runs_mut::<SPAN>(out, len, 0, len) else { return };
    let [o0, o1, o2, o3, o4, o5] = &mut o;
    for x in 0..width {
        let t = input_transform([r[0][x], r[1][x], r[2][x], r[3][x], r[4][x], r[5][x]]);
        (o0[x], o1[x], o2[x], o3[x], o4[x], o5[x]) = (t[0], t[1], t[2], t[3], t[4], t[5]);
    }
    for o in o {
        o[width..].fill(0.0);
    }
}

/// `N` disjoint runs of `len` values in `buf`, `stride` apart from `at`; None when `buf`
/// is too short. (The transforms write six or four rows at once.)
#[inline(always)]
fn runs_mut<const N: usize>(buf: &mut [f32], stride: usize, at: usize, len: usize) -> Option<[&mut [f32]; N]> {
    let mut runs = buf.chunks_mut(stride).map(|run| run.get_mut(at..at + len));
    let found: [Option<&mut [f32]>; N] = std::array::from_fn(|_| runs.next().flatten());
    found.iter().all(Option::is_some).then(|| found.map(Option::unwrap_or_default))
}

/// `(Bᵀ d) B` across: `v[6i + j][tile]` for the tiles `t0..t0 + count`, from the column
/// transforms (`columns[i]`, `stride` apart, `c` values a column).
#[inline(always)]
fn row_transform(columns: &[f32], stride: usize, c: usize, t0: usize, count: usize, v: &mut [f32]) {
    let block = v.len() / (POSITIONS * c);
    for i in 0..SPAN {
        let row = &columns[i * stride..][..stride];
        for t in 0..count {
            let at = TILE * (t0 + t) * c;
            let d: [&[f32]; SPAN] = std::array::from_fn(|k| &row[at + k * c..][..c]);
            let Some([v0, v1, v2, v3, v4, v5]) = runs_mut::<SPAN>(&mut v[SPAN * i * block * c..], block * c, t * c, c)
            else {
                return;
            };
            for k in 0..c {
                let x = input_transform([d[0][k], d[1][k], d[2][k], d[3][k], d[4][k], d[5][k]]);
                (v0[k], v1[k], v2[k], v3[k], v4[k], v5[k]) = (x[0], x[1], x[2], x[3], x[4], x[5]);
            }
        }
    }
}

/// Where the output transform writes: [`TILE`] pixel-major rows of `per_row` values in
/// `out`, a block's first tile at `first` in each.
struct Into<'a> {
    out: &'a mut [f32],
    per_row: usize,
    first: usize,
}

/// `Aᵀ M A` of each tile into its four pixels of each of the four output rows; `down`
/// holds one tile's `Aᵀ M`.
#[inline(always)]
fn output_transform(m: &[f32], position: usize, n: usize, count: usize, down: &mut [f32], into: Into<'_>) {
    for t in 0..count {
        let at = |xi: usize| &m[xi * position + t * n..][..n];
        // Down: down[a][j] for the four output rows a.
        for j in 0..SPAN {
            let ms: [&[f32]; SPAN] = std::array::from_fn(|i| at(SPAN * i + j));
            let Some([s0, s1, s2, s3]) = runs_mut::<TILE>(down, SPAN * n, j * n, n) else { return };
            for k in 0..n {
                let y = output_transform_of([ms[0][k], ms[1][k], ms[2][k], ms[3][k], ms[4][k], ms[5][k]]);
                (s0[k], s1[k], s2[k], s3[k]) = (y[0], y[1], y[2], y[3]);
            }
        }
        // Across, into the four pixels of the tile in each row.
        for (a, sa) in down.chunks_exact(SPAN * n).enumerate() {
            let s: [&[f32]; SPAN] = std::array::from_fn(|j| &sa[j * n..][..n]);
            let row = &mut into.out[a * into.per_row + into.first + TILE * t * n..][..TILE * n];
            let Some([p0, p1, p2, p3]) = runs_mut::<TILE>(row, n, 0, n) else { return };
            for k in 0..n {
                let y = output_transform_of([s[0][k], s[1][k], s[2][k], s[3][k], s[4][k], s[5][k]]);
                (p0[k], p1[k], p2[k], p3[k]) = (y[0], y[1], y[2], y[3]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: [[f64; 3]; SPAN] = [
        [0.25, 0.0, 0.0],
        [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
        [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
        [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
        [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
        [0.0, 0.0, 1.0],
    ];

    /// The kernel transform against the definition `G g Gᵀ` with explicit matrices.
    #[test]
    fn kernel_transform_is_g_g_gt() {
        let g: Vec<f32> = (0..9).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut want = [0f64; POSITIONS];
        for i in 0..SPAN {
            for j in 0..SPAN {
                for a in 0..3 {
                    for b in 0..3 {
                        want[i * SPAN + j] += G[i][a] * f64::from(g[a * 3 + b]) * G[j][b];
                    }
                }
            }
        }
        let got = transform_kernel(&g);
        for (w, g) in want.iter().zip(got) {
            assert!((*w as f32 - g).abs() < 1e-6, "{want:?} vs {got:?}");
        }
    }

    /// One tile through the three transforms equals the 3x3 correlation of its 6x6 patch.
    #[test]
    fn a_tile_through_the_transforms_is_the_correlation() {
        let d: Vec<f32> = (0..36).map(|i| (i as f32 * 0.71).cos() * 3.0).collect();
        let g: Vec<f32> = (0..9).map(|i| (i as f32 * 0.37).sin()).collect();
        let u = transform_kernel(&g);
        // V = Bᵀ d B: down the columns, then across the rows.
        let mut down = [[0f32; SPAN]; SPAN];
        for x in 0..SPAN {
            let t = input_transform(std::array::from_fn(|y| d[y * SPAN + x]));
            for (i, v) in t.iter().enumerate() {
                down[i][x] = *v;
            }
        }
        let v: Vec<[f32; SPAN]> = down.iter().map(|row| input_transform(*row)).collect();
        // Y = Aᵀ (U ⊙ V) A.
        let mut m = [[0f32; SPAN]; SPAN];
        for i in 0..SPAN {
            for j in 0..SPAN {
                m[i][j] = u[i * SPAN + j] * v[i][j];
            }
        }
        let mut col = [[0f32; TILE]; SPAN]; // [j][a]
        for (j, c) in col.iter_mut().enumerate() {
            *c = output_transform_of(std::array::from_fn(|i| m[i][j]));
        }
        for a in 0..TILE {
            let y = output_transform_of(std::array::from_fn(|j| col[j][a]));
            for b in 0..TILE {
                let want: f32 = (0..9).map(|k| g[k] * d[(a + k / 3) * SPAN + b + k % 3]).sum();
                assert!((y[b] - want).abs() < 1e-4, "({a}, {b}): {} vs {want}", y[b]);
            }
        }
    }
}
