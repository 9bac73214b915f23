//! The SAM encoder, with TinyViT's front (patch embedding, first stage, first patch
//! merging) run by our own fused code ([`crate::ops::mbconv`]) and the rest by tract.
//!
//! MobileSAM's front works at 512x512 and 256x256 with up to 256 channels: in tract it set
//! the encoder's memory peak (a 64 MB activation beside a 64 MB depthwise output or packed
//! copy, docs/performance.md §2) and a large share of its time through NCHW convolutions
//! (docs/performance.md §3). The graph is cut after the first patch merging
//! (`layers.0/downsample/`), or before it when the merging is not the one we know; when the
//! front is exactly what [`Front::recognise`] accepts it runs fused, row by row, and the
//! tail is one tract plan. Every other encoder runs whole.
//! The embedding matches onnxruntime's (crates/segment/tests/parity.rs).

use std::collections::HashSet;
use std::path::Path;

use tract_onnx::pb::{type_proto, GraphProto, ModelProto, NodeProto, TypeProto, ValueInfoProto};
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::internal::{bail, format_err};

use crate::ops::mbconv::Front;
use crate::plan::deferred::{deferred, Deferred, NotMade};
use crate::plan::onnx::{self, Plan};

pub enum Encoder {
    Whole(Plan),
    Fused(Box<FusedEncoder>),
}

pub struct FusedEncoder {
    front: Front,
    /// Planned by a [`PlanJob`], possibly while the front runs.
    tail: Deferred<Plan>,
}

/// Planning still to be done for an encoder (run it on any thread, once).
pub type PlanJob = Box<dyn FnOnce() + Send>;

impl Encoder {
    /// Plans the encoder for a `[1, 3, side, side]` input, its front fused where it can.
    pub fn load(path: &Path, side: usize) -> TractResult<Self> {
        Self::from_proto(onnx::read_proto(path)?, side)
    }

    /// The encoder, planned before it returns.
    pub fn from_proto(proto: ModelProto, side: usize) -> TractResult<Self> {
        let (encoder, job) = Self::from_proto_deferred(proto, side)?;
        if let Some(job) = job {
            job();
        }
        if let Some(e) = encoder.planning_error() {
            bail!("planning the SAM encoder failed: {e}");
        }
        Ok(encoder)
    }

    /// The encoder, and the planning it still needs when its front is fused: the front
    /// runs at once, its first run waits for the tail's plan only when it gets there.
    pub fn from_proto_deferred(proto: ModelProto, side: usize) -> TractResult<(Self, Option<PlanJob>)> {
        if let Some((front, tail_proto, fact)) = FusedEncoder::cut(&proto, side) {
            drop(proto);
            let (promise, tail) = deferred();
            let job: PlanJob = Box::new(move || promise.fulfil(plan_part(tail_proto, fact)));
            return Ok((Encoder::Fused(Box::new(FusedEncoder { front, tail })), Some(job)));
        }
        Ok((Encoder::Whole(plan_part(proto, f32::fact([1, 3, side, side]))?), None))
    }

    /// Runs the encoder: the embedding.
    pub fn run(&self, input: Tensor) -> TractResult<TValue> {
        let _run = crate::ops::run_scope();
        match self {
            Encoder::Whole(plan) => first(plan.run(tvec!(input.into()))?),
            Encoder::Fused(fused) => {
                let front = fused.front.run(&input)?;
                drop(input);
                let tail = fused.tail.get().map_err(|e| format_err!("planning the SAM encoder failed: {e}"))?;
                first(tail.run(tvec!(front.into()))?)
            }
        }
    }

    /// Whether the front runs as our fused pass.
    pub fn is_fused(&self) -> bool {
        matches!(self, Encoder::Fused(_))
    }

    /// Whether the fused pass includes the patch merging after the first stage.
    pub fn fuses_merge(&self) -> bool {
        matches!(self, Encoder::Fused(fused) if fused.front.merges())
    }

    /// Why the deferred planning failed, if it has (does not wait for it).
    pub fn planning_error(&self) -> Option<&NotMade> {
        match self {
            Encoder::Whole(_) => None,
            Encoder::Fused(fused) => fused.tail.failed(),
        }
    }
}

