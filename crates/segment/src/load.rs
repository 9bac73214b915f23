//! The one way a model is loaded: [`inspect`] what a path holds (a cheap look the app's
//! guards use before committing memory), then [`ModelFiles::load`] it into a [`Segmenter`]
//! ([`load`] does both).
//!
//! A `.onnx` file is a salient-object model; a folder with `encoder.onnx` and
//! `decoder.onnx` is a Segment Anything export. Each graph is checked by its inputs and
//! outputs (plan/onnx.rs), never trusted by its name.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tract_onnx::pb::ModelProto;

use crate::backends::salient::SalientSegmenter;
use crate::backends::sam::SamSegmenter;
use crate::plan::onnx::{self, GraphKind};
use crate::{ModelInfo, ModelKind, Segmenter};

/// Why a path does not give a model. The messages name no path: the caller knows how to
/// show its location (a URL's query may hold a token).
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("not found (expected a .onnx file, or a folder with encoder.onnx and decoder.onnx)")]
    NotFound,
    #[error("{0}")]
    WrongKind(String),
    #[error("could not be loaded: {0}")]
    Invalid(String),
}

/// What is at a model path, found from the file system alone.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    pub path: PathBuf,
    /// [`ModelKind::Sam`] for a folder, [`ModelKind::Salient`] for a file.
    pub kind: ModelKind,
    /// Bytes of ONNX on disk (both halves of a SAM folder).
    pub bytes: u64,
}

/// Finds the model files at `path` (no graph is read).
pub fn inspect(path: &Path) -> Result<ModelFiles, LoadError> {
    let kind = if path.is_dir() { ModelKind::Sam } else { ModelKind::Salient };
    let mut files = ModelFiles { path: path.to_path_buf(), kind, bytes: 0 };
    files.bytes = files
        .parts()
        .iter()
        .map(|p| std::fs::metadata(p).ok().filter(|m| m.is_file()).map(|m| m.len()))
        .sum::<Option<u64>>()
        .ok_or(LoadError::NotFound)?;
    Ok(files)
}

/// Loads the model at `path`: [`inspect`], then [`ModelFiles::load`].
pub fn load(path: &Path) -> Result<Arc<dyn Segmenter>, LoadError> {
    inspect(path)?.load()
}

impl ModelFiles {
    /// The ONNX files the model is made of (both halves of a SAM folder).
    pub fn parts(&self) -> Vec<PathBuf> {
        match self.kind {
            ModelKind::Sam => vec![self.path.join("encoder.onnx"), self.path.join("decoder.onnx")],
            _ => vec![self.path.clone()],
        }
    }

    /// Loads the model: the one place a [`Segmenter`] is made from files, for the app, the
    /// tests and the benchmark alike. The graphs are optimised into plans (SAM's slower
    /// plans finish on a background thread while the first image runs; backends/sam.rs).
    pub fn load(&self) -> Result<Arc<dyn Segmenter>, LoadError> {
        let info = self.info();
        if self.kind == ModelKind::Sam {
            let protos = self.read_sam_folder()?;
            return Ok(Arc::new(SamSegmenter::from_protos(protos, info).map_err(invalid)?));
        }
        let graph = onnx::read_graph(&self.path).map_err(invalid)?;
        let input = salient_input(onnx::classify(&graph))?;
        Ok(Arc::new(SalientSegmenter::load(graph, input, info).map_err(invalid)?))
    }

    /// Checks from the protobuf(s) alone (no planning) that the graphs are a family we serve.
    pub fn check_kind(&self) -> Result<(), LoadError> {
        match self.kind {
            ModelKind::Sam => self.read_sam_folder().map(drop),
            _ => {
                let proto = onnx::read_proto(&self.path).map_err(invalid)?;
                salient_input(onnx::classify_proto(&proto)).map(drop)
            }
        }
    }

    /// What `/health` and mask answers call this model.
    pub fn info(&self) -> ModelInfo {
        let name = if self.kind == ModelKind::Sam { self.path.file_name() } else { self.path.file_stem() };
        let name = name.map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
        ModelInfo { name, kind: self.kind, file_size_bytes: self.bytes }
    }

    /// Reads both halves of a SAM folder once, checking each is what its name says.
    fn read_sam_folder(&self) -> Result<[ModelProto; 2], LoadError> {
        let encoder = self.read_expected("encoder.onnx", GraphKind::SamEncoder)?;
        let decoder = self.read_expected("decoder.onnx", GraphKind::SamDecoder)?;
        Ok([encoder, decoder])
    }

    /// Reads one half of a SAM folder, checking by its graph that it is that half.
    fn read_expected(&self, file: &str, expected: GraphKind) -> Result<ModelProto, LoadError> {
        let proto = onnx::read_proto(&self.path.join(file))
            .map_err(|e| LoadError::Invalid(format!("{file}: {}", first_line(e))))?;
        let kind = onnx::classify_proto(&proto);
        if kind != expected {
            return Err(LoadError::WrongKind(match kind {
                GraphKind::Unknown { inputs, outputs } => onnx::describe_unknown(&inputs, &outputs),
                other => format!("{file} is a {other:?}, not the expected {expected:?}"),
            }));
        }
        Ok(proto)
    }
}

/// The input size of a single .onnx file that is a salient model, or why it is not one.
fn salient_input(kind: GraphKind) -> Result<(usize, usize), LoadError> {
    match kind {
        GraphKind::Salient { height, width } => Ok((height, width)),
        GraphKind::SamEncoder | GraphKind::SamDecoder => Err(LoadError::WrongKind(
            "is one half of a Segment Anything export: put encoder.onnx and decoder.onnx in one folder and configure the folder".into(),
        )),
        GraphKind::Unknown { inputs, outputs } => Err(LoadError::WrongKind(onnx::describe_unknown(&inputs, &outputs))),
    }
}

fn invalid(error: tract_onnx::prelude::TractError) -> LoadError {
    LoadError::Invalid(first_line(error))
}

/// tract's error chain, as its first line.
fn first_line(error: tract_onnx::prelude::TractError) -> String {
    format!("{error:#}").lines().next().unwrap_or("invalid model").to_string()
}
