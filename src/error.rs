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
        "interrupted by {} at epoch {epoch}, step {step}: {saved}",
        crate::pipeline::interrupt::signal_name(*signal)
    )]
    Interrupted {
        signal: i32,
        /// 1-based.
        epoch: usize,
        /// Steps of the epoch done.
        step: usize,
        /// Where that step's checkpoint is and how to go on.
        saved: String,
    },
    #[error(
        "run directory {} is in use by {}; wait for it to finish or choose another --out",
        dir.display(),
        holder.map_or("another process".to_string(), |p| format!("process {p}"))
    )]
    RunLocked { dir: PathBuf, holder: Option<u32> },

    #[error(
        "{model} at batch {batch} does not fit this device: it needs an estimated {need_bytes} \
         bytes where {limit_bytes} are available ({detail}). A batch of {fitting_batch} would \
         fit: pass --batch-size {fitting_batch}{smaller_input}"
    )]
    DeviceMemory {
        model: String,
        batch: usize,
        need_bytes: u64,
        limit_bytes: u64,
        fitting_batch: usize,
        detail: String,
        /// Advice when not even one image fits.
        smaller_input: &'static str,
    },
    #[error(
        "could not save the checkpoint of epoch {epoch} to {}: {source}. The partial file was \
         removed and {kept}. Free some space (or fix the folder), then rerun with --resume",
        path.display()
    )]
    CheckpointNotSaved {
        path: PathBuf,
        /// The epoch (1-based) whose checkpoint failed.
        epoch: usize,
        /// What is on disk instead: "the checkpoint of epoch N is kept" or that none was written.
        kept: String,
        #[source]
        source: Box<Error>,
    },
    #[error("{0}")]
    Config(String),
}

impl Error {
    /// Turns the engine's device-memory failures during a step of `model` at `batch` images
    /// into [`Error::DeviceMemory`], with the batch that would fit; other errors pass through.
    ///
    /// Activations grow in proportion to the batch, so the need is scaled from what failed:
    /// - a tensor over `max_buffer_size` (refused before any allocation): its size against
    ///   that limit;
    /// - an allocation the device refused: the bytes live at that moment plus the request,
    ///   against the bytes that did fit. Later tensors of the step are not counted, so this
    ///   need is a lower bound and the batch an upper bound.
    pub fn in_step(self, model: &str, batch: usize) -> Error {
        let Error::Engine(err) = self else {
            return self;
        };
        let (need_bytes, limit_bytes, detail) = match err {
            EngineError::BufferTooLarge { bytes, limit } => (
                bytes,
                limit,
                format!(
                    "one tensor of {bytes} bytes, over the adapter's max_buffer_size of {limit}"
                ),
            ),
            EngineError::OutOfDeviceMemory { bytes, live_bytes } => (
                live_bytes + bytes,
                live_bytes,
                format!(
                    "the device refused {bytes} more bytes with {live_bytes} held by live tensors; \
                     the need counts the step up to that allocation"
                ),
            ),
            other => return Error::Engine(other),
        };
        let fitting_batch = (batch as u128 * limit_bytes as u128 / need_bytes.max(1) as u128)
            .min(batch.saturating_sub(1) as u128) as usize;
        Error::DeviceMemory {
            model: model.to_string(),
            batch,
            need_bytes,
            limit_bytes,
            fitting_batch,
            detail,
            smaller_input: if fitting_batch == 0 {
                " and a smaller --image-size (not even one image fits)"
            } else {
                ""
            },
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// Wraps an I/O error with the path it concerns.
pub fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.into();
    move |source| Error::Io { path, source }
}
