//! Windowed attention in one op: for each window and head, the scores `q k^T`, their
//! scale, the constant position bias, the softmax and the product with the values, the
//! scores never leaving the cache.
//!
//! TinyViT's attention ran as four ops over whole tensors: a `BatchedMatMul` writing every
//! window's and head's 49x49 scores (14 MB for one block of the encoder's second stage), a
//! scale, the biased softmax reading and writing them again, and a second `BatchedMatMul`
//! reading them a third time: each pass over fresh pages (docs/performance.md §6k). Here
//! each (window, head) computes its scores into one reused block, scales, biases and
//! normalises it while it is in L1, and multiplies it by the values straight into the
//! output.
//!
//! Replaced, in an optimised plan: `BatchedMatMul` (its output in natural order) → an
//! optional product by a constant scalar → `RowSoftmax` (biased or not) → `BatchedMatMul`
//! reading those weights, in natural order, as its left operand; each link the previous
//! one's only reader.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::binary::OptBinByScalar;

use super::batched::{multiply, multiply_padded, padded_width, BatchedMatMul, Scratch, Side};
use super::only_reader;
use super::softmax::RowSoftmax;
use crate::kernels::softmax::softmax_padded_rows;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowAttention {
    /// The scores: `[b0, b1, m, n]` in natural order.
    scores: BatchedMatMul,
    /// The weighted values, reading the normalised scores as its left operand.
    values: BatchedMatMul,
    /// The scale's bits (1.0 when there is none).
    scale: u32,
    /// With a bias: the last input, repeated over the scores' leading axes.
    biased: bool,
}

impl Op for WindowAttention {
    fn name(&self) -> StaticName {
        "WindowAttention".into()
    }

    op_as_typed_op!();
}

impl EvalOp for WindowAttention {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (q, k, v, bias) = match &inputs[..] {
            [q, k, v] if !self.biased => (q, k, v, None),
            [q, k, v, bias] if self.biased => (q, k, v, Some(bias)),
            _ => bail!("WindowAttention: {} inputs", inputs.len()),
        };
        let first = self.scores.geometry(q.shape(), k.shape())?;
        let [b0, b1, m, n, _] = first.dims;
        let second = self.values.geometry(&first.output[4 - self.scores.rank()..], v.shape())?;
        let bias_view = bias.map(|b| b.try_as_plain_ram()).transpose()?;
        let bias = match &bias_view {
            Some(view) => view.as_slice::<f32>()?,
            None => &[],
        };
        let block = m * n;
        if block == 0 || !bias.len().is_multiple_of(block) || (b0 * b1 * block) % bias.len().max(block) != 0 {
            bail!("WindowAttention: bias of {} values for {m}x{n} scores", bias.len());
        }
        let (q_view, k_view, v_view) = (q.try_as_plain_ram()?, k.try_as_plain_ram()?, v.try_as_plain_ram()?);
        let (q, k, v) = (q_view.as_slice::<f32>()?, k_view.as_slice::<f32>()?, v_view.as_slice::<f32>()?);
        // SAFETY: every (batch, m, n) element of the output is written below.
        let mut output = unsafe { Tensor::uninitialized::<f32>(&second.output[4 - self.values.rank()..])? };
        {
            let mut out_view = output.try_as_plain_ram_mut()?;
            let out = out_view.as_slice_mut::<f32>()?;
            // The scores stay as the product leaves them, rows padded to whole panels: the
            // softmax and the second product read them there.
            let stride = padded_width(n);
            let (mut scratch, mut weights) = (Scratch::default(), vec![0f32; m * stride]);
            let scale = f32::from_bits(self.scale);
            for i in 0..b0 {
                for j in 0..b1 {
                    let (a, b) = self.scores.sides(&first, q, k, [i, j]);
                    multiply_padded(a, b, &mut scratch, &mut weights);
                    let at = if bias.is_empty() { 0 } else { (i * b1 + j) * block % bias.len() };
                    softmax_padded_rows(&mut weights, [n, stride], bias.get(at..at + block).unwrap_or(&[]), scale);
                    // The weights as the left operand: rows of `n`, `stride` apart.
                    let a = Side { data: &weights, at: 0, free: stride, k: 1, rows: m, depth: n };
                    let (_, b) = self.values.sides(&second, &[], v, [i, j]);
                    multiply(a, b, &mut scratch, out, self.values.placed(&second, [i, j]));
                }
            }
        }
        Ok(tvec!(output.into_tvalue()))
    }
}

