//! Sanity checks of an evaluation attack (Carlini et al. 2019, "On Evaluating Adversarial
//! Robustness"): evidence, with numbers, that the attack was strong enough for its figures to
//! mean something. Each check passes or fails; failures are printed in the terminal summary.
//!
//! The probe (one batch of test images) measures:
//! - eps 0 is the identity, and at eps > 0 the inputs move: max |x_adv - x| reaches eps (a model
//!   that masks its gradients, e.g. by rounding its input, leaves PGD where it started);
//! - the input gradient is not zero almost everywhere;
//! - PGD with R random restarts (per image, the run with the largest objective) reaches at least
//!   the objective of the single run; if it does but Recall@1 rises, that is reported;
//! - APGD with `PROBE_APGD_STEPS` iterations (at least the attack's steps) reaches at least the
//!   objective of the single PGD run and of a PGD run with as many iterations; likewise.
//!
//! From the evaluation's curves and rows:
//! - Recall@1 does not increase with PGD steps or with eps, beyond 2 binomial standard errors;
//! - for ensembles, the mean-embedding and voting outputs under attack: the weaker attack's
//!   figure is named as an upper bound;
//! - with a transfer row: white-box Recall@1 is at most the transfer Recall@1 plus 2 binomial
//!   standard errors.

use crate::config::{AttackKind, PgdConfig};
use crate::engine::ops::elementwise::{add, square, sub};
use crate::engine::ops::reduce::sum;
use crate::engine::{no_grad, Rng, Tensor};
use crate::error::Result;
use crate::pipeline::evaluate::{eval_fns, EvalContext};
use crate::pipeline::results::{
    AttackProbe, CurvePoint, MethodReport, SanityCheck, TransferReport,
};
use crate::robust::attack::apgd::apgd;
use crate::robust::attack::{
    attack, per_image_objective, pgd_restarts, start_point, EmbedFn, Goal,
};
use crate::robust::ensemble::mean_embedding;

/// Random restarts the probe compares with the single PGD run.
pub const PROBE_RESTARTS: usize = 3;
/// Images of the probe batch (the first of the curve images): enough for its checks, which
/// compare runs on the same images; per iteration, each of its runs (single, eps 0, restarts,
/// APGD and its PGD peer) costs a thirtieth of the evaluation attack on 2,000 images.
pub const PROBE_IMAGES: usize = 64;
/// Iterations of the probe's APGD run (and of the PGD run it is compared with at equal
/// iterations), when the attack itself has fewer. APGD halves its step at checkpoints placed at
/// 22%, 41%, 57%, ... of its iterations; at 10 iterations that is every iteration from the fifth
/// on, too soon for its momentum to pay. Measured (64 test images, mean embedding shift, APGD
/// against PGD at equal iterations): on the Fashion-MNIST protocol's undefended model 0.180
/// against 0.204 at 10, 0.244 against 0.226 at 20, 0.306 against 0.239 at 50; on the quick
/// preset's undefended model (16 training steps, nearly linear) 0.0460 against 0.0474 at 20,
/// 0.0504 against 0.0487 at 30, 0.0529 against 0.0497 at 50.
pub const PROBE_APGD_STEPS: usize = 50;
/// A gradient with more exactly-zero entries than this is masked.
pub const MAX_ZERO_GRADIENT_FRACTION: f64 = 0.5;

/// Scores attacked embeddings (host, [B, D]) as a Recall@1.
pub type Recall1Fn<'a> = dyn Fn(&Tensor) -> Result<f64> + 'a;

