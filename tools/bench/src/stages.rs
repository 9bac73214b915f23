//! The timed stages: each loads what it needs (timed apart as the load), then runs its
//! work once as a warm-up and `--runs` times measured, in a child process of its own
//! so that its peak RSS is its own (main.rs). Results and their reading:
//! docs/performance.md.

use std::collections::BTreeMap;
use std::time::Instant;

use drishya_alloc::release_free_memory;
use drishya_imaging::codec;
use drishya_imaging::composite::{self, GradeTarget, Grading, Settings};
use drishya_segment::backends::sam::{self, DecoderPrompt};
use drishya_segment::{SegmentRequest, Segmenter};
use image::GrayImage;
use serde_json::{json, Value};

use crate::inputs::{cup_box, load_embedding, load_model, Inputs, MAX_WIDTH};
use crate::measure::{mb, median, process_start, reset_peak, round_ms, vm_field};
use crate::{err, usage, Res};

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

/// One run of a stage; the argument is the run's number (0 = the warm-up).
type Work<'a> = Box<dyn FnMut(usize) -> Res<Run> + 'a>;

/// The replace settings of every compositing stage (also in inputs.json).
fn settings() -> Settings {
    Settings {
        scale_factor: 1.0,
        use_blending: true,
        feather_amount: 10,
        grading: Some(Grading { target: GradeTarget::MaskedArea, strength: 0.5 }),
    }
}

/// What a user flow does in the app, in one process: upload (decode, downscale, PNG
/// artefact), mask (PNG back, segment, mask + overlay PNGs), replace (scene, mask and
/// product decoded, composite, result PNG).
fn user_flow(segmenter: &dyn Segmenter, jpeg: &[u8], product_png: &[u8], key: &str) -> Res<Run> {
    let t0 = Instant::now();
    let scene = codec::decode_scene(jpeg, MAX_WIDTH).map_err(err)?;
    let scene_png = codec::encode_png(&scene.image).map_err(err)?;
    drop(scene);
    let t1 = Instant::now();
    let scene = codec::decode_png(&scene_png).map_err(err)?.into_rgb8();
    let prompt = cup_box(scene.dimensions());
    let mask = segmenter.segment(&SegmentRequest { image: &scene, image_key: key, prompt }).map_err(err)?;
    release_free_memory();
    let mask_png = codec::encode_png(&mask).map_err(err)?;
    let overlay = codec::mask_overlay(&scene, &mask);
    let overlay_png = codec::encode_png(&overlay).map_err(err)?;
    drop((scene, mask, overlay, overlay_png));
    let t2 = Instant::now();
    let scene = codec::decode_png(&scene_png).map_err(err)?.into_rgb8();
    let mask = codec::decode_png(&mask_png).map_err(err)?.into_luma8();
    let product = codec::decode_product(product_png).map_err(err)?;
    let result = composite::replace_product(&scene, &mask, &product, &settings()).map_err(err)?;
    drop((scene, mask, product));
    let result_png = codec::encode_png(&result).map_err(err)?;
    std::hint::black_box(&result_png);
    let t3 = Instant::now();
    let secs = |a: Instant, b: Instant| b.duration_since(a).as_secs_f64();
    Ok(Run {
        main: secs(t0, t3),
        parts: vec![("upload_s", secs(t0, t1)), ("mask_s", secs(t1, t2)), ("replace_s", secs(t2, t3))],
    })
}

