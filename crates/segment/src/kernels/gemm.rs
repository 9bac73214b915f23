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
/// Inputs per block.
#[cfg(target_arch = "x86_64")]
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

    /// The same matrix with a bias per output (the padding columns' zero); `None` when
    /// there are more values than outputs.
    pub fn with_bias(mut self, bias: Vec<f32>) -> Option<Self> {
        if bias.len() > self.outputs {
            return None;
        }
        self.bias.clear();
        self.bias.extend_from_slice(&bias);
        self.bias.resize(self.outputs, 0.0);
        Some(self)
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
            if o_stride == 1 && width == PANEL {
                // A whole panel's row is a fixed-size copy (two vector moves), not a call
                // to memcpy per 64 bytes (attention's values are packed per window and head).
                for (i, dst) in block.as_chunks_mut::<PANEL>().0.iter_mut().enumerate() {
                    let src = first + i * i_stride;
                    dst.copy_from_slice(&data[src..src + PANEL]);
                }
            } else if o_stride == 1 {
                for (i, dst) in block.chunks_exact_mut(PANEL).enumerate() {
                    let src = first + i * i_stride;
                    dst[..width].copy_from_slice(&data[src..src + width]);
                }
            } else if i_stride == 1 {
                // Each output's inputs are contiguous (attention keys, `[token][channel]`):
                // a `[width][inputs]` block turned `[inputs][PANEL]` by the vector transpose.
                super::transpose::transpose(&data[first..], o_stride, block, PANEL, [width, inputs]);
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
    assert!(a.len().is_multiple_of(w.inputs));
    gemm_taps(Rows::row_major(a, w.inputs), w, out)
}

/// The rows of `a` for [`gemm_taps`]: row `r` is the concatenation, over the taps `t`, of
/// `w.inputs / taps.len()` values starting at `a[taps[t] + r * stride]`, `step` apart. One
/// tap at 0 with `stride` = inputs and `step` 1 is a plain row-major matrix; a convolution
/// reads each kernel tap's rows from the shifted input in place (ops/conv.rs), with no
/// im2col copy; `stride` 1 and `step` = rows is a column-major matrix (the SAM decoder's
/// channel-major image tokens), read in place instead of transposed first.
#[derive(Clone, Copy)]
pub struct Rows<'a> {
    pub a: &'a [f32],
    pub count: usize,
    pub stride: usize,
    pub step: usize,
    pub taps: &'a [usize],
}

impl<'a> Rows<'a> {
    /// A row-major `[rows][inputs]` matrix.
    pub fn row_major(a: &'a [f32], inputs: usize) -> Self {
        Rows { a, count: a.len().checked_div(inputs).unwrap_or(0), stride: inputs, step: 1, taps: &[0] }
    }

    /// A column-major `[inputs][rows]` matrix: row `r` is `a[r], a[r + rows], ...`; `first`
    /// rows on (a block of them), `count` of them.
    pub fn column_major(a: &'a [f32], rows: usize, first: usize, count: usize) -> Self {
        Rows { a: a.get(first..).unwrap_or(&[]), count, stride: 1, step: rows, taps: &[0] }
    }

    /// Inputs per tap, when the taps cut `inputs` evenly and every row lies inside `a`.
    fn per_tap(&self, inputs: usize) -> Option<usize> {
        let taps = self.taps.len();
        let per_tap = inputs.checked_div(taps).filter(|&c| c * taps == inputs && c > 0)?;
        let last = self.taps.iter().max()? + self.count.checked_sub(1)? * self.stride + (per_tap - 1) * self.step + 1;
        (self.step > 0 && last <= self.a.len()).then_some(per_tap)
    }
}

/// `out[r] = bias + rows[r] * W` (`out` is `[rows.count][w.outputs]`).
pub fn gemm_taps(rows: Rows<'_>, w: &Packed, out: &mut [f32]) {
    assert!(out.len() == rows.count * w.outputs);
    gemm_rows_apart(rows, w, out, w.outputs)
}