fn first(mut outputs: TVec<TValue>) -> TractResult<TValue> {
    if outputs.is_empty() {
        bail!("the plan returned no output");
    }
    Ok(outputs.remove(0))
}

impl FusedEncoder {
    /// The fused front and the tail's graph with its input fact, if the graph has a front
    /// we recognise.
    fn cut(proto: &ModelProto, side: usize) -> Option<(Front, ModelProto, TypedFact)> {
        let nodes = &proto.graph.as_ref()?.node;
        let merge = |n: &NodeProto| n.name.contains("layers.0/downsample/");
        let (first, last) = (nodes.iter().position(merge)?, nodes.iter().rposition(merge)?);
        // After the patch merging when it is the one we know, else before it.
        [last + 1, first].into_iter().find_map(|end| Self::cut_at(proto, side, end))
    }

    /// The same with the graph cut before node `end`.
    fn cut_at(proto: &ModelProto, side: usize, end: usize) -> Option<(Front, ModelProto, TypedFact)> {
        let graph = proto.graph.as_ref()?;
        let nodes = &graph.node;
        let front_output = nodes.get(end.checked_sub(1)?)?.output.first()?;
        let input = graph.input.first()?.name.as_str();
        let front = Front::recognise(graph, &nodes[..end], input, front_output)?;
        if front.input_channels() != 3 || !side.is_multiple_of(4) || !closed(graph, &nodes[end..], front_output) {
            return None;
        }
        // Everything but the graph (opsets, model-local functions), without copying the weights.
        let shell = ModelProto {
            ir_version: proto.ir_version,
            opset_import: proto.opset_import.clone(),
            producer_name: proto.producer_name.clone(),
            producer_version: proto.producer_version.clone(),
            domain: proto.domain.clone(),
            model_version: proto.model_version,
            functions: proto.functions.clone(),
            ..Default::default()
        };
        let output = graph.output.first()?.name.clone();
        let tail = part(&shell, graph, &nodes[end..], Some(front_output), &output);
        let fact = f32::fact(front.output_shape(side));
        Some((front, tail, fact))
    }
}

/// Whether `part` reads nothing but `boundary`, initializers and its own outputs.
fn closed(graph: &GraphProto, part: &[NodeProto], boundary: &str) -> bool {
    let initializers: HashSet<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    let made: HashSet<&str> = part.iter().flat_map(|n| n.output.iter().map(String::as_str)).collect();
    part.iter()
        .flat_map(|n| n.input.iter())
        .all(|i| i.is_empty() || i == boundary || made.contains(i.as_str()) || initializers.contains(i.as_str()))
}

/// A model made of `nodes` of `graph`, reading `input` (or the graph's own inputs) and
/// returning `output`; only the initializers those nodes use are copied.
fn part(shell: &ModelProto, graph: &GraphProto, nodes: &[NodeProto], input: Option<&str>, output: &str) -> ModelProto {
    let used: HashSet<&str> = nodes.iter().flat_map(|n| n.input.iter().map(String::as_str)).collect();
    // An f32 tensor; its shape is given as the plan's input fact.
    let float = TypeProto {
        value: Some(type_proto::Value::TensorType(type_proto::Tensor { elem_type: 1, shape: None })),
        ..Default::default()
    };
    let value =
        |name: &str| ValueInfoProto { name: name.to_string(), r#type: Some(float.clone()), ..Default::default() };
    let part_graph = GraphProto {
        name: graph.name.clone(),
        node: nodes.to_vec(),
        initializer: graph.initializer.iter().filter(|t| used.contains(t.name.as_str())).cloned().collect(),
        input: match input {
            Some(name) => vec![value(name)],
            None => graph.input.clone(),
        },
        output: vec![value(output)],
        ..Default::default()
    };
    ModelProto { graph: Some(part_graph), ..shell.clone() }
}

/// The protobuf is consumed: its weights are copied into the graph, and dropping them
/// before optimising keeps them out of the planning's peak, which on a first mask overlaps
/// the fused front's (docs/performance.md, flow_sam's peak).
fn plan_part(proto: ModelProto, input_fact: TypedFact) -> TractResult<Plan> {
    let graph = onnx::graph_from_proto(&proto);
    drop(proto);
    onnx::optimise(graph?.with_input_fact(0, input_fact.into())?)
}
