//! The SAM encoder, with TinyViT's first stage run in horizontal strips.
//!
//! MobileSAM's first stage (`layers.0`: two MBConv blocks at 256x256) expands 64 channels
//! to 256: each block holds a 64 MB activation beside a 64 MB depthwise output or a 68 MB
//! packed copy, and that stage set the encoder's memory peak (docs/performance.md §2).
//! Every op in it is pointwise except one 3x3 depthwise convolution (stride 1, padding 1)
//! per block, so output row `r` only depends on input rows `r - halo ..= r + halo`, with
//! `halo` = the number of those convolutions. The encoder is therefore cut into three
//! plans (head, stage, tail); the stage runs on strips of `STRIP_ROWS` rows plus the halo,
//! and only the rows every input of which was real are kept. The result is the same
//! tensor (tests/sam.rs checks parity with onnxruntime's output).
//!
//! Only graphs with that structure are cut (recognised by node names and op types, then
//! checked); every other encoder runs whole.

use std::collections::HashSet;
use std::path::Path;

use tract_onnx::pb::{type_proto, GraphProto, ModelProto, NodeProto, TypeProto, ValueInfoProto};
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::internal::{bail, format_err};

use super::onnx::{self, Plan};

/// Rows per strip (of 256): four strips.
const STRIP_ROWS: usize = 64;
/// The ops a strip may contain: convolutions checked below, and pointwise ops (GELU is
/// exported as Div, Erf, Add, Mul).
const POINTWISE: [&str; 5] = ["Constant", "Div", "Erf", "Add", "Mul"];

pub enum Encoder {
    Whole(Plan),
    Strips(StripEncoder),
}

pub struct StripEncoder {
    head: Plan,
    /// For the first and the last strip: `STRIP_ROWS + halo` rows.
    edge: Plan,
    /// For the others: `STRIP_ROWS + 2 * halo` rows.
    middle: Plan,
    tail: Plan,
    halo: usize,
}

impl Encoder {
    /// Plans the encoder for a `[1, 3, side, side]` input, in strips where the graph allows.
    pub fn load(path: &Path, side: usize) -> TractResult<Self> {
        Self::from_proto(onnx::read_proto(path)?, side)
    }

    pub fn from_proto(proto: ModelProto, side: usize) -> TractResult<Self> {
        let input_fact = f32::fact([1, 3, side, side]);
        if let Some(cut) = StripCut::find(&proto) {
            match StripEncoder::plan(&proto, &cut, input_fact.clone()) {
                Ok(strips) => return Ok(Encoder::Strips(strips)),
                Err(e) => log::warn!("SAM encoder: planned whole, not in strips: {e:#}"),
            }
        }
        Ok(Encoder::Whole(plan_part(&proto, input_fact)?))
    }

    /// Runs the encoder: the embedding.
    pub fn run(&self, input: Tensor) -> TractResult<TValue> {
        let _reuse = crate::alloc::reuse_freed_blocks();
        match self {
            Encoder::Whole(plan) => first(plan.run(tvec!(input.into()))?),
            Encoder::Strips(strips) => strips.run(input),
        }
    }

    pub fn is_strips(&self) -> bool {
        matches!(self, Encoder::Strips(_))
    }
}

fn first(mut outputs: TVec<TValue>) -> TractResult<TValue> {
    if outputs.is_empty() {
        bail!("the plan returned no output");
    }
    Ok(outputs.remove(0))
}

/// Where the graph is cut: node index ranges and the two boundary tensors.
struct StripCut {
    /// Nodes `..head_end` make the head; `head_end..stage_end` the stage; the rest the tail.
    head_end: usize,
    stage_end: usize,
    stage_input: String,
    stage_output: String,
    halo: usize,
}

impl StripCut {
    fn find(proto: &ModelProto) -> Option<StripCut> {
        let nodes = &proto.graph.as_ref()?.node;
        let first_block = nodes.iter().position(|n| n.name.ends_with("layers.0/blocks.0/conv1/c/Conv"))?;
        let downsample = nodes.iter().position(|n| n.name.contains("layers.0/downsample/"))?;
        if first_block == 0 || downsample <= first_block {
            return None;
        }
        let stage_input = nodes[first_block].input.first()?.clone();
        let stage_output = nodes[downsample - 1].output.first()?.clone();
        // The stage begins right after the node that makes its input.
        let head_end = nodes[..first_block].iter().rposition(|n| n.output.contains(&stage_input))? + 1;
        let cut = StripCut { head_end, stage_end: downsample, stage_input, stage_output, halo: 0 };
        let halo = cut.check(proto)?;
        Some(StripCut { halo, ..cut })
    }

    /// The halo, if every stage node is pointwise or a stride-1 convolution with a 1x1 or
    /// a padded 3x3 kernel, and no tensor crosses the cuts but the two boundaries.
    fn check(&self, proto: &ModelProto) -> Option<usize> {
        let graph = proto.graph.as_ref()?;
        let initializers: HashSet<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
        let stage = &graph.node[self.head_end..self.stage_end];
        let tail = &graph.node[self.stage_end..];
        let mut halo = 0;
        for node in stage {
            match node.op_type.as_str() {
                "Conv" => halo += conv_reach(node, graph)?,
                op if POINTWISE.contains(&op) => {}
                _ => return None,
            }
        }
        let closed = |part: &[NodeProto], boundary: &str| {
            let made: HashSet<&str> = part.iter().flat_map(|n| n.output.iter().map(String::as_str)).collect();
            part.iter().flat_map(|n| n.input.iter()).all(|i| {
                i.is_empty() || i == boundary || made.contains(i.as_str()) || initializers.contains(i.as_str())
            })
        };
        let ok = closed(stage, &self.stage_input) && closed(tail, &self.stage_output) && halo > 0;
        ok.then_some(halo)
    }
}