/// The same with `out`'s rows `stride` apart (`stride >= w.outputs`): each row's
/// `w.outputs` values written where the caller wants them (a slice of a wider tensor,
/// rows with room to spare), the values between left as they are.
pub fn gemm_rows_apart(rows: Rows<'_>, w: &Packed, out: &mut [f32], stride: usize) {
    if rows.count == 0 {
        return;
    }
    assert!(stride >= w.outputs && out.len() >= (rows.count - 1) * stride + w.outputs, "gemm: `out` too short");
    let per_tap = rows.per_tap(w.inputs).expect("gemm_taps: rows outside `a` or taps not cutting the inputs");
    #[cfg(target_arch = "x86_64")]
    match super::cpu() {
        // SAFETY (both): the CPU has the features; the lengths are checked above.
        super::Cpu::Avx512 => {
            return unsafe { blocks(rows, per_tap, w, Out { data: out, stride }, avx512::SHAPE, avx512::tile) }
        }
        super::Cpu::Avx2Fma => {
            return unsafe { blocks(rows, per_tap, w, Out { data: out, stride }, avx2::SHAPE, avx2::tile) }
        }
        super::Cpu::Portable => {}
    }
    gemm_portable(rows, per_tap, w, Out { data: out, stride })
}

/// Where a product's rows go: `stride` apart in `data`.
struct Out<'a> {
    data: &'a mut [f32],
    stride: usize,
}

fn gemm_portable(rows: Rows<'_>, per_tap: usize, w: &Packed, out: Out<'_>) {
    let (k, n) = (w.inputs, w.outputs);
    for r in 0..rows.count {
        let dst = &mut out.data[r * out.stride..][..n];
        for (panel, (dst, bias)) in dst.chunks_exact_mut(PANEL).zip(w.bias.chunks_exact(PANEL)).enumerate() {
            let mut acc = [0f32; PANEL];
            acc.copy_from_slice(bias);
            let weights = &w.panels[panel * k * PANEL..][..k * PANEL];
            for (&tap, weights) in rows.taps.iter().zip(weights.chunks_exact(per_tap * PANEL)) {
                let row = rows.a[tap + r * rows.stride..].iter().step_by(rows.step).take(per_tap);
                for (&v, w) in row.zip(weights.chunks_exact(PANEL)) {
                    acc.iter_mut().zip(w).for_each(|(a, w)| *a += v * w);
                }
            }
            dst.copy_from_slice(&acc);
        }
    }
}

/// A micro-tile's most rows and panels (an ISA's register file decides them).
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct TileShape {
    rows: usize,
    panels: usize,
}

/// Rows per block of `a` walked against one panel block (keeps it in L2).
#[cfg(target_arch = "x86_64")]
const ROWS: usize = 96;

/// The blocking shared by the vector tiles: inputs in blocks of [`DEPTH`], rows in blocks
/// of [`ROWS`], each block cut into micro-tiles of at most `shape`, which `tile` computes.
///
/// SAFETY: `tile` must be runnable on this CPU, and the lengths checked as `gemm_taps` does.
#[cfg(target_arch = "x86_64")]
unsafe fn blocks(
    rows: Rows<'_>,
    per_tap: usize,
    w: &Packed,
    out: Out<'_>,
    shape: TileShape,
    tile: unsafe fn(&Tile<'_, '_>, usize, usize),
) {
    let (k, n) = (w.inputs, w.outputs);
    let panels = n / PANEL;
    // Depth blocks of even size (320 inputs: 160 + 160, not 256 + 64), and each block of
    // rows taken through all of them while its outputs are in cache.
    let depth_blocks = k.div_ceil(DEPTH);
    let mut r0 = 0;
    while r0 < rows.count {
        let block = ROWS.min(rows.count - r0);
        let mut k0 = 0;
        for d in 0..depth_blocks {
            let depth = (k - k0).div_ceil(depth_blocks - d);
            let mut panel = 0;
            while panel < panels {
                let wide = shape.panels.min(panels - panel);
                // The block's rows spread evenly over the fewest tiles (49 rows: 10, 10, 10,
                // 10, 9 rather than 12, 12, 12, 12, 1): a one-row tile loads the weights for
                // a single FMA each, and windowed attention is thousands of 49-row products.
                let mut tiles = block.div_ceil(shape.rows);
                let mut r = r0;
                while r < r0 + block {
                    let tall = (r0 + block - r).div_ceil(tiles);
                    tiles -= 1;
                    let t = Tile {
                        rows: &rows,
                        first_row: r,
                        per_tap,
                        k0,
                        depth,
                        w: w.panels.as_ptr().add(panel * k * PANEL),
                        panel_len: k * PANEL,
                        bias: w.bias.as_ptr().add(panel * PANEL),
                        out: out.data.as_mut_ptr().add(r * out.stride + panel * PANEL),
                        n: out.stride,
                    };
                    tile(&t, tall, wide);
                    r += tall;
                }
                panel += wide;
            }
            k0 += depth;
        }
        r0 += block;
    }
}

