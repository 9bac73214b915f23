//! A transformer's MLP, `GELU(x W1 + b1) W2 + b2`, as one op: its rows in blocks, each
//! block's hidden activation (four times as wide as `x`) kept in cache between the two
//! products instead of written out whole and read back. In the MobileSAM encoder that
//! activation is 16384 x 512 or 4096 x 1280 floats per transformer block, far beyond the
//! caches: the first product's stores and the second's loads of it went to memory
//! (docs/performance.md §6m).
//!
//! Replaced: a row-major `Dense` (ops/dense.rs) whose only reader is another row-major
//! `Dense` over the same rows, the first's outputs being the second's inputs.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;

use super::dense::{Dense, RowMajor};
use crate::kernels::conv::gelu;
use crate::kernels::gemm::gemm;

/// Rows per block: the gemm kernel's own row block, so that each block's hidden
/// activation (96 x 1280 floats at most in the encoder) stays in L2.
const BLOCK_ROWS: usize = 96;

#[derive(Clone, PartialEq, Eq)]
pub struct Mlp {
    first: RowMajor,
    second: RowMajor,
}

impl std::fmt::Debug for Mlp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (first, second) = (&self.first, &self.second);
        write!(f, "Mlp({}x{}x{}x{})", first.rows, first.weight.inputs, first.weight.outputs, second.weight.outputs)
    }
}

impl Op for Mlp {
    fn name(&self) -> StaticName {
        "Mlp".into()
    }

    op_as_typed_op!();
}

impl EvalOp for Mlp {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let Some(input) = inputs.first() else { bail!("Mlp: no input") };
        if input.shape() != &*self.first.input {
            bail!("Mlp: input {:?}, planned for {:?}", input.shape(), self.first.input);
        }
        // `run` writes every output element.
        super::eval_filled(input, &self.second.output, |a, out| self.run(a, out))
    }
}

impl TypedOp for Mlp {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let Some(input) = inputs.first() else { bail!("Mlp: no input") };
        if input.shape.as_concrete() != Some(&*self.first.input) {
            bail!("Mlp: input {:?}, planned for {:?}", input.shape, self.first.input);
        }
        Ok(tvec!(f32::fact(self.second.output.clone())))
    }

    as_op!();
}

impl Mlp {
    fn run(&self, a: &[f32], out: &mut [f32]) {
        let (first, second) = (&self.first, &self.second);
        let (inputs, hidden_width) = (first.weight.inputs, first.weight.outputs);
        let mut hidden = vec![0.0; BLOCK_ROWS.min(first.rows) * hidden_width];
        let blocks = a.chunks(BLOCK_ROWS * inputs).zip(out.chunks_mut(BLOCK_ROWS * second.weight.outputs));
        for (a, out) in blocks {
            let hidden = &mut hidden[..a.len() / inputs * hidden_width];
            gemm(a, &first.weight, hidden);
            if first.gelu {
                gelu(hidden);
            }
            gemm(hidden, &second.weight, out);
            if second.gelu {
                gelu(out);
            }
        }
    }
}

/// Replaces each pair of row-major `Dense` ops, one feeding only the other.
pub fn replace_mlps(model: TypedModel) -> TractResult<TypedModel> {
    super::replace_each::<Dense, _>(model, "mlp", mlp_for)
}

