//! `robust-dml experiment`: trains each chosen method on one dataset and backbone, evaluates it
//! clean and under PGD in both scenarios, sweeps PGD steps and eps, and writes the run
//! directory (config, metrics JSON, Table 1 as Markdown, HTML report). Resumable: a method
//! whose `report.json` exists is not redone, and a method interrupted mid-training resumes
//! from its last checkpoint.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::config::{Objective, PgdConfig};
use crate::data::Dataset;
use crate::dml::loss::ProxyAnchorConfig;
use crate::engine::Device;
use crate::error::{io_err, Error, Result};
use crate::nn::EmbeddingNet;
use crate::pipeline::evaluate::{
    embed_set, full_metrics, model_metrics, pca_2d, retrieval, rows_at, rows_at_each,
    scenario_metrics, spread_indices, template_metrics, voted_metrics, EvalContext, EvalSet,
};
use crate::pipeline::ranking::{run_ranking_suite, RankingPlan};
use crate::pipeline::report::{html_report, RunInfo};
use crate::pipeline::results::{
    worst_of, AttackRow, CurvePoint, MethodReport, ObjectivesReport, Projection, TransferReport,
};
use crate::pipeline::run_dir;
use crate::pipeline::sanity::{run_sanity, transfer_check};
use crate::pipeline::strength::{attack_set, AttackSource};
use crate::pipeline::tables::{
    failed_lines, objectives_markdown, ranking_markdown, ranking_tables, sanity_tables,
    strength_tables, table_markdown, transfer_markdown,
};
use crate::pipeline::train::{Run, TrainConfig, CHECKPOINT_FILE, LOG_FILE};
use crate::robust::defense::Method;
use crate::robust::ensemble::mean_embedding;

/// Most test samples drawn in the clean-versus-attacked projection.
const PROJECTION_SAMPLES: usize = 250;

/// How the evaluation attacks and sweeps are run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalPlan {
    pub attack: PgdConfig,
    /// PGD steps of the steps curve (at the attack's eps).
    pub steps_sweep: Vec<usize>,
    /// eps * 255 of the eps curve (at the attack's steps).
    pub eps_sweep: Vec<f32>,
    /// Test samples used for the curves and the projection (spread evenly over the test set,
    /// which the loaders order by class; 0 = all).
    pub curve_samples: usize,
    /// Test samples evaluated at all (spread evenly; 0 = the whole test set): bounds the cost
    /// of attacking large test sets in quick runs.
    #[serde(default)]
    pub max_test_samples: usize,
    pub batch_size: usize,
    pub seed: u64,
    /// The ranking-attack suite (docs/DESIGN.md, "The ranking-attack suite and ERS") on a subset of
    /// queries; absent = not run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ranking: Option<RankingPlan>,
    /// The objectives and transfer evaluations and their subsets.
    #[serde(default)]
    pub strength: StrengthPlan,
}

impl EvalPlan {
    /// The steps curve's attack at `steps`: the evaluation attack with its step size alpha
    /// kept, so PGD-k is the first k steps of the evaluation attack's path (as in the paper's
    /// iteration sweep). Scaling alpha as 2.5 eps / k instead made PGD-1 a full-eps FGSM step,
    /// which in the clustering scenario lowered R@1 more than PGD-10 did.
    pub fn attack_with_steps(&self, steps: usize) -> PgdConfig {
        PgdConfig {
            steps,
            restarts: 1,
            kind: crate::config::AttackKind::Pgd,
            ..self.attack
        }
    }

    /// The eps curve's attack at `eps`: the evaluation attack with alpha scaled in proportion
    /// (the same alpha / eps), so every point takes the same path relative to its ball.
    pub fn attack_with_eps(&self, eps: f32) -> PgdConfig {
        let alpha = if eps == self.attack.eps {
            self.attack.alpha
        } else if self.attack.eps == 0.0 {
            PgdConfig::new(eps, self.attack.steps).alpha
        } else {
            self.attack.alpha * (eps / self.attack.eps)
        };
        PgdConfig {
            eps,
            alpha,
            restarts: 1,
            kind: crate::config::AttackKind::Pgd,
            ..self.attack
        }
    }
}

