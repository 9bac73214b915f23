//! The row kernels of the fused TinyViT front (ops/mbconv.rs): a 3x3 depthwise
//! convolution row and the exact GELU; and a convolution to a single output plane
//! (ops/conv.rs); each with its portable twin.

/// Where a depthwise row reads: input rows `width` pixels wide, output pixel `x` centred
/// on input pixel `x * stride` (stride 1: the same width; 2: half of it, rounded up).
#[derive(Clone, Copy, Debug)]
pub struct Span {
    pub width: usize,
    pub stride: usize,
}

impl Span {
    /// Stride 1 over rows `width` pixels wide.
    pub fn same(width: usize) -> Self {
        Span { width, stride: 1 }
    }

    /// Output pixels per row.
    pub fn outputs(self) -> usize {
        self.width.div_ceil(self.stride.max(1))
    }

    /// Output pixel `x`'s centre in the input, and its taps `dx` that lie inside the row
    /// (`first..last`: the edges have two).
    #[inline(always)]
    fn taps(self, x: usize) -> (usize, (usize, usize)) {
        let centre = x * self.stride;
        (centre, (usize::from(centre == 0), if centre + 1 < self.width { 3 } else { 2 }))
    }
}

/// One output row of a 3x3 depthwise convolution (zero padding: a missing row is `None`);
/// `taps` are `[tap][channel]`, one `bias` per channel; `out` is `[span.outputs()][channel]`.
pub fn depthwise_row(rows: [Option<&[f32]>; 3], taps: &[f32], bias: &[f32], span: Span, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::cpu().avx2() {
        // SAFETY: the CPU has the features the function is compiled for.
        return unsafe { depthwise_row_avx2(rows, taps, bias, span, out) };
    }
    depthwise_row_portable(rows, taps, bias, span, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn depthwise_row_avx2(rows: [Option<&[f32]>; 3], taps: &[f32], bias: &[f32], span: Span, out: &mut [f32]) {
    let channels = bias.len();
    let fits = |v: &[f32], pixels: usize| v.len() >= pixels * channels;
    let fitting = fits(out, span.outputs()) && rows.iter().flatten().all(|r| fits(r, span.width));
    if taps.len() < 9 * channels || span.stride == 0 || !fitting {
        return depthwise_row_portable(rows, taps, bias, span, out);
    }
    // Pixel by pixel, 32 channels at a time in four independent sums (one sum through all
    // nine taps is a chain of FMA latencies), then 8 at a time: each tap one load of the
    // input, one of its weights (the 9 x channels weights stay in L1) and an FMA.
    let vectors = channels / 8 * 8;
    for x in 0..span.outputs() {
        let (centre, taps_x) = span.taps(x);
        let at = Pixel { input: centre * channels, output: x * channels };
        let mut c = 0;
        while c + 32 <= vectors {
            depthwise_vectors::<4>(rows, taps, bias, at, c, taps_x, out);
            c += 32;
        }
        while c < vectors {
            depthwise_vectors::<1>(rows, taps, bias, at, c, taps_x, out);
            c += 8;
        }
    }
    depthwise_channels(rows, taps, bias, span, out, vectors..channels)
}

/// Where an output pixel's channels start: in the input rows (its centre) and in `out`.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct Pixel {
    input: usize,
    output: usize,
}

/// One output pixel's channels `c..c + 8 L`, its taps `dx` in `first..last`; the caller
/// checked every length.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn depthwise_vectors<const L: usize>(
    rows: [Option<&[f32]>; 3],
    taps: &[f32],
    bias: &[f32],
    at: Pixel,
    c: usize,
    (first, last): (usize, usize),
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let channels = bias.len();
    let mut acc: [__m256; L] = std::array::from_fn(|l| _mm256_loadu_ps(bias.as_ptr().add(c + 8 * l)));
    for (dy, row) in rows.iter().enumerate() {
        let Some(row) = row else { continue };
        let p = row.as_ptr().add(at.input + c);
        for dx in first..last {
            let (input, weight) = (p.add(dx * channels).sub(channels), taps.as_ptr().add((dy * 3 + dx) * channels + c));
            for (l, acc) in acc.iter_mut().enumerate() {
                let v = _mm256_loadu_ps(input.add(8 * l));
                *acc = _mm256_fmadd_ps(v, _mm256_loadu_ps(weight.add(8 * l)), *acc);
            }
        }
    }
    for (l, acc) in acc.iter().enumerate() {
        _mm256_storeu_ps(out.as_mut_ptr().add(at.output + c + 8 * l), *acc);
    }
}

