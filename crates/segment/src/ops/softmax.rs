//! A softmax over the last axis of an f32 tensor, with an optional constant bias added
//! first, in place of tract's `Softmax` (and of the `Add` of a constant feeding only it) in
//! optimised plans.
//!
//! The attention of both SAM halves takes softmaxes over short rows: TinyViT's windows (49
//! and 196 keys, after adding a constant position bias) and the decoder's image-to-token
//! attention (7 keys). tract 0.23 runs rows whose length is not a multiple of 4 through
//! three kernel calls each, and the bias through a broadcasting `Add` that writes a whole
//! new tensor: together a visible share of both halves' time (docs/performance.md
//! §3 item 7). This op reads each row once with the bias, keeps it in place, and uses a
//! vectorised exponential (Cephes' `expf` polynomial, ~1 ulp).

use crate::kernels::softmax::softmax_rows;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::nn::{Softmax, SoftmaxKind};

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RowSoftmax {
    /// With a bias: it is the second input, broadcast over the leading axes.
    biased: bool,
}

impl RowSoftmax {
    /// Biased (a second input) or not.
    #[cfg(test)]
    pub(crate) fn new(biased: bool) -> Self {
        RowSoftmax { biased }
    }

    /// With a bias (the second input).
    pub(crate) fn is_biased(&self) -> bool {
        self.biased
    }
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

/// Replaces each last-axis f32 `Softmax` of an optimised model by [`RowSoftmax`], folding in
/// an `Add` of a constant that feeds only it (and broadcasts over leading axes only).
pub fn replace_softmaxes(model: TypedModel) -> TractResult<TypedModel> {
    super::replace_in_place::<Softmax, _>(model, |model, id| {
        let node = model.node(id);
        let Some(softmax) = node.op_as::<Softmax>() else { return Ok(None) };
        let fact = model.outlet_fact(node.inputs[0])?;
        let Some(shape) = fact.shape.as_concrete() else { return Ok(None) };
        let last_axis = softmax.axes.as_slice() == [shape.len().saturating_sub(1)];
        if !last_axis || softmax.kind != SoftmaxKind::Softmax || fact.datum_type != f32::datum_type() {
            return Ok(None);
        }
        let inputs = match biased_input(model, node.inputs[0], shape)? {
            Some((x, bias)) => vec![x, bias],
            None => vec![node.inputs[0]],
        };
        let op = RowSoftmax { biased: inputs.len() == 2 };
        Ok(Some((op, inputs)))
    })
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
