//! TinyViT's local convolution on its token rows as they are.
//!
//! Each TinyViT block of the MobileSAM encoder's stages 2-4 runs a 3x3 depthwise
//! convolution on its tokens: `[pixels, channels]` moved to channel-major, reshaped to
//! planes, convolved by tract's `DepthWise`, reshaped and moved back. The two moves copy
//! the whole activation each (4 MB at 128x128x128), and tract's depthwise convolution reads
//! each channel's plane on its own. Here the 3x3 taps run over the pixel-major rows directly
//! (the row kernel of the fused encoder front, kernels/conv.rs): one pass, no copies.
//!
//! The same blocks cut their tokens into 7x7 (or 14x14) windows for attention and put them
//! back: a zero `Pad` to whole windows, reshapes and a `Move` (two copies of the whole
//! activation), and on the way back a `Move`, reshapes and two `Slice`s cropping the
//! padding (three copies). Each way is a gather of whole token rows: [`RowGather`] does it
//! in one copy, its row map worked out at planning by running tract's own chain on a
//! tensor of row numbers.
//!
//! Local convolution: replaced, in a decluttered model: `Move(0, 1)` of `[pixels, channels]` → `Reshape` of
//! the pixels to `[height, width]` → a depthwise 3x3 `Conv` (stride 1, padding 1, constant
//! kernel and bias, channel-major without a batch axis) → `Reshape` back to pixels →
//! `Move(0, 1)`; each link the previous one's only reader.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::change_axes::AxisOp;
use tract_onnx::tract_core::ops::cnn::{Conv, KernelFormat, PaddingSpec};
use tract_onnx::tract_core::ops::nn::DataFormat;

use std::sync::Arc;

use tract_onnx::tract_core::ops::array::{Pad, PadMode, Slice};
use tract_onnx::tract_core::ops::binary::TypedBinOp;

use super::norm::LayerNorm;

use super::only_reader;
use crate::kernels::conv::{depthwise_row, Span};

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
                depthwise_row([row(y - 1), row(y), row(y + 1)], &self.taps, &self.bias, Span::same(self.width), out);
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
        let name = format!("{}.tokens", model.node(id).name);
        super::substitute(&mut model, name, op, [tokens, replaced])?;
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

/// Output rows of `row` values, each a copy of an input row or zeros.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowGather {
    input: TVec<usize>,
    output: TVec<usize>,
    row: usize,
    /// Per output row: the input row plus one, or 0 for a row of zeros.
    map: Arc<Vec<u32>>,
}

impl Op for RowGather {
    fn name(&self) -> StaticName {
        "RowGather".into()
    }

    op_as_typed_op!();
}

impl EvalOp for RowGather {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let Some(input) = inputs.first() else { bail!("RowGather: no input") };
        if input.shape() != &*self.input {
            bail!("RowGather: input {:?}, planned for {:?}", input.shape(), self.input);
        }
        // Every output row is written: copied or zeroed.
        super::eval_filled(input, &self.output, |x, out| {
            for (out, &from) in out.chunks_exact_mut(self.row).zip(self.map.iter()) {
                match (from as usize).checked_sub(1) {
                    Some(r) => out.copy_from_slice(&x[r * self.row..][..self.row]),
                    None => out.fill(0.0),
                }
            }
        })
    }
}

impl TypedOp for RowGather {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let Some(input) = inputs.first() else { bail!("RowGather: no input") };
        if input.shape.as_concrete() != Some(&*self.input) {
            bail!("RowGather: input {:?} does not match the plan", input.shape);
        }
        Ok(tvec!(f32::fact(self.output.clone())))
    }

    as_op!();
}

/// Replaces each chain of reshapes, moves, zero pads and slices of a decluttered model
/// that only rearranges whole rows of its last axis (and has a pad, a move or a slice in
/// it) by one [`RowGather`].
pub fn replace_row_chains(mut model: TypedModel) -> TractResult<TypedModel> {
    let moving = |node: &TypedNode| {
        node.op_as::<AxisOp>().is_some_and(|op| matches!(op, AxisOp::Move(..)))
            || node.op_is::<Slice>()
            || zero_pad(node)
    };
    let candidates: Vec<usize> = model.nodes().iter().filter(|n| moving(n)).map(|n| n.id).collect();
    let mut taken = std::collections::HashSet::new();
    for id in candidates {
        if taken.contains(&id) {
            continue;
        }
        let Some(chain) = row_chain(&model, id)? else { continue };
        let Some(op) = gather_for(&model, &chain)? else { continue };
        taken.extend(chain.nodes.iter().copied());
        let name = format!("{}.rows", model.node(id).name);
        super::substitute(&mut model, name, op, [chain.input, chain.output])?;
    }
    Ok(model)
}

