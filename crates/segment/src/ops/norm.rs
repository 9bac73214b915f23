//! Layer normalisation as one pass of ours instead of tract's chain of five.
//!
//! tract's ONNX importer writes `LayerNormalization` (and the hand-written LayerNorm2d of
//! the SAM decoder's upscaling and the encoder's neck) as a sum over the axis, a product by
//! `1/n`, the subtraction of that mean, its `RmsNorm`, then a product by the scale and the
//! addition of the bias: five passes over the activation, the subtraction broadcasting the
//! mean slowly (2.4 ms for a 4096x256 activation in the decoder's profile), and over the
//! channel axis of a `[1, C, H, W]` map the `RmsNorm` takes tract's slow, non-contiguous path.
//! Here the same arithmetic (mean, then the mean of squared deviations, `1/sqrt(var + eps)`)
//! runs in one read and one write per element, the scale and bias applied on the way out.
//!
//! Replaced: `Sub(x, m)` where `m` is `Reduce<Sum>` of `x` over one axis times `1/n` (or
//! divided by `n`), read only by an `RmsNorm` over that axis; a product by a constant along
//! that axis after it, the addition of one after that and an exact GELU after those are
//! folded in when present.

use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::nn::{Reduce, Reducer, RmsNorm};

use crate::kernels::conv::gelu;

#[derive(Debug, Clone, PartialEq)]
pub struct LayerNorm {
    shape: TVec<usize>,
    axis: usize,
    eps: f32,
    /// Per position along the axis (ones and zeros when the graph has none).
    scale: Arc<Vec<f32>>,
    bias: Arc<Vec<f32>>,
    /// The exact GELU after it (the SAM decoder's LayerNorm2d layers), applied to each
    /// row or plane as it is written.
    gelu: bool,
    /// Rows normalised along the last axis read through a row gather (ops/tokens.rs:
    /// TinyViT's window partition) folded in: the input is the gather's.
    gather: Option<Gather>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Gather {
    input: TVec<usize>,
    /// Per output row: the input row plus one, or 0 for a row of zeros.
    map: Arc<Vec<u32>>,
}

impl Eq for LayerNorm {}

impl Op for LayerNorm {
    fn name(&self) -> StaticName {
        "LayerNorm".into()
    }

    op_as_typed_op!();
}

impl EvalOp for LayerNorm {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let Some(input) = inputs.first() else { bail!("LayerNorm: no input") };
        if input.shape() != self.input_shape() {
            bail!("LayerNorm: input {:?}, planned for {:?}", input.shape(), self.input_shape());
        }
        // `run` writes every output element.
        super::eval_filled(input, &self.shape, |x, out| self.run(x, out))
    }
}

impl TypedOp for LayerNorm {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let Some(input) = inputs.first() else { bail!("LayerNorm: no input") };
        if input.shape.as_concrete() != Some(self.input_shape()) {
            bail!("LayerNorm: input {:?}, planned for {:?}", input.shape, self.input_shape());
        }
        Ok(tvec!(f32::fact(self.shape.clone())))
    }

    as_op!();
}

/// Independent partial sums, so the reduction along a contiguous row vectorises.
const LANES: usize = 8;

/// The sum of `f` over `row`.
#[inline(always)]
fn row_sum(row: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = row.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        acc.iter_mut().zip(chunk).for_each(|(a, &v)| *a += f(v));
    }
    acc.iter().sum::<f32>() + rest.iter().map(|&v| f(v)).sum::<f32>()
}

impl LayerNorm {
    fn input_shape(&self) -> &[usize] {
        self.gather.as_ref().map_or(&self.shape, |g| &g.input)
    }

    /// The same normalisation of rows along the last axis read through a row gather
    /// whose input has `input` shape and whose output is this op's input.
    pub(crate) fn reading_through(&self, input: TVec<usize>, map: Arc<Vec<u32>>) -> Option<LayerNorm> {
        let rows = self.shape.iter().product::<usize>() / self.shape.last()?.max(&1);
        let last_axis = self.axis + 1 == self.shape.len();
        (last_axis && self.gather.is_none() && map.len() == rows && input.last() == self.shape.last())
            .then(|| LayerNorm { gather: Some(Gather { input, map }), ..self.clone() })
    }

