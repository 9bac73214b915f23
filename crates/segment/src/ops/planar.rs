//! A 3x3 depthwise convolution with stride 2 or 1 and padding 1 on channel-major planes,
//! its bias and a GELU after it folded in: TinyViT's patch merges (MobileSAM's encoder, three
//! of them, the last with stride 1). tract ran them through its generic depthwise path, one
//! output value at a time, at ~3 GFLOP/s: the last op of the encoder still tract's
//! (docs/performance.md §6m). Here
//! each input row is regrouped once into the three columns each output reads, so that every
//! tap is a plain multiply-add along a contiguous output row.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::cnn::{Conv, KernelFormat, PaddingSpec};
use tract_onnx::tract_core::ops::nn::DataFormat;

use crate::kernels::conv::gelu;

#[derive(Clone, PartialEq, Eq)]
pub struct StridedDepthwise {
    /// The input's shape (`[c, h, w]` or `[1, c, h, w]`).
    input: TVec<usize>,
    channels: usize,
    size: [usize; 2],
    stride: usize,
    /// `[channel][3][3]` taps, then a bias per channel (as bits, for `Eq`).
    taps: Vec<u32>,
    bias: Vec<u32>,
    gelu: bool,
}

impl std::fmt::Debug for StridedDepthwise {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let [h, w] = self.size;
        let gelu = if self.gelu { ", GELU" } else { "" };
        write!(f, "StridedDepthwise({}x{h}x{w}, stride {}{gelu})", self.channels, self.stride)
    }
}

impl Op for StridedDepthwise {
    fn name(&self) -> StaticName {
        "StridedDepthwise".into()
    }

    op_as_typed_op!();
}

impl EvalOp for StridedDepthwise {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let Some(input) = inputs.first() else { bail!("StridedDepthwise: no input") };
        if input.shape() != &*self.input {
            bail!("StridedDepthwise: input {:?}, planned for {:?}", input.shape(), self.input);
        }
        // `run` writes every output element.
        super::eval_filled(input, &self.output_shape(), |a, out| self.run(a, out))
    }
}

impl TypedOp for StridedDepthwise {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let Some(input) = inputs.first() else { bail!("StridedDepthwise: no input") };
        if input.shape.as_concrete() != Some(&*self.input) {
            bail!("StridedDepthwise: input {:?}, planned for {:?}", input.shape, self.input);
        }
        Ok(tvec!(f32::fact(self.output_shape())))
    }

    as_op!();
}

/// Output positions of a 3-tap, padding-1 axis of `n` inputs.
fn outputs(n: usize, stride: usize) -> usize {
    n.div_ceil(stride)
}

impl StridedDepthwise {
    fn output_shape(&self) -> TVec<usize> {
        let mut shape = self.input.clone();
        let rank = shape.len();
        shape[rank - 2] = outputs(self.size[0], self.stride);
        shape[rank - 1] = outputs(self.size[1], self.stride);
        shape
    }

    fn run(&self, input: &[f32], out: &mut [f32]) {
        let ([h, w], s) = (self.size, self.stride);
        let (oh, ow) = (outputs(h, s), outputs(w, s));
        // Columns sx - 1, sx and sx + 1 of one input row for x in 0..ow, zero past an edge:
        // three contiguous rows, so that the taps' loop vectorises.
        let mut columns = [vec![0f32; ow], vec![0f32; ow], vec![0f32; ow]];
        let planes = input.chunks_exact(h * w).zip(out.chunks_exact_mut(oh * ow));
        for (c, (plane, dst)) in planes.enumerate() {
            let taps: [f32; 9] = std::array::from_fn(|i| f32::from_bits(self.taps[c * 9 + i]));
            let bias = f32::from_bits(self.bias[c]);
            for (y, row) in dst.chunks_exact_mut(ow).enumerate() {
                row.fill(bias);
                for ky in 0..3 {
                    let Some(iy) = (s * y + ky).checked_sub(1).filter(|&iy| iy < h) else { continue };
                    regroup(&plane[iy * w..][..w], s, &mut columns);
                    let [left, mid, right] = &columns;
                    let [t0, t1, t2] = [taps[ky * 3], taps[ky * 3 + 1], taps[ky * 3 + 2]];
                    for (((o, l), m), r) in row.iter_mut().zip(left).zip(mid).zip(right) {
                        *o += t0 * l + t1 * m + t2 * r;
                    }
                }
                if self.gelu {
                    gelu(row);
                }
            }
        }
    }
}

/// `[left, mid, right][x]` = `src[s x - 1]`, `src[s x]`, `src[s x + 1]` (0 outside `src`).
fn regroup(src: &[f32], s: usize, [left, mid, right]: &mut [Vec<f32>; 3]) {
    let n = mid.len();
    if s == 1 {
        mid.copy_from_slice(src);
        right[..n - 1].copy_from_slice(&src[1..]);
        right[n - 1] = 0.0;
        left[1..].copy_from_slice(&src[..n - 1]);
    } else {
        // Pairs (2x, 2x + 1) while both exist; an odd row's last column has no right.
        let pairs = src.chunks_exact(2);
        let last = pairs.remainder().first().copied();
        for ((m, r), pair) in mid.iter_mut().zip(right.iter_mut()).zip(pairs) {
            *m = pair[0];
            *r = pair[1];
        }
        if let Some(v) = last {
            mid[n - 1] = v;
            right[n - 1] = 0.0;
        }
        left[1..].copy_from_slice(&right[..n - 1]);
    }
    left[0] = 0.0;
}

