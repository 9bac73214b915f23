//! Transposed convolutions whose taps never overlap (kernel = stride, no padding, no
//! dilation: each input pixel becomes its own `kh x kw` patch of the output), run through
//! our product kernel.
//!
//! The SAM decoder upscales its mask features with two 2x2 stride-2 `ConvTranspose`s
//! (256 → 64 channels at 64x64, 64 → 32 at 128x128). tract lowers each into a product
//! that packs the activation and writes `[O x kh x kw][H x W]` whole, then scatters that
//! into the output (`DeconvSum`): about a fifth of the decoder's time. Here a block of
//! image rows is read in place from the channel-major input, multiplied by the kernel packed as
//! `[I][O x kh x kw]` (bias included), and each product column written into its place in
//! the output.
//!
//! The decoder's last upscaling feeds only the few-row product of ops/mix.rs (its 4 mask
//! tokens' weights times the 32 upscaled planes, 8 MB at 256x256): folded in, each block's
//! columns are mixed while they are in cache and only the 4 mixed planes are written.

use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::cnn::{Deconv, KernelFormat, PaddingSpec};
use tract_onnx::tract_core::ops::nn::DataFormat;

use crate::kernels::conv::gelu;
use crate::kernels::gemm::{gemm_taps, Packed, Rows, PANEL};
use crate::kernels::transpose::transpose;

use super::mix::PlaneMix;

/// Input pixels per block (rounded to whole image rows).
const BLOCK_PIXELS: usize = 256;

#[derive(Clone)]
pub struct PatchDeconv {
    /// `[1,] I, H, W` (the only input shape it was planned for).
    input: TVec<usize>,
    outputs: usize,
    kernel: [usize; 2],
    /// `[I][O x kh x kw]`, columns padded to whole panels, with the bias.
    weight: Arc<Packed>,
    /// The exact GELU after it (the SAM decoder's last upscaling), applied to each block's
    /// product while it is in cache.
    gelu: bool,
    /// The few-row product of its output folded in: a second input then holds the
    /// `rows x outputs` weights, and the output is the mixed planes.
    mix: Option<Mix>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Mix {
    rows: usize,
    output: TVec<usize>,
}

impl std::fmt::Debug for PatchDeconv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PatchDeconv({:?} -> {} channels, {:?} patches", self.input, self.outputs, self.kernel)?;
        write!(f, "{}", if self.gelu { ", GELU" } else { "" })?;
        match &self.mix {
            Some(mix) => write!(f, ", mixed into {} planes)", mix.rows),
            None => write!(f, ")"),
        }
    }
}

/// Two ops are the same when they share their weights.
impl PartialEq for PatchDeconv {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.weight, &other.weight) && self.input == other.input && self.mix == other.mix
    }
}

impl Eq for PatchDeconv {}

impl Op for PatchDeconv {
    fn name(&self) -> StaticName {
        "PatchDeconv".into()
    }

    op_as_typed_op!();
}

impl EvalOp for PatchDeconv {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let Some(input) = inputs.first() else { bail!("PatchDeconv: no input") };
        if input.shape() != &*self.input {
            bail!("PatchDeconv: input {:?}, planned for {:?}", input.shape(), self.input);
        }
        // `run` writes every output element: each belongs to exactly one input pixel's patch.
        let Some(mix) = &self.mix else {
            return super::eval_filled(input, &self.output_shape(), |x, out| self.run(x, None, out));
        };
        let Some(weights) = inputs.get(1) else { bail!("PatchDeconv: no mixing weights") };
        if weights.len() != mix.rows * self.outputs {
            bail!("PatchDeconv: {} mixing weights for {} x {}", weights.len(), mix.rows, self.outputs);
        }
        let view = weights.try_as_plain_ram()?;
        let weights = view.as_slice::<f32>()?;
        super::eval_filled(input, &mix.output, |x, out| self.run(x, Some(weights), out))
    }
}

