//! Products of an activation with a constant matrix (the dense layers of a transformer: a
//! `MatMul` by a weight, and the `Add` of its bias) run through our own kernel (gemm.rs)
//! instead of tract's.
//!
//! In the MobileSAM encoder these are the attention's qkv and output projections and the
//! MLPs: 51 of its 77.5 GFLOP. tract packs the activation before every product and its
//! kernel ran them well below the core's peak (docs/performance.md §3); ours reads the
//! activation's rows in place. In the SAM decoder the image tokens are stored channel-major
//! (`akm,kn->mn`: the activation is read transposed) and some products are written so
//! (`mbk,bkn->anm`); those rows go through the 8x8 transpose kernel a block at a time.
//!
//! Replaced: an `EinSum` of an f32 activation and an f32 constant where, size-1 axes
//! aside, the activation is a group of free axes and a group of contracted ones (either
//! first, each contiguous), the constant is the contracted group in the same order and one
//! output axis (first or last), and the output is the free group then that axis, or that
//! axis then the free group. A following `Add` of a constant that varies along the last
//! axis only is folded in as the bias, and a `GeluExact` after that (the first layer of
//! each encoder MLP, the first 1x1 convolution of each patch merging) as well: applied to
//! each block of rows as it leaves the kernel, while it is still in cache, instead of
//! passes of tract's over the whole activation (together 6 % of the encoder's time in
//! tract's profile, docs/performance.md).

use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::einsum::EinSum;
use tract_onnx::tract_core::ops::element_wise::ElementWiseOp;
use tract_onnx::tract_core::ops::nn::GeluExact;

use super::norm::LayerNorm;
use super::only_reader;
use super::tokens::GatherAdd;
use crate::kernels::conv::gelu;

use crate::kernels::gemm::{gemm, gemm_taps, Packed, Rows, PANEL};
use crate::kernels::transpose::transpose;

#[derive(Clone)]
pub struct Dense {
    weight: Arc<Packed>,
    layout: Layout,
    /// For an output written transposed from rows read in place: the weight `[columns][inputs]`
    /// and the bias, to compute the transposed output directly (the activation packed as the
    /// constant side) instead of writing each block's product through the transpose kernel.
    by_columns: Option<Arc<ByColumns>>,
    /// When not every row needs the product (ops/tokens.rs's window padding): the rows that
    /// do, the rest filled without it.
    subset: Option<Arc<RowSubset>>,
}

/// The rows a product computes, in runs, and what the others hold.
#[derive(Debug, PartialEq, Eq)]
pub struct RowSubset {
    runs: Vec<std::ops::Range<usize>>,
    rest: Rest,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rest {
    /// Nothing reads them: zeros, so that the output is still a function of the input.
    Zero,
    /// Their input rows are all the same as this (computed) row's.
    CopyOf(usize),
}

impl RowSubset {
    /// From whether each row is computed; `None` when all are.
    fn new(computed: impl Iterator<Item = bool>, rest: Rest) -> Option<Self> {
        let mut runs: Vec<std::ops::Range<usize>> = Vec::new();
        let mut rows = 0;
        for (r, computed) in computed.enumerate() {
            rows = r + 1;
            match runs.last_mut() {
                Some(run) if computed && run.end == r => run.end = r + 1,
                _ if computed => runs.push(r..r + 1),
                _ => {}
            }
        }
        (runs.iter().map(|r| r.len()).sum::<usize>() < rows).then_some(RowSubset { runs, rest })
    }
}

struct ByColumns {
    weight: Vec<f32>,
    bias: Vec<f32>,
}

/// Where the product's operands lie (size-1 axes aside): `rows` x `weight.inputs` read
/// from the activation, `rows` x `columns` written.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Layout {
    input: TVec<usize>,
    output: TVec<usize>,
    rows: usize,
    /// Real output columns (`weight.outputs` is padded to whole panels).
    columns: usize,
    /// The activation is `[inputs][rows]` instead of `[rows][inputs]`.
    read_transposed: bool,
    /// The output is `[columns][rows]` instead of `[rows][columns]`.
    write_transposed: bool,
    /// The exact GELU applied to the output.
    gelu: bool,
}