/// Which extra attack-strength evaluations an experiment runs, on how many test images each
/// (spread over the test set; 0 = not run).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StrengthPlan {
    /// The evaluation attack with every objective (`Objective::ALL`); the embedding-shift row
    /// reuses the main attack, the other two are one attack run each.
    pub objective_samples: usize,
    /// Transfer rows from the undefended model for every defended method: one attack run on
    /// the undefended model and a forward pass of the target.
    pub transfer_samples: usize,
}

impl Default for StrengthPlan {
    fn default() -> Self {
        StrengthPlan {
            objective_samples: crate::config::OBJECTIVE_SAMPLES,
            transfer_samples: crate::config::TRANSFER_SAMPLES,
        }
    }
}

impl StrengthPlan {
    /// The quick preset's: 100 images each, to stay within its time budget.
    pub fn quick() -> Self {
        StrengthPlan {
            objective_samples: 100,
            transfer_samples: 100,
        }
    }
}

/// One experiment: the methods to train and how to train and evaluate them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExperimentConfig {
    pub dataset: String,
    pub methods: Vec<Method>,
    /// Training configuration; `defense.method` is replaced per method.
    pub train: TrainConfig,
    pub eval: EvalPlan,
}

impl ExperimentConfig {
    /// Refuses settings any of the methods could not train or evaluate with, before any work.
    pub fn validate(&self) -> Result<()> {
        for (i, method) in self.methods.iter().enumerate() {
            if self.methods[..i].contains(method) {
                return Err(Error::Config(format!(
                    "--methods lists {} twice; name each method once",
                    method.key()
                )));
            }
        }
        for &method in &self.methods {
            let mut t = self.train.clone();
            t.defense = t.defense.with_method(method);
            t.validate()?;
        }
        self.eval
            .attack
            .validate("--eval-eps", "--eval-steps")
            .map_err(Error::Config)
    }
}

fn write(path: &Path, text: &str) -> Result<()> {
    run_dir::write_atomic(path, text.as_bytes())
}

/// The files an experiment writes at its top level.
const TOP_FILES: &[&str] = &["config.json", "table.md", "metrics.json", "report.html"];

/// An experiment directory resumes only the same experiment: a different configuration is
/// refused (naming the file), unless `overwrite` is set, which deletes the old results.
pub fn claim_experiment_dir(cfg: &ExperimentConfig, out: &Path, overwrite: bool) -> Result<()> {
    let config_path = out.join("config.json");
    let Ok(text) = std::fs::read_to_string(&config_path) else {
        return Ok(());
    };
    // Methods may be added or left out: each has its own directory and report.
    let same = serde_json::from_str::<ExperimentConfig>(&text).is_ok_and(|old| {
        ExperimentConfig {
            methods: cfg.methods.clone(),
            ..old
        } == *cfg
    });
    if same {
        return Ok(());
    }
    if !overwrite {
        return Err(Error::Config(format!(
            "{} holds an experiment with other settings ({}); rerun it with the same flags to \
             resume it, pass --overwrite to replace it, or choose another --out",
            out.display(),
            config_path.display()
        )));
    }
    for name in TOP_FILES {
        remove_if_file(&out.join(name))?;
    }
    for method in Method::EVERY {
        let dir = out.join(method.key());
        for name in [CHECKPOINT_FILE, LOG_FILE, "report.json"] {
            remove_if_file(&dir.join(name))?;
        }
    }
    Ok(())
}

fn remove_if_file(path: &Path) -> Result<()> {
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.is_file()) {
        std::fs::remove_file(path).map_err(io_err(path))?;
    }
    Ok(())
}

fn json<T: Serialize>(v: &T) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}

