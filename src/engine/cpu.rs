//! Building blocks of the fast CPU backend: one SGEMM entry (the `gemm` crate, which picks its
//! kernels from the CPU's features at run time) and the rule for splitting work over rayon's pool.
//!
//! Determinism: every output element is reduced by one thread in a fixed order. `gemm` splits
//! only the output tiles over threads, never the K reduction, and the ops split over images,
//! channels or rows, summing per-block partials in block order (block counts depend on the
//! shapes only). Same inputs and thread count, same bits.

use super::error::{EngineError, Result};
use super::host_pool;
use rayon::prelude::*;

/// How a matrix is read: element (r, c) lives at `r * row + c * col`.
#[derive(Clone, Copy, Debug)]
pub struct Strides {
    pub row: usize,
    pub col: usize,
}

impl Strides {
    /// Row-major storage with rows `len` long.
    pub fn rows(len: usize) -> Strides {
        Strides { row: len, col: 1 }
    }
    /// The transpose of row-major storage with rows `len` long.
    pub fn transposed(len: usize) -> Strides {
        Strides { row: 1, col: len }
    }
    fn last_index(&self, rows: usize, cols: usize) -> usize {
        (rows - 1) * self.row + (cols - 1) * self.col
    }
}

/// Below this many multiply-adds a GEMM runs on the calling thread: splitting costs more.
const PARALLEL_GEMM_FLOPS: usize = 1 << 18;

/// c[m, n] = a[m, k] b[k, n] (or `+=` when `accumulate`), c row-major with rows `c_row` long.
/// `parallel` lets gemm split the output over the pool; callers that already run one GEMM per
/// thread pass false.
#[allow(clippy::too_many_arguments)]
pub fn sgemm(
    (m, n, k): (usize, usize, usize),
    a: &[f32],
    sa: Strides,
    b: &[f32],
    sb: Strides,
    c: &mut [f32],
    c_row: usize,
    accumulate: bool,
    parallel: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        c.len() > (m - 1) * c_row + (n - 1),
        "sgemm: output too short"
    );
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                c[r * c_row..r * c_row + n].fill(0.0);
            }
        }
        return;
    }
    assert!(
        a.len() > sa.last_index(m, k),
        "sgemm: left operand too short"
    );
    assert!(
        b.len() > sb.last_index(k, n),
        "sgemm: right operand too short"
    );
    let parallelism = if parallel && m * n * k >= PARALLEL_GEMM_FLOPS && threads() > 1 {
        gemm::Parallelism::Rayon(threads())
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the asserts above keep every index gemm forms inside the three slices, and `c`
    // is borrowed mutably, so it aliases neither operand.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            c_row as isize,
            accumulate,
            a.as_ptr(),
            sa.col as isize,
            sa.row as isize,
            b.as_ptr(),
            sb.col as isize,
            sb.row as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// Keeps freed memory in the process instead of handing it back to the kernel after every op.
///
/// Each op returns a fresh output buffer and drops its inputs' buffers soon after, so a training
/// step or PGD iteration allocates and frees the same few megabyte-sized blocks hundreds of
/// times. With glibc's defaults, blocks above its mmap threshold (128 KiB at start) get their own
/// mapping and freed heap tops are trimmed, so every op's output was page-faulted in afresh and
/// zeroed by the kernel: 2.4 million faults and 16% of the CPU time in the kernel for PGD-10 on
/// 2,000 Fashion-MNIST images. Raising the mmap threshold to glibc's maximum and trimming only
/// beyond 512 MiB of free memory lets those blocks be reused. Peak memory is still set by what is
/// live at once. Called once, before the work starts; a no-op on other C libraries.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const M_TRIM_THRESHOLD: i32 = -1;
        const M_MMAP_THRESHOLD: i32 = -3;
        /// glibc's largest accepted mmap threshold on 64-bit targets.
        const MMAP_THRESHOLD_MAX: i32 = 32 << 20;
        const TRIM_THRESHOLD: i32 = 512 << 20;
        extern "C" {
            fn mallopt(param: i32, value: i32) -> i32;
        }
        // SAFETY: mallopt only changes glibc's allocation parameters; it is called before the
        // program allocates in earnest, and a refused value (return 0) leaves the default.
        unsafe {
            mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX);
            mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD);
        }
    }
}

/// The family of SGEMM micro-kernels `gemm` runs on this CPU: `avx512f`, `fma` (AVX2 + FMA),
/// `neon` or `scalar`. It repeats the crate's own run-time choice (gemm-common 0.19's
/// `init_gemm_fn`: avx512f first, which its `x86-v4` feature (our `avx512`) compiles in, then
/// fma, then scalar), so that the benches and the run's device line can say which code ran.
pub fn gemm_kernels() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if cfg!(feature = "avx512") && std::arch::is_x86_feature_detected!("avx512f") {
            return "avx512f";
        }
        if std::arch::is_x86_feature_detected!("fma") {
            return "fma";
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        if std::arch::is_aarch64_feature_detected!("neon") {
            return "neon";
        }
    }
    "scalar"
}

