//! Drishya's inference engine: an image and a box in, a binary mask out. No HTTP here:
//! the web app reaches the engine through [`load`] and the [`Segmenter`] trait.
//!
//! Layers, from the bottom:
//! - [`kernels`]: the hand-written numeric loops (products, softmax, convolution rows),
//!   each with a portable twin; the CPU's features are read once ([`kernels::cpu`]).
//! - [`ops`]: our operators and the graph rewrites that put them in tract's plans.
//! - [`plan`]: reading ONNX graphs, recognising their family, optimising them into plans,
//!   and plans made on another thread ([`plan::deferred`]).
//! - [`backends`]: the model families, Segment Anything ([`backends::sam`]) and salient
//!   objects ([`backends::salient`]), and the box itself ([`BoxSegmenter`]).

pub mod backends;
pub mod kernels;
mod load;
pub mod ops;
pub mod plan;

pub use drishya_imaging::BoxPrompt;
pub use load::{inspect, load, LoadError, ModelFiles};

use image::{GrayImage, RgbImage};
use serde::Serialize;

/// The model family, recognised from the ONNX graph's inputs and outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    /// Segment Anything: image encoder + prompt decoder.
    Sam,
    /// Salient object detection (U²-Net-p and models with its interface).
    Salient,
    /// No model: the box itself is the mask.
    Box,
}

/// What `/health` and mask answers say about a model.
#[derive(Debug, Clone, Serialize)]
pub struct ModelInfo {
    pub name: String,
    pub kind: ModelKind,
    /// Bytes of ONNX on disk (0 for the box).
    pub file_size_bytes: u64,
}

/// One segmentation call.
pub struct SegmentRequest<'a> {
    pub image: &'a RgbImage,
    /// Changes whenever the working image changes: lets backends cache per image.
    pub image_key: &'a str,
    pub prompt: BoxPrompt,
}

/// Why a loaded model gave no mask.
#[derive(Debug, thiserror::Error)]
pub enum SegmentError {
    /// The model's plans could not be made (the app answers "not available").
    #[error("no segmentation model is available: {0}")]
    Unavailable(String),
    #[error("segmentation failed: the model could not process this image")]
    Inference(String),
}

impl SegmentError {
    pub(crate) fn inference(error: impl std::fmt::Display) -> Self {
        SegmentError::Inference(format!("{error:#}"))
    }
}

/// A loaded model that turns a box into a mask of the working image's size (0 or 255).
pub trait Segmenter: Send + Sync {
    fn info(&self) -> &ModelInfo;
    fn segment(&self, request: &SegmentRequest<'_>) -> Result<GrayImage, SegmentError>;
    /// Does now the per-image work that a later [`Segmenter::segment`] with the same
    /// `image_key` would otherwise do (Segment Anything: the encoder run), so that the
    /// mask then costs only the per-box part. `Ok(true)` when work was done, `Ok(false)`
    /// when there was nothing to do (no per-image stage, or already prepared).
    fn prepare(&self, _image: &RgbImage, _image_key: &str) -> Result<bool, SegmentError> {
        Ok(false)
    }
    /// Runs of the per-image encoder so far (Segment Anything; the misses of its
    /// embedding cache). 0 for models without one.
    fn encoder_runs(&self) -> usize {
        0
    }
}

/// The box is the mask: used when no model is configured (or as configured fallback).
pub struct BoxSegmenter {
    info: ModelInfo,
}

impl Default for BoxSegmenter {
    fn default() -> Self {
        BoxSegmenter { info: ModelInfo { name: "box".into(), kind: ModelKind::Box, file_size_bytes: 0 } }
    }
}

impl Segmenter for BoxSegmenter {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn segment(&self, request: &SegmentRequest<'_>) -> Result<GrayImage, SegmentError> {
        let (width, height) = request.image.dimensions();
        let mut mask = GrayImage::new(width, height);
        paste_box(&mut mask, request.prompt, |_, _| 255);
        Ok(mask)
    }
}

/// Writes `value(x, y)` (box-relative) into every pixel of the box.
pub(crate) fn paste_box(mask: &mut GrayImage, prompt: BoxPrompt, value: impl Fn(u32, u32) -> u8) {
    let (width, height) = mask.dimensions();
    for y in prompt.y_min..prompt.y_max.min(height) {
        for x in prompt.x_min..prompt.x_max.min(width) {
            mask.put_pixel(x, y, image::Luma([value(x - prompt.x_min, y - prompt.y_min)]));
        }
    }
}

/// Number of mask pixels that are set.
pub fn mask_area(mask: &GrayImage) -> u64 {
    mask.as_raw().iter().filter(|&&v| v >= 128).count() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn box_segmenter_fills_exactly_the_box() {
        let image = RgbImage::new(20, 10);
        let prompt = BoxPrompt { x_min: 2, y_min: 3, x_max: 7, y_max: 5 };
        let mask = BoxSegmenter::default().segment(&SegmentRequest { image: &image, image_key: "k", prompt }).unwrap();
        assert_eq!(mask_area(&mask), 10);
        assert_eq!(mask.get_pixel(2, 3)[0], 255);
        assert_eq!(mask.get_pixel(7, 3)[0], 0);
    }
}
