//! The benchmark harness shared by `kernels.rs` and `model.rs`: 2 warm-ups, then the median of
//! at least 5 timed runs; device time from timestamp queries where the adapter has them, else
//! wall time with the device synchronised before the clock is read.

use std::time::Instant;

use robust_dml::engine::{Device, Result};

pub struct Bench {
    pub device: Device,
    pub runs: usize,
    pub filter: Option<String>,
    /// Synchronised wall time even where timestamps exist (`BENCH_WALL=1`).
    pub wall: bool,
}

/// Work per run, for the throughput column.
#[allow(dead_code)] // each bench binary uses a subset
pub enum Work {
    Flops(f64),
    Bytes(f64),
    None,
}

impl Bench {
    pub fn from_env() -> Bench {
        // As the program does (src/main.rs), so the cases time what a run sees.
        robust_dml::engine::cpu::tune_allocator();
        if let Err(e) = robust_dml::engine::cpu::configure_threads() {
            eprintln!("{e}; benchmarking with rayon's default pool");
        }
        let device = Device::from_env().unwrap_or_else(|e| {
            eprintln!("{e}; benchmarking the CPU backend");
            Device::Cpu
        });
        let runs = std::env::var("BENCH_RUNS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(5)
            .max(5);
        // `cargo bench --bench kernels -- matmul` runs only the cases whose name contains "matmul".
        let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
        let wall = std::env::var("BENCH_WALL").is_ok_and(|v| v == "1");
        let timing = match &device {
            Device::Gpu(_) if wall => "synchronised wall time (BENCH_WALL=1)",
            Device::Gpu(ctx) if ctx.has_timestamps() => "device timestamps",
            Device::Gpu(_) => "synchronised wall time",
            Device::Cpu => "wall time",
        };
        println!("adapter: {} (timing: {timing})", device.name());
        if let Device::Cpu = device {
            // Which SGEMM code ran: gemm picks its micro-kernels from the CPU's features.
            println!(
                "cpu: {}, {} threads, gemm kernels: {}",
                robust_dml::engine::cpu::cpu_model(),
                robust_dml::engine::cpu::threads(),
                robust_dml::engine::cpu::gemm_kernels()
            );
        }
        Bench {
            device,
            runs,
            filter,
            wall,
        }
    }

    fn time_once(&self, f: &mut (impl FnMut() -> Result<()> + Send)) -> Result<f64> {
        match &self.device {
            Device::Gpu(ctx) if self.wall => {
                ctx.sync()?;
                let start = Instant::now();
                f()?;
                ctx.sync()?;
                Ok(start.elapsed().as_secs_f64() * 1e3)
            }
            Device::Gpu(ctx) => {
                ctx.sync()?;
                let start = Instant::now();
                let device_ms = ctx.time_device(&mut *f)?;
                Ok(device_ms.unwrap_or_else(|| start.elapsed().as_secs_f64() * 1e3))
            }
            Device::Cpu => {
                // On a pool thread, as the program runs its work (engine::cpu::in_pool).
                let start = Instant::now();
                robust_dml::engine::cpu::in_pool(f)?;
                Ok(start.elapsed().as_secs_f64() * 1e3)
            }
        }
    }

    /// Times `f` and prints `bench <case> median_ms=.. min_ms=.. max_ms=.. [gflops=..|gbps=..]`.
    pub fn case(&self, name: &str, work: Work, mut f: impl FnMut() -> Result<()> + Send) {
        if self
            .filter
            .as_deref()
            .is_some_and(|flt| !name.contains(flt))
        {
            return;
        }
        let mut times = Vec::new();
        for i in 0..2 + self.runs {
            match self.time_once(&mut f) {
                Ok(t) if i >= 2 => times.push(t),
                Ok(_) => {}
                Err(e) => {
                    println!("bench {name} error=\"{e}\"");
                    return;
                }
            }
        }
        times.sort_by(|a, b| a.total_cmp(b));
        let median = times[times.len() / 2];
        let extra = match work {
            Work::Flops(fl) => format!(" gflops={:.2}", fl / (median * 1e-3) / 1e9),
            Work::Bytes(b) => format!(" gbps={:.2}", b / (median * 1e-3) / 1e9),
            Work::None => String::new(),
        };
        println!(
            "bench {name} median_ms={median:.3} min_ms={:.3} max_ms={:.3}{extra}",
            times[0],
            times[times.len() - 1]
        );
    }
}
