//! An axis moved to another place (tract's `AxisOp::Move`) as one transpose of two groups
//! of axes, in place of tract's element-by-element copy.
//!
//! The encoder's tail moves axes around every attention: its windows cut out and put back
//! (`[.., 7, 19, 7 x C]`: runs of whole window rows), and its tokens turned channel-major for
//! the local convolution and back (`[4096, 160]` ⇄ `[160, 4096]`): 42 moves, about 5 % of its
//! time in tract's profile (docs/performance.md §6k). Any move of axis `from` to `to` is,
//! for each index of the axes before both, the transpose of a `[p][q]` matrix whose
//! elements are the runs of the axes after both: runs of one value go through the 8x8
//! vector transpose, longer runs are copied whole.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::change_axes::AxisOp;

use crate::kernels::transpose::transpose;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MoveAxis {
    /// The input's shape (the only one it was planned for).
    input: TVec<usize>,
    from: usize,
    to: usize,
}

impl Op for MoveAxis {
    fn name(&self) -> StaticName {
        "FastMoveAxis".into()
    }

    op_as_typed_op!();
}

impl MoveAxis {
    fn output_shape(&self) -> TVec<usize> {
        let mut shape = self.input.clone();
        let axis = shape.remove(self.from);
        shape.insert(self.to, axis);
        shape
    }

    /// `[outer, p, q, run]`: the input is `[outer][p][q][run]`, the output `[outer][q][p][run]`.
    fn groups(&self) -> [usize; 4] {
        let (lo, hi) = (self.from.min(self.to), self.from.max(self.to));
        let product = |axes: std::ops::Range<usize>| self.input[axes].iter().product::<usize>();
        let (p, q) = if self.from < self.to {
            (self.input[self.from], product(self.from + 1..self.to + 1))
        } else {
            (product(self.to..self.from), self.input[self.from])
        };
        [product(0..lo), p, q, product(hi + 1..self.input.len())]
    }

    fn run(&self, input: &[f32], out: &mut [f32]) {
        let [outer, p, q, run] = self.groups();
        let block = p * q * run;
        for (src, dst) in input.chunks_exact(block).zip(out.chunks_exact_mut(block)).take(outer) {
            if run == 1 {
                transpose(src, q, dst, p, [p, q]);
                continue;
            }
            for (i, rows) in src.chunks_exact(q * run).enumerate() {
                for (j, values) in rows.chunks_exact(run).enumerate() {
                    dst[(j * p + i) * run..][..run].copy_from_slice(values);
                }
            }
        }
    }
}

impl EvalOp for MoveAxis {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let Some(input) = inputs.first() else { bail!("MoveAxis: no input") };
        if input.shape() != &*self.input {
            bail!("MoveAxis: input {:?}, planned for {:?}", input.shape(), self.input);
        }
        // `run` writes every element: the groups cover the whole tensor.
        super::eval_filled(input, &self.output_shape(), |x, out| self.run(x, out))
    }
}

impl TypedOp for MoveAxis {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let Some(input) = inputs.first() else { bail!("MoveAxis: no input") };
        if input.shape.as_concrete() != Some(&*self.input) {
            bail!("MoveAxis: input {:?}, planned for {:?}", input.shape, self.input);
        }
        Ok(tvec!(f32::fact(self.output_shape())))
    }

    as_op!();
}

/// Replaces each `Move` of an f32 tensor of concrete shape in an optimised model.
pub fn replace_moves(model: TypedModel) -> TractResult<TypedModel> {
    super::replace_in_place::<AxisOp, _>(model, |model, id| {
        let node = model.node(id);
        let Some(&AxisOp::Move(from, to)) = node.op_as::<AxisOp>() else { return Ok(None) };
        let Some(&input) = node.inputs.first() else { return Ok(None) };
        let fact = model.outlet_fact(input)?;
        let Some(shape) = fact.shape.as_concrete() else { return Ok(None) };
        if fact.datum_type != f32::datum_type() || from == to || from.max(to) >= shape.len() {
            return Ok(None);
        }
        Ok(Some((MoveAxis { input: shape.into(), from, to }, vec![input])))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::noise;

    #[test]
    fn every_move_matches_tracts() {
        // The encoder's (window rows, channel-major tokens) and odd sizes, both directions.
        let cases: [(&[usize], usize, usize); 6] = [
            (&[3, 7, 5, 24], 1, 2),
            (&[37, 20], 0, 1),
            (&[20, 37], 1, 0),
            (&[2, 3, 4, 5, 6], 3, 1),
            (&[2, 3, 4, 5, 6], 0, 4),
            (&[9, 1, 13], 2, 0),
        ];
        for (shape, from, to) in cases {
            let input = Tensor::from_shape(shape, &noise(shape.iter().product(), 3)).unwrap();
            let ours = MoveAxis { input: shape.into(), from, to }
                .eval(&EvalContext::out_of_plan(), tvec!(input.clone().into_tvalue()))
                .unwrap();
            let theirs = input.moved_axis(from, to).unwrap();
            assert_eq!(ours[0].shape(), theirs.shape(), "{shape:?} {from}->{to}");
            let (a, b) = (ours[0].to_plain_array_view::<f32>().unwrap(), theirs.to_plain_array_view::<f32>().unwrap());
            assert!(a.iter().eq(b.iter()), "{shape:?} {from}->{to}");
        }
    }
}
