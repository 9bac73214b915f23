//! Shared tract plumbing: reading ONNX graphs, recognising their family, building
//! input tensors and resampling float planes.

use std::path::Path;

use fast_image_resize::images::{Image as FrImage, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::RgbImage;
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::Factoid;
use tract_onnx::tract_hir::internal::format_err;

/// A plan ready to run (single-threaded: tract's default executor).
pub type Plan = Arc<TypedRunnableModel>;

/// What a graph looks like from outside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GraphKind {
    /// One image input `[1, 3, H, W]`; the first output is the saliency map.
    Salient {
        height: usize,
        width: usize,
    },
    SamEncoder,
    SamDecoder,
    Unknown {
        inputs: Vec<String>,
        outputs: Vec<String>,
    },
}

/// Optimises a graph whose input facts are set into a runnable plan.
///
/// tract's direct spatial convolution is turned off for it: measured on this project's
/// models, im2col + matrix product runs the MobileSAM encoder's 3x3 stride-2 patch
/// embedding several times faster, and the whole encoder faster with it
/// (docs/performance.md §2). Its dense layers (a product with a constant matrix, plus the
/// bias) run as [`crate::ops::dense::Dense`], its stride-1 convolutions (with the ReLU
/// after them) as [`crate::ops::conv::DirectConv`], its transposed convolutions whose
/// taps never overlap as [`crate::ops::deconv::PatchDeconv`], its batched products of two activations (windowed
/// attention) as [`crate::ops::batched::BatchedMatMul`], a few rows of one times planes of the other as
/// [`crate::ops::mix::PlaneMix`] (folded into the `PatchDeconv` whose planes it mixes), its `Pad` nodes as [`crate::ops::pad::ConstPad`], its
/// last-axis softmaxes (with a constant bias added first) by [`crate::ops::softmax::RowSoftmax`],
/// its bilinear spatial `Resize`s by [`crate::ops::resize::PlaneBilinear`], its 2x2
/// stride-2 max poolings by [`crate::ops::pool::HalvingMaxPool`], its layer normalisations
/// by [`crate::ops::norm::LayerNorm`].
pub fn optimise(graph: InferenceModel) -> TractResult<Plan> {
    optimise_with(graph, Ok)
}

/// [`optimise`], with `adjust` applied to the typed graph before it is decluttered (where
/// constants it introduces are folded through).
pub fn optimise_with(
    graph: InferenceModel,
    adjust: impl FnOnce(TypedModel) -> TractResult<TypedModel>,
) -> TractResult<Plan> {
    let knobs = tract_onnx::tract_core::knobs::KnobScope::new([("TRACT_DISABLE_DIRECT_SPATIAL", "true")])?;
    knobs.enter(|| {
        // Our convolutions first: they read a channel concatenation's parts in place, so
        // only what they do not take is split.
        let typed = crate::ops::conv::replace_convs(adjust(graph.into_typed()?)?.into_decluttered()?)?;
        let typed = crate::ops::split::split_concat_convs(typed)?;
        let typed = crate::ops::tokens::replace_row_chains(crate::ops::tokens::replace_local_convs(typed)?)?;
        let typed = crate::ops::planar::replace_strided_depthwise(typed)?;
        let typed = crate::ops::deconv::replace_deconvs(typed)?;
        let typed = crate::ops::pool::replace_max_pools(typed)?;
        let typed = crate::ops::mix::replace_plane_mixes(crate::ops::dense::replace_dense(typed)?)?;
        let typed = crate::ops::mlp::replace_mlps(typed)?;
        let typed = crate::ops::deconv::fuse_mixes(typed)?;
        let typed = crate::ops::batched::replace_batched(typed)?;
        let typed = crate::ops::tokens::fold_row_gathers(crate::ops::norm::replace_layer_norms(typed)?)?;
        let optimised = crate::ops::pad::replace_pads(typed.into_optimized()?)?;
        let optimised = crate::ops::dense::skip_unneeded_rows(optimised)?;
        let optimised = crate::ops::resize::replace_resizes(crate::ops::softmax::replace_softmaxes(optimised)?)?;
        let optimised = crate::ops::moves::replace_moves(crate::ops::attention::replace_attention(optimised)?)?;
        optimised.into_compact()?.into_runnable()
    })
}

/// Reads an ONNX file as its protobuf (to cut it, as `tiled` does, before planning).
pub fn read_proto(path: &Path) -> TractResult<tract_onnx::pb::ModelProto> {
    tract_onnx::onnx().proto_model_for_path(path)
}