    /// Per output row, whether it is the normalisation of a gathered row of zeros (all such
    /// rows are equal); `None` without a gather.
    pub(crate) fn zero_rows(&self) -> Option<Vec<bool>> {
        Some(self.gather.as_ref()?.map.iter().map(|&from| from == 0).collect())
    }

    fn run(&self, x: &[f32], out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if crate::kernels::cpu().avx2() {
            // SAFETY: the CPU has the features the function is compiled for.
            return unsafe { self.run_avx2(x, out) };
        }
        self.run_any(x, out)
    }

    /// The same loops compiled for AVX2: the build's baseline (SSE2) vectorised them four
    /// lanes wide. Only the vector width differs (no multiply-add is fused), so the results
    /// are the same bits.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn run_avx2(&self, x: &[f32], out: &mut [f32]) {
        self.run_any(x, out)
    }

    #[inline(always)]
    fn run_any(&self, x: &[f32], out: &mut [f32]) {
        let n = self.shape[self.axis];
        let inner: usize = self.shape[self.axis + 1..].iter().product();
        if n == 0 || inner == 0 {
            return;
        }
        let (scale, bias) = (&self.scale[..n], &self.bias[..n]);
        let inv_n = 1.0 / n as f32;
        if inner == 1 {
            // Rows along the last axis (a transformer's tokens), in order or gathered.
            let zeros = vec![0f32; if self.gather.is_some() { n } else { 0 }];
            let source = |r: usize| match &self.gather {
                None => &x[r * n..][..n],
                Some(g) => match (g.map[r] as usize).checked_sub(1) {
                    Some(from) => &x[from * n..][..n],
                    None => &zeros[..],
                },
            };
            for (r, out) in out.chunks_exact_mut(n).enumerate() {
                let row = source(r);
                let mean = row_sum(row, |v| v) * inv_n;
                let var = row_sum(row, |v| (v - mean) * (v - mean)) * inv_n;
                let inv = 1.0 / (var + self.eps).sqrt();
                for (((o, v), g), b) in out.iter_mut().zip(row).zip(scale).zip(bias) {
                    *o = (v - mean) * inv * g + b;
                }
                if self.gelu {
                    gelu(out);
                }
            }
            return;
        }
        // Over the channels of a map: each pixel's statistics, accumulated plane by plane
        // (straight passes over contiguous planes).
        let mut mean = vec![0f32; inner];
        let mut var = vec![0f32; inner];
        for (block, out) in x.chunks_exact(n * inner).zip(out.chunks_exact_mut(n * inner)) {
            mean.fill(0.0);
            for plane in block.chunks_exact(inner) {
                mean.iter_mut().zip(plane).for_each(|(m, v)| *m += v);
            }
            mean.iter_mut().for_each(|m| *m *= inv_n);
            var.fill(0.0);
            for plane in block.chunks_exact(inner) {
                var.iter_mut().zip(plane).zip(&mean).for_each(|((s, v), m)| *s += (v - m) * (v - m));
            }
            var.iter_mut().for_each(|s| *s = 1.0 / (*s * inv_n + self.eps).sqrt());
            for (c, (plane, out)) in block.chunks_exact(inner).zip(out.chunks_exact_mut(inner)).enumerate() {
                let (g, b) = (scale[c], bias[c]);
                for (((o, v), m), inv) in out.iter_mut().zip(plane).zip(&mean).zip(&var) {
                    *o = (v - m) * inv * g + b;
                }
                if self.gelu {
                    gelu(out);
                }
            }
        }
    }
}

/// Replaces each layer normalisation of a decluttered model.
pub fn replace_layer_norms(model: TypedModel) -> TractResult<TypedModel> {
    super::replace_each::<TypedBinOp, _>(model, "layer_norm", layer_norm_for)
}