impl TypedOp for PatchDeconv {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let Some(input) = inputs.first() else { bail!("PatchDeconv: no input") };
        if input.shape.as_concrete() != Some(&*self.input) {
            bail!("PatchDeconv: input {:?}, planned for {:?}", input.shape, self.input);
        }
        match &self.mix {
            Some(mix) => Ok(tvec!(f32::fact(mix.output.clone()))),
            None => Ok(tvec!(f32::fact(self.output_shape()))),
        }
    }

    as_op!();
}

impl PatchDeconv {
    fn output_shape(&self) -> TVec<usize> {
        let rank = self.input.len();
        let mut shape = self.input.clone();
        shape[rank - 3] = self.outputs;
        shape[rank - 2] *= self.kernel[0];
        shape[rank - 1] *= self.kernel[1];
        shape
    }

    /// The output planes (or, with `mix` weights, the mixed ones) into `out`.
    fn run(&self, input: &[f32], mix: Option<&[f32]>, out: &mut [f32]) {
        let rank = self.input.len();
        let (height, width) = (self.input[rank - 2], self.input[rank - 1]);
        let [kh, kw] = self.kernel;
        let (pixels, n, patch, outputs) = (height * width, self.weight.outputs, kh * kw, self.outputs);
        let out_w = width * kw;
        let plane = height * kh * out_w;
        let block = (BLOCK_PIXELS / width).max(1) * width;
        // A block's values of one output plane at patch position `t` into their places.
        let place = |out: &mut [f32], values: &[f32], p0: usize, t: usize| {
            let (dy, dx) = (t / kw, t % kw);
            for (row, values) in values.chunks_exact(width).enumerate() {
                let y = p0 / width + row;
                let dst = &mut out[(y * kh + dy) * out_w + dx..];
                for (x, &v) in values.iter().enumerate() {
                    dst[x * kw] = v;
                }
            }
        };
        // As in ops/dense.rs: the AVX2 tile's 6 rows use only 6 values of each line a
        // channel-major read fetches (lines 16-64 KB apart, aliasing in L1), so there the
        // block is transposed first; the 12-row AVX-512 tile reads it in place.
        let in_place = crate::kernels::cpu() != crate::kernels::Cpu::Avx2Fma;
        let k = self.weight.inputs;
        SCRATCH.with_borrow_mut(|[product, columns, mixed, rows]| {
            for p0 in (0..pixels).step_by(block) {
                let count = block.min(pixels - p0);
                product.resize(count * n, 0.0);
                // The block's pixels read from the channel-major input.
                let pixel_rows = if in_place {
                    Rows::column_major(input, pixels, p0, count)
                } else {
                    rows.resize(count * k, 0.0);
                    transpose(&input[p0..], pixels, rows, k, [k, count]);
                    Rows::row_major(rows, k)
                };
                gemm_taps(pixel_rows, &self.weight, product);
                if self.gelu {
                    gelu(product);
                }
                // Column-major, so each column's pixels are read in order.
                columns.resize(n * count, 0.0);
                transpose(product, n, columns, count, [count, outputs * patch]);
                let Some(weights) = mix else {
                    for (c, values) in columns.chunks_exact(count).take(outputs * patch).enumerate() {
                        place(&mut out[c / patch * plane..], values, p0, c % patch);
                    }
                    continue;
                };
                // Each mixed plane at each patch position: the weighted sum of that
                // position's columns, summed in the order ops/mix.rs sums them.
                mixed.resize(count, 0.0);
                for (r, weights) in weights.chunks_exact(outputs).enumerate() {
                    for t in 0..patch {
                        let column = |o: usize| &columns[(o * patch + t) * count..][..count];
                        mixed.iter_mut().zip(column(0)).for_each(|(m, &v)| *m = weights[0] * v);
                        for (o, &w) in weights.iter().enumerate().skip(1) {
                            mixed.iter_mut().zip(column(o)).for_each(|(m, &v)| *m += w * v);
                        }
                        place(&mut out[r * plane..], mixed, p0, t);
                    }
                }
            }
        });
    }
}

