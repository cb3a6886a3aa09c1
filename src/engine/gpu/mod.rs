//! The wgpu side of the engine: adapter and device, pipeline cache, buffer pool and the
//! command recorder that batches every dispatch of a step into one encoder.
//!
//! Hazard rule (docs/DESIGN.md, Engine): `queue.write_buffer` executes before every command of the next
//! submit, so it is only used on buffers no pending command can touch (uniforms recycled after
//! a submit). Storage uploads go through a fresh staging buffer and an in-order copy.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use super::error::{EngineError, Result};
use super::policy::KernelPolicy;

/// Functions every shader may use; prepended to each WGSL file.
const PRELUDE: &str = include_str!("../../shaders/prelude.wgsl");

/// A kernel file's name and text, the stem written once.
macro_rules! shader_file {
    ($stem:literal) => {
        (
            concat!($stem, ".wgsl"),
            include_str!(concat!("../../shaders/", $stem, ".wgsl")),
        )
    };
}

/// Every kernel file in `shaders/` (all but the prelude and `include/`) with its text, so that tests can build
/// each module exactly as the device gets it ([`shader_modules`]). `tests/shaders.rs` checks that
/// this list matches the directory.
pub const SHADER_FILES: &[(&str, &str)] = &[
    shader_file!("adamw"),
    shader_file!("batchnorm"),
    shader_file!("channels"),
    shader_file!("conv2d"),
    shader_file!("depthwise"),
    shader_file!("elementwise"),
    shader_file!("im2col"),
    shader_file!("kmeans"),
    shader_file!("matmul"),
    shader_file!("matmul_vec4"),
    shader_file!("normalize"),
    shader_file!("pgd"),
    shader_file!("pool"),
    shader_file!("proxy_anchor"),
    shader_file!("reduce"),
    shader_file!("topk"),
];

/// A file in `shaders/include/` with its text.
macro_rules! include_file {
    ($stem:literal) => {
        (
            concat!($stem, ".wgsl"),
            include_str!(concat!("../../shaders/include/", $stem, ".wgsl")),
        )
    };
}

/// The pieces kernel files share, pulled in with a line `#include "name.wgsl"` so that each is
/// written once: a parameter block used by several kernel files, the workgroup reductions.
pub const INCLUDE_FILES: &[(&str, &str)] = &[
    include_file!("conv_layout"),
    include_file!("matmul_params"),
    include_file!("workgroup_reduce"),
];

/// The WGSL text handed to the device for a kernel file: the prelude, then the file with each
/// `#include "name.wgsl"` line replaced by that file of [`INCLUDE_FILES`] (an include already
/// pulled in becomes empty, so two includes of one file declare nothing twice). No overrides,
/// constants or other substitutions are applied anywhere (pipelines are created with default
/// compilation options), so this is the whole of what each backend compiles. `file` names the
/// kernel file in the error for an include that does not exist.
pub fn assembled_source(file: &str, file_text: &str) -> Result<String> {
    let mut out = format!("{PRELUDE}\n");
    let mut included = Vec::new();
    append_resolved(file, file_text, &mut included, &mut out)?;
    Ok(out)
}

fn append_resolved(
    file: &str,
    text: &str,
    included: &mut Vec<&'static str>,
    out: &mut String,
) -> Result<()> {
    for line in text.lines() {
        let Some(directive) = line.trim().strip_prefix("#include") else {
            out.push_str(line);
            out.push('\n');
            continue;
        };
        let name = directive.trim().trim_matches('"');
        let Some(&(name, body)) = INCLUDE_FILES.iter().find(|(n, _)| *n == name) else {
            return Err(EngineError::Gpu(format!(
                "{file}: `{}` names no file of engine::gpu::INCLUDE_FILES (add it to shaders/include/ and that list)",
                line.trim()
            )));
        };
        if !included.contains(&name) {
            included.push(name);
            append_resolved(name, body, included, out)?;
        }
    }
    Ok(())
}

/// Every shader module as it goes to the device: (file name, assembled WGSL).
pub fn shader_modules() -> Result<Vec<(&'static str, String)>> {
    SHADER_FILES
        .iter()
        .map(|(file, text)| Ok((*file, assembled_source(file, text)?)))
        .collect()
}

