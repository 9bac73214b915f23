//! TinyViT's local convolution on its token rows as they are.
//!
//! Each TinyViT block of the MobileSAM encoder's stages 2-4 runs a 3x3 depthwise
//! convolution on its tokens: `[pixels, channels]` moved to channel-major, reshaped to
//! planes, convolved by tract's `DepthWise`, reshaped and moved back. The two moves copy
//! the whole activation each (4 MB at 128x128x128), and tract's depthwise convolution reads
//! each channel's plane on its own. Here the 3x3 taps run over the pixel-major rows directly
//! (the row kernel of the fused encoder front, kernels/conv.rs): one pass, no copies.
//!
//! Replaced, in a decluttered model: `Move(0, 1)` of `[pixels, channels]` → `Reshape` of
//! the pixels to `[height, width]` → a depthwise 3x3 `Conv` (stride 1, padding 1, constant
//! kernel and bias, channel-major without a batch axis) → `Reshape` back to pixels →
//! `Move(0, 1)`; each link the previous one's only reader.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::change_axes::AxisOp;
use tract_onnx::tract_core::ops::cnn::{Conv, KernelFormat, PaddingSpec};
use tract_onnx::tract_core::ops::nn::DataFormat;

use super::only_reader;
use crate::kernels::conv::depthwise_row;

#[derive(Debug, Clone, PartialEq)]
pub struct TokenDepthwise {
    height: usize,
    width: usize,
    /// `[tap][channel]`, taps in row-major order of the 3x3 kernel.
    taps: Vec<f32>,
    bias: Vec<f32>,
}

impl Eq for TokenDepthwise {}

impl Op for TokenDepthwise {
    fn name(&self) -> StaticName {
        "TokenDepthwise".into()
    }

    op_as_typed_op!();
}

impl EvalOp for TokenDepthwise {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let Some(input) = inputs.first() else { bail!("TokenDepthwise: no input") };
        let channels = self.bias.len();
        if input.shape() != [self.height * self.width, channels] {
            bail!("TokenDepthwise: input {:?}, planned for {}x{}x{channels}", input.shape(), self.height, self.width);
        }
        // Every output row is written whole (the row kernel starts each pixel from the bias).
        super::eval_filled(input, input.shape(), |x, out| {
            let row_len = self.width * channels;
            let row = |y: isize| (0..self.height as isize).contains(&y).then(|| &x[y as usize * row_len..][..row_len]);
            for (y, out) in out.chunks_exact_mut(row_len).enumerate() {
                let y = y as isize;
                depthwise_row([row(y - 1), row(y), row(y + 1)], &self.taps, &self.bias, self.width, out);
            }
        })
    }
}

impl TypedOp for TokenDepthwise {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let Some(input) = inputs.first() else { bail!("TokenDepthwise: no input") };
        if input.shape.as_concrete() != Some(&[self.height * self.width, self.bias.len()][..]) {
            bail!("TokenDepthwise: input {:?} does not match the plan", input.shape);
        }
        Ok(tvec!(f32::fact([self.height * self.width, self.bias.len()])))
    }

    as_op!();
}

/// Replaces each local convolution of a decluttered model that has the form above.
pub fn replace_local_convs(mut model: TypedModel) -> TractResult<TypedModel> {
    let candidates: Vec<usize> = model.nodes().iter().filter(|n| n.op_is::<Conv>()).map(|n| n.id).collect();
    for id in candidates {
        let Some((op, tokens, replaced)) = local_conv_for(&model, id)? else { continue };
        let mut patch = TypedModelPatch::default();
        let input = patch.tap_model(&model, tokens)?;
        let out = patch.wire_node(format!("{}.tokens", model.node(id).name), op, &[input])?;
        patch.shunt_outside(&model, replaced, out[0])?;
        patch.apply(&mut model)?;
    }
    Ok(model)
}