thread_local! {
    /// A block's product, that product column-major, one mixed plane of the block, and
    /// the block's input pixel-major (AVX2).
    static SCRATCH: std::cell::RefCell<[Vec<f32>; 4]> =
        const { std::cell::RefCell::new([Vec::new(), Vec::new(), Vec::new(), Vec::new()]) };
}

/// Frees this thread's buffers (at the end of a run: [`super::RunScope`]); the bytes they held.
pub(crate) fn release_scratch() -> usize {
    SCRATCH.take().iter().map(|v| v.capacity() * size_of::<f32>()).sum()
}

/// Replaces each `Deconv` of a decluttered model whose taps never overlap.
pub fn replace_deconvs(model: TypedModel) -> TractResult<TypedModel> {
    super::replace_each::<Deconv, _>(model, "patches", |model, id| {
        let Some(mut op) = patch_deconv_for(model, id)? else { return Ok(None) };
        let own = OutletId::new(id, 0);
        let gelu = super::dense::gelu_after(model, own)?;
        op.gelu = gelu.is_some();
        Ok(Some((op, gelu.unwrap_or(own))))
    })
}

/// Folds each [`PlaneMix`] whose planes are a [`PatchDeconv`]'s output (and nothing else
/// reads them) into that deconvolution, which then reads the mix's weights as its second
/// input.
pub fn fuse_mixes(model: TypedModel) -> TractResult<TypedModel> {
    super::replace_in_place::<PlaneMix, _>(model, |model, id| {
        let node = model.node(id);
        let Some(mix) = node.op_as::<PlaneMix>() else { return Ok(None) };
        let [weights, planes] = node.inputs[..] else { return Ok(None) };
        let producer = model.node(planes.node);
        let Some(deconv) = producer.op_as::<PatchDeconv>() else { return Ok(None) };
        let [rows, depth, plane] = mix.dims();
        let own_plane = deconv.output_shape().iter().rev().take(2).product::<usize>();
        if deconv.mix.is_some()
            || depth != deconv.outputs
            || plane != own_plane
            || !super::only_reader(model, planes, id)?
        {
            return Ok(None);
        }
        let op = PatchDeconv { mix: Some(Mix { rows, output: mix.output_shape().into() }), ..deconv.clone() };
        Ok(Some((op, vec![producer.inputs[0], weights])))
    })
}

