//! Batched products of two activations (windowed attention: `q k^T` and `attention v`)
//! through our product kernel (gemm.rs).
//!
//! TinyViT's attention multiplies, per window and head, a 49x32 (or 196x32) query block by
//! the keys, then the 49x49 (196x196) weights by the values: thousands of small products a
//! run. tract packs both operands of each, which made them far slower than onnxruntime's
//! (docs/performance.md §3 item 12). This op gathers each pair's left block into contiguous
//! rows, packs the right one into a reused buffer (zero-padded to whole panels),
//! multiplies, and scatters the rows into the output. It replaces a rank-4 f32 `EinSum` of
//! two non-constant operands with two batch axes, one contracted axis and one free axis per
//! operand, in any layout (`ambk,anbk->abmn`, `abmk,akbn->ambn`), and the rank-3 ones with
//! one batch axis (the SAM decoder's attention, per head: `mbk,nbk->bmn`, `bmk,kbn->mbn`),
//! seen as rank 4 with a batch axis of one.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::array::Slice;
use tract_onnx::tract_core::ops::einsum::EinSum;

use crate::kernels::gemm::{gemm_rows_apart, gemm_taps, Packed, Rows, PANEL};

/// Products with fewer rows than [`FEW_ROWS`] and at least [`MANY_COLUMNS`] columns are
/// computed transposed (a product of few rows by few columns, such as the decoder's
/// attention times its values, 7 x 16, is faster as it is: measured).
const FEW_ROWS: usize = 16;
const MANY_COLUMNS: usize = 64;

/// One operand of a batch's product: its data, where the batch starts, the strides of its
/// free axis and its contracted one, and their sizes.
#[derive(Clone, Copy)]
pub(crate) struct Side<'a> {
    pub data: &'a [f32],
    pub at: usize,
    pub free: usize,
    pub k: usize,
    pub rows: usize,
    pub depth: usize,
}

/// Where each logical axis is in each operand: `[batch0, batch1, free, contracted]` for
/// the inputs (free = m for A, n for B), `[batch0, batch1, m, n]` for the output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchedMatMul {
    a: [usize; 4],
    b: [usize; 4],
    out: [usize; 4],
    /// 4, or 3 when every position above counts a leading axis of one that is not there.
    rank: usize,
    /// Operands read in place from the tensor they are a slice of (the query, key and value
    /// thirds of an attention's qkv projection): tract's `Slice` copied each of them whole.
    views: [Option<View>; 2],
}

/// An operand that is `len` positions of `axis` of a `shape`d input, from `start`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct View {
    shape: TVec<usize>,
    axis: usize,
    start: usize,
    len: usize,
}

/// A rank-3 shape with the leading axis of one it is seen with.
fn lift(shape: &[usize]) -> TVec<usize> {
    if shape.len() == 3 {
        [1].iter().chain(shape).copied().collect()
    } else {
        shape.into()
    }
}

impl Op for BatchedMatMul {
    fn name(&self) -> StaticName {
        "BatchedMatMul".into()
    }

    op_as_typed_op!();
}

