//! Reductions, L2 normalisation and cosine similarity, channel ops and the fused PGD step:
//! hand-computed cases, central-difference gradients and GPU against CPU on odd shapes; over
//! tensors larger than one storage binding, the split of the channel ops and the PGD step, and the
//! clear refusal of a whole-tensor reduction, which has no split.

mod common;

use common::binding_cap::{capped, over_cap, CAP, X};
use robust_dml::engine::ops::attack::pgd_step;
use robust_dml::engine::ops::channels as ch;
use robust_dml::engine::ops::normalize::{cosine_similarity, l2_normalize};
use robust_dml::engine::ops::reduce as rd;
use robust_dml::engine::testing::{
    assert_close, assert_grad, assert_parity, gpu_or_skip, randn, uniform, GradCheck,
};
use robust_dml::engine::{Device, EngineError, Tensor};

const ODD: [usize; 4] = [2, 3, 7, 5];

fn cpu(v: Vec<f32>, shape: &[usize]) -> Tensor {
    Tensor::from_cpu(v, shape).unwrap()
}

// ------------------------------------------------------------------ reductions

#[test]
fn reductions_hand_computed() {
    // [[1, 2, 3], [4, 5, 6]]
    let x = cpu(vec![1., 2., 3., 4., 5., 6.], &[2, 3]);
    assert_eq!(rd::sum(&x).unwrap().to_vec().unwrap(), vec![21.]);
    assert_eq!(rd::mean(&x).unwrap().to_vec().unwrap(), vec![3.5]);
    let s0 = rd::sum_dim(&x, 0).unwrap();
    assert_eq!(
        (s0.shape().to_vec(), s0.to_vec().unwrap()),
        (vec![3], vec![5., 7., 9.])
    );
    let s1 = rd::sum_dim(&x, 1).unwrap();
    assert_eq!(
        (s1.shape().to_vec(), s1.to_vec().unwrap()),
        (vec![2], vec![6., 15.])
    );
    assert_eq!(rd::mean_dim(&x, 1).unwrap().to_vec().unwrap(), vec![2., 5.]);
    let lse = rd::logsumexp_dim(&x, 1).unwrap().to_vec().unwrap();
    let want: Vec<f32> = [[1f32, 2., 3.], [4., 5., 6.]]
        .iter()
        .map(|r| r.iter().map(|v| v.exp()).sum::<f32>().ln())
        .collect();
    assert_close("logsumexp", &lse, &want, 1e-5, 1e-6);
    // A 1-D input reduces to shape [1].
    let v = cpu(vec![1., 2.], &[2]);
    assert_eq!(rd::sum_dim(&v, 0).unwrap().shape(), &[1]);
    assert!(
        rd::sum_dim(&x, 2).is_err(),
        "a dimension past the rank must be an error"
    );
}

#[test]
fn logsumexp_is_stable() {
    let x = cpu(vec![1000., 1000., -1000., 0.], &[2, 2]);
    let y = rd::logsumexp_dim(&x, 1).unwrap().to_vec().unwrap();
    assert_close("large logsumexp", &y, &[1000. + 2f32.ln(), 0.], 1e-3, 1e-6);
    if let Some(gpu) = gpu_or_skip("logsumexp_is_stable") {
        let g = rd::logsumexp_dim(&x.to_device(&gpu).unwrap(), 1)
            .unwrap()
            .to_vec()
            .unwrap();
        assert_close("large logsumexp on gpu", &g, &y, 1e-3, 1e-6);
    }
}

#[test]
fn reduction_gradients() {
    let o = GradCheck::default();
    let x = randn(&[2, 3, 4], 1);
    assert_grad("sum", |t| rd::sum(&t[0]), std::slice::from_ref(&x), o);
    assert_grad("mean", |t| rd::mean(&t[0]), std::slice::from_ref(&x), o);
    for dim in 0..3 {
        assert_grad(
            &format!("sum_dim {dim}"),
            |t| rd::sum_dim(&t[0], dim),
            std::slice::from_ref(&x),
            o,
        );
        assert_grad(
            &format!("mean_dim {dim}"),
            |t| rd::mean_dim(&t[0], dim),
            std::slice::from_ref(&x),
            o,
        );
        assert_grad(
            &format!("logsumexp_dim {dim}"),
            |t| rd::logsumexp_dim(&t[0], dim),
            std::slice::from_ref(&x),
            o,
        );
    }
}