/// Runs (or resumes) the experiment in `out`; returns the reports in method order.
pub fn run_experiment(
    cfg: &ExperimentConfig,
    dataset: &Dataset,
    device: &Device,
    out: &Path,
) -> Result<Vec<MethodReport>> {
    std::fs::create_dir_all(out).map_err(io_err(out))?;
    write(&out.join("config.json"), &json(cfg))?;
    let mut reports = Vec::new();
    for &method in &cfg.methods {
        let dir = out.join(method.key());
        let report_path = dir.join("report.json");
        if let Ok(text) = std::fs::read_to_string(&report_path) {
            if let Ok(r) = serde_json::from_str::<MethodReport>(&text) {
                eprintln!(
                    "{}: already done ({}), skipping",
                    method.label(),
                    report_path.display()
                );
                reports.push(r);
                continue;
            }
        }
        eprintln!("== {} ==", method.label());
        let start = Instant::now();
        let run = train_method(cfg, method, dataset, device, &dir)?;
        let train_seconds = start.elapsed().as_secs_f64();
        let source = transfer_source(cfg, method, dataset, device, out)?;
        let start = Instant::now();
        let mut report = evaluate_run_with(
            &run,
            dataset,
            &cfg.eval,
            device,
            source.as_ref().map(|r| (Method::None.label(), r)),
        )?;
        report.train_seconds = train_seconds;
        report.eval_seconds = start.elapsed().as_secs_f64();
        write(&report_path, &json(&report))?;
        eprintln!(
            "{}",
            table_markdown(std::slice::from_ref(&report), method.label())
        );
        if let Some(r) = &report.ranking {
            eprintln!("{}", ranking_markdown(method.label(), r));
        }
        if let Some(o) = &report.objectives {
            eprintln!("{}", objectives_markdown(method.label(), o));
        }
        if let Some(t) = &report.transfer {
            eprintln!("{}", transfer_markdown(method.label(), t));
        }
        for line in failed_lines(method.label(), &report.sanity) {
            eprintln!("{line}");
        }
        reports.push(report);
    }
    let title = format!("{} / {:?}", cfg.dataset, cfg.train.arch);
    let table = table_markdown(
        &reports,
        &format!(
            "Table 1 layout: {title}, PGD-{} at eps {:.1}/255",
            cfg.eval.attack.steps,
            cfg.eval.attack.eps * 255.0
        ),
    );
    write(
        &out.join("table.md"),
        &(table
            + &sanity_tables(&reports)
            + &strength_tables(&reports)
            + &ranking_tables(&reports)),
    )?;
    write(&out.join("metrics.json"), &json(&reports))?;
    let info = RunInfo {
        title: format!("robust-dml experiment: {title}"),
        settings: settings_rows(cfg, dataset, device, &reports),
        config_json: json(cfg),
    };
    let html = html_report(&reports, &info).map_err(Error::Config)?;
    write(&out.join("report.html"), &html)?;
    Ok(reports)
}

