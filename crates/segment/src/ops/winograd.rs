//! Winograd's F(2x2, 3x3) for the wide 3x3 convolutions (stride 1, dilation 1) of
//! [`super::conv::DirectConv`]: each 2x2 block of output pixels costs 16 products per
//! (channel, output) pair instead of 36, so the product kernel does 2.25x less work.
//!
//! With `U = G g Gᵀ` (the 3x3 kernel, transformed once at planning), `V = Bᵀ d B` (a 4x4
//! input patch) and `Y = Aᵀ M A` (the 2x2 outputs), the 16 positions `ξ` of the 4x4
//! transform are 16 independent products `M[ξ] = V[ξ] · U[ξ]` over the channels: a block
//! of tiles makes `V[ξ]` (tiles × channels, row-major) and one call of the product kernel
//! per position makes `M[ξ]` (tiles × outputs).
//!
//! The transforms work on whole channel vectors (the input band is pixel-major, as the
//! tap path reads it): the column transform once per pair of output rows over the whole
//! padded width, the row transform per tile, the output transform per tile into two
//! pixel-major output rows, which `DirectConv` then turns channel-major as for the tap
//! path. The bias rides on `U[(1,1)]`: `Aᵀ` has ones in its second column, so it reaches
//! every output of the tile exactly once.
//!
//! Numerically F(2x2, 3x3) is the mildest Winograd form (its only constants are ±1 and
//! 1/2): the unit tests hold it to tract's convolution at < 1e-4.

use crate::kernels::gemm::{gemm, Packed, PANEL};

/// Positions of the 4x4 transform.
const POSITIONS: usize = 16;
/// Bytes of one block's `V` and `M` together: small enough to stay in L2 beside the
/// weights of the position being multiplied.
const BLOCK_BYTES: usize = 256 << 10;

/// The 16 transformed kernels, each `[channels][outputs]` packed for the product kernel.
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
                let b = if xi == 5 { bias.to_vec() } else { vec![0.0; outputs] };
                Packed::from_inputs_major(&u[xi * plane..][..plane], b, channels, outputs)
            })
            .collect::<Option<Vec<_>>>()?;
        Some(Weights { channels, outputs, positions })
    }

    /// Outputs per product row (padded to whole panels).
    pub fn outputs(&self) -> usize {
        self.outputs
    }

    /// Two output rows, pixel-major (`[x][outputs]`, at least `2 * ceil(out_w / 2)`
    /// pixels each), from the four pixel-major input rows at the start of `rows` (each
    /// `padded_w` pixels of `channels`, its zero padding included; `out_w = padded_w - 2`).
    pub fn two_rows(&self, rows: &[f32], padded_w: usize, out: [&mut [f32]; 2]) {
        #[cfg(target_arch = "x86_64")]
        if crate::kernels::cpu().avx2() {
            // SAFETY: the CPU has the features.
            return unsafe { self.two_rows_avx2(rows, padded_w, out) };
        }
        self.two_rows_with(rows, padded_w, out)
    }

    /// The same loops compiled for AVX2: the transforms are additions over channel
    /// vectors, twice as wide there as in the x86-64 baseline's SSE2.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn two_rows_avx2(&self, rows: &[f32], padded_w: usize, out: [&mut [f32]; 2]) {
        self.two_rows_with(rows, padded_w, out)
    }

    #[inline(always)]
    fn two_rows_with(&self, rows: &[f32], padded_w: usize, out: [&mut [f32]; 2]) {
        let (c, n) = (self.channels, self.outputs);
        let out_w = padded_w - 2;
        let tiles = out_w.div_ceil(2);
        // The last tile of an odd width reads one column past the padding: a zero one.
        let cols = 2 * tiles + 2;
        let block = (BLOCK_BYTES / (4 * POSITIONS * (c + n))).clamp(12, tiles.max(12));
        // Taken out and put back rather than borrowed in a closure: a closure is a
        // function of its own, compiled without this one's target features.
        let mut scratch = SCRATCH.take();
        let Scratch { columns, v, m } = &mut scratch;
        columns.resize(4 * cols * c, 0.0);
        v.resize(POSITIONS * block * c, 0.0);
        m.resize(POSITIONS * block * n, 0.0);
        column_transform(rows, padded_w * c, cols * c, columns);
        let [top, bottom] = out;
        for t0 in (0..tiles).step_by(block) {
            let count = block.min(tiles - t0);
            row_transform(columns, cols * c, c, t0, count, v);
            for (xi, w) in self.positions.iter().enumerate() {
                gemm(&v[xi * block * c..][..count * c], w, &mut m[xi * block * n..][..count * n]);
            }
            output_transform(m, block * n, n, count, [&mut top[2 * t0 * n..], &mut bottom[2 * t0 * n..]]);
        }
        SCRATCH.set(scratch);
    }
}

#[derive(Default)]
struct Scratch {
    /// `Bᵀ d` of the four input rows: `[i][column][channel]`.
    columns: Vec<f32>,
    /// `V[ξ][tile][channel]` of one block of tiles.
    v: Vec<f32>,
    /// `M[ξ][tile][output]` of one block.
    m: Vec<f32>,
}