/// A product read and written row-major, for an op that runs it with another (ops/mlp.rs).
#[derive(Clone)]
pub struct RowMajor {
    pub weight: Arc<Packed>,
    /// The exact GELU applied to the output.
    pub gelu: bool,
    pub rows: usize,
    pub input: TVec<usize>,
    pub output: TVec<usize>,
}

/// The same when sharing their weights.
impl PartialEq for RowMajor {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.weight, &other.weight) && (self.gelu, self.rows) == (other.gelu, other.rows)
    }
}

impl Eq for RowMajor {}

/// Rows per block when a side is transposed (the block's scratch stays in L2).
const BLOCK_ROWS: usize = 192;

impl std::fmt::Debug for Dense {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let l = &self.layout;
        write!(f, "Dense({}x{}x{}", l.rows, self.weight.inputs, l.columns)?;
        if l.read_transposed {
            write!(f, ", read transposed")?;
        }
        if l.write_transposed {
            write!(f, ", written transposed")?;
        }
        if l.gelu {
            write!(f, ", GELU")?;
        }
        if let Some(subset) = &self.subset {
            write!(f, ", {} of {} rows", subset.runs.iter().map(|r| r.len()).sum::<usize>(), l.rows)?;
        }
        write!(f, ")")
    }
}

/// Two ops are the same when they share their weights.
impl PartialEq for Dense {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.weight, &other.weight) && self.layout == other.layout && self.subset == other.subset
    }
}

impl Eq for Dense {}

impl Op for Dense {
    fn name(&self) -> StaticName {
        "Dense".into()
    }

    op_as_typed_op!();
}

impl EvalOp for Dense {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let Some(input) = inputs.first() else { bail!("Dense: no input") };
        if input.shape() != &*self.layout.input {
            bail!("Dense: input {:?}, planned for {:?}", input.shape(), self.layout.input);
        }
        // `run` writes every output element.
        super::eval_filled(input, &self.layout.output, |a, out| self.run(a, out))
    }
}

impl TypedOp for Dense {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let Some(input) = inputs.first() else { bail!("Dense: no input") };
        if input.shape.as_concrete() != Some(&*self.layout.input) {
            bail!("Dense: input {:?}, planned for {:?}", input.shape, self.layout.input);
        }
        Ok(tvec!(f32::fact(self.layout.output.clone())))
    }

    as_op!();
}

impl Dense {
    /// This product when it reads and writes rows in place (no transposed side).
    pub fn row_major(&self) -> Option<RowMajor> {
        let l = &self.layout;
        (self.by_columns.is_none() && !l.read_transposed && !l.write_transposed).then(|| RowMajor {
            weight: self.weight.clone(),
            gelu: l.gelu,
            rows: l.rows,
            input: l.input.clone(),
            output: l.output.clone(),
        })
    }