#[test]
fn reductions_gpu_match_cpu() {
    let Some(gpu) = gpu_or_skip("reductions_gpu_match_cpu") else {
        return;
    };
    let x = randn(&ODD, 2);
    assert_parity(
        "sum",
        &gpu,
        |t| rd::sum(&t[0]),
        std::slice::from_ref(&x),
        1e-4,
        1e-5,
    );
    assert_parity(
        "mean",
        &gpu,
        |t| rd::mean(&t[0]),
        std::slice::from_ref(&x),
        1e-5,
        1e-5,
    );
    for dim in 0..4 {
        assert_parity(
            &format!("sum_dim {dim}"),
            &gpu,
            |t| rd::sum_dim(&t[0], dim),
            std::slice::from_ref(&x),
            1e-5,
            1e-5,
        );
        assert_parity(
            &format!("mean_dim {dim}"),
            &gpu,
            |t| rd::mean_dim(&t[0], dim),
            std::slice::from_ref(&x),
            1e-5,
            1e-5,
        );
        assert_parity(
            &format!("logsumexp_dim {dim}"),
            &gpu,
            |t| rd::logsumexp_dim(&t[0], dim),
            std::slice::from_ref(&x),
            1e-5,
            1e-5,
        );
    }
    // A reduced dimension longer than the 256-thread workgroup.
    let long = randn(&[3, 601, 2], 3);
    assert_parity(
        "sum_dim long",
        &gpu,
        |t| rd::sum_dim(&t[0], 1),
        std::slice::from_ref(&long),
        1e-4,
        1e-5,
    );
    assert_parity(
        "logsumexp long",
        &gpu,
        |t| rd::logsumexp_dim(&t[0], 1),
        &[long],
        1e-4,
        1e-5,
    );
}

#[test]
fn whole_tensor_sum_runs_several_passes_on_gpu() {
    let Some(gpu) = gpu_or_skip("whole_tensor_sum_runs_several_passes_on_gpu") else {
        return;
    };
    // 2048 values per partial sum: these sizes need one, two and three passes.
    for n in [1usize, 2047, 100_003, 2048 * 2048 + 5] {
        let x = uniform(&[n], 0.0, 1.0, n as u64);
        let want: f64 = x.to_vec().unwrap().iter().map(|&v| v as f64).sum();
        let got = rd::sum(&x.to_device(&gpu).unwrap())
            .unwrap()
            .item()
            .unwrap();
        assert!(
            ((got as f64) - want).abs() <= 1e-5 * want + 1e-6,
            "sum of {n} values: got {got}, want {want}"
        );
        let mean = rd::mean(&x.to_device(&gpu).unwrap())
            .unwrap()
            .item()
            .unwrap();
        assert!(
            ((mean as f64) - want / n as f64).abs() <= 1e-5,
            "mean of {n}: {mean}"
        );
    }
}

// ------------------------------------------------------------------ normalisation

#[test]
fn l2_normalize_hand_computed() {
    let x = cpu(vec![3., 4., 0., 0.], &[2, 2]);
    let y = l2_normalize(&x, 1, 1e-12).unwrap().to_vec().unwrap();
    assert_close("rows", &y, &[0.6, 0.8, 0., 0.], 1e-6, 0.0);
    let y0 = l2_normalize(&x, 0, 1e-12).unwrap().to_vec().unwrap();
    assert_close("columns", &y0, &[1., 1., 0., 0.], 1e-6, 0.0);
    // Below eps the norm is clamped: x / eps.
    let small = cpu(vec![0.03, 0.04], &[1, 2]);
    let ys = l2_normalize(&small, 1, 1.0).unwrap().to_vec().unwrap();
    assert_close("clamped", &ys, &[0.03, 0.04], 1e-7, 0.0);
    assert!(l2_normalize(&x, 1, 0.0).is_err());
}