/// The CPU's model name as the OS reports it (Linux's `/proc/cpuinfo`), for the conditions
/// printed beside measured figures; "unknown CPU" elsewhere.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, name)| name.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".to_string())
}

/// Threads of the pool (RAYON_NUM_THREADS, else one per logical CPU).
pub fn threads() -> usize {
    rayon::current_num_threads()
}

/// The most threads `RAYON_NUM_THREADS` may ask for: beyond this, threads only add scheduling
/// and memory (rayon would try to start 100,000 and appear to hang).
pub const MAX_THREADS: usize = 1024;

/// The pool threads' stacks: a program's main thread gets 8 MiB on Linux, and the program's work
/// runs on a pool thread ([`in_pool`]), so it gets as much (rayon's default is 2 MiB).
const POOL_STACK_BYTES: usize = 8 << 20;

/// Sizes the thread pool from `RAYON_NUM_THREADS` (unset or 0: one per logical CPU). A value
/// that is not a number, which rayon would silently ignore, or an absurd one is refused. Call
/// before the first parallel op.
pub fn configure_threads() -> Result<()> {
    let n = match std::env::var("RAYON_NUM_THREADS") {
        Ok(text) => thread_count(&text)?,
        Err(_) => 0,
    };
    // An error means the pool exists already (a second call in one process): keep it.
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .stack_size(POOL_STACK_BYTES)
        .build_global();
    Ok(())
}

/// `RAYON_NUM_THREADS` read as a thread count (0: one per logical CPU).
fn thread_count(text: &str) -> Result<usize> {
    let invalid = |why: &str| EngineError::Invalid {
        op: "RAYON_NUM_THREADS",
        detail: format!(
            "'{text}' {why}; set a thread count from 1 to {MAX_THREADS}, or unset it for one \
             thread per CPU"
        ),
    };
    let n: usize = text
        .trim()
        .parse()
        .map_err(|_| invalid("is not a whole number"))?;
    if n > MAX_THREADS {
        return Err(invalid("is too many threads"));
    }
    Ok(n)
}

/// Runs `f` on a thread of the pool and returns what it returns. Every CPU op splits its work
/// with rayon. Called from a thread outside the pool, an op hands all of it to the pool and
/// sleeps until the pool wakes it: two thread switches per op, which on MobileNetV2 at batch
/// 16 (hundreds of small ops a step) cost about a fifth of the step (benches/RESULTS.md).
/// Called from a pool thread, the op starts on the calling thread at once and the other
/// threads steal from it. The results do not change: how an op splits its work depends on the
/// shapes and the thread count only.
pub fn in_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
}

/// Elements per task of the flat elementwise loops: large enough to amortise scheduling, small
/// enough to stay in L2.
pub const FLAT_CHUNK: usize = 1 << 14;

/// out[i] = f(a[i]) over all cores.
pub fn map(a: &[f32], f: impl Fn(f32) -> f32 + Sync) -> Vec<f32> {
    let mut out = host_pool::for_overwrite(a.len());
    out.par_chunks_mut(FLAT_CHUNK)
        .zip(a.par_chunks(FLAT_CHUNK))
        .for_each(|(o, a)| {
            for (o, &a) in o.iter_mut().zip(a) {
                *o = f(a);
            }
        });
    out
}

/// out[i] = f(a[i], b[i]) over all cores.
pub fn zip_map(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32 + Sync) -> Vec<f32> {
    assert_eq!(a.len(), b.len(), "zip_map: lengths differ");
    let mut out = host_pool::for_overwrite(a.len());
    out.par_chunks_mut(FLAT_CHUNK)
        .zip(a.par_chunks(FLAT_CHUNK).zip(b.par_chunks(FLAT_CHUNK)))
        .for_each(|(o, (a, b))| {
            for ((o, &a), &b) in o.iter_mut().zip(a).zip(b) {
                *o = f(a, b);
            }
        });
    out
}

/// Rows (or planes) of `len` elements one task takes: about [`FLAT_CHUNK`] elements, so that
/// short rows are not scheduled one by one.
pub fn rows_per_task(len: usize) -> usize {
    (FLAT_CHUNK / len.max(1)).max(1)
}

/// Independent accumulators of the lane sums below: enough for the compiler to vectorise.
const LANES: usize = 8;

