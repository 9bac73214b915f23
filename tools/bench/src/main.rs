//! `bench`: Drishya's pipeline benchmark.
//!
//! Every measured stage runs in its own child process (this binary re-executed with
//! `--stage NAME`), because peak RSS (`VmHWM`) is per process: each figure is what one
//! process doing only that stage needs. Each stage does one warm-up run, then `--runs`
//! timed runs, and reports the median, the model load time, the time from process start
//! to the first result (cold start), and the peak RSS, split into the peak while loading
//! and the peak while running (stages.rs).
//!
//! The inputs are synthesised from `../shared/images` into `--workdir` (inputs.rs) so
//! that `scripts/baseline.py` measures the same files. Besides the timed stages,
//! `plan_stats` and the `profile_*` stages look inside tract's plans (profile.rs).
//! scripts/bench builds and runs this binary and compares it with the Flask stack.
//! Results and their reading: docs/performance.md.
//!
//! ```text
//! bench [--quick] [--runs N] [--json PATH] [--workdir DIR] [--shared DIR] [--stages a,b] [--fresh]
//! bench --stage NAME --workdir DIR [--shared DIR] [--runs N] [--no-warmup]
//! bench --prepare-only [--workdir DIR] [--fresh]
//! ```

mod inputs;
mod measure;
mod peak;
mod profile;
mod stages;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::time::Instant;

use serde_json::{json, Value};

use crate::inputs::{prepare, Inputs};
use crate::measure::{process_start, round_ms};

/// The server's allocator (big blocks in their own huge-page mappings, crates/alloc),
/// so that the times and peaks measured here are the server's. The app's lib declares it
/// in src/lib.rs; this binary does not link that lib, so it declares its own.
#[global_allocator]
static GLOBAL: drishya_alloc::DrishyaAlloc = drishya_alloc::DrishyaAlloc;

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
    text.push_str("  kernel_peak  clock, one core's FMA peak and the product kernel's GFLOP/s (not timed per run)\n");
    text.push_str("env BENCH_MALLOC=mmap_threshold=N,trim_threshold=N: glibc allocator experiments");
    text
}

fn main() -> ExitCode {
    process_start();
    // As the app's main does, before any thread exists.
    drishya_alloc::tune_allocator();
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

/// This process is one stage's child: runs it and prints its result on one
/// `BENCH_RESULT` line, which `run_child` reads.
fn child(args: &Args, stage: &str) -> Res<()> {
    let inputs = Inputs::new(args);
    let malloc = profile::apply_malloc_experiment();
    let value = if stage == "plan_stats" {
        profile::plan_stats(&inputs)?
    } else if stage == "kernel_peak" {
        peak::kernel_peak()?
    } else if stage.starts_with("profile_") {
        profile::profile(&inputs, stage)?
    } else {
        stages::measure(stage, &inputs, args.runs.unwrap_or(5), args.warmup, malloc)?
    };
    println!("BENCH_RESULT {value}");
    Ok(())
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
