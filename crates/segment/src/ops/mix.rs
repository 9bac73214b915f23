//! A product of a few rows by a stack of planes: each output plane a weighted sum of the
//! input planes, the weights an activation (a 1x1 convolution whose kernel is computed).
//!
//! The SAM decoder ends so: its 4 mask tokens' hypernetwork outputs (4 x 32) times the
//! upscaled embedding (32 planes of 256 x 256) give the 4 mask planes (`mk,akbn->mbn`).
//! tract packs the 8 MB plane stack for a 4-row product (5 ms of the decoder's profile for
//! 17 MFLOP); here each block of columns of the planes is read in place, once, and each
//! output row accumulated from it while it is in cache.
//!
//! Replaced: an f32 `EinSum` of two activations where, size-1 axes aside, the left one is
//! `[m, k]` with fewer than [`FEW_ROWS`] rows, the right one is `[k, p...]` and the output
//! `[m, p...]` (the planes' axes in the same order).

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::einsum::EinSum;

use super::dense::sized;

const FEW_ROWS: usize = 16;

/// Columns of the planes taken at a time: `k` rows of them (256 KB at k = 32) stay in L2
/// while every output row is accumulated, one output block (8 KB) in L1.
const BLOCK: usize = 2048;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlaneMix {
    m: usize,
    k: usize,
    /// Elements of a plane.
    p: usize,
    output: TVec<usize>,
}

impl Op for PlaneMix {
    fn name(&self) -> StaticName {
        "PlaneMix".into()
    }

    op_as_typed_op!();
}

impl EvalOp for PlaneMix {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let [a, b] = &inputs[..] else { bail!("PlaneMix: two inputs expected") };
        if a.len() != self.m * self.k || b.len() != self.k * self.p {
            bail!(
                "PlaneMix: inputs {:?} and {:?}, planned for {}x{} by {}x{}",
                a.shape(),
                b.shape(),
                self.m,
                self.k,
                self.k,
                self.p
            );
        }
        let (a_view, b_view) = (a.try_as_plain_ram()?, b.try_as_plain_ram()?);
        let (a, b) = (a_view.as_slice::<f32>()?, b_view.as_slice::<f32>()?);
        // SAFETY: `run` writes every output element.
        let mut output = unsafe { Tensor::uninitialized::<f32>(&self.output)? };
        {
            let mut out_view = output.try_as_plain_ram_mut()?;
            self.run(a, b, out_view.as_slice_mut::<f32>()?);
        }
        Ok(tvec!(output.into_tvalue()))
    }
}

impl TypedOp for PlaneMix {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let [a, b] = inputs else { bail!("PlaneMix: two inputs expected") };
        let count = |f: &TypedFact| f.shape.as_concrete().map(|s| s.iter().product::<usize>());
        if count(a) != Some(self.m * self.k) || count(b) != Some(self.k * self.p) {
            bail!("PlaneMix: inputs {:?} and {:?} do not match the plan", a.shape, b.shape);
        }
        Ok(tvec!(f32::fact(self.output.clone())))
    }

    as_op!();
}

impl PlaneMix {
    /// `m`, `k` and the elements of a plane: `[m, k]` times `[k, plane]`.
    pub(crate) fn dims(&self) -> [usize; 3] {
        [self.m, self.k, self.p]
    }

    pub(crate) fn output_shape(&self) -> &[usize] {
        &self.output
    }

    fn run(&self, a: &[f32], b: &[f32], out: &mut [f32]) {
        let (k, p) = (self.k, self.p);
        if k == 0 {
            out.fill(0.0);
            return;
        }
        for c0 in (0..p).step_by(BLOCK) {
            let width = BLOCK.min(p - c0);
            for (weights, row) in a.chunks_exact(k).zip(out.chunks_exact_mut(p)) {
                let o = &mut row[c0..c0 + width];
                let first = &b[c0..c0 + width];
                o.iter_mut().zip(first).for_each(|(o, &v)| *o = weights[0] * v);
                for (plane, &w) in weights.iter().enumerate().skip(1) {
                    let from = &b[plane * p + c0..plane * p + c0 + width];
                    o.iter_mut().zip(from).for_each(|(o, &v)| *o += w * v);
                }
            }
        }
    }
}