/// tract's inference model of a protobuf (not yet optimised).
pub fn graph_from_proto(proto: &tract_onnx::pb::ModelProto) -> TractResult<InferenceModel> {
    tract_onnx::onnx().with_ignore_value_info(true).model_for_proto_model(proto)
}

/// Reads an ONNX file into tract's inference model (not yet optimised).
pub fn read_graph(path: &Path) -> TractResult<InferenceModel> {
    tract_onnx::onnx().with_ignore_value_info(true).model_for_path(path)
}

pub fn input_names(model: &InferenceModel) -> Vec<String> {
    model
        .input_outlets()
        .map(|outlets| outlets.iter().map(|o| model.node(o.node).name.clone()).collect())
        .unwrap_or_default()
}

pub fn output_names(model: &InferenceModel) -> Vec<String> {
    model
        .output_outlets()
        .map(|outlets| {
            outlets
                .iter()
                .map(|o| model.outlet_label(*o).map(str::to_string).unwrap_or_else(|| model.node(o.node).name.clone()))
                .collect()
        })
        .unwrap_or_default()
}

/// Recognises the family from input and output names and shapes, never from the file name.
pub fn classify(model: &InferenceModel) -> GraphKind {
    let dims = || {
        let fact = model.input_fact(0).ok()?;
        Some(fact.shape.dims().map(|d| d.concretize().and_then(|d| d.to_i64().ok())).collect())
    };
    classify_io(input_names(model), output_names(model), dims)
}

/// The same from the protobuf alone (no graph to build: the SAM halves are cut first).
pub fn classify_proto(proto: &tract_onnx::pb::ModelProto) -> GraphKind {
    use tract_onnx::pb::tensor_shape_proto::dimension::Value as Dim;
    use tract_onnx::pb::type_proto::Value as Type;
    let Some(graph) = &proto.graph else {
        return GraphKind::Unknown { inputs: vec![], outputs: vec![] };
    };
    let weights: std::collections::HashSet<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    let inputs: Vec<_> = graph.input.iter().filter(|i| !weights.contains(i.name.as_str())).collect();
    let dims = || {
        let Some(Type::TensorType(tensor)) = inputs.first()?.r#type.as_ref()?.value.as_ref() else { return None };
        let dim = |d: &tract_onnx::pb::tensor_shape_proto::Dimension| match d.value {
            Some(Dim::DimValue(v)) => Some(v),
            _ => None,
        };
        Some(tensor.shape.as_ref()?.dim.iter().map(dim).collect())
    };
    let names = inputs.iter().map(|i| i.name.clone()).collect();
    classify_io(names, graph.output.iter().map(|o| o.name.clone()).collect(), dims)
}

/// Recognises the family from input and output names, and for a salient model the input's
/// dimensions (`[1, 3, H, W]`, unknown ones as `None`).
fn classify_io(
    inputs: Vec<String>,
    outputs: Vec<String>,
    dims: impl FnOnce() -> Option<Vec<Option<i64>>>,
) -> GraphKind {
    let has = |list: &[String], names: &[&str]| names.iter().all(|n| list.iter().any(|l| l == n));
    if has(&inputs, &["image"]) && has(&outputs, &["image_embeddings"]) {
        return GraphKind::SamEncoder;
    }
    if has(&inputs, &["image_embeddings", "point_coords", "point_labels"])
        && has(&outputs, &["low_res_masks", "iou_predictions"])
    {
        return GraphKind::SamDecoder;
    }
    if inputs.len() == 1 && !outputs.is_empty() {
        if let Some((height, width)) = dims().and_then(|d| image_input_size(&d)) {
            return GraphKind::Salient { height, width };
        }
    }
    GraphKind::Unknown { inputs, outputs }
}

/// `(H, W)` of a `[1, 3, H, W]` input; symbolic H/W default to 320.
fn image_input_size(dims: &[Option<i64>]) -> Option<(usize, usize)> {
    match dims {
        [None | Some(1), Some(3), h, w] => {
            let side = |d: &Option<i64>| d.filter(|v| *v > 0).map(|v| v as usize).unwrap_or(320);
            Some((side(h), side(w)))
        }
        _ => None,
    }
}

/// Describes a graph that is neither family, for the error message.
pub fn describe_unknown(inputs: &[String], outputs: &[String]) -> String {
    format!(
        "inputs [{}] and outputs [{}] match neither a salient-object model (one [1,3,H,W] image input) \
         nor a Segment Anything export (encoder 'image' -> 'image_embeddings'; decoder 'image_embeddings', \
         'point_coords', 'point_labels' -> 'low_res_masks', 'iou_predictions')",
        inputs.join(", "),
        outputs.join(", ")
    )
}

