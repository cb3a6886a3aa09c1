//! The engine's error type. Every fallible engine call returns [`Result`].

use thiserror::Error;

#[derive(Debug, Error)]
pub enum EngineError {
    #[error("no GPU adapter found ({0}); set ROBUST_DML_DEVICE=cpu to use the CPU backend, or install a Vulkan driver (e.g. Debian's mesa-vulkan-drivers)")]
    NoAdapter(String),
    #[error("could not open the GPU device on adapter '{adapter}': {reason}")]
    DeviceRequest { adapter: String, reason: String },
    #[error("shape mismatch in {op}: {detail}")]
    Shape { op: &'static str, detail: String },
    #[error("{op}: tensors live on different devices ({a} and {b}); move one with .to_device()")]
    DeviceMismatch {
        op: &'static str,
        a: String,
        b: String,
    },
    #[error("tensor '{name}' needs {bytes} bytes in one binding, over this adapter's max_storage_buffer_binding_size of {limit} bytes")]
    BindingTooLarge {
        name: String,
        bytes: u64,
        limit: u64,
    },
    #[error("a tensor of {bytes} bytes is over this adapter's max_buffer_size of {limit} bytes; use a smaller batch or input size")]
    BufferTooLarge { bytes: u64, limit: u64 },
    #[error("out of device memory: a buffer of {bytes} bytes could not be allocated with {live_bytes} bytes already held by live tensors; use a smaller batch or input size")]
    OutOfDeviceMemory { bytes: u64, live_bytes: u64 },
    #[error("a size or index of {value} is over the GPU kernels' 32-bit range (4294967295); use a smaller batch or input size")]
    SizeOverU32 { value: usize },
    #[error("GPU error: {0}")]
    Gpu(String),
    #[error("invalid argument to {op}: {detail}")]
    Invalid { op: &'static str, detail: String },
    #[error("autograd: {0}")]
    Autograd(String),
}

pub type Result<T> = std::result::Result<T, EngineError>;

/// Shorthand for a shape error.
pub fn shape_err<T>(op: &'static str, detail: impl Into<String>) -> Result<T> {
    Err(EngineError::Shape {
        op,
        detail: detail.into(),
    })
}

/// Shorthand for an invalid-argument error.
pub fn invalid<T>(op: &'static str, detail: impl Into<String>) -> Result<T> {
    Err(EngineError::Invalid {
        op,
        detail: detail.into(),
    })
}