#[inline(always)]
fn depthwise_row_portable(rows: [Option<&[f32]>; 3], taps: &[f32], bias: &[f32], span: Span, out: &mut [f32]) {
    depthwise_channels(rows, taps, bias, span, out, 0..bias.len())
}

/// [`depthwise_row`] for the channels `range` only.
#[inline(always)]
fn depthwise_channels(
    rows: [Option<&[f32]>; 3],
    taps: &[f32],
    bias: &[f32],
    span: Span,
    out: &mut [f32],
    range: std::ops::Range<usize>,
) {
    let channels = bias.len();
    for x in 0..span.outputs() {
        let (centre, (first, last)) = span.taps(x);
        let dst = &mut out[x * channels..][range.clone()];
        dst.copy_from_slice(&bias[range.clone()]);
        for (dy, row) in rows.iter().enumerate() {
            let Some(row) = row else { continue };
            for dx in first..last {
                let src = &row[(centre + dx - 1) * channels..][range.clone()];
                let w = &taps[(dy * 3 + dx) * channels..][range.clone()];
                dst.iter_mut().zip(src).zip(w).for_each(|((d, s), w)| *d += s * w);
            }
        }
    }
}

/// A stride-1 convolution of channel-major planes into one output plane: each tap of each
/// channel adds a shifted input row, times its weight, to an output row.
pub struct PlaneConv<'a> {
    /// `[channel][height][width]`.
    pub input: &'a [f32],
    pub size: [usize; 2],
    /// `[channel][tap]`, taps row-major over `kernel`.
    pub weights: &'a [f32],
    pub kernel: [usize; 2],
    pub dilation: [usize; 2],
    /// Zero padding above and to the left (below and right follow from the output size).
    pub top_left: [usize; 2],
    pub bias: f32,
    pub relu: bool,
}

impl PlaneConv<'_> {
    /// Into `out`, `[out_h][out_w]`.
    pub fn run(&self, out: &mut [f32], out_size: [usize; 2]) {
        #[cfg(target_arch = "x86_64")]
        if super::cpu().avx2() {
            // SAFETY: the CPU has the features the function is compiled for.
            return unsafe { self.run_avx2(out, out_size) };
        }
        self.run_portable(out, out_size)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run_avx2(&self, out: &mut [f32], out_size: [usize; 2]) {
        self.run_portable(out, out_size)
    }

    #[inline(always)]
    fn run_portable(&self, out: &mut [f32], [out_h, out_w]: [usize; 2]) {
        let [height, width] = self.size;
        let [top, left] = self.top_left;
        let [kh, kw] = self.kernel;
        let taps = kh * kw;
        out.fill(self.bias);
        // Channel by channel over the whole output (at U2-Net-p's 320x320 it is 400 KB: it
        // stays in L2 while every channel adds to it).
        for (plane, weights) in self.input.chunks_exact(height * width).zip(self.weights.chunks_exact(taps)) {
            for y in 0..out_h {
                let dst = &mut out[y * out_w..][..out_w];
                for ky in 0..kh {
                    let Some(iy) = (y + ky * self.dilation[0]).checked_sub(top).filter(|&iy| iy < height) else {
                        continue;
                    };
                    let src = &plane[iy * width..][..width];
                    for kx in 0..kw {
                        let w = weights[ky * kw + kx];
                        let dx = kx * self.dilation[1];
                        // Output columns whose input column x + dx - left lies in the row.
                        let x0 = left.saturating_sub(dx);
                        let x1 = (width + left).saturating_sub(dx).min(out_w);
                        if x0 >= x1 {
                            continue;
                        }
                        let from = &src[x0 + dx - left..];
                        dst[x0..x1].iter_mut().zip(from).for_each(|(o, &v)| *o += w * v);
                    }
                }
            }
        }
        if self.relu {
            out.iter_mut().for_each(|v| *v = v.max(0.0));
        }
    }
}