/// Workgroup counts above this are folded into a second grid dimension.
pub const MAX_GRID_DIM: u32 = 65_535;

/// How a kernel uses one of its storage bindings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Access {
    Read,
    ReadWrite,
}

/// A compute entry point and the layout of its storage bindings. Binding 0 is always the
/// uniform parameter block; storage bindings follow from binding 1 in the order given here.
#[derive(Clone, Copy, Debug)]
pub struct Kernel {
    /// File name in `shaders/`, used as the cache key of the shader module.
    pub file: &'static str,
    pub source: &'static str,
    pub entry: &'static str,
    pub bindings: &'static [Access],
}

/// Declares a [`Kernel`] from a file in `shaders/`.
#[macro_export]
macro_rules! kernel {
    ($file:literal, $entry:literal, [$($acc:ident),* $(,)?]) => {
        $crate::engine::gpu::Kernel {
            file: $file,
            source: include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/shaders/", $file)),
            entry: $entry,
            bindings: &[$($crate::engine::gpu::Access::$acc),*],
        }
    };
}

/// The scalar types a parameter block holds (WGSL `u32` and `f32`, 4 bytes each).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamType {
    U32,
    F32,
}

/// A Rust type that may be a field of a parameter block.
pub trait ParamScalar {
    const TYPE: ParamType;
}
impl ParamScalar for u32 {
    const TYPE: ParamType = ParamType::U32;
}
impl ParamScalar for f32 {
    const TYPE: ParamType = ParamType::F32;
}

/// One field of a parameter block: its name, byte offset and type, as the shader must see them.
#[derive(Clone, Copy, Debug)]
pub struct ParamField {
    pub name: &'static str,
    pub offset: usize,
    pub ty: ParamType,
}

/// The layout of a Rust parameter block and the shader files whose `Params` struct it mirrors;
/// `tests/kernel_params.rs` compares the two with naga.
#[derive(Clone, Copy, Debug)]
pub struct ParamsLayout {
    pub rust_name: &'static str,
    pub files: &'static [&'static str],
    pub size: usize,
    pub fields: &'static [ParamField],
}

/// A kernel family's uniform parameter block: a `#[repr(C)]` plain-old-data struct whose fields
/// are those of the WGSL `Params` struct, in order. Declare it with [`kernel_params!`].
pub trait KernelParams: bytemuck::Pod {
    const LAYOUT: ParamsLayout;
}