/// Attacks one batch `x` of `members` with `cfg` (embedding shift), once and with restarts.
/// `recall1` maps attacked embeddings (the members' mean, host, [B, D]) to a Recall@1.
pub fn probe_attack(
    members: &[EmbedFn],
    x: &Tensor,
    cfg: &PgdConfig,
    restarts: usize,
    seed: u64,
    recall1: Option<&Recall1Fn>,
) -> Result<AttackProbe> {
    let goal = Goal::EmbeddingShift;
    let max_move = |a: &Tensor| -> Result<f32> {
        let (a, b) = (a.to_vec()?, x.to_vec()?);
        Ok(a.iter()
            .zip(&b)
            .map(|(p, q)| (p - q).abs())
            .fold(0.0, f32::max))
    };
    let t0 = std::time::Instant::now();
    let single = attack(members, x, cfg, &goal, &mut Rng::new(seed))?;
    let seconds_single = t0.elapsed().as_secs_f64();
    let zero = PgdConfig { eps: 0.0, ..*cfg };
    let at_zero = attack(members, x, &zero, &goal, &mut Rng::new(seed))?;
    let t1 = std::time::Instant::now();
    let (best, best_obj) = pgd_restarts(members, x, cfg, &goal, restarts, &mut Rng::new(seed + 1))?;
    let seconds_restarts = t1.elapsed().as_secs_f64();
    let single_obj = per_image_objective(members, x, &single, &goal)?;
    let apgd_steps = PROBE_APGD_STEPS.max(cfg.steps);
    let equal = PgdConfig {
        steps: apgd_steps,
        alpha: PgdConfig::new(cfg.eps, apgd_steps).alpha,
        restarts: 1,
        kind: AttackKind::Pgd,
        ..*cfg
    };
    let t2 = std::time::Instant::now();
    let apgd_cfg = PgdConfig {
        kind: AttackKind::Apgd,
        ..equal
    };
    let (apgd_adv, apgd_obj) = apgd(members, x, &apgd_cfg, &goal, &mut Rng::new(seed))?;
    let seconds_apgd = t2.elapsed().as_secs_f64();
    let t3 = std::time::Instant::now();
    let (equal_obj, seconds_pgd_equal) = if apgd_steps == cfg.steps {
        (single_obj.clone(), seconds_single)
    } else {
        let adv = attack(members, x, &equal, &goal, &mut Rng::new(seed))?;
        let obj = per_image_objective(members, x, &adv, &goal)?;
        (obj, t3.elapsed().as_secs_f64())
    };
    let mean = |v: &[f32]| v.iter().map(|&s| s as f64).sum::<f64>() / v.len().max(1) as f64;
    let (r_single, r_restarts, r_apgd) = match recall1 {
        Some(f) => (Some(f(&single)?), Some(f(&best)?), Some(f(&apgd_adv)?)),
        None => (None, None, None),
    };
    Ok(AttackProbe {
        images: x.shape().first().copied().unwrap_or(0),
        eps: cfg.eps,
        max_move: max_move(&single)?,
        max_move_at_eps0: max_move(&at_zero)?,
        zero_gradient_fraction: zero_gradient_fraction(members, x, cfg, seed)?,
        objective_single: mean(&single_obj),
        objective_restarts: mean(&best_obj),
        restarts,
        recall1_single: r_single,
        recall1_restarts: r_restarts,
        seconds_single,
        seconds_restarts,
        apgd_steps,
        objective_apgd: mean(&apgd_obj),
        objective_pgd_equal: mean(&equal_obj),
        seconds_pgd_equal,
        recall1_apgd: r_apgd,
        seconds_apgd,
    })
}

/// The fraction of exactly-zero entries of d(embedding shift)/dx at the attack's start point.
fn zero_gradient_fraction(
    members: &[EmbedFn],
    x: &Tensor,
    cfg: &PgdConfig,
    seed: u64,
) -> Result<f64> {
    let start = no_grad(|| start_point(x, cfg, &mut Rng::new(seed)))?;
    let var = start.var();
    let mut total: Option<Tensor> = None;
    for m in members {
        let clean = no_grad(|| m(x))?;
        let term = sum(&square(&sub(&m(&var)?, &clean)?)?)?;
        total = Some(match total {
            Some(t) => add(&t, &term)?,
            None => term,
        });
    }
    let Some(total) = total else {
        return Ok(1.0);
    };
    let grads = total.backward()?;
    let Some(g) = grads.get(&var) else {
        return Ok(1.0);
    };
    let g = g.to_vec()?;
    Ok(g.iter().filter(|&&v| v == 0.0).count() as f64 / g.len().max(1) as f64)
}

/// The probe's Recall@1 under the single run and under a stronger run, and a remark when the
/// stronger run reached the higher objective yet raised Recall@1 (empty without Recall@1s).
fn probe_recall_note(single: Option<f64>, stronger: Option<f64>, objective_ok: bool) -> String {
    let (Some(a), Some(b)) = (single, stronger) else {
        return String::new();
    };
    let mut note = format!("; probe R@1 {a:.2} -> {b:.2}");
    if objective_ok && b > a {
        note += " (the higher objective raised R@1: the embedding shift is only a proxy)";
    }
    note
}

