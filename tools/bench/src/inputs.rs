//! The benchmark's inputs, synthesised from `../shared/images` into the work dir: 12 MP
//! and 24 MP JPEGs, the 1280-wide working image, its U²-Net-p mask, a product with alpha
//! and the SAM embedding. `scripts/baseline.py` and `scripts/loadtest.py` read the same
//! files, so both stacks measure the same bytes.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use drishya_imaging::codec;
use drishya_segment::backends::sam;
use drishya_segment::{BoxPrompt, SegmentRequest, Segmenter};
use image::{RgbImage, RgbaImage};
use serde_json::{json, Value};
use tract_onnx::prelude::*;

use crate::{err, Args, Res};

/// Working-image width (the app's `MAX_IMAGE_WIDTH`).
pub const MAX_WIDTH: u32 = 1280;
/// The cup of coffee.png as a fraction of the image: `[x0, y0, x1, y1]`. Every synthetic
/// scene is coffee.png scaled, so the same fractions frame the product in each
/// (`CUP_BOX` in scripts/baseline.py and scripts/loadtest.py too).
pub const CUP_BOX: [f64; 4] = [0.27, 0.03, 0.70, 0.78];
/// 12.2 MP and 24 MP, 3:2 like the source photo (a 12 MP and a 24 MP camera).
const SIZE_12MP: (u32, u32) = (4272, 2848);
const SIZE_24MP: (u32, u32) = (6000, 4000);
const JPEG_QUALITY: u8 = 90;

/// Where the prepared inputs and the shared fixtures are.
pub struct Inputs {
    pub dir: PathBuf,
    shared: PathBuf,
}

impl Inputs {
    pub fn new(args: &Args) -> Self {
        Inputs { dir: args.workdir.clone(), shared: args.shared.clone() }
    }
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
    pub fn shared(&self, rel: &str) -> PathBuf {
        self.shared.join(rel)
    }
    pub fn read(&self, name: &str) -> Res<Vec<u8>> {
        std::fs::read(self.file(name)).map_err(|e| format!("{}: {e}", self.file(name).display()))
    }
    pub fn rgb(&self, name: &str) -> Res<RgbImage> {
        Ok(image::open(self.file(name)).map_err(err)?.to_rgb8())
    }
    pub fn u2netp(&self) -> PathBuf {
        self.shared("models/u2netp.onnx")
    }
    pub fn sam_folder(&self) -> PathBuf {
        self.shared("models/mobile_sam")
    }
}

/// The cup's box in an image of `size`.
pub fn cup_box(size: (u32, u32)) -> BoxPrompt {
    let (w, h) = (f64::from(size.0), f64::from(size.1));
    let [x0, y0, x1, y1] = CUP_BOX;
    BoxPrompt {
        x_min: (x0 * w).round() as u32,
        y_min: (y0 * h).round() as u32,
        x_max: (x1 * w).round() as u32,
        y_max: (y1 * h).round() as u32,
    }
}

/// A whole model, loaded as the app loads it (a `.onnx` file or a SAM folder).
pub fn load_model(path: &Path) -> Res<Arc<dyn Segmenter>> {
    drishya_segment::load(path).map_err(|e| format!("{}: {e}", path.display()))
}

/// The SAM embedding of the working image, as `prepare` wrote it.
pub fn load_embedding(inputs: &Inputs) -> Res<Arc<Tensor>> {
    let bytes = inputs.read("embedding.f32")?;
    let floats: Vec<f32> = bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    let tensor = Tensor::from_shape(&[1, 256, 64, 64], &floats).map_err(err)?;
    Ok(Arc::new(tensor))
}

/// A photo-like image of `size`: coffee.png upscaled (Catmull-Rom) with deterministic
/// per-channel grain of +-10 levels, as a camera sensor leaves, so the JPEG has a real
/// photo's size and entropy rather than an upscale's smoothness.
fn synthetic_photo(source: &RgbImage, size: (u32, u32)) -> RgbImage {
    let mut out = image::imageops::resize(source, size.0, size.1, image::imageops::FilterType::CatmullRom);
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    for v in out.iter_mut() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let noise = (state % 21) as i16 - 10;
        *v = (i16::from(*v) + noise).clamp(0, 255) as u8;
    }
    out
}

fn write_jpeg(image: &RgbImage, path: &Path) -> Res<()> {
    let file = std::fs::File::create(path).map_err(err)?;
    let mut writer = std::io::BufWriter::new(file);
    let encoder = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut writer, JPEG_QUALITY);
    image.write_with_encoder(encoder).map_err(err)
}