    fn run(&self, a: &[f32], out: &mut [f32]) {
        let (l, w) = (&self.layout, &*self.weight);
        let k = w.inputs;
        if let Some(by) = &self.by_columns {
            // out^T = W^T a^T: the rows of W^T against the activation packed in panels of
            // rows (the vector transpose), written in place; then each column's bias.
            let mut packed = Packed::empty();
            packed.refill([k, l.rows], a, 0, [1, k]);
            gemm(&by.weight, &packed, out);
            for (row, &bias) in out.chunks_exact_mut(l.rows).zip(&by.bias) {
                row.iter_mut().for_each(|v| *v += bias);
                if l.gelu {
                    gelu(row);
                }
            }
            return;
        }
        if !l.read_transposed && !l.write_transposed {
            let n = w.outputs;
            let Some(subset) = &self.subset else { return self.rows(a, out) };
            for run in &subset.runs {
                self.rows(&a[run.start * k..run.end * k], &mut out[run.start * n..run.end * n]);
            }
            // The gaps after every run is computed: a copied row may lie after them.
            let mut done = 0;
            for run in &subset.runs {
                self.rest(subset.rest, out, done..run.start);
                done = run.end;
            }
            return self.rest(subset.rest, out, done..l.rows);
        }
        // A transposed activation is read in place, column by column, by the 12-row AVX-512
        // tile; the AVX2 tile's 6 rows use only 6 values of each line such a read fetches
        // (the lines 16 KB apart for the SAM decoder's tokens, aliasing in L1): its block is
        // transposed first (measured: the decoder's read-transposed products 4.0-4.8 ->
        // 3.7-4.0 ms on AMD EPYC Zen 4, docs/performance.md §6l).
        let in_place = crate::kernels::cpu() != crate::kernels::Cpu::Avx2Fma;
        SCRATCH.with_borrow_mut(|[product, block]| {
            for r0 in (0..l.rows).step_by(BLOCK_ROWS) {
                let count = BLOCK_ROWS.min(l.rows - r0);
                let rows = match (l.read_transposed, in_place) {
                    (true, true) => Rows::column_major(a, l.rows, r0, count),
                    (true, false) => {
                        block.resize(count * k, 0.0);
                        transpose(&a[r0..], l.rows, block, k, [k, count]);
                        Rows::row_major(block, k)
                    }
                    (false, _) => Rows::row_major(&a[r0 * k..][..count * k], k),
                };
                if l.write_transposed {
                    product.resize(count * w.outputs, 0.0);
                    gemm_taps(rows, w, product);
                    if l.gelu {
                        gelu(product);
                    }
                    transpose(product, w.outputs, &mut out[r0..], l.rows, [count, l.columns]);
                } else {
                    let out = &mut out[r0 * w.outputs..][..count * w.outputs];
                    gemm_taps(rows, w, out);
                    if l.gelu {
                        gelu(out);
                    }
                }
            }
        })
    }

    /// Rows read and written in place.
    fn rows(&self, a: &[f32], out: &mut [f32]) {
        let w = &*self.weight;
        if !self.layout.gelu {
            return gemm(a, w, out);
        }
        // Block by block, so that each block's GELU finds it in cache.
        for (a, out) in a.chunks(BLOCK_ROWS * w.inputs).zip(out.chunks_mut(BLOCK_ROWS * w.outputs)) {
            gemm(a, w, out);
            gelu(out);
        }
    }

    /// Rows `range` of `out` not computed.
    fn rest(&self, rest: Rest, out: &mut [f32], range: std::ops::Range<usize>) {
        let n = self.weight.outputs;
        match rest {
            Rest::Zero => out[range.start * n..range.end * n].fill(0.0),
            Rest::CopyOf(from) => range.for_each(|r| out.copy_within(from * n..(from + 1) * n, r * n)),
        }
    }
}

thread_local! {
    /// A block's product before it is written transposed, and a block read transposed.
    static SCRATCH: std::cell::RefCell<[Vec<f32>; 2]> = const { std::cell::RefCell::new([Vec::new(), Vec::new()]) };
}

/// Frees this thread's buffers (at the end of a run: [`super::RunScope`]); the bytes they held.
pub(crate) fn release_scratch() -> usize {
    SCRATCH.take().iter().map(|v| v.capacity() * size_of::<f32>()).sum()
}

/// Replaces each suitable `EinSum` (and the bias `Add` after it) of a decluttered model.
pub fn replace_dense(model: TypedModel) -> TractResult<TypedModel> {
    super::replace_each::<EinSum, _>(model, "dense", dense_for)
}

/// An einsum's axes with their sizes, size-1 axes left out (they do not move memory).
pub(super) fn sized(labels: &str, shape: &[usize]) -> Option<Vec<(char, usize)>> {
    let labels: Vec<char> = labels.chars().collect();
    (labels.len() == shape.len()).then(|| labels.into_iter().zip(shape.iter().copied()).filter(|a| a.1 != 1).collect())
}

fn labels(axes: &[(char, usize)]) -> Vec<char> {
    axes.iter().map(|a| a.0).collect()
}

