//! Times every GPU GEMM kernel on 1024^3 and on the shapes the models use:
//! `cargo run --release --example gemm_timing [kernel-name-filter]`. Each case: 2 warm-ups, then
//! the median of 5 runs, each ended by `device.sync()`. CPU time is reported too: on a software
//! adapter (llvmpipe) sharing its cores with other work, CPU time / cores approximates the
//! wall time of an idle machine.

use std::time::Instant;

use robust_dml::engine::ops::matmul::{gemm_raw_using, GemmKernel};
use robust_dml::engine::{Device, Result, Rng, Tensor};

/// CPU seconds all threads of this process have used so far (llvmpipe's worker threads
/// included), from each thread's /proc schedstat (nanoseconds on the CPU); 0 where unavailable.
fn cpu_seconds() -> f64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0.0;
    };
    let mut ns = 0u64;
    for task in tasks.flatten() {
        let stat = std::fs::read_to_string(task.path().join("schedstat")).unwrap_or_default();
        ns += stat
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    }
    ns as f64 * 1e-9
}

/// Median wall-clock and CPU milliseconds of 5 runs after 2 warm-ups.
fn median_ms(device: &Device, mut run: impl FnMut() -> Result<()>) -> Result<(f64, f64)> {
    for _ in 0..2 {
        run()?;
        device.sync()?;
    }
    let (mut wall, mut cpu) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        device.sync()?;
        let (t0, c0) = (Instant::now(), cpu_seconds());
        run()?;
        device.sync()?;
        wall.push(t0.elapsed().as_secs_f64() * 1e3);
        cpu.push((cpu_seconds() - c0) * 1e3);
    }
    wall.sort_by(|a, b| a.total_cmp(b));
    cpu.sort_by(|a, b| a.total_cmp(b));
    Ok((wall[2], cpu[2]))
}

struct Case {
    name: &'static str,
    a: &'static [usize],
    b: &'static [usize],
    ta: bool,
    tb: bool,
}

const CASES: &[Case] = &[
    Case {
        name: "1024x1024x1024",
        a: &[1024, 1024],
        b: &[1024, 1024],
        ta: false,
        tb: false,
    },
    Case {
        name: "1x1 conv [4096x96]x[96x32]",
        a: &[4096, 96],
        b: &[96, 32],
        ta: false,
        tb: false,
    },
    Case {
        name: "1x1 conv dW [96x4096]x[4096x32]",
        a: &[4096, 96],
        b: &[4096, 32],
        ta: true,
        tb: false,
    },
    Case {
        name: "head [16x1280]x[512x1280]^T",
        a: &[16, 1280],
        b: &[512, 1280],
        ta: false,
        tb: true,
    },
    Case {
        name: "head dX [16x512]x[512x1280]",
        a: &[16, 512],
        b: &[512, 1280],
        ta: false,
        tb: false,
    },
    Case {
        name: "head dW [16x512]^Tx[16x1280]",
        a: &[16, 512],
        b: &[16, 1280],
        ta: true,
        tb: false,
    },
    Case {
        name: "batched [8,64,256]^Tx[8,128,64]^T",
        a: &[8, 64, 256],
        b: &[8, 128, 64],
        ta: true,
        tb: true,
    },
    Case {
        name: "sim [256x512]x[1000x512]^T",
        a: &[256, 512],
        b: &[1000, 512],
        ta: false,
        tb: true,
    },
];

fn main() -> Result<()> {
    let filter = std::env::args().nth(1).unwrap_or_default().to_lowercase();
    let device = Device::gpu()?;
    println!("device: {}", device.name());
    let mut rng = Rng::new(1);
    for case in CASES {
        let a = Tensor::randn(case.a, 1.0, &mut rng, &device)?;
        let b = Tensor::randn(case.b, 1.0, &mut rng, &device)?;
        let out = gemm_raw_using(None, &a, &b, case.ta, case.tb)?;
        let k = if case.ta {
            case.a[case.a.len() - 2]
        } else {
            case.a[case.a.len() - 1]
        };
        let flops = 2.0 * (out.numel() * k) as f64;
        for kernel in GemmKernel::ALL {
            if !format!("{kernel:?}").to_lowercase().contains(&filter) {
                continue;
            }
            let (wall, cpu) = median_ms(&device, || {
                gemm_raw_using(Some(kernel), &a, &b, case.ta, case.tb).map(|_| ())
            })?;
            println!(
                "{:<36} {:<14} {wall:8.1} ms (cpu {cpu:8.1})  {:6.2} GFLOP/s wall, {:6.2} at cpu/2",
                case.name,
                format!("{kernel:?}"),
                flops / wall / 1e6,
                flops / (cpu / 2.0) / 1e6
            );
        }
    }
    println!("peer (burn wgpu, llvmpipe, idle machine): 1024^3 in 227 ms (9.4 GFLOP/s)");
    Ok(())
}