/// Rows a convolution reaches beyond the output row: 0 for 1x1, 1 for a 3x3 with
/// stride 1 and padding 1; `None` for anything else.
fn conv_reach(node: &NodeProto, graph: &GraphProto) -> Option<usize> {
    let ints = |name: &str| node.attribute.iter().find(|a| a.name == name).map(|a| a.ints.clone());
    let kernel = match ints("kernel_shape") {
        Some(k) => k,
        None => {
            let weight = node.input.get(1)?;
            let dims = &graph.initializer.iter().find(|t| &t.name == weight)?.dims;
            dims.get(2..)?.to_vec()
        }
    };
    let ones = |v: Option<Vec<i64>>| v.is_none_or(|v| v.iter().all(|&x| x == 1));
    if !ones(ints("strides")) || !ones(ints("dilations")) {
        return None;
    }
    let auto_pad = node.attribute.iter().find(|a| a.name == "auto_pad").map(|a| a.s.clone());
    if auto_pad.is_some_and(|p| !p.is_empty() && p != b"NOTSET") {
        return None;
    }
    let pads = ints("pads").unwrap_or_else(|| vec![0; 4]);
    match kernel.as_slice() {
        [1, 1] if pads.iter().all(|&p| p == 0) => Some(0),
        [3, 3] if pads.iter().all(|&p| p == 1) => Some(1),
        _ => None,
    }
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

fn plan_part(proto: &ModelProto, input_fact: TypedFact) -> TractResult<Plan> {
    onnx::optimise(onnx::graph_from_proto(proto)?.with_input_fact(0, input_fact.into())?)
}

fn output_shape(plan: &Plan) -> TractResult<Vec<usize>> {
    let model = plan.model();
    let fact = model.outlet_fact(model.output_outlets()?[0])?;
    fact.shape.as_concrete().map(<[usize]>::to_vec).ok_or_else(|| format_err!("symbolic output shape"))
}

impl StripEncoder {
    fn plan(proto: &ModelProto, cut: &StripCut, input_fact: TypedFact) -> TractResult<Self> {
        let graph = proto.graph.as_ref().ok_or_else(|| format_err!("no graph"))?;
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
        let nodes = &graph.node;
        let output = graph.output.first().map(|o| o.name.clone()).ok_or_else(|| format_err!("no output"))?;
        let head = plan_part(&part(&shell, graph, &nodes[..cut.head_end], None, &cut.stage_input), input_fact)?;
        let shape = output_shape(&head)?;
        let [1, channels, rows, width] = shape[..] else { bail!("stage input shape {shape:?}") };
        if rows % STRIP_ROWS != 0 || rows < 2 * STRIP_ROWS {
            bail!("{rows} rows do not split into strips of {STRIP_ROWS}");
        }
        let stage = part(&shell, graph, &nodes[cut.head_end..cut.stage_end], Some(&cut.stage_input), &cut.stage_output);
        let strip = |rows: usize| plan_part(&stage, f32::fact([1, channels, rows, width]));
        let edge = strip(STRIP_ROWS + cut.halo)?;
        let middle = strip(STRIP_ROWS + 2 * cut.halo)?;
        drop(stage);
        let tail_part = part(&shell, graph, &nodes[cut.stage_end..], Some(&cut.stage_output), &output);
        let tail = plan_part(&tail_part, f32::fact([1, channels, rows, width]))?;
        Ok(StripEncoder { head, edge, middle, tail, halo: cut.halo })
    }

    fn run(&self, input: Tensor) -> TractResult<TValue> {
        let x = first(self.head.run(tvec!(input.into()))?)?;
        let [1, channels, rows, width] = x.shape()[..] else { bail!("stage input shape {:?}", x.shape()) };
        let strips = rows / STRIP_ROWS;
        let halo = self.halo;
        // SAFETY: every row of every channel is written below (strips cover all rows).
        let mut stage_out = unsafe { Tensor::uninitialized::<f32>(&[1, channels, rows, width])? };
        {
            let mut out_view = stage_out.try_as_plain_ram_mut()?;
            let out = out_view.as_slice_mut::<f32>()?;
            for s in 0..strips {
                // (first input row, plan, its input rows, output rows to skip)
                let (from, plan, strip_rows, skip) = match s {
                    0 => (0, &self.edge, STRIP_ROWS + halo, 0),
                    s if s == strips - 1 => (rows - STRIP_ROWS - halo, &self.edge, STRIP_ROWS + halo, halo),
                    s => (s * STRIP_ROWS - halo, &self.middle, STRIP_ROWS + 2 * halo, halo),
                };
                let strip = x.slice(2, from, from + strip_rows)?;
                let y = first(plan.run(tvec!(strip.into()))?)?;
                let y_view = y.try_as_plain_ram()?;
                let y = y_view.as_slice::<f32>()?;
                let block = STRIP_ROWS * width;
                for c in 0..channels {
                    let src = c * strip_rows * width + skip * width;
                    let dst = c * rows * width + s * STRIP_ROWS * width;
                    out[dst..dst + block].copy_from_slice(&y[src..src + block]);
                }
            }
        }
        drop(x);
        first(self.tail.run(tvec!(stage_out.into()))?)
    }
}
