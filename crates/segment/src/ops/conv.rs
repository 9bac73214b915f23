//! Stride-1 convolutions (any kernel size, dilation and padding, one group) run through our
//! product kernel (kernels/gemm.rs) instead of tract's im2col and matrix product.
//!
//! U²-Net-p is 119 such 3x3 convolutions (dilations 1 to 8), each followed by a ReLU; the
//! MobileSAM encoder has 1x1 ones between its stages and a 3x3 in its neck. tract packs an
//! im2col copy of the input for every product. Here the input is turned pixel-major a band
//! of rows at a time, with its zero padding around it, and each kernel tap's rows are read
//! in place from that band (`gemm_taps`): one pixel's inputs for tap (ky, kx) are the
//! band's `channels` values at that pixel shifted by the tap, so no im2col copy is made.
//! The bias, and a following ReLU when the convolution is its only input, are applied on
//! the way back to channel-major order. A convolution of a channel concatenation (U²-Net-p's
//! decoder stages, 50 of them) reads each part into its channels of the band: the
//! concatenation is never made (measured: 15 ms of concatenations and, at full size, two
//! split convolutions and their sum replaced by one, docs/performance.md §6n).

use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::array::TypedConcat;
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::cnn::{Conv, KernelFormat};
use tract_onnx::tract_core::ops::nn::DataFormat;

use super::winograd;
use crate::kernels::conv::PlaneConv;
use crate::kernels::gemm::{gemm_taps, Packed, Rows, PANEL};
use crate::kernels::transpose::transpose;

/// The input band (pixel-major, padded) is kept near this size (bytes): it is read once per
/// kernel tap and output panel, so it should stay in L2.
const BAND_BYTES: usize = 384 << 10;
/// 3x3 convolutions (dilation 1) with at least this many input channels go through
/// Winograd (ops/winograd.rs); narrower ones stay on the tap path, where the product's
/// depth (9 x channels) keeps the kernel busier than the transforms would.
const WINOGRAD_MIN_CHANNELS: usize = 32;
/// Planes of at least this many pixels run as F(4x4, 3x3), smaller ones as F(2x2, 3x3):
/// the larger tile's kernels take 36/16 the memory, and in U²-Net-p the small planes hold
/// most of the weights and little of the time (docs/performance.md §6o).
const WINOGRAD_F4_MIN_PIXELS: usize = 160 * 160;

/// The shape of one convolution: stride 1, one group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Shape {
    channels: usize,
    outputs: usize,
    kernel: [usize; 2],
    dilation: [usize; 2],
    /// Zero padding: top, bottom, left, right.
    pads: [usize; 4],
}

impl Shape {
    /// Output height and width for an input of `[height, width]`.
    fn output(&self, [height, width]: [usize; 2]) -> Option<[usize; 2]> {
        let [top, bottom, left, right] = self.pads;
        let reach = |k: usize, d: usize| d * (k - 1);
        let h = (height + top + bottom).checked_sub(reach(self.kernel[0], self.dilation[0]))?;
        let w = (width + left + right).checked_sub(reach(self.kernel[1], self.dilation[1]))?;
        (h > 0 && w > 0).then_some([h, w])
    }
}

/// The kernel, packed for one of the two ways of running the convolution.
enum Weights {
    /// `[kernel tap][channel]` x outputs (padded to whole panels), with the bias.
    Taps(Packed),
    /// Winograd's 16 transformed kernels (3x3, dilation 1, wide enough).
    Winograd(winograd::Weights),
    /// One output channel (U2-Net-p's side outputs): `[channel][tap]` and the bias, run
    /// plane by plane (kernels/conv.rs `PlaneConv`): through the product kernel one output
    /// filled 1 of a panel's 16 or 32 columns (20 ms for 118 MFLOP at 320x320).
    Single(Vec<f32>, f32),
}

impl Weights {
    /// Outputs per product row (padded to whole panels).
    fn outputs(&self) -> usize {
        match self {
            Weights::Taps(w) => w.outputs,
            Weights::Winograd(w) => w.outputs(),
            Weights::Single(..) => 1,
        }
    }
}

#[derive(Clone)]
pub struct DirectConv {
    shape: Shape,
    weight: Arc<Weights>,
    relu: bool,
    /// The channels of each input: one input, or the parts of a channel concatenation read
    /// where they are (U²-Net-p's decoder stages convolve the concatenation of two maps).
    parts: TVec<usize>,
}

