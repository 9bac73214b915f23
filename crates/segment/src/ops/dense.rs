//! Products of an activation with a constant matrix (the dense layers of a transformer: a
//! `MatMul` by a weight, and the `Add` of its bias) run through our own kernel (gemm.rs)
//! instead of tract's.
//!
//! In the MobileSAM encoder these are the attention's qkv and output projections and the
//! MLPs: 51 of its 77.5 GFLOP. tract packs the activation before every product and its
//! kernel ran them well below the core's peak (docs/performance.md §3); ours reads the
//! activation's rows in place. Only an `EinSum` whose contracted axes are the activation's
//! trailing ones, in order, against the leading axes of an f32 constant, with the
//! constant's last axis the output's last, is replaced (`amk,kn->amn`, `ambk,bkn->amn`); a
//! following `Add` of a constant that varies along the last axis only is folded in as the
//! bias.

use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::einsum::EinSum;

use crate::kernels::gemm::{gemm, Packed};

#[derive(Clone)]
pub struct Dense {
    weight: Arc<Packed>,
    /// Leading axes of the input kept in the output (the rest are contracted).
    kept: usize,
}

impl std::fmt::Debug for Dense {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Dense({}x{}, {} kept axes)", self.weight.inputs, self.weight.outputs, self.kept)
    }
}

/// Two ops are the same when they share their weights.
impl PartialEq for Dense {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.weight, &other.weight) && self.kept == other.kept
    }
}

impl Eq for Dense {}

impl Op for Dense {
    fn name(&self) -> StaticName {
        "Dense".into()
    }

    op_as_typed_op!();
}

impl EvalOp for Dense {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let Some(input) = inputs.first() else { bail!("Dense: no input") };
        let shape = self.output_shape(input.shape())?;
        let view = input.try_as_plain_ram()?;
        let a = view.as_slice::<f32>()?;
        // SAFETY: gemm writes every element of the output.
        let mut output = unsafe { Tensor::uninitialized::<f32>(&shape)? };
        {
            let mut out_view = output.try_as_plain_ram_mut()?;
            gemm(a, &self.weight, out_view.as_slice_mut::<f32>()?);
        }
        Ok(tvec!(output.into_tvalue()))
    }
}

impl Dense {
    fn output_shape<D>(&self, input: &[D]) -> TractResult<TVec<D>>
    where
        D: Clone + std::fmt::Debug + PartialEq + ToDim + From<usize>,
    {
        let contracted: TDim = input.get(self.kept..).unwrap_or(&[]).iter().map(|d| d.to_dim()).product();
        if input.len() <= self.kept || contracted != self.weight.inputs.to_dim() {
            bail!("Dense: input {input:?} does not end in {} values", self.weight.inputs);
        }
        Ok(input[..self.kept].iter().cloned().chain([D::from(self.weight.outputs)]).collect())
    }
}

impl TypedOp for Dense {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let Some(input) = inputs.first() else { bail!("Dense: no input") };
        let shape = self.output_shape(&input.shape.to_tvec())?;
        Ok(tvec!(f32::fact(shape)))
    }

    as_op!();
}

/// Replaces each suitable `EinSum` (and the bias `Add` after it) of a decluttered model.
pub fn replace_dense(mut model: TypedModel) -> TractResult<TypedModel> {
    let candidates: Vec<usize> = model.nodes().iter().filter(|n| n.op_is::<EinSum>()).map(|n| n.id).collect();
    for id in candidates {
        let Some((op, replaced)) = dense_for(&model, id)? else { continue };
        let node = model.node(id);
        let mut patch = TypedModelPatch::default();
        let a = patch.tap_model(&model, node.inputs[0])?;
        let out = patch.wire_node(format!("{}.dense", node.name), op, &[a])?;
        patch.shunt_outside(&model, replaced, out[0])?;
        patch.apply(&mut model)?;
    }
    Ok(model)
}

/// The op for node `id`, and the outlet it stands for (the bias `Add`'s, when folded).
fn dense_for(model: &TypedModel, id: usize) -> TractResult<Option<(Dense, OutletId)>> {
    let node = model.node(id);
    let Some(einsum) = node.op_as::<EinSum>() else { return Ok(None) };
    if einsum.q_params.is_some() || einsum.operating_dt != f32::datum_type() || node.inputs.len() != 2 {
        return Ok(None);
    }
    let (a_fact, b_fact) = (model.outlet_fact(node.inputs[0])?, model.outlet_fact(node.inputs[1])?);
    let Some(b) = b_fact.konst.as_ref().filter(|b| b.datum_type() == f32::datum_type() && b.rank() >= 2) else {
        return Ok(None);
    };
    let Some(a_shape) = a_fact.shape.as_concrete() else { return Ok(None) };
    let contracted = b.rank() - 1;
    if a_fact.datum_type != f32::datum_type() || a_shape.len() <= contracted {
        return Ok(None);
    }
    let kept = a_shape.len() - contracted;
    let (inputs, outputs) = einsum.axes.to_strs();
    let ([sa, sb], [so]) = (&inputs[..], &outputs[..]) else { return Ok(None) };
    let (sa, sb, so): (Vec<char>, Vec<char>, Vec<char>) =
        (sa.chars().collect(), sb.chars().collect(), so.chars().collect());
    let n_axis = sb[contracted];
    let wiring = sa.len() == a_shape.len()
        && sb.len() == b.rank()
        && sb[..contracted] == sa[kept..]
        && !sa.contains(&n_axis)
        && so.len() == kept + 1
        && so[..kept] == sa[..kept]
        && so[kept] == n_axis
        && a_shape[kept..] == b.shape()[..contracted];
    if !wiring {
        return Ok(None);
    }
    let (k, n) = (a_shape[kept..].iter().product::<usize>(), b.shape()[contracted]);
    let (bias, replaced) = match bias_after(model, id, n)? {
        Some((bias, add)) => (bias, OutletId::new(add, 0)),
        None => (vec![0.0; n], OutletId::new(id, 0)),
    };
    let view = b.try_as_plain_ram()?;
    let Some(weight) = Packed::from_inputs_major(view.as_slice::<f32>()?, bias, k, n) else { return Ok(None) };
    Ok(Some((Dense { weight: Arc::new(weight), kept }, replaced)))
}

/// When node `id`'s only reader is an `Add` of an f32 constant shaped `[1, .., 1, n]`:
/// that constant and the `Add`.
fn bias_after(model: &TypedModel, id: usize, n: usize) -> TractResult<Option<(Vec<f32>, usize)>> {
    let outlet = OutletId::new(id, 0);
    let readers = model.outlet_successors(outlet);
    let [reader] = readers else { return Ok(None) };
    let add = model.node(reader.node);
    let is_add = add.op_as::<TypedBinOp>().is_some_and(|op| op.0.name() == "Add");
    if !is_add || add.inputs.len() != 2 || model.output_outlets()?.contains(&outlet) {
        return Ok(None);
    }
    let other = add.inputs[1 - reader.slot];
    let Some(c) = model.outlet_fact(other)?.konst.as_ref().filter(|c| c.datum_type() == f32::datum_type()) else {
        return Ok(None);
    };
    let shape = c.shape();
    let along_last = shape.last() == Some(&n) && shape[..shape.len() - 1].iter().all(|&d| d == 1);
    let same_shape = model.outlet_fact(OutletId::new(add.id, 0))?.shape == model.outlet_fact(outlet)?.shape;
    if !along_last || !same_shape {
        return Ok(None);
    }
    let view = c.try_as_plain_ram()?;
    Ok(Some((view.as_slice::<f32>()?.to_vec(), add.id)))
}