fn strides(shape: &[usize]) -> [usize; 4] {
    let mut s = [1usize; 4];
    for i in (0..3).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

impl BatchedMatMul {
    /// Operand `i`'s shape (a view's, when it is read through one) and where it starts in
    /// the input, from the input's shape; checked against the plan.
    fn operand(&self, i: usize, input: &[usize]) -> TractResult<(TVec<usize>, usize)> {
        let Some(view) = &self.views[i] else { return Ok((input.into(), 0)) };
        if input != &*view.shape {
            bail!("BatchedMatMul: input {input:?}, planned for {:?}", view.shape);
        }
        let mut shape: TVec<usize> = input.into();
        shape[view.axis] = view.len;
        let stride: usize = input[view.axis + 1..].iter().product();
        Ok((shape, view.start * stride))
    }

    /// `[batch0, batch1, m, n, k]` from the input shapes, checked.
    fn dims(&self, a: &[usize], b: &[usize]) -> TractResult<[usize; 5]> {
        if a.len() != self.rank || b.len() != self.rank {
            bail!("BatchedMatMul: rank-{} inputs expected, got {a:?} and {b:?}", self.rank);
        }
        let (a, b) = (lift(a), lift(b));
        let (ax, bx) = (|i: usize| a[self.a[i]], |i: usize| b[self.b[i]]);
        if ax(0) != bx(0) || ax(1) != bx(1) || ax(3) != bx(3) {
            bail!("BatchedMatMul: inputs {a:?} and {b:?} do not match");
        }
        Ok([ax(0), ax(1), ax(2), bx(2), ax(3)])
    }

    /// The output's shape, seen as rank 4.
    fn output_shape(&self, [b0, b1, m, n, _]: [usize; 5]) -> TVec<usize> {
        let mut shape = tvec![0; 4];
        for (logical, size) in [b0, b1, m, n].into_iter().enumerate() {
            shape[self.out[logical]] = size;
        }
        shape
    }
}

impl EvalOp for BatchedMatMul {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let [a, b] = &inputs[..] else { bail!("BatchedMatMul: two inputs expected") };
        let g = self.geometry(a.shape(), b.shape())?;
        let (a_view, b_view) = (a.try_as_plain_ram()?, b.try_as_plain_ram()?);
        let (a, b) = (a_view.as_slice::<f32>()?, b_view.as_slice::<f32>()?);
        // SAFETY: every (batch, m, n) element is written below.
        let mut output = unsafe { Tensor::uninitialized::<f32>(&g.output[4 - self.rank..])? };
        {
            let mut out_view = output.try_as_plain_ram_mut()?;
            let out = out_view.as_slice_mut::<f32>()?;
            let mut scratch = Scratch::default();
            let [b0, b1, ..] = g.dims;
            for i in 0..b0 {
                for j in 0..b1 {
                    let (left, right) = self.sides(&g, a, b, [i, j]);
                    multiply(left, right, &mut scratch, out, self.placed(&g, [i, j]));
                }
            }
        }
        Ok(tvec!(output.into_tvalue()))
    }
}

/// Where a product's operands and output lie, from the inputs' shapes (checked).
pub(crate) struct Geometry {
    /// `[batch0, batch1, m, n, k]`.
    pub dims: [usize; 5],
    /// The output's shape, seen as rank 4.
    pub output: TVec<usize>,
    strides: [[usize; 4]; 3],
    starts: [usize; 2],
}

/// The buffers one batch's product uses: the right operand packed, and the product.
pub(crate) struct Scratch {
    packed: Packed,
    product: Vec<f32>,
}

impl Default for Scratch {
    fn default() -> Self {
        Scratch { packed: Packed::empty(), product: Vec::new() }
    }
}

/// Where one batch's output goes: its first element, then the strides of its rows and
/// of its columns.
pub(crate) type Placement = [usize; 3];

impl BatchedMatMul {
    /// 4, or 3 for a product without its first batch axis.
    pub(crate) fn rank(&self) -> usize {
        self.rank
    }

    /// The output is `[batch0, batch1, m, n]` in that order.
    pub(crate) fn writes_in_order(&self) -> bool {
        self.out == [0, 1, 2, 3]
    }

    /// The left operand is a whole input (no view), `[batch0, batch1, m, k]` in that order.
    pub(crate) fn reads_left_in_order(&self) -> bool {
        self.a == [0, 1, 2, 3] && self.views[0].is_none()
    }

    pub(crate) fn geometry(&self, a: &[usize], b: &[usize]) -> TractResult<Geometry> {
        let ((a_shape, a_at), (b_shape, b_at)) = (self.operand(0, a)?, self.operand(1, b)?);
        let dims = self.dims(&a_shape, &b_shape)?;
        let output = self.output_shape(dims);
        // Strides are the inputs' own: a view is read in place.
        let strides = [strides(&lift(a)), strides(&lift(b)), strides(&output)];
        Ok(Geometry { dims, output, strides, starts: [a_at, b_at] })
    }

    /// Batch `(i, j)`'s operands.
    pub(crate) fn sides<'a>(
        &self,
        g: &Geometry,
        a: &'a [f32],
        b: &'a [f32],
        [i, j]: [usize; 2],
    ) -> (Side<'a>, Side<'a>) {
        let [sa, sb, _] = g.strides;
        let [_, _, m, n, k] = g.dims;
        let side = |data, at: usize, s: [usize; 4], p: [usize; 4], free| Side {
            data,
            at: at + i * s[p[0]] + j * s[p[1]],
            free: s[p[2]],
            k: s[p[3]],
            rows: free,
            depth: k,
        };
        (side(a, g.starts[0], sa, self.a, m), side(b, g.starts[1], sb, self.b, n))
    }

    /// Where batch `(i, j)`'s output goes.
    pub(crate) fn placed(&self, g: &Geometry, [i, j]: [usize; 2]) -> Placement {
        let so = g.strides[2];
        [i * so[self.out[0]] + j * so[self.out[1]], so[self.out[2]], so[self.out[3]]]
    }
}

