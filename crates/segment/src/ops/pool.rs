//! 2x2 max pooling with stride 2 over the spatial axes of an NCHW (or CHW) f32 tensor, in
//! place of tract's `MaxPool`.
//!
//! U²-Net-p halves its maps 33 times this way (`ceil_mode`: an odd row or column keeps its
//! last, half-filled window). tract runs every pooling through its generic patch walker,
//! one window at a time: 8 % of the model's time in its profile (docs/performance.md).
//! Here each output row is the element-wise maximum of two input rows, then of neighbouring
//! pairs, in two straight passes the compiler vectorises.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::cnn::MaxPool;
use tract_onnx::tract_core::ops::nn::DataFormat;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HalvingMaxPool {
    /// Output height and width: `ceil` or `floor` of the input's halves, as the model says.
    height: usize,
    width: usize,
}

impl Op for HalvingMaxPool {
    fn name(&self) -> StaticName {
        "HalvingMaxPool".into()
    }

    op_as_typed_op!();
}

impl HalvingMaxPool {
    /// `[1,] C, H, W` → `[1,] C, height, width`, when every output window holds at least
    /// one input element: the input is `2 * height - 1` (ceil mode, odd), `2 * height` or
    /// `2 * height + 1` (floor mode, odd) high, and alike wide.
    fn output_shape(&self, input: &[usize]) -> TractResult<TVec<usize>> {
        let rank = input.len();
        let batch_ok = rank == 3 || (rank == 4 && input[0] == 1);
        let fits = |size: usize, out: usize| out > 0 && size + 1 >= 2 * out && size <= 2 * out + 1;
        if !batch_ok || !fits(input[rank - 2], self.height) || !fits(input[rank - 1], self.width) {
            bail!("HalvingMaxPool: input {input:?} does not halve to {}x{}", self.height, self.width);
        }
        let mut shape: TVec<usize> = input.into();
        shape[rank - 2] = self.height;
        shape[rank - 1] = self.width;
        Ok(shape)
    }
}

impl EvalOp for HalvingMaxPool {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let Some(input) = inputs.first() else { bail!("HalvingMaxPool: no input") };
        let shape = self.output_shape(input.shape())?;
        let rank = input.rank();
        let (h, w) = (input.shape()[rank - 2], input.shape()[rank - 1]);
        let (height, width) = (self.height, self.width);
        // `halve` writes every output element (each plane's rows in full).
        super::eval_filled(input, &shape, |src, out| {
            let mut pairs = vec![0f32; w];
            for (plane, out) in src.chunks_exact(h * w).zip(out.chunks_exact_mut(height * width)) {
                for (y, out) in out.chunks_exact_mut(width).enumerate() {
                    let top = &plane[2 * y * w..][..w];
                    // An odd height's last window is its last row alone.
                    let bottom = if 2 * y + 1 < h { &plane[(2 * y + 1) * w..][..w] } else { top };
                    halve_row(top, bottom, &mut pairs, out);
                }
            }
        })
    }
}

/// `out[x]` = the maximum of `top` and `bottom` at columns `2x` and `2x + 1`: the last
/// column alone when `out` has a window more than `top` has pairs (ceil mode), and an
/// unpaired last column left out when not (floor mode); `pairs` is scratch of `top`'s length.
fn halve_row(top: &[f32], bottom: &[f32], pairs: &mut [f32], out: &mut [f32]) {
    pairs.iter_mut().zip(top.iter().zip(bottom)).for_each(|(p, (a, b))| *p = a.max(*b));
    let mut columns = pairs.chunks_exact(2);
    let mut filled = 0;
    for (o, pair) in out.iter_mut().zip(&mut columns) {
        *o = pair[0].max(pair[1]);
        filled += 1;
    }
    if let (Some(o), [last]) = (out.get_mut(filled), columns.remainder()) {
        *o = *last;
    }
}

impl TypedOp for HalvingMaxPool {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let Some(input) = inputs.first() else { bail!("HalvingMaxPool: no input") };
        let Some(shape) = input.shape.as_concrete() else { bail!("HalvingMaxPool: symbolic input {:?}", input.shape) };
        Ok(tvec!(f32::fact(self.output_shape(shape)?)))
    }

    as_op!();
}