/// The op for Conv node `id`, the token outlet it reads and the outlet it replaces.
fn local_conv_for(model: &TypedModel, id: usize) -> TractResult<Option<(TokenDepthwise, OutletId, OutletId)>> {
    let node = model.node(id);
    let Some(conv) = node.op_as::<Conv>() else { return Ok(None) };
    let spec = &conv.pool_spec;
    let channels = spec.input_channels;
    let suitable = conv.q_params.is_none()
        && conv.kernel_fmt == KernelFormat::OIHW
        && spec.data_format == DataFormat::CHW
        && conv.group == channels
        && spec.output_channels == channels
        && *spec.kernel_shape == [3, 3]
        && spec.strides().iter().all(|&s| s == 1)
        && spec.dilations().iter().all(|&d| d == 1)
        && spec.padding == PaddingSpec::Explicit(tvec![1, 1], tvec![1, 1])
        && node.inputs.len() == 3;
    if !suitable {
        return Ok(None);
    }
    let Some([height, width]) = model.outlet_fact(node.inputs[0])?.shape.as_concrete().and_then(|s| match s {
        [c, h, w] if *c == channels => Some([*h, *w]),
        _ => None,
    }) else {
        return Ok(None);
    };
    let pixels = height * width;
    // Before: tokens `[pixels, channels]` → Move(0, 1) → Reshape(1, [pixels], [h, w]).
    let Some(reshaped) = axis_op_from(
        model,
        node.inputs[0],
        id,
        &AxisOp::Reshape(1, tvec![pixels.to_dim()], tvec![height.to_dim(), width.to_dim()]),
    )?
    else {
        return Ok(None);
    };
    let Some(tokens) = axis_op_from(model, reshaped, model.node(node.inputs[0].node).id, &AxisOp::Move(0, 1))? else {
        return Ok(None);
    };
    if model.outlet_fact(tokens)?.shape.as_concrete() != Some(&[pixels, channels][..]) {
        return Ok(None);
    }
    // After: Reshape(1, [h, w], [pixels]) → Move(0, 1), each the only reader.
    let Some(flat) = only_axis_op_after(
        model,
        OutletId::new(id, 0),
        &AxisOp::Reshape(1, tvec![height.to_dim(), width.to_dim()], tvec![pixels.to_dim()]),
    )?
    else {
        return Ok(None);
    };
    let Some(back) = only_axis_op_after(model, flat, &AxisOp::Move(0, 1))? else { return Ok(None) };
    let (Some(kernel), Some(bias)) =
        (model.outlet_fact(node.inputs[1])?.konst.clone(), model.outlet_fact(node.inputs[2])?.konst.clone())
    else {
        return Ok(None);
    };
    if kernel.datum_type() != f32::datum_type()
        || bias.datum_type() != f32::datum_type()
        || kernel.shape() != [channels, 1, 3, 3]
    {
        return Ok(None);
    }
    let (kernel, bias) = (kernel.try_as_plain_ram()?, bias.try_as_plain_ram()?);
    let kernel = kernel.as_slice::<f32>()?;
    let taps = (0..9 * channels).map(|i| kernel[(i % channels) * 9 + i / channels]).collect();
    let bias = match bias.as_slice::<f32>()? {
        b if b.len() == channels => b.to_vec(),
        [b] => vec![*b; channels],
        _ => return Ok(None),
    };
    Ok(Some((TokenDepthwise { height, width, taps, bias }, tokens, back)))
}

/// The input of `outlet`'s producer when that producer is `op` and `reader` is the only
/// reader of `outlet`.
fn axis_op_from(model: &TypedModel, outlet: OutletId, reader: usize, op: &AxisOp) -> TractResult<Option<OutletId>> {
    let producer = model.node(outlet.node);
    let is_op = producer.op_as::<AxisOp>() == Some(op);
    Ok((is_op && only_reader(model, outlet, reader)?).then(|| producer.inputs[0]))
}