/// One micro-tile: rows from `first_row` times the inputs `k0..k0 + depth` of one or more
/// panels (`panel_len` apart), crossing taps where they fall inside; it starts from the
/// bias (broadcast down the rows) at `k0 = 0`, else from `out`'s partial sums.
#[cfg(target_arch = "x86_64")]
struct Tile<'a, 'b> {
    rows: &'b Rows<'a>,
    first_row: usize,
    per_tap: usize,
    k0: usize,
    depth: usize,
    w: *const f32,
    panel_len: usize,
    bias: *const f32,
    out: *mut f32,
    n: usize,
}

#[cfg(target_arch = "x86_64")]
impl Tile<'_, '_> {
    /// Calls `step(a, w, len)` for each tap's stretch of `k0..k0 + depth`: `a` is the first
    /// row's first input of the stretch (read in place at that tap's offset), `w` the
    /// first panel's row for it.
    #[inline(always)]
    unsafe fn stretches(&self, mut step: impl FnMut(*const f32, *const f32, usize)) {
        let end = self.k0 + self.depth;
        let mut kk = self.k0;
        while kk < end {
            let (tap, i0) = (kk / self.per_tap, kk % self.per_tap);
            let len = (self.per_tap - i0).min(end - kk);
            let first = self.rows.taps[tap] + self.first_row * self.rows.stride + i0 * self.rows.step;
            let a = self.rows.a.as_ptr().add(first);
            step(a, self.w.add(kk * PANEL), len);
            kk += len;
        }
    }