/// Resizes an RGB region to exactly `to` with bilinear filtering.
pub fn resize_rgb(image: &RgbImage, crop: [u32; 4], to: (u32, u32)) -> TractResult<RgbImage> {
    let [left, top, width, height] = crop;
    let src = ImageRef::new(image.width(), image.height(), image.as_raw(), PixelType::U8x3)?;
    let mut dst = FrImage::new(to.0, to.1, PixelType::U8x3);
    let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Bilinear)).crop(
        f64::from(left),
        f64::from(top),
        f64::from(width),
        f64::from(height),
    );
    Resizer::new().resize(&src, &mut dst, &options)?;
    RgbImage::from_raw(to.0, to.1, dst.into_vec()).ok_or_else(|| format_err!("resize buffer"))
}

/// `[1, 3, pad_h, pad_w]` tensor of `(x - mean) / std` (x in the `scale`d range),
/// zero beyond the image (bottom/right padding).
pub fn normalised_tensor(
    image: &RgbImage,
    mean: [f32; 3],
    std: [f32; 3],
    scale: f32,
    pad: (usize, usize),
) -> TractResult<Tensor> {
    let (pad_h, pad_w) = pad;
    let (width, height) = (image.width() as usize, image.height() as usize);
    let mut data = vec![0f32; 3 * pad_h * pad_w];
    for (c, plane) in data.chunks_exact_mut(pad_h * pad_w).enumerate() {
        for y in 0..height.min(pad_h) {
            let row = &mut plane[y * pad_w..y * pad_w + width.min(pad_w)];
            for (x, out) in row.iter_mut().enumerate() {
                let v = f32::from(image.get_pixel(x as u32, y as u32)[c]) * scale;
                *out = (v - mean[c]) / std[c];
            }
        }
    }
    Ok(tract_ndarray::Array4::from_shape_vec((1, 3, pad_h, pad_w), data)?.into_tensor())
}

/// Bilinear resampling of a float plane (PyTorch `interpolate(bilinear, align_corners=False)`),
/// evaluated on the top-left `region` of a virtual `(dst_w, dst_h)` output.
pub fn bilinear(src: &[f32], src_size: (usize, usize), dst_size: (usize, usize), region: (usize, usize)) -> Vec<f32> {
    let region = (region.0.min(dst_size.0), region.1.min(dst_size.1));
    let mut out = vec![0.0; region.0 * region.1];
    let xs = source_coords(src_size.0, dst_size.0, region.0);
    bilinear_into(src, src_size, dst_size.1, &xs, &mut out);
    out
}

/// The source pixels and weight of each of the first `count` of `dst` output coordinates.
pub fn source_coords(src: usize, dst: usize, count: usize) -> Vec<(usize, usize, f32)> {
    if src == 0 {
        return vec![];
    }
    (0..count).map(|d| source_coord(d, src, dst)).collect()
}

/// [`bilinear`] into `out` (`xs.len()` columns, `out.len() / xs.len()` rows of an output
/// `dst_h` rows high), with the columns' source coordinates from [`source_coords`].
///
/// Separable: each source row is resampled along x once, into one of two row buffers that
/// consecutive output rows share, and each output row is then a straight (vectorised) blend of
/// two of them. The arithmetic is the same as blending four pixels per output pixel, in the
/// same order, so the values are identical; the gathers drop from four per output pixel to one
/// per column of each source row used (upscaling 256 -> 1024 reads each source row for four
/// output rows).
pub fn bilinear_into(src: &[f32], src_size: (usize, usize), dst_h: usize, xs: &[(usize, usize, f32)], out: &mut [f32]) {
    let (sw, sh) = src_size;
    if sw == 0 || sh == 0 || src.len() < sw * sh || xs.is_empty() {
        out.fill(0.0);
        return;
    }
    let cols = xs.len();
    let mut rows = [vec![0f32; cols], vec![0f32; cols]];
    let mut held = [usize::MAX; 2];
    let resample = |row: &mut [f32], y: usize| {
        let r = &src[y * sw..(y + 1) * sw];
        for (o, &(x0, x1, fx)) in row.iter_mut().zip(xs) {
            *o = r[x0] + (r[x1] - r[x0]) * fx;
        }
    };
    for (y, row) in out.chunks_exact_mut(cols).enumerate() {
        let (y0, y1, fy) = source_coord(y, sh, dst_h);
        let top = match held.iter().position(|&h| h == y0) {
            Some(i) => i,
            None => {
                // The other buffer may hold `y1`: keep it.
                let i = usize::from(held[0] == y1);
                resample(&mut rows[i], y0);
                held[i] = y0;
                i
            }
        };
        let bottom = match held.iter().position(|&h| h == y1) {
            Some(i) => i,
            None => {
                let i = 1 - top;
                resample(&mut rows[i], y1);
                held[i] = y1;
                i
            }
        };
        for ((o, &t), &b) in row.iter_mut().zip(&rows[top]).zip(&rows[bottom]) {
            *o = t + (b - t) * fy;
        }
    }
}

