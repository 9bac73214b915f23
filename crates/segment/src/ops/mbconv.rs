//! TinyViT's front (MobileSAM's patch embedding, first stage and the patch merging after it)
//! as one fused pass, row by row.
//!
//! The front is two 3x3 stride-2 convolutions with a GELU between them (1024x1024x3 ->
//! 512x512x32 -> 256x256x64), then a chain of MBConv blocks on that 64-channel map: a 1x1
//! convolution to 256 channels, GELU, a 3x3 depthwise convolution, GELU, a 1x1 convolution
//! back to 64 channels, the block's input added, GELU; then the patch merging: a 1x1
//! convolution to 128 channels, GELU, a 3x3 depthwise convolution with stride 2, GELU, a
//! 1x1 convolution, flattened to `[1, 128 x 128, 128]` tokens. tract ran it as separate NCHW ops,
//! each writing a 16-64 MB tensor (its 1x1 convolutions well below the core's peak, the
//! patch embedding through lazy im2col several times slower than onnxruntime's): a large
//! share of the encoder's time (docs/performance.md §3). Here every map is pixel-major
//! (channels contiguous) and each layer makes its output one image row at a time from a
//! ring of the three input rows its kernel reaches: nothing of 256 channels is ever whole,
//! every value is produced while it is still in cache, and all products go through one
//! register-tiled kernel ([`super::gemm`]). The merging's output rows are the tokens the
//! second stage reads, so no NCHW map is transposed on the way (in tract the merging's
//! first 1x1 convolution read the front's output channel-major, at ~40 GFLOP/s).
//!
//! [`Front::recognise`] accepts exactly that structure (op types, wiring, kernel shapes,
//! strides, paddings, GELU constants) from the ONNX nodes, the merging only when it is
//! there as well; anything else is left to tract.

use std::collections::HashMap;

use crate::kernels::conv::{depthwise_row, gelu, Span};
use crate::kernels::gemm::{gemm, Packed};
use tract_onnx::data_resolver::FopenDataResolver;
use tract_onnx::pb::{GraphProto, NodeProto, TensorProto};
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::internal::bail;

/// A 3x3 depthwise convolution (stride 1, padding 1): weights `[tap][channel]`.
struct Depthwise {
    taps: Vec<f32>,
    bias: Vec<f32>,
}

struct Block {
    expand: Packed,
    depthwise: Depthwise,
    project: Packed,
}

/// A 3x3 convolution with stride 2 and padding 1, as a product over im2col rows whose
/// values are in the order the source's layout makes cheap to gather.
struct Strided {
    conv: Packed,
    channels: usize,
}