#[test]
fn normalize_gradients() {
    let o = GradCheck::default();
    let x = randn(&[2, 3, 4], 4);
    for dim in 0..3 {
        assert_grad(
            &format!("l2_normalize dim {dim}"),
            |t| l2_normalize(&t[0], dim, 1e-12),
            std::slice::from_ref(&x),
            o,
        );
    }
    // Norms below eps: the clamped branch (gradient g / eps).
    let small = uniform(&[3, 4], -0.05, 0.05, 5);
    assert_grad(
        "l2_normalize clamped",
        |t| l2_normalize(&t[0], 1, 1.0),
        &[small],
        GradCheck { eps: 1e-3, ..o },
    );
    let a = randn(&[5, 7], 6);
    let b = randn(&[4, 7], 7);
    assert_grad(
        "cosine_similarity",
        |t| cosine_similarity(&t[0], &t[1]),
        &[a, b],
        o,
    );
}

#[test]
fn cosine_similarity_matches_definition() {
    let a = randn(&[3, 6], 8);
    let b = randn(&[4, 6], 9);
    let got = cosine_similarity(&a, &b).unwrap();
    assert_eq!(got.shape(), &[3, 4]);
    let (av, bv) = (a.to_vec().unwrap(), b.to_vec().unwrap());
    let mut want = Vec::new();
    for i in 0..3 {
        for j in 0..4 {
            let (ra, rb) = (&av[i * 6..i * 6 + 6], &bv[j * 6..j * 6 + 6]);
            let dot: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
            let na = ra.iter().map(|x| x * x).sum::<f32>().sqrt();
            let nb = rb.iter().map(|x| x * x).sum::<f32>().sqrt();
            want.push(dot / (na * nb));
        }
    }
    assert_close("cosine", &got.to_vec().unwrap(), &want, 1e-5, 1e-5);
    assert!(cosine_similarity(&a, &randn(&[4, 5], 1)).is_err());
}

#[test]
fn normalize_gpu_matches_cpu() {
    let Some(gpu) = gpu_or_skip("normalize_gpu_matches_cpu") else {
        return;
    };
    let x = randn(&ODD, 10);
    for dim in 0..4 {
        assert_parity(
            &format!("l2_normalize dim {dim}"),
            &gpu,
            |t| l2_normalize(&t[0], dim, 1e-12),
            std::slice::from_ref(&x),
            1e-5,
            1e-4,
        );
    }
    let wide = randn(&[3, 517], 11);
    assert_parity(
        "l2_normalize wide rows",
        &gpu,
        |t| l2_normalize(&t[0], 1, 1e-12),
        &[wide],
        1e-5,
        1e-4,
    );
    let small = uniform(&[3, 5], -0.05, 0.05, 12);
    assert_parity(
        "l2_normalize clamped",
        &gpu,
        |t| l2_normalize(&t[0], 1, 1.0),
        &[small],
        1e-6,
        1e-4,
    );
    let a = randn(&[5, 9], 13);
    let b = randn(&[7, 9], 14);
    assert_parity(
        "cosine_similarity",
        &gpu,
        |t| cosine_similarity(&t[0], &t[1]),
        &[a, b],
        1e-5,
        1e-4,
    );
}

// ------------------------------------------------------------------ channels

#[test]
fn channel_ops_hand_computed() {
    // [1, 2, 1, 2]: channel 0 = [1, 2], channel 1 = [3, 4]
    let a = cpu(vec![1., 2., 3., 4.], &[1, 2, 1, 2]);
    let b = cpu(vec![5., 6.], &[1, 1, 1, 2]);
    let c = ch::concat_channels(&[&a, &b]).unwrap();
    assert_eq!(c.shape(), &[1, 3, 1, 2]);
    assert_eq!(c.to_vec().unwrap(), vec![1., 2., 3., 4., 5., 6.]);
    let parts = ch::split_channels(&c, &[1, 2]).unwrap();
    assert_eq!(parts[0].to_vec().unwrap(), vec![1., 2.]);
    assert_eq!(parts[1].to_vec().unwrap(), vec![3., 4., 5., 6.]);
    let bgr = ch::permute_channels(&c, &[2, 1, 0]).unwrap();
    assert_eq!(bgr.to_vec().unwrap(), vec![5., 6., 3., 4., 1., 2.]);
    let aff = ch::channel_affine(&c, &[1., 2., -1.], &[0., 1., 0.5]).unwrap();
    assert_eq!(aff.to_vec().unwrap(), vec![1., 2., 7., 9., -4.5, -5.5]);
    // Errors, not panics.
    assert!(ch::split_channels(&c, &[1, 1]).is_err());
    assert!(ch::permute_channels(&c, &[0, 0, 1]).is_err());
    assert!(ch::permute_channels(&c, &[0, 1]).is_err());
    assert!(ch::channel_affine(&c, &[1.], &[0.]).is_err());
    assert!(ch::concat_channels(&[&a, &cpu(vec![0.; 3], &[1, 1, 1, 3])]).is_err());
    assert!(ch::concat_channels(&[]).is_err());
}