fn patch_deconv_for(model: &TypedModel, id: usize) -> TractResult<Option<PatchDeconv>> {
    let node = model.node(id);
    let Some(deconv) = node.op_as::<Deconv>() else { return Ok(None) };
    let spec = &deconv.pool_spec;
    let no_padding = match &spec.padding {
        PaddingSpec::Valid => true,
        PaddingSpec::Explicit(before, after) => before.iter().chain(after).all(|&p| p == 0),
        _ => false,
    };
    let kernel_shape = &spec.kernel_shape;
    let suitable = deconv.group == 1
        && deconv.kernel_format == KernelFormat::OIHW
        && matches!(spec.data_format, DataFormat::NCHW | DataFormat::CHW)
        && kernel_shape.len() == 2
        && *spec.strides() == **kernel_shape
        && spec.dilations().iter().all(|&d| d == 1)
        && deconv.adjustments.iter().all(|&a| a == 0)
        && no_padding
        && node.inputs.len() == 3;
    if !suitable {
        return Ok(None);
    }
    let fact = model.outlet_fact(node.inputs[0])?;
    let Some(input) = fact.shape.as_concrete() else { return Ok(None) };
    let batch_ok = (spec.data_format == DataFormat::NCHW && input.len() == 4 && input[0] == 1)
        || (spec.data_format == DataFormat::CHW && input.len() == 3);
    let (Some(kernel), Some(bias)) =
        (model.outlet_fact(node.inputs[1])?.konst.clone(), model.outlet_fact(node.inputs[2])?.konst.clone())
    else {
        return Ok(None);
    };
    let f32s = [fact.datum_type, kernel.datum_type(), bias.datum_type()].iter().all(|&t| t == f32::datum_type());
    let dims = kernel.shape();
    let channels = input[input.len() - 3];
    if !batch_ok || !f32s || dims.len() != 4 || dims[1] != channels || dims[2..] != kernel_shape[..] {
        return Ok(None);
    }
    let (outputs, patch) = (dims[0], dims[2] * dims[3]);
    let bias = {
        let view = bias.try_as_plain_ram()?;
        let values = view.as_slice::<f32>()?;
        match values.len() {
            n if n == outputs => values.to_vec(),
            1 => vec![values[0]; outputs],
            _ => return Ok(None),
        }
    };
    // `[O][I][kh][kw]` as `[I][O x kh x kw]`, padded to whole panels; one bias per column.
    let columns = outputs * patch;
    let padded = columns.div_ceil(PANEL) * PANEL;
    let view = kernel.try_as_plain_ram()?;
    let k = view.as_slice::<f32>()?;
    let mut matrix = vec![0f32; channels * padded];
    for o in 0..outputs {
        for i in 0..channels {
            for t in 0..patch {
                matrix[i * padded + o * patch + t] = k[(o * channels + i) * patch + t];
            }
        }
    }
    let column_bias = (0..padded).map(|c| if c < columns { bias[c / patch] } else { 0.0 }).collect();
    let Some(weight) = Packed::from_inputs_major(&matrix, column_bias, channels, padded) else { return Ok(None) };
    Ok(Some(PatchDeconv {
        input: input.into(),
        outputs,
        kernel: [dims[2], dims[3]],
        weight: Arc::new(weight),
        gelu: false,
        mix: None,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::mix::replace_plane_mixes;
    use tract_onnx::tract_core::ops::cnn::PoolSpec;
    use tract_onnx::tract_core::ops::einsum::EinSum;

    fn values(n: usize, seed: f32) -> Vec<f32> {
        (0..n).map(|i| (i as f32 * 0.37 + seed).sin()).collect()
    }

    /// One ONNX-style `ConvTranspose` as tract declutters it: input `[1, I, H, W]`,
    /// kernel `[O, I, kh, kw]` with stride `stride`.
    fn model(input: [usize; 4], kernel: [usize; 4], stride: [usize; 2]) -> TractResult<TypedModel> {
        model_then(input, kernel, stride, false)
    }

    /// The same, with tract's exact GELU after it when `gelu`.
    fn model_then(input: [usize; 4], kernel: [usize; 4], stride: [usize; 2], gelu: bool) -> TractResult<TypedModel> {
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact(input))?;
        let k = model.add_const("k", Tensor::from_shape(&kernel, &values(kernel.iter().product(), 1.1))?)?;
        let b = model.add_const("b", Tensor::from_shape(&[kernel[0]], &values(kernel[0], 2.3))?)?;
        let spec = PoolSpec::new(
            DataFormat::NCHW,
            tvec![kernel[2], kernel[3]],
            PaddingSpec::Valid,
            None,
            Some(tvec![stride[0], stride[1]]),
            kernel[1],
            kernel[0],
        );
        let op = Deconv::new(spec, KernelFormat::OIHW, tvec![0, 0], 1);
        let mut y = model.wire_node("deconv", op, &[x, k, b])?;
        if gelu {
            use tract_onnx::tract_core::ops::{element_wise::ElementWiseOp, nn::GeluExact};
            y = model.wire_node("gelu", ElementWiseOp(Box::new(GeluExact {}), None), &y)?;
        }
        model.select_output_outlets(&y)?;
        Ok(model)
    }

    #[test]
    fn matches_tracts_deconvolution_for_the_decoders_upscaling_and_odd_shapes() -> TractResult<()> {
        // The decoder's two (shrunk), a 3x2 patch, and a width that splits no block evenly.
        // The last with the GELU the decoder's second upscaling has after it, folded in.
        let cases = [
            ([1, 32, 8, 8], [8, 32, 2, 2], false),
            ([1, 8, 16, 16], [4, 8, 2, 2], false),
            ([1, 5, 7, 300], [3, 5, 3, 2], false),
        ];
        for (input, kernel, gelu) in cases.into_iter().chain([([1, 8, 16, 16], [4, 8, 2, 2], true)]) {
            let tract = model_then(input, kernel, [kernel[2], kernel[3]], gelu)?;
            let ours = replace_deconvs(tract.clone())?;
            let ops: Vec<String> = ours.nodes().iter().map(|n| format!("{:?}", n.op)).collect();
            assert_eq!(ours.nodes().iter().filter(|n| n.op_is::<PatchDeconv>()).count(), 1, "{kernel:?}");
            assert!(!ops.iter().any(|op| op.contains("Gelu")), "tract's GELU left in: {ops:?}");
            assert_eq!(ops.iter().any(|op| op.starts_with("PatchDeconv") && op.contains("GELU")), gelu, "{ops:?}");
            let x = Tensor::from_shape(&input, &values(input.iter().product(), 0.4))?;
            let run = |m: TypedModel| -> TractResult<Tensor> {
                Ok(m.into_runnable()?.run(tvec!(x.clone().into_tvalue()))?.remove(0).into_tensor())
            };
            let worst = crate::ops::max_abs_diff(&run(tract)?, &run(ours)?)?;
            assert!(worst < 1e-4, "{input:?} * {kernel:?}: max |diff| {worst}");
        }
        Ok(())
    }

    #[test]
    fn a_few_row_product_of_the_planes_is_folded_in() -> TractResult<()> {
        // The decoder's end, shrunk: upscaling with its GELU, then 3 rows of weights (an
        // input, as the decoder's hypernetwork output is) times the 4 upscaled planes; and
        // a 3x2 patch over a width that splits no block evenly.
        for (input, kernel, gelu) in [([1, 8, 16, 16], [4, 8, 2, 2], true), ([1, 5, 7, 300], [4, 5, 3, 2], false)] {
            let mut tract = model_then(input, kernel, [kernel[2], kernel[3]], gelu)?;
            let planes = tract.output_outlets()?[0];
            let weights = tract.add_source("weights", f32::fact([3, kernel[0]]))?;
            let einsum = EinSum::new("mk,akbn->mbn".parse()?, f32::datum_type());
            let mixed = tract.wire_node("mix", einsum, &[weights, planes])?;
            tract.select_output_outlets(&mixed)?;
            let ours = fuse_mixes(replace_plane_mixes(replace_deconvs(tract.clone())?)?)?;
            let ops: Vec<String> = ours.eval_order()?.iter().map(|&n| format!("{:?}", ours.node(n).op)).collect();
            assert_eq!(ops.iter().filter(|op| op.contains("mixed into 3 planes")).count(), 1, "{ops:?}");
            assert!(!ops.iter().any(|op| op.starts_with("PlaneMix") || op.contains("EinSum")), "{ops:?}");
            let x = Tensor::from_shape(&input, &values(input.iter().product(), 0.4))?;
            let w = Tensor::from_shape(&[3, kernel[0]], &values(3 * kernel[0], 1.7))?;
            let run = |m: TypedModel| -> TractResult<Tensor> {
                let inputs = tvec!(x.clone().into_tvalue(), w.clone().into_tvalue());
                Ok(m.into_runnable()?.run(inputs)?.remove(0).into_tensor())
            };
            let worst = crate::ops::max_abs_diff(&run(tract)?, &run(ours)?)?;
            assert!(worst < 1e-4, "{input:?} * {kernel:?}, mixed: max |diff| {worst}");
        }
        Ok(())
    }

    #[test]
    fn overlapping_taps_stay_tracts() -> TractResult<()> {
        let ours = replace_deconvs(model([1, 4, 6, 6], [4, 4, 3, 3], [2, 2])?)?;
        assert_eq!(ours.nodes().iter().filter(|n| n.op_is::<PatchDeconv>()).count(), 0);
        Ok(())
    }
}
