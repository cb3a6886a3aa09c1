//! The two devices behind one tensor type: the wgpu GPU and the pure-Rust CPU reference.

use std::sync::Arc;

use super::error::Result;
use super::gpu::{DeviceRequest, GpuContext};

#[derive(Clone, Debug)]
pub enum Device {
    /// Plain Rust loops, written for clarity: the numerical reference.
    Cpu,
    Gpu(Arc<GpuContext>),
}

impl Device {
    /// The shared GPU device (adapter chosen by `ROBUST_DML_DEVICE`, high-performance default).
    pub fn gpu() -> Result<Device> {
        GpuContext::shared().map(Device::Gpu)
    }

    /// What the user asked for through `ROBUST_DML_DEVICE` (`cpu`, `gpu`, or part of an adapter
    /// name). Unset: the GPU when an adapter exists, else the CPU, with a note on stderr.
    pub fn from_env() -> Result<Device> {
        let explicit = std::env::var("ROBUST_DML_DEVICE").is_ok();
        match DeviceRequest::from_env() {
            DeviceRequest::Cpu => Ok(Device::Cpu),
            _ if explicit => Device::gpu(),
            _ => match Device::gpu() {
                Ok(d) => Ok(d),
                Err(e) => {
                    eprintln!("note: {e}; running on the CPU backend");
                    Ok(Device::Cpu)
                }
            },
        }
    }

    pub fn is_gpu(&self) -> bool {
        matches!(self, Device::Gpu(_))
    }

    pub fn name(&self) -> String {
        match self {
            Device::Cpu => "cpu".to_string(),
            Device::Gpu(ctx) => format!("gpu: {}", ctx.describe()),
        }
    }

    pub fn same(&self, other: &Device) -> bool {
        match (self, other) {
            (Device::Cpu, Device::Cpu) => true,
            (Device::Gpu(a), Device::Gpu(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }

    /// Waits for all queued GPU work (no-op on the CPU).
    pub fn sync(&self) -> Result<()> {
        match self {
            Device::Cpu => Ok(()),
            Device::Gpu(ctx) => ctx.sync(),
        }
    }
}
