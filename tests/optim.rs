//! AdamW against PyTorch's update written out by hand, on both devices; the fast CPU kernel
//! against the reference loop; global-norm clipping.

mod common;

use common::cpu_reference::{close, values, LONG};
use robust_dml::engine::ops::optim::{adamw_step, clip_grad_norm, AdamWStep};
use robust_dml::engine::reference as r;
use robust_dml::engine::testing::{assert_close, gpu_or_skip, randn, uniform};
use robust_dml::engine::{Device, Tensor};

const HYPER: AdamWStep = AdamWStep {
    lr: 0.01,
    beta1: 0.9,
    beta2: 0.999,
    eps: 1e-8,
    weight_decay: 0.1,
    step: 1,
};

/// torch.optim.AdamW's step for one element, in f64, as in its documentation:
/// p <- p (1 - lr wd); m <- b1 m + (1 - b1) g; v <- b2 v + (1 - b2) g^2;
/// p <- p - lr m_hat / (sqrt(v_hat) + eps), m_hat = m / (1 - b1^t), v_hat = v / (1 - b2^t).
fn reference_step(p: &mut f64, m: &mut f64, v: &mut f64, g: f64, h: &AdamWStep) {
    let (lr, b1, b2, eps, wd) = (
        h.lr as f64,
        h.beta1 as f64,
        h.beta2 as f64,
        h.eps as f64,
        h.weight_decay as f64,
    );
    let t = h.step as i32;
    *p *= 1.0 - lr * wd;
    *m = b1 * *m + (1.0 - b1) * g;
    *v = b2 * *v + (1.0 - b2) * g * g;
    let m_hat = *m / (1.0 - b1.powi(t));
    let v_hat = *v / (1.0 - b2.powi(t));
    *p -= lr * m_hat / (v_hat.sqrt() + eps);
}

/// Runs four AdamW steps with changing gradients on `device` and compares the parameter and
/// both moments with the hand-written reference after every step.
fn check_adamw_on(device: &Device) {
    let shape = [3, 7];
    let n = 21;
    let mut want_p: Vec<f64> = randn(&shape, 1)
        .to_vec()
        .unwrap()
        .iter()
        .map(|&v| v as f64)
        .collect();
    let (mut want_m, mut want_v) = (vec![0.0f64; n], vec![0.0f64; n]);
    let param = Tensor::from_vec(want_p.iter().map(|&v| v as f32).collect(), &shape, device)
        .unwrap()
        .var();
    let m = Tensor::zeros(&shape, device).unwrap();
    let v = Tensor::zeros(&shape, device).unwrap();
    for step in 1..=4u32 {
        let mut grads = randn(&shape, 10 + step as u64).to_vec().unwrap();
        grads[0] = 0.0; // a zero gradient still decays the weight
        let grad = Tensor::from_vec(grads.clone(), &shape, device).unwrap();
        let h = AdamWStep { step, ..HYPER };
        adamw_step(&param, &grad, &m, &v, h).unwrap();
        for i in 0..n {
            reference_step(
                &mut want_p[i],
                &mut want_m[i],
                &mut want_v[i],
                grads[i] as f64,
                &h,
            );
        }
        let f = |x: &[f64]| x.iter().map(|&v| v as f32).collect::<Vec<_>>();
        let what = format!("{} step {step}", device.name());
        assert_close(
            &format!("{what}: param"),
            &param.to_vec().unwrap(),
            &f(&want_p),
            1e-6,
            1e-5,
        );
        assert_close(
            &format!("{what}: m"),
            &m.to_vec().unwrap(),
            &f(&want_m),
            1e-7,
            1e-5,
        );
        assert_close(
            &format!("{what}: v"),
            &v.to_vec().unwrap(),
            &f(&want_v),
            1e-9,
            1e-5,
        );
    }
    // The update really moved the parameter (the test can fail on a no-op kernel).
    let start = randn(&shape, 1).to_vec().unwrap();
    assert!(param
        .to_vec()
        .unwrap()
        .iter()
        .zip(&start)
        .all(|(a, b)| a != b));
}

#[test]
fn adamw_matches_pytorch_formula_on_cpu() {
    check_adamw_on(&Device::Cpu);
}

#[test]
fn adamw_matches_pytorch_formula_on_gpu() {
    let Some(gpu) = gpu_or_skip("adamw_matches_pytorch_formula_on_gpu") else {
        return;
    };
    check_adamw_on(&gpu);
}

