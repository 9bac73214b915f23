//! `bench`: Drishya's pipeline benchmark (issue 6).
//!
//! Every measured stage runs in its own child process (this binary re-executed with
//! `--stage NAME`), because peak RSS (`VmHWM`) is per process: each figure is what one
//! process doing only that stage needs. Each stage does one warm-up run, then `--runs`
//! timed runs, and reports the median, the model load time, the time from process start
//! to the first result (cold start), and the peak RSS, split into the peak while loading
//! and the peak while running (the high-water mark is reset between the two through
//! `/proc/self/clear_refs`).
//!
//! The inputs are synthesised from `../shared/images` into `--workdir` (12 MP and 24 MP
//! JPEGs at quality 90, the 1280-wide working image, its U²-Net-p mask, a product with
//! alpha, the SAM embedding) so that `scripts/baseline.py` measures the same files.
//!
//! Besides the timed stages, `plan_stats` computes each tract plan's live-tensor peak
//! from its own order and flush lists, and `profile_u2netp` / `profile_sam_encoder` /
//! `profile_sam_decoder` run a plan node by node: time per op, the live heap
//! (`mallinfo2`) between nodes and the RSS peak inside each node. `BENCH_MALLOC`
//! (`mmap_threshold=N,trim_threshold=N`) tries glibc allocator settings without
//! touching the app. Results and their reading: docs/performance.md.
//!
//! ```text
//! bench [--quick] [--runs N] [--json PATH] [--workdir DIR] [--shared DIR] [--stages a,b] [--fresh]
//! bench --stage NAME --workdir DIR [--shared DIR] [--runs N] [--no-warmup]
//! bench --prepare-only [--workdir DIR] [--fresh]
//! ```

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use drishya::composite::{self, GradeTarget, Grading, Settings};
use drishya::imaging;
use drishya::segment::onnx::{self, Plan};
use drishya::segment::salient::SalientSegmenter;
use drishya::segment::sam::{self, DecoderPrompt, SamSegmenter};
use drishya::segment::{BoxPrompt, ModelInfo, ModelKind, SegmentRequest, Segmenter};
use drishya::sysmem;
use image::{GrayImage, RgbImage, RgbaImage};
use serde_json::{json, Value};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::model::order::{build_flush_list, eval_order};
use tract_onnx::tract_core::ops::konst::Const;

const MIB: f64 = 1024.0 * 1024.0;
/// Working-image width (the app's `MAX_IMAGE_WIDTH`).
const MAX_WIDTH: u32 = 1280;
/// The cup of coffee.png as a fraction of the image: `[x0, y0, x1, y1]`. Every synthetic
/// scene is coffee.png scaled, so the same fractions frame the product in each.
pub const CUP_BOX: [f64; 4] = [0.27, 0.03, 0.70, 0.78];
/// 12.2 MP and 24 MP, 3:2 like the source photo (a 12 MP and a 24 MP camera).
const SIZE_12MP: (u32, u32) = (4272, 2848);
const SIZE_24MP: (u32, u32) = (6000, 4000);
const JPEG_QUALITY: u8 = 90;

/// Every stage, in the order they are run and printed.
const STAGES: &[(&str, &str)] = &[
    ("decode_12mp", "decode + area downscale of a 12 MP JPEG to 1280 px"),
    ("decode_24mp", "decode + area downscale of a 24 MP JPEG to 1280 px"),
    ("u2netp_mask", "U2-Net-p mask of the cup on coffee.png (crop, 320x320 run, paste)"),
    ("sam_encoder", "MobileSAM encoder run, 1024x1024 (preprocessing reported apart)"),
    ("sam_decoder", "MobileSAM decoder + mask post-processing to 1280x853"),
    ("sam_mask", "MobileSAM encoder + decoder in one process (a new image each run)"),
    ("replace", "replace product: 1280x853 scene, U2-Net-p mask, feather 10, grading 50 %"),
    ("png_encode", "PNG encode of the 1280x853 result"),
    ("flow_u2netp", "one whole user flow in-process, U2-Net-p (upload 12 MP, mask, replace, PNGs)"),
    ("flow_sam", "one whole user flow in-process, MobileSAM"),
];

fn process_start() -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(Instant::now)
}

type Res<T> = Result<T, String>;

fn err(e: impl std::fmt::Display) -> String {
    format!("{e:#}")
}

#[derive(Debug, Clone)]
struct Args {
    quick: bool,
    runs: Option<usize>,
    json: Option<PathBuf>,
    workdir: PathBuf,
    shared: PathBuf,
    stages: Option<Vec<String>>,
    stage: Option<String>,
    warmup: bool,
    fresh: bool,
    prepare_only: bool,
}