#[test]
fn channel_gradients() {
    let o = GradCheck::default();
    let x = randn(&[2, 3, 3, 2], 20);
    let y = randn(&[2, 2, 3, 2], 21);
    let z = randn(&[2, 1, 3, 2], 22);
    assert_grad(
        "concat",
        |t| ch::concat_channels(&[&t[0], &t[1], &t[2]]),
        &[x.clone(), y.clone(), z],
        o,
    );
    // Reordered pieces with the middle one dropped: its channels get zero gradient.
    let split_then_concat = |t: &[Tensor]| {
        let p = ch::split_channels(&t[0], &[1, 1, 1])?;
        ch::concat_channels(&[&p[2], &p[0]])
    };
    assert_grad("split", split_then_concat, std::slice::from_ref(&x), o);
    assert_grad(
        "permute",
        |t| ch::permute_channels(&t[0], &[2, 0, 1]),
        std::slice::from_ref(&x),
        o,
    );
    assert_grad(
        "affine",
        |t| ch::channel_affine(&t[0], &[0.5, -2., 3.], &[1., 0., -1.]),
        &[x],
        o,
    );
}

#[test]
fn channel_ops_gpu_match_cpu() {
    let Some(gpu) = gpu_or_skip("channel_ops_gpu_match_cpu") else {
        return;
    };
    let x = randn(&ODD, 30);
    let y = randn(&[2, 2, 7, 5], 31);
    assert_parity(
        "concat",
        &gpu,
        |t| ch::concat_channels(&[&t[0], &t[1]]),
        &[x.clone(), y],
        0.0,
        0.0,
    );
    let split = |t: &[Tensor]| {
        let p = ch::split_channels(&t[0], &[2, 1])?;
        ch::concat_channels(&[&p[1], &p[0], &p[1]])
    };
    assert_parity("split", &gpu, split, std::slice::from_ref(&x), 1e-6, 0.0);
    assert_parity(
        "permute",
        &gpu,
        |t| ch::permute_channels(&t[0], &[2, 1, 0]),
        std::slice::from_ref(&x),
        0.0,
        0.0,
    );
    let (scale, shift) = (
        [1. / 0.229, 1. / 0.224, 1. / 0.225],
        [-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225],
    );
    assert_parity(
        "affine",
        &gpu,
        |t| ch::channel_affine(&t[0], &scale, &shift),
        &[x],
        1e-5,
        1e-6,
    );
}

// ------------------------------------------------------------------ PGD step

#[test]
fn pgd_step_hand_computed() {
    let x_orig = cpu(vec![0.5, 0.5, 0.5, 0.02, 0.98], &[5]);
    let x_adv = cpu(vec![0.5, 0.55, 0.5, 0.02, 0.98], &[5]);
    let grad = cpu(vec![1.0, 2.0, 0.0, -3.0, 4.0], &[5]);
    let y = pgd_step(&x_adv, &grad, &x_orig, 0.04, 0.08)
        .unwrap()
        .to_vec()
        .unwrap();
    // step; projected to x_orig + eps; zero gradient stays; clipped at 0 (0.02 - 0.04 < 0)
    // but the ball allows it, so the [0, 1] clip decides; clipped at 1.
    assert_close("pgd", &y, &[0.54, 0.58, 0.5, 0.0, 1.0], 1e-6, 0.0);
    assert!(pgd_step(&x_adv, &cpu(vec![0.; 4], &[4]), &x_orig, 0.1, 0.1).is_err());
}