/// A run of single-input nodes, each the only reader of the previous one's output.
struct Chain {
    input: OutletId,
    output: OutletId,
    nodes: Vec<usize>,
}

fn zero_pad(node: &TypedNode) -> bool {
    node.op_as::<Pad>().is_some_and(|pad| match &pad.mode {
        PadMode::Constant(value) => value.cast_to_scalar::<f32>().is_ok_and(|v| v == 0.0),
        _ => false,
    })
}

/// Reshapes, moves, zero pads and concrete slices: what may sit in a chain.
fn in_chain(node: &TypedNode) -> bool {
    node.inputs.len() == 1
        && node.outputs.len() == 1
        && (node.op_is::<AxisOp>()
            || zero_pad(node)
            || node.op_as::<Slice>().is_some_and(|s| s.start.to_usize().is_ok() && s.end.to_usize().is_ok()))
}

/// The longest chain through node `id`.
fn row_chain(model: &TypedModel, id: usize) -> TractResult<Option<Chain>> {
    if !in_chain(model.node(id)) {
        return Ok(None);
    }
    let mut nodes = vec![id];
    // Back while the producer is a chain node read only by the chain.
    let mut first = id;
    loop {
        let input = model.node(first).inputs[0];
        let producer = model.node(input.node);
        if !in_chain(producer) || !only_reader(model, input, first)? {
            break;
        }
        first = producer.id;
        nodes.insert(0, first);
    }
    // Forward while the only reader is a chain node.
    let mut last = id;
    loop {
        let output = OutletId::new(last, 0);
        let readers = model.outlet_successors(output);
        let [reader] = readers else { break };
        if !in_chain(model.node(reader.node)) || !only_reader(model, output, reader.node)? {
            break;
        }
        last = reader.node;
        nodes.push(last);
    }
    Ok(Some(Chain { input: model.node(first).inputs[0], output: OutletId::new(last, 0), nodes }))
}

/// The gather a chain amounts to, when it moves whole rows of its last axis: the chain
/// wired again for rows of one value (a reshape or move that splits, merges or moves
/// the last axis then fails to wire, or leaves it elsewhere than last) and run on the row
/// numbers from 1 gives each output row's source, 0 for padding.
fn gather_for(model: &TypedModel, chain: &Chain) -> TractResult<Option<RowGather>> {
    let fact = |outlet: OutletId| -> TractResult<Option<TVec<usize>>> {
        let fact = model.outlet_fact(outlet)?;
        Ok(fact.shape.as_concrete().filter(|_| fact.datum_type == f32::datum_type()).map(|s| s.into()))
    };
    let (Some(input), Some(output)) = (fact(chain.input)?, fact(chain.output)?) else { return Ok(None) };
    let (Some(&row), Some(&out_row)) = (input.last(), output.last()) else { return Ok(None) };
    let rows = input.iter().product::<usize>() / row.max(1);
    if row == 0 || row != out_row || rows >= 1 << 24 {
        return Ok(None);
    }
    let single = |shape: &[usize]| -> TVec<usize> { shape[..shape.len() - 1].iter().copied().chain([1]).collect() };
    let mut probe = TypedModel::default();
    let mut wire = probe.add_source("row numbers (probe)", f32::fact(single(&input)))?;
    for &id in &chain.nodes {
        match probe.wire_node(&model.node(id).name, model.node(id).op.clone(), &[wire]) {
            Ok(out) => wire = out[0],
            Err(_) => return Ok(None),
        }
    }
    if probe.outlet_fact(wire)?.shape.as_concrete() != Some(&*single(&output)) {
        return Ok(None);
    }
    probe.select_output_outlets(&[wire])?;
    let numbers: Vec<f32> = (1..=rows).map(|i| i as f32).collect();
    let numbers = Tensor::from_shape(&single(&input), &numbers)?;
    let result = probe.into_runnable()?.run(tvec!(numbers.into_tvalue()))?.remove(0);
    let view = result.try_as_plain_ram()?;
    let map: Vec<u32> = view.as_slice::<f32>()?.iter().map(|&v| v as u32).collect();
    if map.iter().any(|&r| r as usize > rows) {
        return Ok(None);
    }
    Ok(Some(RowGather { input, output, row, map: Arc::new(map) }))
}

