//! Kernel microbenchmarks; the case names match ../shared/peer-bench.md.
//! `cargo bench --bench kernels [-- FILTER]`; `ROBUST_DML_DEVICE` picks the adapter.

mod common;

use common::{Bench, Work};
use robust_dml::engine::ops::batchnorm::batch_norm_train;
use robust_dml::engine::ops::conv::{conv2d, Conv2dParams};
use robust_dml::engine::ops::matmul::matmul;
use robust_dml::engine::tape::backward_with;
use robust_dml::engine::{Device, Result, Rng, Tensor};

fn randn(shape: &[usize], seed: u64, device: &Device) -> Tensor {
    Tensor::randn(shape, 1.0, &mut Rng::new(seed), device).expect("benchmark input")
}

/// Forward then backward with an all-ones seed; gradients for every input given as a var.
fn fwd_bwd(f: impl Fn() -> Result<Tensor>) -> Result<()> {
    let y = f()?;
    let seed = Tensor::full(1.0, y.shape(), &y.device())?;
    backward_with(y, seed).map(|_| ())
}

fn main() {
    let b = Bench::from_env();
    let d = b.device.clone();

    let (a, m) = (randn(&[1024, 1024], 1, &d), randn(&[1024, 1024], 2, &d));
    b.case("matmul_1024", Work::Flops(2.0 * 1024f64.powi(3)), || {
        matmul(&a, &m).map(|_| ())
    });

    let x = randn(&[8, 32, 56, 56], 3, &d);
    let w = Tensor::randn(&[32, 32, 3, 3], 0.1, &mut Rng::new(4), &d).unwrap();
    let p = Conv2dParams {
        padding: (1, 1),
        ..Default::default()
    };
    let conv_flops = 2.0 * 8.0 * 32.0 * 56.0 * 56.0 * 32.0 * 9.0;
    b.case("conv3x3_fwd", Work::Flops(conv_flops), || {
        conv2d(&x, &w, None, p).map(|_| ())
    });
    let (xv, wv) = (x.var(), w.var());
    b.case("conv3x3_fwd_bwd", Work::Flops(3.0 * conv_flops), || {
        fwd_bwd(|| conv2d(&xv, &wv, None, p))
    });

    let x = randn(&[8, 96, 56, 56], 5, &d);
    let w = Tensor::randn(&[96, 1, 3, 3], 0.3, &mut Rng::new(6), &d).unwrap();
    let p = Conv2dParams {
        padding: (1, 1),
        groups: 96,
        ..Default::default()
    };
    let dw_flops = 2.0 * 8.0 * 96.0 * 56.0 * 56.0 * 9.0;
    b.case("depthwise3x3_fwd", Work::Flops(dw_flops), || {
        conv2d(&x, &w, None, p).map(|_| ())
    });
    let (xv, wv) = (x.var(), w.var());
    b.case("depthwise3x3_fwd_bwd", Work::Flops(3.0 * dw_flops), || {
        fwd_bwd(|| conv2d(&xv, &wv, None, p))
    });

    let gamma = Tensor::full(1.0, &[96], &d).unwrap().var();
    let beta = Tensor::zeros(&[96], &d).unwrap().var();
    let (rm, rv) = (
        Tensor::zeros(&[96], &d).unwrap(),
        Tensor::full(1.0, &[96], &d).unwrap(),
    );
    // Forward reads x twice and writes y; backward reads x and g twice and writes dx.
    let bn_bytes = 8.0 * 96.0 * 56.0 * 56.0 * 4.0 * 8.0;
    b.case("batchnorm_train_fwd_bwd", Work::Bytes(bn_bytes), || {
        fwd_bwd(|| batch_norm_train(&xv, &gamma, &beta, &rm, &rv, 0.1, 1e-5))
    });
}
