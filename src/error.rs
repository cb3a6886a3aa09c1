//! The program-level error: every layer's typed error, plus training's own failures. The CLI
//! prints it and exits non-zero.

use std::path::PathBuf;

use thiserror::Error;

use crate::data::error::DataError;
use crate::engine::EngineError;
use crate::nn::NnError;

#[derive(Debug, Error)]
pub enum Error {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Nn(#[from] NnError),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the loss became {value} at epoch {epoch}, member {member}, step {step}; training stopped. \
         The last good checkpoint is kept. Likely cause: {cause}"
    )]
    NonFiniteLoss {
        epoch: usize,
        member: usize,
        step: usize,
        value: f32,
        cause: String,
    },
    #[error("{what} holds {value} in '{tensor}'{when}; {consequence}. Likely cause: {cause}")]
    NonFiniteState {
        /// "the model after epoch 3" or "checkpoint <path>".
        what: String,
        tensor: String,
        value: f32,
        when: String,
        consequence: String,
        cause: String,
    },
    #[error(
        "run directory {} is in use by {}; wait for it to finish or choose another --out",
        dir.display(),
        holder.map_or("another process".to_string(), |p| format!("process {p}"))
    )]
    RunLocked { dir: PathBuf, holder: Option<u32> },
    #[error("{0}")]
    Config(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// Wraps an I/O error with the path it concerns.
pub fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.into();
    move |source| Error::Io { path, source }
}