/// `a + b` where `b`'s rows are read through a row gather (TinyViT's window merge before
/// the block's residual addition): the merged tokens are never written on their own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatherAdd {
    /// The gather's input (read as `b`) and the output's shape (`a`'s).
    rows: TVec<usize>,
    output: TVec<usize>,
    row: usize,
    map: Arc<Vec<u32>>,
}

impl Op for GatherAdd {
    fn name(&self) -> StaticName {
        "GatherAdd".into()
    }

    op_as_typed_op!();
}

impl EvalOp for GatherAdd {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let [a, rows] = &inputs[..] else { bail!("GatherAdd: two inputs expected") };
        if a.shape() != &*self.output || rows.shape() != &*self.rows {
            bail!(
                "GatherAdd: inputs {:?} and {:?}, planned for {:?} and {:?}",
                a.shape(),
                rows.shape(),
                self.output,
                self.rows
            );
        }
        let view = rows.try_as_plain_ram()?;
        let rows = view.as_slice::<f32>()?;
        // Every output row is written: `a`'s row plus a gathered one (or nothing).
        super::eval_filled(a, &self.output, |a, out| {
            let (a, out) = (a.chunks_exact(self.row), out.chunks_exact_mut(self.row));
            for ((a, out), &from) in a.zip(out).zip(self.map.iter()) {
                match (from as usize).checked_sub(1) {
                    Some(r) => {
                        let b = &rows[r * self.row..][..self.row];
                        out.iter_mut().zip(a).zip(b).for_each(|((o, a), b)| *o = a + b);
                    }
                    None => out.copy_from_slice(a),
                }
            }
        })
    }
}

impl GatherAdd {
    /// Per row of the gathered input, whether any output row reads it; `None` if the map
    /// points outside it.
    pub(crate) fn rows_read(&self) -> Option<Vec<bool>> {
        let rows = self.rows.iter().product::<usize>().checked_div(self.row)?;
        let mut read = vec![false; rows];
        for &from in self.map.iter() {
            if let Some(r) = (from as usize).checked_sub(1) {
                *read.get_mut(r)? = true;
            }
        }
        Some(read)
    }
}

impl TypedOp for GatherAdd {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let [a, rows] = inputs else { bail!("GatherAdd: two inputs expected") };
        if a.shape.as_concrete() != Some(&*self.output) || rows.shape.as_concrete() != Some(&*self.rows) {
            bail!("GatherAdd: inputs {:?} and {:?} do not match the plan", a.shape, rows.shape);
        }
        Ok(tvec!(f32::fact(self.output.clone())))
    }

    as_op!();
}

