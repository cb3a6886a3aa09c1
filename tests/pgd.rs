//! PGD on embeddings: stays in the eps-ball and [0, 1], reaches eps, beats random noise of the
//! same size, is the identity at eps = 0, and attacks ensembles through summed gradients.

use robust_dml::config::PgdConfig;
use robust_dml::engine::ops::attack::pgd_step;
use robust_dml::engine::ops::elementwise::{add, clamp};
use robust_dml::engine::ops::elementwise::{square, sub};
use robust_dml::engine::ops::reduce::sum;
use robust_dml::engine::testing::gpu_or_skip;
use robust_dml::engine::{Device, Rng, Tensor};
use robust_dml::robust::attack::{attack, objective_value, start_point, EmbedFn, Goal};

mod common;
use common::Tiny;

fn images(d: &Device, seed: u64) -> Tensor {
    Tensor::rand_uniform(&[4, 3, 6, 5], 0.0, 1.0, &mut Rng::new(seed), d).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    let (a, b) = (a.to_vec().unwrap(), b.to_vec().unwrap());
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn check_invariants(d: &Device) {
    let m = Tiny::new(1, d);
    let f = |x: &Tensor| m.embed(x);
    let members: [EmbedFn; 1] = [&f];
    let x = images(d, 2);
    let cfg = PgdConfig::new(8.0 / 255.0, 10);
    let adv = attack(&members, &x, &cfg, &Goal::EmbeddingShift, &mut Rng::new(3)).unwrap();
    let (xv, av) = (x.to_vec().unwrap(), adv.to_vec().unwrap());
    for (a, b) in av.iter().zip(&xv) {
        assert!((a - b).abs() <= cfg.eps + 1e-6, "left the eps-ball");
        assert!((0.0..=1.0).contains(a), "left [0, 1]");
    }
    let moved = max_abs_diff(&adv, &x);
    assert!(
        moved >= cfg.eps - 1e-6,
        "max |x_adv - x| = {moved} never reached eps {}",
        cfg.eps
    );
    // Random sign noise of the same size, kept in [0, 1].
    let mut r = Rng::new(4);
    let noise = Tensor::from_vec(
        (0..x.numel())
            .map(|_| if r.uniform() < 0.5 { -cfg.eps } else { cfg.eps })
            .collect(),
        x.shape(),
        d,
    )
    .unwrap();
    let noisy = clamp(&add(&x, &noise).unwrap(), 0.0, 1.0).unwrap();
    let after_pgd = objective_value(&members, &x, &adv, &Goal::EmbeddingShift).unwrap();
    let after_noise = objective_value(&members, &x, &noisy, &Goal::EmbeddingShift).unwrap();
    assert!(
        after_pgd > after_noise,
        "PGD objective {after_pgd} <= random noise {after_noise}"
    );
    // eps = 0 is the identity.
    let zero = PgdConfig::new(0.0, 10);
    let same = attack(&members, &x, &zero, &Goal::EmbeddingShift, &mut Rng::new(5)).unwrap();
    assert_eq!(same.to_vec().unwrap(), xv);
}

#[test]
fn pgd_invariants_cpu() {
    check_invariants(&Device::Cpu);
}

#[test]
fn pgd_invariants_gpu() {
    if let Some(gpu) = gpu_or_skip("pgd_invariants_gpu") {
        check_invariants(&gpu);
    }
}

#[test]
fn ensemble_attack_uses_every_member() {
    let d = Device::Cpu;
    let (a, b) = (Tiny::new(10, &d), Tiny::new(11, &d));
    let fa = |x: &Tensor| a.embed(x);
    let fb = |x: &Tensor| b.embed(x);
    let x = images(&d, 12);
    let cfg = PgdConfig::new(8.0 / 255.0, 5);
    let both: [EmbedFn; 2] = [&fa, &fb];
    let only_a: [EmbedFn; 1] = [&fa];
    let adv_both = attack(&both, &x, &cfg, &Goal::EmbeddingShift, &mut Rng::new(1)).unwrap();
    let adv_a = attack(&only_a, &x, &cfg, &Goal::EmbeddingShift, &mut Rng::new(1)).unwrap();
    assert!(
        max_abs_diff(&adv_both, &adv_a) > 0.0,
        "the second member's gradient was ignored"
    );
    // One step by hand: x1 = step(x0, grad_a(x0) + grad_b(x0)), from the same start point.
    let one = PgdConfig { steps: 1, ..cfg };
    let adv1 = attack(&both, &x, &one, &Goal::EmbeddingShift, &mut Rng::new(7)).unwrap();
    let x0 = start_point(&x, &one, &mut Rng::new(7)).unwrap();
    let grad_of = |m: &Tiny| {
        let clean = m.embed(&x).unwrap().detach();
        let v = x0.var();
        let obj = sum(&square(&sub(&m.embed(&v).unwrap(), &clean).unwrap()).unwrap()).unwrap();
        obj.backward().unwrap().get(&v).unwrap().clone()
    };
    let g = add(&grad_of(&a), &grad_of(&b)).unwrap();
    let want = pgd_step(&x0, &g, &x, one.alpha, one.eps).unwrap();
    assert_eq!(adv1.to_vec().unwrap(), want.to_vec().unwrap());
}

#[test]
fn metric_loss_objective_ascends() {
    let d = Device::Cpu;
    let m = Tiny::new(20, &d);
    let f = |x: &Tensor| m.embed(x);
    let members: [EmbedFn; 1] = [&f];
    let proxies = Tensor::randn(&[3, 6], 1.0, &mut Rng::new(21), &d).unwrap();
    let labels = [0usize, 1, 2, 0];
    let goal = Goal::MetricLoss {
        proxies: vec![&proxies],
        labels: &labels,
        loss: Default::default(),
    };
    let x = images(&d, 22);
    let cfg = PgdConfig::new(16.0 / 255.0, 5);
    let adv = attack(&members, &x, &cfg, &goal, &mut Rng::new(23)).unwrap();
    let before = objective_value(&members, &x, &x, &goal).unwrap();
    let after = objective_value(&members, &x, &adv, &goal).unwrap();
    assert!(
        after > before,
        "metric loss {before} -> {after} did not rise"
    );
}