impl std::fmt::Debug for DirectConv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = &self.shape;
        write!(
            f,
            "DirectConv({}{}->{}, {:?} dilation {:?}, pads {:?}{}{})",
            s.channels,
            if self.parts.len() > 1 { format!(" in parts {:?}", self.parts) } else { String::new() },
            s.outputs,
            s.kernel,
            s.dilation,
            s.pads,
            if self.relu { ", relu" } else { "" },
            match &*self.weight {
                Weights::Winograd(w) => format!(", winograd {:?}", w.form()),
                _ => String::new(),
            }
        )
    }
}

/// Two ops are the same when they share their weights.
impl PartialEq for DirectConv {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.weight, &other.weight)
            && self.shape == other.shape
            && self.relu == other.relu
            && self.parts == other.parts
    }
}

impl Eq for DirectConv {}

impl Op for DirectConv {
    fn name(&self) -> StaticName {
        "DirectConv".into()
    }

    op_as_typed_op!();
}

impl EvalOp for DirectConv {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let shapes: Vec<&[usize]> = inputs.iter().map(|i| i.shape()).collect();
        let out_shape = self.output_shape(&shapes)?;
        let Some(input) = inputs.first() else { bail!("DirectConv: no input") };
        let rank = input.rank();
        let size = [input.shape()[rank - 2], input.shape()[rank - 1]];
        let views = inputs.iter().map(|i| i.try_as_plain_ram()).collect::<TractResult<Vec<_>>>()?;
        let parts = views.iter().map(|v| v.as_slice::<f32>()).collect::<TractResult<Vec<_>>>()?;
        // SAFETY: `run` writes every output element.
        let mut output = unsafe { Tensor::uninitialized::<f32>(&out_shape)? };
        {
            let mut out_view = output.try_as_plain_ram_mut()?;
            self.run(&parts, size, out_view.as_slice_mut::<f32>()?);
        }
        Ok(tvec!(output.into_tvalue()))
    }
}

impl TypedOp for DirectConv {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let shapes = inputs
            .iter()
            .map(|i| i.shape.as_concrete().with_context(|| format!("DirectConv: symbolic input {:?}", i.shape)))
            .collect::<TractResult<Vec<_>>>()?;
        Ok(tvec!(f32::fact(self.output_shape(&shapes)?)))
    }

    as_op!();
}

impl DirectConv {
    /// `[1,] C, H, W` (each part's C) → `[1,] outputs, H', W'`.
    fn output_shape(&self, inputs: &[&[usize]]) -> TractResult<TVec<usize>> {
        let Some(&input) = inputs.first() else { bail!("DirectConv: no input") };
        let rank = input.len();
        let batch_ok = rank == 3 || (rank == 4 && input[0] == 1);
        let part_ok = |(shape, &c): (&&[usize], &usize)| {
            shape.len() == rank
                && shape[rank - 3] == c
                && shape[..rank - 3] == input[..rank - 3]
                && shape[rank - 2..] == input[rank - 2..]
        };
        if !batch_ok || inputs.len() != self.parts.len() || !inputs.iter().zip(&self.parts).all(part_ok) {
            bail!("DirectConv: inputs {inputs:?} are not [1,] C, H, W with C {:?}", self.parts);
        }
        let Some([h, w]) = self.shape.output([input[rank - 2], input[rank - 1]]) else {
            bail!("DirectConv: input {input:?} is smaller than the kernel's reach")
        };
        let mut shape: TVec<usize> = input.into();
        shape[rank - 3] = self.shape.outputs;
        shape[rank - 2] = h;
        shape[rank - 1] = w;
        Ok(shape)
    }

    /// Whether it runs as Winograd (either form).
    pub fn is_winograd(&self) -> bool {
        matches!(*self.weight, Weights::Winograd(_))
    }