/// The output of the node reading `outlet` when that node is its only reader and is `op`.
fn only_axis_op_after(model: &TypedModel, outlet: OutletId, op: &AxisOp) -> TractResult<Option<OutletId>> {
    let readers = model.outlet_successors(outlet);
    let [reader] = readers else { return Ok(None) };
    let node = model.node(reader.node);
    let is_op = node.op_as::<AxisOp>() == Some(op);
    Ok((is_op && only_reader(model, outlet, reader.node)?).then(|| OutletId::new(reader.node, 0)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::noise;
    use tract_onnx::tract_core::ops::cnn::PoolSpec;

    /// TinyViT's local convolution as the decluttered encoder has it: tokens `[h w, c]`
    /// moved to channel-major, reshaped to planes, a depthwise 3x3 convolution, and back.
    fn local_conv(h: usize, w: usize, c: usize) -> TractResult<TypedModel> {
        let mut model = TypedModel::default();
        let x = model.add_source("tokens", f32::fact([h * w, c]))?;
        let moved = model.wire_node("to_planes", AxisOp::Move(0, 1), &[x])?;
        let planes = AxisOp::Reshape(1, tvec![(h * w).to_dim()], tvec![h.to_dim(), w.to_dim()]);
        let planes = model.wire_node("planes", planes, &moved)?;
        let kernel = model.add_const("kernel", Tensor::from_shape(&[c, 1, 3, 3], &noise(9 * c, 3))?)?;
        let bias = model.add_const("bias", Tensor::from_shape(&[c], &noise(c, 5))?)?;
        let spec = PoolSpec::new(
            DataFormat::CHW,
            tvec![3, 3],
            PaddingSpec::Explicit(tvec![1, 1], tvec![1, 1]),
            Some(tvec![1, 1]),
            Some(tvec![1, 1]),
            c,
            c,
        );
        let conv = Conv { pool_spec: spec, kernel_fmt: KernelFormat::OIHW, group: c, q_params: None };
        let y = model.wire_node("conv", conv, &[planes[0], kernel, bias])?;
        let flat = AxisOp::Reshape(1, tvec![h.to_dim(), w.to_dim()], tvec![(h * w).to_dim()]);
        let flat = model.wire_node("flat", flat, &y)?;
        let back = model.wire_node("to_tokens", AxisOp::Move(0, 1), &flat)?;
        model.select_output_outlets(&back)?;
        Ok(model)
    }

    #[test]
    fn local_convolution_on_tokens_matches_tracts_chain() -> TractResult<()> {
        // The encoder's channel counts (whole 32-channel groups, 8-channel vectors), a
        // tail of channels past the last vector, a map one pixel wide.
        for (h, w, c) in [(6, 5, 160), (4, 4, 40), (3, 7, 13), (5, 1, 8)] {
            let tract = local_conv(h, w, c)?;
            let ours = replace_local_convs(tract.clone())?;
            let ops: Vec<String> = ours.eval_order()?.iter().map(|&n| ours.node(n).op.name().to_string()).collect();
            assert_eq!(ops.iter().filter(|op| *op == "TokenDepthwise").count(), 1, "{ops:?}");
            assert!(!ops.iter().any(|op| op.contains("Conv") || op.contains("Move")), "{ops:?}");
            let x = Tensor::from_shape(&[h * w, c], &noise(h * w * c, 11))?;
            let run = |m: TypedModel| -> TractResult<Tensor> {
                Ok(m.into_optimized()?.into_runnable()?.run(tvec!(x.clone().into_tvalue()))?.remove(0).into_tensor())
            };
            let (want, got) = (run(tract)?, run(ours)?);
            assert_eq!(want.shape(), got.shape());
            let (want, got) = (want.try_as_plain_ram()?, got.try_as_plain_ram()?);
            let worst = want
                .as_slice::<f32>()?
                .iter()
                .zip(got.as_slice::<f32>()?)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst < 1e-5, "{h}x{w}x{c}: max |diff| {worst}");
        }
        Ok(())
    }
}