/// The op for the first `Dense` of a pair at node `id`, and the second's outlet.
fn mlp_for(model: &TypedModel, id: usize) -> TractResult<Option<(Mlp, OutletId)>> {
    let outlet = OutletId::new(id, 0);
    let Some(first) = model.node(id).op_as::<Dense>().and_then(Dense::row_major) else { return Ok(None) };
    let [reader] = model.outlet_successors(outlet) else { return Ok(None) };
    let Some(second) = model.node(reader.node).op_as::<Dense>().and_then(Dense::row_major) else {
        return Ok(None);
    };
    let chained = second.rows == first.rows && second.weight.inputs == first.weight.outputs;
    if !chained || !super::only_reader(model, outlet, reader.node)? {
        return Ok(None);
    }
    Ok(Some((Mlp { first, second }, OutletId::new(reader.node, 0))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::{max_abs_diff, noise};
    use tract_onnx::tract_core::ops::binary::TypedBinOp;
    use tract_onnx::tract_core::ops::einsum::EinSum;
    use tract_onnx::tract_core::ops::element_wise::ElementWiseOp;
    use tract_onnx::tract_core::ops::math::Add;
    use tract_onnx::tract_core::ops::nn::GeluExact;

    /// `x W + b` on `[1, rows, inputs]` rows, as the ONNX import leaves a `MatMul` and its
    /// bias; then tract's exact GELU when asked.
    fn linear(
        model: &mut TypedModel,
        x: OutletId,
        [inputs, outputs]: [usize; 2],
        seed: u32,
        with_gelu: bool,
    ) -> OutletId {
        let scale = 1.0 / (inputs as f32).sqrt();
        let w: Vec<f32> = noise(inputs * outputs, seed).iter().map(|v| v * 2.0 * scale).collect();
        let w = model.add_const(format!("w{seed}"), Tensor::from_shape(&[inputs, outputs], &w).unwrap()).unwrap();
        let einsum = EinSum::new("amk,kn->amn".parse().unwrap(), f32::datum_type());
        let product = model.wire_node(format!("product{seed}"), einsum, &[x, w]).unwrap();
        let b = Tensor::from_shape(&[1, 1, outputs], &noise(outputs, seed + 1)).unwrap();
        let b = model.add_const(format!("b{seed}"), b).unwrap();
        let add = TypedBinOp(Box::new(Add), None);
        let sum = model.wire_node(format!("bias{seed}"), add, &[product[0], b]).unwrap();
        if !with_gelu {
            return sum[0];
        }
        model.wire_node(format!("gelu{seed}"), ElementWiseOp(Box::new(GeluExact {}), None), &sum).unwrap()[0]
    }

    fn mlp_model(rows: usize, [inputs, hidden, outputs]: [usize; 3]) -> TypedModel {
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact([1, rows, inputs])).unwrap();
        let h = linear(&mut model, x, [inputs, hidden], 5, true);
        let y = linear(&mut model, h, [hidden, outputs], 9, false);
        model.select_output_outlets(&[y]).unwrap();
        model
    }

    fn run(model: TypedModel, input: &Tensor) -> Tensor {
        model.into_runnable().unwrap().run(tvec!(input.clone().into_tvalue())).unwrap().remove(0).into_tensor()
    }

    fn op_names(model: &TypedModel) -> Vec<String> {
        let order = model.eval_order().unwrap();
        order.iter().map(|&n| model.node(n).op.name().to_string()).collect()
    }

    #[test]
    fn an_mlp_runs_as_one_op_and_gives_what_tracts_ops_give() {
        // Rows beyond two blocks and a partial last one (250 = 96 + 96 + 58); a hidden
        // width of 4 x the input's, as in TinyViT.
        for (rows, widths) in [(250, [32, 128, 48]), (7, [16, 64, 16])] {
            let model = mlp_model(rows, widths);
            let input = Tensor::from_shape(&[1, rows, widths[0]], &noise(rows * widths[0], 3)).unwrap();
            let theirs = run(model.clone(), &input);
            let fused = replace_mlps(crate::ops::dense::replace_dense(model).unwrap()).unwrap();
            assert_eq!(op_names(&fused), ["Source", "Mlp"], "{rows} rows");
            let ours = run(fused, &input);
            let spread =
                theirs.try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!(spread > 1.0, "{rows} rows: outputs too tame ({spread})");
            let diff = max_abs_diff(&theirs, &ours).unwrap();
            assert!(diff < 1e-4 * (1.0 + spread), "{rows} rows: max |diff| {diff}");
        }
    }

    #[test]
    fn a_hidden_activation_read_elsewhere_is_left_to_the_two_products() {
        // The GELU's output is also a model output: it must be written whole.
        let mut model = mlp_model(20, [16, 64, 16]);
        let hidden = model.node_by_name("gelu5").unwrap().id;
        let y = model.output_outlets().unwrap()[0];
        model.select_output_outlets(&[y, OutletId::new(hidden, 0)]).unwrap();
        let fused = replace_mlps(crate::ops::dense::replace_dense(model).unwrap()).unwrap();
        assert_eq!(op_names(&fused).iter().filter(|op| *op == "Dense").count(), 2);
        assert!(!op_names(&fused).iter().any(|op| op == "Mlp"));
    }
}