/// Replaces each suitable depthwise `Conv` (and the GELU after it).
pub fn replace_strided_depthwise(model: TypedModel) -> TractResult<TypedModel> {
    super::replace_each::<Conv, _>(model, "strided", strided_for)
}

fn strided_for(model: &TypedModel, id: usize) -> TractResult<Option<(StridedDepthwise, OutletId)>> {
    let node = model.node(id);
    let Some(conv) = node.op_as::<Conv>() else { return Ok(None) };
    let spec = &conv.pool_spec;
    let channels = spec.input_channels;
    let suitable = conv.q_params.is_none()
        && conv.kernel_fmt == KernelFormat::OIHW
        && matches!(spec.data_format, DataFormat::CHW | DataFormat::NCHW)
        && conv.group == channels
        && spec.output_channels == channels
        && *spec.kernel_shape == [3, 3]
        && matches!(*spec.strides(), [2, 2] | [1, 1])
        && spec.dilations().iter().all(|&d| d == 1)
        && spec.padding == PaddingSpec::Explicit(tvec![1, 1], tvec![1, 1])
        && node.inputs.len() == 3;
    if !suitable {
        return Ok(None);
    }
    let Some(input) = model.outlet_fact(node.inputs[0])?.shape.as_concrete().map(TVec::from) else {
        return Ok(None);
    };
    let size = match (&input[..], spec.data_format) {
        ([c, h, w], DataFormat::CHW) | ([1, c, h, w], DataFormat::NCHW) if *c == channels && *h > 0 && *w > 0 => {
            [*h, *w]
        }
        _ => return Ok(None),
    };
    let (Some(kernel), Some(bias)) =
        (model.outlet_fact(node.inputs[1])?.konst.clone(), model.outlet_fact(node.inputs[2])?.konst.clone())
    else {
        return Ok(None);
    };
    let f32s = kernel.datum_type() == f32::datum_type() && bias.datum_type() == f32::datum_type();
    if !f32s || kernel.shape() != [channels, 1, 3, 3] || bias.len() != channels {
        return Ok(None);
    }
    let bits = |t: &Tensor| -> TractResult<Vec<u32>> {
        Ok(t.try_as_plain_ram()?.as_slice::<f32>()?.iter().map(|v| v.to_bits()).collect())
    };
    let own = OutletId::new(id, 0);
    let after = super::dense::gelu_after(model, own)?;
    let op = StridedDepthwise {
        input,
        channels,
        size,
        stride: spec.strides()[0],
        taps: bits(&kernel)?,
        bias: bits(&bias)?,
        gelu: after.is_some(),
    };
    Ok(Some((op, after.unwrap_or(own))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::{max_abs_diff, noise};
    use tract_onnx::tract_core::ops::cnn::PoolSpec;
    use tract_onnx::tract_core::ops::element_wise::ElementWiseOp;
    use tract_onnx::tract_core::ops::nn::GeluExact;

    /// A patch merge's depthwise convolution as tract declutters it, then its GELU.
    fn merge(channels: usize, [h, w]: [usize; 2], stride: usize, with_gelu: bool) -> TractResult<TypedModel> {
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact([1, channels, h, w]))?;
        let kernel = Tensor::from_shape(&[channels, 1, 3, 3], &noise(channels * 9, 4))?;
        let bias = Tensor::from_shape(&[channels], &noise(channels, 8))?;
        let conv = Conv {
            pool_spec: PoolSpec {
                data_format: DataFormat::NCHW,
                kernel_shape: tvec![3, 3],
                padding: PaddingSpec::Explicit(tvec![1, 1], tvec![1, 1]),
                dilations: None,
                strides: Some(tvec![stride, stride]),
                input_channels: channels,
                output_channels: channels,
            },
            kernel_fmt: KernelFormat::OIHW,
            group: channels,
            q_params: None,
        };
        let (k, b) = (model.add_const("k", kernel)?, model.add_const("b", bias)?);
        let mut y = model.wire_node("conv", conv, &[x, k, b])?;
        if with_gelu {
            y = model.wire_node("gelu", ElementWiseOp(Box::new(GeluExact {}), None), &y)?;
        }
        model.select_output_outlets(&y)?;
        Ok(model)
    }

    fn run(model: TypedModel, input: &Tensor) -> TractResult<Tensor> {
        Ok(model.into_runnable()?.run(tvec!(input.clone().into_tvalue()))?.remove(0).into_tensor())
    }

    #[test]
    fn a_patch_merges_depthwise_convolution_matches_tracts() -> TractResult<()> {
        // Even and odd sizes (an odd edge has no right-hand neighbour), with and without
        // GELU, both strides (the last merge keeps its size).
        let cases = [(8, [16, 16], 2, true), (5, [7, 9], 2, false), (3, [1, 2], 2, true), (6, [9, 8], 1, true)];
        for (channels, size, stride, with_gelu) in cases {
            let model = merge(channels, size, stride, with_gelu)?;
            let input = Tensor::from_shape(&[1, channels, size[0], size[1]], &noise(channels * size[0] * size[1], 2))?;
            let theirs = run(model.clone(), &input)?;
            let ours_model = replace_strided_depthwise(model)?;
            let order = ours_model.eval_order()?;
            let ops: Vec<String> = order.iter().map(|&n| ours_model.node(n).op.name().to_string()).collect();
            assert_eq!(ops, ["Source", "StridedDepthwise"], "{size:?}");
            let ours = run(ours_model, &input)?;
            let diff = max_abs_diff(&theirs, &ours)?;
            assert!(diff < 1e-5, "{channels}x{size:?}, GELU {with_gelu}: max |diff| {diff}");
        }
        Ok(())
    }
}