/// The four-pixel form [`bilinear_into`] must equal, for its test.
#[cfg(test)]
fn bilinear_reference(src: &[f32], src_size: (usize, usize), dst_size: (usize, usize)) -> Vec<f32> {
    let (sw, sh) = src_size;
    let xs = source_coords(sw, dst_size.0, dst_size.0);
    let mut out = vec![0.0; dst_size.0 * dst_size.1];
    for (y, row) in out.chunks_exact_mut(dst_size.0).enumerate() {
        let (y0, y1, fy) = source_coord(y, sh, dst_size.1);
        let (r0, r1) = (&src[y0 * sw..(y0 + 1) * sw], &src[y1 * sw..(y1 + 1) * sw]);
        for (o, &(x0, x1, fx)) in row.iter_mut().zip(&xs) {
            let top = r0[x0] + (r0[x1] - r0[x0]) * fx;
            let bottom = r1[x0] + (r1[x1] - r1[x0]) * fx;
            *o = top + (bottom - top) * fy;
        }
    }
    out
}

fn source_coord(d: usize, src: usize, dst: usize) -> (usize, usize, f32) {
    let scale = src as f32 / dst as f32;
    let s = ((d as f32 + 0.5) * scale - 0.5).max(0.0);
    let i0 = (s.floor() as usize).min(src - 1);
    let i1 = (i0 + 1).min(src - 1);
    (i0, i1, s - i0 as f32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bilinear_matches_half_pixel_convention() {
        // 2x upsampling of [0, 1]: PyTorch gives [0, 0.25, 0.75, 1].
        let out = bilinear(&[0.0, 1.0], (2, 1), (4, 1), (4, 1));
        assert_eq!(out, vec![0.0, 0.25, 0.75, 1.0]);
        let region = bilinear(&[0.0, 1.0], (2, 1), (4, 1), (2, 1));
        assert_eq!(region, vec![0.0, 0.25]);
    }

    #[test]
    fn separable_bilinear_equals_the_four_pixel_form() {
        // Up, down and mixed, odd sizes, as SAM's post-processing and U2-Net-p's upsampling use it.
        let src: Vec<f32> = (0..37 * 23).map(|i| ((i * 7919) % 1013) as f32 / 17.0 - 20.0).collect();
        for dst in [(148, 92), (16, 9), (37, 23), (80, 11), (5, 60), (1, 1)] {
            let full = bilinear(&src, (37, 23), dst, dst);
            assert_eq!(full, bilinear_reference(&src, (37, 23), dst), "{dst:?}");
            let region = bilinear(&src, (37, 23), dst, (dst.0 / 2 + 1, dst.1 / 2 + 1));
            let reference = bilinear_reference(&src, (37, 23), dst);
            for (y, row) in region.chunks_exact(dst.0 / 2 + 1).enumerate() {
                assert_eq!(row, &reference[y * dst.0..y * dst.0 + row.len()], "{dst:?} region row {y}");
            }
        }
    }

    #[test]
    fn normalised_tensor_pads_with_zeros() {
        let image = RgbImage::from_pixel(2, 1, image::Rgb([255, 0, 255]));
        let t = normalised_tensor(&image, [0.0; 3], [1.0; 3], 1.0, (2, 3)).unwrap();
        let view = t.to_plain_array_view::<f32>().unwrap();
        assert_eq!(view.shape(), &[1, 3, 2, 3]);
        assert_eq!(view[[0, 0, 0, 0]], 255.0);
        assert_eq!(view[[0, 1, 0, 1]], 0.0);
        assert_eq!(view[[0, 0, 0, 2]], 0.0, "right padding");
        assert_eq!(view[[0, 2, 1, 0]], 0.0, "bottom padding");
    }
}
