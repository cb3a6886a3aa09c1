//! Times the GPU convolutions on the shapes of the published peer numbers (burn's wgpu backend
//! on llvmpipe): `cargo run --release --example conv_timing`. Each case: 2 warm-ups, then the
//! median of 5 runs, each ended by `device.sync()`.

use std::time::Instant;

use robust_dml::engine::ops::conv::{conv2d, Conv2dParams};
use robust_dml::engine::tape::backward_with;
use robust_dml::engine::{no_grad, Device, Result, Rng, Tensor};

/// CPU seconds this process has used (user + system), from /proc; 0 where unavailable. On a
/// software adapter (llvmpipe) it measures the work even when other processes share the cores.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after_name = stat.rsplit(')').next().unwrap_or("");
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0 // utime, stime in clock ticks (USER_HZ = 100)
}

/// Median wall-clock and CPU milliseconds of 5 runs after 2 warm-ups.
fn median_ms(device: &Device, mut run: impl FnMut() -> Result<()>) -> Result<(f64, f64)> {
    for _ in 0..2 {
        run()?;
        device.sync()?;
    }
    let (mut wall, mut cpu) = (Vec::new(), Vec::new());
    for _ in 0..5 {
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

/// Forward alone, then forward + backward (dx and dw), for one convolution.
fn time_case(
    device: &Device,
    name: &str,
    x_shape: [usize; 4],
    w_shape: [usize; 4],
    p: Conv2dParams,
) -> Result<()> {
    let mut rng = Rng::new(1);
    let x = Tensor::randn(&x_shape, 1.0, &mut rng, device)?;
    let w = Tensor::randn(&w_shape, 0.1, &mut rng, device)?;
    let forward = median_ms(device, || no_grad(|| conv2d(&x, &w, None, p)).map(|_| ()))?;
    let seed_shape = conv2d(&x, &w, None, p)?.shape().to_vec();
    let seed = Tensor::randn(&seed_shape, 1.0, &mut rng, device)?;
    let (xv, wv) = (x.var(), w.var());
    let both = median_ms(device, || {
        let y = conv2d(&xv, &wv, None, p)?;
        let grads = backward_with(y, seed.clone())?;
        assert!(grads.get(&xv).is_some() && grads.get(&wv).is_some());
        Ok(())
    })?;
    println!(
        "{name:<38} forward {:7.1} ms (cpu {:7.1})   forward+backward {:7.1} ms (cpu {:7.1})",
        forward.0, forward.1, both.0, both.1
    );
    Ok(())
}

fn main() -> Result<()> {
    let device = Device::gpu()?;
    println!("device: {}", device.name());
    let conv3x3 = Conv2dParams {
        padding: (1, 1),
        ..Default::default()
    };
    time_case(
        &device,
        "conv3x3 [8,32,56,56] -> 32",
        [8, 32, 56, 56],
        [32, 32, 3, 3],
        conv3x3,
    )?;
    let depthwise = Conv2dParams {
        padding: (1, 1),
        groups: 96,
        ..Default::default()
    };
    time_case(
        &device,
        "depthwise3x3 [8,96,56,56] groups 96",
        [8, 96, 56, 56],
        [96, 1, 3, 3],
        depthwise,
    )?;
    println!("peer (burn wgpu, llvmpipe, wall): conv3x3 117 / 670 ms, depthwise 27 / 491 ms");
    println!("cpu = process CPU time; on an idle 2-core machine wall is about cpu / 2");
    Ok(())
}
