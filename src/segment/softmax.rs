//! A softmax over the last axis of an f32 tensor, with an optional constant bias added
//! first, in place of tract's `Softmax` (and of the `Add` of a constant feeding only it) in
//! optimised plans.
//!
//! The attention of both SAM halves takes softmaxes over short rows: TinyViT's windows
//! (49 and 196 keys, after adding a constant position bias) and the decoder's image-to-token
//! attention (7 keys). tract 0.23 runs rows whose length is not a multiple of 4 through
//! three kernel calls each, and the bias through a broadcasting `Add` that writes a whole
//! new tensor: together 275 ms of the encoder and 20 ms of the decoder here
//! (docs/performance.md §3). This op reads each row once with the bias, keeps it in
//! place, and uses a vectorised exponential (Cephes' `expf` polynomial, ~1 ulp).

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::nn::{Softmax, SoftmaxKind};

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RowSoftmax {
    /// With a bias: it is the second input, broadcast over the leading axes.
    biased: bool,
}

impl Op for RowSoftmax {
    fn name(&self) -> StaticName {
        if self.biased { "BiasRowSoftmax" } else { "RowSoftmax" }.into()
    }

    op_as_typed_op!();
}

impl EvalOp for RowSoftmax {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, mut inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let bias = if self.biased { inputs.pop() } else { None };
        let Some(input) = inputs.pop() else { bail!("RowSoftmax: no input") };
        let row = input.shape().last().copied().unwrap_or(0);
        let mut output = input.into_tensor();
        {
            let mut plain = output.try_as_plain_ram_mut()?;
            let data = plain.as_slice_mut::<f32>()?;
            match &bias {
                Some(bias) => {
                    let view = bias.try_as_plain_ram()?;
                    let bias = view.as_slice::<f32>()?;
                    if row == 0 || bias.is_empty() || bias.len() % row != 0 || data.len() % bias.len() != 0 {
                        bail!("RowSoftmax: bias of {} values for rows of {row}", bias.len());
                    }
                    softmax_rows(data, row, bias);
                }
                None if row > 0 => softmax_rows(data, row, &[]),
                None => {}
            }
        }
        Ok(tvec!(output.into_tvalue()))
    }
}

impl TypedOp for RowSoftmax {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let Some(first) = inputs.first() else { bail!("RowSoftmax: no input") };
        Ok(tvec!(first.without_value()))
    }

    as_op!();
}