thread_local! {
    /// Kept between calls: fresh buffers would cost page faults on every pair of rows.
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

/// Frees this thread's buffers (at the end of a run: [`super::RunScope`]); the bytes they held.
pub(crate) fn release_scratch() -> usize {
    let Scratch { columns, v, m } = SCRATCH.take();
    [columns, v, m].iter().map(|v| v.capacity() * size_of::<f32>()).sum()
}

/// `G g Gᵀ` of one 3x3 kernel `g` (row-major), row-major 4x4.
fn transform_kernel(g: &[f32]) -> [f32; 16] {
    // G = [[1, 0, 0], [½, ½, ½], [½, -½, ½], [0, 0, 1]].
    let apply = |a: f32, b: f32, c: f32| [a, 0.5 * (a + b + c), 0.5 * (a - b + c), c];
    let mut gg = [[0f32; 4]; 3]; // (G g)ᵀ: [column of g][row of G g]
    for (j, col) in gg.iter_mut().enumerate() {
        *col = apply(g[j], g[3 + j], g[6 + j]);
    }
    let mut u = [0f32; 16];
    for i in 0..4 {
        let row = apply(gg[0][i], gg[1][i], gg[2][i]);
        u[i * 4..i * 4 + 4].copy_from_slice(&row);
    }
    u
}

/// `Bᵀ d` down the columns: `out[i]` from input rows `r0..r3` (each `stride` long in
/// `rows`), over the first `len` values; past the input's `stride`, zeros.
/// Bᵀ = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]].
#[inline(always)]
fn column_transform(rows: &[f32], stride: usize, len: usize, out: &mut [f32]) {
    let width = stride.min(len);
    let (o0, rest) = out.split_at_mut(len);
    let (o1, rest) = rest.split_at_mut(len);
    let (o2, o3) = rest.split_at_mut(len);
    let r = |i: usize| &rows[i * stride..][..width];
    let (r0, r1, r2, r3) = (r(0), r(1), r(2), r(3));
    for x in 0..width {
        o0[x] = r0[x] - r2[x];
        o1[x] = r1[x] + r2[x];
        o2[x] = r2[x] - r1[x];
        o3[x] = r1[x] - r3[x];
    }
    for o in [o0, o1, o2, &mut o3[..len]] {
        o[width..].fill(0.0);
    }
}

/// `(Bᵀ d) B` across: `v[4i + j][tile]` for the tiles `t0..t0 + count`, from the column
/// transforms (`columns[i]`, `stride` apart, `c` values a column).
#[inline(always)]
fn row_transform(columns: &[f32], stride: usize, c: usize, t0: usize, count: usize, v: &mut [f32]) {
    let block = v.len() / (POSITIONS * c);
    for i in 0..4 {
        let row = &columns[i * stride..][..stride];
        for t in 0..count {
            let at = 2 * (t0 + t) * c;
            let [d0, d1, d2, d3] = [0, 1, 2, 3].map(|k| &row[at + k * c..][..c]);
            let dst = |j: usize| (4 * i + j) * block * c + t * c;
            let [a, b, cc, d] = [dst(0), dst(1), dst(2), dst(3)];
            for k in 0..c {
                v[a + k] = d0[k] - d2[k];
                v[b + k] = d1[k] + d2[k];
                v[cc + k] = d2[k] - d1[k];
                v[d + k] = d1[k] - d3[k];
            }
        }
    }
}

/// `Aᵀ M A` of each tile into its two pixels of each output row.
/// Aᵀ = [[1, 1, 1, 0], [0, 1, -1, -1]].
#[inline(always)]
fn output_transform(m: &[f32], position: usize, n: usize, count: usize, out: [&mut [f32]; 2]) {
    let [top, bottom] = out;
    let mut s = vec![0f32; 8 * n];
    for t in 0..count {
        let at = |xi: usize| &m[xi * position + t * n..][..n];
        // Down: s[a][j] for a = 0, 1.
        for j in 0..4 {
            let (m0, m1, m2, m3) = (at(j), at(4 + j), at(8 + j), at(12 + j));
            let (s0, s1) = s.split_at_mut(4 * n);
            let (s0, s1) = (&mut s0[j * n..][..n], &mut s1[j * n..][..n]);
            for k in 0..n {
                s0[k] = m0[k] + m1[k] + m2[k];
                s1[k] = m1[k] - m2[k] - m3[k];
            }
        }
        // Across, into the two pixels 2t, 2t + 1 of each row.
        for (a, row) in [&mut *top, &mut *bottom].into_iter().enumerate() {
            let sa = |j: usize| &s[(4 * a + j) * n..][..n];
            let (s0, s1, s2, s3) = (sa(0), sa(1), sa(2), sa(3));
            let (left, right) = row[2 * t * n..][..2 * n].split_at_mut(n);
            for k in 0..n {
                left[k] = s0[k] + s1[k] + s2[k];
                right[k] = s1[k] - s2[k] - s3[k];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel transform against the definition `G g Gᵀ` with explicit matrices.
    #[test]
    fn kernel_transform_is_g_g_gt() {
        let g: Vec<f32> = (0..9).map(|i| (i as f32 * 0.37).sin()).collect();
        let gm = [[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]];
        let mut want = [0f32; 16];
        for i in 0..4 {
            for j in 0..4 {
                for a in 0..3 {
                    for b in 0..3 {
                        want[i * 4 + j] += gm[i][a] * g[a * 3 + b] * gm[j][b];
                    }
                }
            }
        }
        let got = transform_kernel(&g);
        for (w, g) in want.iter().zip(got) {
            assert!((w - g).abs() < 1e-6, "{want:?} vs {got:?}");
        }
    }
}
