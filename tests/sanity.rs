//! The attack sanity checks flag a model that masks its gradients (an input-rounding layer
//! whose backward is zero, so PGD never leaves its start point) and pass an honest one; the
//! restarts keep, per image, the run with the largest objective.

use robust_dml::config::PgdConfig;
use robust_dml::engine::ops::elementwise::zeros_like;
use robust_dml::engine::tape::Backward;
use robust_dml::engine::testing::gpu_or_skip;
use robust_dml::engine::{Device, Result, Rng, Tensor};
use robust_dml::pipeline::results::{CurvePoint, MethodReport};
use robust_dml::pipeline::sanity::{probe_attack, sanity_checks, PROBE_APGD_STEPS};
use robust_dml::pipeline::tables::failed_lines;
use robust_dml::robust::attack::{attack, EmbedFn, Goal};
use robust_dml::robust::attack::{per_image_objective, pgd_restarts};

mod common;
use common::Tiny;

/// The gradient-masking layer's backward: zero, whatever comes in.
struct ZeroBackward;

impl Backward for ZeroBackward {
    fn name(&self) -> &'static str {
        "round_input"
    }
    fn backward(&self, inputs: &[Tensor], _: &Tensor, _: &Tensor) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(zeros_like(&inputs[0])?)])
    }
}

/// Rounds the input to 8 grey levels; its recorded backward is zero (gradient masking).
fn round_input(x: &Tensor) -> Result<Tensor> {
    let q: Vec<f32> = x
        .to_vec()?
        .iter()
        .map(|v| (v * 8.0).round() / 8.0)
        .collect();
    Ok(Tensor::from_vec(q, x.shape(), &x.device())?.record(ZeroBackward, &[x]))
}

fn images(d: &Device) -> Tensor {
    Tensor::rand_uniform(&[6, 3, 6, 5], 0.0, 1.0, &mut Rng::new(2), d).unwrap()
}

fn curve(values: &[f64]) -> Vec<CurvePoint> {
    values
        .iter()
        .enumerate()
        .map(|(i, &r)| CurvePoint {
            x: i as f64,
            recall1: r,
            f1: 0.0,
        })
        .collect()
}

