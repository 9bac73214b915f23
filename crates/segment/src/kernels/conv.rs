//! The row kernels of the fused TinyViT front (ops/mbconv.rs): a 3x3 depthwise
//! convolution row and the exact GELU, each with its portable twin.

/// One output row of a 3x3 depthwise convolution (zero padding: a missing row is `None`);
/// `taps` are `[tap][channel]`, one `bias` per channel.
pub fn depthwise_row(rows: [Option<&[f32]>; 3], taps: &[f32], bias: &[f32], width: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::cpu().avx2() {
        // SAFETY: the CPU has the features the function is compiled for.
        return unsafe { depthwise_row_avx2(rows, taps, bias, width, out) };
    }
    depthwise_row_portable(rows, taps, bias, width, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn depthwise_row_avx2(rows: [Option<&[f32]>; 3], taps: &[f32], bias: &[f32], width: usize, out: &mut [f32]) {
    depthwise_row_portable(rows, taps, bias, width, out)
}

#[inline(always)]
fn depthwise_row_portable(rows: [Option<&[f32]>; 3], taps: &[f32], bias: &[f32], width: usize, out: &mut [f32]) {
    let channels = bias.len();
    for x in 0..width {
        let dst = &mut out[x * channels..][..channels];
        dst.copy_from_slice(bias);
        for (dy, row) in rows.iter().enumerate() {
            let Some(row) = row else { continue };
            for dx in 0..3 {
                let Some(sx) = (x + dx).checked_sub(1).filter(|&sx| sx < width) else { continue };
                let src = &row[sx * channels..][..channels];
                let w = &taps[(dy * 3 + dx) * channels..][..channels];
                dst.iter_mut().zip(src).zip(w).for_each(|((d, s), w)| *d += s * w);
            }
        }
    }
}

/// `x = x / 2 * (1 + erf(x / sqrt 2))` in place (the exact GELU of the ONNX export).
pub fn gelu(values: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::cpu().avx2() {
        // SAFETY: the CPU has the features the function is compiled for.
        return unsafe { gelu_avx2(values) };
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
        _mm256_storeu_ps(chunk.as_mut_ptr(), avx2::gelu8(x));
    }
    gelu_portable(chunks.into_remainder())
}

#[inline(always)]
fn gelu_portable(values: &mut [f32]) {
    values.iter_mut().for_each(|v| *v = 0.5 * *v * (1.0 + erf(*v * std::f32::consts::FRAC_1_SQRT_2)));
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// [`super::gelu`] of 8 lanes, with the same `erf`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn gelu8(x: __m256) -> __m256 {
        let c = _mm256_set1_ps;
        let z = _mm256_mul_ps(x, c(std::f32::consts::FRAC_1_SQRT_2));
        let a = _mm256_andnot_ps(c(-0.0), z);
        let [a1, a2, a3, a4, a5, a6] = super::ERF_A;
        let mut p = _mm256_fmadd_ps(c(a6), a, c(a5));
        p = _mm256_fmadd_ps(p, a, c(a4));
        p = _mm256_fmadd_ps(p, a, c(a3));
        p = _mm256_fmadd_ps(p, a, c(a2));
        p = _mm256_fmadd_ps(p, a, c(a1));
        p = _mm256_fmadd_ps(p, a, c(1.0));
        for _ in 0..4 {
            p = _mm256_mul_ps(p, p);
        }
        let erf_abs = _mm256_sub_ps(c(1.0), _mm256_div_ps(c(1.0), p));
        let erf = _mm256_or_ps(erf_abs, _mm256_and_ps(z, c(-0.0)));
        _mm256_mul_ps(_mm256_mul_ps(x, c(0.5)), _mm256_add_ps(erf, c(1.0)))
    }
}

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

    #[test]
    fn gelu_matches_the_exact_formula() {
        let xs: Vec<f32> = (-400..=400).map(|i| i as f32 / 100.0).collect();
        // The kernel this CPU runs, and its portable twin.
        for run in [gelu, gelu_portable] {
            let mut ys = xs.clone();
            run(&mut ys);
            for (&x, &y) in xs.iter().zip(&ys) {
                let want = 0.5 * x as f64 * (1.0 + erf64(x as f64 / 2f64.sqrt()));
                assert!((y as f64 - want).abs() < 1e-6 * want.abs().max(1.0), "gelu({x}) = {y}, want {want}");
            }
            let mut big = [20.0f32, -20.0, 1e30, -1e30];
            run(&mut big);
            assert_eq!(big, [20.0, -0.0, 1e30, -0.0]);
        }
    }

    #[test]
    fn depthwise_rows_match_a_plain_convolution_at_the_edges_too() {
        let value = |i: usize| ((i * 2_654_435_761) >> 8 & 0xffff) as f32 / 65536.0 - 0.5;
        let (width, channels) = (9, 20);
        let rows: Vec<Vec<f32>> =
            (0..3).map(|r| (0..width * channels).map(|i| value(i + 1000 * r)).collect()).collect();
        let taps: Vec<f32> = (0..9 * channels).map(|i| value(i + 7)).collect();
        let bias: Vec<f32> = (0..channels).map(|i| value(i + 3)).collect();
        // The top row missing: zero padding above the image.
        let inputs = [None, Some(&rows[1][..]), Some(&rows[2][..])];
        let mut want = vec![0f32; width * channels];
        for x in 0..width {
            for c in 0..channels {
                let mut sum = bias[c] as f64;
                for (dy, row) in inputs.iter().enumerate() {
                    for dx in 0..3 {
                        let sx = x as isize + dx as isize - 1;
                        if let (Some(row), true) = (row, (0..width as isize).contains(&sx)) {
                            sum += row[sx as usize * channels + c] as f64 * taps[(dy * 3 + dx) * channels + c] as f64;
                        }
                    }
                }
                want[x * channels + c] = sum as f32;
            }
        }
        let mut fast = vec![f32::NAN; width * channels];
        depthwise_row(inputs, &taps, &bias, width, &mut fast);
        let mut portable = vec![f32::NAN; width * channels];
        depthwise_row_portable(inputs, &taps, &bias, width, &mut portable);
        for ((f, p), w) in fast.iter().zip(&portable).zip(&want) {
            assert!((f - w).abs() < 1e-5 && (p - w).abs() < 1e-5, "{f} / {p} vs {w}");
        }
    }
}