/// Soft-edged ellipse of astronaut.png: a product with a real alpha channel.
fn synthetic_product(source: &RgbImage) -> RgbaImage {
    let (w, h) = source.dimensions();
    let (cx, cy, rx, ry) = (w as f32 / 2.0, h as f32 / 2.0, w as f32 * 0.42, h as f32 * 0.48);
    RgbaImage::from_fn(w, h, |x, y| {
        let p = source.get_pixel(x, y);
        let (dx, dy) = ((x as f32 - cx) / rx, (y as f32 - cy) / ry);
        let r = (dx * dx + dy * dy).sqrt();
        // 1 inside, 0 outside, a linear ramp over the outer 4 % of the radius.
        let alpha = ((1.0 - r) / 0.04).clamp(0.0, 1.0);
        image::Rgba([p[0], p[1], p[2], (alpha * 255.0).round() as u8])
    })
}

const PREPARED: &[&str] = &[
    "scene_12mp.jpg",
    "scene_24mp.jpg",
    "scene_1280.png",
    "mask_1280.png",
    "product.png",
    "embedding.f32",
    "inputs.json",
];

/// Writes the shared inputs into the work dir (kept between runs unless `--fresh`).
pub fn prepare(args: &Args) -> Res<Value> {
    let inputs = Inputs::new(args);
    std::fs::create_dir_all(&inputs.dir).map_err(err)?;
    let manifest = inputs.file("inputs.json");
    if !args.fresh && PREPARED.iter().all(|f| inputs.file(f).is_file()) {
        let text = std::fs::read_to_string(&manifest).map_err(err)?;
        return serde_json::from_str(&text).map_err(err);
    }
    eprintln!("bench: preparing inputs in {}", inputs.dir.display());
    let coffee = image::open(inputs.shared("images/coffee.png")).map_err(err)?.to_rgb8();
    for (name, size) in [("scene_12mp.jpg", SIZE_12MP), ("scene_24mp.jpg", SIZE_24MP)] {
        write_jpeg(&synthetic_photo(&coffee, size), &inputs.file(name))?;
    }
    // The working image exactly as the app makes it from the 12 MP upload.
    let scene = codec::decode_scene(&inputs.read("scene_12mp.jpg")?, MAX_WIDTH).map_err(err)?.image;
    scene.save(inputs.file("scene_1280.png")).map_err(err)?;
    let prompt = cup_box(scene.dimensions());
    // A realistic mask: U2-Net-p's for the cup.
    let u2 = load_model(&inputs.u2netp())?;
    let mask = u2.segment(&SegmentRequest { image: &scene, image_key: "prep", prompt }).map_err(err)?;
    drop(u2);
    mask.save(inputs.file("mask_1280.png")).map_err(err)?;
    let astronaut = image::open(inputs.shared("images/astronaut.png")).map_err(err)?.to_rgb8();
    synthetic_product(&astronaut).save(inputs.file("product.png")).map_err(err)?;
    // The SAM embedding of the working image (input of the decoder-only stages).
    let encoder = sam::load_encoder(&inputs.sam_folder().join("encoder.onnx")).map_err(err)?;
    let embedding = sam::run_encoder(&encoder, sam::preprocess(&scene).map_err(err)?).map_err(err)?;
    let floats: Vec<u8> =
        embedding.to_plain_array_view::<f32>().map_err(err)?.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(inputs.file("embedding.f32"), floats).map_err(err)?;
    let coffee_box = cup_box(coffee.dimensions());
    let size = |f: &str| std::fs::metadata(inputs.file(f)).map(|m| m.len()).unwrap_or(0);
    let value = json!({
        "scene_12mp.jpg": {"width": SIZE_12MP.0, "height": SIZE_12MP.1, "bytes": size("scene_12mp.jpg"), "quality": JPEG_QUALITY},
        "scene_24mp.jpg": {"width": SIZE_24MP.0, "height": SIZE_24MP.1, "bytes": size("scene_24mp.jpg"), "quality": JPEG_QUALITY},
        "scene_1280.png": {"width": scene.width(), "height": scene.height()},
        "mask_1280.png": {"pixels_set": drishya_segment::mask_area(&mask)},
        "product.png": {"width": astronaut.width(), "height": astronaut.height()},
        "cup_box_fraction": CUP_BOX,
        "cup_box_1280": [prompt.x_min, prompt.y_min, prompt.x_max, prompt.y_max],
        "coffee_box": [coffee_box.x_min, coffee_box.y_min, coffee_box.x_max, coffee_box.y_max],
        "replace_settings": {"scale_factor": 1.0, "use_blending": true, "feather_amount": 10, "grading": "masked_area", "strength": 0.5},
    });
    std::fs::write(&manifest, serde_json::to_string_pretty(&value).map_err(err)?).map_err(err)?;
    Ok(value)
}
