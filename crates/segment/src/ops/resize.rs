//! Bilinear resizing of the two spatial axes of an NCHW f32 tensor, in place of tract's
//! `Resize` in optimised plans.
//!
//! U²-Net-p upsamples with 38 bilinear `Resize` nodes (decoder stages and the side outputs,
//! up to 32x). tract 0.23's `Resize` copies its input, then resamples one axis at a time
//! through a generic weight plan, allocating a tensor per axis: a noticeable share of the
//! model's time (docs/performance.md §3 item 8) and its memory peak (inside `Resize_808`,
//! docs/performance.md §2). This op writes the output once, both axes together, with the
//! half-pixel convention of PyTorch and ONNX (`onnx::bilinear`, which SAM's post-processing
//! uses too).

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::nn::{CoordTransformer, Interpolator, Resize};

use crate::plan::onnx;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PlaneBilinear {
    height: usize,
    width: usize,
}

impl Op for PlaneBilinear {
    fn name(&self) -> StaticName {
        "PlaneBilinear".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("to {}x{}", self.height, self.width)])
    }

    op_as_typed_op!();
}

impl EvalOp for PlaneBilinear {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let Some(input) = inputs.first() else { bail!("PlaneBilinear: no input") };
        let &[n, c, h, w] = input.shape() else { bail!("PlaneBilinear: input shape {:?}", input.shape()) };
        let (height, width) = (self.height, self.width);
        // SAFETY: every element is written below (each output plane in full).
        let mut output = unsafe { Tensor::uninitialized::<f32>(&[n, c, height, width])? };
        {
            let view = input.try_as_plain_ram()?;
            let src = view.as_slice::<f32>()?;
            let mut out_view = output.try_as_plain_ram_mut()?;
            let out = out_view.as_slice_mut::<f32>()?;
            let xs = onnx::source_coords(w, width, width);
            if h * w > 0 && height * width > 0 {
                for (plane, out) in src.chunks_exact(h * w).zip(out.chunks_exact_mut(height * width)) {
                    onnx::bilinear_into(plane, (w, h), height, &xs, out);
                }
            } else {
                out.fill(0.0);
            }
        }
        Ok(tvec!(output.into_tvalue()))
    }
}

impl TypedOp for PlaneBilinear {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let Some(first) = inputs.first() else { bail!("PlaneBilinear: no input") };
        if first.rank() != 4 {
            bail!("PlaneBilinear: rank {}", first.rank());
        }
        let shape = [first.shape[0].clone(), first.shape[1].clone(), self.height.into(), self.width.into()];
        Ok(tvec!(f32::fact(shape)))
    }

    as_op!();
}

/// Replaces each bilinear, half-pixel f32 `Resize` of the last two axes of a rank-4 tensor
/// (sizes known, both output sides > 1, scales implied by the sizes) by [`PlaneBilinear`].
pub fn replace_resizes(model: TypedModel) -> TractResult<TypedModel> {
    super::replace_in_place::<Resize, _>(model, |model, id| {
        let node = model.node(id);
        let Some(resize) = node.op_as::<Resize>() else { return Ok(None) };
        let half_pixel =
            matches!(resize.coord_transformer, CoordTransformer::HalfPixel | CoordTransformer::PytorchHalfPixel);
        let input = model.outlet_fact(node.inputs[0])?;
        let output = model.outlet_fact(OutletId::new(id, 0))?;
        let (Some(from), Some(to)) = (input.shape.as_concrete(), output.shape.as_concrete()) else { return Ok(None) };
        let spatial_only = from.len() == 4 && to.len() == 4 && from[..2] == to[..2] && to[2] > 1 && to[3] > 1;
        let f32s = input.datum_type == f32::datum_type() && output.datum_type == f32::datum_type();
        if !half_pixel || resize.interpolator != Interpolator::Linear || !spatial_only || !f32s {
            return Ok(None);
        }
        if !scales_are_implied(model, node, resize, from, to)? {
            return Ok(None);
        }
        let op = PlaneBilinear { height: to[2], width: to[3] };
        Ok(Some((op, node.inputs[..1].to_vec())))
    })
}

/// tract resamples with the `scales` input when there is one: only replace where those are
/// the output/input ratios this op uses.
fn scales_are_implied(
    model: &TypedModel,
    node: &TypedNode,
    resize: &Resize,
    from: &[usize],
    to: &[usize],
) -> TractResult<bool> {
    let Some(ix) = resize.optional_scales_input else { return Ok(true) };
    let Some(input) = node.inputs.get(ix) else { return Ok(true) };
    let Some(scales) = model.outlet_fact(*input)?.konst.clone() else { return Ok(false) };
    let scales = scales.cast_to::<f32>()?;
    let view = scales.try_as_plain_ram()?;
    let scales = view.as_slice::<f32>()?;
    if scales.len() != from.len() {
        return Ok(true); // not used by tract either (sizes decide)
    }
    Ok(scales.iter().zip(from.iter().zip(to)).all(|(s, (f, t))| (*s - *t as f32 / *f as f32).abs() <= 1e-6 * s.abs()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::tract_core::ops::nn::Nearest;

    fn tracts(input: &Tensor, to: [usize; 4], coord: CoordTransformer) -> Tensor {
        let sizes = tensor1(&to.map(|d| d as i64));
        let op = Resize {
            coord_transformer: coord,
            interpolator: Interpolator::Linear,
            nearest: Nearest::Floor,
            optional_scales_input: None,
            optional_sizes_input: Some(1),
        };
        let out =
            op.eval(&EvalContext::out_of_plan(), tvec!(input.clone().into_tvalue(), sizes.into_tvalue())).unwrap();
        out[0].clone().into_tensor()
    }

    #[test]
    fn matches_tracts_resize_up_down_and_at_odd_ratios() {
        let shapes = [([1, 3, 5, 7], [1, 3, 10, 14]), ([1, 2, 3, 3], [1, 2, 96, 96]), ([2, 1, 8, 6], [2, 1, 5, 9])];
        for (from, to) in shapes {
            let values: Vec<f32> = (0..from.iter().product::<usize>()).map(|i| (i as f32 * 0.37).sin() * 5.0).collect();
            let input = Tensor::from_shape(&from, &values).unwrap();
            let ours = PlaneBilinear { height: to[2], width: to[3] }
                .eval(&EvalContext::out_of_plan(), tvec!(input.clone().into_tvalue()))
                .unwrap();
            for coord in [CoordTransformer::HalfPixel, CoordTransformer::PytorchHalfPixel] {
                let theirs = tracts(&input, to, coord);
                let (a, b) =
                    (ours[0].to_plain_array_view::<f32>().unwrap(), theirs.to_plain_array_view::<f32>().unwrap());
                assert_eq!(a.shape(), b.shape());
                let diff = a.iter().zip(b.iter()).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(diff < 1e-5, "{from:?} -> {to:?}: max |diff| {diff}");
            }
        }
    }
}
