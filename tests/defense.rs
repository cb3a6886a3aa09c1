//! Defense objectives: EAT's data split, Mix-Up mixing, and that every method's step loss is
//! finite and reaches the member's parameters and the proxies.

use robust_dml::config::PgdConfig;
use robust_dml::dml::loss::ProxyAnchorConfig;
use robust_dml::engine::ops::matmul::linear;
use robust_dml::engine::ops::normalize::l2_normalize;
use robust_dml::engine::{Device, Result, Rng, Tensor};
use robust_dml::robust::attack::EmbedFn;
use robust_dml::robust::defense::{
    eat_member_indices, step_loss, DefenseConfig, Method, MixPlan, StepContext,
};

#[test]
fn eat_members_train_on_all_parts_but_their_own() {
    let n = 3;
    let sets = eat_member_indices(31, n, &mut Rng::new(1));
    assert_eq!(sets.len(), n);
    // Each sample is held out by exactly one member: it appears in n - 1 training sets.
    for s in 0..31 {
        let count = sets.iter().filter(|set| set.contains(&s)).count();
        assert_eq!(count, n - 1, "sample {s} is in {count} member sets");
    }
    // The held-out parts are disjoint and cover everything.
    let held: Vec<Vec<usize>> = sets
        .iter()
        .map(|set| (0..31).filter(|s| !set.contains(s)).collect())
        .collect();
    let total: usize = held.iter().map(|h| h.len()).sum();
    assert_eq!(total, 31);
    assert!(
        held.iter().all(|h| h.len() >= 10),
        "parts are not of equal size: {held:?}"
    );
}

#[test]
fn mix_plan_mixes_rows() {
    let plan = MixPlan {
        lambda: 0.25,
        partner: vec![1, 0, 2],
    };
    let t = Tensor::from_cpu(vec![1.0, 2.0, 10.0, 20.0, 5.0, 5.0], &[3, 2]).unwrap();
    let m = plan.mix(&t).unwrap().to_vec().unwrap();
    assert_eq!(
        m,
        vec![0.25 + 7.5, 0.5 + 15.0, 2.5 + 0.75, 5.0 + 1.5, 5.0, 5.0]
    );
}

#[test]
fn every_method_gives_a_finite_loss_with_gradients() {
    let d = Device::Cpu;
    let mut r = Rng::new(2);
    let ws: Vec<Tensor> = (0..3)
        .map(|_| Tensor::randn(&[5, 12], 0.3, &mut r, &d).unwrap().var())
        .collect();
    let proxies = Tensor::randn(&[3, 5], 1.0, &mut r, &d).unwrap().var();
    let x = Tensor::rand_uniform(&[6, 3, 2, 2], 0.0, 1.0, &mut r, &d).unwrap();
    let labels = [0usize, 1, 2, 0, 1, 2];
    let embed = |w: &Tensor, x: &Tensor| -> Result<Tensor> {
        let flat = x.reshape(&[x.shape()[0], 12])?;
        l2_normalize(&linear(&flat, w, None)?, 1, 1e-12)
    };
    let f0 = |x: &Tensor| embed(&ws[0], x);
    let f1 = |x: &Tensor| embed(&ws[1], x);
    let f2 = |x: &Tensor| embed(&ws[2], x);
    let ensemble: [EmbedFn; 3] = [&f0, &f1, &f2];
    for method in Method::ALL {
        let mut cfg = DefenseConfig::new(method);
        cfg.attack = PgdConfig::new(16.0 / 255.0, 2);
        let attack_on: &[EmbedFn] = if method.is_ensemble() {
            &ensemble
        } else {
            &ensemble[..1]
        };
        let ctx = StepContext {
            member: &f0,
            attack_on,
            proxies: &proxies,
            loss: ProxyAnchorConfig::default(),
            defense: &cfg,
        };
        let loss = step_loss(&ctx, &x, &labels, &mut Rng::new(3)).unwrap();
        let v = loss.item().unwrap();
        assert!(v.is_finite() && v > 0.0, "{method:?}: loss {v}");
        let g = loss.backward().unwrap();
        assert!(
            g.get(&ws[0]).is_some(),
            "{method:?}: no gradient for the member"
        );
        assert!(
            g.get(&proxies).is_some(),
            "{method:?}: no gradient for the proxies"
        );
        // Other members are attacked through, never trained by this member's loss.
        assert!(
            g.get(&ws[1]).is_none(),
            "{method:?}: gradient leaked into another member"
        );
    }
}