fn parse_args() -> Res<Args> {
    let mut args = Args {
        quick: false,
        runs: None,
        json: None,
        workdir: PathBuf::from("target/bench/work"),
        shared: std::env::var_os("DRISHYA_SHARED").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("../shared")),
        stages: None,
        stage: None,
        warmup: true,
        fresh: false,
        prepare_only: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--quick" => args.quick = true,
            "--fresh" => args.fresh = true,
            "--prepare-only" => args.prepare_only = true,
            "--no-warmup" => args.warmup = false,
            "--runs" => args.runs = Some(value("--runs")?.parse().map_err(err)?),
            "--json" => args.json = Some(value("--json")?.into()),
            "--workdir" => args.workdir = value("--workdir")?.into(),
            "--shared" => args.shared = value("--shared")?.into(),
            "--stages" => args.stages = Some(value("--stages")?.split(',').map(str::to_string).collect()),
            "--stage" => args.stage = Some(value("--stage")?),
            "-h" | "--help" => {
                println!("{}", usage());
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other}\n{}", usage())),
        }
    }
    Ok(args)
}

fn usage() -> String {
    let mut text = String::from(
        "bench [--quick] [--runs N] [--json PATH] [--workdir DIR] [--shared DIR] [--stages a,b] [--fresh]\n\
         bench --prepare-only [--workdir DIR] [--shared DIR] [--fresh]   (write the inputs, print their manifest)\n\
         bench --stage NAME --workdir DIR [--shared DIR] [--runs N] [--no-warmup]\nstages:\n",
    );
    for (name, what) in STAGES {
        let _ = writeln!(text, "  {name:<12} {what}");
    }
    text.push_str("  plan_stats   tract plans: live-tensor peak per model (not timed)\n");
    text.push_str("  profile_u2netp, profile_sam_encoder, profile_sam_decoder   node-by-node time and live heap\n");
    text.push_str("env BENCH_MALLOC=mmap_threshold=N,trim_threshold=N: glibc allocator experiments");
    text
}