/// Loads what a stage needs (timed as `load_s`) and returns its work. Freed memory is
/// handed back after loading and after each model run, as the app does, so the peaks
/// are the app's.
fn setup<'a>(name: &str, inputs: &'a Inputs) -> Res<(Work<'a>, Value)> {
    let no_info = Value::Null;
    Ok(match name {
        "decode_12mp" | "decode_24mp" => {
            let file = if name == "decode_12mp" { "scene_12mp.jpg" } else { "scene_24mp.jpg" };
            let bytes = inputs.read(file)?;
            let info = json!({"jpeg_bytes": bytes.len()});
            let work = move |_| {
                let t = Instant::now();
                let scene = codec::decode_scene(&bytes, MAX_WIDTH).map_err(err)?;
                std::hint::black_box(&scene.image);
                Run::main(t)
            };
            (Box::new(work), info)
        }
        "u2netp_mask" => {
            let image = image::open(inputs.shared("images/coffee.png")).map_err(err)?.to_rgb8();
            let segmenter = load_model(&inputs.u2netp())?;
            release_free_memory();
            let prompt = cup_box(image.dimensions());
            let work = move |_| {
                let t = Instant::now();
                let mask = segmenter.segment(&SegmentRequest { image: &image, image_key: "k", prompt }).map_err(err)?;
                std::hint::black_box(&mask);
                let run = Run::main(t);
                release_free_memory();
                run
            };
            (Box::new(work), no_info)
        }
        "sam_encoder" => {
            let scene = inputs.rgb("scene_1280.png")?;
            let encoder = sam::load_encoder(&inputs.sam_folder().join("encoder.onnx")).map_err(err)?;
            release_free_memory();
            let work = move |_| {
                let t0 = Instant::now();
                let input = sam::preprocess(&scene).map_err(err)?;
                let t1 = Instant::now();
                let embedding = sam::run_encoder(&encoder, input).map_err(err)?;
                std::hint::black_box(&embedding);
                let run =
                    Run { main: t1.elapsed().as_secs_f64(), parts: vec![("preprocess_s", (t1 - t0).as_secs_f64())] };
                drop(embedding);
                release_free_memory();
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
            release_free_memory();
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
            let segmenter = load_model(&inputs.sam_folder())?;
            release_free_memory();
            let prompt = cup_box(scene.dimensions());
            let work = move |i: usize| {
                let t = Instant::now();
                // A new key each run: the encoder runs every time, as for a new upload.
                let key = format!("image-{i}");
                let mask =
                    segmenter.segment(&SegmentRequest { image: &scene, image_key: &key, prompt }).map_err(err)?;
                std::hint::black_box(&mask);
                let run = Run::main(t);
                release_free_memory();
                run
            };
            (Box::new(work), no_info)
        }
        "replace" | "png_encode" => {
            let scene = inputs.rgb("scene_1280.png")?;
            let mask: GrayImage = image::open(inputs.file("mask_1280.png")).map_err(err)?.to_luma8();
            let product = codec::decode_product(&inputs.read("product.png")?).map_err(err)?;
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
                    let png = codec::encode_png(&result).map_err(err)?;
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
            let model = if name == "flow_sam" { inputs.sam_folder() } else { inputs.u2netp() };
            let segmenter = load_model(&model)?;
            release_free_memory();
            let work = move |i: usize| user_flow(segmenter.as_ref(), &jpeg, &product, &format!("upload-{i}"));
            (Box::new(work), no_info)
        }
        other => return Err(format!("unknown stage {other}\n{}", usage())),
    })
}

/// Runs one timed stage in this process and returns its result: load time, one warm-up
/// (the first run, and the cold start up to its result), `runs` measured runs, and the
/// peak RSS split into the peak while loading and the peak while running (VmHWM is reset
/// between the two through `/proc/self/clear_refs`).
pub fn measure(stage: &str, inputs: &Inputs, runs: usize, warmup: bool, malloc: Option<String>) -> Res<Value> {
    let rss_start = vm_field("VmRSS:");
    let t_load = Instant::now();
    let (mut work, info) = setup(stage, inputs)?;
    let load_s = t_load.elapsed().as_secs_f64();
    let rss_loaded = vm_field("VmRSS:");
    let peak_load = vm_field("VmHWM:");
    let reset = reset_peak();
    let mut first = None;
    let mut cold = None;
    if warmup {
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
    Ok(json!({
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
    }))
}
