//! Softmax over rows of f32 (with an optional bias added first), and the exponential it
//! uses (Cephes' `expf` polynomial, ~1 ulp, vectorises without a branch).

/// `data[r] = softmax(data[r] + bias[r mod (bias rows)])` for each row of `row` values;
/// an empty bias adds nothing.
pub fn softmax_rows(data: &mut [f32], row: usize, bias: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::cpu().avx2() {
        // SAFETY: the CPU has the features the function is compiled for.
        return unsafe { softmax_rows_avx2(data, row, bias) };
    }
    softmax_rows_portable(data, row, bias)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_rows_avx2(data: &mut [f32], row: usize, bias: &[f32]) {
    softmax_rows_portable(data, row, bias)
}

#[inline(always)]
fn softmax_rows_portable(data: &mut [f32], row: usize, bias: &[f32]) {
    if bias.is_empty() {
        data.chunks_exact_mut(row).for_each(softmax_row);
    } else {
        for rows in data.chunks_mut(bias.len()) {
            for (values, bias) in rows.chunks_exact_mut(row).zip(bias.chunks_exact(row)) {
                values.iter_mut().zip(bias).for_each(|(v, b)| *v += b);
                softmax_row(values);
            }
        }
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
        for run in [softmax_rows, softmax_rows_portable] {
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
}