#[test]
fn adamw_rejects_bad_arguments() {
    let p = randn(&[4], 1);
    let (m, v) = (
        Tensor::zeros(&[4], &Device::Cpu).unwrap(),
        Tensor::zeros(&[4], &Device::Cpu).unwrap(),
    );
    let g = randn(&[4], 2);
    assert!(adamw_step(&p, &g, &m, &v, AdamWStep { step: 0, ..HYPER }).is_err());
    assert!(adamw_step(&p, &randn(&[5], 3), &m, &v, HYPER).is_err());
    assert!(
        adamw_step(&p, &g, &m, &m, HYPER).is_err(),
        "m and v sharing storage must fail"
    );
}

#[test]
fn clip_grad_norm_scales_only_above_the_limit() {
    let a = Tensor::from_cpu(vec![3.0, 4.0], &[2]).unwrap();
    let b = Tensor::from_cpu(vec![12.0], &[1, 1]).unwrap();
    // Global norm sqrt(9 + 16 + 144) = 13.
    let (clipped, norm) = clip_grad_norm(&[a.clone(), b.clone()], 6.5).unwrap();
    assert!((norm - 13.0).abs() < 1e-5, "norm {norm}");
    let coef = 6.5 / (13.0 + 1e-6);
    assert_close(
        "a clipped",
        &clipped[0].to_vec().unwrap(),
        &[3.0 * coef, 4.0 * coef],
        1e-6,
        1e-6,
    );
    assert_close(
        "b clipped",
        &clipped[1].to_vec().unwrap(),
        &[12.0 * coef],
        1e-6,
        1e-6,
    );
    assert_eq!(clipped[1].shape(), &[1, 1]);
    let (kept, norm) = clip_grad_norm(&[a, b], 20.0).unwrap();
    assert!((norm - 13.0).abs() < 1e-5);
    assert_eq!(kept[0].to_vec().unwrap(), vec![3.0, 4.0]);
    assert_eq!(kept[1].to_vec().unwrap(), vec![12.0]);
    assert!(clip_grad_norm(&[], 1.0).unwrap().0.is_empty());
    assert!(clip_grad_norm(&[randn(&[2], 1)], 0.0).is_err());
}

#[test]
fn clip_grad_norm_gpu_matches_cpu() {
    let Some(gpu) = gpu_or_skip("clip_grad_norm_gpu_matches_cpu") else {
        return;
    };
    let grads = vec![randn(&[5000], 1), randn(&[3, 7], 2), randn(&[1], 3)];
    let on_gpu: Vec<Tensor> = grads.iter().map(|g| g.to_device(&gpu).unwrap()).collect();
    let (want, want_norm) = clip_grad_norm(&grads, 10.0).unwrap();
    let (got, got_norm) = clip_grad_norm(&on_gpu, 10.0).unwrap();
    assert!(want_norm > 10.0, "the case must clip");
    assert!(
        (got_norm - want_norm).abs() <= 1e-4 * want_norm,
        "norm {got_norm} vs {want_norm}"
    );
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(g.is_gpu());
        assert_close(
            &format!("gradient {i}"),
            &g.to_vec().unwrap(),
            &w.to_vec().unwrap(),
            1e-6,
            1e-4,
        );
    }
    let clipped_norm: f32 = got
        .iter()
        .flat_map(|g| g.to_vec().unwrap())
        .map(|v| v * v)
        .sum::<f32>()
        .sqrt();
    assert!(
        (clipped_norm - 10.0).abs() < 1e-3,
        "norm after clipping {clipped_norm}"
    );
}

// ------------------------------------------------------------------ the fast CPU kernels against the reference loops

#[test]
fn adamw_step_matches_reference() {
    let h = AdamWStep {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 1e-2,
        step: 3,
    };
    let (p, g) = (randn(&[LONG], 1), randn(&[LONG], 2));
    let m = randn(&[LONG], 3);
    let v = uniform(&[LONG], 0.0, 1.0, 4);
    let (mut pv, gv, mut mv, mut vv) = (values(&p), values(&g), values(&m), values(&v));
    adamw_step(&p, &g, &m, &v, h).unwrap();
    r::adamw_step(&mut pv, &gv, &mut mv, &mut vv, h);
    close("adamw param", &values(&p), &pv);
    close("adamw m", &values(&m), &mv);
    close("adamw v", &values(&v), &vv);
}
