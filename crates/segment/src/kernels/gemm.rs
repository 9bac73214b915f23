//! `out = a * W + bias` for a constant `W`: the one product kernel of our own ops (the
//! fused TinyViT front in mbconv.rs, the dense layers in dense.rs).
//!
//! `a` is row-major `[rows][inputs]` and read in place (no packing: its rows are already
//! contiguous); `W` is packed once, at planning, in panels of [`PANEL`] outputs. A 6-row x
//! 16-column tile of `out` is held in 12 AVX registers while `inputs` are walked in blocks
//! of [`DEPTH`] (a 16 KiB panel block stays in L1, the 6 rows' block of `a` too), the
//! other blocks accumulating into `out`. On this project's Zen 1 machine it runs at about
//! one core's FMA peak (docs/performance.md §3 item 10).

/// Outputs per panel (two AVX vectors).
pub const PANEL: usize = 16;
/// Rows per micro-tile.
const TILE: usize = 6;
/// Inputs per block.
const DEPTH: usize = 256;

/// A constant `[inputs][outputs]` matrix, packed `[outputs / PANEL][inputs][PANEL]`, and a
/// bias per output.
pub struct Packed {
    pub inputs: usize,
    pub outputs: usize,
    panels: Vec<f32>,
    bias: Vec<f32>,
}

impl Packed {
    /// From `data`, element (input `i`, output `o`) at `i * i_stride + o * o_stride`;
    /// `None` unless `outputs` is a multiple of [`PANEL`] and the bias has one value per
    /// output.
    fn constant(inputs: usize, outputs: usize, bias: Vec<f32>, data: &[f32], strides: [usize; 2]) -> Option<Self> {
        let fits = outputs.is_multiple_of(PANEL) && bias.len() == outputs && inputs > 0;
        if !fits || data.len() != inputs * outputs {
            return None;
        }
        let mut packed = Packed::empty();
        packed.refill([inputs, outputs], data, 0, strides);
        packed.bias = bias;
        Some(packed)
    }

    /// From a row-major `[outputs][inputs]` matrix (a convolution's `OI` weights).
    pub fn from_outputs_major(weight: &[f32], bias: Vec<f32>, outputs: usize, inputs: usize) -> Option<Self> {
        Self::constant(inputs, outputs, bias, weight, [1, inputs])
    }

    /// From a row-major `[inputs][outputs]` matrix (a `MatMul`'s right operand).
    pub fn from_inputs_major(weight: &[f32], bias: Vec<f32>, inputs: usize, outputs: usize) -> Option<Self> {
        Self::constant(inputs, outputs, bias, weight, [outputs, 1])
    }

    /// An empty matrix for [`Packed::refill`].
    pub fn empty() -> Self {
        Packed { inputs: 0, outputs: 0, panels: Vec::new(), bias: Vec::new() }
    }

    /// Packs another matrix into the same buffers, without a bias: element (input `i`,
    /// output `o`) is `data[at + i * i_stride + o * o_stride]`. The outputs are padded with
    /// zero columns up to a multiple of [`PANEL`] (the product then has [`Packed::outputs`]
    /// columns, the padding ones zero).
    pub fn refill(&mut self, [inputs, outputs]: [usize; 2], data: &[f32], at: usize, [i_stride, o_stride]: [usize; 2]) {
        let padded = outputs.div_ceil(PANEL) * PANEL;
        self.inputs = inputs;
        self.outputs = padded;
        self.bias.clear();
        self.bias.resize(padded, 0.0);
        self.panels.clear();
        self.panels.resize(inputs * padded, 0.0);
        for (panel, block) in self.panels.chunks_exact_mut(inputs * PANEL).enumerate() {
            let width = PANEL.min(outputs - panel * PANEL);
            let first = at + panel * PANEL * o_stride;
            if o_stride == 1 {
                for (i, dst) in block.chunks_exact_mut(PANEL).enumerate() {
                    let src = first + i * i_stride;
                    dst[..width].copy_from_slice(&data[src..src + width]);
                }
            } else {
                for o in 0..width {
                    let column = first + o * o_stride;
                    for i in 0..inputs {
                        block[i * PANEL + o] = data[column + i * i_stride];
                    }
                }
            }
        }
    }
}

/// `out[r] = bias + a[r] * W` for each row `r` of `a` (`[rows][w.inputs]`).
pub fn gemm(a: &[f32], w: &Packed, out: &mut [f32]) {
    assert!(a.len().is_multiple_of(w.inputs) && out.len() == a.len() / w.inputs * w.outputs);
    #[cfg(target_arch = "x86_64")]
    if super::cpu() == super::Cpu::Avx2Fma {
        // SAFETY: the CPU has the features; the lengths are checked above.
        return unsafe { avx2::gemm(a, w, out) };
    }
    gemm_portable(a, w, out)
}