/// Declares a kernel family's parameter block, `#[repr(C)]` and `bytemuck::Pod`, and records
/// its field names and offsets ([`KernelParams::LAYOUT`]) for the layout test.
#[macro_export]
macro_rules! kernel_params {
    (
        $(#[$meta:meta])*
        $vis:vis struct $name:ident for [$($file:literal),+ $(,)?] {
            $($(#[$fmeta:meta])* $field:ident : $ty:ty),* $(,)?
        }
    ) => {
        $(#[$meta])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
        $vis struct $name {
            $($(#[$fmeta])* pub $field: $ty),*
        }
        impl $crate::engine::gpu::KernelParams for $name {
            const LAYOUT: $crate::engine::gpu::ParamsLayout = $crate::engine::gpu::ParamsLayout {
                rust_name: stringify!($name),
                files: &[$($file),+],
                size: ::core::mem::size_of::<$name>(),
                fields: &[$($crate::engine::gpu::ParamField {
                    name: stringify!($field),
                    offset: ::core::mem::offset_of!($name, $field),
                    ty: <$ty as $crate::engine::gpu::ParamScalar>::TYPE,
                }),*],
            };
        }
    };
}

/// The op codes a shader branches on, mirrored from a Rust enum: each is a WGSL `const` named
/// `prefix + NAME` with this value, and when `switch_fn` is given, the `switch` in that
/// function has exactly these cases. `tests/kernel_params.rs` checks both with naga.
#[derive(Clone, Copy, Debug)]
pub struct OpCodes {
    pub file: &'static str,
    pub prefix: &'static str,
    pub switch_fn: Option<&'static str>,
    pub codes: &'static [(&'static str, u32)],
}

struct Pipeline {
    pipeline: wgpu::ComputePipeline,
    layout: wgpu::BindGroupLayout,
}

/// Shader modules by kernel file.
type ModuleCache = HashMap<&'static str, Arc<wgpu::ShaderModule>>;
/// Pipelines by (kernel file, entry point).
type PipelineCache = HashMap<(&'static str, &'static str), Arc<Pipeline>>;

/// Buffers are recycled by size bucket so that a steady-state training step allocates nothing.
#[derive(Default)]
struct BufferPool {
    free: HashMap<u64, Vec<wgpu::Buffer>>,
    free_bytes: u64,
    live_bytes: u64,
    /// Largest `live_bytes` seen since the last [`GpuContext::reset_peak`].
    peak_bytes: u64,
}

/// Free buffers kept for reuse beyond this many bytes are destroyed instead.
const POOL_KEEP_BYTES: u64 = 2 << 30;

fn bucket_size(bytes: u64) -> u64 {
    // Sizes are rounded to 2^k or 1.5 * 2^k, bounding waste at 33% while keeping few buckets.
    let bytes = bytes.max(16);
    let p = bytes.next_power_of_two();
    let three_quarters = p / 4 * 3;
    if bytes <= three_quarters && three_quarters.is_multiple_of(4) {
        three_quarters
    } else {
        p
    }
}

#[derive(Default)]
struct Recorder {
    encoder: Option<wgpu::CommandEncoder>,
    dispatches: usize,
    /// Uniform buffers used since the last submit; they are reusable only after it.
    uniforms_used: Vec<wgpu::Buffer>,
    uniforms_free: Vec<wgpu::Buffer>,
}

/// Dispatches recorded before a submit is forced, bounding the memory held by pending work.
const MAX_PENDING_DISPATCHES: usize = 4096;
const UNIFORM_SIZE: u64 = 256;

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

/// A pooled storage buffer holding `len` f32 values. Returns to the pool when dropped.
///
/// A *view* ([`GpuBuffer::view`]) is a window of `len` values starting `offset` values into
/// another buffer: kernels bind just that range, which is how ops split tensors larger than
/// one binding (`engine::split`). Views never return to the pool; their parent must outlive them.
pub struct GpuBuffer {
    buffer: Option<wgpu::Buffer>,
    len: usize,
    offset: usize,
    pooled: bool,
    ctx: Arc<GpuContext>,
}

impl GpuBuffer {
    pub fn raw(&self) -> &wgpu::Buffer {
        self.buffer.as_ref().expect("buffer present until drop")
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn ctx(&self) -> &Arc<GpuContext> {
        &self.ctx
    }
    /// Values from the start of the underlying wgpu buffer to this buffer's first value.
    pub fn offset(&self) -> usize {
        self.offset
    }
    /// Bytes that a binding of this buffer covers (the logical length, at least 4).
    fn binding_bytes(&self) -> u64 {
        (self.len as u64 * 4).max(4)
    }

    /// Values `start..start + len` of this buffer, without a copy. The start must fall on the
    /// adapter's storage offset alignment ([`GpuContext::offset_align_elems`]).
    pub(crate) fn view(&self, start: usize, len: usize) -> Result<GpuBuffer> {
        if start + len > self.len {
            return Err(EngineError::Gpu(format!(
                "view of values {start}..{} in a buffer of {}",
                start + len,
                self.len
            )));
        }
        let offset = self.offset + start;
        if !offset.is_multiple_of(self.ctx.offset_align_elems()) {
            return Err(EngineError::Gpu(format!(
                "view at value {offset} is not on the adapter's {}-byte storage offset alignment",
                self.ctx.limits.min_storage_buffer_offset_alignment
            )));
        }
        Ok(GpuBuffer {
            buffer: self.buffer.clone(),
            len,
            offset,
            pooled: false,
            ctx: self.ctx.clone(),
        })
    }
}

impl Drop for GpuBuffer {
    fn drop(&mut self) {
        if let Some(buf) = self.buffer.take() {
            if self.pooled {
                self.ctx.release(buf);
            }
        }
    }
}

static SHARED: OnceLock<std::result::Result<Arc<GpuContext>, String>> = OnceLock::new();

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

fn binding_cap_from_env() -> Result<Option<u64>> {
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

fn webgpu_limits_from_env() -> Result<bool> {
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
fn requested_limits(adapter: &wgpu::Limits, webgpu_baseline: bool) -> wgpu::Limits {
    if webgpu_baseline {
        wgpu::Limits::default()
    } else {
        adapter.clone()
    }
}

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

    pub fn max_binding_bytes(&self) -> u64 {
        self.limits
            .max_storage_buffer_binding_size
            .min(self.limits.max_buffer_size)
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

    // ---------------------------------------------------------------- buffers

    /// An uninitialised pooled buffer of `len` f32 values. Kernels must write every element.
    /// It may exceed one binding (ops then work on views of it), not the largest buffer.
    pub fn alloc(self: &Arc<Self>, len: usize) -> Result<GpuBuffer> {
        let bytes = len as u64 * 4;
        if bytes > self.limits.max_buffer_size {
            return Err(EngineError::BufferTooLarge {
                bytes,
                limit: self.limits.max_buffer_size,
            });
        }
        // Near the limit the bucket may round past it; the exact size is used there, so that
        // every request up to max_buffer_size is served (and the batch the device-memory
        // error suggests really fits).
        let size = match bucket_size(bytes) {
            b if b > self.limits.max_buffer_size => bytes.max(16),
            b => b,
        };
        let reused = {
            let mut pool = self.pool.lock().unwrap();
            let b = pool.free.get_mut(&size).and_then(|v| v.pop());
            if b.is_some() {
                pool.free_bytes -= size;
            }
            pool.live_bytes += size;
            pool.peak_bytes = pool.peak_bytes.max(pool.live_bytes);
            b
        };
        let buffer = match reused {
            Some(b) => b,
            None => self.create_storage_buffer(size).inspect_err(|_| {
                let mut pool = self.pool.lock().unwrap();
                pool.live_bytes = pool.live_bytes.saturating_sub(size);
            })?,
        };
        Ok(GpuBuffer {
            buffer: Some(buffer),
            len,
            offset: 0,
            pooled: true,
            ctx: self.clone(),
        })
    }

    /// A new storage buffer of `size` bytes. Running out of device memory is caught through an
    /// error scope (wgpu would otherwise report it to its uncaptured-error handler, which
    /// panics); the free pool is then emptied and the allocation tried once more before the
    /// typed [`EngineError::OutOfDeviceMemory`] is returned.
    fn create_storage_buffer(&self, size: u64) -> Result<wgpu::Buffer> {
        let attempt = || {
            let scope = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
            let buffer = self.device.create_buffer(&wgpu::BufferDescriptor {
                label: None,
                size,
                usage: wgpu::BufferUsages::STORAGE
                    | wgpu::BufferUsages::COPY_SRC
                    | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            match pollster::block_on(scope.pop()) {
                None => Some(buffer),
                Some(_) => None,
            }
        };
        if let Some(buffer) = attempt() {
            return Ok(buffer);
        }
        self.drop_free_buffers();
        let _ = self.sync();
        attempt().ok_or_else(|| EngineError::OutOfDeviceMemory {
            bytes: size,
            live_bytes: self.memory_stats().0.saturating_sub(size),
        })
    }

    /// Destroys the pooled free buffers (their memory returns to the device).
    fn drop_free_buffers(&self) {
        let mut pool = self.pool.lock().unwrap();
        pool.free.clear();
        pool.free_bytes = 0;
    }

    fn release(&self, buf: wgpu::Buffer) {
        let size = buf.size();
        let mut pool = self.pool.lock().unwrap();
        pool.live_bytes = pool.live_bytes.saturating_sub(size);
        if pool.free_bytes + size > POOL_KEEP_BYTES {
            return; // dropped: wgpu frees it once pending commands are done with it
        }
        pool.free_bytes += size;
        pool.free.entry(size).or_default().push(buf);
    }

    /// Bytes held by live tensors and by the free pool.
    pub fn memory_stats(&self) -> (u64, u64) {
        let pool = self.pool.lock().unwrap();
        (pool.live_bytes, pool.free_bytes)
    }

    /// The most bytes live tensors held at once since the last [`Self::reset_peak`].
    pub fn peak_live_bytes(&self) -> u64 {
        self.pool.lock().unwrap().peak_bytes
    }

    /// Starts a new peak measurement from the bytes live now.
    pub fn reset_peak(&self) {
        let mut pool = self.pool.lock().unwrap();
        pool.peak_bytes = pool.live_bytes;
    }

    /// A buffer filled with zeros (the clear is recorded in order with the dispatches).
    pub fn zeros(self: &Arc<Self>, len: usize) -> Result<GpuBuffer> {
        let buf = self.alloc(len)?;
        let mut rec = self.rec.lock().unwrap();
        let enc = self.encoder(&mut rec);
        enc.clear_buffer(buf.raw(), 0, None);
        Ok(buf)
    }

    /// Uploads host data through a fresh staging buffer and an in-order copy.
    pub fn upload(self: &Arc<Self>, data: &[f32]) -> Result<GpuBuffer> {
        let buf = self.alloc(data.len())?;
        if data.is_empty() {
            return Ok(buf);
        }
        let bytes: &[u8] = bytemuck::cast_slice(data);
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("upload"),
            size: bytes.len() as u64,
            usage: wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: true,
        });
        staging
            .slice(..)
            .get_mapped_range_mut()
            .map_err(|e| EngineError::Gpu(format!("mapping an upload buffer: {e}")))?
            .copy_from_slice(bytes);
        staging.unmap();
        let mut rec = self.rec.lock().unwrap();
        let enc = self.encoder(&mut rec);
        enc.copy_buffer_to_buffer(&staging, 0, buf.raw(), 0, bytes.len() as u64);
        Ok(buf)
    }

    /// Copies `len` values from `src[src_off..]` to `dst[dst_off..]`, in order with dispatches.
    pub fn copy(
        &self,
        src: &GpuBuffer,
        src_off: usize,
        dst: &GpuBuffer,
        dst_off: usize,
        len: usize,
    ) {
        if len == 0 {
            return;
        }
        let mut rec = self.rec.lock().unwrap();
        let enc = self.encoder(&mut rec);
        enc.copy_buffer_to_buffer(
            src.raw(),
            (src.offset + src_off) as u64 * 4,
            dst.raw(),
            (dst.offset + dst_off) as u64 * 4,
            len as u64 * 4,
        );
    }

    /// Reads a buffer back to the host; submits pending work and waits for it.
    pub fn download(&self, buf: &GpuBuffer) -> Result<Vec<f32>> {
        let bytes = buf.len as u64 * 4;
        if bytes == 0 {
            return Ok(Vec::new());
        }
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("download"),
            size: bytes,
            usage: wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::MAP_READ,
            mapped_at_creation: false,
        });
        {
            let mut rec = self.rec.lock().unwrap();
            let enc = self.encoder(&mut rec);
            enc.copy_buffer_to_buffer(buf.raw(), buf.offset as u64 * 4, &staging, 0, bytes);
            self.submit(&mut rec);
        }
        let bytes = self.read_mapped(&staging)?;
        Ok(bytemuck::pod_collect_to_vec::<u8, f32>(&bytes))
    }

    /// Maps a submitted MAP_READ buffer, waits for the device, and copies its bytes out.
    fn read_mapped(&self, staging: &wgpu::Buffer) -> Result<Vec<u8>> {
        let (tx, rx) = std::sync::mpsc::channel();
        staging.map_async(wgpu::MapMode::Read, .., move |r| {
            let _ = tx.send(r);
        });
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| EngineError::Gpu(format!("waiting for the device: {e}")))?;
        rx.recv()
            .map_err(|e| EngineError::Gpu(e.to_string()))?
            .map_err(|e| EngineError::Gpu(format!("mapping a buffer for readback: {e}")))?;
        let out = staging
            .slice(..)
            .get_mapped_range()
            .map_err(|e| EngineError::Gpu(format!("reading a mapped buffer: {e}")))?
            .to_vec();
        staging.unmap();
        Ok(out)
    }

    // ------------------------------------------------------------- recording

    fn encoder<'a>(&self, rec: &'a mut Recorder) -> &'a mut wgpu::CommandEncoder {
        rec.encoder.get_or_insert_with(|| {
            self.device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("step"),
                })
        })
    }

    fn submit(&self, rec: &mut Recorder) {
        if let Some(enc) = rec.encoder.take() {
            self.queue.submit(Some(enc.finish()));
        }
        rec.dispatches = 0;
        let used = std::mem::take(&mut rec.uniforms_used);
        rec.uniforms_free.extend(used);
    }

    /// Submits everything recorded so far (without waiting).
    pub fn flush(&self) {
        let mut rec = self.rec.lock().unwrap();
        self.submit(&mut rec);
    }

    /// Submits and waits until the device is idle.
    pub fn sync(&self) -> Result<()> {
        self.flush();
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map(|_| ())
            .map_err(|e| EngineError::Gpu(format!("waiting for the device: {e}")))
    }

    fn module(&self, k: &Kernel) -> Result<Arc<wgpu::ShaderModule>> {
        let mut modules = self.modules.lock().unwrap();
        if let Some(m) = modules.get(k.file) {
            return Ok(m.clone());
        }
        let src = assembled_source(k.file, k.source)?;
        let module = Arc::new(
            self.device
                .create_shader_module(wgpu::ShaderModuleDescriptor {
                    label: Some(k.file),
                    source: wgpu::ShaderSource::Wgsl(src.into()),
                }),
        );
        modules.insert(k.file, module.clone());
        Ok(module)
    }

    fn pipeline(&self, k: &Kernel) -> Result<Arc<Pipeline>> {
        if let Some(p) = self.pipelines.lock().unwrap().get(&(k.file, k.entry)) {
            return Ok(p.clone());
        }
        let module = self.module(k)?;
        let mut entries = vec![wgpu::BindGroupLayoutEntry {
            binding: 0,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Uniform,
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        }];
        for (i, acc) in k.bindings.iter().enumerate() {
            entries.push(wgpu::BindGroupLayoutEntry {
                binding: i as u32 + 1,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer {
                    ty: wgpu::BufferBindingType::Storage {
                        read_only: *acc == Access::Read,
                    },
                    has_dynamic_offset: false,
                    min_binding_size: None,
                },
                count: None,
            });
        }
        let layout = self
            .device
            .create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                label: Some(k.entry),
                entries: &entries,
            });
        let pl = self
            .device
            .create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                label: Some(k.entry),
                bind_group_layouts: &[Some(&layout)],
                immediate_size: 0,
            });
        let pipeline = self
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(k.entry),
                layout: Some(&pl),
                module: &module,
                entry_point: Some(k.entry),
                compilation_options: Default::default(),
                cache: None,
            });
        let p = Arc::new(Pipeline { pipeline, layout });
        self.pipelines
            .lock()
            .unwrap()
            .insert((k.file, k.entry), p.clone());
        Ok(p)
    }

    fn uniform(&self, rec: &mut Recorder, params: &[u8]) -> wgpu::Buffer {
        assert!(
            params.len() <= UNIFORM_SIZE as usize,
            "parameter block too large"
        );
        let buf = rec.uniforms_free.pop().unwrap_or_else(|| {
            self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("params"),
                size: UNIFORM_SIZE,
                usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            })
        });
        // Whole 16-byte rows, as uniform blocks are laid out.
        let mut bytes = params.to_vec();
        bytes.resize(16.max(params.len().next_multiple_of(16)), 0);
        self.queue.write_buffer(&buf, 0, &bytes);
        rec.uniforms_used.push(buf.clone());
        buf
    }

    /// Records one dispatch of `k` over a grid of `groups` workgroups in x, y, z.
    pub fn dispatch3<P: KernelParams>(
        &self,
        k: &Kernel,
        params: &P,
        buffers: &[&GpuBuffer],
        groups: [u32; 3],
    ) -> Result<()> {
        if buffers.len() != k.bindings.len() {
            return Err(EngineError::Gpu(format!(
                "kernel {}::{} takes {} buffers, got {}",
                k.file,
                k.entry,
                k.bindings.len(),
                buffers.len()
            )));
        }
        if groups
            .iter()
            .any(|&g| g > self.limits.max_compute_workgroups_per_dimension)
        {
            return Err(EngineError::Gpu(format!(
                "kernel {}::{}: grid {groups:?} exceeds the adapter's {} workgroups per dimension",
                k.file, k.entry, self.limits.max_compute_workgroups_per_dimension
            )));
        }
        if groups.contains(&0) {
            return Ok(());
        }
        for b in buffers {
            if b.binding_bytes() > self.max_binding_bytes() {
                return Err(EngineError::BindingTooLarge {
                    name: format!("binding of {}::{}", k.file, k.entry),
                    bytes: b.binding_bytes(),
                    limit: self.max_binding_bytes(),
                });
            }
        }
        let pipe = self.pipeline(k)?;
        let started = match &self.profile {
            Some(_) => {
                self.sync()?;
                Some(std::time::Instant::now())
            }
            None => None,
        };
        let mut rec = self.rec.lock().unwrap();
        let ubuf = self.uniform(&mut rec, bytemuck::bytes_of(params));
        let mut entries = vec![wgpu::BindGroupEntry {
            binding: 0,
            resource: ubuf.as_entire_binding(),
        }];
        for (i, b) in buffers.iter().enumerate() {
            entries.push(wgpu::BindGroupEntry {
                binding: i as u32 + 1,
                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: b.raw(),
                    offset: b.offset as u64 * 4,
                    size: wgpu::BufferSize::new(b.binding_bytes()),
                }),
            });
        }
        let bg = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &pipe.layout,
            entries: &entries,
        });
        {
            let enc = self.encoder(&mut rec);
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: None,
                timestamp_writes: None,
            });
            pass.set_pipeline(&pipe.pipeline);
            pass.set_bind_group(0, &bg, &[]);
            pass.dispatch_workgroups(groups[0], groups[1], groups[2]);
        }
        rec.dispatches += 1;
        self.dispatch_count
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if rec.dispatches >= MAX_PENDING_DISPATCHES {
            self.submit(&mut rec);
        }
        drop(rec);
        if let (Some(profile), Some(started)) = (&self.profile, started) {
            self.sync()?;
            let key = format!("{}::{} {:?}", k.file, k.entry, groups);
            let mut p = profile.lock().unwrap();
            let e = p.entry(key).or_insert((0, 0.0));
            e.0 += 1;
            e.1 += started.elapsed().as_secs_f64();
        }
        Ok(())
    }

    /// The per-kernel profile gathered under `ROBUST_DML_PROFILE=1`, largest total first (one
    /// line per kernel and grid: calls, total and mean milliseconds); `None` when not profiling.
    pub fn profile_report(&self) -> Option<String> {
        let p = self.profile.as_ref()?.lock().unwrap();
        let mut rows: Vec<_> = p.iter().collect();
        rows.sort_by(|a, b| b.1 .1.total_cmp(&a.1 .1));
        let total: f64 = rows.iter().map(|r| r.1 .1).sum();
        let mut out = format!("profile: {:.1} ms in {} kernels\n", total * 1e3, rows.len());
        for (key, (calls, secs)) in rows {
            out += &format!(
                "{:>9.1} ms {:>5.1}% {:>6} calls {:>8.3} ms/call  {key}\n",
                secs * 1e3,
                100.0 * secs / total.max(1e-12),
                calls,
                secs * 1e3 / *calls as f64
            );
        }
        Some(out)
    }

    /// Records a dispatch of `workgroups` workgroups, folded into 2-D past 65,535. Kernels
    /// recover the linear workgroup index with the prelude's `wg_linear`.
    pub fn dispatch<P: KernelParams>(
        &self,
        k: &Kernel,
        params: &P,
        buffers: &[&GpuBuffer],
        workgroups: u32,
    ) -> Result<()> {
        self.dispatch3(k, params, buffers, fold_grid(workgroups))
    }

    /// Ops that have run in chunks so far because a tensor exceeded one binding.
    pub fn split_ops(&self) -> u64 {
        self.split_count.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub(crate) fn count_split(&self) {
        self.split_count
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Dispatches recorded so far by this context.
    pub fn dispatches(&self) -> u64 {
        self.dispatch_count
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether [`Self::time_device`] measures with timestamp queries.
    pub fn has_timestamps(&self) -> bool {
        self.features.contains(
            wgpu::Features::TIMESTAMP_QUERY | wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS,
        )
    }

    /// Runs `work` (which records GPU commands) and returns the device time between its first
    /// and last command in milliseconds, from timestamp queries; `None` when the adapter has
    /// no timestamps (callers then fall back to synchronised wall time). Waits for completion.
    pub fn time_device(&self, work: impl FnOnce() -> Result<()>) -> Result<Option<f64>> {
        if !self.has_timestamps() {
            work()?;
            self.sync()?;
            return Ok(None);
        }
        self.sync()?;
        let qs = self.device.create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("bench"),
            ty: wgpu::QueryType::Timestamp,
            count: 2,
        });
        let resolve = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("timestamps"),
            size: 16,
            usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        let readback = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("timestamps read"),
            size: 16,
            usage: wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::MAP_READ,
            mapped_at_creation: false,
        });
        {
            let mut rec = self.rec.lock().unwrap();
            self.encoder(&mut rec).write_timestamp(&qs, 0);
        }
        work()?;
        {
            let mut rec = self.rec.lock().unwrap();
            let enc = self.encoder(&mut rec);
            enc.write_timestamp(&qs, 1);
            enc.resolve_query_set(&qs, 0..2, &resolve, 0);
            enc.copy_buffer_to_buffer(&resolve, 0, &readback, 0, 16);
            self.submit(&mut rec);
        }
        let bytes = self.read_mapped(&readback)?;
        let v: Vec<u64> = bytemuck::pod_collect_to_vec(&bytes);
        let ticks = [v[0], v[1]];
        let ns =
            ticks[1].saturating_sub(ticks[0]) as f64 * self.queue.get_timestamp_period() as f64;
        Ok(Some(ns / 1e6))
    }
}