/// The op standing for the normalisation whose mean subtraction is node `id`, and the
/// outlet it replaces.
fn layer_norm_for(model: &TypedModel, id: usize) -> TractResult<Option<(LayerNorm, OutletId)>> {
    let sub = model.node(id);
    let is_sub = sub.op_as::<TypedBinOp>().is_some_and(|op| op.0.name() == "Sub");
    if !is_sub || sub.inputs.len() != 2 {
        return Ok(None);
    }
    let (x, m) = (sub.inputs[0], sub.inputs[1]);
    let fact = model.outlet_fact(x)?;
    let Some(shape) = fact.shape.as_concrete().map(|s| s.iter().copied().collect::<TVec<usize>>()) else {
        return Ok(None);
    };
    if fact.datum_type != f32::datum_type() || model.outlet_fact(OutletId::new(id, 0))?.shape != fact.shape {
        return Ok(None);
    }
    let Some(axis) = mean_axis(model, m, x, &shape)? else { return Ok(None) };
    let sub_out = OutletId::new(id, 0);
    let [reader] = model.outlet_successors(sub_out) else { return Ok(None) };
    let rms = model.node(reader.node);
    let Some(rms_op) = rms.op_as::<RmsNorm>() else { return Ok(None) };
    if rms_op.axis != axis || model.output_outlets()?.contains(&sub_out) {
        return Ok(None);
    }
    let Ok(eps) = rms_op.eps.cast_to_scalar::<f32>() else { return Ok(None) };
    let mut replaced = OutletId::new(rms.id, 0);
    let n = shape[axis];
    let scale = super::const_after(model, replaced, "Mul", n, axis)?;
    if let Some((_, node)) = &scale {
        replaced = OutletId::new(*node, 0);
    }
    let bias = super::const_after(model, replaced, "Add", n, axis)?;
    if let Some((_, node)) = &bias {
        replaced = OutletId::new(*node, 0);
    }
    let gelu = super::dense::gelu_after(model, replaced)?;
    if let Some(outlet) = gelu {
        replaced = outlet;
    }
    let op = LayerNorm {
        gelu: gelu.is_some(),
        shape,
        axis,
        eps,
        scale: Arc::new(scale.map_or_else(|| vec![1.0; n], |(v, _)| v)),
        bias: Arc::new(bias.map_or_else(|| vec![0.0; n], |(v, _)| v)),
        gather: None,
    };
    Ok(Some((op, replaced)))
}

