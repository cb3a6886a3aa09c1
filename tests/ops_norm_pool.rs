//! Batch norm and pooling: GPU against CPU (batch norm for the kernels of both targets), central-difference gradients, and hand-computed
//! values from PyTorch's semantics (output sizes, divisors, running statistics), and the split over
//! the batch of tensors larger than one storage binding (batch norm with whole-batch statistics),
//! and the fast CPU kernels against the reference loops.

mod common;

use common::binding_cap::{capped, over_cap, CAP, X};
use common::cpu_reference::{close, dy, forward_backward, values};
use robust_dml::engine::ops::batchnorm::{batch_norm_eval, batch_norm_train};
use robust_dml::engine::ops::pool::{
    avg_pool2d, global_avg_pool, global_max_pool, max_pool2d, pool_output_size, Pool2dParams,
};
use robust_dml::engine::policy::KernelTarget;
use robust_dml::engine::reference as r;
use robust_dml::engine::tape::backward_with;
use robust_dml::engine::testing::{
    assert_close, assert_grad, assert_parity, gpu_or_skip, randn, uniform, GradCheck,
};
use robust_dml::engine::{Device, Tensor};

const SHAPE: [usize; 4] = [2, 3, 7, 5];
const EPS: f32 = 1e-5;

fn params(k: usize, s: usize, pad: usize, ceil: bool, include_pad: bool) -> Pool2dParams {
    Pool2dParams {
        kernel: (k, k),
        stride: (s, s),
        padding: (pad, pad),
        ceil_mode: ceil,
        count_include_pad: include_pad,
    }
}

/// The pooling configurations under test (name, params).
fn pool_cases() -> Vec<(&'static str, Pool2dParams)> {
    vec![
        ("3x3 s2 ceil", params(3, 2, 0, true, true)),
        ("3x3 s1 pad1 include_pad", params(3, 1, 1, false, true)),
        ("3x3 s1 pad1 exclude_pad", params(3, 1, 1, false, false)),
        ("2x2 s2", params(2, 2, 0, false, true)),
        ("3x3 s2 pad1 ceil", params(3, 2, 1, true, true)),
        ("3x3 s2 pad1 ceil exclude_pad", params(3, 2, 1, true, false)),
    ]
}

/// Distinct values (a shuffled ramp) so that max pool has no ties and gradients are exact.
fn distinct(shape: &[usize], seed: u64) -> Tensor {
    let r = randn(shape, seed).to_vec().unwrap();
    let mut order: Vec<usize> = (0..r.len()).collect();
    order.sort_by(|&a, &b| r[a].total_cmp(&r[b]));
    let mut v = vec![0.0; r.len()];
    for (rank, &i) in order.iter().enumerate() {
        v[i] = rank as f32 * 0.1 - 3.0;
    }
    Tensor::from_cpu(v, shape).unwrap()
}

fn ramp(shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    Tensor::from_cpu((0..n).map(|i| i as f32).collect(), shape).unwrap()
}

fn devices(test: &str) -> Vec<Device> {
    let mut d = vec![Device::Cpu];
    d.extend(gpu_or_skip(test));
    d
}

// ------------------------------------------------------------------ pooling: hand-computed

#[test]
fn pool_output_sizes_follow_pytorch() {
    assert_eq!(pool_output_size(7, 3, 2, 0, true), Some(3));
    assert_eq!(pool_output_size(5, 3, 2, 0, true), Some(2));
    assert_eq!(pool_output_size(112, 3, 2, 0, true), Some(56));
    assert_eq!(pool_output_size(112, 3, 2, 0, false), Some(55));
    assert_eq!(pool_output_size(56, 3, 2, 0, true), Some(28));
    assert_eq!(pool_output_size(6, 3, 2, 0, true), Some(3));
    assert_eq!(pool_output_size(6, 3, 2, 0, false), Some(2));
    // The last window would start in the right padding only: dropped.
    assert_eq!(pool_output_size(5, 2, 2, 1, true), Some(3));
    assert_eq!(pool_output_size(5, 2, 2, 1, false), Some(3));
    assert_eq!(pool_output_size(2, 3, 1, 0, false), None);
}

#[test]
fn pool_rejects_bad_arguments() {
    let x = randn(&SHAPE, 1);
    assert!(
        max_pool2d(&x, params(3, 2, 2, false, true)).is_err(),
        "pad > k/2"
    );
    assert!(
        avg_pool2d(&x, params(9, 1, 0, false, true)).is_err(),
        "window larger than input"
    );
    assert!(
        max_pool2d(&x, params(2, 0, 0, false, true)).is_err(),
        "zero stride"
    );
    assert!(global_avg_pool(&randn(&[2, 3], 1)).is_err(), "not 4-D");
}