/// `x = x / 2 * (1 + erf(x / sqrt 2))` in place (the exact GELU of the ONNX export).
pub fn gelu(values: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    match super::cpu() {
        // SAFETY (both): the CPU has the features the function is compiled for.
        super::Cpu::Avx512 => return unsafe { gelu_avx512(values) },
        super::Cpu::Avx2Fma => return unsafe { gelu_avx2(values) },
        super::Cpu::Portable => {}
    }
    gelu_portable(values)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gelu_avx2(values: &mut [f32]) {
    use std::arch::x86_64::*;
    let mut chunks = values.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let x = _mm256_loadu_ps(chunk.as_ptr());
        _mm256_storeu_ps(chunk.as_mut_ptr(), vector::gelu8(x));
    }
    gelu_portable(chunks.into_remainder())
}

/// The same 16 lanes at a time: on Zen 4 (512-bit operations in two halves) it still ran
/// ~10 % faster than the 8-lane form, one instruction doing the work of two.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn gelu_avx512(values: &mut [f32]) {
    use std::arch::x86_64::*;
    let mut chunks = values.chunks_exact_mut(16);
    for chunk in &mut chunks {
        let x = _mm512_loadu_ps(chunk.as_ptr());
        _mm512_storeu_ps(chunk.as_mut_ptr(), vector::gelu16(x));
    }
    gelu_avx2(chunks.into_remainder())
}

#[inline(always)]
fn gelu_portable(values: &mut [f32]) {
    values.iter_mut().for_each(|v| *v = 0.5 * *v * (1.0 + erf(*v * std::f32::consts::FRAC_1_SQRT_2)));
}

