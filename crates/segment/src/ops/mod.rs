//! Our operators in tract's plans, and the rewrites that put them there: each replaces
//! a tract op (or a small pattern of them) whose time or memory we measured as too high.

pub mod attention;
pub mod batched;
pub mod conv;
pub mod deconv;
pub mod dense;
pub mod mbconv;
pub mod mix;
pub mod mlp;
pub mod moves;
pub mod norm;
pub mod pad;
pub mod planar;
pub mod pool;
pub mod resize;
pub mod softmax;
pub mod split;
pub mod tokens;
pub mod winograd;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::{tvec, Op, TVec, TypedModelPatch, TypedOp};
use tract_onnx::tract_core::ops::binary::TypedBinOp;

/// One model run's scope: freed activations are kept for the run's next ones
/// ([`drishya_alloc::reuse_freed_blocks`]), and when it ends the working buffers our ops
/// keep per thread between calls are freed. A run is handed to whichever blocking thread
/// the server has free; buffers kept past the run stayed mapped on every thread that had
/// ever run a model, so a busy server's peak grew with its thread count and the widest
/// band any op had made (docs/performance.md §6o).
pub struct RunScope {
    _reuse: drishya_alloc::ReuseScope,
}

/// Wrap each run of a plan in it.
pub fn run_scope() -> RunScope {
    RunScope { _reuse: drishya_alloc::reuse_freed_blocks() }
}

impl Drop for RunScope {
    // Before the reuse scope ends (fields drop after this), so the buffers are unmapped
    // with the run's other kept blocks.
    fn drop(&mut self) {
        release_scratch();
    }
}

/// Frees this thread's op buffers; the bytes they held. Every op with a buffer of its own
/// per thread is listed here.
pub(crate) fn release_scratch() -> usize {
    conv::release_scratch() + deconv::release_scratch() + dense::release_scratch() + winograd::release_scratch()
}

/// The loop the single-input rewrites share: for each node whose op is a `T`, `make` may
/// give the op standing for it and the outlet it replaces (the node's own, or that of an op
/// it folds in, such as a bias `Add` or a ReLU); a node of that op, named after the node
/// with `suffix`, then reads the node's first input and takes that outlet's place.
pub(crate) fn replace_each<T: Op, O: TypedOp>(
    mut model: TypedModel,
    suffix: &str,
    make: impl Fn(&TypedModel, usize) -> TractResult<Option<(O, OutletId)>>,
) -> TractResult<TypedModel> {
    let candidates: Vec<usize> = model.nodes().iter().filter(|n| n.op_is::<T>()).map(|n| n.id).collect();
    for id in candidates {
        let Some((op, replaced)) = make(&model, id)? else { continue };
        let node = model.node(id);
        let (name, input) = (format!("{}.{suffix}", node.name), node.inputs[0]);
        substitute(&mut model, name, op, [input, replaced])?;
    }
    Ok(model)
}

/// A node of `op` named `name`, reading `input` and taking `replaced`'s place (the
/// nodes between them left for the optimiser to drop).
pub(crate) fn substitute<O: TypedOp>(
    model: &mut TypedModel,
    name: String,
    op: O,
    [input, replaced]: [OutletId; 2],
) -> TractResult<()> {
    let mut patch = TypedModelPatch::default();
    let input = patch.tap_model(model, input)?;
    let out = patch.wire_node(name, op, &[input])?;
    patch.shunt_outside(model, replaced, out[0])?;
    patch.apply(model)
}

/// The loop the rewrites that keep a node in place share: for each node whose op is a `T`,
/// `make` may give the op standing for it and the outlets it reads (the node's own inputs,
/// or what they are cut from: a slice's tensor, a padded concatenation's parts, a softmax's
/// input before its bias); that op then takes the node's place under its name.
pub(crate) fn replace_in_place<T: Op, O: TypedOp>(
    mut model: TypedModel,
    make: impl Fn(&TypedModel, usize) -> TractResult<Option<(O, Vec<OutletId>)>>,
) -> TractResult<TypedModel> {
    let candidates: Vec<usize> = model.nodes().iter().filter(|n| n.op_is::<T>()).map(|n| n.id).collect();
    for id in candidates {
        let Some((op, inputs)) = make(&model, id)? else { continue };
        let patch = TypedModelPatch::replace_single_op(&model, model.node(id), &inputs, op)?;
        patch.apply(&mut model)?;
    }
    Ok(model)
}

/// True when node `reader` is the only reader of `outlet` and it is no model output.
pub(crate) fn only_reader(model: &TypedModel, outlet: OutletId, reader: usize) -> TractResult<bool> {
    let successors = model.outlet_successors(outlet);
    Ok(successors.len() == 1 && successors[0].node == reader && !model.output_outlets()?.contains(&outlet))
}

