//! Segment Anything (MobileSAM, SAM ViT-B and other exports with the standard interface).
//!
//! The encoder runs once per working image (its embedding is cached by image key);
//! each box then runs only the prompt decoder. The decoder is cut at
//! `iou_predictions` / `low_res_masks`: its final `Resize` to `orig_im_size` depends on
//! an input value, which tract cannot plan for, so SAM's post-processing (bilinear
//! 256 -> 1024, crop the unpadded part, bilinear to the image size, logits > 0) is done
//! here, on static shapes.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use image::{GrayImage, RgbImage};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::TypedModelPatch;
use tract_onnx::tract_hir::internal::bail;

pub use super::tiled::Encoder;
use crate::plan::deferred::{deferred, Deferred};
use crate::plan::onnx::{self, Plan};
use crate::{BoxPrompt, ModelInfo, SegmentError, SegmentRequest, Segmenter};
use tract_onnx::pb::ModelProto;

pub const SIDE: usize = 1024;
const LOW_RES: usize = 256;
const EMBED_SHAPE: [usize; 4] = [1, 256, 64, 64];
const MEAN: [f32; 3] = [123.675, 116.28, 103.53];
const STD: [f32; 3] = [58.395, 57.12, 57.375];
/// Embeddings kept (4 MiB each).
const CACHE_ENTRIES: usize = 4;
const DECODER_INPUTS: [&str; 5] = ["image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input"];

pub struct SamSegmenter {
    info: ModelInfo,
    encoder: Encoder,
    /// Planned in the background while the first image goes through the encoder.
    decoder: Deferred<Plan>,
    cache: Mutex<VecDeque<(String, Arc<Tensor>)>>,
    encoder_runs: AtomicUsize,
}

/// The encoder for a fixed `[1, 3, 1024, 1024]` input (its front fused where it can: `tiled`).
pub fn load_encoder(path: &Path) -> TractResult<Encoder> {
    Encoder::load(path, SIDE)
}

/// The encoder as one plan (for tract's node-by-node profile in the benchmark).
pub fn load_whole_encoder(path: &Path) -> TractResult<Plan> {
    plan_encoder(onnx::read_graph(path)?)
}

/// The whole encoder plan from an already read graph (consumed, so only the plan stays).
pub fn plan_encoder(graph: InferenceModel) -> TractResult<Plan> {
    onnx::optimise(graph.with_input_fact(0, f32::fact([1, 3, SIDE, SIDE]).into())?)
}

/// The decoder plan cut at `iou_predictions` / `low_res_masks`, for one box (two points).
pub fn load_decoder(path: &Path) -> TractResult<Plan> {
    plan_decoder(onnx::read_graph(path)?)
}

/// The cut decoder plan from an already read graph.
pub fn plan_decoder(graph: InferenceModel) -> TractResult<Plan> {
    let graph =
        graph.with_inputs_by_name(DECODER_INPUTS)?.with_outputs_by_name(["iou_predictions", "low_res_masks"])?;
    let facts: [(usize, InferenceFact); 5] = [
        (0, f32::fact(EMBED_SHAPE).into()),
        (1, f32::fact([1, 2, 2]).into()),
        (2, f32::fact([1, 2]).into()),
        (3, f32::fact([1, 1, LOW_RES, LOW_RES]).into()),
        (4, f32::fact([1]).into()),
    ];
    let mut graph = graph;
    for (ix, fact) in facts {
        graph = graph.with_input_fact(ix, fact)?;
    }
    onnx::optimise_with(graph, without_mask_prompt)
}

/// The decoder's mask prompt inputs (`mask_input`, `has_mask_input`) made the constants a
/// box prompt gives them (no mask: zeros, flag 0), so that planning folds the mask
/// branch (two strided convolutions, two LayerNorm2d and a 1x1 convolution to 256
/// channels on a 256x256 plane of zeros) into one constant; the plan takes the first three
/// inputs only.
fn without_mask_prompt(mut model: TypedModel) -> TractResult<TypedModel> {
    let inputs = model.input_outlets()?.to_vec();
    let [embeddings, coords, labels, mask, has_mask] = inputs[..] else {
        bail!("decoder: {} inputs, expected {}", inputs.len(), DECODER_INPUTS.len());
    };
    let mut patch = TypedModelPatch::default();
    for (outlet, value) in [(mask, Tensor::zero::<f32>(&[1, 1, LOW_RES, LOW_RES])?), (has_mask, tensor1(&[0f32]))] {
        let konst = patch.add_const(format!("{}.none", model.node(outlet.node).name), value)?;
        patch.shunt_outside(&model, outlet, konst)?;
    }
    patch.apply(&mut model)?;
    model.set_input_outlets(&[embeddings, coords, labels])?;
    Ok(model)
}