/// Where a strided convolution reads: the NCHW image, or a ring of pixel-major rows.
enum Source<'a> {
    /// `[channels][rows][width]`; im2col order (channel, ky, kx), the ONNX weight order.
    Planar { data: &'a [f32], rows: usize, width: usize },
    /// Three rows `2y - 1, 2y, 2y + 1` (`None` past an edge), each `[width][channels]`;
    /// im2col order (ky, kx, channel).
    Rows { rows: [Option<&'a [f32]>; 3], width: usize },
}

/// The patch merging after the blocks: a block's three convolutions (the depthwise one with
/// stride 2), no residual, the map flattened to tokens (`[1, pixels, channels]`, the layout
/// the next stage reads).
struct Merge(Block);

pub struct Front {
    embed: [Strided; 2],
    blocks: Vec<Block>,
    merge: Option<Merge>,
}

impl Front {
    /// The front made of `nodes` (reading the graph input `input`, ending in `output`), if
    /// it is exactly two stride-2 convolutions with a GELU between them and then a chain of
    /// MBConv blocks, all weights in `graph`.
    pub fn recognise(graph: &GraphProto, nodes: &[NodeProto], input: &str, output: &str) -> Option<Self> {
        let constants: HashMap<&str, &TensorProto> = nodes
            .iter()
            .filter(|n| n.op_type == "Constant")
            .filter_map(|n| Some((n.output.first()?.as_str(), &n.attribute.iter().find(|a| a.name == "value")?.t)))
            .filter_map(|(name, t)| Some((name, t.as_ref()?)))
            .chain(graph.initializer.iter().map(|t| (t.name.as_str(), t)))
            .collect();
        let ops: Vec<&NodeProto> = nodes.iter().filter(|n| n.op_type != "Constant").collect();
        let matcher = Matcher { constants };
        let (first, x) = matcher.strided(ops.first()?, input, Layout::Planar)?;
        let x = matcher.gelu(ops.get(1..6)?, &x)?;
        let (second, mut x) = matcher.strided(ops.get(6)?, &x, Layout::Rows)?;
        if second.channels != first.conv.outputs {
            return None;
        }
        let mut blocks = Vec::new();
        let mut at = 7;
        while let Some((block, out, used)) = ops.get(at..).and_then(|ops| matcher.block(ops, &x)) {
            if block.expand.inputs != second.conv.outputs {
                return None;
            }
            blocks.push(block);
            at += used;
            x = out;
        }
        let mut merge = None;
        if at < ops.len() {
            let (m, out, used) = matcher.merge(&ops[at..], &x)?;
            if m.0.expand.inputs != second.conv.outputs {
                return None;
            }
            merge = Some(m);
            at += used;
            x = out;
        }
        let front = Front { embed: [first, second], blocks, merge };
        (at == ops.len() && x == output && !front.blocks.is_empty()).then_some(front)
    }

    /// The input channels (3).
    pub fn input_channels(&self) -> usize {
        self.embed[0].channels
    }

    /// Whether the patch merging after the blocks is part of the front.
    pub fn merges(&self) -> bool {
        self.merge.is_some()
    }

    /// The output's shape for a `[1, channels, side, side]` input (`side` a multiple of 4):
    /// NCHW at a quarter of the side, or with the merging `[1, tokens, channels]` at half
    /// of that, rounded up.
    pub fn output_shape(&self, side: usize) -> Vec<usize> {
        let quarter = side / 4;
        match &self.merge {
            Some(merge) => vec![1, quarter.div_ceil(2).pow(2), merge.0.project.outputs],
            None => vec![1, self.embed[1].conv.outputs, quarter, quarter],
        }
    }

    /// Runs the front on an NCHW `[1, channels, rows, width]` image whose sides are
    /// multiples of 4: NCHW out, each side a quarter, or the merged tokens.
    pub fn run(&self, image: &Tensor) -> TractResult<Tensor> {
        let (inputs, outputs) = (self.input_channels(), self.embed[1].conv.outputs);
        let [1, channels, rows, width] = image.shape()[..] else { bail!("front input shape {:?}", image.shape()) };
        if channels != inputs || !rows.is_multiple_of(4) || !width.is_multiple_of(4) {
            bail!("front input {:?}: {inputs} channels and sides that are multiples of 4 expected", image.shape());
        }
        let view = image.try_as_plain_ram()?;
        let planes = view.as_slice::<f32>()?;
        let (rows, width) = (rows / 4, width / 4);
        let mut current = self.embed(planes, rows, width);
        let mut next = vec![0f32; current.len()];
        for block in &self.blocks {
            block.run(&current, &mut next, rows, width);
            std::mem::swap(&mut current, &mut next);
        }
        drop(next);
        if let Some(merge) = &self.merge {
            let (tokens, values) = merge.run(&current, rows, width);
            drop(current);
            let shape = [1, tokens, merge.0.project.outputs];
            return Ok(tract_ndarray::Array::from_shape_vec(&shape[..], values)?.into_tensor());
        }
        // SAFETY: every element is written by the transpose below.
        let mut out = unsafe { Tensor::uninitialized::<f32>(&[1, outputs, rows, width])? };
        {
            let mut out_view = out.try_as_plain_ram_mut()?;
            transpose(&current, rows * width, outputs, out_view.as_slice_mut::<f32>()?);
        }
        Ok(out)
    }

    /// The patch embedding, pixel-major `[rows * width][outputs]` (`rows` x `width` is the
    /// output size, a quarter of the input's): each output row from three rows of the first
    /// convolution's output.
    fn embed(&self, planes: &[f32], rows: usize, width: usize) -> Vec<f32> {
        let [first, second] = &self.embed;
        let (mid_rows, mid_width) = (rows * 2, width * 2);
        let (in_rows, in_width) = (rows * 4, width * 4);
        let mid_len = mid_width * first.conv.outputs;
        let mut ring = vec![0f32; 3 * mid_len];
        let mut made = [usize::MAX; 3];
        let mut cols = Vec::new();
        let mut out = vec![0f32; rows * width * second.conv.outputs];
        let planar = Source::Planar { data: planes, rows: in_rows, width: in_width };
        for y in 0..rows {
            for r in (2 * y).saturating_sub(1)..(2 * y + 2).min(mid_rows) {
                if made[r % 3] != r {
                    let dst = &mut ring[(r % 3) * mid_len..][..mid_len];
                    first.row(&planar, r, mid_width, &mut cols, dst);
                    gelu(dst);
                    made[r % 3] = r;
                }
            }
            let row = |r: Option<usize>| r.filter(|&r| r < mid_rows).map(|r| &ring[(r % 3) * mid_len..][..mid_len]);
            let source = Source::Rows {
                rows: [row((2 * y).checked_sub(1)), row(Some(2 * y)), row(Some(2 * y + 1))],
                width: mid_width,
            };
            let dst = &mut out[y * width * second.conv.outputs..][..width * second.conv.outputs];
            second.row(&source, y, width, &mut cols, dst);
        }
        out
    }
}

impl Strided {
    /// Output row `y` (`width` pixels, pixel-major) through im2col rows in `cols`.
    fn row(&self, source: &Source<'_>, y: usize, width: usize, cols: &mut Vec<f32>, out: &mut [f32]) {
        let c = self.channels;
        let k = 9 * c;
        // Every value of `cols` is written below (the padding's zeros too): no clearing pass.
        cols.resize(width * k, 0.0);
        match *source {
            Source::Planar { data, rows, width: in_width } => {
                // Per (channel, ky), one input row gives each pixel's three taps: input
                // columns 2x - 1, 2x, 2x + 1 (the input is twice as wide as the output).
                debug_assert_eq!(in_width, 2 * width);
                for ch in 0..c {
                    for ky in 0..3 {
                        let at = (ch * 3 + ky) * 3;
                        let sy = (2 * y + ky).wrapping_sub(1);
                        let src = (sy < rows).then(|| data.get((ch * rows + sy) * in_width..)).flatten();
                        let Some(src) = src else {
                            cols.chunks_exact_mut(k).for_each(|col| col[at..at + 3].fill(0.0));
                            continue;
                        };
                        let src = &src[..2 * width];
                        for (x, col) in cols.chunks_exact_mut(k).enumerate() {
                            let left = if x == 0 { 0.0 } else { src[2 * x - 1] };
                            col[at..at + 3].copy_from_slice(&[left, src[2 * x], src[2 * x + 1]]);
                        }
                    }
                }
            }
            Source::Rows { rows, width: in_width } => {
                // Per ky, the three taps' channels are one run of the source row: pixels
                // 2x - 1 .. 2x + 1, channels contiguous.
                debug_assert_eq!(in_width, 2 * width);
                for (x, col) in cols.chunks_exact_mut(k).enumerate() {
                    for (ky, row) in rows.iter().enumerate() {
                        let dst = &mut col[ky * 3 * c..][..3 * c];
                        match row {
                            None => dst.fill(0.0),
                            Some(row) if x == 0 => {
                                dst[..c].fill(0.0);
                                dst[c..].copy_from_slice(&row[..2 * c]);
                            }
                            Some(row) => dst.copy_from_slice(&row[(2 * x - 1) * c..][..3 * c]),
                        }
                    }
                }
            }
        }
        gemm(cols, &self.conv, out);
    }
}

/// `to[c][r] = from[r][c]` for a `rows x cols` matrix: written in runs of `T` contiguous
/// values, read from a `T x cols` tile that stays in L1.
fn transpose(from: &[f32], rows: usize, cols: usize, to: &mut [f32]) {
    const T: usize = 64;
    for r0 in (0..rows).step_by(T) {
        let r1 = (r0 + T).min(rows);
        for c in 0..cols {
            let dst = &mut to[c * rows + r0..c * rows + r1];
            dst.iter_mut().enumerate().for_each(|(i, d)| *d = from[(r0 + i) * cols + c]);
        }
    }
}

impl Block {
    /// One block over a pixel-major `[rows * width][channels]` map.
    fn run(&self, input: &[f32], output: &mut [f32], rows: usize, width: usize) {
        let (channels, hidden) = (self.expand.inputs, self.expand.outputs);
        let row_len = width * hidden;
        // Expanded rows y - 1, y, y + 1 (ring index y % 3), then the depthwise output row.
        let mut ring = vec![0f32; 3 * row_len];
        let mut mid = vec![0f32; row_len];
        let expand_row = |y: usize, ring: &mut [f32]| {
            let dst = &mut ring[(y % 3) * row_len..][..row_len];
            gemm(&input[y * width * channels..][..width * channels], &self.expand, dst);
            gelu(dst);
        };
        expand_row(0, &mut ring);
        for y in 0..rows {
            if y + 1 < rows {
                expand_row(y + 1, &mut ring);
            }
            let row = |dy: isize| {
                let r = y as isize + dy;
                (0..rows as isize).contains(&r).then(|| &ring[(r as usize % 3) * row_len..][..row_len])
            };
            let (taps, bias) = (&self.depthwise.taps, &self.depthwise.bias);
            depthwise_row([row(-1), row(0), row(1)], taps, bias, Span::same(width), &mut mid);
            gelu(&mut mid);
            let out = &mut output[y * width * channels..][..width * channels];
            gemm(&mid, &self.project, out);
            let shortcut = &input[y * width * channels..][..width * channels];
            out.iter_mut().zip(shortcut).for_each(|(o, s)| *o += s);
            gelu(out);
        }
    }
}

impl Merge {
    /// The merging of a pixel-major `[rows * width][channels]` map: its tokens (half the
    /// rows and half the width, rounded up), `[tokens][outputs]`, each output row made from
    /// a ring of the three expanded rows its stride-2 depthwise convolution reads.
    fn run(&self, input: &[f32], rows: usize, width: usize) -> (usize, Vec<f32>) {
        let Merge(Block { expand, depthwise, project }) = self;
        let (channels, hidden, outputs) = (expand.inputs, expand.outputs, project.outputs);
        let span = Span { width, stride: 2 };
        let (out_rows, out_width) = (rows.div_ceil(2), span.outputs());
        let row_len = width * hidden;
        let mut ring = vec![0f32; 3 * row_len];
        let mut made = [usize::MAX; 3];
        let mut mid = vec![0f32; out_width * hidden];
        let mut out = vec![0f32; out_rows * out_width * outputs];
        for y in 0..out_rows {
            for r in (2 * y).saturating_sub(1)..(2 * y + 2).min(rows) {
                if made[r % 3] != r {
                    let dst = &mut ring[(r % 3) * row_len..][..row_len];
                    gemm(&input[r * width * channels..][..width * channels], expand, dst);
                    gelu(dst);
                    made[r % 3] = r;
                }
            }
            let row = |r: Option<usize>| r.filter(|&r| r < rows).map(|r| &ring[(r % 3) * row_len..][..row_len]);
            let taps = [row((2 * y).checked_sub(1)), row(Some(2 * y)), row(Some(2 * y + 1))];
            depthwise_row(taps, &depthwise.taps, &depthwise.bias, span, &mut mid);
            gelu(&mut mid);
            gemm(&mid, project, &mut out[y * out_width * outputs..][..out_width * outputs]);
        }
        (out_rows * out_width, out)
    }
}

/// What a matched `Conv` must be (a kernel of `2 pad + 1`).
#[derive(Clone, Copy)]
struct ConvShape {
    pad: i64,
    stride: i64,
    group: usize,
}

struct ConvWeights {
    /// `[outputs, inputs / group, k, k]`
    dims: Vec<usize>,
    weight: Vec<f32>,
    bias: Vec<f32>,
    output: String,
}

#[derive(Clone, Copy)]
enum Layout {
    Planar,
    Rows,
}

/// Reads the structure out of the ONNX nodes.
struct Matcher<'a> {
    constants: HashMap<&'a str, &'a TensorProto>,
}

impl Matcher<'_> {
    /// A constant's shape and f32 values, decoded by tract's own ONNX tensor loader (no
    /// model path: external data is not read, and such a graph is left to tract).
    fn floats(&self, name: &str) -> Option<(Vec<usize>, Vec<f32>)> {
        let t = self.constants.get(name)?;
        let tensor = tract_onnx::tensor::load_tensor(&FopenDataResolver, t, None).ok()?;
        let values = tensor.try_as_plain_ram().ok()?.as_slice::<f32>().ok()?.to_vec();
        Some((tensor.shape().to_vec(), values))
    }

    /// A constant's integer values (a shape operand).
    fn ints(&self, name: &str) -> Option<Vec<i64>> {
        let t = self.constants.get(name)?;
        let tensor = tract_onnx::tensor::load_tensor(&FopenDataResolver, t, None).ok()?;
        let tensor = tensor.cast_to::<i64>().ok()?;
        Some(tensor.try_as_plain_ram().ok()?.as_slice::<i64>().ok()?.to_vec())
    }

    fn scalar(&self, name: &str) -> Option<f32> {
        match self.floats(name)? {
            (_, v) if v.len() == 1 => Some(v[0]),
            _ => None,
        }
    }

    /// The three convolutions from the start of `ops` on input `x` (1x1, GELU, 3x3
    /// depthwise with `stride`, GELU, 1x1: the first 13 ops), and the last one's output.
    fn convs(&self, ops: &[&NodeProto], x: &str, stride: i64) -> Option<(Block, String)> {
        let (expand, h) = self.pointwise(ops.first()?, x)?;
        let g1 = self.gelu(ops.get(1..6)?, &h)?;
        let (depthwise, d) = self.depthwise(ops.get(6)?, &g1, expand.outputs, stride)?;
        let g2 = self.gelu(ops.get(7..12)?, &d)?;
        let (project, c) = self.pointwise(ops.get(12)?, &g2)?;
        (project.inputs == expand.outputs).then_some((Block { expand, depthwise, project }, c))
    }

    /// One block from the start of `ops` on input `x`: the block, its output, ops used.
    fn block(&self, ops: &[&NodeProto], x: &str) -> Option<(Block, String, usize)> {
        let (block, c) = self.convs(ops, x, 1)?;
        let add = ops.get(13)?;
        let summed = add.op_type == "Add" && sorted(&add.input) == sorted(&[c, x.to_string()]);
        let r = add.output.first().filter(|_| summed)?;
        let out = self.gelu(ops.get(14..19)?, r)?;
        (block.project.outputs == block.expand.inputs).then_some((block, out, 19))
    }

    /// The patch merging from the start of `ops` on input `x`, as PyTorch exports
    /// `conv3(x).flatten(2).transpose(1, 2)`: the merging, its output, ops used.
    fn merge(&self, ops: &[&NodeProto], x: &str) -> Option<(Merge, String, usize)> {
        let (convs, c) = self.convs(ops, x, 2)?;
        let out = self.tokens(ops.get(13..18)?, &c)?;
        Some((Merge(convs), out, 18))
    }

    /// `Transpose(Reshape(x, Concat(Slice(Shape(x), 0, 2), [-1])), [0, 2, 1])`: an NCHW
    /// map as `[N, HW, C]` tokens. Its output.
    fn tokens(&self, ops: &[&NodeProto], x: &str) -> Option<String> {
        let [shape, slice, concat, reshape, transpose] = ops else { return None };
        let out = |n: &NodeProto| n.output.first().cloned();
        let attr = |n: &NodeProto, name: &str| n.attribute.iter().find(|a| a.name == name).cloned();
        let ints_at = |n: &NodeProto, i: usize| n.input.get(i).and_then(|name| self.ints(name));
        let shape_ok = shape.op_type == "Shape" && shape.input == [x] && shape.attribute.is_empty();
        let slice_ok = slice.op_type == "Slice"
            && slice.input.first() == out(shape).as_ref()
            && ints_at(slice, 1)? == [0]
            && ints_at(slice, 2)? == [2]
            && (slice.input.len() < 4 || ints_at(slice, 3)? == [0])
            && (slice.input.len() < 5 || ints_at(slice, 4)? == [1]);
        let concat_ok = concat.op_type == "Concat"
            && attr(concat, "axis").map(|a| a.i) == Some(0)
            && concat.input.len() == 2
            && concat.input.first() == out(slice).as_ref()
            && ints_at(concat, 1)? == [-1];
        let reshape_ok = reshape.op_type == "Reshape"
            && reshape.input == [x.to_string(), out(concat)?]
            && attr(reshape, "allowzero").is_none_or(|a| a.i == 0);
        let transpose_ok = transpose.op_type == "Transpose"
            && transpose.input == [out(reshape)?]
            && attr(transpose, "perm").map(|a| a.ints) == Some(vec![0, 2, 1]);
        (shape_ok && slice_ok && concat_ok && reshape_ok && transpose_ok).then(|| out(transpose)).flatten()
    }

    /// A `Conv` reading `x` with constant weights and bias, no dilation, explicit padding
    /// `pad` on every side, stride `stride` and `group`: its weights and output.
    fn conv(&self, node: &NodeProto, x: &str, shape: ConvShape) -> Option<ConvWeights> {
        if node.op_type != "Conv" || node.input.len() != 3 || node.input[0] != x {
            return None;
        }
        let ints = |name: &str| node.attribute.iter().find(|a| a.name == name).map(|a| a.ints.clone());
        let all = |v: Option<Vec<i64>>, value: i64| v.is_none_or(|v| v.iter().all(|&i| i == value));
        let group = node.attribute.iter().find(|a| a.name == "group").map_or(1, |a| a.i);
        let shaped = all(ints("strides"), shape.stride)
            && all(ints("pads"), shape.pad)
            && all(ints("dilations"), 1)
            && usize::try_from(group).ok() == Some(shape.group)
            && node.attribute.iter().all(|a| a.name != "auto_pad" || a.s.is_empty() || a.s == b"NOTSET");
        let (dims, weight) = self.floats(&node.input[1])?;
        let (bias_dims, bias) = self.floats(&node.input[2])?;
        let kernel = usize::try_from(2 * shape.pad + 1).ok()?;
        let fits = dims.len() == 4 && dims[2..] == [kernel, kernel] && bias_dims == dims[..1];
        let output = node.output.first()?.clone();
        (shaped && fits).then_some(ConvWeights { dims, weight, bias, output })
    }

    fn pointwise(&self, node: &NodeProto, x: &str) -> Option<(Packed, String)> {
        let c = self.conv(node, x, ConvShape { pad: 0, stride: 1, group: 1 })?;
        Some((Packed::from_outputs_major(&c.weight, c.bias, c.dims[0], c.dims[1])?, c.output))
    }

    /// A 3x3 stride-2 convolution with padding 1, weights in `layout`'s im2col order.
    fn strided(&self, node: &NodeProto, x: &str, layout: Layout) -> Option<(Strided, String)> {
        let c = self.conv(node, x, ConvShape { pad: 1, stride: 2, group: 1 })?;
        let (outputs, channels) = (c.dims[0], c.dims[1]);
        let weight: Vec<f32> = match layout {
            Layout::Planar => c.weight,
            // [o][c][ky][kx] -> [o][ky][kx][c]
            Layout::Rows => (0..outputs * 9 * channels)
                .map(|i| {
                    let (o, tap, ch) = (i / (9 * channels), i / channels % 9, i % channels);
                    c.weight[(o * channels + ch) * 9 + tap]
                })
                .collect(),
        };
        let conv = Packed::from_outputs_major(&weight, c.bias, outputs, 9 * channels)?;
        Some((Strided { conv, channels }, c.output))
    }

    fn depthwise(&self, node: &NodeProto, x: &str, channels: usize, stride: i64) -> Option<(Depthwise, String)> {
        let c = self.conv(node, x, ConvShape { pad: 1, stride, group: channels })?;
        if c.dims != [channels, 1, 3, 3] {
            return None;
        }
        let weight = &c.weight;
        let taps = (0..9).flat_map(|tap| (0..channels).map(move |ch| weight[ch * 9 + tap])).collect();
        Some((Depthwise { taps, bias: c.bias }, c.output))
    }

    /// `Mul(Mul(x, Add(Erf(Div(x, sqrt 2)), 1)), 0.5)` as exported by PyTorch: its output.
    fn gelu(&self, ops: &[&NodeProto], x: &str) -> Option<String> {
        let [div, erf, add, mul, half] = ops else { return None };
        let out = |n: &NodeProto| n.output.first().cloned();
        let other = |n: &NodeProto, known: &str| -> Option<String> {
            match &n.input[..] {
                [a, b] if a == known => Some(b.clone()),
                [a, b] if b == known => Some(a.clone()),
                _ => None,
            }
        };
        let is = |v: Option<f32>, want: f32| v.is_some_and(|v| (v - want).abs() <= 1e-6 * want.abs().max(1.0));
        let ok = div.op_type == "Div"
            && div.input.first().map(String::as_str) == Some(x)
            && is(div.input.get(1).and_then(|c| self.scalar(c)), std::f32::consts::SQRT_2)
            && erf.op_type == "Erf"
            && erf.input == [out(div)?]
            && add.op_type == "Add"
            && is(self.scalar(&other(add, &out(erf)?)?), 1.0)
            && mul.op_type == "Mul"
            && other(mul, x)? == out(add)?
            && half.op_type == "Mul"
            && is(self.scalar(&other(half, &out(mul)?)?), 0.5);
        ok.then(|| out(half)).flatten()
    }
}

fn sorted(names: &[String]) -> Vec<&str> {
    let mut v: Vec<&str> = names.iter().map(String::as_str).collect();
    v.sort_unstable();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transposes_both_ways() {
        let (rows, cols) = (37, 70);
        let m: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
        let mut t = vec![0.0; m.len()];
        transpose(&m, rows, cols, &mut t);
        assert_eq!(t[5 * rows + 3], m[3 * cols + 5]);
        let mut back = vec![0.0; m.len()];
        transpose(&t, cols, rows, &mut back);
        assert_eq!(back, m);
    }
}
