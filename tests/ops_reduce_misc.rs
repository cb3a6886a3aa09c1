//! Reductions, L2 normalisation and cosine similarity, channel ops and the fused PGD step:
//! hand-computed cases, central-difference gradients and GPU against CPU on odd shapes; over
//! tensors larger than one storage binding, the split of the channel ops and the PGD step, and the
//! clear refusal of a whole-tensor reduction, which has no split; the fast CPU kernels against the
//! reference loops.

mod common;

use common::binding_cap::{capped, over_cap, CAP, X};
use common::cpu_reference::{close, dy, forward_backward, tensor, values, LONG, TOL};
use robust_dml::engine::ops::attack::pgd_step;
use robust_dml::engine::ops::channels::{
    self as ch, channel_affine, concat_channels, permute_channels, split_channels,
};
use robust_dml::engine::ops::normalize::{cosine_similarity, l2_normalize};
use robust_dml::engine::ops::reduce::{
    self as rd, logsumexp_dim, mean, mean_dim, sum, sum_dim, sum_squares_raw,
};
use robust_dml::engine::reference as r;
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

// ------------------------------------------------------------------ the fast CPU kernels against the reference loops

#[test]
fn channel_ops_match_reference() {
    // Large planes, small planes (many to a task) and 2-D [N, C] tensors (planes of one).
    for (case, (n, hw_shape)) in [(3, vec![7, 5]), (2, vec![3, 3]), (5, vec![])]
        .into_iter()
        .enumerate()
    {
        let seed = 20 * case as u64;
        let hw: usize = hw_shape.iter().product();
        let shape = |c: usize| [vec![n, c], hw_shape.clone()].concat();
        let counts = [3, 1, 2_001];
        let parts: Vec<Tensor> = counts
            .iter()
            .enumerate()
            .map(|(i, &c)| randn(&shape(c), seed + i as u64))
            .collect();
        let total: usize = counts.iter().sum();
        let g = dy(n * total * hw, seed + 5);
        let refs: Vec<&Tensor> = parts.iter().collect();
        let (out, grads) = forward_backward(&refs, &g, |t| {
            concat_channels(&t.iter().collect::<Vec<_>>())
        });
        let pv: Vec<Vec<f32>> = parts.iter().map(values).collect();
        let slices: Vec<(&[f32], usize)> =
            pv.iter().zip(counts).map(|(v, c)| (&v[..], c)).collect();
        close("concat", &out, &r::concat_channels(&slices, n, hw));
        // Concat's gradient is the split of g, i.e. the gather of each part's channels.
        let mut offset = 0;
        for (i, &c) in counts.iter().enumerate() {
            let index: Vec<usize> = (offset..offset + c).collect();
            close(
                "concat backward",
                &grads[i],
                &r::gather_channels(&g, (n, total, hw), &index),
            );
            offset += c;
        }

        let x = randn(&shape(total), seed + 6);
        let xv = values(&x);
        // Split, then backward through one piece only (the others get no gradient: zeros).
        let pieces_g = dy(n * counts[2] * hw, seed + 7);
        let (out, grads) = forward_backward(&[&x], &pieces_g, |t| {
            Ok(split_channels(&t[0], &counts)?.remove(2))
        });
        let index: Vec<usize> = (counts[0] + counts[1]..total).collect();
        close(
            "split",
            &out,
            &r::gather_channels(&xv, (n, total, hw), &index),
        );
        let mut want = vec![0.0; xv.len()];
        for img in 0..n {
            for (j, &ch) in index.iter().enumerate() {
                for s in 0..hw {
                    want[(img * total + ch) * hw + s] = pieces_g[(img * counts[2] + j) * hw + s];
                }
            }
        }
        close("split backward", &grads[0], &want);

        let perm: Vec<usize> = (0..total).map(|i| (i * 7 + 3) % total).collect();
        let g = dy(xv.len(), seed + 8);
        let (out, grads) = forward_backward(&[&x], &g, |t| permute_channels(&t[0], &perm));
        close(
            "permute",
            &out,
            &r::gather_channels(&xv, (n, total, hw), &perm),
        );
        let mut inverse = vec![0; total];
        for (i, &p) in perm.iter().enumerate() {
            inverse[p] = i;
        }
        close(
            "permute backward",
            &grads[0],
            &r::gather_channels(&g, (n, total, hw), &inverse),
        );

        let scale = values(&randn(&[total], seed + 9));
        let shift = values(&randn(&[total], seed + 10));
        let (out, grads) = forward_backward(&[&x], &g, |t| channel_affine(&t[0], &scale, &shift));
        close(
            "channel affine",
            &out,
            &r::channel_affine(&xv, (n, total, hw), &scale, &shift),
        );
        let zeros = vec![0.0; total];
        close(
            "channel affine backward",
            &grads[0],
            &r::channel_affine(&g, (n, total, hw), &scale, &zeros),
        );
    }
}