impl SamSegmenter {
    /// From the encoder and decoder files' protobufs. What the fused encoder front needs
    /// is read here; tract's plans for the encoder's tail and for the decoder (most of the
    /// load time, docs/performance.md §3 item 11) are made on a background thread, in the
    /// order the first mask needs them, while that first image goes through the front
    /// (deferred.rs).
    pub(crate) fn from_protos(protos: [ModelProto; 2], info: ModelInfo) -> TractResult<Self> {
        let [encoder, decoder] = protos;
        let (encoder, encoder_job) = Encoder::from_proto_deferred(encoder, SIDE)?;
        let (promise, decoder_plan) = deferred();
        let planner = move || {
            if let Some(job) = encoder_job {
                job();
            }
            // The protobuf's weights are in the graph now: not held while it is optimised.
            let graph = onnx::graph_from_proto(&decoder);
            drop(decoder);
            promise.fulfil(graph.and_then(plan_decoder));
        };
        std::thread::Builder::new().name("sam-planner".into()).spawn(planner)?;
        Ok(SamSegmenter {
            info,
            encoder,
            decoder: decoder_plan,
            cache: Mutex::new(VecDeque::new()),
            encoder_runs: AtomicUsize::new(0),
        })
    }

    /// What a failed step is reported as: a planning failure means this model cannot be
    /// used (503); anything else is an inference error.
    fn failure(&self, error: impl std::fmt::Display) -> SegmentError {
        let (half, planning) = match (self.encoder.planning_error(), self.decoder.failed()) {
            (Some(e), _) => ("encoder", e),
            (None, Some(e)) => ("decoder", e),
            (None, None) => return SegmentError::inference(error),
        };
        log::error!("model {}: planning the SAM {half} failed: {planning}", self.info.name);
        SegmentError::Unavailable(format!("the model {} could not be prepared", self.info.name))
    }

    /// The embedding of `image`, from the cache or from an encoder run (then cached);
    /// the flag says whether the encoder ran.
    fn embedding(&self, image: &RgbImage, key: &str) -> TractResult<(Arc<Tensor>, bool)> {
        if let Some(hit) = self.cached(key) {
            return Ok((hit, false));
        }
        let input = preprocess(image)?;
        self.encoder_runs.fetch_add(1, Ordering::Relaxed);
        let embedding = run_encoder(&self.encoder, input)?;
        if let Ok(mut cache) = self.cache.lock() {
            cache.retain(|(k, _)| k != key);
            if cache.len() >= CACHE_ENTRIES {
                cache.pop_front();
            }
            cache.push_back((key.to_string(), embedding.clone()));
        }
        Ok((embedding, true))
    }

    fn cached(&self, key: &str) -> Option<Arc<Tensor>> {
        let cache = self.cache.lock().ok()?;
        cache.iter().find(|(k, _)| k == key).map(|(_, t)| t.clone())
    }
}

impl Segmenter for SamSegmenter {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// A second box on the same image adds none.
    fn encoder_runs(&self) -> usize {
        self.encoder_runs.load(Ordering::Relaxed)
    }

    fn segment(&self, request: &SegmentRequest<'_>) -> Result<GrayImage, SegmentError> {
        let (width, height) = request.image.dimensions();
        let (embedding, _) = self.embedding(request.image, request.image_key).map_err(|e| self.failure(e))?;
        let decoder = self.decoder.get().map_err(|e| self.failure(e))?;
        let prompt = DecoderPrompt::for_box(request.prompt, (width as usize, height as usize));
        let decoded = run_decoder(decoder, embedding, &prompt).map_err(|e| self.failure(e))?;
        let logits = postprocess(decoded.best(), (width as usize, height as usize));
        let raw = logits.iter().map(|&v| if v > 0.0 { 255 } else { 0 }).collect();
        GrayImage::from_raw(width, height, raw).ok_or_else(|| SegmentError::Inference("mask size".into()))
    }

    /// Fills the embedding cache for `image_key`: the encoder run a first box would wait for.
    fn prepare(&self, image: &RgbImage, image_key: &str) -> Result<bool, SegmentError> {
        let (_, ran) = self.embedding(image, image_key).map_err(|e| self.failure(e))?;
        Ok(ran)
    }
}