fn check_flags_masking(d: &Device) {
    let m = Tiny::new(1, d);
    let honest = |x: &Tensor| m.embed(x);
    let masked = |x: &Tensor| m.embed(&round_input(x)?);
    let x = images(d);
    let cfg = PgdConfig::new(8.0 / 255.0, 10);
    let report = MethodReport {
        steps_curve: curve(&[80.0, 60.0, 50.0]),
        eps_curve: curve(&[80.0, 70.0, 40.0]),
        ..Default::default()
    };
    let failed = |f: EmbedFn| {
        let probe = probe_attack(&[f], &x, &cfg, 2, 5, None).unwrap();
        // APGD gets room for its step schedule, and its equal-iteration PGD peer is run too.
        assert_eq!(probe.apgd_steps, PROBE_APGD_STEPS.max(cfg.steps));
        let checks = sanity_checks(&probe, &report, 100);
        eprintln!("{probe:?}\n{checks:#?}");
        checks
            .iter()
            .filter(|c| !c.passed)
            .map(|c| c.name.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        failed(&honest),
        Vec::<String>::new(),
        "an honest model failed"
    );
    let masked_fails = failed(&masked);
    for name in ["inputs reach eps", "gradients flow"] {
        assert!(
            masked_fails.iter().any(|f| f == name),
            "gradient masking not flagged by '{name}': failures {masked_fails:?}"
        );
    }
}

#[test]
fn sanity_flags_gradient_masking_cpu() {
    check_flags_masking(&Device::Cpu);
}

#[test]
fn sanity_flags_gradient_masking_gpu() {
    if let Some(gpu) = gpu_or_skip("sanity_flags_gradient_masking_gpu") {
        check_flags_masking(&gpu);
    }
}

#[test]
fn rising_recall_is_flagged_and_printed() {
    let d = Device::Cpu;
    let m = Tiny::new(3, &d);
    let f = |x: &Tensor| m.embed(x);
    let x = images(&d);
    let cfg = PgdConfig::new(8.0 / 255.0, 5);
    let probe = probe_attack(&[&f], &x, &cfg, 2, 1, None).unwrap();
    // 20 points up between 2 and 5 steps on 1,000 samples: far beyond 2 standard errors.
    let report = MethodReport {
        steps_curve: curve(&[80.0, 60.0, 80.0]),
        ..Default::default()
    };
    let checks = sanity_checks(&probe, &report, 1000);
    let lines = failed_lines("PAL", &checks);
    assert!(
        lines.iter().any(|l| l.contains("R@1 falls with steps")),
        "{lines:?}"
    );
    // A 1-point wobble on 100 samples is within the allowance (2 x 4 points).
    let report = MethodReport {
        steps_curve: curve(&[80.0, 60.0, 61.0]),
        ..Default::default()
    };
    let checks = sanity_checks(&probe, &report, 100);
    assert!(failed_lines("PAL", &checks)
        .iter()
        .all(|l| !l.contains("steps")));
}

#[test]
fn restarts_keep_the_best_run_per_image() {
    let d = Device::Cpu;
    let m = Tiny::new(4, &d);
    let f = |x: &Tensor| m.embed(x);
    let members: [EmbedFn; 1] = [&f];
    let x = images(&d);
    let cfg = PgdConfig::new(8.0 / 255.0, 5);
    let goal = Goal::EmbeddingShift;
    let (best, kept) = pgd_restarts(&members, &x, &cfg, &goal, 3, &mut Rng::new(9)).unwrap();
    // The same three runs by hand: each image's kept objective is the largest of the three.
    let mut rng = Rng::new(9);
    let random = PgdConfig {
        random_start: true,
        restarts: 1,
        ..cfg
    };
    let runs: Vec<Vec<f32>> = (0..3)
        .map(|_| {
            let adv = attack(&members, &x, &random, &goal, &mut rng).unwrap();
            per_image_objective(&members, &x, &adv, &goal).unwrap()
        })
        .collect();
    for i in 0..kept.len() {
        let want = runs.iter().map(|r| r[i]).fold(f32::MIN, f32::max);
        assert_eq!(kept[i], want, "image {i}");
    }
    // attack() with cfg.restarts runs the same restarts.
    let via_pgd = PgdConfig { restarts: 3, ..cfg };
    let adv = attack(&members, &x, &via_pgd, &goal, &mut Rng::new(9)).unwrap();
    assert_eq!(adv.to_vec().unwrap(), best.to_vec().unwrap());
    let again = per_image_objective(&members, &x, &best, &goal).unwrap();
    for (a, b) in again.iter().zip(&kept) {
        assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "{a} vs {b}");
    }
}

#[test]
fn apgd_must_reach_pgd_at_equal_iterations_too() {
    use robust_dml::pipeline::results::AttackProbe;
    let verdict = |apgd: f64| {
        let probe = AttackProbe {
            objective_single: 0.20,
            objective_pgd_equal: 0.25,
            objective_apgd: apgd,
            apgd_steps: 20,
            ..Default::default()
        };
        let checks = sanity_checks(&probe, &MethodReport::default(), 100);
        let c = checks
            .iter()
            .find(|c| c.name == "APGD reaches PGD")
            .unwrap();
        (c.passed, c.detail.clone())
    };
    // Above the single PGD-10 run but below PGD-20: a weaker optimiser, flagged.
    let (passed, detail) = verdict(0.22);
    assert!(!passed, "{detail}");
    assert!(
        detail.contains("APGD-20") && detail.contains("PGD-20"),
        "{detail}"
    );
    assert!(verdict(0.26).0);
}