/// One batch's product: `a` (m x k) times `b` (its n x k seen transposed) into `out` as
/// `placed` says.
pub(crate) fn multiply(a: Side<'_>, b: Side<'_>, scratch: &mut Scratch, out: &mut [f32], placed: Placement) {
    let Scratch { packed, product } = scratch;
    let (from, swap, cols) = pack(a, b, packed);
    let [o_at, o_m, o_n] = placed;
    let (o_row, o_col) = if swap { (o_n, o_m) } else { (o_m, o_n) };
    if o_col == 1 && cols == packed.outputs && o_row >= cols {
        // Rows contiguous and no panel padding: written where they belong (attention's
        // values per head, rows of all heads apart), not copied there from a scratch.
        return gemm_rows_apart(from, packed, &mut out[o_at..], o_row);
    }
    product.resize(from.count * packed.outputs, 0.0);
    gemm_taps(from, packed, product);
    for (r, row) in product.chunks_exact(packed.outputs).enumerate() {
        let to = o_at + r * o_row;
        if o_col == 1 {
            out[to..to + cols].copy_from_slice(&row[..cols]);
        } else {
            row[..cols].iter().enumerate().for_each(|(c, &v)| out[to + c * o_col] = v);
        }
    }
}

/// The same product written as `[m][padded_width(n)]` into `out`, a caller's own buffer:
/// the panel padding left in place between the rows (for attention's scores, then read
/// in place as the next product's rows).
pub(crate) fn multiply_padded(a: Side<'_>, b: Side<'_>, scratch: &mut Scratch, out: &mut [f32]) {
    let (m, n) = (a.rows, b.rows);
    assert_eq!(out.len(), m * padded_width(n), "multiply_padded: a [m][padded n] output");
    if swaps(m, n) {
        return multiply(a, b, scratch, out, [0, padded_width(n), 1]);
    }
    let (from, _, _) = pack(a, b, &mut scratch.packed);
    gemm_taps(from, &scratch.packed, out)
}

/// Values per row of a product of `n` columns written with its panel padding.
pub(crate) fn padded_width(n: usize) -> usize {
    n.div_ceil(PANEL) * PANEL
}

/// Whether an `m` x `n` product is computed transposed: few rows by many columns (the
/// SAM decoder's 7 tokens against 4096 image tokens); the wide operand is then read in
/// place as the rows, and only the narrow one is packed.
fn swaps(m: usize, n: usize) -> bool {
    m < FEW_ROWS && n >= MANY_COLUMNS
}

/// The narrower operand packed: the rows read in place, whether the product is computed
/// transposed, and its real column count.
fn pack<'a>(a: Side<'a>, b: Side<'a>, packed: &mut Packed) -> (Rows<'a>, bool, usize) {
    let swap = swaps(a.rows, b.rows);
    let (left, right) = if swap { (b, a) } else { (a, b) };
    packed.refill([a.depth, right.rows], right.data, right.at, [right.k, right.free]);
    // Read in place: rows `free` apart, a row's inputs `k` apart.
    let from = Rows { a: &left.data[left.at..], count: left.rows, stride: left.free, step: left.k, taps: &[0] };
    (from, swap, right.rows)
}

impl TypedOp for BatchedMatMul {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let [a, b] = inputs else { bail!("BatchedMatMul: two inputs expected") };
        let (Some(sa), Some(sb)) = (a.shape.as_concrete(), b.shape.as_concrete()) else {
            bail!("BatchedMatMul: symbolic shapes")
        };
        let (sa, sb) = (self.operand(0, sa)?.0, self.operand(1, sb)?.0);
        Ok(tvec!(f32::fact(&self.output_shape(self.dims(&sa, &sb)?)[4 - self.rank..])))
    }

    as_op!();
}

/// Replaces each suitable `EinSum` of a decluttered model.
pub fn replace_batched(model: TypedModel) -> TractResult<TypedModel> {
    super::replace_in_place::<EinSum, _>(model, |model, id| {
        let Some(mut op) = batched_for(model, id)? else { return Ok(None) };
        let mut inputs = model.node(id).inputs.clone();
        for (slot, input) in inputs.iter_mut().enumerate() {
            if let Some((whole, view)) = sliced(model, *input)? {
                *input = whole;
                op.views[slot] = Some(view);
            }
        }
        Ok(Some((op, inputs)))
    })
}