/// The op for node `id`, and the outlet it stands for (the bias `Add`'s, when folded).
fn dense_for(model: &TypedModel, id: usize) -> TractResult<Option<(Dense, OutletId)>> {
    let node = model.node(id);
    let Some(einsum) = node.op_as::<EinSum>() else { return Ok(None) };
    if einsum.q_params.is_some() || einsum.operating_dt != f32::datum_type() || node.inputs.len() != 2 {
        return Ok(None);
    }
    let (a_fact, b_fact) = (model.outlet_fact(node.inputs[0])?, model.outlet_fact(node.inputs[1])?);
    let Some(b) = b_fact.konst.as_ref().filter(|b| b.datum_type() == f32::datum_type()) else {
        return Ok(None);
    };
    let out_fact = model.outlet_fact(OutletId::new(id, 0))?;
    let (Some(a_shape), Some(out_shape)) = (a_fact.shape.as_concrete(), out_fact.shape.as_concrete()) else {
        return Ok(None);
    };
    if a_fact.datum_type != f32::datum_type() {
        return Ok(None);
    }
    let (inputs, outputs) = einsum.axes.to_strs();
    let ([sa, sb], [so]) = (&inputs[..], &outputs[..]) else { return Ok(None) };
    let (Some(a), Some(w), Some(o)) = (sized(sa, a_shape), sized(sb, b.shape()), sized(so, out_shape)) else {
        return Ok(None);
    };
    // The constant: the contracted group, then or after it the output axis.
    let Some(n_at) = w.iter().position(|(c, _)| !a.iter().any(|x| x.0 == *c)) else { return Ok(None) };
    let (n_axis, n) = w[n_at];
    let contracted: Vec<(char, usize)> = w.iter().copied().filter(|x| x.0 != n_axis).collect();
    let n_last = n_at == w.len() - 1;
    if w.len() < 2 || (n_at != 0 && !n_last) {
        return Ok(None);
    }
    // The activation: free group and contracted group, one after the other.
    let free: Vec<(char, usize)> = a.iter().copied().filter(|x| !contracted.contains(x)).collect();
    let read_transposed = if a == [free.clone(), contracted.clone()].concat() {
        false
    } else if a == [contracted.clone(), free.clone()].concat() {
        true
    } else {
        return Ok(None);
    };
    // The output: free group and the output axis.
    let write_transposed = if labels(&o) == [labels(&free), vec![n_axis]].concat() {
        false
    } else if labels(&o) == [vec![n_axis], labels(&free)].concat() {
        true
    } else {
        return Ok(None);
    };
    let k: usize = contracted.iter().map(|x| x.1).product();
    let rows: usize = free.iter().map(|x| x.1).product();
    let Some(n_pos) = so.chars().position(|c| c == n_axis) else { return Ok(None) };
    let (bias, mut replaced) = match bias_after(model, id, n, n_pos)? {
        Some((bias, add)) => (bias, OutletId::new(add, 0)),
        None => (vec![0.0; n], OutletId::new(id, 0)),
    };
    let gelu = {
        let after = gelu_after(model, replaced)?;
        replaced = after.unwrap_or(replaced);
        after.is_some()
    };
    let view = b.try_as_plain_ram()?;
    let data = view.as_slice::<f32>()?;
    let padded = n.div_ceil(PANEL) * PANEL;
    if padded != n && !write_transposed {
        return Ok(None);
    }
    let mut weight = Packed::empty();
    let strides = if n_last { [n, 1] } else { [1, k] };
    weight.refill([k, n], data, 0, strides);
    // Whole panels of rows: the transposed output is then the product's own layout.
    let by_columns = (write_transposed && !read_transposed && rows.is_multiple_of(PANEL)).then(|| {
        let weight = (0..n * k).map(|j| data[(j % k) * strides[0] + (j / k) * strides[1]]).collect();
        Arc::new(ByColumns { weight, bias: bias.clone() })
    });
    let Some(weight) = weight.with_bias(bias) else { return Ok(None) };
    let layout = Layout {
        input: a_shape.into(),
        output: out_shape.into(),
        rows,
        columns: n,
        read_transposed,
        write_transposed,
        gelu,
    };
    Ok(Some((Dense { weight: Arc::new(weight), layout, by_columns, subset: None }, replaced)))
}

