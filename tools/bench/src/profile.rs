//! What the timed stages cannot show: `plan_stats` computes each tract plan's
//! live-tensor peak from its own order and flush lists (no run), and the `profile_*`
//! stages run one plan node by node: time per op, the live heap (`mallinfo2`) between
//! nodes and the RSS peak inside each node. `BENCH_MALLOC` tries glibc allocator
//! settings without touching the app. Results and their reading: docs/performance.md.

use std::collections::BTreeMap;
use std::time::Instant;

use drishya_segment::backends::sam::{self, DecoderPrompt};
use drishya_segment::plan::onnx::{self, Plan};
use serde_json::{json, Value};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::model::order::{build_flush_list, eval_order};
use tract_onnx::tract_core::ops::konst::Const;

use crate::inputs::{cup_box, load_embedding, Inputs};
use crate::measure::{mb, reset_peak, round_ms, vm_field};
use crate::{err, Res};

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

/// The `plan_stats` stage: U²-Net-p at 320x320, the whole MobileSAM encoder and the
/// decoder, described without running them.
pub fn plan_stats(inputs: &Inputs) -> Res<Value> {
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
// Node-by-node profiles and allocator experiments

/// Bytes handed out and not given back: malloc's (heap + mmapped chunks) plus the big
/// blocks the process allocator maps itself (crates/alloc): the live heap.
fn heap_in_use() -> u64 {
    let mapped = drishya_alloc::mapped_bytes() as u64;
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
/// from raising it after each large free). Applied in every stage's process, before the
/// stage starts; returns the setting to report with the results.
pub fn apply_malloc_experiment() -> Option<String> {
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
    drishya_alloc::release_free_memory();
    let heap_before = heap_in_use();
    let rss_before = vm_field("VmRSS:");
    let mut by_op: BTreeMap<String, (f64, usize)> = BTreeMap::new();
    let mut by_node: Vec<(f64, String)> = Vec::new();
    // Each node's op as it prints itself (our ops give their shapes and layouts), for the TSV.
    let mut op_details: Vec<String> = Vec::new();
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
            op_details.push(format!("{:?}", node.op).replace(['\t', '\n'], " "));
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
        // Every node in plan order (experiment aid: diff two profiles node by node), its op's
        // details last.
        let rows: String =
            by_node.iter().zip(&op_details).map(|((s, n), d)| format!("{:.3}\t{n}\t{d}\n", s * 1e3)).collect();
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

/// The `profile_u2netp`, `profile_sam_encoder` and `profile_sam_decoder` stages.
pub fn profile(inputs: &Inputs, which: &str) -> Res<Value> {
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
                labels.into_tensor().into()
            );
            profile_plan("sam_decoder", &plan, feed)?
        }
        other => return Err(format!("unknown profile {other}")),
    };
    Ok(json!({"stage": which, "profile": value, "peak_rss_mb": mb(vm_field("VmHWM:"))}))
}