/// When `outlet` is a `Slice` (concrete bounds) of an f32 tensor of concrete shape: that
/// tensor and the view.
fn sliced(model: &TypedModel, outlet: OutletId) -> TractResult<Option<(OutletId, View)>> {
    let node = model.node(outlet.node);
    let Some(slice) = node.op_as::<Slice>() else { return Ok(None) };
    let Some(&whole) = node.inputs.first() else { return Ok(None) };
    let fact = model.outlet_fact(whole)?;
    let (Some(shape), Ok(start), Ok(end)) = (fact.shape.as_concrete(), slice.start.to_usize(), slice.end.to_usize())
    else {
        return Ok(None);
    };
    if fact.datum_type != f32::datum_type() || end <= start || shape.get(slice.axis).is_none_or(|&d| end > d) {
        return Ok(None);
    }
    Ok(Some((whole, View { shape: shape.into(), axis: slice.axis, start, len: end - start })))
}

fn batched_for(model: &TypedModel, id: usize) -> TractResult<Option<BatchedMatMul>> {
    let node = model.node(id);
    let Some(einsum) = node.op_as::<EinSum>() else { return Ok(None) };
    if einsum.q_params.is_some() || einsum.operating_dt != f32::datum_type() || node.inputs.len() != 2 {
        return Ok(None);
    }
    for input in &node.inputs {
        let fact = model.outlet_fact(*input)?;
        let concrete = fact.shape.as_concrete().is_some_and(|s| s.len() == 3 || s.len() == 4);
        if fact.datum_type != f32::datum_type() || fact.konst.is_some() || !concrete {
            return Ok(None);
        }
    }
    let (inputs, outputs) = einsum.axes.to_strs();
    let ([sa, sb], [so]) = (&inputs[..], &outputs[..]) else { return Ok(None) };
    let rank = sa.chars().count();
    // A rank-3 product gets a first batch axis of one, `#` (never an einsum label).
    let lifted = |s: &str| -> Vec<char> { (if rank == 3 { "#" } else { "" }).chars().chain(s.chars()).collect() };
    let (a, b, o) = (lifted(sa), lifted(sb), lifted(so));
    if a.len() != 4 || b.len() != 4 || o.len() != 4 {
        return Ok(None);
    }
    let batch: Vec<char> = o.iter().copied().filter(|c| a.contains(c) && b.contains(c)).collect();
    let only = |v: Vec<char>| if v.len() == 1 { Some(v[0]) } else { None };
    let k = only(a.iter().copied().filter(|c| b.contains(c) && !o.contains(c)).collect());
    let m = only(a.iter().copied().filter(|c| o.contains(c) && !b.contains(c)).collect());
    let n = only(b.iter().copied().filter(|c| o.contains(c) && !a.contains(c)).collect());
    let (Some(k), Some(m), Some(n), &[b0, b1]) = (k, m, n, &batch[..]) else { return Ok(None) };
    let at = |s: &[char], axes: [char; 4]| -> Option<[usize; 4]> {
        let mut p = [0; 4];
        for (slot, c) in p.iter_mut().zip(axes) {
            *slot = s.iter().position(|&x| x == c)?;
        }
        Some(p)
    };
    let (Some(pa), Some(pb), Some(po)) = (at(&a, [b0, b1, m, k]), at(&b, [b0, b1, n, k]), at(&o, [b0, b1, m, n]))
    else {
        return Ok(None);
    };
    let op = BatchedMatMul { a: pa, b: pb, out: po, rank, views: [None, None] };
    let shapes: Vec<&[usize]> =
        node.inputs.iter().filter_map(|i| model.outlet_fact(*i).ok()?.shape.as_concrete()).collect();
    let [sa, sb] = shapes[..] else { return Ok(None) };
    let Ok(dims) = op.dims(sa, sb) else { return Ok(None) };
    let same_output =
        model.outlet_fact(OutletId::new(id, 0))?.shape.as_concrete() == Some(&op.output_shape(dims)[4 - rank..]);
    Ok(same_output.then_some(op))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: f32) -> Vec<f32> {
        (0..n).map(|i| (i as f32 * 0.37 + seed).sin()).collect()
    }

    /// Ours against tract's own EinSum for `expr` on inputs of `a` and `b` shapes.
    fn check(expr: &str, a: &[usize], b: &[usize]) {
        let ta = Tensor::from_shape(a, &values(a.iter().product(), 0.3)).unwrap();
        let tb = Tensor::from_shape(b, &values(b.iter().product(), 1.7)).unwrap();
        crate::ops::check_against_einsum(expr, [ta, tb], batched_for, 1e-5)
            .unwrap_or_else(|| panic!("{expr} not recognised"));
    }

    #[test]
    fn attention_products_match_tracts_einsum() {
        // q k^T and attention v as TinyViT writes them; 9 and 20 columns pad a partial panel.
        check("ambk,anbk->abmn", &[2, 5, 3, 7], &[2, 9, 3, 7]);
        check("abmk,akbn->ambn", &[2, 3, 5, 7], &[2, 7, 3, 20]);
        check("abmk,abnk->abmn", &[1, 2, 13, 16], &[1, 2, 33, 16]);
    }

    #[test]
    fn the_decoders_attention_per_head_matches_tracts_einsum() {
        // Token to image and image to token, q k^T then attention v (heads b, shrunk).
        check("mbk,nbk->bmn", &[7, 3, 16], &[100, 3, 16]);
        check("bmk,kbn->mbn", &[3, 7, 100], &[100, 3, 16]);
        check("mbk,nbk->bmn", &[100, 3, 16], &[7, 3, 16]);
        check("bmk,kbn->mbn", &[3, 100, 7], &[7, 3, 16]);
        // Few rows by many columns, computed transposed: token to image at full width.
        check("mbk,nbk->bmn", &[7, 8, 16], &[4096, 8, 16]);
        check("ambk,anbk->abmn", &[2, 3, 3, 7], &[2, 70, 3, 7]);
    }

    #[test]
    fn slices_of_one_tensor_are_read_in_place() {
        // TinyViT's attention: one qkv tensor `[windows, tokens, heads, 3 x 7]` cut into q,
        // k and v along its last axis; q k^T (both sliced), then with v (sliced) on the right.
        let shape = [2, 5, 3, 21];
        let mut model = TypedModel::default();
        let qkv = model.add_source("qkv", f32::fact(shape)).unwrap();
        let third = |model: &mut TypedModel, i: usize| {
            let slice = Slice { axis: 3, start: (7 * i).to_dim(), end: (7 * i + 7).to_dim() };
            model.wire_node(format!("slice{i}"), slice, &[qkv]).unwrap()[0]
        };
        let (q, k, v) = (third(&mut model, 0), third(&mut model, 1), third(&mut model, 2));
        let einsum = |e: &str| EinSum::new(e.parse().unwrap(), f32::datum_type());
        let scores = model.wire_node("qk", einsum("ambk,anbk->abmn"), &[q, k]).unwrap()[0];
        let out = model.wire_node("av", einsum("abmn,anbk->ambk"), &[scores, v]).unwrap();
        model.select_output_outlets(&out).unwrap();
        let input = Tensor::from_shape(&shape, &values(shape.iter().product(), 0.9)).unwrap();
        let run = |model: TypedModel| {
            let out = model.into_runnable().unwrap().run(tvec!(input.clone().into_tvalue())).unwrap();
            out[0].to_plain_array_view::<f32>().unwrap().to_owned()
        };
        let theirs = run(model.clone());
        let ours = replace_batched(model).unwrap().into_decluttered().unwrap();
        let ops: Vec<String> = ours.nodes().iter().map(|n| n.op.name().to_string()).collect();
        assert!(!ops.iter().any(|op| op == "Slice"), "a slice is still copied: {ops:?}");
        assert_eq!(ops.iter().filter(|op| *op == "BatchedMatMul").count(), 2, "{ops:?}");
        let ours = run(ours);
        assert_eq!(ours.shape(), theirs.shape());
        for (x, y) in ours.iter().zip(theirs.iter()) {
            assert!((x - y).abs() < 1e-4, "{x} vs {y}");
        }
    }

    #[test]
    fn other_einsums_are_left_alone() {
        let mut model = TypedModel::default();
        let a = model.add_source("a", f32::fact([2, 3, 4])).unwrap();
        let b = model.add_source("b", f32::fact([3, 4, 5])).unwrap();
        let out =
            model.wire_node("einsum", EinSum::new("mkj,kjn->mn".parse().unwrap(), f32::datum_type()), &[a, b]).unwrap();
        assert!(batched_for(&model, out[0].node).unwrap().is_none(), "two contracted axes are not ours");
    }
}