/// The report's settings table: what was run, on what, and how long it took.
fn settings_rows(
    cfg: &ExperimentConfig,
    dataset: &Dataset,
    device: &Device,
    reports: &[MethodReport],
) -> Vec<(String, String)> {
    let t = &cfg.train;
    let attack = |a: &PgdConfig| {
        format!(
            "PGD, embedding shift, eps {:.3} ({:.1}/255), {} steps, alpha {:.4}, start {}",
            a.eps,
            a.eps * 255.0,
            a.steps,
            a.alpha,
            if a.random_start {
                "uniform in the eps-ball".to_string()
            } else {
                format!("x + {} N(0, 1)", crate::config::PGD_START_NOISE)
            }
        )
    };
    let tested = reports.iter().map(|r| r.test_samples).max().unwrap_or(0);
    let curves = reports.iter().map(|r| r.curve_samples).max().unwrap_or(0);
    let steps = match t.max_steps_per_epoch {
        0 => "whole epochs".to_string(),
        s => format!("at most {s} steps an epoch (per member for EAT)"),
    };
    let total: f64 = reports
        .iter()
        .map(|r| r.train_seconds + r.eval_seconds)
        .sum();
    let device_name = match device {
        Device::Cpu => format!("CPU backend, {} threads", rayon::current_num_threads()),
        d => d.name(),
    };
    let times = reports
        .iter()
        .map(|r| format!("{} {:.0}+{:.0}", r.label, r.train_seconds, r.eval_seconds))
        .collect::<Vec<_>>()
        .join(", ");
    let row = |k: &str, v: String| (k.to_string(), v);
    vec![
        row(
            "dataset",
            format!(
                "{}: {} training images ({} classes), {} test images ({} classes)",
                dataset.name,
                dataset.train.len(),
                dataset.num_train_classes(),
                dataset.test.len(),
                dataset.num_test_classes()
            ),
        ),
        row(
            "evaluated",
            format!("{tested} test images in the table, {curves} per curve point and projection"),
        ),
        row(
            "model",
            format!(
                "{:?} at {}x{}, {}-d embedding, Proxy Anchor (alpha {}, delta {})",
                t.arch, t.image_size, t.image_size, t.embedding_dim, t.pa_alpha, t.pa_delta
            ),
        ),
        row(
            "training",
            format!(
                "{} epoch(s), {steps}, batch {}, AdamW lr {} (proxies x{}), weight decay {}, \
                 warm-up {} epochs, gradient clip {}",
                t.epochs,
                t.batch_size,
                t.lr,
                t.proxy_lr_mult,
                t.weight_decay,
                t.warmup_epochs,
                t.grad_clip
            ),
        ),
        row("training attack", attack(&t.defense.attack)),
        row(
            "defenses",
            format!(
                "EAT {} members, beta {}; TRADES lambda {}; Mix-Up Beta({a}, {a})",
                t.defense.ensemble_size,
                t.defense.eat_beta,
                t.defense.trades_lambda,
                a = t.defense.mixup_alpha
            ),
        ),
        row("evaluation attack", attack(&cfg.eval.attack)),
        row(
            "seeds",
            format!("training {}, evaluation {}", t.seed, cfg.eval.seed),
        ),
        row("device", device_name),
        row(
            "wall time",
            format!(
                "{:.1} min in all; per method, train+evaluation (s): {times}",
                total / 60.0
            ),
        ),
    ]
}

/// The undefended model of this experiment, when `method` is a defense, transfer rows are on
/// and its checkpoint exists (the undefended method trains first when it is in the list).
fn transfer_source(
    cfg: &ExperimentConfig,
    method: Method,
    dataset: &Dataset,
    device: &Device,
    out: &Path,
) -> Result<Option<Run>> {
    if method == Method::None || cfg.eval.strength.transfer_samples == 0 {
        return Ok(None);
    }
    let ckpt = out.join(Method::None.key()).join(CHECKPOINT_FILE);
    if !ckpt.exists() {
        eprintln!(
            "{}: no transfer row ({} does not exist: train the undefended method first)",
            method.label(),
            ckpt.display()
        );
        return Ok(None);
    }
    Run::load(&ckpt, dataset, device).map(Some)
}

/// Trains one method, resuming from its checkpoint when one exists.
fn train_method(
    cfg: &ExperimentConfig,
    method: Method,
    dataset: &Dataset,
    device: &Device,
    dir: &Path,
) -> Result<Run> {
    let mut tc = cfg.train.clone();
    tc.defense = tc.defense.with_method(method);
    let ckpt: PathBuf = dir.join(CHECKPOINT_FILE);
    let mut run = if ckpt.exists() {
        let run = Run::load(&ckpt, dataset, device)?;
        eprintln!(
            "resuming {} from {} (epoch {})",
            method.label(),
            ckpt.display(),
            run.epochs_done
        );
        run
    } else {
        Run::new(tc, dataset, device)?
    };
    run.train(dataset, dir, false)?;
    Ok(run)
}

/// Clean and attacked metrics, curves, members and projection of a trained run.
pub fn evaluate_run(
    run: &Run,
    dataset: &Dataset,
    plan: &EvalPlan,
    device: &Device,
) -> Result<MethodReport> {
    evaluate_run_with(run, dataset, plan, device, None)
}

