//! Wall-clock timing of batch norm and pooling forward + backward on the GPU device.
//! `cargo run --release --example bn_pool_timing` (2 warm-ups, median of 5, device synced
//! around every run). Peer: burn's wgpu, training-mode batch norm forward+backward on
//! [8, 96, 56, 56] under llvmpipe: 128 ms.

use std::time::Instant;

use robust_dml::engine::ops::batchnorm::{batch_norm_eval, batch_norm_train};
use robust_dml::engine::ops::elementwise::relu;
use robust_dml::engine::ops::pool::{avg_pool2d, max_pool2d, Pool2dParams};
use robust_dml::engine::tape::backward_with;
use robust_dml::engine::{Device, Result, Rng, Tensor};

const WARMUPS: usize = 2;
const RUNS: usize = 5;

/// CPU time of this process (all threads, llvmpipe's workers included) in ms, on Linux. On a
/// shared machine it measures the work done where wall time measures the contention.
fn process_cpu_ms() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let fields: Vec<&str> = stat.rsplit(')').next()?.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks * 10.0) // USER_HZ = 100
}

/// Median milliseconds of `f` over RUNS runs after WARMUPS, syncing the device around each;
/// prints the mean process CPU time per run alongside when available.
fn time_ms(dev: &Device, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..WARMUPS {
        f()?;
        dev.sync()?;
    }
    let cpu_start = process_cpu_ms();
    let mut ms = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        dev.sync()?;
        let t = Instant::now();
        f()?;
        dev.sync()?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    if let (Some(a), Some(b)) = (cpu_start, process_cpu_ms()) {
        print!("[cpu {:.0} ms/run] ", (b - a) / RUNS as f64);
    }
    ms.sort_by(f64::total_cmp);
    Ok(ms[RUNS / 2])
}

/// Forward, then backward seeded with `seed`, waiting for every gradient to be computed.
fn forward_backward(out: Tensor, seed: &Tensor) -> Result<()> {
    let grads = backward_with(out, seed.clone())?;
    drop(grads);
    Ok(())
}

fn main() -> Result<()> {
    let dev = Device::gpu()?;
    println!("device: {}", dev.name());
    let mut rng = Rng::new(1);
    let shape = [8, 96, 56, 56];
    let c = shape[1];
    let x = Tensor::randn(&shape, 1.0, &mut rng, &dev)?.var();
    let seed = Tensor::randn(&shape, 1.0, &mut rng, &dev)?;
    let gamma = Tensor::full(1.0, &[c], &dev)?.var();
    let beta = Tensor::zeros(&[c], &dev)?.var();
    let rm = Tensor::zeros(&[c], &dev)?;
    let rv = Tensor::full(1.0, &[c], &dev)?;

    // Baseline: one elementwise pass over x (read + write), the floor of any per-element kernel.
    let xd0 = x.detach();
    let relu = time_ms(&dev, || relu(&xd0).map(drop))?;
    println!("baseline: relu forward {shape:?}: {relu:.1} ms");

    let train = time_ms(&dev, || {
        let y = batch_norm_train(&x, &gamma, &beta, &rm, &rv, 0.1, 1e-5)?;
        forward_backward(y, &seed)
    })?;
    println!("batch_norm_train fwd+bwd {shape:?}: {train:.1} ms (burn wgpu peer: 128 ms)");

    let train_fwd = time_ms(&dev, || {
        batch_norm_train(&x.detach(), &gamma, &beta, &rm, &rv, 0.1, 1e-5).map(drop)
    })?;
    println!("batch_norm_train fwd only: {train_fwd:.1} ms");

    let eval = time_ms(&dev, || {
        let y = batch_norm_eval(&x, &gamma, &beta, &rm, &rv, 1e-5)?;
        forward_backward(y, &seed)
    })?;
    println!("batch_norm_eval fwd+bwd (x, gamma, beta): {eval:.1} ms");

    let xd = x.detach().var();
    let (g0, b0) = (gamma.detach(), beta.detach());
    let eval_x = time_ms(&dev, || {
        let y = batch_norm_eval(&xd, &g0, &b0, &rm, &rv, 1e-5)?;
        forward_backward(y, &seed)
    })?;
    println!("batch_norm_eval fwd+bwd (x only, frozen affine): {eval_x:.1} ms");

    let max_p = Pool2dParams {
        kernel: (3, 3),
        stride: (2, 2),
        padding: (0, 0),
        ceil_mode: true,
        count_include_pad: true,
    };
    let pooled = [8, 96, 28, 28];
    let pool_seed = Tensor::randn(&pooled, 1.0, &mut rng, &dev)?;
    let maxpool = time_ms(&dev, || {
        forward_backward(max_pool2d(&x, max_p)?, &pool_seed)
    })?;
    println!("max_pool2d 3x3 s2 ceil fwd+bwd {shape:?}: {maxpool:.1} ms");

    let avg_p = Pool2dParams {
        kernel: (3, 3),
        stride: (1, 1),
        padding: (1, 1),
        ceil_mode: false,
        count_include_pad: true,
    };
    let avgpool = time_ms(&dev, || forward_backward(avg_pool2d(&x, avg_p)?, &seed))?;
    println!("avg_pool2d 3x3 s1 pad1 fwd+bwd {shape:?}: {avgpool:.1} ms");
    Ok(())
}