#[test]
fn avg_pool_divisors_at_corners() {
    for dev in devices("avg_pool_divisors_at_corners") {
        let ones = Tensor::full(1.0, &[1, 1, 7, 5], &dev).unwrap();
        let inc = avg_pool2d(&ones, params(3, 1, 1, false, true)).unwrap();
        assert_eq!(inc.shape(), &[1, 1, 7, 5]);
        let v = inc.to_vec().unwrap();
        assert_close("include_pad corner", &v[..1], &[4.0 / 9.0], 1e-6, 0.0);
        assert_close("include_pad edge", &v[1..2], &[6.0 / 9.0], 1e-6, 0.0);
        assert_close("include_pad interior", &v[6..7], &[1.0], 1e-6, 0.0);
        let exc = avg_pool2d(&ones, params(3, 1, 1, false, false)).unwrap();
        assert_close(
            "exclude_pad everywhere",
            &exc.to_vec().unwrap(),
            &[1.0; 35],
            1e-6,
            0.0,
        );

        // Ceil mode, 6x6 ramp, k3 s2: the last window is clipped to the input, so even with
        // count_include_pad its divisor is 2*2 = 4.
        let x = ramp(&[1, 1, 6, 6]).to_device(&dev).unwrap();
        let y = avg_pool2d(&x, params(3, 2, 0, true, true)).unwrap();
        assert_eq!(y.shape(), &[1, 1, 3, 3]);
        assert_close(
            "ceil corner",
            &y.to_vec().unwrap()[8..],
            &[(28.0 + 29.0 + 34.0 + 35.0) / 4.0],
            1e-5,
            0.0,
        );
        // With padding 1: 4x4 outputs; the last window starts at 5 and ends at the padded
        // edge 7, so its include_pad divisor is 2*2 = 4 over the single value 35.
        let y = avg_pool2d(&x, params(3, 2, 1, true, true)).unwrap();
        assert_eq!(y.shape(), &[1, 1, 4, 4]);
        let v = y.to_vec().unwrap();
        assert_close(
            "padded ceil corner, include_pad",
            &v[15..],
            &[35.0 / 4.0],
            1e-5,
            0.0,
        );
        assert_close(
            "padded first corner, include_pad",
            &v[..1],
            &[(0.0 + 1.0 + 6.0 + 7.0) / 9.0],
            1e-5,
            0.0,
        );
        let y = avg_pool2d(&x, params(3, 2, 1, true, false)).unwrap();
        let v = y.to_vec().unwrap();
        assert_close(
            "padded ceil corner, exclude_pad",
            &v[15..],
            &[35.0],
            1e-5,
            0.0,
        );
        assert_close(
            "padded first corner, exclude_pad",
            &v[..1],
            &[3.5],
            1e-5,
            0.0,
        );
    }
}

#[test]
fn max_pool_values_and_routing() {
    for dev in devices("max_pool_values_and_routing") {
        let x = ramp(&[1, 1, 4, 4]).to_device(&dev).unwrap().var();
        let y = max_pool2d(&x, params(2, 2, 0, false, true)).unwrap();
        assert_eq!(y.to_vec().unwrap(), vec![5.0, 7.0, 13.0, 15.0]);
        let seed = Tensor::from_vec(vec![1.0, 2.0, 3.0, 4.0], &[1, 1, 2, 2], &dev).unwrap();
        let g = backward_with(y, seed).unwrap();
        let mut want = vec![0.0; 16];
        (want[5], want[7], want[13], want[15]) = (1.0, 2.0, 3.0, 4.0);
        assert_eq!(g.get(&x).unwrap().to_vec().unwrap(), want);

        // 7x5 ceil mode: 3x2 outputs; the last column's window is clipped to x = 4.
        let x = ramp(&[1, 1, 7, 5]).to_device(&dev).unwrap();
        let y = max_pool2d(&x, params(3, 2, 0, true, true)).unwrap();
        assert_eq!(y.shape(), &[1, 1, 3, 2]);
        assert_eq!(
            y.to_vec().unwrap(),
            vec![12.0, 14.0, 22.0, 24.0, 32.0, 34.0]
        );

        // Ties: the first maximum (raster order) gets the gradient; overlapping windows add up.
        let x = Tensor::from_vec(vec![1.0; 9], &[1, 1, 3, 3], &dev)
            .unwrap()
            .var();
        let y = max_pool2d(&x, params(2, 1, 0, false, true)).unwrap();
        let seed = Tensor::from_vec(vec![1.0, 2.0, 3.0, 4.0], &[1, 1, 2, 2], &dev).unwrap();
        let g = backward_with(y, seed).unwrap();
        assert_eq!(
            g.get(&x).unwrap().to_vec().unwrap(),
            vec![1.0, 2.0, 0.0, 3.0, 4.0, 0.0, 0.0, 0.0, 0.0]
        );
    }
}

#[test]
fn global_pools_values() {
    for dev in devices("global_pools_values") {
        let x = Tensor::from_vec(
            vec![1.0, 5.0, 2.0, 5.0, -1.0, -3.0, -2.0, -4.0],
            &[1, 2, 2, 2],
            &dev,
        )
        .unwrap()
        .var();
        let avg = global_avg_pool(&x).unwrap();
        assert_eq!(avg.shape(), &[1, 2]);
        assert_close("gap", &avg.to_vec().unwrap(), &[3.25, -2.5], 1e-6, 0.0);
        let max = global_max_pool(&x).unwrap();
        assert_eq!(max.to_vec().unwrap(), vec![5.0, -1.0]);
        let seed = Tensor::from_vec(vec![2.0, 3.0], &[1, 2], &dev).unwrap();
        let g = backward_with(max, seed).unwrap();
        // First maximum of the tied 5s.
        assert_eq!(
            g.get(&x).unwrap().to_vec().unwrap(),
            vec![0.0, 2.0, 0.0, 0.0, 3.0, 0.0, 0.0, 0.0]
        );
    }
}

