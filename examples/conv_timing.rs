//! Times the GPU convolutions on the shapes of the published peer numbers (burn's wgpu backend
//! on llvmpipe): `cargo run --release --example conv_timing`. Each case: 2 warm-ups, then the
//! median of 5 runs, each ended by `device.sync()`.

use std::time::Instant;

use robust_dml::engine::ops::conv::{conv2d, Conv2dParams};
use robust_dml::engine::tape::backward_with;
use robust_dml::engine::{no_grad, Device, Result, Rng, Tensor};

fn median_ms(device: &Device, mut run: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..2 {
        run()?;
        device.sync()?;
    }
    let mut times = Vec::new();
    for _ in 0..5 {
        let t0 = Instant::now();
        run()?;
        device.sync()?;
        times.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(|a, b| a.total_cmp(b));
    Ok(times[2])
}

/// Forward alone, then forward + backward (dx and dw), for one convolution.
fn time_case(device: &Device, name: &str, x_shape: [usize; 4], w_shape: [usize; 4], p: Conv2dParams) -> Result<()> {
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
    println!("{name:<40} forward {forward:8.1} ms   forward+backward {both:8.1} ms");
    Ok(())
}

fn main() -> Result<()> {
    let device = Device::gpu()?;
    println!("device: {}", device.name());
    let conv3x3 = Conv2dParams { padding: (1, 1), ..Default::default() };
    time_case(&device, "conv3x3 [8,32,56,56] -> 32", [8, 32, 56, 56], [32, 32, 3, 3], conv3x3)?;
    let depthwise = Conv2dParams { padding: (1, 1), groups: 96, ..Default::default() };
    time_case(&device, "depthwise3x3 [8,96,56,56] groups 96", [8, 96, 56, 56], [96, 1, 3, 3], depthwise)?;
    println!("peer (burn wgpu, llvmpipe): conv3x3 117 / 670 ms, depthwise 27 / 491 ms");
    Ok(())
}
