//! A constant-padding op for f32 tensors that writes its output once, in place of tract's
//! `Pad` (and of a `Concat` feeding only that `Pad`) in optimised plans.
//!
//! tract 0.23's `Pad` builds an ndarray, assigns the input into a slice of it, then converts
//! that array into a tensor: two output-sized buffers at once on top of the input. In
//! U²-Net-p the 3x3 convolution after the last concat pads a 50 MB activation, and that one
//! node set the model's memory peak (docs/performance.md §2). This op allocates the output
//! once and writes each of its rows once (padding, or padding around an input row): peak =
//! input + output. Where the padded tensor is a concatenation (U²-Net's decoder stages), the
//! inputs are copied straight into the padded output, so the unpadded concatenation is never
//! made.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::array::{Pad, PadMode, TypedConcat};

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ConstPad {
    /// (before, after) per axis.
    pads: Vec<(usize, usize)>,
    /// The fill value's bits (f32), so the op stays `Eq` and `Hash`.
    value_bits: u32,
    /// With several inputs: they are concatenated along this axis, then padded.
    concat_axis: usize,
}

impl ConstPad {
    fn value(&self) -> f32 {
        f32::from_bits(self.value_bits)
    }

    fn output_shape(&self, input: &[usize]) -> TVec<usize> {
        input.iter().zip(&self.pads).map(|(d, (b, a))| d + b + a).collect()
    }

    /// Copies a contiguous row-major f32 buffer of shape `shape` into `out` (of shape
    /// `out_shape`), with its first element at `origin`.
    fn place(shape: &[usize], src: &[f32], out: &mut [f32], out_shape: &[usize], origin: &[usize]) {
        let Some((&row_len, outer)) = shape.split_last() else {
            out.copy_from_slice(src);
            return;
        };
        if row_len == 0 || src.is_empty() {
            return;
        }
        // Element strides of the output, per axis.
        let mut strides = vec![1usize; out_shape.len()];
        for axis in (0..out_shape.len().saturating_sub(1)).rev() {
            strides[axis] = strides[axis + 1] * out_shape[axis + 1];
        }
        let last = shape.len() - 1;
        let mut index = vec![0usize; outer.len()];
        for row in src.chunks_exact(row_len) {
            let offset: usize =
                index.iter().zip(origin).zip(&strides).map(|((i, o), s)| (i + o) * s).sum::<usize>() + origin[last];
            out[offset..offset + row_len].copy_from_slice(row);
            // Next row: odometer over the outer axes.
            for axis in (0..outer.len()).rev() {
                index[axis] += 1;
                if index[axis] < outer[axis] {
                    break;
                }
                index[axis] = 0;
            }
        }
    }

    /// Writes each output row once: the fill value, or pad + an input row + pad. `shape` is
    /// the concatenated input shape; the concatenation axis is not the last one.
    fn write_rows(&self, inputs: &[TValue], sources: &[&[f32]], shape: &[usize], out: &mut [f32], out_shape: &[usize]) {
        let last = shape.len() - 1;
        let (row_len, out_row_len) = (shape[last], out_shape[last]);
        if out_row_len == 0 {
            return;
        }
        let before = self.pads[last].0;
        let value = self.value();
        // Where each input starts along the concatenation axis.
        let starts: Vec<usize> = inputs
            .iter()
            .scan(0, |start, i| {
                let s = *start;
                *start += i.shape()[self.concat_axis];
                Some(s)
            })
            .collect();
        let mut index = vec![0usize; last];
        for row in out.chunks_exact_mut(out_row_len) {
            // The input row this output row shows, if any: (input, row number in it).
            let mut source = None;
            let inside = (0..last).all(|a| index[a] >= self.pads[a].0 && index[a] - self.pads[a].0 < shape[a]);
            if inside && row_len > 0 {
                let at = |a: usize| index[a] - self.pads[a].0;
                let k = starts.iter().rposition(|&s| s <= at(self.concat_axis)).unwrap_or(0);
                let in_shape = inputs[k].shape();
                let number = (0..last).fold(0, |number, a| {
                    let i = if a == self.concat_axis { at(a) - starts[k] } else { at(a) };
                    number * in_shape[a] + i
                });
                source = sources[k].get(number * row_len..(number + 1) * row_len);
            }
            match source {
                Some(src) => {
                    let (head, rest) = row.split_at_mut(before);
                    let (body, tail) = rest.split_at_mut(row_len);
                    head.fill(value);
                    body.copy_from_slice(src);
                    tail.fill(value);
                }
                None => row.fill(value),
            }
            for axis in (0..last).rev() {
                index[axis] += 1;
                if index[axis] < out_shape[axis] {
                    break;
                }
                index[axis] = 0;
            }
        }
    }
}