    /// The convolution of `inputs` (each `[its channels][height][width]`, together the
    /// channels in order) into `out` (`[outputs][H'][W']`), a band of output rows at a time
    /// (a multiple of Winograd's tile, which makes them m by m).
    fn run(&self, inputs: &[&[f32]], [height, width]: [usize; 2], out: &mut [f32]) {
        let s = &self.shape;
        let Some([out_h, out_w]) = s.output([height, width]) else { return };
        if let Weights::Single(weights, bias) = &*self.weight {
            // Planned with one input only (a single output plane never reads parts).
            let [input] = inputs else { return };
            let conv = PlaneConv {
                input,
                size: [height, width],
                weights,
                kernel: s.kernel,
                dilation: s.dilation,
                top_left: [s.pads[0], s.pads[2]],
                bias: *bias,
                relu: self.relu,
            };
            return conv.run(out, [out_h, out_w]);
        }
        let [top, _, left, right] = s.pads;
        let (c, padded_w) = (s.channels, width + left + right);
        let halo = s.dilation[0] * (s.kernel[0] - 1);
        let step = match &*self.weight {
            Weights::Winograd(w) => w.form().tile(),
            _ => 1,
        };
        let band = (BAND_BYTES / (padded_w * c * 4)).saturating_sub(halo).max(halo).max(4).min(out_h);
        let band = band.next_multiple_of(step);
        let n = self.weight.outputs();
        // A tap's offset in the band, for output row 0 of the band.
        let taps: Vec<usize> = (0..s.kernel[0] * s.kernel[1])
            .map(|t| ((t / s.kernel[1]) * s.dilation[0] * padded_w + (t % s.kernel[1]) * s.dilation[1]) * c)
            .collect();
        let mut shifted = taps.clone();
        let plane = out_h * out_w;
        let row = padded_w * c;
        SCRATCH.with_borrow_mut(|[pixels, product]| {
            // Every element used is written before it is read (padding included).
            pixels.resize((band + halo) * row, 0.0);
            product.resize(step * out_w.next_multiple_of(step) * n, 0.0);
            for y0 in (0..out_h).step_by(band) {
                let rows = band.min(out_h - y0);
                // Winograd's last tile of a height not a multiple of m reads rows past the input's.
                let filled = rows.next_multiple_of(step) + halo;
                for (j, dst) in pixels.chunks_exact_mut(row).take(filled).enumerate() {
                    let Some(y) = (y0 + j).checked_sub(top).filter(|&y| y < height) else {
                        dst.fill(0.0);
                        continue;
                    };
                    dst[..left * c].fill(0.0);
                    dst[(left + width) * c..].fill(0.0);
                    let mut first = 0;
                    for (input, &part) in inputs.iter().zip(&self.parts) {
                        let channels = &input[y * width..];
                        transpose(channels, height * width, &mut dst[left * c + first..], c, [part, width]);
                        first += part;
                    }
                }
                for ry in (0..rows).step_by(step) {
                    let made = match &*self.weight {
                        Weights::Taps(w) => {
                            shifted.iter_mut().zip(&taps).for_each(|(s, t)| *s = t + ry * row);
                            let from = Rows { a: pixels, count: out_w, stride: c, step: 1, taps: &shifted };
                            gemm_taps(from, w, &mut product[..out_w * n]);
                            1
                        }
                        // Runs plane by plane (returned above): never banded.
                        Weights::Single(..) => 0,
                        Weights::Winograd(w) => {
                            w.rows(&pixels[ry * row..], padded_w, product);
                            step.min(rows - ry)
                        }
                    };
                    let per_row = product.len() / step;
                    for (k, made_row) in product.chunks_exact_mut(per_row).take(made).enumerate() {
                        if self.relu {
                            made_row.iter_mut().for_each(|v| *v = v.max(0.0));
                        }
                        let y = y0 + ry + k;
                        transpose(made_row, n, &mut out[y * out_w..], plane, [out_w, s.outputs]);
                    }
                }
            }
        });
    }
}

thread_local! {
    /// The band of input rows and one row's product, kept between runs: fresh buffers
    /// of this size cost page faults and zeroing on every convolution.
    static SCRATCH: std::cell::RefCell<[Vec<f32>; 2]> = const { std::cell::RefCell::new([Vec::new(), Vec::new()]) };
}

/// Frees this thread's buffers (at the end of a run: [`super::RunScope`]); the bytes they held.
pub(crate) fn release_scratch() -> usize {
    SCRATCH.take().iter().map(|v| v.capacity() * size_of::<f32>()).sum()
}