/// The scale and size of an image in the 1024 frame (SAM's `ResizeLongestSide`).
pub fn frame_size(size: (usize, usize)) -> (usize, usize) {
    let (w, h) = size;
    let scale = SIDE as f64 / w.max(h).max(1) as f64;
    let nw = ((w as f64 * scale) + 0.5) as usize;
    let nh = ((h as f64 * scale) + 0.5) as usize;
    (nw.clamp(1, SIDE), nh.clamp(1, SIDE))
}

/// `[1, 3, 1024, 1024]`: resized so the long side is 1024, normalised, zero-padded.
pub fn preprocess(image: &RgbImage) -> TractResult<Tensor> {
    let (nw, nh) = frame_size((image.width() as usize, image.height() as usize));
    let resized = onnx::resize_rgb(image, [0, 0, image.width(), image.height()], (nw as u32, nh as u32))?;
    onnx::normalised_tensor(&resized, MEAN, STD, 1.0, (SIDE, SIDE))
}

pub fn run_encoder(encoder: &Encoder, input: Tensor) -> TractResult<Arc<Tensor>> {
    let embedding = encoder.run(input)?.into_arc_tensor();
    if embedding.shape() != EMBED_SHAPE {
        bail!("encoder output shape {:?}, expected {:?}", embedding.shape(), EMBED_SHAPE);
    }
    Ok(embedding)
}

/// A box as SAM's two labelled points, in the 1024 frame.
pub struct DecoderPrompt {
    pub coords: [f32; 4],
    pub labels: [f32; 2],
}

impl DecoderPrompt {
    pub fn for_box(prompt: BoxPrompt, size: (usize, usize)) -> Self {
        let (nw, nh) = frame_size(size);
        let sx = nw as f32 / size.0.max(1) as f32;
        let sy = nh as f32 / size.1.max(1) as f32;
        DecoderPrompt {
            coords: [
                prompt.x_min as f32 * sx,
                prompt.y_min as f32 * sy,
                prompt.x_max as f32 * sx,
                prompt.y_max as f32 * sy,
            ],
            labels: [2.0, 3.0],
        }
    }
}

/// The cut decoder's outputs: one IoU prediction and one 256x256 logit plane per mask.
pub struct DecoderOutput {
    pub iou: Vec<f32>,
    pub masks: Vec<f32>,
}

impl DecoderOutput {
    /// Index of the mask with the highest predicted IoU.
    pub fn best_index(&self) -> usize {
        self.iou.iter().enumerate().fold((0, f32::NEG_INFINITY), |acc, (i, &v)| if v > acc.1 { (i, v) } else { acc }).0
    }

    /// The best mask's logits (256x256).
    pub fn best(&self) -> &[f32] {
        let plane = LOW_RES * LOW_RES;
        let i = self.best_index();
        self.masks.get(i * plane..(i + 1) * plane).unwrap_or(&[])
    }
}

/// Runs the cut decoder for one box.
pub fn run_decoder(decoder: &Plan, embedding: Arc<Tensor>, prompt: &DecoderPrompt) -> TractResult<DecoderOutput> {
    let coords = tract_ndarray::Array3::from_shape_vec((1, 2, 2), prompt.coords.to_vec())?.into_tensor();
    let labels = tract_ndarray::Array2::from_shape_vec((1, 2), prompt.labels.to_vec())?.into_tensor();
    let _run = crate::ops::run_scope();
    // No mask prompt: the plan has it as constants (`without_mask_prompt`).
    let outputs = decoder.run(tvec!(TValue::from_const(embedding), coords.into(), labels.into()))?;
    let [iou, masks] = outputs.as_slice() else {
        bail!("decoder returned {} outputs, expected 2", outputs.len());
    };
    let iou: Vec<f32> = iou.to_plain_array_view::<f32>()?.iter().copied().collect();
    let masks: Vec<f32> = masks.to_plain_array_view::<f32>()?.iter().copied().collect();
    if iou.is_empty() || masks.len() != iou.len() * LOW_RES * LOW_RES {
        bail!("decoder returned {} IoU values and {} mask values", iou.len(), masks.len());
    }
    Ok(DecoderOutput { iou, masks })
}

/// SAM's `postprocess_masks`: 256 -> 1024 (bilinear), crop to the unpadded frame,
/// bilinear to the image size. Returns logits, row-major, `width * height`.
pub fn postprocess(low_res: &[f32], size: (usize, usize)) -> Vec<f32> {
    let frame = frame_size(size);
    let upscaled = onnx::bilinear(low_res, (LOW_RES, LOW_RES), (SIDE, SIDE), frame);
    onnx::bilinear(&upscaled, frame, size, size)
}