/// The checks of one method from its probe and its evaluation report.
pub fn sanity_checks(
    probe: &AttackProbe,
    report: &MethodReport,
    curve_n: usize,
) -> Vec<SanityCheck> {
    let mut checks = Vec::new();
    let mut check = |name: &str, passed: bool, detail: String| {
        checks.push(SanityCheck {
            name: name.into(),
            passed,
            detail,
        })
    };
    check(
        "eps 0 is the identity",
        probe.max_move_at_eps0 == 0.0,
        format!("max |x_adv - x| = {:.2e} at eps 0", probe.max_move_at_eps0),
    );
    check(
        "inputs reach eps",
        probe.max_move >= probe.eps * (1.0 - 1e-4),
        format!(
            "max |x_adv - x| = {:.4} for eps {:.4} ({} images)",
            probe.max_move, probe.eps, probe.images
        ),
    );
    check(
        "gradients flow",
        probe.zero_gradient_fraction <= MAX_ZERO_GRADIENT_FRACTION,
        format!(
            "{:.1}% of input-gradient entries are exactly 0 (limit {:.0}%)",
            100.0 * probe.zero_gradient_fraction,
            100.0 * MAX_ZERO_GRADIENT_FRACTION
        ),
    );
    let restarts_ok = probe.objective_restarts >= probe.objective_single;
    let mut detail = format!(
        "mean objective {:.5} with {} random restarts ({:.1} s) vs {:.5} for one run ({:.1} s)",
        probe.objective_restarts,
        probe.restarts,
        probe.seconds_restarts,
        probe.objective_single,
        probe.seconds_single
    );
    detail += &probe_recall_note(probe.recall1_single, probe.recall1_restarts, restarts_ok);
    check("restarts reach the single run", restarts_ok, detail);
    let apgd_ok = probe.objective_apgd >= probe.objective_single
        && probe.objective_apgd >= probe.objective_pgd_equal;
    let mut detail = format!(
        "mean objective {:.5} with APGD-{} ({:.1} s) vs {:.5} for the single PGD run and {:.5} \
         for PGD-{} (equal iterations, {:.1} s)",
        probe.objective_apgd,
        probe.apgd_steps,
        probe.seconds_apgd,
        probe.objective_single,
        probe.objective_pgd_equal,
        probe.apgd_steps,
        probe.seconds_pgd_equal
    );
    detail += &probe_recall_note(probe.recall1_single, probe.recall1_apgd, apgd_ok);
    check("APGD reaches PGD", apgd_ok, detail);
    for (name, curve) in [
        ("R@1 falls with steps", &report.steps_curve),
        ("R@1 falls with eps", &report.eps_curve),
    ] {
        let (passed, detail) = monotone(curve, curve_n);
        check(name, passed, detail);
    }
    if let Some((_, mean_adv)) = &report.mean_embedding {
        let (voted, mean) = (report.pgd.recall[0], mean_adv.recall[0]);
        let weaker = if voted >= mean {
            format!("voting's {voted:.2}")
        } else {
            format!("the mean embedding's {mean:.2}")
        };
        check(
            "ensemble outputs both attacked",
            true,
            format!(
                "attacked R@1: voting {voted:.2}, mean embedding {mean:.2}; the attack sums the \
                 members' objectives (eq. 10), so the weaker figure, {weaker}, is only an upper \
                 bound"
            ),
        );
    }
    checks
}

/// White-box Recall@1 at most the transfer Recall@1 plus two binomial standard errors on the
/// transfer's images: a transfer attack stronger than the white-box one means the white-box
/// attack failed on the target (gradient masking, a weak optimiser).
pub fn transfer_check(t: &TransferReport) -> SanityCheck {
    let (white, transfer) = (
        t.white_box.clustering.recall[0],
        t.transfer.clustering.recall[0],
    );
    let p = (transfer / 100.0).clamp(0.0, 1.0);
    let allowance = 200.0 * (p * (1.0 - p) / t.samples.max(1) as f64).sqrt() + 1e-9;
    SanityCheck {
        name: "white-box at least as strong as transfer".into(),
        passed: white <= transfer + allowance,
        detail: format!(
            "R@1 white-box {white:.2} vs transfer from {} {transfer:.2} (allowance {allowance:.2}, \
             {} images; template R@1 {:.2} vs {:.2})",
            t.source, t.samples, t.white_box.template.recall[0], t.transfer.template.recall[0]
        ),
    }
}