/// The output of an op with one f32 input that `run` fills: every element of the
/// `shape`-shaped output must be written by `run` (it starts uninitialised).
pub(crate) fn eval_filled(
    input: &TValue,
    shape: &[usize],
    run: impl FnOnce(&[f32], &mut [f32]),
) -> TractResult<TVec<TValue>> {
    let view = input.try_as_plain_ram()?;
    // SAFETY: `run` writes every element (the callers' contract, stated above).
    let mut output = unsafe { Tensor::uninitialized::<f32>(shape)? };
    {
        let mut out_view = output.try_as_plain_ram_mut()?;
        run(view.as_slice::<f32>()?, out_view.as_slice_mut::<f32>()?);
    }
    Ok(tvec!(output.into_tvalue()))
}

/// When `outlet`'s only reader is the binary op `op` (tract's name: "Add", "Mul") of it and
/// an f32 constant of `n` values along axis `pos` (size 1 on every other axis: `[1, .., 1, n]`
/// along rows, `[1, n, 1, 1]` along a map's channels), with the output's shape: that
/// constant's values and the op's node.
pub(crate) fn const_after(
    model: &TypedModel,
    outlet: OutletId,
    op: &str,
    n: usize,
    pos: usize,
) -> TractResult<Option<(Vec<f32>, usize)>> {
    let readers = model.outlet_successors(outlet);
    let [reader] = readers else { return Ok(None) };
    let node = model.node(reader.node);
    let is_op = node.op_as::<TypedBinOp>().is_some_and(|b| b.0.name() == op);
    if !is_op || node.inputs.len() != 2 || model.output_outlets()?.contains(&outlet) {
        return Ok(None);
    }
    let other = node.inputs[1 - reader.slot];
    let Some(c) = model.outlet_fact(other)?.konst.as_ref().filter(|c| c.datum_type() == f32::datum_type()) else {
        return Ok(None);
    };
    let shape = c.shape();
    let rank = model.outlet_fact(outlet)?.rank();
    let along = shape.len() == rank && shape.iter().enumerate().all(|(i, &d)| d == if i == pos { n } else { 1 });
    let same_shape = model.outlet_fact(OutletId::new(node.id, 0))?.shape == model.outlet_fact(outlet)?.shape;
    if !along || !same_shape {
        return Ok(None);
    }
    let view = c.try_as_plain_ram()?;
    Ok(Some((view.as_slice::<f32>()?.to_vec(), node.id)))
}

/// Uniform in [-1, 1) from a linear congruential generator, for the ops' tests: unlike a
/// sine, the products of two such sequences do not cancel along a contracted axis.
/// The largest |difference| between two f32 tensors of the same shape (checked).
#[cfg(test)]
pub(crate) fn max_abs_diff(want: &Tensor, got: &Tensor) -> TractResult<f32> {
    assert_eq!(want.shape(), got.shape());
    let (want, got) = (want.try_as_plain_ram()?, got.try_as_plain_ram()?);
    let pairs = want.as_slice::<f32>()?.iter().zip(got.as_slice::<f32>()?);
    Ok(pairs.map(|(a, b)| (a - b).abs()).fold(0f32, f32::max))
}

#[cfg(test)]
pub(crate) fn noise(n: usize, seed: u32) -> Vec<f32> {
    let mut state = seed;
    (0..n)
        .map(|_| {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (state >> 8) as f32 / (1u32 << 23) as f32 - 1.0
        })
        .collect()
}

/// For the ops' tests: `expr` as tract's `EinSum` of two activations, `inputs`; the op
/// `make` gives for that node (`None`: not recognised) evaluated on the same inputs, and
/// the two outputs compared (`tolerance` relative to 1 + |value|).
#[cfg(test)]
pub(crate) fn check_against_einsum<O: tract_onnx::tract_core::internal::EvalOp>(
    expr: &str,
    [a, b]: [Tensor; 2],
    make: impl Fn(&TypedModel, usize) -> TractResult<Option<O>>,
    tolerance: f32,
) -> Option<()> {
    use tract_onnx::tract_core::internal::{EvalContext, EvalOp as _};
    use tract_onnx::tract_core::ops::einsum::EinSum;
    let einsum = EinSum::new(expr.parse().unwrap(), f32::datum_type());
    let mut model = TypedModel::default();
    let sa = model.add_source("a", f32::fact(a.shape())).unwrap();
    let sb = model.add_source("b", f32::fact(b.shape())).unwrap();
    let out = model.wire_node("einsum", einsum.clone(), &[sa, sb]).unwrap();
    let op = make(&model, out[0].node).unwrap()?;
    let ctx = EvalContext::out_of_plan();
    let ours = op.eval(&ctx, tvec!(a.clone().into_tvalue(), b.clone().into_tvalue())).unwrap();
    let theirs = einsum.eval(&ctx, tvec!(a.into_tvalue(), b.into_tvalue())).unwrap();
    let (x, y) = (ours[0].to_plain_array_view::<f32>().unwrap(), theirs[0].to_plain_array_view::<f32>().unwrap());
    assert_eq!(x.shape(), y.shape(), "{expr}");
    for (x, y) in x.iter().zip(y.iter()) {
        assert!((x - y).abs() < tolerance * (1.0 + y.abs()), "{expr}: {x} vs {y}");
    }
    Some(())
}
