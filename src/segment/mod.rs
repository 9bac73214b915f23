//! Box prompt in, binary mask out: the narrow interface between the HTTP layer and the
//! inference backends. Backends: the Segment Anything family ([`sam`]), the salient
//! object family ([`salient`]) and the last-resort box itself ([`BoxSegmenter`]).

pub mod batched;
pub mod deferred;
pub mod dense;
pub mod gemm;
pub mod mbconv;
pub mod onnx;
pub mod pad;
pub mod resize;
pub mod salient;
pub mod sam;
pub mod softmax;
pub mod split;
pub mod tiled;

use image::{GrayImage, RgbImage};
use rocket::http::Status;
use serde::Serialize;

/// A box in working-image pixels: `[x_min, x_max) x [y_min, y_max)`, inside the image, non-empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct BoxPrompt {
    pub x_min: u32,
    pub y_min: u32,
    pub x_max: u32,
    pub y_max: u32,
}

impl BoxPrompt {
    pub fn width(&self) -> u32 {
        self.x_max - self.x_min
    }
    pub fn height(&self) -> u32 {
        self.y_max - self.y_min
    }
}

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

#[derive(Debug, thiserror::Error)]
pub enum SegmentError {
    #[error("the box is empty or outside the image ({0})")]
    BadBox(String),
    #[error("the segmentation service is busy: try again in {retry_after} s")]
    Busy { retry_after: u64 },
    #[error("no segmentation model is available: {0}")]
    Unavailable(String),
    #[error("segmentation failed: the model could not process this image")]
    Inference(String),
}

impl SegmentError {
    pub fn status(&self) -> Status {
        match self {
            SegmentError::BadBox(_) => Status::BadRequest,
            SegmentError::Busy { .. } | SegmentError::Unavailable(_) => Status::ServiceUnavailable,
            SegmentError::Inference(_) => Status::InternalServerError,
        }
    }

    pub fn retry_after(&self) -> Option<u64> {
        match self {
            SegmentError::Busy { retry_after } => Some(*retry_after),
            SegmentError::Unavailable(_) => Some(30),
            _ => None,
        }
    }

    pub(crate) fn inference(error: impl std::fmt::Display) -> Self {
        SegmentError::Inference(format!("{error:#}"))
    }
}

impl From<crate::gate::Busy> for SegmentError {
    fn from(busy: crate::gate::Busy) -> Self {
        SegmentError::Busy { retry_after: busy.retry_after }
    }
}

/// A loaded model that turns a box into a mask of the working image's size (0 or 255).
pub trait Segmenter: Send + Sync {
    fn info(&self) -> &ModelInfo;
    fn segment(&self, request: &SegmentRequest<'_>) -> Result<GrayImage, SegmentError>;
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

/// Clips a requested box (floating point, any values) to the image; refuses empty results.
pub fn clip_box(coords: [f64; 4], width: u32, height: u32) -> Result<BoxPrompt, SegmentError> {
    if coords.iter().any(|c| !c.is_finite()) {
        return Err(SegmentError::BadBox("coordinates must be finite numbers".into()));
    }
    let [x0, y0, x1, y1] = coords;
    let (x_lo, x_hi) = (x0.min(x1), x0.max(x1));
    let (y_lo, y_hi) = (y0.min(y1), y0.max(y1));
    let clamp = |v: f64, max: u32| v.round().clamp(0.0, f64::from(max)) as u32;
    let prompt = BoxPrompt {
        x_min: clamp(x_lo, width),
        y_min: clamp(y_lo, height),
        x_max: clamp(x_hi, width),
        y_max: clamp(y_hi, height),
    };
    if prompt.x_max <= prompt.x_min || prompt.y_max <= prompt.y_min {
        return Err(SegmentError::BadBox(format!("after clipping to the {width}x{height} image the box has no area")));
    }
    Ok(prompt)
}

/// Number of mask pixels that are set.
pub fn mask_area(mask: &GrayImage) -> u64 {
    mask.as_raw().iter().filter(|&&v| v >= 128).count() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boxes_are_clipped_and_empty_boxes_refused() {
        let b = clip_box([-10.0, 5.0, 50.0, 500.0], 100, 80).unwrap();
        assert_eq!(b, BoxPrompt { x_min: 0, y_min: 5, x_max: 50, y_max: 80 });
        let swapped = clip_box([50.0, 60.0, 10.0, 20.0], 100, 80).unwrap();
        assert_eq!(swapped, BoxPrompt { x_min: 10, y_min: 20, x_max: 50, y_max: 60 });
        assert!(clip_box([200.0, 0.0, 300.0, 10.0], 100, 80).is_err());
        assert!(clip_box([10.0, 10.0, 10.0, 40.0], 100, 80).is_err());
        assert!(clip_box([f64::NAN, 0.0, 10.0, 10.0], 100, 80).is_err());
    }

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