/// `data[r] = softmax(data[r] + bias[r mod (bias rows)])` for each row of `row` values;
/// an empty bias adds nothing.
pub fn softmax_rows(data: &mut [f32], row: usize, bias: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
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

/// Replaces each last-axis f32 `Softmax` of an optimised model by [`RowSoftmax`], folding in
/// an `Add` of a constant that feeds only it (and broadcasts over leading axes only).
pub fn replace_softmaxes(mut model: TypedModel) -> TractResult<TypedModel> {
    let candidates: Vec<usize> = model.nodes().iter().filter(|n| n.op_is::<Softmax>()).map(|n| n.id).collect();
    for id in candidates {
        let node = model.node(id);
        let Some(softmax) = node.op_as::<Softmax>() else { continue };
        let fact = model.outlet_fact(node.inputs[0])?;
        let Some(shape) = fact.shape.as_concrete() else { continue };
        let last_axis = softmax.axes.as_slice() == [shape.len().saturating_sub(1)];
        if !last_axis || softmax.kind != SoftmaxKind::Softmax || fact.datum_type != f32::datum_type() {
            continue;
        }
        let inputs = match biased_input(&model, node.inputs[0], shape)? {
            Some((x, bias)) => tvec!(x, bias),
            None => tvec!(node.inputs[0]),
        };
        let op = RowSoftmax { biased: inputs.len() == 2 };
        let patch = TypedModelPatch::replace_single_op(&model, node, &inputs, op)?;
        patch.apply(&mut model)?;
    }
    Ok(model)
}

/// When `outlet` is `x + c` with `c` constant f32 of shape `[1, .., 1, d_k, .., d_n]`
/// (a suffix of `shape`) and the sum has no other reader: `(x, c)`.
fn biased_input(model: &TypedModel, outlet: OutletId, shape: &[usize]) -> TractResult<Option<(OutletId, OutletId)>> {
    let producer = model.node(outlet.node);
    let is_add = producer.op_as::<TypedBinOp>().is_some_and(|op| op.0.name() == "Add");
    let only_reader = model.outlet_successors(outlet).len() == 1 && !model.output_outlets()?.contains(&outlet);
    if !is_add || !only_reader || producer.inputs.len() != 2 {
        return Ok(None);
    }
    for (x, c) in [(producer.inputs[0], producer.inputs[1]), (producer.inputs[1], producer.inputs[0])] {
        let (x_fact, c_fact) = (model.outlet_fact(x)?, model.outlet_fact(c)?);
        let same_x = x_fact.shape.as_concrete() == Some(shape) && x_fact.datum_type == f32::datum_type();
        let Some(konst) = c_fact.konst.as_ref().filter(|k| k.datum_type() == f32::datum_type()) else { continue };
        if same_x && broadcasts_over_leading_axes(konst.shape(), shape) {
            return Ok(Some((x, c)));
        }
    }
    Ok(None)
}

fn broadcasts_over_leading_axes(bias: &[usize], shape: &[usize]) -> bool {
    if bias.len() != shape.len() || bias.last() != shape.last() {
        return false;
    }
    let kept = bias.iter().zip(shape).rev().take_while(|(b, s)| b == s).count();
    bias[..bias.len() - kept].iter().all(|&d| d == 1)
}

#[cfg(test)]
mod tests {
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
        for row in [1, 3, 7, 8, 9, 49, 196] {
            let mut data: Vec<f32> = (0..row * 5).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.31).collect();
            let expected: Vec<f32> = data.chunks(row).flat_map(reference).collect();
            softmax_rows(&mut data, row, &[]);
            for (a, b) in data.iter().zip(&expected) {
                assert!((a - b).abs() < 1e-6, "row {row}: {a} vs {b}");
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

    #[test]
    fn the_op_matches_tracts_softmax_of_the_sum() {
        let x = Tensor::from_shape(&[2, 3, 5], &(0..30).map(|v| (v as f32 * 0.41).sin() * 6.0).collect::<Vec<_>>())
            .unwrap();
        let bias = Tensor::from_shape(&[1, 3, 5], &(0..15).map(|v| v as f32 * 0.2).collect::<Vec<_>>()).unwrap();
        let ours = RowSoftmax { biased: true }
            .eval(&EvalContext::out_of_plan(), tvec!(x.clone().into_tvalue(), bias.clone().into_tvalue()))
            .unwrap();
        let x = x.to_plain_array_view::<f32>().unwrap().to_owned();
        let sum = (&x + &bias.to_plain_array_view::<f32>().unwrap()).into_tensor();
        let theirs = Softmax::new(tvec!(2), None, SoftmaxKind::Softmax)
            .eval(&EvalContext::out_of_plan(), tvec!(sum.into_tvalue()))
            .unwrap();
        let (a, b) = (ours[0].to_plain_array_view::<f32>().unwrap(), theirs[0].to_plain_array_view::<f32>().unwrap());
        assert_eq!(a.shape(), b.shape());
        for (a, b) in a.iter().zip(b.iter()) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
    }

    #[test]
    fn only_leading_axes_may_broadcast() {
        assert!(broadcasts_over_leading_axes(&[1, 5, 196, 196], &[25, 5, 196, 196]));
        assert!(broadcasts_over_leading_axes(&[1, 1, 7], &[8, 4096, 7]));
        assert!(!broadcasts_over_leading_axes(&[25, 1, 196, 196], &[25, 5, 196, 196]));
        assert!(!broadcasts_over_leading_axes(&[1, 5, 196, 1], &[25, 5, 196, 196]));
        assert!(!broadcasts_over_leading_axes(&[5, 196, 196], &[25, 5, 196, 196]));
    }
}