impl Op for ConstPad {
    fn name(&self) -> StaticName {
        "ConstPad".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("pads: {:?}, value: {}", self.pads, self.value())])
    }

    op_as_typed_op!();
}

impl EvalOp for ConstPad {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let Some(first) = inputs.first() else { bail!("ConstPad: no input") };
        let mut shape = first.shape().to_vec();
        if shape.len() != self.pads.len() || self.concat_axis >= shape.len() {
            bail!("ConstPad: rank {} for {} pads", shape.len(), self.pads.len());
        }
        shape[self.concat_axis] = inputs.iter().map(|i| i.shape().get(self.concat_axis).copied().unwrap_or(0)).sum();
        let out_shape = self.output_shape(&shape);
        for input in &inputs {
            let in_shape = input.shape();
            let fits = in_shape.len() == shape.len()
                && in_shape.iter().zip(&shape).enumerate().all(|(axis, (a, b))| axis == self.concat_axis || a == b);
            if !fits {
                bail!("ConstPad: input shape {in_shape:?} does not concatenate into {shape:?}");
            }
        }
        let views = inputs.iter().map(|i| i.try_as_plain_ram()).collect::<TractResult<Vec<_>>>()?;
        let sources = views.iter().map(|v| v.as_slice::<f32>()).collect::<TractResult<Vec<_>>>()?;
        // SAFETY: every element is written below (each output row once, or filled and then
        // the input rows copied).
        let mut output = unsafe { Tensor::uninitialized::<f32>(&out_shape)? };
        {
            let mut out_view = output.try_as_plain_ram_mut()?;
            let out = out_view.as_slice_mut::<f32>()?;
            if self.concat_axis + 1 < shape.len() {
                self.write_rows(&inputs, &sources, &shape, out, &out_shape);
            } else {
                out.fill(self.value());
                let mut origin: Vec<usize> = self.pads.iter().map(|p| p.0).collect();
                for (input, src) in inputs.iter().zip(&sources) {
                    Self::place(input.shape(), src, out, &out_shape, &origin);
                    origin[self.concat_axis] += input.shape()[self.concat_axis];
                }
            }
        }
        Ok(tvec!(output.into_tvalue()))
    }
}

impl TypedOp for ConstPad {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let Some(first) = inputs.first() else { bail!("ConstPad: no input") };
        let mut fact = first.without_value();
        let concat: TDim = inputs.iter().map(|f| f.shape[self.concat_axis].clone()).sum();
        fact.shape.set(self.concat_axis, concat);
        for (axis, (before, after)) in self.pads.iter().enumerate() {
            fact.shape.set(axis, fact.shape[axis].clone() + *before + *after);
        }
        Ok(tvec!(fact))
    }

    as_op!();
}

