//! Kernel microbenchmarks; the case names match those of `benches/torch_cpu.py` and
//! `benches/RESULTS.md`.
//! `cargo bench --bench kernels [-- FILTER]`; `ROBUST_DML_DEVICE` picks the adapter.

mod common;

use common::{Bench, Work};
use robust_dml::engine::ops::batchnorm::batch_norm_train;
use robust_dml::engine::ops::channels::{channel_affine, concat_channels, permute_channels};
use robust_dml::engine::ops::conv::{conv2d, Conv2dParams};
use robust_dml::engine::ops::elementwise::relu;
use robust_dml::engine::ops::matmul::{add_row_bias, matmul};
use robust_dml::engine::ops::normalize::l2_normalize;
use robust_dml::engine::ops::pool::{avg_pool2d, global_avg_pool, max_pool2d, Pool2dParams};
use robust_dml::engine::ops::reduce::{logsumexp_dim, mean, sum_dim};
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

    memory_bound_cases(&b, &d);
    model_layer_cases(&b, &d);
}

/// Single convolutions of the whole-model cases, at their shapes (c2f2 at batch 128 and 28x28,
/// MobileNetV2 x0.5 at batch 16 and 64x64), so each can be set beside oneDNN's time for the
/// same layer (`benches/torch_cpu.py 'layer_*'`). Forward, then forward and backward to the
/// input and the weights. Columns: name, input shape, weight shape, stride, padding.
fn model_layer_cases(b: &Bench, d: &Device) {
    type Layer = (&'static str, [usize; 4], [usize; 4], usize, usize);
    let layers: [Layer; 7] = [
        ("c2f2_conv1", [128, 3, 28, 28], [32, 3, 5, 5], 1, 2),
        ("c2f2_conv2", [128, 32, 14, 14], [64, 32, 5, 5], 1, 2),
        ("mbv2_stem", [16, 3, 64, 64], [16, 3, 3, 3], 2, 1),
        ("mbv2_expand", [16, 8, 32, 32], [48, 8, 1, 1], 1, 0),
        ("mbv2_project", [16, 96, 16, 16], [16, 96, 1, 1], 1, 0),
        ("mbv2_dw_s2", [16, 48, 32, 32], [48, 1, 3, 3], 2, 1),
        ("mbv2_dw_s1", [16, 96, 16, 16], [96, 1, 3, 3], 1, 1),
    ];
    for (i, (name, x_shape, w_shape, stride, pad)) in layers.into_iter().enumerate() {
        let x = randn(&x_shape, 20 + i as u64, d);
        let w = Tensor::randn(&w_shape, 0.1, &mut Rng::new(40 + i as u64), d).unwrap();
        let p = Conv2dParams {
            stride: (stride, stride),
            padding: (pad, pad),
            groups: x_shape[1] / w_shape[1],
            ..Default::default()
        };
        let out = |len: usize| (len + 2 * pad - w_shape[2]) / stride + 1;
        let flops = 2.0
            * (x_shape[0] * w_shape[0] * out(x_shape[2]) * out(x_shape[3])) as f64
            * (w_shape[1] * w_shape[2] * w_shape[3]) as f64;
        b.case(&format!("layer_{name}_fwd"), Work::Flops(flops), || {
            conv2d(&x, &w, None, p).map(|_| ())
        });
        let (xv, wv) = (x.var(), w.var());
        b.case(
            &format!("layer_{name}_fwd_bwd"),
            Work::Flops(3.0 * flops),
            || fwd_bwd(|| conv2d(&xv, &wv, None, p)),
        );
    }
}

/// The memory-bound ops besides batch norm (pooling, channel ops, reductions, normalisation,
/// the row bias), forward and backward; bytes are those read and written at least once.
fn memory_bound_cases(b: &Bench, d: &Device) {
    let mb = |elements: f64| Work::Bytes(elements * 4.0);
    let x = randn(&[8, 96, 56, 56], 7, d).var();
    let numel = x.numel() as f64;
    let p = Pool2dParams::square(3, 2, 1);
    // Forward reads x, writes y (a quarter); backward reads dy, writes dx.
    b.case("avg_pool3x3_s2_fwd_bwd", mb(2.5 * numel), || {
        fwd_bwd(|| avg_pool2d(&x, p))
    });
    b.case("mean_all_fwd_bwd", mb(2.0 * numel), || fwd_bwd(|| mean(&x)));
    // c2f2's first activation at the protocol's batch (128 x 32 x 28 x 28): its ReLU and 2x2
    // max pool, forward and backward, are a PGD step's largest ops after the GEMMs.
    let act = randn(&[128, 32, 28, 28], 15, d).var();
    let anumel = act.numel() as f64;
    // Forward reads x, writes y; backward reads x and dy, writes dx.
    b.case("relu_c2f2_fwd_bwd", mb(5.0 * anumel), || {
        fwd_bwd(|| relu(&act))
    });
    // Forward reads x, writes y and the argmax (a quarter each); backward reads both, writes dx.
    b.case("max_pool2x2_c2f2_fwd_bwd", mb(3.0 * anumel), || {
        fwd_bwd(|| max_pool2d(&act, Pool2dParams::square(2, 2, 0)))
    });
    let x7 = randn(&[64, 1280, 7, 7], 8, d).var();
    b.case(
        "global_avg_pool_fwd_bwd",
        mb(2.0 * x7.numel() as f64),
        || fwd_bwd(|| global_avg_pool(&x7)),
    );

    let (l, r) = (
        randn(&[8, 48, 56, 56], 9, d).var(),
        randn(&[8, 48, 56, 56], 10, d).var(),
    );
    b.case("concat_channels_fwd_bwd", mb(4.0 * numel), || {
        fwd_bwd(|| concat_channels(&[&l, &r]))
    });
    let img = randn(&[32, 3, 224, 224], 11, d).var();
    let inumel = img.numel() as f64;
    b.case("channel_affine_fwd_bwd", mb(4.0 * inumel), || {
        fwd_bwd(|| channel_affine(&img, &[4.4, 4.5, 4.6], &[-2.1, -2.0, -1.8]))
    });
    b.case("permute_channels_fwd_bwd", mb(4.0 * inumel), || {
        fwd_bwd(|| permute_channels(&img, &[2, 1, 0]))
    });

    let m = randn(&[1024, 1024], 12, d).var();
    let mnumel = m.numel() as f64;
    b.case("sum_dim0_1024x1024_fwd_bwd", mb(2.0 * mnumel), || {
        fwd_bwd(|| sum_dim(&m, 0))
    });
    b.case("logsumexp_dim1_1024x1024_fwd_bwd", mb(3.0 * mnumel), || {
        fwd_bwd(|| logsumexp_dim(&m, 1))
    });
    let bias = randn(&[1024], 13, d).var();
    b.case("row_bias_1024x1024_fwd_bwd", mb(3.0 * mnumel), || {
        fwd_bwd(|| add_row_bias(&m, &bias))
    });
    let e = randn(&[4096, 512], 14, d).var();
    b.case(
        "l2_normalize_4096x512_fwd_bwd",
        mb(5.0 * e.numel() as f64),
        || fwd_bwd(|| l2_normalize(&e, 1, 1e-12)),
    );
}