/// [`gelu`] on vectors, with the same `erf`, rearranged to spare the multiply-add ports
/// (the GELU's bottleneck; 8-9 cycles per 8 lanes measured on Zen 4, not latency: four
/// vectors interleaved ran no faster): the polynomial's coefficients take the 1/sqrt 2 of
/// erf's argument, and with `a = |x|` the GELU `0.5 x (1 + sign(x) (1 - 1/p))` is
/// `max(x, 0) - a (0.5 / p)`: one multiply-add, no compare and blend.
#[cfg(target_arch = "x86_64")]
mod vector {
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn gelu8(x: __m256) -> __m256 {
        let c = _mm256_set1_ps;
        let a = _mm256_andnot_ps(c(-0.0), x);
        let [b1, b2, b3, b4, b5, b6] = super::ERF_A_OF_X;
        let mut p = _mm256_fmadd_ps(c(b6), a, c(b5));
        for b in [b4, b3, b2, b1, 1.0] {
            p = _mm256_fmadd_ps(p, a, c(b));
        }
        for _ in 0..4 {
            p = _mm256_mul_ps(p, p);
        }
        _mm256_fnmadd_ps(a, _mm256_div_ps(c(0.5), p), _mm256_max_ps(x, c(0.0)))
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn gelu16(x: __m512) -> __m512 {
        let c = _mm512_set1_ps;
        let a = _mm512_abs_ps(x);
        let [b1, b2, b3, b4, b5, b6] = super::ERF_A_OF_X;
        let mut p = _mm512_fmadd_ps(c(b6), a, c(b5));
        for b in [b4, b3, b2, b1, 1.0] {
            p = _mm512_fmadd_ps(p, a, c(b));
        }
        for _ in 0..4 {
            p = _mm512_mul_ps(p, p);
        }
        _mm512_fnmadd_ps(a, _mm512_div_ps(c(0.5), p), _mm512_max_ps(x, c(0.0)))
    }
}

/// [`ERF_A`] for erf(x / sqrt 2) as a polynomial in x: `a_i / sqrt(2)^i`.
#[cfg(target_arch = "x86_64")]
const ERF_A_OF_X: [f32; 6] = {
    let s = std::f32::consts::FRAC_1_SQRT_2;
    let [a1, a2, a3, a4, a5, a6] = ERF_A;
    [a1 * s, a2 * 0.5, a3 * 0.5 * s, a4 * 0.25, a5 * 0.25 * s, a6 * 0.125]
};

/// Abramowitz & Stegun 7.1.28: `erf(x) = 1 - (1 + a1 x + ... + a6 x^6)^-16` for x >= 0
/// (|error| <= 3e-7), the form tract's own `Erf` uses; no branch, so it vectorises.
const ERF_A: [f32; 6] = [0.070_523_08, 0.042_282_01, 0.009_270_527, 0.000_152_014_3, 0.000_276_567_2, 0.000_043_063_8];

#[inline(always)]
fn erf(x: f32) -> f32 {
    let a = x.abs();
    let p = ERF_A.iter().rev().fold(0.0, |p, &c| (p + c) * a) + 1.0;
    let p = p * p;
    let p = p * p;
    let p = p * p;
    let p = p * p;
    (1.0 - 1.0 / p).copysign(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn erf64(x: f64) -> f64 {
        // Series (|x| < 3) is plenty for a reference at these magnitudes.
        let mut sum = 0.0;
        let mut term = x;
        for n in 0..200 {
            sum += term / (2 * n + 1) as f64;
            term *= -x * x / (n + 1) as f64;
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }

    /// The vector GELUs this CPU can run.
    fn vector_gelus() -> Vec<fn(&mut [f32])> {
        #[cfg(target_arch = "x86_64")]
        {
            let cpu = crate::kernels::cpu();
            // SAFETY (both): only where the CPU has the features.
            let avx2: fn(&mut [f32]) = |v| unsafe { gelu_avx2(v) };
            let avx512: fn(&mut [f32]) = |v| unsafe { gelu_avx512(v) };
            match cpu {
                crate::kernels::Cpu::Avx512 => vec![avx2, avx512],
                crate::kernels::Cpu::Avx2Fma => vec![avx2],
                crate::kernels::Cpu::Portable => vec![],
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        vec![]
    }

    #[test]
    fn gelu_matches_the_exact_formula() {
        let xs: Vec<f32> = (-400..=400).map(|i| i as f32 / 100.0).collect();
        // Every form this CPU can run (an AVX-512 machine tests the AVX2 one too), and the
        // portable twin.
        let forms = [vec![gelu as fn(&mut [f32]), gelu_portable], vector_gelus()].concat();
        for run in forms {
            let mut ys = xs.clone();
            run(&mut ys);
            for (&x, &y) in xs.iter().zip(&ys) {
                let want = 0.5 * x as f64 * (1.0 + erf64(x as f64 / 2f64.sqrt()));
                assert!((y as f64 - want).abs() < 1e-6 * want.abs().max(1.0), "gelu({x}) = {y}, want {want}");
            }
            // Sixteen lanes: the vector kernels' own, not a remainder's.
            let mut big = [20.0f32, -20.0, 1e30, -1e30, 6.0, -6.0, 0.0, 1e4].repeat(2);
            run(&mut big);
            // (gelu(-6) is -5.9e-9: 0 or a few e-9 both pass.)
            let want = [20.0, -0.0, 1e30, -0.0, 6.0, -5.9e-9, 0.0, 1e4].repeat(2);
            let close = big.iter().zip(want).all(|(y, w): (&f32, f32)| (y - w).abs() <= 1e-8 + 1e-7 * w.abs());
            assert!(close, "{big:?}");
        }
    }

    #[test]
    fn a_single_output_plane_matches_a_plain_convolution() {
        let value = |i: usize| ((i * 2_654_435_761) >> 8 & 0xffff) as f32 / 65536.0 - 0.5;
        // 3x3 "same" (U2-Net-p's side outputs), dilated, and uneven kernel and padding.
        for (channels, [h, w], kernel, dilation, [top, left], [out_h, out_w]) in [
            (6, [7, 11], [3, 3], [1, 1], [1, 1], [7, 11]),
            (3, [9, 8], [3, 3], [2, 2], [2, 2], [9, 8]),
            (4, [5, 9], [2, 3], [1, 2], [0, 2], [5, 9]),
        ] {
            let input: Vec<f32> = (0..channels * h * w).map(|i| value(i + 11)).collect();
            let weights: Vec<f32> = (0..channels * kernel[0] * kernel[1]).map(|i| value(i + 5) * 2.0).collect();
            let conv = PlaneConv {
                input: &input,
                size: [h, w],
                weights: &weights,
                kernel,
                dilation,
                top_left: [top, left],
                bias: 0.25,
                relu: false,
            };
            let mut want = vec![0f32; out_h * out_w];
            for y in 0..out_h {
                for x in 0..out_w {
                    let mut sum = 0.25f64;
                    for c in 0..channels {
                        for ky in 0..kernel[0] {
                            for kx in 0..kernel[1] {
                                let iy = (y + ky * dilation[0]) as isize - top as isize;
                                let ix = (x + kx * dilation[1]) as isize - left as isize;
                                if (0..h as isize).contains(&iy) && (0..w as isize).contains(&ix) {
                                    let v = input[c * h * w + iy as usize * w + ix as usize] as f64;
                                    sum += v * weights[c * kernel[0] * kernel[1] + ky * kernel[1] + kx] as f64;
                                }
                            }
                        }
                    }
                    want[y * out_w + x] = sum as f32;
                }
            }
            let mut fast = vec![f32::NAN; out_h * out_w];
            conv.run(&mut fast, [out_h, out_w]);
            let mut portable = vec![f32::NAN; out_h * out_w];
            conv.run_portable(&mut portable, [out_h, out_w]);
            for ((f, p), w) in fast.iter().zip(&portable).zip(&want) {
                assert!((f - w).abs() < 1e-5 && (p - w).abs() < 1e-5, "{kernel:?}: {f} / {p} vs {w}");
            }
            let mut relu = vec![f32::NAN; out_h * out_w];
            PlaneConv { relu: true, ..conv }.run(&mut relu, [out_h, out_w]);
            assert!(relu.iter().zip(&want).all(|(r, w)| (r - w.max(0.0)).abs() < 1e-5), "{kernel:?}: ReLU");
        }
    }

    #[test]
    fn depthwise_rows_match_a_plain_convolution_at_the_edges_too() {
        // 20 channels: two vectors and a tail; 64: the encoder's kind; a row one pixel
        // wide; stride 2 (the patch merging's) over even and odd widths.
        for (width, channels, stride) in [(9, 20, 1), (7, 64, 1), (1, 8, 1), (10, 40, 2), (9, 128, 2), (1, 8, 2)] {
            depthwise_case(Span { width, stride }, channels);
        }
    }

    fn depthwise_case(span: Span, channels: usize) {
        let value = |i: usize| ((i * 2_654_435_761) >> 8 & 0xffff) as f32 / 65536.0 - 0.5;
        let width = span.width;
        let rows: Vec<Vec<f32>> =
            (0..3).map(|r| (0..width * channels).map(|i| value(i + 1000 * r)).collect()).collect();
        let taps: Vec<f32> = (0..9 * channels).map(|i| value(i + 7)).collect();
        let bias: Vec<f32> = (0..channels).map(|i| value(i + 3)).collect();
        // The top row missing: zero padding above the image.
        let inputs = [None, Some(&rows[1][..]), Some(&rows[2][..])];
        let outputs = width.div_ceil(span.stride);
        let mut want = vec![0f32; outputs * channels];
        for x in 0..outputs {
            for c in 0..channels {
                let mut sum = bias[c] as f64;
                for (dy, row) in inputs.iter().enumerate() {
                    for dx in 0..3 {
                        let sx = (x * span.stride) as isize + dx as isize - 1;
                        if let (Some(row), true) = (row, (0..width as isize).contains(&sx)) {
                            sum += row[sx as usize * channels + c] as f64 * taps[(dy * 3 + dx) * channels + c] as f64;
                        }
                    }
                }
                want[x * channels + c] = sum as f32;
            }
        }
        let mut fast = vec![f32::NAN; outputs * channels];
        depthwise_row(inputs, &taps, &bias, span, &mut fast);
        let mut portable = vec![f32::NAN; outputs * channels];
        depthwise_row_portable(inputs, &taps, &bias, span, &mut portable);
        for ((f, p), w) in fast.iter().zip(&portable).zip(&want) {
            assert!((f - w).abs() < 1e-5 && (p - w).abs() < 1e-5, "{span:?}: {f} / {p} vs {w}");
        }
    }
}