/// Narrows each row-major product to the rows that need it: TinyViT pads each stage's
/// token map to whole windows, and its attention's qkv and output projections ran on the
/// padding too (a fifth of the rows in stages 3 and 4). A product whose input is a layer
/// normalisation gathering zero rows computes the first of them and copies it to the others
/// (the same input row gives the same output row); one whose output is read only through a
/// [`GatherAdd`](super::tokens::GatherAdd) (the window merge, which crops the padding)
/// computes only the rows it reads.
pub fn skip_unneeded_rows(mut model: TypedModel) -> TractResult<TypedModel> {
    let products: Vec<usize> = model.nodes().iter().filter(|n| n.op_is::<Dense>()).map(|n| n.id).collect();
    for id in products {
        let node = model.node(id);
        let Some(dense) = node.op_as::<Dense>().filter(|d| d.row_major().is_some() && d.subset.is_none()) else {
            continue;
        };
        let rows = dense.layout.rows;
        let input = node.inputs[0];
        // The `GatherAdd` that is the product's only reader, reading it as the gathered rows.
        let output = OutletId::new(id, 0);
        let gathered_by = match model.outlet_successors(output) {
            [reader] if reader.slot == 1 && !model.output_outlets()?.contains(&output) => {
                model.node(reader.node).op_as::<GatherAdd>()
            }
            _ => None,
        };
        let subset = if let Some(zero_rows) = model
            .node(input.node)
            .op_as::<LayerNorm>()
            .filter(|_| only_reader(&model, input, id).unwrap_or(false))
            .and_then(|norm| norm.zero_rows())
            .filter(|z| z.len() == rows)
        {
            let first = zero_rows.iter().position(|&z| z);
            first.and_then(|first| {
                let computed = zero_rows.iter().enumerate().map(|(r, &z)| !z || r == first);
                RowSubset::new(computed, Rest::CopyOf(first))
            })
        } else if let Some(gather) = gathered_by {
            let read = gather.rows_read().filter(|read| read.len() == rows);
            read.and_then(|read| RowSubset::new(read.into_iter(), Rest::Zero))
        } else {
            None
        };
        if let Some(subset) = subset {
            let op = Dense { subset: Some(Arc::new(subset)), ..dense.clone() };
            model.node_mut(id).op = Box::new(op);
        }
    }
    Ok(model)
}

/// When node `id`'s only reader is an `Add` of an f32 constant of `n` values along the
/// output's axis `n_pos` (`[1, .., 1, n]` for a row-major output, `[1, n, 1, 1]` for a
/// convolution's channels): that constant and the `Add`.
fn bias_after(model: &TypedModel, id: usize, n: usize, n_pos: usize) -> TractResult<Option<(Vec<f32>, usize)>> {
    super::const_after(model, OutletId::new(id, 0), "Add", n, n_pos)
}