    /// Where row `r`'s partial sums for panel `p` start: the bias, or `out`.
    #[inline(always)]
    unsafe fn start(&self, r: usize, p: usize) -> *const f32 {
        if self.k0 > 0 {
            self.out.add(r * self.n + p * PANEL)
        } else {
            self.bias.add(p * PANEL)
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Tile, TileShape, PANEL};
    use std::arch::x86_64::*;

    /// 6 rows x one panel (two 8-lane vectors): 12 of the 16 registers accumulate.
    pub(super) const SHAPE: TileShape = TileShape { rows: 6, panels: 1 };

    pub(super) unsafe fn tile(t: &Tile<'_, '_>, rows: usize, _panels: usize) {
        macro_rules! by_rows {
            ($s:literal) => {
                match rows {
                    6 => run::<6, $s>(t),
                    5 => run::<5, $s>(t),
                    4 => run::<4, $s>(t),
                    3 => run::<3, $s>(t),
                    2 => run::<2, $s>(t),
                    _ => run::<1, $s>(t),
                }
            };
        }
        if t.rows.step == 1 {
            by_rows!(false)
        } else {
            by_rows!(true)
        }
    }

    /// `S`: the inputs of a row are `step` apart (else contiguous, the step known to be 1).
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run<const R: usize, const S: bool>(t: &Tile<'_, '_>) {
        let mut lo = [_mm256_setzero_ps(); R];
        let mut hi = [_mm256_setzero_ps(); R];
        for r in 0..R {
            lo[r] = _mm256_loadu_ps(t.start(r, 0));
            hi[r] = _mm256_loadu_ps(t.start(r, 0).add(8));
        }
        let (stride, step) = (t.rows.stride, if S { t.rows.step } else { 1 });
        t.stretches(|a, w, len| {
            for i in 0..len {
                let w0 = _mm256_loadu_ps(w.add(i * PANEL));
                let w1 = _mm256_loadu_ps(w.add(i * PANEL + 8));
                for r in 0..R {
                    let v = _mm256_broadcast_ss(&*a.add(r * stride + i * step));
                    lo[r] = _mm256_fmadd_ps(v, w0, lo[r]);
                    hi[r] = _mm256_fmadd_ps(v, w1, hi[r]);
                }
            }
        });
        for r in 0..R {
            _mm256_storeu_ps(t.out.add(r * t.n), lo[r]);
            _mm256_storeu_ps(t.out.add(r * t.n + 8), hi[r]);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{Tile, TileShape, PANEL};
    use std::arch::x86_64::*;

    /// 12 rows x two panels (one 16-lane vector each): 24 of the 32 registers accumulate,
    /// each broadcast input feeding two FMAs and each weight load twelve.
    pub(super) const SHAPE: TileShape = TileShape { rows: 12, panels: 2 };

    pub(super) unsafe fn tile(t: &Tile<'_, '_>, rows: usize, panels: usize) {
        macro_rules! by_rows {
            ($p:literal, $s:literal) => {
                match rows {
                    12 => run::<12, $p, $s>(t),
                    11 => run::<11, $p, $s>(t),
                    10 => run::<10, $p, $s>(t),
                    9 => run::<9, $p, $s>(t),
                    8 => run::<8, $p, $s>(t),
                    7 => run::<7, $p, $s>(t),
                    6 => run::<6, $p, $s>(t),
                    5 => run::<5, $p, $s>(t),
                    4 => run::<4, $p, $s>(t),
                    3 => run::<3, $p, $s>(t),
                    2 => run::<2, $p, $s>(t),
                    _ => run::<1, $p, $s>(t),
                }
            };
        }
        match (panels == 2, t.rows.step == 1) {
            (true, true) => by_rows!(2, false),
            (false, true) => by_rows!(1, false),
            (true, false) => by_rows!(2, true),
            (false, false) => by_rows!(1, true),
        }
    }

    /// `S`: the inputs of a row are `step` apart (else contiguous, the step known to be 1).
    #[target_feature(enable = "avx512f")]
    unsafe fn run<const R: usize, const P: usize, const S: bool>(t: &Tile<'_, '_>) {
        let mut acc = [[_mm512_setzero_ps(); P]; R];
        for (r, row) in acc.iter_mut().enumerate() {
            for (p, v) in row.iter_mut().enumerate() {
                *v = _mm512_loadu_ps(t.start(r, p));
            }
        }
        let (stride, step, panel_len) = (t.rows.stride, if S { t.rows.step } else { 1 }, t.panel_len);
        t.stretches(|a, w, len| {
            for i in 0..len {
                let mut ws = [_mm512_setzero_ps(); P];
                for (p, v) in ws.iter_mut().enumerate() {
                    *v = _mm512_loadu_ps(w.add(p * panel_len + i * PANEL));
                }
                for (r, row) in acc.iter_mut().enumerate() {
                    let v = _mm512_set1_ps(*a.add(r * stride + i * step));
                    for (acc, w) in row.iter_mut().zip(&ws) {
                        *acc = _mm512_fmadd_ps(v, *w, *acc);
                    }
                }
            }
        });
        for (r, row) in acc.iter().enumerate() {
            for (p, v) in row.iter().enumerate() {
                _mm512_storeu_ps(t.out.add(r * t.n + p * PANEL), *v);
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

    /// The product by every kernel family this CPU can run (the portable twin first), so
    /// an AVX-512 machine tests its AVX2 tile too.
    fn by_every_family(rows: Rows<'_>, w: &Packed) -> Vec<(&'static str, Vec<f32>)> {
        let mut results = rows_apart_by_every_family(rows, w, w.outputs);
        let mut chosen = vec![f32::NAN; rows.count * w.outputs];
        gemm_taps(rows, w, &mut chosen);
        results.push(("dispatched", chosen));
        results
    }

    /// The same with output rows `stride` apart, the values between them NaN before.
    fn rows_apart_by_every_family(rows: Rows<'_>, w: &Packed, stride: usize) -> Vec<(&'static str, Vec<f32>)> {
        let per_tap = rows.per_tap(w.inputs).expect("rows fit");
        let fresh = || vec![f32::NAN; rows.count * stride];
        let mut results = vec![("portable", fresh())];
        gemm_portable(rows, per_tap, w, Out { data: &mut results[0].1, stride });
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx2") && has!("fma") {
                let mut out = fresh();
                // SAFETY: the CPU has the features; `per_tap` checked the lengths.
                unsafe { blocks(rows, per_tap, w, Out { data: &mut out, stride }, avx2::SHAPE, avx2::tile) };
                results.push(("avx2", out));
            }
            if has!("avx512f") {
                let mut out = fresh();
                // SAFETY: as above.
                unsafe { blocks(rows, per_tap, w, Out { data: &mut out, stride }, avx512::SHAPE, avx512::tile) };
                results.push(("avx512", out));
            }
        }
        let mut chosen = fresh();
        gemm_rows_apart(rows, w, &mut chosen, stride);
        results.push(("dispatched", chosen));
        results
    }

    #[test]
    fn rows_written_apart_match_the_packed_product_and_leave_the_gaps() {
        let (count, inputs, outputs, stride) = (29, 40, 32, 51);
        let a: Vec<f32> = (0..count * inputs).map(|i| value(i as u32 + 7)).collect();
        let weights: Vec<f32> = (0..inputs * outputs).map(|i| value(i as u32 + 99)).collect();
        let bias: Vec<f32> = (0..outputs).map(|i| value(i as u32 + 3)).collect();
        let w = Packed::from_inputs_major(&weights, bias, inputs, outputs).unwrap();
        let mut packed = vec![0.0; count * outputs];
        gemm(&a, &w, &mut packed);
        for (family, got) in rows_apart_by_every_family(Rows::row_major(&a, inputs), &w, stride) {
            for (row, want) in got.chunks_exact(stride).zip(packed.chunks_exact(outputs)) {
                let close = row[..outputs].iter().zip(want).all(|(x, y)| (x - y).abs() < 1e-5);
                assert!(close, "{family}: {:?} vs {want:?}", &row[..outputs]);
                assert!(row[outputs..].iter().all(|v| v.is_nan()), "{family}: a gap was written");
            }
        }
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
                let results = by_every_family(Rows::row_major(&a, inputs), &w);
                let mut plain = vec![f32::NAN; rows * outputs];
                gemm(&a, &w, &mut plain);
                assert!(plain == results[results.len() - 1].1, "gemm is gemm_taps with one tap");
                for r in 0..rows {
                    for o in 0..outputs {
                        let want: f64 = bias[o] as f64
                            + (0..inputs)
                                .map(|i| a[r * inputs + i] as f64 * weight[o * inputs + i] as f64)
                                .sum::<f64>();
                        for (family, out) in &results {
                            let got = out[r * outputs + o];
                            assert!(
                                (got as f64 - want).abs() < 1e-4,
                                "{family}, {inputs}x{outputs}, {rows} rows: [{r}][{o}] {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn rows_gathered_from_taps_match_a_plain_product() {
        // 3 taps of 100 inputs (a depth block ends inside the third tap), rows 7 apart and
        // overlapping, as a convolution reads its shifted input.
        let (taps, per_tap, outputs, stride) = ([0usize, 3, 250], 100, 32, 7);
        let inputs = taps.len() * per_tap;
        for count in [1, 6, 13, 100] {
            let a: Vec<f32> = (0..250 + per_tap + (count - 1) * stride).map(|i| value(i as u32 * 5 + 2)).collect();
            let weight: Vec<f32> = (0..inputs * outputs).map(|i| value(i as u32 ^ 11)).collect();
            let bias: Vec<f32> = (0..outputs).map(|i| value(i as u32 + 3)).collect();
            let w = Packed::from_inputs_major(&weight, bias.clone(), inputs, outputs).expect("shapes fit");
            let results = by_every_family(Rows { a: &a, count, stride, step: 1, taps: &taps }, &w);
            for r in 0..count {
                for o in 0..outputs {
                    let want: f64 = bias[o] as f64
                        + (0..inputs)
                            .map(|i| {
                                let v = a[taps[i / per_tap] + r * stride + i % per_tap];
                                v as f64 * weight[i * outputs + o] as f64
                            })
                            .sum::<f64>();
                    for (family, out) in &results {
                        let got = out[r * outputs + o];
                        assert!((got as f64 - want).abs() < 1e-4, "{family}, {count} rows: [{r}][{o}] {got} vs {want}");
                    }
                }
            }
        }
    }

    #[test]
    fn a_column_major_matrix_read_in_place_matches_its_row_major_copy() {
        // 300 rows in column-major order (the decoder's channel-major tokens), 264 inputs:
        // two depth blocks; blocks of rows starting inside the matrix, as Dense reads them.
        let (rows, inputs, outputs) = (300, 264, 32);
        let a: Vec<f32> = (0..inputs * rows).map(|i| value(i as u32 * 7 + 3)).collect();
        let weight: Vec<f32> = (0..inputs * outputs).map(|i| value(i as u32 ^ 5)).collect();
        let bias: Vec<f32> = (0..outputs).map(|i| value(i as u32 + 9)).collect();
        let w = Packed::from_inputs_major(&weight, bias, inputs, outputs).expect("shapes fit");
        for (first, count) in [(0, 300), (17, 1), (192, 108), (5, 13)] {
            let copy: Vec<f32> = (0..count * inputs).map(|j| a[(j % inputs) * rows + first + j / inputs]).collect();
            let mut want = vec![f32::NAN; count * outputs];
            gemm(&copy, &w, &mut want);
            for (family, got) in by_every_family(Rows::column_major(&a, rows, first, count), &w) {
                let worst = got.iter().zip(&want).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
                assert!(worst < 1e-4, "{family}, rows {first}..+{count}: off by {worst}");
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