/// Replaces each suitable `Conv` (and the ReLU after it) of a decluttered model.
pub fn replace_convs(mut model: TypedModel) -> TractResult<TypedModel> {
    let candidates: Vec<usize> = model.nodes().iter().filter(|n| n.op_is::<Conv>()).map(|n| n.id).collect();
    for id in candidates {
        let Some((Planned { conv, inputs }, replaced)) = direct_for(&model, id)? else { continue };
        let name = format!("{}.direct", model.node(id).name);
        let mut patch = TypedModelPatch::default();
        let taps = inputs.iter().map(|&i| patch.tap_model(&model, i)).collect::<TractResult<Vec<_>>>()?;
        let out = patch.wire_node(name, conv, &taps)?;
        patch.shunt_outside(&model, replaced, out[0])?;
        patch.apply(&mut model)?;
    }
    Ok(model)
}

/// When `outlet` is a channel concatenation (axis 1 of NCHW, 0 of CHW) of f32 maps read by
/// one node only: its inputs and their channel counts.
fn concat_parts(model: &TypedModel, outlet: OutletId) -> TractResult<Option<(Vec<OutletId>, TVec<usize>)>> {
    let node = model.node(outlet.node);
    let Some(concat) = node.op_as::<TypedConcat>() else { return Ok(None) };
    let rank = model.outlet_fact(outlet)?.rank();
    let alone = model.outlet_successors(outlet).len() == 1 && !model.output_outlets()?.contains(&outlet);
    if !alone || rank < 3 || concat.axis != rank - 3 || node.inputs.len() < 2 {
        return Ok(None);
    }
    let mut parts = TVec::new();
    for input in &node.inputs {
        let fact = model.outlet_fact(*input)?;
        match fact.shape.as_concrete() {
            Some(shape) if fact.datum_type == f32::datum_type() && shape.len() == rank => parts.push(shape[rank - 3]),
            _ => return Ok(None),
        }
    }
    Ok(Some((node.inputs.to_vec(), parts)))
}

/// A convolution to plan, and what it reads: the node's input, or a concatenation's parts.
struct Planned {
    conv: DirectConv,
    inputs: Vec<OutletId>,
}

/// The op for node `id` with its inputs, and the outlet it stands for (the ReLU's, when
/// folded).
fn direct_for(model: &TypedModel, id: usize) -> TractResult<Option<(Planned, OutletId)>> {
    let node = model.node(id);
    let Some(conv) = node.op_as::<Conv>() else { return Ok(None) };
    let spec = &conv.pool_spec;
    let suitable = conv.group == 1
        && conv.q_params.is_none()
        && conv.kernel_fmt == KernelFormat::OIHW
        && matches!(spec.data_format, DataFormat::NCHW | DataFormat::CHW)
        && spec.kernel_shape.len() == 2
        && spec.strides().iter().all(|&s| s == 1)
        && node.inputs.len() == 3;
    if !suitable {
        return Ok(None);
    }
    let fact = model.outlet_fact(node.inputs[0])?;
    let Some(in_shape) = fact.shape.as_concrete() else { return Ok(None) };
    let rank = in_shape.len();
    let batch_ok = (spec.data_format == DataFormat::NCHW && rank == 4 && in_shape[0] == 1)
        || (spec.data_format == DataFormat::CHW && rank == 3);
    if fact.datum_type != f32::datum_type() || !batch_ok {
        return Ok(None);
    }
    let (Some(kernel), Some(bias)) =
        (model.outlet_fact(node.inputs[1])?.konst.clone(), model.outlet_fact(node.inputs[2])?.konst.clone())
    else {
        return Ok(None);
    };
    let dims = kernel.shape();
    if kernel.datum_type() != f32::datum_type() || bias.datum_type() != f32::datum_type() || dims.len() != 4 {
        return Ok(None);
    }
    let (outputs, channels) = (dims[0], dims[1]);
    let padding = spec.computed_padding(&in_shape[rank - 2..]);
    let dilation = spec.dilations();
    let shape = Shape {
        channels,
        outputs,
        kernel: [dims[2], dims[3]],
        dilation: [dilation[0], dilation[1]],
        pads: [padding[0].pad_before, padding[0].pad_after, padding[1].pad_before, padding[1].pad_after],
    };
    if channels != in_shape[rank - 3] || shape.output([in_shape[rank - 2], in_shape[rank - 1]]).is_none() {
        return Ok(None);
    }
    let bias = {
        let view = bias.try_as_plain_ram()?;
        let values = view.as_slice::<f32>()?;
        match values.len() {
            n if n == outputs => values.to_vec(),
            1 => vec![values[0]; outputs],
            _ => return Ok(None),
        }
    };
    let pixels = in_shape[rank - 2] * in_shape[rank - 1];
    let Some(weight) = pack(&kernel, bias, &shape, pixels)? else { return Ok(None) };
    let relu = relu_after(model, id)?;
    let replaced = OutletId::new(relu.unwrap_or(id), 0);
    // The parts of a concatenated input are read where they are, never concatenated (a
    // single output plane reads one contiguous input).
    let (inputs, parts) = match concat_parts(model, node.inputs[0])? {
        Some((inputs, parts)) if !matches!(weight, Weights::Single(..)) => (inputs, parts),
        _ => (vec![node.inputs[0]], tvec![channels]),
    };
    let conv = DirectConv { shape, weight: Arc::new(weight), relu: relu.is_some(), parts };
    Ok(Some((Planned { conv, inputs }, replaced)))
}