#[test]
fn whole_tensor_reductions_match_reference() {
    for len in [1, 7, LONG] {
        let x = randn(&[len], len as u64);
        let xv = values(&x);
        let g = [0.75f32];
        let (out, grads) = forward_backward(&[&x], &g, |t| sum(&t[0]));
        close("sum", &out, &[r::sum_all(&xv)]);
        close("sum backward", &grads[0], &vec![0.75; len]);
        let (out, grads) = forward_backward(&[&x], &g, |t| mean(&t[0]));
        close("mean", &out, &[r::sum_all(&xv) / len as f32]);
        close("mean backward", &grads[0], &vec![0.75 / len as f32; len]);
        let squares = values(&sum_squares_raw(&x).unwrap());
        close("sum of squares", &squares, &[r::sum_squares(&xv)]);
    }
}

#[test]
fn reductions_along_a_dimension_match_reference() {
    // Contiguous rows (last dim), strided columns, more columns than one task takes.
    let shapes: [&[usize]; 4] = [&[5, 7, 300], &[3, 2_500, 2], &[2, 3, 1_500], &[4_099]];
    for (case, shape) in shapes.into_iter().enumerate() {
        for dim in 0..shape.len() {
            let seed = 10 * case as u64 + dim as u64;
            let x = randn(shape, seed);
            let xv = values(&x);
            let lay = r::outer_n_inner(shape, dim);
            let what = format!("{shape:?} dim {dim}");
            let g = dy(lay.0 * lay.2, seed + 100);

            let (out, grads) = forward_backward(&[&x], &g, |t| sum_dim(&t[0], dim));
            close(&format!("sum_dim {what}"), &out, &r::sum_dim(&xv, lay));
            close(
                &format!("sum_dim backward {what}"),
                &grads[0],
                &r::reduce_backward(&g, lay, 1.0, None),
            );

            let (out, grads) = forward_backward(&[&x], &g, |t| mean_dim(&t[0], dim));
            let scale = 1.0 / lay.1 as f32;
            let want: Vec<f32> = r::sum_dim(&xv, lay).iter().map(|v| v * scale).collect();
            close(&format!("mean_dim {what}"), &out, &want);
            close(
                &format!("mean_dim backward {what}"),
                &grads[0],
                &r::reduce_backward(&g, lay, scale, None),
            );

            let (out, grads) = forward_backward(&[&x], &g, |t| logsumexp_dim(&t[0], dim));
            let lse = r::logsumexp_dim(&xv, lay);
            close(&format!("logsumexp_dim {what}"), &out, &lse);
            let want = r::reduce_backward(&g, lay, 1.0, Some((&xv, &lse)));
            close(&format!("logsumexp_dim backward {what}"), &grads[0], &want);
        }
    }
}

#[test]
fn l2_normalize_matches_reference() {
    // [1_030, 67] along 1 and [40, 30, 20] along 1 split into several parallel tasks of slabs.
    let shapes: [&[usize]; 4] = [&[5, 6, 7], &[1_030, 67], &[3, 2_000], &[40, 30, 20]];
    for (case, shape) in shapes.into_iter().enumerate() {
        for dim in 0..shape.len() {
            let seed = 10 * case as u64 + dim as u64;
            let mut xv = values(&randn(shape, seed));
            // A zero column: the norm is clamped to eps.
            let lay = r::outer_n_inner(shape, dim);
            for k in 0..lay.1 {
                xv[k * lay.2] = 0.0;
            }
            let x = tensor(xv.clone(), shape);
            let eps = 1e-6;
            let g = dy(xv.len(), seed + 100);
            let (out, grads) = forward_backward(&[&x], &g, |t| l2_normalize(&t[0], dim, eps));
            let what = format!("{shape:?} dim {dim}");
            close(
                &format!("l2_normalize {what}"),
                &out,
                &r::l2_normalize(&xv, lay, eps),
            );
            let want = r::l2_normalize_backward(&xv, &g, lay, eps);
            // Gradients at a clamped norm are scaled by 1 / eps: compare relative to that.
            assert_close(
                &format!("l2_normalize backward {what}"),
                &grads[0],
                &want,
                TOL,
                TOL,
            );
        }
    }
}

#[test]
fn pgd_step_matches_reference() {
    let x0 = uniform(&[LONG], 0.0, 1.0, 1);
    let xa = uniform(&[LONG], -0.1, 1.1, 2);
    let mut gv = values(&randn(&[LONG], 3));
    gv[5] = 0.0;
    let grad = tensor(gv.clone(), &[LONG]);
    let out = values(&pgd_step(&xa, &grad, &x0, 0.01, 0.03).unwrap());
    close(
        "pgd step",
        &out,
        &r::pgd_step(&values(&xa), &gv, &values(&x0), 0.01, 0.03),
    );
}