/// Folds each [`RowGather`] read only by a layer normalisation along rows (into it) or by
/// an addition of a tensor of its output's shape (a [`GatherAdd`]): the gathered rows are
/// then never written whole. Runs after the layer normalisations were replaced (norm.rs).
pub fn fold_row_gathers(mut model: TypedModel) -> TractResult<TypedModel> {
    let gathers: Vec<usize> = model.nodes().iter().filter(|n| n.op_is::<RowGather>()).map(|n| n.id).collect();
    for id in gathers {
        let outlet = OutletId::new(id, 0);
        let readers = model.outlet_successors(outlet);
        let [reader] = readers else { continue };
        let (reader, slot) = (reader.node, reader.slot);
        if !only_reader(&model, outlet, reader)? {
            continue;
        }
        let Some(gather) = model.node(id).op_as::<RowGather>().cloned() else { continue };
        let source = model.node(id).inputs[0];
        let node = model.node(reader);
        let (op, inputs): (Box<dyn TypedOp>, Vec<OutletId>) = if let Some(norm) = node.op_as::<LayerNorm>() {
            let Some(norm) = norm.reading_through(gather.input.clone(), gather.map.clone()) else { continue };
            (Box::new(norm), vec![source])
        } else if node.op_as::<TypedBinOp>().is_some_and(|op| op.0.name() == "Add" && op.1.is_none()) {
            let Some(&other) = node.inputs.get(1 - slot).filter(|_| node.inputs.len() == 2) else { continue };
            if model.outlet_fact(other)?.shape.as_concrete() != Some(&*gather.output) {
                continue;
            }
            let op = GatherAdd {
                rows: gather.input.clone(),
                output: gather.output.clone(),
                row: gather.row,
                map: gather.map.clone(),
            };
            (Box::new(op), vec![other, source])
        } else {
            continue;
        };
        let patch = TypedModelPatch::replace_single_op(&model, model.node(reader), &inputs, op)?;
        patch.apply(&mut model)?;
    }
    Ok(model)
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

    /// TinyViT's window partition of `[h w, c]` tokens into `ws x ws` windows (zero padded
    /// to whole windows) and, after an identity standing for the attention, the way back
    /// (cropping the padding); as in the decluttered encoder. The output is the tokens
    /// again; `windows` also returns the partitioned tensor's outlet.
    fn windows(h: usize, w: usize, c: usize, ws: usize) -> TractResult<(TypedModel, OutletId)> {
        let d = |v: usize| v.to_dim();
        let (nh, nw) = (h.div_ceil(ws), w.div_ceil(ws));
        let (ph, pw) = (nh * ws, nw * ws);
        let mut model = TypedModel::default();
        let x = model.add_source("tokens", f32::fact([h * w, c]))?;
        let mut wire = model.wire_node("grid", AxisOp::Reshape(0, tvec![d(h * w)], tvec![d(h), d(w)]), &[x])?;
        let zero = Arc::new(tensor0(0f32));
        let pad = Pad { pads: vec![(0, ph - h), (0, pw - w), (0, 0)], mode: PadMode::Constant(zero) };
        wire = model.wire_node("pad", pad, &wire)?;
        for (name, op) in [
            ("cut_rows", AxisOp::Reshape(0, tvec![d(ph)], tvec![d(nh), d(ws)])),
            ("cut_columns", AxisOp::Reshape(2, tvec![d(pw)], tvec![d(nw), d(ws)])),
            ("partition", AxisOp::Move(1, 2)),
            ("windows", AxisOp::Reshape(0, tvec![d(nh), d(nw)], tvec![d(nh * nw)])),
            ("window_rows", AxisOp::Reshape(1, tvec![d(ws), d(ws)], tvec![d(ws * ws)])),
        ] {
            wire = model.wire_node(name, op, &wire)?;
        }
        let partitioned = wire[0];
        let mul = tract_onnx::tract_core::ops::math::mul();
        let one = model.add_const("one", tensor3(&[[[1f32]]]))?;
        wire = model.wire_node("attention", mul, &[partitioned, one])?;
        for (name, op) in [
            ("unwindows", AxisOp::Reshape(0, tvec![d(nh * nw)], tvec![d(nh), d(nw)])),
            ("unwindow_rows", AxisOp::Reshape(2, tvec![d(ws * ws)], tvec![d(ws), d(ws)])),
            ("merge", AxisOp::Move(1, 2)),
            ("rows", AxisOp::Reshape(0, tvec![d(nh), d(ws)], tvec![d(ph)])),
        ] {
            wire = model.wire_node(name, op, &wire)?;
        }
        let crop = Slice { axis: 0, start: 0.to_dim(), end: h.to_dim() };
        wire = model.wire_node("crop_rows", crop, &wire)?;
        wire = model.wire_node("columns", AxisOp::Reshape(1, tvec![d(nw), d(ws)], tvec![d(pw)]), &wire)?;
        let crop = Slice { axis: 1, start: 0.to_dim(), end: w.to_dim() };
        wire = model.wire_node("crop_columns", crop, &wire)?;
        wire = model.wire_node("flat", AxisOp::Reshape(0, tvec![d(h), d(w)], tvec![d(h * w)]), &wire)?;
        model.select_output_outlets(&wire)?;
        Ok((model, partitioned))
    }

    #[test]
    fn window_partition_and_merge_are_row_gathers_matching_tracts_chains() -> TractResult<()> {
        // Stage 2's form (7x7 windows, padding on both axes), 14x14 windows, no padding.
        for (h, w, c, ws) in [(9, 9, 8, 7), (16, 15, 5, 14), (14, 7, 3, 7)] {
            let (tract, partitioned) = windows(h, w, c, ws)?;
            let ours = replace_row_chains(tract.clone())?;
            let ops: Vec<String> = ours.eval_order()?.iter().map(|&n| ours.node(n).op.name().to_string()).collect();
            assert_eq!(ops.iter().filter(|op| *op == "RowGather").count(), 2, "{ops:?}");
            assert!(!ops.iter().any(|op| op == "Pad" || op == "Slice" || op.contains("Move")), "{ops:?}");
            let x = Tensor::from_shape(&[h * w, c], &noise(h * w * c, 11))?;
            // The windows themselves, and the tokens after the way back.
            let mut probe = tract.clone();
            probe.select_output_outlets(&[partitioned, tract.output_outlets()?[0]])?;
            let theirs = probe.into_runnable()?.run(tvec!(x.clone().into_tvalue()))?;
            let out = ours.into_runnable()?.run(tvec!(x.clone().into_tvalue()))?;
            assert_eq!(*out[0], *theirs[1], "{h}x{w}x{c}, {ws}x{ws} windows: the tokens come back");
            let gathered = replace_row_chains(windows(h, w, c, ws)?.0)?;
            let first = gathered.eval_order()?.into_iter().find(|&n| gathered.node(n).op.name() == "RowGather");
            let mut partition_only = gathered.clone();
            partition_only.select_output_outlets(&[OutletId::new(first.context("a gather")?, 0)])?;
            let windows = partition_only.into_runnable()?.run(tvec!(x.into_tvalue()))?;
            assert_eq!(*windows[0], *theirs[0], "{h}x{w}x{c}, {ws}x{ws} windows: the windows, padding zero");
        }
        Ok(())
    }

    #[test]
    fn a_merge_before_the_residual_addition_is_folded_into_it() -> TractResult<()> {
        for (h, w, c, ws) in [(9, 9, 8, 7), (16, 15, 5, 14)] {
            let (mut tract, _) = windows(h, w, c, ws)?;
            let (tokens, merged) = (tract.input_outlets()?[0], tract.output_outlets()?[0]);
            let add = tract_onnx::tract_core::ops::math::add();
            let sum = tract.wire_node("residual", add, &[tokens, merged])?;
            tract.select_output_outlets(&sum)?;
            let ours = fold_row_gathers(replace_row_chains(tract.clone())?)?;
            let ops: Vec<String> = ours.eval_order()?.iter().map(|&n| ours.node(n).op.name().to_string()).collect();
            assert_eq!(ops.iter().filter(|op| *op == "GatherAdd").count(), 1, "{ops:?}");
            assert_eq!(ops.iter().filter(|op| *op == "RowGather").count(), 1, "the partition stays: {ops:?}");
            let x = Tensor::from_shape(&[h * w, c], &noise(h * w * c, 13))?;
            let run = |m: TypedModel| -> TractResult<TValue> {
                Ok(m.into_runnable()?.run(tvec!(x.clone().into_tvalue()))?.remove(0))
            };
            assert_eq!(*run(ours)?, *run(tract)?, "{h}x{w}x{c}, {ws}x{ws} windows");
        }
        Ok(())
    }

    #[test]
    fn chains_that_split_rows_stay_tracts() -> TractResult<()> {
        // A transpose of tokens to channel-major moves single values, not rows, even when
        // the shape comes out the same; so does a swap of the last two axes.
        for (shape, op) in
            [([12, 5].as_slice(), AxisOp::Move(0, 1)), (&[5, 5], AxisOp::Move(0, 1)), (&[3, 4, 4], AxisOp::Move(1, 2))]
        {
            let mut model = TypedModel::default();
            let x = model.add_source("tokens", f32::fact(shape))?;
            let y = model.wire_node("move", op, &[x])?;
            model.select_output_outlets(&y)?;
            let ours = replace_row_chains(model)?;
            assert!(ours.nodes().iter().all(|n| n.op.name() != "RowGather"), "{shape:?}");
        }
        Ok(())
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
            let worst = crate::ops::max_abs_diff(&run(tract)?, &run(ours)?)?;
            assert!(worst < 1e-5, "{h}x{w}x{c}: max |diff| {worst}");
        }
        Ok(())
    }
}
