//! The device limits a context asks for: the adapter's, the WebGPU baseline
//! (`ROBUST_DML_WEBGPU_LIMITS=1`) or a binding cap for tests, and the checks against them.

use super::GpuContext;
use crate::engine::error::{EngineError, Result};

/// How the user asked for a device through `ROBUST_DML_DEVICE`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceRequest {
    Cpu,
    /// High-performance adapter.
    Gpu,
    /// Adapter whose name contains this text (case-insensitive).
    Named(String),
}

impl DeviceRequest {
    pub fn from_env() -> Self {
        match std::env::var("ROBUST_DML_DEVICE") {
            Ok(v) if v.eq_ignore_ascii_case("cpu") => DeviceRequest::Cpu,
            Ok(v) if v.is_empty() || v.eq_ignore_ascii_case("gpu") => DeviceRequest::Gpu,
            Ok(v) => DeviceRequest::Named(v),
            Err(_) => DeviceRequest::Gpu,
        }
    }
}

/// Caps the storage binding size (bytes) below the adapter's, e.g. to exercise the splitting of
/// large tensors on a GPU whose own limit is generous.
pub const BINDING_CAP_ENV: &str = "ROBUST_DML_MAX_BINDING_BYTES";

pub(super) fn binding_cap_from_env() -> Result<Option<u64>> {
    match std::env::var(BINDING_CAP_ENV) {
        Err(_) => Ok(None),
        Ok(v) => v.trim().parse::<u64>().map(Some).map_err(|_| {
            EngineError::Gpu(format!(
                "{BINDING_CAP_ENV}={v:?} is not a byte count (e.g. 134217728)"
            ))
        }),
    }
}

/// Set to `1` to open the device at `wgpu::Limits::default()`, the WebGPU baseline every
/// adapter meets (128 MiB per storage binding, 16 KiB of workgroup memory, 256 invocations per
/// workgroup, 8 storage buffers per stage, 65,535 workgroups per dimension), instead of the
/// adapter's own limits. CI runs the GPU tests a second time this way.
pub const WEBGPU_LIMITS_ENV: &str = "ROBUST_DML_WEBGPU_LIMITS";

pub(super) fn webgpu_limits_from_env() -> Result<bool> {
    match std::env::var(WEBGPU_LIMITS_ENV) {
        Err(_) => Ok(false),
        Ok(v) if v.is_empty() || v == "0" => Ok(false),
        Ok(v) if v == "1" => Ok(true),
        Ok(v) => Err(EngineError::Gpu(format!(
            "{WEBGPU_LIMITS_ENV}={v:?}: expected 1 (open the device at the WebGPU baseline limits) or 0"
        ))),
    }
}

/// The limits the device is opened with: the adapter's own, or the WebGPU baseline when asked
/// for (the adapter must meet it; `request_device` says which limit it does not).
pub(super) fn requested_limits(adapter: &wgpu::Limits, webgpu_baseline: bool) -> wgpu::Limits {
    if webgpu_baseline {
        wgpu::Limits::default()
    } else {
        adapter.clone()
    }
}

impl GpuContext {
    pub fn max_binding_bytes(&self) -> u64 {
        self.limits
            .max_storage_buffer_binding_size
            .min(self.limits.max_buffer_size)
    }

    /// Values that fit one storage binding.
    pub fn max_binding_elems(&self) -> usize {
        (self.max_binding_bytes() / 4) as usize
    }

    /// The alignment, in f32 values, that a view's start must have.
    pub fn offset_align_elems(&self) -> usize {
        (self.limits.min_storage_buffer_offset_alignment as usize / 4).max(1)
    }

    /// Fails with a message naming `what` when `elems` f32 values cannot sit in one binding.
    pub fn check_binding(&self, what: &str, elems: usize) -> Result<()> {
        let bytes = elems as u64 * 4;
        let limit = self.max_binding_bytes();
        if bytes > limit {
            return Err(EngineError::BindingTooLarge {
                name: what.to_string(),
                bytes,
                limit,
            });
        }
        Ok(())
    }
}
