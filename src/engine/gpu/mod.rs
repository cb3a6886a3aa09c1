//! The wgpu side of the engine: adapter and device, pipeline cache, buffer pool and the
//! command recorder that batches every dispatch of a step into one encoder.
//!
//! Hazard rule (docs/DESIGN.md, Engine): `queue.write_buffer` executes before every command of
//! the next submit, so it is only used on buffers no pending command can touch (uniforms
//! recycled after a submit). Storage uploads go through a fresh staging buffer and an in-order
//! copy.
//!
//! This file opens the device and holds the context; the rest is split by concern: `shaders`
//! (WGSL assembly, op codes), `kernels` (kernel and parameter-block declarations, grids),
//! `limits` (the limits asked for and the checks against them), `pool` (buffers), `dispatch`
//! (pipelines, the recorder, dispatch) and `profile` (counters and timing).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use super::error::{EngineError, Result};
use super::policy::KernelPolicy;

mod dispatch;
mod kernels;
mod limits;
mod pool;
mod profile;
mod shaders;

pub use kernels::{
    fold_grid, groups_for, to_u32, Access, Kernel, KernelParams, ParamField, ParamScalar,
    ParamType, ParamsLayout, MAX_GRID_DIM,
};
pub use limits::{DeviceRequest, BINDING_CAP_ENV, WEBGPU_LIMITS_ENV};
pub use pool::GpuBuffer;
pub use shaders::{assembled_source, shader_modules, OpCodes, INCLUDE_FILES, SHADER_FILES};

use dispatch::{ModuleCache, PipelineCache, Recorder};
use limits::{binding_cap_from_env, requested_limits, webgpu_limits_from_env};
use pool::BufferPool;

/// The device, its queue and limits, and the caches, pool and recorder every op shares.
pub struct GpuContext {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub info: wgpu::AdapterInfo,
    pub limits: wgpu::Limits,
    pub features: wgpu::Features,
    /// Whether the device was opened at the WebGPU baseline limits ([`WEBGPU_LIMITS_ENV`]).
    pub webgpu_baseline: bool,
    policy: KernelPolicy,
    /// Shared with the contexts made from this one by [`GpuContext::with_policy`].
    modules: Arc<Mutex<ModuleCache>>,
    pipelines: Arc<Mutex<PipelineCache>>,
    pool: Mutex<BufferPool>,
    rec: Mutex<Recorder>,
    /// Dispatches recorded since the context was made (for profiling and benchmarks).
    dispatch_count: std::sync::atomic::AtomicU64,
    /// Ops that ran in chunks because a tensor exceeded one binding (`engine::split`).
    split_count: std::sync::atomic::AtomicU64,
    /// Per-kernel wall time when `ROBUST_DML_PROFILE=1` (each dispatch then runs alone).
    profile: Option<Mutex<HashMap<String, (u64, f64)>>>,
}

impl std::fmt::Debug for GpuContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Gpu({} / {:?})", self.info.name, self.info.backend)
    }
}

static SHARED: OnceLock<std::result::Result<Arc<GpuContext>, String>> = OnceLock::new();

impl GpuContext {
    /// The process-wide GPU context (created once; tests and the program share it).
    pub fn shared() -> Result<Arc<GpuContext>> {
        SHARED
            .get_or_init(|| {
                let req = match DeviceRequest::from_env() {
                    DeviceRequest::Named(n) => Some(n),
                    _ => None,
                };
                let cap = binding_cap_from_env().map_err(|e| e.to_string())?;
                pollster::block_on(Self::create(req.as_deref(), cap, None))
                    .map(Arc::new)
                    .map_err(|e| match e {
                        // Stored bare: it is wrapped in NoAdapter again below.
                        EngineError::NoAdapter(reason) => reason,
                        other => other.to_string(),
                    })
            })
            .clone()
            .map_err(EngineError::NoAdapter)
    }

    /// A separate context on the default adapter whose storage bindings are capped at
    /// `max_binding_bytes` (the device is opened with that limit, so wgpu enforces it). Tests
    /// use it to run the splitting of large tensors at small sizes.
    pub fn with_binding_cap(max_binding_bytes: u64) -> Result<Arc<GpuContext>> {
        pollster::block_on(Self::create(None, Some(max_binding_bytes), None)).map(Arc::new)
    }

    /// A separate context on the default adapter whose buffers are capped at `max_buffer_bytes`
    /// (bindings too). Tests use it to run into `max_buffer_size` at small sizes.
    pub fn with_buffer_cap(max_buffer_bytes: u64) -> Result<Arc<GpuContext>> {
        pollster::block_on(Self::create(
            None,
            Some(max_buffer_bytes),
            Some(max_buffer_bytes),
        ))
        .map(Arc::new)
    }