/// [`evaluate_run`], plus the transfer row from `transfer_from` (its label and run) when the
/// plan asks for one.
pub fn evaluate_run_with(
    run: &Run,
    dataset: &Dataset,
    plan: &EvalPlan,
    device: &Device,
    transfer_from: Option<(&str, &Run)>,
) -> Result<MethodReport> {
    let set = EvalSet::of(dataset).capped(plan.max_test_samples);
    let nets = member_nets(run);
    let ctx = EvalContext::of_run(&run.cfg, &nets, &set, plan.batch_size, device);
    let all: Vec<usize> = (0..nets.len()).collect();
    let emb = embed_set(&ctx, Some((&plan.attack, &all, plan.seed)))?;
    let attacked = emb.attacked.as_ref().expect("attack requested");
    let method = run.cfg.defense.method;
    let mut report = MethodReport {
        method: method.key().into(),
        label: method.label().into(),
        ..Default::default()
    };
    score_main_attack(&ctx, &emb.clean, attacked, plan.seed, &mut report)?;
    // Curves and the projection on a subset spread over the test set.
    let picks = match plan.curve_samples {
        0 => (0..set.samples.len()).collect(),
        n => spread_indices(set.samples.len(), n),
    };
    let sub = set.subset(&picks);
    let dim = emb.dim;
    let sub_clean = rows_at_each(&emb.clean, &picks, dim);
    let sub_attacked = rows_at_each(attacked, &picks, dim);
    (report.steps_curve, report.eps_curve) =
        robustness_curves(&ctx.on(&sub), plan, &sub_clean, &sub_attacked)?;
    report.curve_samples = picks.len();
    report.test_samples = set.samples.len();
    report.attack_linf = emb.attack_linf;
    report.projection = Some(projection(&sub, &sub_clean, &sub_attacked, dim, dataset));
    let (probe, checks) = run_sanity(&ctx, &picks, &emb.clean, &plan.attack, plan.seed, &report)?;
    report.sanity = checks;
    report.sanity_probe = Some(probe);
    let whole = WholeEval {
        run,
        ctx,
        clean: &emb.clean,
        attacked,
        plan,
    };
    if plan.strength.objective_samples > 0 {
        report.objectives = Some(objectives_on_subset(&whole)?);
    }
    if let (Some((label, source)), true) = (transfer_from, plan.strength.transfer_samples > 0) {
        let t = transfer_on_subset(&whole, label, source)?;
        report.sanity.push(transfer_check(&t));
        report.transfer = Some(t);
    }
    if let Some(rp) = &plan.ranking {
        report.ranking = Some(run_ranking_suite(&ctx, rp, plan.seed)?);
    }
    Ok(report)
}

fn member_nets(run: &Run) -> Vec<&EmbeddingNet> {
    run.members.iter().map(|m| &m.net).collect()
}

/// The clean and attacked rows of `report` from the whole set's embeddings; for an ensemble
/// also the mean-embedding rows and each member alone.
fn score_main_attack(
    ctx: &EvalContext,
    clean: &[Vec<f32>],
    attacked: &[Vec<f32>],
    seed: u64,
    report: &mut MethodReport,
) -> Result<()> {
    let (set, dim, device) = (ctx.set, ctx.dim(), ctx.device);
    if let ([clean], [attacked]) = (clean, attacked) {
        report.clean = full_metrics(clean, set, dim, device, seed)?;
        report.pgd = full_metrics(attacked, set, dim, device, seed)?;
        report.pgd_template = template_metrics(attacked, clean, set, dim, device)?;
        return Ok(());
    }
    report.clean = voted_metrics(clean, set, dim, device, seed)?;
    report.pgd = voted_metrics(attacked, set, dim, device, seed)?;
    let mean_clean = mean_embedding(clean, dim);
    let mean_adv = mean_embedding(attacked, dim);
    report.pgd_template = template_metrics(&mean_adv, &mean_clean, set, dim, device)?;
    report.mean_embedding = Some((
        full_metrics(&mean_clean, set, dim, device, seed)?,
        full_metrics(&mean_adv, set, dim, device, seed)?,
    ));
    for (clean, adv) in clean.iter().zip(attacked).take(ctx.nets.len()) {
        let (c, _, _) = retrieval(clean, clean, set, dim, true, device)?;
        let (a, _, _) = retrieval(adv, adv, set, dim, true, device)?;
        report.members.push((c[0], a[0]));
    }
    Ok(())
}