/// When `outlet`'s only reader is tract's exact GELU (f32 in, f32 out): that op's outlet.
pub(super) fn gelu_after(model: &TypedModel, outlet: OutletId) -> TractResult<Option<OutletId>> {
    let [reader] = model.outlet_successors(outlet) else { return Ok(None) };
    let node = model.node(reader.node);
    let is_gelu = node.op_as::<ElementWiseOp>().is_some_and(|op| op.0.is::<GeluExact>() && op.1.is_none());
    if !is_gelu || model.output_outlets()?.contains(&outlet) {
        return Ok(None);
    }
    Ok(Some(OutletId::new(node.id, 0)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::noise;
    use tract_onnx::tract_core::ops::binary::TypedBinOp;

    fn values(n: usize, seed: f32) -> Vec<f32> {
        (0..n).map(|i| (i as f32 * 0.37 + seed).sin()).collect()
    }

    /// Ours against tract's own EinSum for `expr` on an activation of shape `a` and a
    /// constant of shape `b`; `None` when the form is not recognised.
    fn check(expr: &str, a: &[usize], b: &[usize]) -> Option<Layout> {
        let ta = Tensor::from_shape(a, &values(a.iter().product(), 0.3)).unwrap();
        let tb = Tensor::from_shape(b, &values(b.iter().product(), 1.7)).unwrap();
        let einsum = EinSum::new(expr.parse().unwrap(), f32::datum_type());
        let mut model = TypedModel::default();
        let sa = model.add_source("a", f32::fact(a)).unwrap();
        let sb = model.add_const("b", tb.clone()).unwrap();
        let out = model.wire_node("einsum", einsum.clone(), &[sa, sb]).unwrap();
        let (op, _) = dense_for(&model, out[0].node).unwrap()?;
        let ctx = EvalContext::out_of_plan();
        let ours = op.eval(&ctx, tvec!(ta.clone().into_tvalue())).unwrap();
        let theirs = einsum.eval(&ctx, tvec!(ta.into_tvalue(), tb.into_tvalue())).unwrap();
        let (x, y) = (ours[0].to_plain_array_view::<f32>().unwrap(), theirs[0].to_plain_array_view::<f32>().unwrap());
        assert_eq!(x.shape(), y.shape(), "{expr}");
        for (x, y) in x.iter().zip(y.iter()) {
            assert!((x - y).abs() < 1e-4, "{expr}: {x} vs {y}");
        }
        Some(op.layout)
    }

    #[test]
    fn every_layout_of_the_encoder_and_decoder_matches_tracts_einsum() {
        // (expression, activation, constant, read transposed, written transposed); row
        // counts beyond one block and partial panels (columns 20) where written transposed.
        type Case<'a> = (&'a str, &'a [usize], &'a [usize], bool, bool);
        let cases: [Case; 9] = [
            ("amk,kn->amn", &[1, 13, 24], &[24, 32], false, false),
            ("ambk,bkn->amn", &[2, 7, 3, 8], &[3, 8, 16], false, false),
            ("amk,kn->mn", &[1, 7, 40], &[40, 48], false, false),
            ("akm,kn->mn", &[1, 24, 400], &[24, 32], true, false),
            ("akbm,kn->bmn", &[1, 24, 20, 21], &[24, 16], true, false),
            ("mbk,bkn->anm", &[300, 2, 8], &[2, 8, 20], false, true),
            // Whole panels of rows: computed by columns.
            ("mbk,bkn->anm", &[320, 2, 8], &[2, 8, 20], false, true),
            ("NIHW,OI->NOHW", &[1, 16, 15, 17], &[20, 16], true, true),
            ("mk,kn->amn", &[7, 64], &[64, 16], false, false),
        ];
        for (expr, a, b, read, write) in cases {
            let layout = check(expr, a, b).unwrap_or_else(|| panic!("{expr} not recognised"));
            assert_eq!((layout.read_transposed, layout.write_transposed), (read, write), "{expr}");
        }
    }

    #[test]
    fn a_subset_of_rows_is_computed_and_the_rest_copied_or_zeroed() {
        // 30 rows: runs of several rows, a single row, and gaps at both ends.
        let (a, b) = ([1, 30, 24], [24, 32]);
        let ta = Tensor::from_shape(&a, &values(a.iter().product(), 0.3)).unwrap();
        let mut model = TypedModel::default();
        let sa = model.add_source("a", f32::fact(a)).unwrap();
        let sb = model.add_const("b", Tensor::from_shape(&b, &values(b.iter().product(), 1.7)).unwrap()).unwrap();
        let einsum = EinSum::new("amk,kn->amn".parse().unwrap(), f32::datum_type());
        let out = model.wire_node("einsum", einsum, &[sa, sb]).unwrap();
        let (whole, _) = dense_for(&model, out[0].node).unwrap().unwrap();
        let run = |op: &Dense| {
            let out = op.eval(&EvalContext::out_of_plan(), tvec!(ta.clone().into_tvalue())).unwrap();
            out[0].to_plain_array_view::<f32>().unwrap().iter().copied().collect::<Vec<f32>>()
        };
        let all = run(&whole);
        let computed = |r: usize| (3..9).contains(&r) || r == 12 || (20..27).contains(&r);
        for rest in [Rest::Zero, Rest::CopyOf(12)] {
            let subset = RowSubset::new((0..30).map(computed), rest).unwrap();
            assert_eq!(subset.runs, [3..9, 12..13, 20..27]);
            let ours = run(&Dense { subset: Some(Arc::new(subset)), ..whole.clone() });
            for (r, (row, want)) in ours.chunks(32).zip(all.chunks(32)).enumerate() {
                let want = match rest {
                    _ if computed(r) => want,
                    Rest::Zero => &[0.0; 32][..],
                    Rest::CopyOf(from) => &all[from * 32..][..32],
                };
                assert_eq!(row, want, "row {r}, {rest:?}");
            }
        }
        // Every row computed: no subset.
        assert!(RowSubset::new((0..30).map(|_| true), Rest::Zero).is_none());
    }

    /// `expr` on `a`, plus a bias along the output axis `n` (the constant's axis that is
    /// not contracted), then tract's exact GELU: the whole chain becomes one `Dense` with
    /// its GELU, and gives what tract's three ops give.
    fn check_fused_gelu(expr: &str, a: &[usize], b: &[usize]) {
        let (inputs, output) = expr.split_once("->").unwrap();
        let (sa, sb) = inputs.split_once(',').unwrap();
        let n_at = sb.chars().position(|c| !sa.contains(c)).unwrap();
        let n_axis = sb.chars().nth(n_at).unwrap();
        let n = b[n_at];
        let mut model = TypedModel::default();
        let sa = model.add_source("a", f32::fact(a)).unwrap();
        let weight = Tensor::from_shape(b, &noise(b.iter().product(), 17)).unwrap();
        let sb = model.add_const("b", weight).unwrap();
        let product = model.wire_node("einsum", EinSum::new(expr.parse().unwrap(), f32::datum_type()), &[sa, sb]);
        let bias_shape: Vec<usize> = output.chars().map(|c| if c == n_axis { n } else { 1 }).collect();
        let bias = model.add_const("bias", Tensor::from_shape(&bias_shape, &values(n, 2.9)).unwrap()).unwrap();
        let add = TypedBinOp(Box::new(tract_onnx::tract_core::ops::math::Add), None);
        let added = model.wire_node("add", add, &[product.unwrap()[0], bias]).unwrap();
        let gelu = ElementWiseOp(Box::new(GeluExact {}), None);
        let out = model.wire_node("gelu", gelu, &added).unwrap();
        model.select_output_outlets(&out).unwrap();
        // Values of either sign, a few units wide, so the GELU's bend is exercised.
        let input = Tensor::from_shape(a, &noise(a.iter().product(), 3)).unwrap();
        let run = |model: TypedModel| {
            let out = model.into_runnable().unwrap().run(tvec!(input.clone().into_tvalue())).unwrap();
            out[0].to_plain_array_view::<f32>().unwrap().to_owned()
        };
        let theirs = run(model.clone());
        let fused = replace_dense(model).unwrap();
        let ops: Vec<String> = fused.nodes().iter().map(|n| format!("{:?}", n.op)).collect();
        assert!(ops.iter().any(|op| op.contains("GELU")), "{expr}: {ops:?}");
        assert!(!fused.nodes().iter().any(|n| n.op_is::<ElementWiseOp>()), "{expr}: {ops:?}");
        let ours = run(fused);
        assert_eq!(ours.shape(), theirs.shape(), "{expr}");
        let spread = theirs.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(spread > 2.0 && theirs.iter().any(|&v| v < -0.05), "{expr}: inputs too tame");
        for (x, y) in ours.iter().zip(theirs.iter()) {
            assert!((x - y).abs() < 1e-4 * (1.0 + y.abs()), "{expr}: {x} vs {y}");
        }
    }

    #[test]
    fn a_bias_and_an_exact_gelu_after_a_product_are_folded_in() {
        // Rows over one block (BLOCK_ROWS), read in place, read transposed, and read and
        // written transposed (a 1x1 convolution, its bias per channel, 20 of a panel's 32).
        check_fused_gelu("amk,kn->amn", &[1, 300, 24], &[24, 48]);
        check_fused_gelu("akm,kn->amn", &[1, 64, 400], &[64, 32]);
        check_fused_gelu("NIHW,OI->NOHW", &[1, 64, 15, 17], &[20, 64]);
    }

    #[test]
    fn products_we_cannot_read_in_blocks_are_left_alone() {
        // A batch axis kept in the output; free axes split around the contracted one; an
        // output of a partial panel written row-major.
        assert!(check("bmk,bkn->bmn", &[2, 5, 8], &[2, 8, 16]).is_none());
        assert!(check("mkn,kp->mnp", &[3, 8, 5], &[8, 16]).is_none());
        assert!(check("mk,kn->mn", &[3, 8], &[8, 20]).is_none());
    }
}
