//! The model families: Segment Anything ([`sam`], its encoder split by [`tiled`]) and
//! salient-object models ([`salient`]).

pub mod salient;
pub mod sam;
pub mod tiled;
