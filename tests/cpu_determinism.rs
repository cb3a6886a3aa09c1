//! The fast CPU kernels give the same bits on every run and for any thread count: every sum has
//! a fixed order. A cross-cutting check (a mix of op families in one fingerprint, under thread
//! pools of several sizes); each family's fast kernels are checked against the reference loops
//! in the family's own file (`ops_*.rs`, `optim.rs`).

mod common;

use common::cpu_reference::forward_backward;
use robust_dml::engine::ops::batchnorm::batch_norm_train;
use robust_dml::engine::ops::conv::{conv2d, Conv2dParams};
use robust_dml::engine::ops::elementwise as ew;
use robust_dml::engine::ops::matmul::matmul_t;
use robust_dml::engine::ops::normalize::l2_normalize;
use robust_dml::engine::ops::pool::{avg_pool2d, global_avg_pool, Pool2dParams};
use robust_dml::engine::ops::reduce::{logsumexp_dim, sum, sum_dim};
use robust_dml::engine::testing::{randn, uniform};

/// Outputs and gradients of a mix of fast kernels (GEMM, convolution on both routes, batch norm, pooling,
/// reductions, normalisation) on one input.
fn fingerprint() -> Vec<Vec<f32>> {
    let x = randn(&[6, 5, 17, 13], 1);
    let w = randn(&[7, 5, 3, 3], 2);
    let gamma = uniform(&[7], 0.5, 1.5, 3);
    let beta = randn(&[7], 4);
    let (rm, rv) = (randn(&[7], 5), uniform(&[7], 0.5, 2.0, 6));
    let p = Conv2dParams {
        padding: (1, 1),
        ..Default::default()
    };
    let pool_3x3_stride_2 = Pool2dParams {
        kernel: (3, 3),
        stride: (2, 2),
        padding: (1, 1),
        ceil_mode: true,
        count_include_pad: false,
    };
    // A strided convolution onto 5x4 planes: the blocks-of-images route of the fast conv.
    let w_small_planes = randn(&[4, 7, 3, 3], 7);
    let p_small_planes = Conv2dParams {
        stride: (2, 2),
        padding: (1, 1),
        ..Default::default()
    };
    let inputs = [&x, &w, &gamma, &beta, &w_small_planes];
    let (out, grads) = forward_backward(&inputs, &[1.0], |t| {
        let y = conv2d(&t[0], &t[1], None, p)?;
        let y = batch_norm_train(&y, &t[2], &t[3], &rm, &rv, 0.1, 1e-5)?;
        let y = avg_pool2d(&ew::relu(&y)?, pool_3x3_stride_2)?;
        let y = conv2d(&y, &t[4], None, p_small_planes)?;
        let e = l2_normalize(&global_avg_pool(&y)?, 1, 1e-12)?;
        let lse = logsumexp_dim(&matmul_t(&e, &e, false, true)?, 1)?;
        sum(&ew::add(&sum_dim(&e, 1)?, &lse)?)
    });
    let mut all = vec![out];
    all.extend(grads);
    all
}

/// The same bits on every run, and with 1, 2 or 3 threads: every sum has a fixed order.
#[test]
fn fast_kernels_are_deterministic_for_any_thread_count() {
    let first = fingerprint();
    let same_bits = |a: &[Vec<f32>], b: &[Vec<f32>]| {
        a.iter().zip(b).all(|(a, b)| {
            a.iter()
                .map(|v| v.to_bits())
                .eq(b.iter().map(|v| v.to_bits()))
        })
    };
    assert!(same_bits(&first, &fingerprint()), "two runs differ");
    for threads in [1, 2, 3] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let run = pool.install(fingerprint);
        assert!(
            same_bits(&first, &run),
            "{threads} threads differ from the default pool"
        );
    }
}