impl TypedOp for WindowAttention {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let shape = |i: usize| -> TractResult<&[usize]> {
            let fact = inputs.get(i).context("WindowAttention: missing input")?;
            fact.shape.as_concrete().context("WindowAttention: symbolic shapes")
        };
        let first = self.scores.geometry(shape(0)?, shape(1)?)?;
        let second = self.values.geometry(&first.output[4 - self.scores.rank()..], shape(2)?)?;
        Ok(tvec!(f32::fact(&second.output[4 - self.values.rank()..])))
    }

    as_op!();
}

/// Replaces each attention chain of an optimised model (after the batched products and the
/// softmaxes were replaced) by one [`WindowAttention`] in place of its last product.
pub fn replace_attention(model: TypedModel) -> TractResult<TypedModel> {
    super::replace_in_place::<BatchedMatMul, _>(model, attention_for)
}

/// The op and its inputs when node `id` (a `BatchedMatMul`) ends an attention chain.
fn attention_for(model: &TypedModel, id: usize) -> TractResult<Option<(WindowAttention, Vec<OutletId>)>> {
    let node = model.node(id);
    let Some(values) = node.op_as::<BatchedMatMul>() else { return Ok(None) };
    let (Some(&weights), Some(&v)) = (node.inputs.first(), node.inputs.get(1)) else { return Ok(None) };
    if !values.reads_left_in_order() || !only_reader(model, weights, id)? {
        return Ok(None);
    }
    let softmax_node = model.node(weights.node);
    let Some(softmax) = softmax_node.op_as::<RowSoftmax>() else { return Ok(None) };
    let Some(&scaled) = softmax_node.inputs.first() else { return Ok(None) };
    if !only_reader(model, scaled, softmax_node.id)? {
        return Ok(None);
    }
    // An optional product by a constant scalar before the softmax.
    let (raw, scale) = match model.node(scaled.node).op_as::<OptBinByScalar>() {
        Some(mul) if mul.binop.name() == "Mul" => {
            let mul_node = model.node(scaled.node);
            let [raw, factor] = mul_node.inputs[..] else { return Ok(None) };
            let Some(konst) = model.outlet_fact(factor)?.konst.clone() else { return Ok(None) };
            if konst.datum_type() != f32::datum_type() || konst.len() != 1 || !only_reader(model, raw, mul_node.id)? {
                return Ok(None);
            }
            (raw, konst.cast_to_scalar::<f32>()?)
        }
        Some(_) => return Ok(None),
        None => (scaled, 1.0),
    };
    let scores_node = model.node(raw.node);
    let Some(scores) = scores_node.op_as::<BatchedMatMul>() else { return Ok(None) };
    if !scores.writes_in_order() || scores.rank() != values.rank() {
        return Ok(None);
    }
    let mut inputs: Vec<OutletId> = scores_node.inputs.to_vec();
    inputs.push(v);
    if softmax.is_biased() {
        let Some(&bias) = softmax_node.inputs.get(1) else { return Ok(None) };
        inputs.push(bias);
    }
    let op = WindowAttention {
        scores: scores.clone(),
        values: values.clone(),
        scale: scale.to_bits(),
        biased: softmax.is_biased(),
    };
    // Planned shapes must agree (the op checks them again at run time).
    let facts: Vec<&TypedFact> = inputs.iter().map(|i| model.outlet_fact(*i)).collect::<TractResult<_>>()?;
    let same = op.output_facts(&facts).ok().map(|f| f[0].shape.clone())
        == Some(model.outlet_fact(OutletId::new(id, 0))?.shape.clone());
    Ok(same.then_some((op, inputs)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::noise;
    use tract_onnx::tract_core::ops::array::Slice;
    use tract_onnx::tract_core::ops::einsum::EinSum;
    use tract_onnx::tract_core::ops::math::mul;

    /// TinyViT's attention: one qkv tensor `[windows, tokens, heads,
    /// 3 x d]` cut into q, k and v, the scores scaled, a position bias per head added, the
    /// softmax, the product with v. Returns the model and its input.
    fn window_attention(windows: usize, tokens: usize, heads: usize, d: usize, biased: bool) -> (TypedModel, Tensor) {
        let shape = [windows, tokens, heads, 3 * d];
        let mut model = TypedModel::default();
        let qkv = model.add_source("qkv", f32::fact(shape)).unwrap();
        let third = |model: &mut TypedModel, i: usize| {
            let slice = Slice { axis: 3, start: (d * i).to_dim(), end: (d * i + d).to_dim() };
            model.wire_node(format!("slice{i}"), slice, &[qkv]).unwrap()[0]
        };
        let (q, k, v) = (third(&mut model, 0), third(&mut model, 1), third(&mut model, 2));
        let einsum = |e: &str| EinSum::new(e.parse().unwrap(), f32::datum_type());
        let scores = model.wire_node("qk", einsum("ambk,anbk->abmn"), &[q, k]).unwrap()[0];
        let scale = model.add_const("scale_factor", tensor4(&[[[[0.17f32]]]])).unwrap();
        let scores = model.wire_node("scale", mul(), &[scores, scale]).unwrap()[0];
        // The softmax as the app's plans have it by then (ops/softmax.rs, checked there
        // against tract's), its bias folded in.
        let mut inputs = vec![scores];
        if biased {
            let bias = noise(heads * tokens * tokens, 5).iter().map(|v| v * 3.0).collect::<Vec<_>>();
            let bias = Tensor::from_shape(&[1, heads, tokens, tokens], &bias).unwrap();
            inputs.push(model.add_const("bias_values", bias).unwrap());
        }
        let weights = model.wire_node("softmax", RowSoftmax::new(biased), &inputs).unwrap()[0];
        let out = model.wire_node("av", einsum("abmn,anbk->ambk"), &[weights, v]).unwrap();
        model.select_output_outlets(&out).unwrap();
        let input = Tensor::from_shape(&shape, &noise(shape.iter().product(), 11)).unwrap();
        (model, input)
    }

    /// The products replaced and optimised, as the app's plans have them (plan/onnx.rs).
    fn optimised(model: TypedModel) -> TypedModel {
        super::super::batched::replace_batched(model).unwrap().into_optimized().unwrap()
    }

    #[test]
    fn fused_attention_matches_tracts_chain_biased_or_not() {
        // 49 tokens as TinyViT's windows (a partial panel of keys); 20 rows elsewhere.
        for (windows, tokens, heads, d, biased) in [(3, 49, 2, 32, true), (2, 20, 3, 8, false), (1, 7, 2, 16, true)] {
            let (model, input) = window_attention(windows, tokens, heads, d, biased);
            let run = |model: TypedModel| {
                let out = model.into_runnable().unwrap().run(tvec!(input.clone().into_tvalue())).unwrap();
                out[0].to_plain_array_view::<f32>().unwrap().to_owned()
            };
            // The four ops one after the other, then fused.
            let chain = optimised(model);
            let theirs = run(chain.clone());
            let ours = replace_attention(chain).unwrap();
            let ops: Vec<String> =
                ours.eval_order().unwrap().iter().map(|&n| ours.node(n).op.name().to_string()).collect();
            assert_eq!(ops.iter().filter(|op| *op == "WindowAttention").count(), 1, "{ops:?}");
            assert!(!ops.iter().any(|op| op.contains("Softmax") || op == "BatchedMatMul"), "{ops:?}");
            let ours = run(ours);
            assert_eq!(ours.shape(), theirs.shape());
            let worst = ours.iter().zip(theirs.iter()).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            assert!(worst < 1e-5, "{windows}x{tokens}x{heads}x{d}, biased {biased}: off by {worst}");
        }
    }
}