/// Whether `shape` runs as Winograd.
fn winograd_suits(shape: &Shape) -> bool {
    shape.kernel == [3, 3]
        && shape.dilation == [1, 1]
        && shape.channels >= WINOGRAD_MIN_CHANNELS
        && shape.outputs.is_multiple_of(PANEL)
}

/// The `OIHW` kernel for Winograd where it suits (in the form for a plane of `pixels`),
/// else as `[tap][channel]` x outputs, outputs padded with zeros to whole panels.
fn pack(kernel: &Tensor, mut bias: Vec<f32>, shape: &Shape, pixels: usize) -> TractResult<Option<Weights>> {
    let view = kernel.try_as_plain_ram()?;
    let k = view.as_slice::<f32>()?;
    if shape.outputs == 1 {
        // OIHW with O = 1 is already `[channel][tap]`.
        return Ok(Some(Weights::Single(k.to_vec(), bias.first().copied().unwrap_or(0.0))));
    }
    if winograd_suits(shape) {
        let form = if pixels >= WINOGRAD_F4_MIN_PIXELS { winograd::Form::F4 } else { winograd::Form::F2 };
        if let Some(w) = winograd::Weights::new(k, &bias, shape.outputs, shape.channels, form) {
            return Ok(Some(Weights::Winograd(w)));
        }
    }
    let (c, taps) = (shape.channels, shape.kernel[0] * shape.kernel[1]);
    let n = shape.outputs.div_ceil(PANEL) * PANEL;
    let inputs = taps * c;
    let mut matrix = vec![0f32; inputs * n];
    for o in 0..shape.outputs {
        for ch in 0..c {
            for t in 0..taps {
                matrix[(t * c + ch) * n + o] = k[(o * c + ch) * taps + t];
            }
        }
    }
    bias.resize(n, 0.0);
    Ok(Packed::from_inputs_major(&matrix, bias, inputs, n).map(Weights::Taps))
}