/// Replaces each suitable `EinSum` of a decluttered model.
pub fn replace_plane_mixes(model: TypedModel) -> TractResult<TypedModel> {
    super::replace_in_place::<EinSum, _>(model, |model, id| {
        Ok(mix_for(model, id)?.map(|op| (op, model.node(id).inputs.clone())))
    })
}

fn mix_for(model: &TypedModel, id: usize) -> TractResult<Option<PlaneMix>> {
    let node = model.node(id);
    let Some(einsum) = node.op_as::<EinSum>() else { return Ok(None) };
    if einsum.q_params.is_some() || einsum.operating_dt != f32::datum_type() || node.inputs.len() != 2 {
        return Ok(None);
    }
    let mut shapes = vec![];
    for input in &node.inputs {
        let fact = model.outlet_fact(*input)?;
        let Some(shape) = fact.shape.as_concrete() else { return Ok(None) };
        if fact.datum_type != f32::datum_type() || fact.konst.is_some() {
            return Ok(None);
        }
        shapes.push(shape.to_vec());
    }
    let Some(output) = model.outlet_fact(OutletId::new(id, 0))?.shape.as_concrete().map(|s| s.to_vec()) else {
        return Ok(None);
    };
    let (inputs, outputs) = einsum.axes.to_strs();
    let ([sa, sb], [so]) = (&inputs[..], &outputs[..]) else { return Ok(None) };
    let (Some(a), Some(b), Some(o)) = (sized(sa, &shapes[0]), sized(sb, &shapes[1]), sized(so, &output)) else {
        return Ok(None);
    };
    let (&[(m, rows), (k, depth)], Some((&(bk, _), planes))) = (&a[..], b.split_first()) else { return Ok(None) };
    let Some((&(om, _), out_planes)) = o.split_first() else { return Ok(None) };
    let plane_axes_match = planes == out_planes && planes.iter().all(|(c, _)| *c != m && *c != k);
    if bk != k || om != m || !plane_axes_match || rows >= FEW_ROWS || planes.is_empty() {
        return Ok(None);
    }
    let p = planes.iter().map(|a| a.1).product();
    Ok(Some(PlaneMix { m: rows, k: depth, p, output: output.into() }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::noise;

    /// Ours against tract's own EinSum for `expr` on activations of shapes `a` and `b`;
    /// `None` when the form is not recognised.
    fn check(expr: &str, a: &[usize], b: &[usize]) -> Option<()> {
        let ta = Tensor::from_shape(a, &noise(a.iter().product(), 3)).unwrap();
        let tb = Tensor::from_shape(b, &noise(b.iter().product(), 7)).unwrap();
        crate::ops::check_against_einsum(expr, [ta, tb], mix_for, 1e-5)
    }

    #[test]
    fn the_decoders_mask_product_matches_tracts_einsum() {
        // The decoder's own form (planes over more than one block, a partial last block),
        // and plain ones.
        check("mk,akbn->mbn", &[4, 32], &[1, 32, 50, 90]).expect("the decoder's form");
        check("mk,kn->mn", &[3, 5], &[5, 2049]).expect("rank 2");
        check("amk,akn->amn", &[1, 15, 8], &[1, 8, 100]).expect("a batch of one");
    }

    #[test]
    fn other_products_are_left_alone() {
        // Too many rows; the planes not k-major; the planes' axes swapped in the output.
        assert!(check("mk,kn->mn", &[16, 5], &[5, 64]).is_none());
        assert!(check("mk,nk->mn", &[4, 5], &[64, 5]).is_none());
        assert!(check("mk,kbn->mnb", &[4, 5], &[5, 3, 7]).is_none());
    }
}
