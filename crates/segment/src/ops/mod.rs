//! Our operators in tract's plans, and the rewrites that put them there: each replaces
//! a tract op (or a small pattern of them) whose time or memory we measured as too high.

pub mod batched;
pub mod conv;
pub mod deconv;
pub mod dense;
pub mod mbconv;
pub mod pad;
pub mod resize;
pub mod softmax;
pub mod split;
