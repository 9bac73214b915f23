//! Splits a convolution over a channel concatenation into one convolution per part, summed.
//!
//! `Conv(Concat(a, b), W) = Conv(a, W[:, a]) + Conv(b, W[:, b])` (bias on the first only).
//! U²-Net's decoder stages concatenate two 64-channel maps at full resolution and convolve
//! them with a 3x3 kernel, which tract pads explicitly: the 50 MB concatenation and its
//! 50 MB padded copy lived side by side, the model's memory peak (docs/performance.md §2).
//! Split, only one part is padded at a time. The stride-1 convolutions our own op takes
//! (ops/conv.rs, planned first) read a concatenation's parts in place instead, with no sum
//! to add; this split is left for the others.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::array::TypedConcat;
use tract_onnx::tract_core::ops::cnn::{Conv, KernelFormat};
use tract_onnx::tract_core::ops::math;
use tract_onnx::tract_core::ops::nn::DataFormat;

/// Only concatenations at least this big (bytes) are worth splitting.
const MIN_BYTES: usize = 16 << 20;

/// Rewrites every f32 NCHW group-1 `Conv` that reads (alone) a big channel `Concat`.
pub fn split_concat_convs(mut model: TypedModel) -> TractResult<TypedModel> {
    let candidates: Vec<usize> = model.nodes().iter().filter(|n| n.op_is::<Conv>()).map(|n| n.id).collect();
    for id in candidates {
        if let Some(patch) = split_one(&model, id)? {
            patch.apply(&mut model)?;
        }
    }
    Ok(model)
}

fn split_one(model: &TypedModel, id: usize) -> TractResult<Option<TypedModelPatch>> {
    let node = model.node(id);
    let Some(conv) = node.op_as::<Conv>() else { return Ok(None) };
    let suitable = conv.group == 1
        && conv.q_params.is_none()
        && conv.kernel_fmt == KernelFormat::OIHW
        && conv.pool_spec.data_format == DataFormat::NCHW
        && node.inputs.len() == 3;
    if !suitable {
        return Ok(None);
    }
    let concat_node = model.node(node.inputs[0].node);
    let Some(concat) = concat_node.op_as::<TypedConcat>() else { return Ok(None) };
    let fact = model.outlet_fact(node.inputs[0])?;
    let big = fact.shape.as_concrete().is_some_and(|s| s.iter().product::<usize>() * 4 >= MIN_BYTES);
    let alone = model.outlet_successors(node.inputs[0]).len() == 1;
    if concat.axis != 1 || fact.datum_type != f32::datum_type() || !big || !alone {
        return Ok(None);
    }
    let (Some(kernel), Some(bias)) =
        (model.outlet_fact(node.inputs[1])?.konst.clone(), model.outlet_fact(node.inputs[2])?.konst.clone())
    else {
        return Ok(None);
    };
    let mut channels = Vec::new();
    for input in &concat_node.inputs {
        match model.outlet_fact(*input)?.shape.as_concrete() {
            Some(shape) if shape.len() == 4 => channels.push(shape[1]),
            _ => return Ok(None),
        }
    }
    if kernel.rank() != 4 || kernel.shape()[1] != channels.iter().sum::<usize>() {
        return Ok(None);
    }
    let mut patch = TypedModelPatch::new("split-concat-conv");
    let zero_bias = Tensor::zero::<f32>(bias.shape())?;
    let mut sum: Option<OutletId> = None;
    let mut offset = 0;
    for (part, (input, c)) in concat_node.inputs.iter().zip(&channels).enumerate() {
        let x = patch.tap_model(model, *input)?;
        let k = patch.add_const(format!("{}.split{part}.kernel", node.name), kernel.slice(1, offset, offset + c)?)?;
        let b = if part == 0 { bias.clone().into_tensor() } else { zero_bias.clone() };
        let b = patch.add_const(format!("{}.split{part}.bias", node.name), b)?;
        let mut op = conv.clone();
        op.pool_spec.input_channels = *c;
        let y = patch.wire_node(format!("{}.split{part}", node.name), op, &[x, k, b])?[0];
        sum = Some(match sum {
            None => y,
            Some(acc) => patch.wire_node(format!("{}.split{part}.sum", node.name), math::add(), &[acc, y])?[0],
        });
        offset += c;
    }
    let Some(sum) = sum else { return Ok(None) };
    patch.shunt_outside(model, OutletId::new(id, 0), sum)?;
    Ok(Some(patch))
}
