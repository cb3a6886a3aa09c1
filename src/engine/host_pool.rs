//! The CPU backend's buffer pool.
//!
//! Every op returns a fresh output buffer and its inputs' buffers are freed soon after, so a
//! training step or a PGD iteration frees and asks for buffers of the same few lengths hundreds
//! of times. Tensor storage freed on the CPU comes here, by length, and goes to the next op that
//! asks for that length: from the second iteration of a loop with fixed shapes on, its tensors
//! take no memory from the allocator, and an op that writes its whole output skips zeroing it.
//!
//! An op asks for [`zeroed`] when it adds into its output, and for [`for_overwrite`] when it
//! writes every element before anything reads one. A reused buffer from `for_overwrite` holds
//! the values of the tensor that had it before. In builds with debug assertions (the tests)
//! every `for_overwrite` buffer is filled with NaN instead, so an op that leaves an element
//! unwritten shows NaN against the reference loops.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex, MutexGuard};

/// Most bytes the pool holds; a freed buffer beyond it goes back to the allocator. A c2f2 PGD
/// step at the protocol's batch of 128 frees 63 MB of distinct buffers, which fit. A pooled
/// buffer serves only its own length, where the allocator would reuse the memory for any size,
/// so the pool raises the peak memory by up to its size; 256 MiB raised the main job's by
/// 300 MB without a measurable gain in speed (benches/RESULTS.md).
const MAX_POOLED_BYTES: usize = 96 << 20;

/// How often a request found a pooled buffer, how often it had to allocate, and how many CPU
/// tensor storages were made in all (those whose buffer did not come through the pool too).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Requests served by a pooled buffer.
    pub reused: u64,
    /// Requests that allocated a new buffer.
    pub allocated: u64,
    /// CPU tensor storages created, whatever their buffer's origin.
    pub storages: u64,
    /// [`Scratch`] vectors taken from the free list.
    pub scratch_reused: u64,
    /// [`Scratch`] vectors newly made (empty; they grow on first use).
    pub scratch_allocated: u64,
    /// Bytes in the pool's free buffers now.
    pub pooled_bytes: usize,
}

#[derive(Default)]
struct Pool {
    free: HashMap<usize, Vec<Vec<f32>>>,
    bytes: usize,
    stats: PoolStats,
}

static POOL: LazyLock<Mutex<Pool>> = LazyLock::new(Mutex::default);

fn pool() -> MutexGuard<'static, Pool> {
    // The pool's state stays consistent at every point a panic could leave it.
    POOL.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn take(len: usize) -> Option<Vec<f32>> {
    let mut p = pool();
    let found = p.free.get_mut(&len).and_then(Vec::pop);
    match found {
        Some(_) => {
            p.bytes -= len * size_of::<f32>();
            p.stats.reused += 1;
        }
        None => p.stats.allocated += 1,
    }
    found
}

/// A buffer of `len` zeros.
pub fn zeroed(len: usize) -> Vec<f32> {
    match take(len) {
        Some(mut v) => {
            v.fill(0.0);
            v
        }
        None => vec![0.0; len],
    }
}

/// A buffer of `len` values that the caller overwrites entirely before reading any: stale
/// values from the pool (NaN with debug assertions), or zeros when newly allocated.
pub fn for_overwrite(len: usize) -> Vec<f32> {
    let stale = cfg!(debug_assertions).then_some(f32::NAN);
    match take(len) {
        Some(mut v) => {
            if let Some(poison) = stale {
                v.fill(poison);
            }
            v
        }
        None => vec![stale.unwrap_or(0.0); len],
    }
}

/// Keeps a freed buffer for the next request of its length, unless the pool is full.
pub(crate) fn give_back(buffer: Vec<f32>) {
    let bytes = buffer.len() * size_of::<f32>();
    if bytes == 0 {
        return;
    }
    let mut p = pool();
    if p.bytes + bytes > MAX_POOLED_BYTES {
        drop(p);
        return; // `buffer` goes back to the allocator, outside the lock
    }
    p.bytes += bytes;
    p.free.entry(buffer.len()).or_default().push(buffer);
}

/// Most scratch vectors kept, and most bytes in them.
const MAX_SCRATCH: usize = 16;
const MAX_SCRATCH_BYTES: usize = 16 << 20;

static SCRATCH: Mutex<Vec<Vec<f32>>> = Mutex::new(Vec::new());

/// Working space for one task of an op (an image's im2col matrix, say): a vector of whatever
/// length the task resizes it to, holding stale values, taken from a small free list and put
/// back when dropped, so that repeated ops do not allocate it again.
pub struct Scratch(Vec<f32>);

impl Scratch {
    pub fn take() -> Scratch {
        let found = SCRATCH
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .pop();
        let mut p = pool();
        match found {
            Some(v) => {
                p.stats.scratch_reused += 1;
                Scratch(v)
            }
            None => {
                p.stats.scratch_allocated += 1;
                Scratch(Vec::new())
            }
        }
    }
}

impl std::ops::Deref for Scratch {
    type Target = Vec<f32>;
    fn deref(&self) -> &Vec<f32> {
        &self.0
    }
}

impl std::ops::DerefMut for Scratch {
    fn deref_mut(&mut self) -> &mut Vec<f32> {
        &mut self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let v = std::mem::take(&mut self.0);
        if v.capacity() == 0 {
            return;
        }
        let mut free = SCRATCH
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let held: usize = free.iter().map(Vec::capacity).sum();
        if free.len() < MAX_SCRATCH && (held + v.capacity()) * size_of::<f32>() <= MAX_SCRATCH_BYTES
        {
            free.push(v);
        }
    }
}

/// Counts a CPU tensor storage made from a buffer (see [`PoolStats::storages`]).
pub(crate) fn note_storage() {
    pool().stats.storages += 1;
}

/// The requests served so far, by reuse and by allocation.
pub fn stats() -> PoolStats {
    let p = pool();
    PoolStats {
        pooled_bytes: p.bytes,
        ..p.stats
    }
}

/// Returns every pooled buffer and scratch vector to the allocator (the statistics are kept).
pub fn release() {
    let mut p = pool();
    p.free.clear();
    p.bytes = 0;
    SCRATCH
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .clear();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// In test builds a buffer for overwriting is NaN even when the pool hands back one that held
    /// finite values, so an op that skips an element cannot pass on stale data.
    #[test]
    fn buffers_for_overwriting_are_poisoned_in_test_builds() {
        let len = 4099; // a length no other unit test asks for
        give_back(vec![1.5; len]);
        let v = for_overwrite(len);
        assert_eq!(v.len(), len);
        if cfg!(debug_assertions) {
            assert!(v.iter().all(|x| x.is_nan()));
        }
        give_back(v);
        assert!(zeroed(len).iter().all(|&x| x == 0.0));
    }
}