/// The axis over which `m` is the mean of `x`: `Reduce<Sum>` of `x` over one axis, times
/// `1/n` or divided by `n`.
fn mean_axis(model: &TypedModel, m: OutletId, x: OutletId, shape: &[usize]) -> TractResult<Option<usize>> {
    let scaled = model.node(m.node);
    let Some(op) = scaled.op_as::<TypedBinOp>() else { return Ok(None) };
    let name = op.0.name();
    if (name != "Mul" && name != "Div") || scaled.inputs.len() != 2 {
        return Ok(None);
    }
    let konst = |slot: usize| -> TractResult<Option<f32>> {
        let fact = model.outlet_fact(scaled.inputs[slot])?;
        Ok(fact.konst.as_ref().filter(|c| c.len() == 1).and_then(|c| c.cast_to_scalar::<f32>().ok()))
    };
    // The constant may be on either side of a product, only the divisor of a quotient.
    let (sum, factor) = match (konst(0)?, konst(1)?) {
        (None, Some(c)) => (scaled.inputs[0], if name == "Div" { 1.0 / c } else { c }),
        (Some(c), None) if name == "Mul" => (scaled.inputs[1], c),
        _ => return Ok(None),
    };
    let reduce = model.node(sum.node);
    let Some(reduce_op) = reduce.op_as::<Reduce>() else { return Ok(None) };
    if reduce_op.reducer != Reducer::Sum || reduce_op.axes.len() != 1 || reduce.inputs.first() != Some(&x) {
        return Ok(None);
    }
    let axis = reduce_op.axes[0];
    let n = shape.get(axis).copied().unwrap_or(0) as f32;
    Ok(((factor * n - 1.0).abs() < 1e-5).then_some(axis))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::noise;
    use tract_onnx::tract_core::ops::math::{Add, Mul, Sub};

    fn bin(op: impl tract_onnx::tract_core::ops::binary::BinMiniOp) -> TypedBinOp {
        TypedBinOp(Box::new(op), None)
    }

    /// tract's own chain for a layer normalisation of `shape` over `axis` (the mean as a
    /// sum times `1/n`, the `RmsNorm`, optionally a scale and a bias along the axis).
    fn chain(shape: &[usize], axis: usize, affine: bool, then_gelu: bool) -> TypedModel {
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact(shape)).unwrap();
        let sum = model.wire_node("sum", Reduce::new(tvec!(axis), Reducer::Sum), &[x]).unwrap();
        let mut along: Vec<usize> = vec![1; shape.len()];
        along[axis] = shape[axis];
        let one: Vec<usize> = vec![1; shape.len()];
        let inv = model.add_const("inv_n", Tensor::from_shape(&one, &[1.0 / shape[axis] as f32]).unwrap()).unwrap();
        let mean = model.wire_node("mean", bin(Mul), &[sum[0], inv]).unwrap();
        let d = model.wire_node("d", bin(Sub), &[x, mean[0]]).unwrap();
        let eps = tensor0(1e-5f32).into_arc_tensor();
        let mut out = model.wire_node("rms", RmsNorm { axis, eps }, &d).unwrap();
        if affine {
            let n = shape[axis];
            let g = model.add_const("g", Tensor::from_shape(&along, &noise(n, 5)).unwrap()).unwrap();
            out = model.wire_node("scaled", bin(Mul), &[out[0], g]).unwrap();
            let b = model.add_const("b", Tensor::from_shape(&along, &noise(n, 9)).unwrap()).unwrap();
            out = model.wire_node("biased", bin(Add), &[out[0], b]).unwrap();
        }
        if then_gelu {
            use tract_onnx::tract_core::ops::{element_wise::ElementWiseOp, nn::GeluExact};
            out = model.wire_node("gelu", ElementWiseOp(Box::new(GeluExact {}), None), &out).unwrap();
        }
        model.select_output_outlets(&out).unwrap();
        model
    }

    fn check(shape: &[usize], axis: usize, affine: bool, then_gelu: bool) {
        let model = chain(shape, axis, affine, then_gelu);
        // Off-centre (mean about 2), so the mean's subtraction matters.
        let values: Vec<f32> = noise(shape.iter().product(), 3).iter().map(|v| v * 3.0 + 2.0).collect();
        let input = Tensor::from_shape(shape, &values).unwrap();
        let run = |model: TypedModel| {
            let out = model.into_runnable().unwrap().run(tvec!(input.clone().into_tvalue())).unwrap();
            out[0].to_plain_array_view::<f32>().unwrap().to_owned()
        };
        let theirs = run(model.clone());
        let fused = replace_layer_norms(model).unwrap().into_decluttered().unwrap();
        let ops: Vec<String> = fused.nodes().iter().map(|n| n.op.name().to_string()).collect();
        assert_eq!(ops, ["Source", "LayerNorm"], "{shape:?} axis {axis}: {ops:?}");
        let ours = run(fused);
        assert_eq!(ours.shape(), theirs.shape());
        for (x, y) in ours.iter().zip(theirs.iter()) {
            assert!((x - y).abs() < 1e-5 * (1.0 + y.abs()), "{shape:?} axis {axis}: {x} vs {y}");
        }
    }

    #[test]
    fn matches_tracts_chain_over_the_last_axis_and_over_channels() {
        // A decoder token norm (rows of 256 over the 8-lane sums, and a ragged 20), an
        // encoder one, the upscaling's LayerNorm2d over 64 channels of a map.
        // The LayerNorm2d layers are followed by a GELU, folded in.
        check(&[1, 300, 256], 2, true, false);
        check(&[2, 7, 20], 2, false, false);
        check(&[1, 64, 15, 17], 1, true, true);
        check(&[1, 5, 3, 4], 1, false, false);
        check(&[1, 9, 20], 2, true, true);
    }

    #[test]
    fn a_mean_over_another_axis_is_left_alone() {
        // The Sub reads a mean over axis 1, the RmsNorm normalises axis 2: not a layer norm.
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact([1, 6, 8])).unwrap();
        let sum = model.wire_node("sum", Reduce::new(tvec!(1), Reducer::Sum), &[x]).unwrap();
        let inv = model.add_const("inv_n", Tensor::from_shape(&[1, 1, 1], &[1.0 / 6.0f32]).unwrap()).unwrap();
        let mean = model.wire_node("mean", bin(Mul), &[sum[0], inv]).unwrap();
        let d = model.wire_node("d", bin(Sub), &[x, mean[0]]).unwrap();
        let out = model.wire_node("rms", RmsNorm { axis: 2, eps: tensor0(1e-5f32).into_arc_tensor() }, &d).unwrap();
        model.select_output_outlets(&out).unwrap();
        let after = replace_layer_norms(model).unwrap();
        assert!(after.nodes().iter().any(|n| n.op_is::<RmsNorm>()));
        assert!(!after.nodes().iter().any(|n| n.op.name() == "LayerNorm"));
    }
}
