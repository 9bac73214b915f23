//! Softmax over rows of f32 (with an optional bias added first), and the exponential it
//! uses (Cephes' `expf` polynomial, ~1 ulp, vectorises without a branch).

/// `data[r] = softmax(data[r] + bias[r mod (bias rows)])` for each row of `row` values;
/// an empty bias adds nothing.
pub fn softmax_rows(data: &mut [f32], row: usize, bias: &[f32]) {
    softmax_rows_scaled(data, row, bias, 1.0)
}

/// `data[r] = softmax(scale * data[r] + bias[r mod (bias rows)])` (attention's scores).
pub fn softmax_rows_scaled(data: &mut [f32], row: usize, bias: &[f32], scale: f32) {
    softmax_padded_rows(data, [row, row], bias, scale)
}

/// The same for rows of `row` values `stride` apart (`data` holds whole strides; the
/// values between a row's end and the next row are scratch, and may be overwritten): a
/// product's output with its panel padding, used where it was made.
pub fn softmax_padded_rows(data: &mut [f32], [row, stride]: [usize; 2], bias: &[f32], scale: f32) {
    assert!(row <= stride && (row == 0 || data.len().is_multiple_of(stride)), "softmax: rows of {row} in {stride}");
    #[cfg(target_arch = "x86_64")]
    if super::cpu().avx2() {
        // SAFETY: the CPU has the features the function is compiled for.
        return unsafe { avx2::softmax_rows(data, [row, stride], bias, scale) };
    }
    softmax_rows_portable(data, [row, stride], bias, scale)
}

fn softmax_rows_portable(data: &mut [f32], [row, stride]: [usize; 2], bias: &[f32], scale: f32) {
    if row == 0 {
        return;
    }
    let period = if bias.is_empty() { row } else { bias.len() };
    for (r, values) in data.chunks_exact_mut(stride).enumerate() {
        let values = &mut values[..row];
        match bias.is_empty() {
            true => values.iter_mut().for_each(|v| *v *= scale),
            false => values.iter_mut().zip(&bias[(r * row) % period..]).for_each(|(v, b)| *v = *v * scale + b),
        }
        softmax_row(values);
    }
}

