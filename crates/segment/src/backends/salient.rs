//! Salient-object models (U²-Net-p and models with its interface): crop the box plus
//! a margin, resize to the model's input, ImageNet-normalise, run, min–max normalise
//! the first output, threshold, and paste the mask back inside the box.

use image::GrayImage;
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::internal::{bail, format_err};

use crate::plan::onnx::{self, Plan};
use crate::{paste_box, BoxPrompt, ModelInfo, SegmentError, SegmentRequest, Segmenter};

const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const STD: [f32; 3] = [0.229, 0.224, 0.225];
/// Context added around the box on each side, as a fraction of its size.
const MARGIN: f32 = 0.1;
/// Normalised saliency above this is "object".
const THRESHOLD: f32 = 0.5;

pub struct SalientSegmenter {
    info: ModelInfo,
    plan: Plan,
    input: (usize, usize),
}

impl SalientSegmenter {
    /// Optimises the graph for a fixed `[1, 3, H, W]` input; the unoptimised graph is
    /// consumed on the way so only the plan stays in memory.
    pub(crate) fn load(graph: InferenceModel, input: (usize, usize), info: ModelInfo) -> TractResult<Self> {
        let (height, width) = input;
        let plan = onnx::optimise(graph.with_input_fact(0, f32::fact([1, 3, height, width]).into())?)?;
        Ok(SalientSegmenter { info, plan, input })
    }

    /// The saliency map of a crop, min–max normalised to 0..1, at the model's input size.
    fn saliency(&self, crop: &image::RgbImage) -> TractResult<Vec<f32>> {
        let (height, width) = self.input;
        let input = onnx::normalised_tensor(crop, MEAN, STD, 1.0 / 255.0, (height, width))?;
        let _run = crate::ops::run_scope();
        let outputs = self.plan.run(tvec!(input.into()))?;
        let first = outputs.first().ok_or_else(|| format_err!("model returned no output"))?;
        let view = first.to_plain_array_view::<f32>()?;
        let values: Vec<f32> = view.iter().copied().collect();
        if values.len() != height * width {
            bail!("first output has {} values, expected {}x{}", values.len(), height, width);
        }
        Ok(min_max(values))
    }
}

impl Segmenter for SalientSegmenter {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn segment(&self, request: &SegmentRequest<'_>) -> Result<GrayImage, SegmentError> {
        let (width, height) = request.image.dimensions();
        let crop = with_margin(request.prompt, width, height);
        let (in_h, in_w) = self.input;
        let resized =
            onnx::resize_rgb(request.image, crop, (in_w as u32, in_h as u32)).map_err(SegmentError::inference)?;
        let saliency = self.saliency(&resized).map_err(SegmentError::inference)?;
        let [left, top, crop_w, crop_h] = crop;
        let back = onnx::bilinear(
            &saliency,
            (in_w, in_h),
            (crop_w as usize, crop_h as usize),
            (crop_w as usize, crop_h as usize),
        );
        let mut mask = GrayImage::new(width, height);
        let (dx, dy) = (request.prompt.x_min - left, request.prompt.y_min - top);
        paste_box(&mut mask, request.prompt, |x, y| {
            let i = (y + dy) as usize * crop_w as usize + (x + dx) as usize;
            if back.get(i).copied().unwrap_or(0.0) > THRESHOLD {
                255
            } else {
                0
            }
        });
        Ok(mask)
    }
}

/// The box grown by [`MARGIN`] on each side, clipped: `[left, top, width, height]`.
fn with_margin(prompt: BoxPrompt, width: u32, height: u32) -> [u32; 4] {
    let mx = (prompt.width() as f32 * MARGIN).round() as u32;
    let my = (prompt.height() as f32 * MARGIN).round() as u32;
    let left = prompt.x_min.saturating_sub(mx);
    let top = prompt.y_min.saturating_sub(my);
    let right = (prompt.x_max + mx).min(width);
    let bottom = (prompt.y_max + my).min(height);
    [left, top, right - left, bottom - top]
}

fn min_max(mut values: Vec<f32>) -> Vec<f32> {
    let (lo, hi) = values
        .iter()
        .filter(|v| v.is_finite())
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    let range = hi - lo;
    for v in &mut values {
        *v = if range > f32::EPSILON && v.is_finite() { (*v - lo) / range } else { 0.0 };
    }
    values
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn margin_is_clipped_to_the_image() {
        let prompt = BoxPrompt { x_min: 0, y_min: 10, x_max: 50, y_max: 60 };
        assert_eq!(with_margin(prompt, 52, 100), [0, 5, 52, 60]);
    }

    #[test]
    fn min_max_spans_zero_to_one() {
        assert_eq!(min_max(vec![2.0, 4.0, 3.0]), vec![0.0, 1.0, 0.5]);
        assert_eq!(min_max(vec![1.0, 1.0]), vec![0.0, 0.0], "flat output is background");
    }
}
