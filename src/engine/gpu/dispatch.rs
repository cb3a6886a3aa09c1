//! The command recorder that batches every dispatch of a step into one encoder, the shader
//! module and pipeline caches, and the dispatch itself.

use std::collections::HashMap;
use std::sync::Arc;

use super::{assembled_source, fold_grid, Access, GpuBuffer, GpuContext, Kernel, KernelParams};
use crate::engine::error::{EngineError, Result};

pub(super) struct Pipeline {
    pipeline: wgpu::ComputePipeline,
    layout: wgpu::BindGroupLayout,
}

/// Shader modules by kernel file.
pub(super) type ModuleCache = HashMap<&'static str, Arc<wgpu::ShaderModule>>;
/// Pipelines by (kernel file, entry point).
pub(super) type PipelineCache = HashMap<(&'static str, &'static str), Arc<Pipeline>>;

#[derive(Default)]
pub(super) struct Recorder {
    encoder: Option<wgpu::CommandEncoder>,
    dispatches: usize,
    /// Uniform buffers used since the last submit; they are reusable only after it.
    uniforms_used: Vec<wgpu::Buffer>,
    uniforms_free: Vec<wgpu::Buffer>,
}

/// Dispatches recorded before a submit is forced, bounding the memory held by pending work.
const MAX_PENDING_DISPATCHES: usize = 4096;
const UNIFORM_SIZE: u64 = 256;

impl GpuContext {
    pub(super) fn encoder<'a>(&self, rec: &'a mut Recorder) -> &'a mut wgpu::CommandEncoder {
        rec.encoder.get_or_insert_with(|| {
            self.device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("step"),
                })
        })
    }

    pub(super) fn submit(&self, rec: &mut Recorder) {
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
}