/// Replaces every constant f32 `Pad` of an optimised model by [`ConstPad`].
pub fn replace_pads(model: TypedModel) -> TractResult<TypedModel> {
    super::replace_in_place::<Pad, _>(model, |model, id| {
        let node = model.node(id);
        let Some(pad) = node.op_as::<Pad>() else { return Ok(None) };
        let PadMode::Constant(value) = &pad.mode else { return Ok(None) };
        let input_fact = model.outlet_fact(node.inputs[0])?;
        if input_fact.datum_type != f32::datum_type() || pad.pads.len() != input_fact.rank() {
            return Ok(None);
        }
        let value = value.cast_to_scalar::<f32>()?;
        let producer = model.node(node.inputs[0].node);
        let only_reader =
            model.outlet_successors(node.inputs[0]).len() == 1 && !model.output_outlets()?.contains(&node.inputs[0]);
        let (inputs, concat_axis) = match producer.op_as::<TypedConcat>() {
            Some(concat) if only_reader && producer.outputs.len() == 1 => (producer.inputs.clone(), concat.axis),
            _ => (node.inputs.clone(), 0),
        };
        let f32_inputs = inputs.iter().all(|i| model.outlet_fact(*i).is_ok_and(|f| f.datum_type == f32::datum_type()));
        if !f32_inputs {
            return Ok(None);
        }
        let op = ConstPad { pads: pad.pads.clone(), value_bits: value.to_bits(), concat_axis };
        Ok(Some((op, inputs)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pads_every_axis_like_tracts_pad() {
        let input = Tensor::from_shape(&[1, 2, 3, 4], &(0..24).map(|v| v as f32).collect::<Vec<_>>()).unwrap();
        let pads = vec![(0, 0), (1, 0), (2, 1), (1, 3)];
        let ours = ConstPad { pads: pads.clone(), value_bits: 0.5f32.to_bits(), concat_axis: 0 }
            .eval(&EvalContext::out_of_plan(), tvec!(input.clone().into_tvalue()))
            .unwrap();
        let theirs = Pad { pads, mode: PadMode::Constant(Arc::new(tensor0(0.5f32))) }
            .eval(&EvalContext::out_of_plan(), tvec!(input.into_tvalue()))
            .unwrap();
        assert_eq!(ours[0].shape(), &[1, 3, 6, 8]);
        assert_eq!(*ours[0], *theirs[0]);
    }

    #[test]
    fn concatenates_then_pads_like_tracts_concat_and_pad() {
        let a = Tensor::from_shape(&[1, 2, 3, 4], &(0..24).map(|v| v as f32).collect::<Vec<_>>()).unwrap();
        let b = Tensor::from_shape(&[1, 1, 3, 4], &(100..112).map(|v| v as f32).collect::<Vec<_>>()).unwrap();
        let pads = vec![(0, 0), (0, 0), (1, 1), (1, 1)];
        let ours = ConstPad { pads: pads.clone(), value_bits: 0f32.to_bits(), concat_axis: 1 }
            .eval(&EvalContext::out_of_plan(), tvec!(a.clone().into_tvalue(), b.clone().into_tvalue()))
            .unwrap();
        let joined = Tensor::stack_tensors(1, &[a, b]).unwrap();
        let theirs = Pad { pads, mode: PadMode::Constant(Arc::new(tensor0(0f32))) }
            .eval(&EvalContext::out_of_plan(), tvec!(joined.into_tvalue()))
            .unwrap();
        assert_eq!(ours[0].shape(), &[1, 3, 5, 6]);
        assert_eq!(*ours[0], *theirs[0]);
    }

    #[test]
    fn concatenation_padded_on_its_own_axis_and_on_the_last_axis() {
        let a = Tensor::from_shape(&[1, 2, 2, 3], &(0..12).map(|v| v as f32).collect::<Vec<_>>()).unwrap();
        let b = Tensor::from_shape(&[1, 3, 2, 3], &(50..68).map(|v| v as f32).collect::<Vec<_>>()).unwrap();
        for (axis, pads) in [(1, vec![(0, 0), (2, 1), (1, 0), (0, 2)]), (3, vec![(0, 0), (0, 0), (1, 1), (2, 1)])] {
            let (a, b) = if axis == 3 {
                let b = Tensor::from_shape(&[1, 2, 2, 4], &(50..66).map(|v| v as f32).collect::<Vec<_>>()).unwrap();
                (a.clone(), b)
            } else {
                (a.clone(), b.clone())
            };
            let ours = ConstPad { pads: pads.clone(), value_bits: (-1f32).to_bits(), concat_axis: axis }
                .eval(&EvalContext::out_of_plan(), tvec!(a.clone().into_tvalue(), b.clone().into_tvalue()))
                .unwrap();
            let joined = Tensor::stack_tensors(axis, &[a, b]).unwrap();
            let theirs = Pad { pads, mode: PadMode::Constant(Arc::new(tensor0(-1f32))) }
                .eval(&EvalContext::out_of_plan(), tvec!(joined.into_tvalue()))
                .unwrap();
            assert_eq!(*ours[0], *theirs[0], "concatenated on axis {axis}");
        }
    }
}