/// When node `id`'s only reader is `max(x, 0)` (ONNX's Relu, as tract declutters it): its id.
fn relu_after(model: &TypedModel, id: usize) -> TractResult<Option<usize>> {
    let outlet = OutletId::new(id, 0);
    let [reader] = model.outlet_successors(outlet) else { return Ok(None) };
    let max = model.node(reader.node);
    let is_max = max.op_as::<TypedBinOp>().is_some_and(|op| op.0.name() == "Max");
    if !is_max || max.inputs.len() != 2 || model.output_outlets()?.contains(&outlet) {
        return Ok(None);
    }
    let other = model.outlet_fact(max.inputs[1 - reader.slot])?;
    let zero = other
        .konst
        .as_ref()
        .is_some_and(|c| c.datum_type() == f32::datum_type() && c.is_uniform() && c.is_all_zero().unwrap_or(false));
    let same_shape = model.outlet_fact(OutletId::new(max.id, 0))?.shape == model.outlet_fact(outlet)?.shape;
    Ok((zero && same_shape).then_some(max.id))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(i: u32) -> f32 {
        (i.wrapping_mul(2_654_435_761) >> 8) as f32 / (1u32 << 24) as f32 - 0.5
    }

    /// A model of one ONNX-style convolution (+ ReLU) as tract declutters it.
    fn model(shape: &Shape, size: [usize; 2], relu: bool) -> TractResult<TypedModel> {
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact([1, shape.channels, size[0], size[1]]))?;
        let y = wire_conv(&mut model, x, shape, relu)?;
        model.select_output_outlets(&y)?;
        Ok(model)
    }

    /// The same convolution of the channel concatenation of inputs of `parts` channels.
    fn concat_model(parts: &[usize], shape: &Shape, size: [usize; 2], relu: bool) -> TractResult<TypedModel> {
        let mut model = TypedModel::default();
        let mut inputs = Vec::new();
        for (i, &c) in parts.iter().enumerate() {
            inputs.push(model.add_source(format!("x{i}"), f32::fact([1, c, size[0], size[1]]))?);
        }
        let x = model.wire_node("concat", TypedConcat::new(1), &inputs)?[0];
        let y = wire_conv(&mut model, x, shape, relu)?;
        model.select_output_outlets(&y)?;
        Ok(model)
    }

    fn wire_conv(model: &mut TypedModel, x: OutletId, shape: &Shape, relu: bool) -> TractResult<TVec<OutletId>> {
        use tract_onnx::tract_core::ops::cnn::{PaddingSpec, PoolSpec};
        let taps = shape.kernel[0] * shape.kernel[1];
        let k: Vec<f32> = (0..shape.outputs * shape.channels * taps).map(|i| value(i as u32 ^ 5)).collect();
        let kernel = tensor1(&k).into_shape(&[shape.outputs, shape.channels, shape.kernel[0], shape.kernel[1]])?;
        let bias = tensor1(&(0..shape.outputs).map(|i| value(i as u32 + 9)).collect::<Vec<_>>());
        let [top, bottom, left, right] = shape.pads;
        let conv = Conv {
            pool_spec: PoolSpec {
                data_format: DataFormat::NCHW,
                kernel_shape: tvec![shape.kernel[0], shape.kernel[1]],
                padding: PaddingSpec::Explicit(tvec![top, left], tvec![bottom, right]),
                dilations: Some(tvec![shape.dilation[0], shape.dilation[1]]),
                strides: None,
                input_channels: shape.channels,
                output_channels: shape.outputs,
            },
            kernel_fmt: KernelFormat::OIHW,
            group: 1,
            q_params: None,
        };
        let k = model.add_const("k", kernel)?;
        let b = model.add_const("b", bias)?;
        let mut y = model.wire_node("conv", conv, &[x, k, b])?;
        if relu {
            let zero = model.add_const("zero", tensor0(0f32).broadcast_into_rank(4)?)?;
            y = model.wire_node("relu", tract_onnx::tract_core::ops::math::max(), &[y[0], zero])?;
        }
        Ok(y)
    }

    /// Within 5e-5 of tract's relative to the largest output (or 1 if that is smaller):
    /// Winograd's F(4x4, 3x3) rounds more than the direct sum, in proportion to the outputs
    /// (up to 1.6e-5 of them in these cases).
    fn assert_close(want: &[f32], got: &[f32], what: &str) {
        let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
        let worst = want.iter().zip(got).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst < 5e-5 * scale, "{what}: max |diff| {worst}, largest output {scale}");
    }

    fn run(model: TypedModel, input: &Tensor) -> TractResult<Tensor> {
        run_all(model, std::slice::from_ref(input))
    }

    fn run_all(model: TypedModel, inputs: &[Tensor]) -> TractResult<Tensor> {
        let plan = model.into_runnable()?;
        Ok(plan.run(inputs.iter().map(|i| i.clone().into_tvalue()).collect())?.remove(0).into_tensor())
    }

    #[test]
    fn a_concatenation_is_read_in_its_parts_and_matches_tracts() -> TractResult<()> {
        // (parts, outputs, dilation, relu): Winograd (U²-Net-p's 64 + 64 at full size), the
        // tap path with a dilation and an odd part, three parts; a single output plane
        // keeps its concatenation (it reads one contiguous input).
        let cases: [(&[usize], usize, usize, bool); 4] =
            [(&[64, 64], 64, 1, true), (&[16, 5], 16, 2, false), (&[8, 16, 8], 32, 1, true), (&[32, 32], 1, 1, false)];
        for (parts, outputs, d, relu) in cases {
            let channels = parts.iter().sum();
            let shape = Shape { channels, outputs, kernel: [3, 3], dilation: [d, d], pads: [d; 4] };
            let size = [9, 14];
            let tract = concat_model(parts, &shape, size, relu)?;
            let ours = replace_convs(tract.clone())?.into_decluttered()?;
            let read_in_parts = ours.nodes().iter().filter_map(|n| n.op_as::<DirectConv>()).map(|op| op.parts.to_vec());
            let want_parts = if outputs == 1 { vec![channels] } else { parts.to_vec() };
            assert_eq!(read_in_parts.collect::<Vec<_>>(), [want_parts], "{parts:?}");
            let concats = ours.nodes().iter().filter(|n| n.op_is::<TypedConcat>()).count();
            assert_eq!(concats, usize::from(outputs == 1), "{parts:?}: the concatenation is not made");
            let inputs: Vec<Tensor> = parts
                .iter()
                .enumerate()
                .map(|(p, &c)| {
                    let x: Vec<f32> = (0..c * size[0] * size[1]).map(|i| value((i * 7 + p) as u32) * 4.0).collect();
                    tensor1(&x).into_shape(&[1, c, size[0], size[1]])
                })
                .collect::<TractResult<_>>()?;
            let (want, got) = (run_all(tract, &inputs)?, run_all(ours, &inputs)?);
            let (want, got) = (want.try_as_plain_ram()?, got.try_as_plain_ram()?);
            let (want, got) = (want.as_slice::<f32>()?, got.as_slice::<f32>()?);
            assert!(want.len() == got.len(), "{parts:?}: {} values, want {}", got.len(), want.len());
            assert_close(want, got, &format!("{parts:?}"));
        }
        Ok(())
    }

    #[test]
    fn matches_tracts_convolution_for_every_shape_of_u2netp_and_more() -> TractResult<()> {
        // (channels, outputs, kernel, dilation, pads, size, relu): U²-Net-p's 3x3 "same"
        // convolutions at dilations 1..8, a partial output panel, 1x1, uneven pads and
        // kernels, an input smaller than the band's halo, and a row too wide for one band.
        let cases = [
            (16, 16, [3, 3], [1, 1], [1, 1, 1, 1], [11, 13], true),
            (32, 16, [3, 3], [2, 2], [2, 2, 2, 2], [9, 20], true),
            (16, 64, [3, 3], [8, 8], [8, 8, 8, 8], [10, 10], true),
            (3, 1, [3, 3], [1, 1], [1, 1, 1, 1], [7, 5], false),
            // One output plane, as U2-Net-p's side outputs (and dilated, uneven, with a ReLU).
            (64, 1, [3, 3], [1, 1], [1, 1, 1, 1], [20, 33], false),
            (5, 1, [2, 3], [1, 2], [0, 1, 2, 0], [8, 9], true),
            (20, 24, [1, 1], [1, 1], [0, 0, 0, 0], [6, 6], false),
            (5, 16, [2, 3], [1, 2], [0, 1, 2, 0], [8, 9], true),
            (64, 16, [3, 3], [1, 1], [1, 1, 1, 1], [40, 700], true),
            // The tap path over several bands whose halo is as tall as the band.
            (64, 24, [3, 3], [2, 2], [2, 2, 2, 2], [30, 200], true),
            // Winograd: odd and even sizes, uneven pads, several blocks of tiles a row, a
            // height that leaves a last lone row in a band.
            (32, 32, [3, 3], [1, 1], [1, 1, 1, 1], [9, 13], true),
            (48, 64, [3, 3], [1, 1], [0, 2, 1, 0], [7, 8], false),
            (128, 64, [3, 3], [1, 1], [1, 1, 1, 1], [33, 321], true),
            // F(4x4, 3x3) on large planes: a height and width not multiples of 4, uneven pads.
            (128, 64, [3, 3], [1, 1], [1, 1, 1, 1], [81, 321], true),
            (48, 64, [3, 3], [1, 1], [0, 2, 1, 0], [163, 158], false),
            (32, 16, [3, 3], [1, 1], [1, 1, 1, 1], [2, 1], false),
        ];
        for (channels, outputs, kernel, dilation, pads, size, relu) in cases {
            let shape = Shape { channels, outputs, kernel, dilation, pads };
            let tract = model(&shape, size, relu)?;
            let ours = replace_convs(tract.clone())?;
            let replaced = ours.nodes().iter().filter(|n| n.op_is::<DirectConv>()).count();
            let winograd = ours.nodes().iter().filter_map(|n| n.op_as::<DirectConv>()).any(DirectConv::is_winograd);
            assert_eq!(winograd, winograd_suits(&shape), "{shape:?}");
            let form = ours.nodes().iter().filter_map(|n| n.op_as::<DirectConv>()).find_map(|op| match &*op.weight {
                Weights::Winograd(w) => Some(w.form()),
                _ => None,
            });
            let large = size[0] * size[1] >= WINOGRAD_F4_MIN_PIXELS;
            let want_form = if large { winograd::Form::F4 } else { winograd::Form::F2 };
            assert!(form.is_none_or(|f| f == want_form), "{shape:?} on {size:?}: {form:?}");
            let left = ours.nodes().iter().filter(|n| n.op_is::<Conv>() || n.op_is::<TypedBinOp>()).count();
            assert_eq!((replaced, left), (1, 0), "{shape:?}: the conv and its ReLU are replaced");
            let x: Vec<f32> = (0..channels * size[0] * size[1]).map(|i| value(i as u32 * 3 + 1) * 4.0).collect();
            let x = tensor1(&x).into_shape(&[1, channels, size[0], size[1]])?;
            let (want, got) = (run(tract, &x)?, run(ours, &x)?);
            assert_eq!(want.shape(), got.shape(), "{shape:?}");
            let (want, got) = (want.try_as_plain_ram()?, got.try_as_plain_ram()?);
            let (want, got) = (want.as_slice::<f32>()?, got.as_slice::<f32>()?);
            assert_close(want, got, &format!("{shape:?} on {size:?}"));
            assert!(!relu || got.iter().all(|&v| v >= 0.0) && got.contains(&0.0), "{shape:?}: ReLU applied");
        }
        Ok(())
    }

    #[test]
    fn strided_and_grouped_convolutions_stay_tracts() -> TractResult<()> {
        let shape = Shape { channels: 4, outputs: 4, kernel: [3, 3], dilation: [1, 1], pads: [1, 1, 1, 1] };
        let mut strided = model(&shape, [8, 8], false)?;
        let mut grouped = strided.clone();
        for (m, edit) in [(&mut strided, 0), (&mut grouped, 1)] {
            let id = m.nodes().iter().find(|n| n.op_is::<Conv>()).map(|n| n.id).unwrap_or_default();
            let Some(conv) = m.node_mut(id).op_as_mut::<Conv>() else { bail!("no conv") };
            if edit == 0 {
                conv.pool_spec.strides = Some(tvec![2, 2]);
            } else {
                conv.group = 2;
            }
        }
        for m in [strided, grouped] {
            let ours = replace_convs(m)?;
            assert_eq!(ours.nodes().iter().filter(|n| n.op_is::<DirectConv>()).count(), 0);
        }
        Ok(())
    }

    #[test]
    fn a_runs_buffers_are_freed_when_its_scope_ends() -> TractResult<()> {
        // A thread of its own: its buffers are this test's alone. The Winograd path (64 + 64
        // channels, U²-Net-p's widest band) keeps buffers in two ops.
        let worker = std::thread::spawn(|| -> TractResult<()> {
            let shape = Shape { channels: 128, outputs: 64, kernel: [3, 3], dilation: [1, 1], pads: [1; 4] };
            let size = [12, 40];
            let plan = replace_convs(concat_model(&[64, 64], &shape, size, true)?)?.into_runnable()?;
            let input =
                || tensor1(&crate::ops::noise(64 * size[0] * size[1], 3)).into_shape(&[1, 64, size[0], size[1]]);
            let inputs = || -> TractResult<TVec<TValue>> { Ok(tvec![input()?.into_tvalue(), input()?.into_tvalue()]) };
            {
                let _run = crate::ops::run_scope();
                plan.run(inputs()?)?;
            }
            assert_eq!(crate::ops::release_scratch(), 0, "buffers still held after the run's scope ended");
            // Outside a scope they stay (so the figure above is not zero for want of any).
            plan.run(inputs()?)?;
            let kept = crate::ops::release_scratch();
            assert!(kept >= 64 * (size[1] + 2) * 4 * 4, "the run kept only {kept} bytes");
            Ok(())
        });
        worker.join().map_err(|_| format_err!("the worker panicked"))?
    }
}