/// Recall@1 and F1 against PGD steps and against eps on the context's set (a subset), whose
/// clean and main-attack embeddings are `clean` and `attacked`.
fn robustness_curves(
    ctx: &EvalContext,
    plan: &EvalPlan,
    clean: &[Vec<f32>],
    attacked: &[Vec<f32>],
) -> Result<(Vec<CurvePoint>, Vec<CurvePoint>)> {
    let (set, dim, device, seed) = (ctx.set, ctx.dim(), ctx.device, plan.seed);
    let all: Vec<usize> = (0..ctx.nets.len()).collect();
    // Both curves start at the clean point (0 steps, eps 0): the same images, not attacked.
    let clean_point = model_metrics(clean, set, dim, device, seed)?;
    let curve_point = |cfg: PgdConfig, x: f64| -> Result<CurvePoint> {
        let m = if cfg.steps == 0 || cfg.eps == 0.0 {
            clean_point.clone()
        } else if cfg == plan.attack {
            // The evaluation attack itself is a point of both curves: reuse its embeddings
            // (PGD treats samples independently, eval-mode BatchNorm included).
            model_metrics(attacked, set, dim, device, seed)?
        } else {
            let e = embed_set(ctx, Some((&cfg, &all, seed)))?;
            let adv = e.attacked.expect("attack requested");
            model_metrics(&adv, set, dim, device, seed)?
        };
        Ok(CurvePoint {
            x,
            recall1: m.recall[0],
            f1: m.f1,
        })
    };
    let steps = plan
        .steps_sweep
        .iter()
        .map(|&steps| curve_point(plan.attack_with_steps(steps), steps as f64))
        .collect::<Result<_>>()?;
    let eps = plan
        .eps_sweep
        .iter()
        .map(|&e255| curve_point(plan.attack_with_eps(e255 / 255.0), e255 as f64))
        .collect::<Result<_>>()?;
    Ok((steps, eps))
}

/// Figure 1: the members' mean embeddings of `set` clean and attacked, projected to 2-D, on at
/// most `PROJECTION_SAMPLES` images (a line per image: a few hundred stay readable).
fn projection(
    set: &EvalSet,
    clean: &[Vec<f32>],
    attacked: &[Vec<f32>],
    dim: usize,
    dataset: &Dataset,
) -> Projection {
    let shown = spread_indices(set.samples.len(), PROJECTION_SAMPLES);
    let (clean2d, adv2d) = pca_2d(
        &rows_at(&mean_embedding(clean, dim), &shown, dim),
        &rows_at(&mean_embedding(attacked, dim), &shown, dim),
        dim,
    );
    Projection {
        clean: clean2d,
        attacked: adv2d,
        labels: shown.iter().map(|&i| set.labels[i]).collect(),
        class_names: dataset.test_classes.clone(),
    }
}

/// What the objectives and transfer rows reuse from the main evaluation.
struct WholeEval<'a> {
    run: &'a Run,
    /// The run's nets on the whole (capped) test set.
    ctx: EvalContext<'a>,
    clean: &'a [Vec<f32>],
    /// The main attack's embeddings of every image of the set.
    attacked: &'a [Vec<f32>],
    plan: &'a EvalPlan,
}

