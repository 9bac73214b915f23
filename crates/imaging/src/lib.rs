//! Drishya's pixels, with no model and no HTTP: an upload's bytes in (never trusted),
//! the working image out; the composite of a product into a masked region; and the
//! parsing of what a request asks for (its box and settings). Pure functions over
//! memory, so the fuzz targets (fuzz/) reach all of it without building the engine.

pub mod codec;
pub mod composite;
pub mod fullres;
pub mod geometry;
pub mod params;

pub use codec::{decode_product, decode_scene, encode_as, encode_png, ImageError, OutputFormat, Scene};
pub use composite::CompositeError;
pub use geometry::{clip_box, BadBox, BoxPrompt};