// ------------------------------------------------------------------ pooling: gradients, parity

#[test]
fn pool_gradients() {
    let x = distinct(&SHAPE, 3);
    let o = GradCheck {
        max_probes: 210,
        ..GradCheck::default()
    };
    for (name, p) in pool_cases() {
        assert_grad(
            &format!("max_pool2d {name}"),
            |t| max_pool2d(&t[0], p),
            std::slice::from_ref(&x),
            o,
        );
        assert_grad(
            &format!("avg_pool2d {name}"),
            |t| avg_pool2d(&t[0], p),
            std::slice::from_ref(&x),
            o,
        );
    }
    assert_grad(
        "global_avg_pool",
        |t| global_avg_pool(&t[0]),
        std::slice::from_ref(&x),
        o,
    );
    assert_grad("global_max_pool", |t| global_max_pool(&t[0]), &[x], o);
}

#[test]
fn pool_gpu_matches_cpu() {
    let Some(gpu) = gpu_or_skip("pool_gpu_matches_cpu") else {
        return;
    };
    let x = randn(&SHAPE, 4);
    // Rounded values make ties, which both devices must break the same way.
    let tied = Tensor::from_cpu(
        x.to_vec()
            .unwrap()
            .iter()
            .map(|v| (v * 2.0).round())
            .collect(),
        &SHAPE,
    )
    .unwrap();
    let tol = (1e-5, 1e-5);
    for (name, p) in pool_cases() {
        for (what, input) in [("random", &x), ("tied", &tied)] {
            let label = format!("max_pool2d {name} {what}");
            assert_parity(
                &label,
                &gpu,
                |t| max_pool2d(&t[0], p),
                std::slice::from_ref(input),
                tol.0,
                tol.1,
            );
            let label = format!("avg_pool2d {name} {what}");
            assert_parity(
                &label,
                &gpu,
                |t| avg_pool2d(&t[0], p),
                std::slice::from_ref(input),
                tol.0,
                tol.1,
            );
        }
    }
    let big = randn(&[2, 3, 17, 19], 5);
    for input in [&x, &tied, &big] {
        assert_parity(
            "global_avg_pool",
            &gpu,
            |t| global_avg_pool(&t[0]),
            std::slice::from_ref(input),
            tol.0,
            tol.1,
        );
        assert_parity(
            "global_max_pool",
            &gpu,
            |t| global_max_pool(&t[0]),
            std::slice::from_ref(input),
            tol.0,
            tol.1,
        );
    }
}

// ------------------------------------------------------------------ batch norm

/// Running statistics for `c` channels on `dev`: mean 0, variance 1 (PyTorch's init).
fn fresh_running(c: usize, dev: &Device) -> (Tensor, Tensor) {
    (
        Tensor::zeros(&[c], dev).unwrap(),
        Tensor::full(1.0, &[c], dev).unwrap(),
    )
}

#[test]
fn batch_norm_train_hand_computed() {
    for dev in devices("batch_norm_train_hand_computed") {
        // One channel holding 1, 2, 3, 6: mean 3, biased variance 3.5, unbiased 14/3.
        let x = Tensor::from_vec(vec![1.0, 2.0, 3.0, 6.0], &[2, 1, 1, 2], &dev)
            .unwrap()
            .var();
        let gamma = Tensor::full(2.0, &[1], &dev).unwrap().var();
        let beta = Tensor::full(0.5, &[1], &dev).unwrap().var();
        let (rm, rv) = fresh_running(1, &dev);
        let y = batch_norm_train(&x, &gamma, &beta, &rm, &rv, 0.1, EPS).unwrap();
        let s = (3.5f32 + EPS).sqrt();
        let want: Vec<f32> = [1.0f32, 2.0, 3.0, 6.0]
            .iter()
            .map(|v| 2.0 * (v - 3.0) / s + 0.5)
            .collect();
        assert_close("train forward", &y.to_vec().unwrap(), &want, 1e-5, 1e-5);
        assert_close("running mean", &rm.to_vec().unwrap(), &[0.3], 1e-6, 1e-6);
        assert_close(
            "running var",
            &rv.to_vec().unwrap(),
            &[0.9 + 0.1 * 14.0 / 3.0],
            1e-6,
            1e-6,
        );

        // dbeta = sum g, dgamma = sum g * xhat; backward must not touch the running stats.
        let seed = Tensor::from_vec(vec![1.0, -1.0, 2.0, 0.5], &[2, 1, 1, 2], &dev).unwrap();
        let grads = backward_with(y, seed).unwrap();
        let xhat: Vec<f32> = [1.0f32, 2.0, 3.0, 6.0]
            .iter()
            .map(|v| (v - 3.0) / s)
            .collect();
        let dgamma = 1.0 * xhat[0] - xhat[1] + 2.0 * xhat[2] + 0.5 * xhat[3];
        assert_close(
            "dbeta",
            &grads.get(&beta).unwrap().to_vec().unwrap(),
            &[2.5],
            1e-5,
            1e-5,
        );
        assert_close(
            "dgamma",
            &grads.get(&gamma).unwrap().to_vec().unwrap(),
            &[dgamma],
            1e-5,
            1e-5,
        );
        assert_close(
            "running mean after backward",
            &rm.to_vec().unwrap(),
            &[0.3],
            1e-6,
            1e-6,
        );

        // A second call updates once more.
        batch_norm_train(&x, &gamma, &beta, &rm, &rv, 0.1, EPS).unwrap();
        assert_close(
            "running mean, 2 steps",
            &rm.to_vec().unwrap(),
            &[0.57],
            1e-6,
            1e-6,
        );
        let rv2 = 0.9 * (0.9 + 0.1 * 14.0 / 3.0) + 0.1 * 14.0 / 3.0;
        assert_close(
            "running var, 2 steps",
            &rv.to_vec().unwrap(),
            &[rv2],
            1e-6,
            1e-6,
        );
    }
}

