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
        write!(f, ")")
    }
}

/// Two ops are the same when they share their weights.
impl PartialEq for Dense {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.weight, &other.weight) && self.layout == other.layout
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
            if !l.gelu {
                return gemm(a, w, out);
            }
            // Block by block, so that each block's GELU finds it in cache.
            for (a, out) in a.chunks(BLOCK_ROWS * k).zip(out.chunks_mut(BLOCK_ROWS * w.outputs)) {
                gemm(a, w, out);
                gelu(out);
            }
            return;
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
}

thread_local! {
    /// A block's product before it is written transposed, and a block read transposed.
    static SCRATCH: std::cell::RefCell<[Vec<f32>; 2]> = const { std::cell::RefCell::new([Vec::new(), Vec::new()]) };
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
    Ok(Some((Dense { weight: Arc::new(weight), layout, by_columns }, replaced)))
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