/// Folds a 1-D workgroup count into x/y so that neither exceeds 65,535.
pub fn fold_grid(workgroups: u32) -> [u32; 3] {
    if workgroups <= MAX_GRID_DIM {
        [workgroups, 1, 1]
    } else {
        let y = workgroups.div_ceil(MAX_GRID_DIM);
        let x = workgroups.div_ceil(y);
        [x, y, 1]
    }
}

/// Workgroups needed to cover `n` items with `per_group` items each.
pub fn groups_for(n: usize, per_group: usize) -> Result<u32> {
    to_u32(n.div_ceil(per_group))
}

/// A size or index as the `u32` the kernels compute with; larger values are an error (naming
/// the value) rather than silently truncated.
pub fn to_u32(v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| EngineError::SizeOverU32 { value: v })
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn buckets_cover_request() {
        for b in [1u64, 4, 16, 17, 100, 1000, 4096, 5000, 6145, 1 << 20] {
            let s = bucket_size(b);
            assert!(s >= b && s.is_multiple_of(4), "{b} -> {s}");
            assert!(
                s <= (b.max(16) * 4).div_ceil(3) + 4 || s <= 16,
                "{b} -> {s} wastes too much"
            );
        }
    }
    #[test]
    fn includes_resolve_once_and_unknown_ones_are_errors() {
        let text =
            "#include \"matmul_params.wgsl\"\n  #include \"matmul_params.wgsl\"\nfn f() {}\n";
        let src = assembled_source("t.wgsl", text).unwrap();
        assert_eq!(src.matches("struct Params").count(), 1, "{src}");
        assert!(!src.contains("#include") && src.contains("fn f() {}"));
        let err = assembled_source("t.wgsl", "#include \"nope.wgsl\"\n").unwrap_err();
        assert!(err.to_string().contains("t.wgsl") && err.to_string().contains("nope.wgsl"));
    }
    #[test]
    fn grid_folding() {
        assert_eq!(fold_grid(10), [10, 1, 1]);
        let g = fold_grid(200_000);
        assert!(g[0] <= MAX_GRID_DIM && g[0] * g[1] >= 200_000);
    }
}
