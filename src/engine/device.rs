//! The two devices behind one tensor type: the wgpu GPU and the pure-Rust CPU reference.

use std::sync::Arc;

use super::error::Result;
use super::gpu::{DeviceRequest, GpuContext};
use super::policy::KernelPolicy;

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
    /// name). Unset: the best adapter when it is a GPU; the CPU backend when it is a software
    /// one (llvmpipe, lavapipe, SwiftShader, WARP: the CPU backend is faster) or when there is
    /// none, said once on stderr.
    pub fn from_env() -> Result<Device> {
        let explicit = std::env::var("ROBUST_DML_DEVICE").is_ok();
        match DeviceRequest::from_env() {
            DeviceRequest::Cpu => Ok(Device::Cpu),
            _ if explicit => Device::gpu(),
            _ => match Device::gpu() {
                Ok(Device::Gpu(ctx)) if ctx.info.device_type == wgpu::DeviceType::Cpu => {
                    note_once(&format!(
                        "the best adapter, {}, is a software one; running on the CPU backend \
                         (ROBUST_DML_DEVICE=gpu uses the adapter)",
                        ctx.info.name
                    ));
                    Ok(Device::Cpu)
                }
                Ok(d) => Ok(d),
                Err(e) => {
                    note_once(&format!("{e}; running on the CPU backend"));
                    Ok(Device::Cpu)
                }
            },
        }
    }

    /// This device with its GPU ops running the kernel variants of `policy` (a second context
    /// on the same GPU, [`GpuContext::with_policy`]); the CPU has no variants.
    pub fn with_policy(&self, policy: KernelPolicy) -> Device {
        match self {
            Device::Cpu => Device::Cpu,
            Device::Gpu(ctx) => Device::Gpu(ctx.with_policy(policy)),
        }
    }

    /// The kernel variants this device's ops run; `None` on the CPU.
    pub fn policy(&self) -> Option<KernelPolicy> {
        match self {
            Device::Cpu => None,
            Device::Gpu(ctx) => Some(*ctx.policy()),
        }
    }

    /// The most bytes one kernel binding holds; `None` on the CPU (no limit).
    pub fn max_binding_bytes(&self) -> Option<u64> {
        match self {
            Device::Cpu => None,
            Device::Gpu(ctx) => Some(ctx.max_binding_bytes()),
        }
    }

    /// The per-kernel profile gathered under `ROBUST_DML_PROFILE=1` ([`GpuContext::profile_report`]);
    /// `None` on the CPU or when not profiling.
    pub fn profile_report(&self) -> Option<String> {
        match self {
            Device::Cpu => None,
            Device::Gpu(ctx) => ctx.profile_report(),
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

    /// Whether both are the CPU, or the same GPU context (not merely the same adapter): a
    /// tensor moves between them without a copy.
    pub fn is_same_device(&self, other: &Device) -> bool {
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

/// Prints the device-choice note on the first call only (the choice is made more than once).
fn note_once(text: &str) {
    static PRINTED: std::sync::Once = std::sync::Once::new();
    PRINTED.call_once(|| eprintln!("note: {text}"));
}
