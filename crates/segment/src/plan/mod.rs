//! From an ONNX file to a runnable plan: reading and recognising graphs, the rewrites
//! applied while optimising ([`onnx::optimise`]), and plans made in the background.

pub mod deferred;
pub mod onnx;