/// The same rows with 8-lane vectors: each row read once for scale, bias and maximum,
/// once for the exponentials and their sum, once for the division; a row's last partial
/// vector through masked loads and stores.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn softmax_rows(data: &mut [f32], [row, stride]: [usize; 2], bias: &[f32], scale: f32) {
        if row == 0 {
            return;
        }
        let period = if bias.is_empty() { row } else { bias.len() };
        if row <= 8 && stride >= 8 && bias.is_empty() {
            return vector_rows(data, [row, stride], scale);
        }
        if row < SHORT {
            return short_rows(data, [row, stride], bias, scale);
        }
        for (r, values) in data.chunks_exact_mut(stride).enumerate() {
            let b = (!bias.is_empty()).then(|| &bias[(r * row) % period..][..row]);
            row_kernel(&mut values[..row], b, scale);
        }
    }

    /// Rows shorter than this go through [`short_rows`].
    const SHORT: usize = 16;

    /// Many short rows (the SAM decoder's image tokens attending to its ~7 prompt tokens:
    /// 4096 rows of 7 per head): a row's vector pass is mostly masked loads, stores and
    /// horizontal reductions in one long dependency chain. Here each row's scale, bias and
    /// maximum are a few scalar steps, the exponentials run as full vectors over the whole
    /// block regardless of row boundaries, and each row's sum is again a few scalar steps.
    /// Padded rows' gaps are exponentiated with them (scratch, never read).
    #[target_feature(enable = "avx2,fma")]
    unsafe fn short_rows(data: &mut [f32], [row, stride]: [usize; 2], bias: &[f32], scale: f32) {
        let period = if bias.is_empty() { row } else { bias.len() };
        for (r, values) in data.chunks_exact_mut(stride).enumerate() {
            let values = &mut values[..row];
            let mut max = f32::NEG_INFINITY;
            if bias.is_empty() {
                for v in values.iter_mut() {
                    *v *= scale;
                    max = if *v > max { *v } else { max };
                }
            } else {
                for (v, b) in values.iter_mut().zip(&bias[(r * row) % period..][..row]) {
                    *v = v.mul_add(scale, *b);
                    max = if *v > max { *v } else { max };
                }
            }
            values.iter_mut().for_each(|v| *v -= max);
        }
        let (n, p) = (data.len() / stride * stride, data.as_mut_ptr());
        let mut i = 0;
        while i + 8 <= n {
            _mm256_storeu_ps(p.add(i), exp_negative(_mm256_loadu_ps(p.add(i))));
            i += 8;
        }
        data[i..n].iter_mut().for_each(|v| *v = super::exp_negative(*v));
        for values in data.chunks_exact_mut(stride) {
            let values = &mut values[..row];
            let inverse = 1.0 / values.iter().sum::<f32>();
            values.iter_mut().for_each(|v| *v *= inverse);
        }
    }

    /// Rows of at most 8 values with room for 8 (the SAM decoder's image tokens against its
    /// 7 prompt tokens, in panels of 16), no bias: each row one vector, its lanes past the
    /// row's end (scratch) kept out of the maximum and the sum, the reductions across the
    /// vector in three steps each. The scalar steps per value of [`short_rows`] took ~115
    /// cycles a row on Zen 4.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn vector_rows(data: &mut [f32], [row, stride]: [usize; 2], scale: f32) {
        let lanes: [i32; 16] = [-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0];
        let valid = _mm256_castsi256_ps(_mm256_loadu_si256(lanes.as_ptr().add(8 - row).cast()));
        let (scale, low) = (_mm256_set1_ps(scale), _mm256_set1_ps(f32::NEG_INFINITY));
        for values in data.chunks_exact_mut(stride) {
            let p = values.as_mut_ptr();
            let x = _mm256_blendv_ps(low, _mm256_mul_ps(_mm256_loadu_ps(p), scale), valid);
            let max = across(x, |a, b| _mm256_max_ps(a, b));
            let e = _mm256_and_ps(exp_negative(_mm256_sub_ps(x, max)), valid);
            let sum = across(e, |a, b| _mm256_add_ps(a, b));
            _mm256_storeu_ps(p, _mm256_mul_ps(e, _mm256_div_ps(_mm256_set1_ps(1.0), sum)));
        }
    }

    /// `op` of all 8 lanes, in every lane.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn across(v: __m256, op: impl Fn(__m256, __m256) -> __m256) -> __m256 {
        let v = op(v, _mm256_permute2f128_ps::<1>(v, v));
        let v = op(v, _mm256_shuffle_ps::<0b01_00_11_10>(v, v));
        op(v, _mm256_shuffle_ps::<0b10_11_00_01>(v, v))
    }

    /// One row of at least 8 values. Its last vector is the row's last 8 values, which
    /// may overlap the previous one: computed from what those lanes held before the
    /// pass (so the overlap gets the same bits twice) and stored after it; only its new
    /// lanes join the sum. Masked loads and stores cost many times a plain one on AMD's
    /// cores, and a 49- or 196-value row (TinyViT's windows) always has such a tail.
    #[inline(never)]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn row_kernel(values: &mut [f32], bias: Option<&[f32]>, scale: f32) {
        let n = values.len();
        debug_assert!(n >= 8);
        // Full vectors before the last one, which has 1 to 8 lanes of its own.
        let (full, last) = ((n - 1) / 8 * 8, n - 8);
        let lanes: [i32; 16] = [0, 0, 0, 0, 0, 0, 0, 0, -1, -1, -1, -1, -1, -1, -1, -1];
        let new_lanes = _mm256_castsi256_ps(_mm256_loadu_si256(lanes.as_ptr().add(n - full).cast()));
        let p = values.as_mut_ptr();
        let scale_v = _mm256_set1_ps(scale);
        let bias_at = |i: usize| match bias {
            Some(b) => _mm256_loadu_ps(b.as_ptr().add(i)),
            None => _mm256_setzero_ps(),
        };
        // Scale, bias, maximum.
        let x_last = _mm256_fmadd_ps(_mm256_loadu_ps(p.add(last)), scale_v, bias_at(last));
        let mut max = x_last;
        let mut i = 0;
        while i < full {
            let x = _mm256_fmadd_ps(_mm256_loadu_ps(p.add(i)), scale_v, bias_at(i));
            _mm256_storeu_ps(p.add(i), x);
            max = _mm256_max_ps(max, x);
            i += 8;
        }
        _mm256_storeu_ps(p.add(last), x_last);
        let halves = _mm_max_ps(_mm256_castps256_ps128(max), _mm256_extractf128_ps(max, 1));
        let pairs = _mm_max_ps(halves, _mm_movehl_ps(halves, halves));
        let top = _mm_max_ss(pairs, _mm_shuffle_ps(pairs, pairs, 1));
        let max = _mm256_broadcastss_ps(top);
        // Exponentials and their sum.
        let e_last = exp_negative(_mm256_sub_ps(_mm256_loadu_ps(p.add(last)), max));
        let mut sum = _mm256_and_ps(e_last, new_lanes);
        let mut i = 0;
        while i < full {
            let e = exp_negative(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), max));
            _mm256_storeu_ps(p.add(i), e);
            sum = _mm256_add_ps(sum, e);
            i += 8;
        }
        _mm256_storeu_ps(p.add(last), e_last);
        let halves = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps(sum, 1));
        let pairs = _mm_add_ps(halves, _mm_movehl_ps(halves, halves));
        let total = _mm_add_ss(pairs, _mm_shuffle_ps(pairs, pairs, 1));
        let inverse = _mm256_set1_ps(1.0 / _mm_cvtss_f32(total));
        let y_last = _mm256_mul_ps(_mm256_loadu_ps(p.add(last)), inverse);
        let mut i = 0;
        while i < full {
            _mm256_storeu_ps(p.add(i), _mm256_mul_ps(_mm256_loadu_ps(p.add(i)), inverse));
            i += 8;
        }
        _mm256_storeu_ps(p.add(last), y_last);
    }

    /// [`super::exp_negative`] on 8 lanes.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn exp_negative(x: __m256) -> __m256 {
        let round = _mm256_set1_ps(12_582_912.0);
        let x = _mm256_max_ps(x, _mm256_set1_ps(-87.3));
        let t = _mm256_fmadd_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E), round);
        let n = _mm256_sub_ps(t, round);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm256_set1_ps(1.987_569_1e-4);
        for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let y = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0));
        let bits = _mm256_sub_epi32(_mm256_castps_si256(t), _mm256_castps_si256(round));
        let two_n = _mm256_slli_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(127)), 23);
        _mm256_mul_ps(y, _mm256_castsi256_ps(two_n))
    }
}