#[test]
fn pgd_step_gpu_matches_cpu() {
    let Some(gpu) = gpu_or_skip("pgd_step_gpu_matches_cpu") else {
        return;
    };
    let x_orig = uniform(&ODD, 0.0, 1.0, 40);
    let noise = uniform(&ODD, -0.03, 0.03, 41).to_vec().unwrap();
    let x_adv = cpu(
        x_orig
            .to_vec()
            .unwrap()
            .iter()
            .zip(&noise)
            .map(|(a, b)| (a + b).clamp(0., 1.))
            .collect(),
        &ODD,
    );
    let mut g = randn(&ODD, 42).to_vec().unwrap();
    g[3] = 0.0;
    let grad = cpu(g, &ODD);
    let want = pgd_step(&x_adv, &grad, &x_orig, 2. / 255., 8. / 255.)
        .unwrap()
        .to_vec()
        .unwrap();
    let on = |t: &Tensor| t.to_device(&gpu).unwrap();
    let got = pgd_step(&on(&x_adv), &on(&grad), &on(&x_orig), 2. / 255., 8. / 255.)
        .unwrap()
        .to_vec()
        .unwrap();
    assert_close("pgd gpu", &got, &want, 1e-7, 0.0);
    let (xo, xa) = (x_orig.to_vec().unwrap(), x_adv.to_vec().unwrap());
    assert_eq!(got[3], xa[3], "zero gradient: the pixel does not move");
    for (i, &v) in got.iter().enumerate() {
        assert!(
            (0.0..=1.0).contains(&v) && (v - xo[i]).abs() <= 8. / 255. + 1e-6,
            "element {i}: {v}"
        );
    }
}

// ------------------------------------------------------------------ over the binding cap

#[test]
fn the_cap_binds_for_ops_without_a_split() {
    let Some(dev) = capped("the_cap_binds_for_ops_without_a_split", CAP) else {
        return;
    };
    let x = randn(&X, 1).to_device(&dev).unwrap();
    over_cap(&dev, &x);
    // A whole-tensor reduction has no split path: it must fail clearly, not corrupt memory.
    match rd::sum(&x) {
        Err(EngineError::BindingTooLarge { .. }) => {}
        other => panic!("expected BindingTooLarge, got {other:?}"),
    }
    // The values round-trip through a tensor over the cap (copies are not bindings).
    assert_eq!(x.to_vec().unwrap(), randn(&X, 1).to_vec().unwrap());
}

/// Channel ops run per sample on views of batch chunks; the PGD step runs over flat ranges.
#[test]
fn channel_ops_and_the_pgd_step_split() {
    let Some(dev) = capped("channel_ops_and_the_pgd_step_split", CAP) else {
        return;
    };
    let x = randn(&X, 12);
    over_cap(&dev, &x.to_device(&dev).unwrap());
    let one = [x.clone()];
    assert_parity(
        "concat_channels",
        &dev,
        |t| ch::concat_channels(&[&t[0], &t[1]]),
        &[x.clone(), randn(&[20, 2, 9, 7], 18)],
        1e-6,
        1e-6,
    );
    assert_parity(
        "split_channels",
        &dev,
        |t| {
            let parts = ch::split_channels(&t[0], &[2, 3])?;
            ch::concat_channels(&[&parts[1], &parts[0]])
        },
        &one,
        1e-5,
        1e-5,
    );
    assert_parity(
        "permute_channels",
        &dev,
        |t| ch::permute_channels(&t[0], &[4, 2, 0, 1, 3]),
        &one,
        1e-6,
        1e-6,
    );
    let (scale, shift) = ([0.5, -1.0, 2.0, 1.5, 0.25], [0.1, 0.2, -0.3, 0.0, 1.0]);
    assert_parity(
        "channel_affine",
        &dev,
        |t| ch::channel_affine(&t[0], &scale, &shift),
        &one,
        1e-5,
        1e-5,
    );
    let (adv, grad, orig) = (
        uniform(&X, 0.0, 1.0, 15),
        randn(&X, 16),
        uniform(&X, 0.0, 1.0, 17),
    );
    let step = |d: &Device| {
        let on = |t: &Tensor| t.to_device(d).unwrap();
        pgd_step(&on(&adv), &on(&grad), &on(&orig), 0.01, 0.03)
            .unwrap()
            .to_vec()
            .unwrap()
    };
    assert_close("pgd_step", &step(&dev), &step(&Device::Cpu), 1e-6, 0.0);
}
