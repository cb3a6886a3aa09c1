//! Errors of weight loading and checkpoints: each names the file, and where it applies the key,
//! the shapes or the dtype, so that a user can tell what to fix.

use std::path::PathBuf;

use thiserror::Error;

use crate::engine::EngineError;

#[derive(Debug, Error)]
pub enum NnError {
    #[error("file not found: {}", path.display())]
    MissingFile { path: PathBuf },
    #[error("could not read or write {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is not a valid safetensors file (truncated or corrupt?): {reason}", path.display())]
    NotSafetensors { path: PathBuf, reason: String },
    #[error("{}: key '{key}' is required by the {model} model but is missing from the file ({total_missing} missing keys in all)", path.display())]
    MissingKey {
        path: PathBuf,
        key: String,
        model: String,
        total_missing: usize,
    },
    #[error("{}: unexpected key '{key}' (the {model} model has no such parameter)", path.display())]
    UnexpectedKey {
        path: PathBuf,
        key: String,
        model: String,
    },
    #[error("{}: shape mismatch for '{key}': the model expects {expected:?}, the file has {found:?}", path.display())]
    ShapeMismatch {
        path: PathBuf,
        key: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("{}: tensor '{key}' has dtype {dtype}; only F32, F16 and BF16 are supported", path.display())]
    UnsupportedDtype {
        path: PathBuf,
        key: String,
        dtype: String,
    },
    #[error("{}: checkpoint has no tensor '{key}'", path.display())]
    MissingEntry { path: PathBuf, key: String },
    #[error("{}: checkpoint has no metadata entry '{key}'", path.display())]
    MissingMetadata { path: PathBuf, key: String },
    #[error("invalid model configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

pub type NnResult<T> = std::result::Result<T, NnError>;