#[test]
fn batch_norm_eval_uses_running_stats() {
    for dev in devices("batch_norm_eval_uses_running_stats") {
        let xv = vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0];
        let x = Tensor::from_vec(xv.clone(), &[2, 2, 1, 2], &dev)
            .unwrap()
            .var();
        let gamma = Tensor::from_vec(vec![2.0, 1.0], &[2], &dev).unwrap().var();
        let beta = Tensor::from_vec(vec![0.5, 0.0], &[2], &dev).unwrap().var();
        let rm = Tensor::from_vec(vec![1.0, -2.0], &[2], &dev).unwrap();
        let rv = Tensor::from_vec(vec![4.0, 0.25], &[2], &dev).unwrap();
        let y = batch_norm_eval(&x, &gamma, &beta, &rm, &rv, EPS).unwrap();
        let (s0, s1) = (1.0 / (4.0f32 + EPS).sqrt(), 1.0 / (0.25f32 + EPS).sqrt());
        let chan = |i: usize| (i / 2) % 2;
        let want: Vec<f32> = xv
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                if chan(i) == 0 {
                    2.0 * (v - 1.0) * s0 + 0.5
                } else {
                    (v + 2.0) * s1
                }
            })
            .collect();
        assert_close("eval forward", &y.to_vec().unwrap(), &want, 1e-5, 1e-5);
        assert_eq!(
            rm.to_vec().unwrap(),
            vec![1.0, -2.0],
            "eval must not update running mean"
        );
        assert_eq!(
            rv.to_vec().unwrap(),
            vec![4.0, 0.25],
            "eval must not update running var"
        );

        let seed = Tensor::full(1.0, &[2, 2, 1, 2], &dev).unwrap();
        let grads = backward_with(y, seed).unwrap();
        let want_dx: Vec<f32> = (0..8)
            .map(|i| if chan(i) == 0 { 2.0 * s0 } else { s1 })
            .collect();
        assert_close(
            "eval dx",
            &grads.get(&x).unwrap().to_vec().unwrap(),
            &want_dx,
            1e-5,
            1e-5,
        );
        assert_close(
            "eval dbeta",
            &grads.get(&beta).unwrap().to_vec().unwrap(),
            &[4.0, 4.0],
            1e-5,
            1e-5,
        );
        let dgamma0 = [1.0f32, 2.0, 5.0, 6.0]
            .iter()
            .map(|v| (v - 1.0) * s0)
            .sum::<f32>();
        let dgamma1 = [3.0f32, 4.0, 7.0, 8.0]
            .iter()
            .map(|v| (v + 2.0) * s1)
            .sum::<f32>();
        assert_close(
            "eval dgamma",
            &grads.get(&gamma).unwrap().to_vec().unwrap(),
            &[dgamma0, dgamma1],
            1e-4,
            1e-5,
        );
    }
}

#[test]
fn batch_norm_rejects_bad_shapes() {
    let x = randn(&SHAPE, 1);
    let (g, b) = (
        Tensor::full(1.0, &[3], &Device::Cpu).unwrap(),
        Tensor::zeros(&[3], &Device::Cpu).unwrap(),
    );
    let (rm, rv) = fresh_running(3, &Device::Cpu);
    let wrong = Tensor::zeros(&[4], &Device::Cpu).unwrap();
    assert!(batch_norm_train(&x, &wrong, &b, &rm, &rv, 0.1, EPS).is_err());
    assert!(batch_norm_eval(&x, &g, &b, &rm, &wrong, EPS).is_err());
    assert!(
        batch_norm_train(&randn(&[1, 3, 1, 1], 2), &g, &b, &rm, &rv, 0.1, EPS).is_err(),
        "one value per channel"
    );
    assert!(
        batch_norm_train(&randn(&[6, 3], 2), &g, &b, &rm, &rv, 0.1, EPS).is_err(),
        "not 4-D"
    );
}

