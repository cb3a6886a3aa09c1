//! Per-kernel wall time (`ROBUST_DML_PROFILE=1`), dispatch counts and device timestamps.

use super::GpuContext;
use crate::engine::error::Result;

impl GpuContext {
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