fn main() -> ExitCode {
    process_start();
    // As the app's main does, before any thread exists.
    sysmem::tune_allocator();
    let result = parse_args().and_then(|args| match args.stage.clone() {
        Some(stage) => child(&args, &stage),
        None => parent(&args),
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: {e}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------------------
// Inputs

struct Inputs {
    dir: PathBuf,
    shared: PathBuf,
}

impl Inputs {
    fn new(args: &Args) -> Self {
        Inputs { dir: args.workdir.clone(), shared: args.shared.clone() }
    }
    fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
    fn shared(&self, rel: &str) -> PathBuf {
        self.shared.join(rel)
    }
    fn read(&self, name: &str) -> Res<Vec<u8>> {
        std::fs::read(self.file(name)).map_err(|e| format!("{}: {e}", self.file(name).display()))
    }
    fn rgb(&self, name: &str) -> Res<RgbImage> {
        Ok(image::open(self.file(name)).map_err(err)?.to_rgb8())
    }
    fn u2netp(&self) -> PathBuf {
        self.shared("models/u2netp.onnx")
    }
    fn sam_folder(&self) -> PathBuf {
        self.shared("models/mobile_sam")
    }
}

/// The cup's box in an image of `size`.
fn cup_box(size: (u32, u32)) -> BoxPrompt {
    let (w, h) = (f64::from(size.0), f64::from(size.1));
    let [x0, y0, x1, y1] = CUP_BOX;
    BoxPrompt {
        x_min: (x0 * w).round() as u32,
        y_min: (y0 * h).round() as u32,
        x_max: (x1 * w).round() as u32,
        y_max: (y1 * h).round() as u32,
    }
}

fn model_info(path: &Path, kind: ModelKind) -> ModelInfo {
    let bytes = if kind == ModelKind::Sam {
        ["encoder.onnx", "decoder.onnx"]
            .iter()
            .filter_map(|f| std::fs::metadata(path.join(f)).ok())
            .map(|m| m.len())
            .sum()
    } else {
        std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
    };
    let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    ModelInfo { name, kind, file_size_bytes: bytes }
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
fn prepare(args: &Args) -> Res<Value> {
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
    let scene = imaging::decode_scene(&inputs.read("scene_12mp.jpg")?, MAX_WIDTH).map_err(err)?.image;
    scene.save(inputs.file("scene_1280.png")).map_err(err)?;
    let prompt = cup_box(scene.dimensions());
    // A realistic mask: U2-Net-p's for the cup.
    let u2 =
        SalientSegmenter::load_path(&inputs.u2netp(), model_info(&inputs.u2netp(), ModelKind::Salient)).map_err(err)?;
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
        "mask_1280.png": {"pixels_set": drishya::segment::mask_area(&mask)},
        "product.png": {"width": astronaut.width(), "height": astronaut.height()},
        "cup_box_fraction": CUP_BOX,
        "cup_box_1280": [prompt.x_min, prompt.y_min, prompt.x_max, prompt.y_max],
        "coffee_box": [coffee_box.x_min, coffee_box.y_min, coffee_box.x_max, coffee_box.y_max],
        "replace_settings": {"scale_factor": 1.0, "use_blending": true, "feather_amount": 10, "grading": "masked_area", "strength": 0.5},
    });
    std::fs::write(&manifest, serde_json::to_string_pretty(&value).map_err(err)?).map_err(err)?;
    Ok(value)
}

// ---------------------------------------------------------------------------------------
// One stage, in this (child) process

/// Timings of one run: the main figure and named parts, in seconds.
struct Run {
    main: f64,
    parts: Vec<(&'static str, f64)>,
}

impl Run {
    fn main(t: Instant) -> Res<Run> {
        Ok(Run { main: t.elapsed().as_secs_f64(), parts: Vec::new() })
    }
}

type Work<'a> = Box<dyn FnMut(usize) -> Res<Run> + 'a>;

fn vm_field(name: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Resets VmHWM to the current RSS (Linux >= 4.0). False when not permitted.
fn reset_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

fn mb(bytes: u64) -> f64 {
    (bytes as f64 / MIB * 10.0).round() / 10.0
}

fn settings() -> Settings {
    Settings {
        scale_factor: 1.0,
        use_blending: true,
        feather_amount: 10,
        grading: Some(Grading { target: GradeTarget::MaskedArea, strength: 0.5 }),
    }
}

fn load_embedding(inputs: &Inputs) -> Res<Arc<Tensor>> {
    let bytes = inputs.read("embedding.f32")?;
    let floats: Vec<f32> = bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    let tensor = Tensor::from_shape(&[1, 256, 64, 64], &floats).map_err(err)?;
    Ok(Arc::new(tensor))
}

/// What a user flow does in the app, in one process: upload (decode, downscale, PNG
/// artefact), mask (PNG back, segment, mask + overlay PNGs), replace (scene, mask and
/// product decoded, composite, result PNG).
fn user_flow(segmenter: &dyn Segmenter, jpeg: &[u8], product_png: &[u8], key: &str) -> Res<Run> {
    let t0 = Instant::now();
    let scene = imaging::decode_scene(jpeg, MAX_WIDTH).map_err(err)?;
    let scene_png = imaging::encode_png(&scene.image).map_err(err)?;
    drop(scene);
    let t1 = Instant::now();
    let scene = imaging::decode_png(&scene_png).map_err(err)?.into_rgb8();
    let prompt = cup_box(scene.dimensions());
    let mask = segmenter.segment(&SegmentRequest { image: &scene, image_key: key, prompt }).map_err(err)?;
    sysmem::release_free_memory();
    let mask_png = imaging::encode_png(&mask).map_err(err)?;
    let overlay = imaging::mask_overlay(&scene, &mask);
    let overlay_png = imaging::encode_png(&overlay).map_err(err)?;
    drop((scene, mask, overlay, overlay_png));
    let t2 = Instant::now();
    let scene = imaging::decode_png(&scene_png).map_err(err)?.into_rgb8();
    let mask = imaging::decode_png(&mask_png).map_err(err)?.into_luma8();
    let product = imaging::decode_product(product_png).map_err(err)?;
    let result = composite::replace_product(&scene, &mask, &product, &settings()).map_err(err)?;
    drop((scene, mask, product));
    let result_png = imaging::encode_png(&result).map_err(err)?;
    std::hint::black_box(&result_png);
    let t3 = Instant::now();
    let secs = |a: Instant, b: Instant| b.duration_since(a).as_secs_f64();
    Ok(Run {
        main: secs(t0, t3),
        parts: vec![("upload_s", secs(t0, t1)), ("mask_s", secs(t1, t2)), ("replace_s", secs(t2, t3))],
    })
}

/// Loads what a stage needs (timed as `load_s`) and returns its work.
fn setup<'a>(name: &str, inputs: &'a Inputs) -> Res<(Work<'a>, Value)> {
    let no_info = Value::Null;
    Ok(match name {
        "decode_12mp" | "decode_24mp" => {
            let file = if name == "decode_12mp" { "scene_12mp.jpg" } else { "scene_24mp.jpg" };
            let bytes = inputs.read(file)?;
            let info = json!({"jpeg_bytes": bytes.len()});
            let work = move |_| {
                let t = Instant::now();
                let scene = imaging::decode_scene(&bytes, MAX_WIDTH).map_err(err)?;
                std::hint::black_box(&scene.image);
                Run::main(t)
            };
            (Box::new(work), info)
        }
        "u2netp_mask" => {
            let image = image::open(inputs.shared("images/coffee.png")).map_err(err)?.to_rgb8();
            let path = inputs.u2netp();
            let segmenter = SalientSegmenter::load_path(&path, model_info(&path, ModelKind::Salient)).map_err(err)?;
            sysmem::release_free_memory();
            let prompt = cup_box(image.dimensions());
            let work = move |_| {
                let t = Instant::now();
                let mask = segmenter.segment(&SegmentRequest { image: &image, image_key: "k", prompt }).map_err(err)?;
                std::hint::black_box(&mask);
                let run = Run::main(t);
                sysmem::release_free_memory();
                run
            };
            (Box::new(work), no_info)
        }
        "sam_encoder" => {
            let scene = inputs.rgb("scene_1280.png")?;
            let encoder = sam::load_encoder(&inputs.sam_folder().join("encoder.onnx")).map_err(err)?;
            sysmem::release_free_memory();
            let work = move |_| {
                let t0 = Instant::now();
                let input = sam::preprocess(&scene).map_err(err)?;
                let t1 = Instant::now();
                let embedding = sam::run_encoder(&encoder, input).map_err(err)?;
                std::hint::black_box(&embedding);
                let run =
                    Run { main: t1.elapsed().as_secs_f64(), parts: vec![("preprocess_s", (t1 - t0).as_secs_f64())] };
                drop(embedding);
                sysmem::release_free_memory();
                Ok(run)
            };
            (Box::new(work), no_info)
        }
        "sam_decoder" => {
            let scene = inputs.rgb("scene_1280.png")?;
            let size = (scene.width() as usize, scene.height() as usize);
            drop(scene);
            let embedding = load_embedding(inputs)?;
            let decoder = sam::load_decoder(&inputs.sam_folder().join("decoder.onnx")).map_err(err)?;
            sysmem::release_free_memory();
            let prompt = DecoderPrompt::for_box(cup_box((size.0 as u32, size.1 as u32)), size);
            let work = move |_| {
                let t0 = Instant::now();
                let out = sam::run_decoder(&decoder, embedding.clone(), &prompt).map_err(err)?;
                let t1 = Instant::now();
                let logits = sam::postprocess(out.best(), size);
                let mask: Vec<u8> = logits.iter().map(|&v| if v > 0.0 { 255 } else { 0 }).collect();
                std::hint::black_box(&mask);
                let t2 = Instant::now();
                Ok(Run {
                    main: (t2 - t0).as_secs_f64(),
                    parts: vec![("decoder_s", (t1 - t0).as_secs_f64()), ("postprocess_s", (t2 - t1).as_secs_f64())],
                })
            };
            (Box::new(work), no_info)
        }
        "sam_mask" => {
            let scene = inputs.rgb("scene_1280.png")?;
            let folder = inputs.sam_folder();
            let segmenter = SamSegmenter::load(&folder, model_info(&folder, ModelKind::Sam)).map_err(err)?;
            sysmem::release_free_memory();
            let prompt = cup_box(scene.dimensions());
            let work = move |i: usize| {
                let t = Instant::now();
                // A new key each run: the encoder runs every time, as for a new upload.
                let key = format!("image-{i}");
                let mask =
                    segmenter.segment(&SegmentRequest { image: &scene, image_key: &key, prompt }).map_err(err)?;
                std::hint::black_box(&mask);
                let run = Run::main(t);
                sysmem::release_free_memory();
                run
            };
            (Box::new(work), no_info)
        }
        "replace" | "png_encode" => {
            let scene = inputs.rgb("scene_1280.png")?;
            let mask: GrayImage = image::open(inputs.file("mask_1280.png")).map_err(err)?.to_luma8();
            let product = imaging::decode_product(&inputs.read("product.png")?).map_err(err)?;
            if name == "replace" {
                let work = move |_| {
                    let t = Instant::now();
                    let out = composite::replace_product(&scene, &mask, &product, &settings()).map_err(err)?;
                    std::hint::black_box(&out);
                    Run::main(t)
                };
                (Box::new(work), no_info)
            } else {
                let result = composite::replace_product(&scene, &mask, &product, &settings()).map_err(err)?;
                drop((scene, mask, product));
                let work = move |_| {
                    let t = Instant::now();
                    let png = imaging::encode_png(&result).map_err(err)?;
                    let run = Run::main(t);
                    std::hint::black_box(&png);
                    run
                };
                (Box::new(work), no_info)
            }
        }
        "flow_u2netp" | "flow_sam" => {
            let jpeg = inputs.read("scene_12mp.jpg")?;
            let product = inputs.read("product.png")?;
            let segmenter: Box<dyn Segmenter> = if name == "flow_sam" {
                let folder = inputs.sam_folder();
                Box::new(SamSegmenter::load(&folder, model_info(&folder, ModelKind::Sam)).map_err(err)?)
            } else {
                let path = inputs.u2netp();
                Box::new(SalientSegmenter::load_path(&path, model_info(&path, ModelKind::Salient)).map_err(err)?)
            };
            sysmem::release_free_memory();
            let work = move |i: usize| user_flow(segmenter.as_ref(), &jpeg, &product, &format!("upload-{i}"));
            (Box::new(work), no_info)
        }
        other => return Err(format!("unknown stage {other}\n{}", usage())),
    })
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn round_ms(seconds: f64) -> f64 {
    (seconds * 1e5).round() / 100.0
}

fn child(args: &Args, stage: &str) -> Res<()> {
    let inputs = Inputs::new(args);
    let malloc = apply_malloc_experiment();
    if stage == "plan_stats" || stage.starts_with("profile_") {
        let value = if stage == "plan_stats" { plan_stats(&inputs)? } else { profile(&inputs, stage)? };
        println!("BENCH_RESULT {value}");
        return Ok(());
    }
    let runs = args.runs.unwrap_or(5);
    let rss_start = vm_field("VmRSS:");
    let t_load = Instant::now();
    let (mut work, info) = setup(stage, &inputs)?;
    let load_s = t_load.elapsed().as_secs_f64();
    let rss_loaded = vm_field("VmRSS:");
    let peak_load = vm_field("VmHWM:");
    let reset = reset_peak();
    let mut first = None;
    let mut cold = None;
    if args.warmup {
        let run = work(0)?;
        first = Some(run.main);
        cold = Some(process_start().elapsed().as_secs_f64());
    }
    let mut mains = Vec::new();
    let mut parts: BTreeMap<&'static str, Vec<f64>> = BTreeMap::new();
    for i in 0..runs {
        let run = work(i + 1)?;
        if cold.is_none() {
            cold = Some(process_start().elapsed().as_secs_f64());
        }
        mains.push(run.main);
        for (name, v) in run.parts {
            parts.entry(name).or_default().push(v);
        }
    }
    drop(work);
    let peak_run = vm_field("VmHWM:");
    let peak = if reset { peak_load.max(peak_run) } else { peak_run };
    let part_medians: BTreeMap<String, f64> =
        parts.iter().map(|(k, v)| (k.replace("_s", "_ms"), round_ms(median(v)))).collect();
    let value = json!({
        "stage": stage,
        "runs": mains.len(),
        "median_ms": round_ms(median(&mains)),
        "min_ms": round_ms(mains.iter().copied().fold(f64::INFINITY, f64::min)),
        "max_ms": round_ms(mains.iter().copied().fold(0.0, f64::max)),
        "all_ms": mains.iter().map(|&v| round_ms(v)).collect::<Vec<_>>(),
        "parts_median_ms": part_medians,
        "load_ms": round_ms(load_s),
        "first_run_ms": first.map(round_ms),
        "cold_to_first_result_ms": cold.map(round_ms),
        "rss_start_mb": mb(rss_start),
        "rss_loaded_mb": mb(rss_loaded),
        "peak_load_mb": mb(peak_load),
        "peak_run_mb": reset.then(|| mb(peak_run)),
        "peak_rss_mb": mb(peak),
        "malloc_experiment": malloc,
        "info": info,
    });
    println!("BENCH_RESULT {value}");
    Ok(())
}

// ---------------------------------------------------------------------------------------
// tract plans: weights and the live-tensor peak

fn tdim_bytes(d: &TDim) -> u64 {
    d.to_i64().map(|v| v.max(0) as u64).unwrap_or(0)
}

/// Bytes a node's outputs occupy while alive. `LazyIm2col` outputs are descriptors of a
/// packing done on the fly inside the matmul: their fact announces the fully packed
/// size, but nothing of that size is allocated, so they count as zero here.
fn node_bytes(model: &TypedModel, node: usize) -> u64 {
    if model.node(node).op.name() == "LazyIm2col" {
        return 0;
    }
    model.node_output_facts(node).map(|facts| facts.iter().map(|f| tdim_bytes(&f.mem_size())).sum()).unwrap_or(0)
}

/// The largest set of live tensors when the plan runs `order` (tract's execution model:
/// a node's output is allocated while its inputs are alive; a value is freed after its
/// last consumer ran). Returns the peak bytes and the tensors alive at the peak.
fn live_peak(model: &TypedModel, order: &[usize]) -> Res<(u64, Vec<(u64, String)>)> {
    let outputs = model.output_outlets().map_err(err)?.to_vec();
    let flush = build_flush_list(model, order, &outputs, |n| !n.op_is::<Const>());
    let mut live = vec![false; model.nodes().len()];
    let (mut current, mut peak, mut at_peak) = (0u64, 0u64, Vec::new());
    for (step, &node) in order.iter().enumerate() {
        live[node] = true;
        current += node_bytes(model, node);
        if current > peak {
            peak = current;
            at_peak = live.iter().enumerate().filter(|(_, l)| **l).map(|(n, _)| n).collect();
        }
        for &gone in &flush[step] {
            if std::mem::replace(&mut live[gone], false) {
                current -= node_bytes(model, gone);
            }
        }
    }
    let mut tensors: Vec<(u64, String)> = at_peak
        .into_iter()
        .map(|n| (node_bytes(model, n), format!("{} ({})", model.node(n).name, model.node(n).op.name())))
        .filter(|(b, _)| *b > 0)
        .collect();
    tensors.sort_by_key(|t| std::cmp::Reverse(t.0));
    Ok((peak, tensors))
}

/// Const tensors, and the live-tensor peak in the plan's own order and in the plain
/// topological order.
fn describe_plan(name: &str, plan: &Plan) -> Res<Value> {
    let model = plan.model();
    let not_const = |n: &TypedNode| !n.op_is::<Const>();
    let mut consts = 0u64;
    for node in model.nodes().iter().filter(|n| n.op_is::<Const>()) {
        for fact in model.node_output_facts(node.id).map_err(err)? {
            consts += tdim_bytes(&fact.mem_size());
        }
    }
    let (plan_peak, at_peak) = live_peak(model, plan.order_without_consts())?;
    let plain: Vec<usize> = eval_order(model).map_err(err)?.into_iter().filter(|&n| not_const(model.node(n))).collect();
    let (plain_peak, _) = live_peak(model, &plain)?;
    let largest = model
        .nodes()
        .iter()
        .filter(|n| not_const(n))
        .map(|n| (node_bytes(model, n.id), format!("{} ({})", n.name, n.op.name())))
        .max();
    Ok(json!({
        "model": name,
        "nodes": model.nodes().len(),
        "const_tensors_mb": mb(consts),
        "live_tensor_peak_mb": mb(plan_peak),
        "live_peak_plain_order_mb": mb(plain_peak),
        "alive_at_peak": at_peak.iter().take(8).map(|(b, n)| json!({"mb": mb(*b), "tensor": n})).collect::<Vec<_>>(),
        "largest_tensor_mb": largest.as_ref().map(|(b, _)| mb(*b)),
        "largest_tensor_at": largest.map(|(_, n)| n),
    }))
}

/// Bytes handed out and not given back: malloc's (heap + mmapped chunks) plus the big
/// blocks the process allocator maps itself (src/alloc.rs): the live heap.
fn heap_in_use() -> u64 {
    let mapped = drishya::alloc::mapped_bytes() as u64;
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 only reads the allocator's counters.
        let info = unsafe { libc::mallinfo2() };
        (info.uordblks + info.hblkhd) as u64 + mapped
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    mapped
}

/// Experiments with glibc's allocator without touching the app: `BENCH_MALLOC` =
/// `mmap_threshold=BYTES,trim_threshold=BYTES` (a fixed mmap threshold also stops glibc
/// from raising it after each large free).
fn apply_malloc_experiment() -> Option<String> {
    let spec = std::env::var("BENCH_MALLOC").ok().filter(|s| !s.is_empty())?;
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    for item in spec.split(',') {
        let Some((key, value)) = item.split_once('=') else { continue };
        let Ok(value) = value.trim().parse::<i32>() else { continue };
        let param = match key.trim() {
            "mmap_threshold" => libc::M_MMAP_THRESHOLD,
            "trim_threshold" => libc::M_TRIM_THRESHOLD,
            "arena_max" => libc::M_ARENA_MAX,
            _ => continue,
        };
        // SAFETY: mallopt only changes allocator parameters; no other thread runs yet.
        unsafe {
            libc::mallopt(param, value);
        }
    }
    Some(spec)
}

/// One plan run node by node: time per op type and per node, and the live heap
/// (mallinfo2) and RSS after every node, after a warm-up run.
fn profile_plan(name: &str, plan: &Plan, inputs: TVec<TValue>) -> Res<Value> {
    plan.run(inputs.clone()).map_err(err)?;
    sysmem::release_free_memory();
    let heap_before = heap_in_use();
    let rss_before = vm_field("VmRSS:");
    let mut by_op: BTreeMap<String, (f64, usize)> = BTreeMap::new();
    let mut by_node: Vec<(f64, String)> = Vec::new();
    let (mut heap_peak, mut heap_peak_at, mut rss_peak) = (0u64, String::new(), 0u64);
    // VmHWM is reset before each node and read after it: the RSS peak inside each node.
    let mut in_node: Vec<(u64, String)> = Vec::new();
    let mut state = tract_onnx::tract_core::plan::SimpleState::new(plan).map_err(err)?;
    let t = Instant::now();
    state
        .run_plan_with_eval(inputs, |ctx, op_state, node, input| {
            let resettable = reset_peak();
            let t = Instant::now();
            let out = tract_onnx::tract_core::plan::eval(ctx, op_state, node, input);
            let elapsed = t.elapsed().as_secs_f64();
            if resettable {
                in_node.push((vm_field("VmHWM:"), format!("{} ({})", node.name, node.op.name())));
            }
            let entry = by_op.entry(node.op.name().to_string()).or_default();
            entry.0 += elapsed;
            entry.1 += 1;
            by_node.push((elapsed, format!("{} ({})", node.name, node.op.name())));
            let heap = heap_in_use();
            if heap > heap_peak {
                heap_peak = heap;
                heap_peak_at = node.name.clone();
            }
            rss_peak = rss_peak.max(vm_field("VmRSS:"));
            out
        })
        .map_err(err)?;
    let total = t.elapsed().as_secs_f64();
    let mut ops: Vec<(String, (f64, usize))> = by_op.into_iter().collect();
    ops.sort_by(|a, b| b.1 .0.total_cmp(&a.1 .0));
    if let Ok(path) = std::env::var("BENCH_NODES_TSV") {
        // Every node in plan order (experiment aid: diff two profiles node by node).
        let rows: String = by_node.iter().map(|(s, n)| format!("{:.3}\t{n}\n", s * 1e3)).collect();
        std::fs::write(&path, rows).map_err(err)?;
    }
    by_node.sort_by(|a, b| b.0.total_cmp(&a.0));
    in_node.sort_by_key(|t| std::cmp::Reverse(t.0));
    Ok(json!({
        "model": name,
        "total_ms": round_ms(total),
        "by_op": ops.iter().take(10).map(|(op, (s, n))| json!({"op": op, "ms": round_ms(*s), "nodes": n, "share": (s / total * 1000.0).round() / 10.0})).collect::<Vec<_>>(),
        "slowest_nodes": by_node.iter().take(8).map(|(s, n)| json!({"node": n, "ms": round_ms(*s)})).collect::<Vec<_>>(),
        "heap_before_mb": mb(heap_before),
        "heap_peak_mb": mb(heap_peak),
        "heap_peak_added_mb": mb(heap_peak.saturating_sub(heap_before)),
        "heap_peak_at": heap_peak_at,
        "rss_before_mb": mb(rss_before),
        "rss_peak_between_nodes_mb": mb(rss_peak),
        "rss_peak_in_node_mb": in_node.first().map(|(b, _)| mb(*b)),
        "rss_peak_nodes": in_node.iter().take(6).map(|(b, n)| json!({"node": n, "rss_mb": mb(*b)})).collect::<Vec<_>>(),
    }))
}

fn profile(inputs: &Inputs, which: &str) -> Res<Value> {
    let value = match which {
        "profile_u2netp" => {
            // BENCH_U2NETP_SIDE: run the same graph at another input size (experiment).
            let side: usize = std::env::var("BENCH_U2NETP_SIDE").ok().and_then(|v| v.parse().ok()).unwrap_or(320);
            let graph = onnx::read_graph(&inputs.u2netp()).map_err(err)?;
            let plan =
                graph.with_input_fact(0, f32::fact([1, 3, side, side]).into()).and_then(onnx::optimise).map_err(err)?;
            let coffee = image::open(inputs.shared("images/coffee.png")).map_err(err)?.to_rgb8();
            let b = cup_box(coffee.dimensions());
            let crop = [b.x_min, b.y_min, b.x_max - b.x_min, b.y_max - b.y_min];
            let small = onnx::resize_rgb(&coffee, crop, (side as u32, side as u32)).map_err(err)?;
            let mean = [0.485, 0.456, 0.406];
            let std = [0.229, 0.224, 0.225];
            let input = onnx::normalised_tensor(&small, mean, std, 1.0 / 255.0, (side, side)).map_err(err)?;
            profile_plan("u2netp", &plan, tvec!(input.into()))?
        }
        "profile_sam_encoder" => {
            let plan = sam::load_whole_encoder(&inputs.sam_folder().join("encoder.onnx")).map_err(err)?;
            let input = sam::preprocess(&inputs.rgb("scene_1280.png")?).map_err(err)?;
            profile_plan("sam_encoder", &plan, tvec!(input.into()))?
        }
        "profile_sam_decoder" => {
            let plan = sam::load_decoder(&inputs.sam_folder().join("decoder.onnx")).map_err(err)?;
            let scene = inputs.rgb("scene_1280.png")?;
            let size = (scene.width() as usize, scene.height() as usize);
            let prompt = DecoderPrompt::for_box(cup_box(scene.dimensions()), size);
            let coords = tract_ndarray::Array3::from_shape_vec((1, 2, 2), prompt.coords.to_vec()).map_err(err)?;
            let labels = tract_ndarray::Array2::from_shape_vec((1, 2), prompt.labels.to_vec()).map_err(err)?;
            let feed: TVec<TValue> = tvec!(
                TValue::from_const(load_embedding(inputs)?),
                coords.into_tensor().into(),
                labels.into_tensor().into(),
                Tensor::zero::<f32>(&[1, 1, 256, 256]).map_err(err)?.into(),
                tensor1(&[0f32]).into()
            );
            profile_plan("sam_decoder", &plan, feed)?
        }
        other => return Err(format!("unknown profile {other}")),
    };
    Ok(json!({"stage": which, "profile": value, "peak_rss_mb": mb(vm_field("VmHWM:"))}))
}

fn plan_stats(inputs: &Inputs) -> Res<Value> {
    let graph = onnx::read_graph(&inputs.u2netp()).map_err(err)?;
    let u2 = graph.with_input_fact(0, f32::fact([1, 3, 320, 320]).into()).and_then(onnx::optimise).map_err(err)?;
    let folder = inputs.sam_folder();
    let encoder = sam::load_whole_encoder(&folder.join("encoder.onnx")).map_err(err)?;
    let decoder = sam::load_decoder(&folder.join("decoder.onnx")).map_err(err)?;
    Ok(json!({
        "stage": "plan_stats",
        "plans": [
            describe_plan("u2netp", &u2)?,
            describe_plan("sam_encoder", &encoder)?,
            describe_plan("sam_decoder", &decoder)?,
        ]
    }))
}

// ---------------------------------------------------------------------------------------
// The parent: prepare, run each stage in a child, print and save

fn run_child(args: &Args, stage: &str, runs: usize) -> Res<Value> {
    let exe = std::env::current_exe().map_err(err)?;
    let t = Instant::now();
    let output = Command::new(exe)
        .args(["--stage", stage, "--runs", &runs.to_string()])
        .arg("--workdir")
        .arg(&args.workdir)
        .arg("--shared")
        .arg(&args.shared)
        .stderr(Stdio::inherit())
        .output()
        .map_err(err)?;
    if !output.status.success() {
        return Err(format!("stage {stage} failed ({})", output.status));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("BENCH_RESULT "))
        .ok_or_else(|| format!("stage {stage} printed no result"))?;
    let mut value: Value = serde_json::from_str(line).map_err(err)?;
    value["process_wall_ms"] = json!(round_ms(t.elapsed().as_secs_f64()));
    Ok(value)
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|r| r.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

fn fmt_opt(v: &Value) -> String {
    match v.as_f64() {
        Some(f) if f >= 100.0 => format!("{f:.0}"),
        Some(f) => format!("{f:.1}"),
        None => "-".into(),
    }
}

fn parent(args: &Args) -> Res<()> {
    let runs = args.runs.unwrap_or(if args.quick { 2 } else { 5 });
    let manifest = prepare(args)?;
    if args.prepare_only {
        println!("{}", serde_json::to_string_pretty(&manifest).map_err(err)?);
        return Ok(());
    }
    let wanted: Vec<&str> = match &args.stages {
        Some(list) => list.iter().map(String::as_str).collect(),
        None => STAGES.iter().map(|(n, _)| *n).collect(),
    };
    let mut results = Vec::new();
    for stage in &wanted {
        eprintln!("bench: {stage} ({runs} runs after one warm-up)");
        results.push(run_child(args, stage, runs)?);
    }
    let plans = run_child(args, "plan_stats", 0)?;
    let mut profiles = Vec::new();
    for which in ["profile_u2netp", "profile_sam_encoder", "profile_sam_decoder"] {
        eprintln!("bench: {which} (tract node-by-node profile, one run after a warm-up)");
        profiles.push(run_child(args, which, 0)?);
    }

    let mut table = String::new();
    let _ = writeln!(
        table,
        "{:<12} {:>9} {:>9} {:>9} {:>8} {:>9} {:>9} {:>9} {:>9}",
        "stage", "median ms", "min ms", "load ms", "1st ms", "cold ms", "peak MB", "load pk", "run pk"
    );
    for r in &results {
        let _ = writeln!(
            table,
            "{:<12} {:>9} {:>9} {:>9} {:>8} {:>9} {:>9} {:>9} {:>9}",
            r["stage"].as_str().unwrap_or("?"),
            fmt_opt(&r["median_ms"]),
            fmt_opt(&r["min_ms"]),
            fmt_opt(&r["load_ms"]),
            fmt_opt(&r["first_run_ms"]),
            fmt_opt(&r["cold_to_first_result_ms"]),
            fmt_opt(&r["peak_rss_mb"]),
            fmt_opt(&r["peak_load_mb"]),
            fmt_opt(&r["peak_run_mb"]),
        );
        if let Some(parts) = r["parts_median_ms"].as_object().filter(|p| !p.is_empty()) {
            let text: Vec<String> = parts.iter().map(|(k, v)| format!("{k} {}", fmt_opt(v))).collect();
            let _ = writeln!(table, "{:<12}   parts (median): {}", "", text.join(", "));
        }
    }
    let _ = writeln!(table, "\ntract plans (live-tensor peak in the plan's order; the largest tensors alive then):");
    for p in plans["plans"].as_array().into_iter().flatten() {
        let _ = writeln!(
            table,
            "  {:<12} {} nodes, consts {} MB, live peak {} MB (plain order {} MB), largest tensor {} MB ({})",
            p["model"].as_str().unwrap_or("?"),
            p["nodes"],
            fmt_opt(&p["const_tensors_mb"]),
            fmt_opt(&p["live_tensor_peak_mb"]),
            fmt_opt(&p["live_peak_plain_order_mb"]),
            fmt_opt(&p["largest_tensor_mb"]),
            p["largest_tensor_at"].as_str().unwrap_or("?"),
        );
        for t in p["alive_at_peak"].as_array().into_iter().flatten() {
            let _ = writeln!(table, "      {:>7} MB  {}", fmt_opt(&t["mb"]), t["tensor"].as_str().unwrap_or("?"));
        }
    }
    let _ = writeln!(
        table,
        "\ntract profile (one run node by node; live heap = malloc'd bytes (mallinfo2) + big mapped blocks):"
    );
    for p in &profiles {
        let p = &p["profile"];
        let top: Vec<String> = p["by_op"]
            .as_array()
            .into_iter()
            .flatten()
            .take(5)
            .map(|o| format!("{} {}%", o["op"].as_str().unwrap_or("?"), fmt_opt(&o["share"])))
            .collect();
        let _ = writeln!(
            table,
            "  {:<12} {} ms; live heap peak {} MB (+{} MB over the loaded plan) at {}; RSS {} MB between nodes, \
             {} MB inside {}; {}",
            p["model"].as_str().unwrap_or("?"),
            fmt_opt(&p["total_ms"]),
            fmt_opt(&p["heap_peak_mb"]),
            fmt_opt(&p["heap_peak_added_mb"]),
            p["heap_peak_at"].as_str().unwrap_or("?"),
            fmt_opt(&p["rss_peak_between_nodes_mb"]),
            fmt_opt(&p["rss_peak_in_node_mb"]),
            p["rss_peak_nodes"][0]["node"].as_str().unwrap_or("?"),
            top.join(", ")
        );
    }
    println!("{table}");
    let report = json!({
        "tool": "drishya bench",
        "quick": args.quick,
        "runs": runs,
        "machine": {
            "nproc": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            "cpu": cpu_model(),
        },
        "inputs": manifest,
        "workdir": args.workdir,
        "stages": results,
        "plans": plans["plans"],
        "profiles": profiles.iter().map(|p| p["profile"].clone()).collect::<Vec<_>>(),
        "malloc_experiment": std::env::var("BENCH_MALLOC").ok(),
    });
    if let Some(path) = &args.json {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        std::fs::write(path, serde_json::to_string_pretty(&report).map_err(err)?).map_err(err)?;
        eprintln!("bench: wrote {}", path.display());
    }
    Ok(())
}
