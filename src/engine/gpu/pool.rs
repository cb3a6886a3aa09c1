//! Device buffers: the pool that recycles them by size bucket, so that a steady-state training
//! step allocates nothing, and uploads, copies and downloads.

use std::collections::HashMap;
use std::sync::Arc;

use super::GpuContext;
use crate::engine::error::{EngineError, Result};

/// Buffers are recycled by size bucket so that a steady-state training step allocates nothing.
#[derive(Default)]
pub(super) struct BufferPool {
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

/// A pooled storage buffer holding `len` f32 values. Returns to the pool when dropped.
///
/// A *view* ([`GpuBuffer::view`]) is a window of `len` values starting `offset` values into
/// another buffer: kernels bind just that range, which is how ops split tensors larger than
/// one binding (`engine::split`). Views never return to the pool; their parent must outlive them.
pub struct GpuBuffer {
    buffer: Option<wgpu::Buffer>,
    len: usize,
    pub(super) offset: usize,
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
    pub(super) fn binding_bytes(&self) -> u64 {
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

impl GpuContext {
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
    pub(super) fn read_mapped(&self, staging: &wgpu::Buffer) -> Result<Vec<u8>> {
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
}