/// x with a per-channel offset and scale, gamma and beta for `c` channels.
fn bn_inputs(shape: &[usize], seed: u64) -> Vec<Tensor> {
    let c = shape[1];
    let x = randn(shape, seed).to_vec().unwrap();
    let hw = shape[2] * shape[3];
    let x: Vec<f32> = x
        .iter()
        .enumerate()
        .map(|(i, v)| v * 1.5 + ((i / hw) % c) as f32 - 1.0)
        .collect();
    vec![
        Tensor::from_cpu(x, shape).unwrap(),
        uniform(&[c], 0.5, 1.5, seed + 1),
        randn(&[c], seed + 2),
    ]
}

fn train_op(t: &[Tensor]) -> robust_dml::engine::Result<Tensor> {
    let (rm, rv) = fresh_running(t[1].numel(), &t[0].device());
    batch_norm_train(&t[0], &t[1], &t[2], &rm, &rv, 0.1, EPS)
}

fn eval_op(t: &[Tensor]) -> robust_dml::engine::Result<Tensor> {
    let c = t[1].numel();
    let dev = t[0].device();
    let rm = Tensor::from_vec((0..c).map(|i| 0.3 * i as f32 - 0.2).collect(), &[c], &dev)?;
    let rv = Tensor::from_vec((0..c).map(|i| 0.5 + 0.4 * i as f32).collect(), &[c], &dev)?;
    batch_norm_eval(&t[0], &t[1], &t[2], &rm, &rv, EPS)
}

#[test]
fn batch_norm_gradients() {
    let inputs = bn_inputs(&SHAPE, 7);
    let o = GradCheck::default();
    assert_grad("batch_norm_train", train_op, &inputs, o);
    assert_grad("batch_norm_eval", eval_op, &inputs, o);
    let tiny = bn_inputs(&[3, 2, 1, 2], 8);
    assert_grad("batch_norm_train 1x2 planes", train_op, &tiny, o);
}

#[test]
fn batch_norm_gpu_matches_cpu() {
    let Some(gpu) = gpu_or_skip("batch_norm_gpu_matches_cpu") else {
        return;
    };
    // 7x5 planes (several planes per workgroup pass), 17x19 (planes wider than a workgroup),
    // 1x3 (many planes per pass, fewer than the batch).
    // Serial reductions (<= 2,048 values a channel) and workgroup ones; affine passes with one
    // plane per invocation (<= 64 pixels), several planes per workgroup, one plane per pass.
    for shape in [
        [2, 3, 7, 5],
        [2, 3, 17, 19],
        [90, 2, 1, 3],
        [3, 3, 33, 25],
        [40, 2, 9, 10],
    ] {
        let inputs = bn_inputs(&shape, 11);
        assert_parity(
            &format!("batch_norm_train {shape:?}"),
            &gpu,
            train_op,
            &inputs,
            2e-5,
            2e-4,
        );
        assert_parity(
            &format!("batch_norm_eval {shape:?}"),
            &gpu,
            eval_op,
            &inputs,
            2e-5,
            2e-4,
        );
    }
}

#[test]
fn batch_norm_running_stats_match_and_are_stable() {
    let Some(gpu) = gpu_or_skip("batch_norm_running_stats_match_and_are_stable") else {
        return;
    };
    // Serial and workgroup reductions.
    for shape in [[4, 3, 9, 11], [30, 3, 9, 11]] {
        running_stats_case(&gpu, shape);
    }
}

fn running_stats_case(gpu: &Device, shape: [usize; 4]) {
    // A large common offset: E[x^2] - E[x]^2 in f32 would lose the variance entirely.
    let x: Vec<f32> = randn(&shape, 21)
        .to_vec()
        .unwrap()
        .iter()
        .map(|v| 1000.0 + 0.5 * v)
        .collect();
    let mut stats = Vec::new();
    for dev in [Device::Cpu, gpu.clone()] {
        let xt = Tensor::from_vec(x.clone(), &shape, &dev).unwrap();
        let g = Tensor::full(1.0, &[3], &dev).unwrap();
        let b = Tensor::zeros(&[3], &dev).unwrap();
        let (rm, rv) = fresh_running(3, &dev);
        batch_norm_train(&xt, &g, &b, &rm, &rv, 0.5, EPS).unwrap();
        stats.push((rm.to_vec().unwrap(), rv.to_vec().unwrap()));
    }
    // The CPU accumulates in f64: its unbiased variance is the reference.
    let (cpu, gpu_stats) = (&stats[0], &stats[1]);
    assert_close("running mean gpu vs cpu", &gpu_stats.0, &cpu.0, 1e-3, 1e-6);
    assert_close("running var gpu vs cpu", &gpu_stats.1, &cpu.1, 1e-4, 1e-3);
    for v in &cpu.1 {
        assert!(
            (v - (0.5 + 0.5 * 0.25)).abs() < 0.06,
            "variance near 0.25: running var {v}"
        );
    }
}