    async fn create(
        name_filter: Option<&str>,
        binding_cap: Option<u64>,
        buffer_cap: Option<u64>,
    ) -> Result<GpuContext> {
        let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
            backends: wgpu::Backends::PRIMARY,
            ..wgpu::InstanceDescriptor::new_without_display_handle_from_env()
        });
        let adapter = match name_filter {
            Some(name) => {
                let want = name.to_lowercase();
                let adapters = instance.enumerate_adapters(wgpu::Backends::PRIMARY).await;
                let names: Vec<String> = adapters.iter().map(|a| a.get_info().name).collect();
                adapters
                    .into_iter()
                    .find(|a| a.get_info().name.to_lowercase().contains(&want))
                    .ok_or_else(|| {
                        EngineError::NoAdapter(format!(
                            "no adapter name contains '{name}'; available: {names:?}"
                        ))
                    })?
            }
            None => instance
                .request_adapter(&wgpu::RequestAdapterOptions {
                    power_preference: wgpu::PowerPreference::HighPerformance,
                    force_fallback_adapter: false,
                    compatible_surface: None,
                    apply_limit_buckets: false,
                })
                .await
                .map_err(|e| EngineError::NoAdapter(e.to_string()))?,
        };
        let info = adapter.get_info();
        let webgpu_baseline = webgpu_limits_from_env()?;
        let mut limits = requested_limits(&adapter.limits(), webgpu_baseline);
        if let Some(cap) = binding_cap {
            // Whole values, and at least the offset alignment so that a view can start anywhere.
            let floor = limits.min_storage_buffer_offset_alignment as u64;
            let cap = (cap / 4 * 4).max(floor);
            limits.max_storage_buffer_binding_size =
                limits.max_storage_buffer_binding_size.min(cap);
        }
        if let Some(cap) = buffer_cap {
            limits.max_buffer_size = limits.max_buffer_size.min(cap / 4 * 4);
        }
        // Timestamps only (for benchmarks). No shader uses f16 or subgroups, so neither is asked for.
        let wanted =
            wgpu::Features::TIMESTAMP_QUERY | wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS;
        let features = adapter.features() & wanted;
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("robust-dml"),
                required_features: features,
                required_limits: limits.clone(),
                experimental_features: wgpu::ExperimentalFeatures::disabled(),
                memory_hints: wgpu::MemoryHints::Performance,
                trace: wgpu::Trace::Off,
            })
            .await
            .map_err(|e| EngineError::DeviceRequest {
                adapter: info.name.clone(),
                reason: if webgpu_baseline {
                    format!("{e} (with {WEBGPU_LIMITS_ENV}=1: the adapter is below the WebGPU baseline limits; unset it)")
                } else {
                    e.to_string()
                },
            })?;
        Ok(GpuContext {
            device,
            queue,
            policy: KernelPolicy::for_adapter(&info),
            info,
            limits,
            features,
            webgpu_baseline,
            modules: Default::default(),
            pipelines: Default::default(),
            pool: Mutex::default(),
            rec: Mutex::default(),
            dispatch_count: Default::default(),
            split_count: Default::default(),
            profile: std::env::var("ROBUST_DML_PROFILE")
                .is_ok_and(|v| v == "1")
                .then(Mutex::default),
        })
    }

    pub fn describe(&self) -> String {
        format!(
            "{} ({:?}, {:?}, driver {} {}){}",
            self.info.name,
            self.info.backend,
            self.info.device_type,
            self.info.driver,
            self.info.driver_info,
            if self.webgpu_baseline {
                ", WebGPU baseline limits"
            } else {
                ""
            }
        )
    }

    /// The kernel variants this context's ops run.
    pub fn policy(&self) -> &KernelPolicy {
        &self.policy
    }

    /// A context on the same device and queue whose ops run the kernel variants of `policy`.
    /// It shares the compiled pipelines but has its own buffers and command recorder, so its
    /// tensors are a device of their own (an op on tensors of both contexts is refused).
    pub fn with_policy(&self, policy: KernelPolicy) -> Arc<GpuContext> {
        Arc::new(GpuContext {
            device: self.device.clone(),
            queue: self.queue.clone(),
            info: self.info.clone(),
            limits: self.limits.clone(),
            features: self.features,
            webgpu_baseline: self.webgpu_baseline,
            policy,
            modules: self.modules.clone(),
            pipelines: self.pipelines.clone(),
            pool: Mutex::default(),
            rec: Mutex::default(),
            dispatch_count: Default::default(),
            split_count: Default::default(),
            profile: self.profile.as_ref().map(|_| Mutex::default()),
        })
    }
}