/// Replaces each 2x2 stride-2 `MaxPool` (no padding before, no index output) of a
/// decluttered model.
pub fn replace_max_pools(model: TypedModel) -> TractResult<TypedModel> {
    super::replace_each::<MaxPool, _>(model, "halving", halving_for)
}

fn halving_for(model: &TypedModel, id: usize) -> TractResult<Option<(HalvingMaxPool, OutletId)>> {
    let node = model.node(id);
    let Some(pool) = node.op_as::<MaxPool>() else { return Ok(None) };
    let spec = &pool.pool_spec;
    let suitable = pool.with_index_outputs.is_none()
        && matches!(spec.data_format, DataFormat::NCHW | DataFormat::CHW)
        && *spec.kernel_shape == [2, 2]
        && *spec.strides() == [2, 2]
        && *spec.dilations() == [1, 1];
    let fact = model.outlet_fact(node.inputs[0])?;
    let Some(in_shape) = fact.shape.as_concrete().filter(|_| suitable && fact.datum_type == f32::datum_type()) else {
        return Ok(None);
    };
    let rank = in_shape.len();
    let rank_ok =
        (spec.data_format == DataFormat::NCHW && rank == 4) || (spec.data_format == DataFormat::CHW && rank == 3);
    if !rank_ok {
        return Ok(None);
    }
    let padding = spec.computed_padding(&in_shape[rank - 2..]);
    if padding.iter().any(|p| p.pad_before != 0) {
        return Ok(None);
    }
    let op = HalvingMaxPool { height: padding[0].convoluted, width: padding[1].convoluted };
    // Only when the model's own output shape is the one this op makes.
    let Ok(shape) = op.output_shape(in_shape) else { return Ok(None) };
    let same = model.outlet_fact(OutletId::new(id, 0))?.shape.as_concrete() == Some(&shape[..]);
    Ok(same.then_some((op, OutletId::new(id, 0))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::tract_core::ops::cnn::{PaddingSpec, PoolSpec};

    /// Ours against tract's `MaxPool` (2x2, stride 2) on a `[1, 3, h, w]` input of values
    /// of either sign, with ONNX's `ceil_mode` on or off.
    fn check(h: usize, w: usize, ceil: bool) {
        let spec = PoolSpec {
            data_format: DataFormat::NCHW,
            kernel_shape: tvec![2, 2],
            padding: PaddingSpec::ExplicitOnnxPool(tvec![0, 0], tvec![0, 0], ceil),
            dilations: None,
            strides: Some(tvec![2, 2]),
            input_channels: 3,
            output_channels: 3,
        };
        let theirs = MaxPool { pool_spec: spec, with_index_outputs: None };
        let mut model = TypedModel::default();
        let source = model.add_source("x", f32::fact([1, 3, h, w])).unwrap();
        let out = model.wire_node("pool", theirs, &[source]).unwrap();
        model.select_output_outlets(&out).unwrap();
        let values: Vec<f32> = (0..3 * h * w).map(|i| ((i * 7919) % 1013) as f32 - 506.0).collect();
        let input = Tensor::from_shape(&[1, 3, h, w], &values).unwrap();
        let run = |model: TypedModel| {
            let out = model.into_runnable().unwrap().run(tvec!(input.clone().into_tvalue())).unwrap();
            out[0].to_plain_array_view::<f32>().unwrap().to_owned()
        };
        let expected = run(model.clone());
        let ours = replace_max_pools(model).unwrap();
        assert!(ours.nodes().iter().any(|n| n.op_is::<HalvingMaxPool>()), "{h}x{w} ceil {ceil}: not replaced");
        assert_eq!(run(ours), expected, "{h}x{w} ceil {ceil}");
    }

    #[test]
    fn even_and_odd_sizes_match_tracts_max_pool_with_and_without_ceil_mode() {
        for (h, w) in [(8, 10), (7, 9), (5, 6), (1, 1), (40, 33)] {
            check(h, w, true);
        }
        for (h, w) in [(8, 10), (7, 9), (6, 5)] {
            check(h, w, false);
        }
    }
}