#[test]
fn batch_norm_partial_gradients() {
    // Frozen affine parameters (attacks): only x requires a gradient; and the converse.
    for dev in devices("batch_norm_partial_gradients") {
        let inputs: Vec<Tensor> = bn_inputs(&SHAPE, 31)
            .iter()
            .map(|t| t.to_device(&dev).unwrap())
            .collect();
        let seed = randn(&SHAPE, 32).to_device(&dev).unwrap();
        for op in [train_op, eval_op] {
            let all: Vec<Tensor> = inputs.iter().map(|t| t.var()).collect();
            let full = backward_with(op(&all).unwrap(), seed.clone()).unwrap();
            let x_only = [inputs[0].var(), inputs[1].clone(), inputs[2].clone()];
            let gx = backward_with(op(&x_only).unwrap(), seed.clone()).unwrap();
            assert_close(
                "dx with frozen affine",
                &gx.get(&x_only[0]).unwrap().to_vec().unwrap(),
                &full.get(&all[0]).unwrap().to_vec().unwrap(),
                1e-5,
                1e-4,
            );
            let affine_only = [inputs[0].clone(), inputs[1].var(), inputs[2].clone()];
            let ga = backward_with(op(&affine_only).unwrap(), seed.clone()).unwrap();
            assert_close(
                "dgamma with constant x",
                &ga.get(&affine_only[1]).unwrap().to_vec().unwrap(),
                &full.get(&all[1]).unwrap().to_vec().unwrap(),
                1e-5,
                1e-4,
            );
        }
    }
}

/// Batch norm's affine pass for both targets: one invocation per plane (CPU adapters, and small
/// planes everywhere) and wide workgroups (GPUs, planes over 64 pixels).
#[test]
fn batch_norm_kernels_of_both_targets_match_cpu() {
    let Some(gpu) = gpu_or_skip("batch_norm_kernels_of_both_targets_match_cpu") else {
        return;
    };
    let default = gpu.policy().expect("a GPU device has a policy");
    for target in [KernelTarget::CpuAdapter, KernelTarget::Gpu] {
        batch_norm_cases(&gpu.with_policy(default.with_target(target)), target);
    }
}

fn batch_norm_cases(gpu: &Device, target: KernelTarget) {
    // Planes of 65-255 pixels (several per workgroup) and over 256 (one per pass), with
    // reductions over 2,048 values a channel (one workgroup per channel) and under.
    for shape in [[30, 3, 9, 10], [3, 2, 17, 19], [2, 3, 9, 10]] {
        let c = shape[1];
        let x = randn(&shape, 1);
        let inputs = [x, uniform(&[c], 0.5, 1.5, 2), randn(&[c], 3)];
        let running = |d: &Device| -> (Tensor, Tensor) {
            (
                randn(&[c], 4).to_device(d).unwrap(),
                uniform(&[c], 0.5, 2.0, 5).to_device(d).unwrap(),
            )
        };
        let (cpu, dev) = (running(&Device::Cpu), running(gpu));
        let pick = |t: &[Tensor]| {
            if t[0].is_gpu() {
                dev.clone()
            } else {
                cpu.clone()
            }
        };
        assert_parity(
            &format!("batch_norm_train {shape:?} for {target:?}"),
            gpu,
            |t| {
                let (rm, rv) = pick(t);
                batch_norm_train(&t[0], &t[1], &t[2], &rm, &rv, 0.1, 1e-5)
            },
            &inputs,
            1e-3,
            1e-3,
        );
        assert_parity(
            &format!("batch_norm_eval {shape:?} for {target:?}"),
            gpu,
            |t| {
                let (rm, rv) = pick(t);
                batch_norm_eval(&t[0], &t[1], &t[2], &rm, &rv, 1e-5)
            },
            &inputs,
            1e-3,
            1e-3,
        );
    }
}

// ------------------------------------------------------------------ over the binding cap

#[test]
fn batch_norm_splits_with_whole_batch_statistics() {
    let Some(dev) = capped("batch_norm_splits_with_whole_batch_statistics", CAP) else {
        return;
    };
    // Chunk reductions by one invocation per channel and by one workgroup per channel; planes of
    // one invocation each, and over a workgroup.
    for shape in [X, [10, 3, 17, 16], [12, 1, 60, 60]] {
        batch_norm_split_case(&dev, shape);
    }
}

fn batch_norm_split_case(dev: &Device, shape: [usize; 4]) {
    let dev = dev.clone();
    let c = shape[1];
    // An offset far from zero: the chunks' statistics must be merged stably.
    let x = randn(&shape, 7).to_vec().unwrap();
    let x = Tensor::from_cpu(x.iter().map(|v| 3.0 * v + 40.0).collect(), &shape).unwrap();
    over_cap(&dev, &x.to_device(&dev).unwrap());
    let (gamma, beta) = (uniform(&[c], 0.5, 1.5, 8), randn(&[c], 9));
    let running = |dev: &Device| {
        (
            randn(&[c], 10).to_device(dev).unwrap(),
            uniform(&[c], 0.5, 2.0, 11).to_device(dev).unwrap(),
        )
    };
    let (cpu_rm, cpu_rv) = running(&Device::Cpu);
    let (gpu_rm, gpu_rv) = running(&dev);
    let inputs = [x.clone(), gamma.clone(), beta.clone()];
    let stats = |t: &[Tensor]| -> (Tensor, Tensor) {
        if t[0].is_gpu() {
            (gpu_rm.clone(), gpu_rv.clone())
        } else {
            (cpu_rm.clone(), cpu_rv.clone())
        }
    };
    assert_parity(
        "batch_norm_train",
        &dev,
        |t| {
            let (rm, rv) = stats(t);
            batch_norm_train(&t[0], &t[1], &t[2], &rm, &rv, 0.1, 1e-5)
        },
        &inputs,
        2e-3,
        2e-3,
    );
    let (a, b) = (gpu_rm.to_vec().unwrap(), cpu_rm.to_vec().unwrap());
    assert_close("running mean after a split batch", &a, &b, 1e-4, 1e-5);
    let (a, b) = (gpu_rv.to_vec().unwrap(), cpu_rv.to_vec().unwrap());
    assert_close("running var after a split batch", &a, &b, 1e-3, 1e-4);
    assert_parity(
        "batch_norm_eval",
        &dev,
        |t| {
            let (rm, rv) = stats(t);
            batch_norm_eval(&t[0], &t[1], &t[2], &rm, &rv, 1e-5)
        },
        &inputs,
        1e-3,
        1e-3,
    );
}