/// Recall@1 never rises between consecutive curve points by more than two binomial standard
/// errors on `n` samples.
fn monotone(curve: &[CurvePoint], n: usize) -> (bool, String) {
    let mut worst: Option<(f64, f64, f64, f64)> = None;
    for w in curve.windows(2) {
        let (a, b) = (w[0].recall1, w[1].recall1);
        let p = (a / 100.0).clamp(0.0, 1.0);
        let allowance = 200.0 * (p * (1.0 - p) / n.max(1) as f64).sqrt() + 1e-9;
        if b - a > allowance && worst.is_none_or(|(_, _, rise, _)| b - a > rise) {
            worst = Some((w[0].x, w[1].x, b - a, allowance));
        }
    }
    let values: Vec<String> = curve
        .iter()
        .map(|p| format!("{}: {:.2}", p.x, p.recall1))
        .collect();
    match worst {
        None => (
            true,
            format!(
                "R@1 {} (no rise beyond 2 standard errors)",
                values.join(", ")
            ),
        ),
        Some((x0, x1, rise, allow)) => (
            false,
            format!(
                "R@1 rose by {rise:.2} from {x0} to {x1} (allowance {allow:.2}): {}",
                values.join(", ")
            ),
        ),
    }
}

/// Probes `cfg`'s attack on the first batch of `picks` (indices into the context's set) and
/// returns the probe and every check for `report`. `clean` holds the members' clean embeddings
/// of the whole set.
pub fn run_sanity(
    ctx: &EvalContext,
    picks: &[usize],
    clean: &[Vec<f32>],
    cfg: &PgdConfig,
    seed: u64,
    report: &MethodReport,
) -> Result<(AttackProbe, Vec<SanityCheck>)> {
    let (set, dim) = (ctx.set, ctx.dim());
    let probe_rows: Vec<usize> = picks
        .iter()
        .copied()
        .take(PROBE_IMAGES.min(ctx.batch_size).max(1))
        .collect();
    let sub = set.subset(&probe_rows);
    // One batch of the probe's rows, loaded on this thread.
    let probe = EvalContext {
        batch_size: probe_rows.len().max(1),
        workers: 0,
        ..ctx.on(&sub)
    };
    let Some(batch) = probe.loader()?.epoch(0).next() else {
        return Ok((AttackProbe::default(), Vec::new()));
    };
    let x = batch.images_tensor(ctx.device)?;
    let frozen = ctx.frozen()?;
    let fns = eval_fns(&frozen);
    let members: Vec<EmbedFn> = fns.iter().map(|f| f.as_ref() as EmbedFn).collect();
    let gallery = match clean {
        [single] => single.clone(),
        many => mean_embedding(many, dim),
    };
    let rows: Vec<usize> = batch.indices.iter().map(|&k| probe_rows[k]).collect();
    let recall1 = |adv: &Tensor| -> Result<f64> {
        let embs: Vec<Vec<f32>> = no_grad(|| {
            fns.iter()
                .map(|f| f(adv).and_then(|e| e.to_vec()))
                .collect::<crate::engine::Result<_>>()
        })?;
        let q = match embs.as_slice() {
            [single] => single.clone(),
            many => mean_embedding(many, dim),
        };
        Ok(recall1_against(&q, &rows, &gallery, &set.labels, dim))
    };
    let probe = probe_attack(&members, &x, cfg, PROBE_RESTARTS, seed, Some(&recall1))?;
    let checks = sanity_checks(&probe, report, picks.len());
    Ok((probe, checks))
}

/// Recall@1 (%) of query rows (set indices `rows`) against the clean gallery, each query's own
/// clean copy dropped.
fn recall1_against(
    q: &[f32],
    rows: &[usize],
    gallery: &[f32],
    labels: &[usize],
    dim: usize,
) -> f64 {
    let hits = rows
        .iter()
        .enumerate()
        .filter(|&(i, &me)| {
            let qi = &q[i * dim..(i + 1) * dim];
            let best = gallery
                .chunks(dim)
                .enumerate()
                .filter(|&(j, _)| j != me)
                .map(|(j, g)| (qi.iter().zip(g).map(|(a, b)| a * b).sum::<f32>(), j))
                .max_by(|a, b| a.0.total_cmp(&b.0));
            best.is_some_and(|(_, j)| labels[j] == labels[me])
        })
        .count();
    100.0 * hits as f64 / rows.len().max(1) as f64
}