/// sum of a[i] * b[i] over 8 independent lanes (so it vectorises), the lanes then added in
/// order: a fixed summation order for any thread count.
pub fn lane_dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0.0f32; LANES];
    let (a_blocks, b_blocks) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = a_blocks
        .remainder()
        .iter()
        .zip(b_blocks.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (a, b) in a_blocks.zip(b_blocks) {
        for i in 0..LANES {
            lanes[i] += a[i] * b[i];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// sum of value(a[i]) in f64, over 8 lanes (so it vectorises) added in a fixed order.
pub fn lane_sum_f64(a: &[f32], value: impl Fn(f32) -> f64) -> f64 {
    lane_sum2_f64(a, a, |v, _| value(v))
}

/// sum of value(a[i], b[i]) in f64, over 8 lanes added in a fixed order.
pub fn lane_sum2_f64(a: &[f32], b: &[f32], value: impl Fn(f32, f32) -> f64) -> f64 {
    let mut lanes = [0.0f64; LANES];
    let (a_blocks, b_blocks) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f64 = a_blocks
        .remainder()
        .iter()
        .zip(b_blocks.remainder())
        .map(|(&u, &v)| value(u, v))
        .sum();
    for (a, b) in a_blocks.zip(b_blocks) {
        for i in 0..LANES {
            lanes[i] += value(a[i], b[i]);
        }
    }
    lanes.iter().sum::<f64>() + tail
}

/// Sums equal-length partial results element by element, in block order (deterministic).
pub fn sum_partials(partials: &[Vec<f32>], len: usize) -> Vec<f32> {
    let mut out = host_pool::zeroed(len);
    out.par_chunks_mut(FLAT_CHUNK)
        .enumerate()
        .for_each(|(chunk, o)| {
            let range = chunk * FLAT_CHUNK..chunk * FLAT_CHUNK + o.len();
            for p in partials {
                for (o, &v) in o.iter_mut().zip(&p[range.clone()]) {
                    *o += v;
                }
            }
        });
    out
}

/// The number of blocks a reduction over `items` is cut into: a function of the size alone,
/// so sums come out the same for any thread count.
pub fn reduction_blocks(items: usize) -> usize {
    const MAX_BLOCKS: usize = 16;
    items.clamp(1, MAX_BLOCKS)
}

/// Half-open ranges cutting `0..items` into `blocks` near-equal consecutive pieces.
pub fn block_ranges(items: usize, blocks: usize) -> Vec<std::ops::Range<usize>> {
    let blocks = blocks.max(1);
    (0..blocks)
        .map(|b| (b * items / blocks)..((b + 1) * items / blocks))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::testing::randn;

    #[test]
    fn parallel_maps_match_serial_loops() {
        let len = 3 * FLAT_CHUNK + 7;
        let a = randn(&[len], 1).to_vec().unwrap();
        let b = randn(&[len], 2).to_vec().unwrap();
        let serial: Vec<f32> = a.iter().map(|v| v.tanh()).collect();
        assert_eq!(map(&a, f32::tanh), serial);
        let serial: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x * y + 1.0).collect();
        assert_eq!(zip_map(&a, &b, |x, y| x * y + 1.0), serial);
    }

    #[test]
    fn partial_sums_are_added_in_block_order() {
        let len = FLAT_CHUNK + 3;
        let partials: Vec<Vec<f32>> = (0..5).map(|s| randn(&[len], s).to_vec().unwrap()).collect();
        let serial: Vec<f32> = (0..len)
            .map(|i| partials.iter().fold(0.0, |acc, p| acc + p[i]))
            .collect();
        assert_eq!(sum_partials(&partials, len), serial);
    }

    #[test]
    fn block_ranges_cover_every_item_once() {
        for (items, blocks) in [(0, 3), (1, 1), (17, 16), (100, 7)] {
            let ranges = block_ranges(items, blocks);
            let covered: Vec<usize> = ranges.into_iter().flatten().collect();
            assert_eq!(covered, (0..items).collect::<Vec<_>>());
        }
    }

    /// Multi-threaded SGEMMs give the same bits on every run (no split K reduction).
    #[test]
    fn parallel_sgemm_is_deterministic() {
        let (m, n, k) = (97, 131, 301);
        let a = randn(&[m * k], 3).to_vec().unwrap();
        let b = randn(&[k * n], 4).to_vec().unwrap();
        let run = || {
            let mut c = vec![0.0; m * n];
            sgemm(
                (m, n, k),
                &a,
                Strides::rows(k),
                &b,
                Strides::rows(n),
                &mut c,
                n,
                false,
                true,
            );
            c
        };
        let first = run();
        for _ in 0..3 {
            assert_eq!(run(), first);
        }
    }

    /// The benches' `gemm kernels:` line names AVX-512 only in a build that compiles those
    /// kernels in: without the `avx512` feature `gemm` runs its AVX2 + FMA kernels everywhere.
    #[test]
    fn gemm_kernel_label_follows_the_avx512_feature() {
        let label = gemm_kernels();
        assert!(["avx512f", "fma", "neon", "scalar"].contains(&label));
        if !cfg!(feature = "avx512") {
            assert_ne!(label, "avx512f");
        }
        #[cfg(target_arch = "x86_64")]
        if cfg!(feature = "avx512") && std::arch::is_x86_feature_detected!("avx512f") {
            assert_eq!(label, "avx512f");
        }
    }
}