fn gemm_portable(a: &[f32], w: &Packed, out: &mut [f32]) {
    let (k, n) = (w.inputs, w.outputs);
    for (row, dst) in a.chunks_exact(k).zip(out.chunks_exact_mut(n)) {
        for (panel, (dst, bias)) in dst.chunks_exact_mut(PANEL).zip(w.bias.chunks_exact(PANEL)).enumerate() {
            let mut acc = [0f32; PANEL];
            acc.copy_from_slice(bias);
            let weights = &w.panels[panel * k * PANEL..][..k * PANEL];
            for (&v, w) in row.iter().zip(weights.chunks_exact(PANEL)) {
                acc.iter_mut().zip(w).for_each(|(a, w)| *a += v * w);
            }
            dst.copy_from_slice(&acc);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Packed, DEPTH, PANEL, TILE};
    use std::arch::x86_64::*;

    /// Rows per block of `a` walked against one panel block (keeps it in L2).
    const ROWS: usize = 96;

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn gemm(a: &[f32], w: &Packed, out: &mut [f32]) {
        let (k, n) = (w.inputs, w.outputs);
        let rows = a.len() / k;
        let mut k0 = 0;
        while k0 < k {
            let depth = DEPTH.min(k - k0);
            let first = k0 == 0;
            let mut r0 = 0;
            while r0 < rows {
                let block = ROWS.min(rows - r0);
                for panel in 0..n / PANEL {
                    let wp = w.panels.as_ptr().add(panel * k * PANEL + k0 * PANEL);
                    let bias = w.bias.as_ptr().add(panel * PANEL);
                    let mut r = r0;
                    while r < r0 + block {
                        let tile_rows = TILE.min(r0 + block - r);
                        let src = a.as_ptr().add(r * k + k0);
                        let dst = out.as_mut_ptr().add(r * n + panel * PANEL);
                        let t = Tile { a: src, stride: k, depth, w: wp, bias, accumulate: !first, out: dst, n };
                        match tile_rows {
                            6 => t.run::<6>(),
                            5 => t.run::<5>(),
                            4 => t.run::<4>(),
                            3 => t.run::<3>(),
                            2 => t.run::<2>(),
                            _ => t.run::<1>(),
                        }
                        r += tile_rows;
                    }
                }
                r0 += block;
            }
            k0 += depth;
        }
    }

    /// One micro-tile: rows of `a` (`stride` apart) times `depth` rows of a panel, starting
    /// from the bias (broadcast down the rows) or, to `accumulate`, from `out`'s partial sums.
    struct Tile {
        a: *const f32,
        stride: usize,
        depth: usize,
        w: *const f32,
        bias: *const f32,
        accumulate: bool,
        out: *mut f32,
        n: usize,
    }

    impl Tile {
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn run<const R: usize>(&self) {
            let mut lo = [_mm256_setzero_ps(); R];
            let mut hi = [_mm256_setzero_ps(); R];
            for r in 0..R {
                let from = if self.accumulate { self.out.add(r * self.n) as *const f32 } else { self.bias };
                lo[r] = _mm256_loadu_ps(from);
                hi[r] = _mm256_loadu_ps(from.add(8));
            }
            for i in 0..self.depth {
                let w0 = _mm256_loadu_ps(self.w.add(i * PANEL));
                let w1 = _mm256_loadu_ps(self.w.add(i * PANEL + 8));
                for r in 0..R {
                    let v = _mm256_broadcast_ss(&*self.a.add(r * self.stride + i));
                    lo[r] = _mm256_fmadd_ps(v, w0, lo[r]);
                    hi[r] = _mm256_fmadd_ps(v, w1, hi[r]);
                }
            }
            for r in 0..R {
                _mm256_storeu_ps(self.out.add(r * self.n), lo[r]);
                _mm256_storeu_ps(self.out.add(r * self.n + 8), hi[r]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(i: u32) -> f32 {
        (i.wrapping_mul(2_654_435_761) >> 8) as f32 / (1u32 << 24) as f32 - 0.5
    }

    #[test]
    fn every_tile_height_and_depth_block_matches_a_plain_product() {
        // 600 inputs: three depth blocks, the last partial; 16 outputs and 48: one and three panels.
        for (inputs, outputs) in [(24, 32), (600, 16), (257, 48)] {
            let weight: Vec<f32> = (0..outputs * inputs).map(|i| value(i as u32 ^ 7)).collect();
            let bias: Vec<f32> = (0..outputs).map(|i| value(i as u32 + 7)).collect();
            let w = Packed::from_outputs_major(&weight, bias.clone(), outputs, inputs).expect("shapes fit");
            let transposed: Vec<f32> =
                (0..inputs * outputs).map(|j| weight[(j % outputs) * inputs + j / outputs]).collect();
            let u = Packed::from_inputs_major(&transposed, bias.clone(), inputs, outputs).expect("shapes fit");
            assert!(w.panels == u.panels, "both constructors pack alike");
            for rows in [1, 5, 6, 7, 13, 97, 200] {
                let a: Vec<f32> = (0..rows * inputs).map(|i| value(i as u32 * 3 + 1)).collect();
                let mut out = vec![f32::NAN; rows * outputs];
                gemm(&a, &w, &mut out);
                let mut portable = vec![f32::NAN; rows * outputs];
                gemm_portable(&a, &w, &mut portable);
                for r in 0..rows {
                    for o in 0..outputs {
                        let want: f64 = bias[o] as f64
                            + (0..inputs)
                                .map(|i| a[r * inputs + i] as f64 * weight[o * inputs + i] as f64)
                                .sum::<f64>();
                        for got in [out[r * outputs + o], portable[r * outputs + o]] {
                            assert!(
                                (got as f64 - want).abs() < 1e-4,
                                "{inputs}x{outputs}, {rows} rows: [{r}][{o}] {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn shapes_that_do_not_fit_are_refused() {
        assert!(Packed::from_outputs_major(&[0.0; 15], vec![0.0; 15], 15, 1).is_none());
        assert!(Packed::from_outputs_major(&[0.0; 16], vec![0.0; 15], 16, 1).is_none());
        assert!(Packed::from_inputs_major(&[0.0; 17], vec![0.0; 16], 1, 16).is_none());
    }
}