/// Pooling runs per sample on views of batch chunks.
#[test]
fn pooling_splits_over_the_batch() {
    let Some(dev) = capped("pooling_splits_over_the_batch", CAP) else {
        return;
    };
    let x = randn(&X, 12);
    over_cap(&dev, &x.to_device(&dev).unwrap());
    let pool = params(3, 2, 1, true, false);
    let one = [x];
    assert_parity(
        "max_pool2d",
        &dev,
        |t| max_pool2d(&t[0], pool),
        &one,
        1e-5,
        1e-5,
    );
    assert_parity(
        "avg_pool2d",
        &dev,
        |t| avg_pool2d(&t[0], pool),
        &one,
        1e-5,
        1e-5,
    );
    assert_parity(
        "global_max_pool",
        &dev,
        |t| global_max_pool(&t[0]),
        &one,
        1e-5,
        1e-5,
    );
}

// ------------------------------------------------------------------ the fast CPU kernels against the reference loops

/// Large planes (one task each), small planes (many to a task, several tasks) and odd sizes.
const POOL_SHAPES: [[usize; 4]; 3] = [[2, 3, 13, 11], [2, 300, 9, 7], [5, 3, 4, 4]];

fn pool_params() -> Vec<Pool2dParams> {
    vec![
        params(3, 2, 0, true, true),
        params(3, 1, 1, false, true),
        params(3, 1, 1, false, false),
        params(2, 2, 0, false, true),
        // 2x2 windows hanging over odd edges in ceil mode: the general path, not the 2x2 one.
        params(2, 2, 0, true, true),
        params(3, 2, 1, true, true),
        params(3, 2, 1, true, false),
        Pool2dParams {
            kernel: (3, 2),
            stride: (2, 1),
            padding: (1, 0),
            ceil_mode: true,
            count_include_pad: false,
        },
    ]
}

#[test]
fn pooling_matches_reference() {
    let mut seed = 0;
    for shape in POOL_SHAPES {
        for p in pool_params() {
            seed += 2;
            let x = randn(&shape, seed);
            let xv = values(&x);
            let what = format!("{shape:?} {p:?}");

            let (want, _, out_shape) = r::max_pool2d(&xv, shape, p);
            let g = dy(out_shape.iter().product(), seed + 1);
            let (out, grads) = forward_backward(&[&x], &g, |t| max_pool2d(&t[0], p));
            close(&format!("max pool {what}"), &out, &want);
            let dx = r::max_pool2d_backward(&xv, shape, p, &g);
            close(&format!("max pool backward {what}"), &grads[0], &dx);

            let (want, _) = r::avg_pool2d(&xv, shape, p);
            let (out, grads) = forward_backward(&[&x], &g, |t| avg_pool2d(&t[0], p));
            close(&format!("avg pool {what}"), &out, &want);
            let dx = r::avg_pool2d_backward(shape, p, &g);
            close(&format!("avg pool backward {what}"), &grads[0], &dx);
        }
        // Global pools: one window per plane.
        let x = randn(&shape, seed + 100);
        let xv = values(&x);
        let whole = params(1, 1, 0, false, true);
        let whole = Pool2dParams {
            kernel: (shape[2], shape[3]),
            stride: (shape[2], shape[3]),
            ..whole
        };
        let g = dy(shape[0] * shape[1], seed + 101);
        let (out, grads) = forward_backward(&[&x], &g, |t| global_avg_pool(&t[0]));
        close("global avg pool", &out, &r::avg_pool2d(&xv, shape, whole).0);
        close(
            "global avg pool backward",
            &grads[0],
            &r::avg_pool2d_backward(shape, whole, &g),
        );
        let (out, grads) = forward_backward(&[&x], &g, |t| global_max_pool(&t[0]));
        close("global max pool", &out, &r::max_pool2d(&xv, shape, whole).0);
        let dx = r::max_pool2d_backward(&xv, shape, whole, &g);
        close("global max pool backward", &grads[0], &dx);
    }
}

