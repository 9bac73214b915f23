//! Our operators in tract's plans, and the rewrites that put them there: each replaces
//! a tract op (or a small pattern of them) whose time or memory we measured as too high.

pub mod batched;
pub mod conv;
pub mod deconv;
pub mod dense;
pub mod mbconv;
pub mod pad;
pub mod pool;
pub mod resize;
pub mod softmax;
pub mod split;
pub mod winograd;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::{tvec, Op, TVec, TypedModelPatch, TypedOp};

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
        let mut patch = TypedModelPatch::default();
        let input = patch.tap_model(&model, node.inputs[0])?;
        let out = patch.wire_node(format!("{}.{suffix}", node.name), op, &[input])?;
        patch.shunt_outside(&model, replaced, out[0])?;
        patch.apply(&mut model)?;
    }
    Ok(model)
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