const LANES: usize = 8;

#[inline(always)]
fn softmax_row(values: &mut [f32]) {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = values.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (m, &v) in lanes.iter_mut().zip(chunk) {
            *m = if v > *m { v } else { *m };
        }
    }
    let max = chunks.remainder().iter().chain(&lanes).fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    let mut sums = [0f32; LANES];
    let mut chunks = values.chunks_exact_mut(LANES);
    for chunk in &mut chunks {
        for (s, v) in sums.iter_mut().zip(chunk.iter_mut()) {
            *v = exp_negative(*v - max);
            *s += *v;
        }
    }
    let mut sum: f32 = sums.iter().sum();
    for v in chunks.into_remainder() {
        *v = exp_negative(*v - max);
        sum += *v;
    }
    let inverse = 1.0 / sum;
    values.iter_mut().for_each(|v| *v *= inverse);
}

/// `e^x` for `x <= 0` (Cephes `expf`: x = n ln 2 + r, a degree-5 polynomial in r, 2^n in the
/// exponent bits). Below -87.3 it returns e^-87.3 ~ 1e-38, nothing against a row sum >= 1.
#[inline(always)]
fn exp_negative(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 * 2^23: adding it rounds to an integer, which lands in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let x = if x > -87.3 { x } else { -87.3 };
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // 2^n: n + 127 in the exponent field.
    let scale = f32::from_bits((t.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127)) << 23);
    y * scale
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn reference(values: &[f32]) -> Vec<f32> {
        let max = values.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let exps: Vec<f64> = values.iter().map(|v| f64::from(v - max).exp()).collect();
        let sum: f64 = exps.iter().sum();
        exps.iter().map(|e| (e / sum) as f32).collect()
    }

    #[test]
    fn exp_is_within_two_ulps_down_to_underflow() {
        let mut x = 0.0f32;
        while x > -87.0 {
            let ours = exp_negative(x);
            let exact = f64::from(x).exp() as f32;
            let ulps = (ours.to_bits() as i64 - exact.to_bits() as i64).abs();
            assert!(ulps <= 2, "exp({x}) = {ours}, exact {exact}");
            x -= 0.0137;
        }
        assert!(exp_negative(-1000.0) < 1e-37);
        assert_eq!(exp_negative(0.0), 1.0);
    }

    #[test]
    fn rows_of_every_length_match_a_double_precision_softmax() {
        // The kernel this CPU runs, and its portable twin.
        let portable = |data: &mut [f32], row, bias: &[f32]| softmax_rows_portable(data, [row, row], bias, 1.0);
        for run in [softmax_rows, portable] {
            for row in [1, 3, 7, 8, 9, 49, 196] {
                let mut data: Vec<f32> = (0..row * 5).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.31).collect();
                let expected: Vec<f32> = data.chunks(row).flat_map(reference).collect();
                run(&mut data, row, &[]);
                for (a, b) in data.iter().zip(&expected) {
                    assert!((a - b).abs() < 1e-6, "row {row}: {a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn scaled_rows_match_the_portable_twin_at_every_tail_length() {
        for row in [1, 5, 8, 15, 49] {
            let bias: Vec<f32> = (0..row * 2).map(|i| (i as f32 * 0.9).cos() * 2.0).collect();
            let data: Vec<f32> = (0..row * 6).map(|i| (i as f32 * 0.37).sin() * 20.0).collect();
            let (mut ours, mut twin) = (data.clone(), data);
            softmax_rows_scaled(&mut ours, row, &bias, 0.3);
            softmax_rows_portable(&mut twin, [row, row], &bias, 0.3);
            for (a, b) in ours.iter().zip(&twin) {
                assert!((a - b).abs() < 1e-6, "row {row}: {a} vs {b}");
            }
            let sums: Vec<f32> = ours.chunks(row).map(|r| r.iter().sum()).collect();
            assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-5), "row {row}: sums {sums:?}");
        }
    }

    #[test]
    fn bias_is_added_per_row_and_broadcast_over_leading_axes() {
        let (row, rows_per_bias) = (7, 3);
        let bias: Vec<f32> = (0..row * rows_per_bias).map(|i| (i as f32 * 0.7).sin() * 4.0).collect();
        let mut data: Vec<f32> = (0..row * rows_per_bias * 4).map(|i| (i as f32 * 0.13).cos() * 9.0).collect();
        let expected: Vec<f32> = data
            .chunks(row)
            .enumerate()
            .flat_map(|(r, values)| {
                let b = &bias[(r % rows_per_bias) * row..][..row];
                reference(&values.iter().zip(b).map(|(v, b)| v + b).collect::<Vec<_>>())
            })
            .collect();
        softmax_rows(&mut data, row, &bias);
        for (a, b) in data.iter().zip(&expected) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
    }

    #[test]
    fn short_padded_rows_without_a_bias_match_a_double_precision_softmax() {
        // Rows of 1 to 8 values in panels of 16 (the SAM decoder's scores against its prompt
        // tokens), the gaps holding values that must not count.
        for row in 1..=8 {
            let (rows, stride) = (5, 16);
            let mut data: Vec<f32> = (0..stride * rows).map(|i| (i as f32 * 0.37).sin() * 20.0).collect();
            let want: Vec<Vec<f64>> = data
                .chunks_exact(stride)
                .map(|r| {
                    let x: Vec<f64> = r[..row].iter().map(|&v| v as f64 * 0.3).collect();
                    let max = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let sum: f64 = x.iter().map(|v| (v - max).exp()).sum();
                    x.iter().map(|v| (v - max).exp() / sum).collect()
                })
                .collect();
            let mut twin = data.clone();
            softmax_padded_rows(&mut data, [row, stride], &[], 0.3);
            softmax_rows_portable(&mut twin, [row, stride], &[], 0.3);
            for got in [&data, &twin] {
                for (r, want) in got.chunks_exact(stride).zip(&want) {
                    for (g, w) in r[..row].iter().zip(want) {
                        assert!((*g as f64 - w).abs() < 1e-6, "rows of {row}: {g} vs {w}");
                    }
                }
            }
        }
    }

    #[test]
    fn padded_rows_give_the_contiguous_rows_result_whatever_their_padding_holds() {
        // TinyViT's windows of 49 in panels of 64; the SAM decoder's rows of 7 in 16.
        for (row, stride) in [(49, 64), (196, 208), (7, 16)] {
            let rows = 5;
            let bias: Vec<f32> = (0..row * 2).map(|i| (i as f32 * 0.9).cos() * 2.0).collect();
            let mut contiguous: Vec<f32> = (0..row * rows).map(|i| (i as f32 * 0.37).sin() * 20.0).collect();
            let mut padded = vec![123.0; stride * rows];
            for (dst, src) in padded.chunks_exact_mut(stride).zip(contiguous.chunks_exact(row)) {
                dst[..row].copy_from_slice(src);
            }
            let (mut contiguous_twin, mut padded_twin) = (contiguous.clone(), padded.clone());
            softmax_rows_scaled(&mut contiguous, row, &bias, 0.3);
            softmax_padded_rows(&mut padded, [row, stride], &bias, 0.3);
            // The portable twin too.
            softmax_rows_portable(&mut contiguous_twin, [row, row], &bias, 0.3);
            softmax_rows_portable(&mut padded_twin, [row, stride], &bias, 0.3);
            for (got, want) in [(&padded, &contiguous), (&padded_twin, &contiguous_twin)] {
                for (dst, want) in got.chunks_exact(stride).zip(want.chunks_exact(row)) {
                    assert_eq!(&dst[..row], want, "rows of {row} in {stride}");
                }
            }
        }
    }
}