/// The 2x2 stride-2 fast path on the cases its selects must get right: ties (the first
/// maximum in raster order keeps the gradient), NaN (taken, the last NaN of a window keeping
/// the gradient, as PyTorch's CPU kernel), -inf windows and -0.0 against 0.0, on even and odd
/// planes.
#[test]
fn max_pool_2x2_matches_reference_on_ties_and_nans() {
    let p = params(2, 2, 0, false, true);
    for shape in [[2, 3, 6, 8], [1, 2, 5, 7]] {
        let n: usize = shape.iter().product();
        let specials = [f32::NAN, f32::NEG_INFINITY, -0.0, 0.0, 1.0, 1.0];
        let v: Vec<f32> = values(&randn(&shape, 77))
            .iter()
            .enumerate()
            .map(|(i, &x)| {
                if i % 3 == 0 {
                    specials[(i / 3) % specials.len()]
                } else {
                    (x * 2.0).round()
                }
            })
            .collect();
        // The first window holds two NaNs: PyTorch's kernel routes the gradient to the last.
        let mut v = v;
        let w = shape[3];
        (v[0], v[1], v[w], v[w + 1]) = (f32::NAN, 1.0, f32::NAN, 2.0);
        let x = Tensor::from_cpu(v.clone(), &shape).unwrap();
        let (want, _, out_shape) = r::max_pool2d(&v, shape, p);
        let mut g = dy(out_shape.iter().product(), 78);
        // A gradient of -0 lands as +0, as when added onto zeros.
        g[0] = -0.0;
        let (out, grads) = forward_backward(&[&x], &g, |t| max_pool2d(&t[0], p));
        let bits = |a: &[f32]| a.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&out), bits(&want), "max pool 2x2 {shape:?}");
        let dx = r::max_pool2d_backward(&v, shape, p, &g);
        assert_eq!(
            bits(&grads[0]),
            bits(&dx),
            "max pool 2x2 backward {shape:?}"
        );
        assert_eq!(grads[0].len(), n);
    }
}

#[test]
fn batch_norm_matches_reference() {
    let eps = 1e-5;
    for (case, shape) in [[3, 5, 7, 9], [2, 300, 3, 3], [16, 4, 1, 1]]
        .into_iter()
        .enumerate()
    {
        let seed = 10 * case as u64;
        let [n, c, h, w] = shape;
        let lay = (n, c, h * w);
        let x = randn(&shape, seed);
        let gamma = uniform(&[c], 0.5, 1.5, seed + 1);
        let beta = randn(&[c], seed + 2);
        let (xv, gv, bv) = (values(&x), values(&gamma), values(&beta));
        let g = dy(x.numel(), seed + 3);

        let rm = randn(&[c], seed + 4);
        let rv = uniform(&[c], 0.5, 2.0, seed + 5);
        let (rm0, rv0) = (values(&rm), values(&rv));
        let momentum = 0.1;
        let (out, grads) = forward_backward(&[&x, &gamma, &beta], &g, |t| {
            batch_norm_train(&t[0], &t[1], &t[2], &rm, &rv, momentum, eps)
        });
        let (want, mean, var) = r::batch_norm_train(&xv, lay, &gv, &bv, eps);
        let what = format!("{shape:?}");
        close(&format!("train {what}"), &out, &want);
        let count = (n * h * w) as f64;
        let want_rm: Vec<f32> = (0..c)
            .map(|i| (1.0 - momentum) * rm0[i] + momentum * mean[i] as f32)
            .collect();
        let want_rv: Vec<f32> = (0..c)
            .map(|i| (1.0 - momentum) * rv0[i] + momentum * (var[i] * count / (count - 1.0)) as f32)
            .collect();
        close(&format!("running mean {what}"), &values(&rm), &want_rm);
        close(&format!("running var {what}"), &values(&rv), &want_rv);
        let m32: Vec<f32> = mean.iter().map(|&m| m as f32).collect();
        let invstd: Vec<f32> = var
            .iter()
            .map(|&v| (1.0 / (v + eps as f64).sqrt()) as f32)
            .collect();
        let (dx, dgamma, dbeta) = r::batch_norm_backward(&xv, lay, &m32, &invstd, &gv, &g, true);
        close(&format!("train dx {what}"), &grads[0], &dx);
        close(&format!("train dgamma {what}"), &grads[1], &dgamma);
        close(&format!("train dbeta {what}"), &grads[2], &dbeta);

        let (out, grads) = forward_backward(&[&x, &gamma, &beta], &g, |t| {
            batch_norm_eval(&t[0], &t[1], &t[2], &rm, &rv, eps)
        });
        let mean = values(&rm);
        let invstd: Vec<f32> = values(&rv)
            .iter()
            .map(|&v| 1.0 / (v + eps).sqrt())
            .collect();
        close(
            &format!("eval {what}"),
            &out,
            &r::batch_norm_apply(&xv, lay, &mean, &invstd, &gv, &bv),
        );
        let (dx, dgamma, dbeta) = r::batch_norm_backward(&xv, lay, &mean, &invstd, &gv, &g, false);
        close(&format!("eval dx {what}"), &grads[0], &dx);
        close(&format!("eval dgamma {what}"), &grads[1], &dgamma);
        close(&format!("eval dbeta {what}"), &grads[2], &dbeta);
    }
}