impl WholeEval<'_> {
    fn dim(&self) -> usize {
        self.run.cfg.embedding_dim
    }
    /// `n` images spread over the set: the subset and its rows of `matrices`.
    fn subset(&self, n: usize) -> (Vec<usize>, EvalSet) {
        let picks = spread_indices(self.ctx.set.samples.len(), n);
        let sub = self.ctx.set.subset(&picks);
        (picks, sub)
    }
    fn loss(&self) -> ProxyAnchorConfig {
        loss_of(self.run)
    }
    /// The main attack's row on the subset (its images were attacked with `plan.attack`).
    fn main_row(&self, picks: &[usize], sub: &EvalSet, clean: &[Vec<f32>]) -> Result<AttackRow> {
        let attacked = rows_at_each(self.attacked, picks, self.dim());
        self.scored_row(&self.plan.attack, sub, clean, &attacked, 0.0)
    }
    /// `cfg` on the subset, made on `source` and evaluated on this run's nets.
    fn attacked_row(
        &self,
        source: &AttackSource,
        sub: &EvalSet,
        clean: &[Vec<f32>],
        cfg: &PgdConfig,
    ) -> Result<AttackRow> {
        let r = attack_set(&self.ctx.on(sub), source, cfg, self.plan.seed)?;
        self.scored_row(cfg, sub, clean, &r.attacked, r.seconds)
    }
    /// The row of attack `cfg` from the attacked embeddings of `sub` (both scenarios).
    fn scored_row(
        &self,
        cfg: &PgdConfig,
        sub: &EvalSet,
        clean: &[Vec<f32>],
        attacked: &[Vec<f32>],
        seconds: f64,
    ) -> Result<AttackRow> {
        let device = self.ctx.device;
        let scenarios = scenario_metrics(clean, attacked, sub, self.dim(), device, self.plan.seed)?;
        Ok(AttackRow::of(cfg, scenarios, seconds))
    }
}

fn loss_of(run: &Run) -> ProxyAnchorConfig {
    ProxyAnchorConfig {
        alpha: run.cfg.pa_alpha,
        delta: run.cfg.pa_delta,
    }
}

/// The evaluation attack with every objective on `objective_samples` images; the main
/// attack's objective reuses its embeddings.
fn objectives_on_subset(w: &WholeEval) -> Result<ObjectivesReport> {
    let (picks, sub) = w.subset(w.plan.strength.objective_samples);
    let clean = rows_at_each(w.clean, &picks, w.dim());
    let source = AttackSource {
        nets: w.ctx.nets,
        clean: &clean,
        loss: w.loss(),
    };
    let mut rows = Vec::new();
    for objective in Objective::ALL {
        rows.push(if objective == w.plan.attack.objective {
            w.main_row(&picks, &sub, &clean)?
        } else {
            let cfg = PgdConfig {
                objective,
                ..w.plan.attack
            };
            w.attacked_row(&source, &sub, &clean, &cfg)?
        });
    }
    Ok(ObjectivesReport {
        samples: picks.len(),
        worst: worst_of(&rows),
        rows,
    })
}

/// The evaluation attack made on `source_run` and evaluated on this run, on
/// `transfer_samples` images, beside this run's white-box row on them.
fn transfer_on_subset(w: &WholeEval, label: &str, source_run: &Run) -> Result<TransferReport> {
    let (picks, sub) = w.subset(w.plan.strength.transfer_samples);
    let clean = rows_at_each(w.clean, &picks, w.dim());
    let source_nets = member_nets(source_run);
    // The label-aware objectives need the source's clean embeddings; the shift does not.
    let source_clean = if w.plan.attack.objective.needs_labels() {
        let batch = w.plan.batch_size;
        let source_ctx =
            EvalContext::of_run(&source_run.cfg, &source_nets, &sub, batch, w.ctx.device);
        embed_set(&source_ctx, None)?.clean
    } else {
        Vec::new()
    };
    let source = AttackSource {
        nets: &source_nets,
        clean: &source_clean,
        loss: loss_of(source_run),
    };
    Ok(TransferReport {
        source: label.to_string(),
        samples: picks.len(),
        transfer: w.attacked_row(&source, &sub, &clean, &w.plan.attack)?,
        white_box: w.main_row(&picks, &sub, &clean)?,
    })
}
