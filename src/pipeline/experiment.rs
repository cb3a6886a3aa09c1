//! `robust-dml experiment`: trains each chosen method once per seed on one dataset and
//! backbone, evaluates it clean and under PGD in both scenarios, sweeps PGD steps and eps, and
//! merges every finished cell into the run directory's tables (Table 1 as Markdown, metrics
//! JSON, HTML report). Resumable: a cell whose `report.json` exists is not redone, and a cell
//! interrupted mid-training resumes from its last checkpoint. Several processes may fill one
//! experiment's cells at once ([`crate::pipeline::cells`]).

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::config::{AttackChannels, Objective, PgdConfig};
use crate::data::Dataset;
use crate::dml::loss::ProxyAnchorConfig;
use crate::engine::Device;
use crate::error::{Error, Result};
use crate::nn::EmbeddingNet;
use crate::pipeline::cells::{
    claim_cells, claim_settings, finished_report, merge_cells, read_settings, with_merge_lock,
    Cell, ClaimedCell, DataSummary, Merged, Settings, REPORT_FILE, SETTINGS_FILE,
};
pub use crate::pipeline::eval_plan::{EvalPlan, StrengthPlan};
use crate::pipeline::evaluate::{
    embed_set, full_metrics, model_metrics, pca_2d, retrieval, rows_at, rows_at_each,
    scenario_metrics, spread_indices, template_metrics, voted_metrics, EvalContext, EvalSet,
};
use crate::pipeline::ranking::run_ranking_suite;
use crate::pipeline::report::{html_report, RunInfo};
use crate::pipeline::results::{
    worst_of, AttackRow, CurvePoint, MethodReport, ObjectivesReport, Projection, TransferReport,
};
use crate::pipeline::run_dir;
use crate::pipeline::sanity::{run_sanity, transfer_check};
use crate::pipeline::spread::labeled_by_seed;
use crate::pipeline::strength::{attack_set, AttackSource};
use crate::pipeline::tables::{
    failed_lines, objectives_markdown, ranking_markdown, ranking_tables, sanity_tables,
    strength_tables, table_markdown, threats_markdown, transfer_markdown,
};
use crate::pipeline::train::{refuse_tied_on_colour, LossKind, Run, TrainConfig, CHECKPOINT_FILE};
use crate::robust::defense::Method;
use crate::robust::ensemble::mean_embedding;

/// Most test samples drawn in the clean-versus-attacked projection.
const PROJECTION_SAMPLES: usize = 250;

/// One experiment: the methods to train, the seeds to train each with, and how to train and
/// evaluate them. Each (method, seed) is a cell ([`crate::pipeline::cells`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExperimentConfig {
    pub dataset: String,
    pub methods: Vec<Method>,
    /// Training seeds, one cell per method and seed; empty = `train.seed` alone.
    #[serde(default)]
    pub seeds: Vec<u64>,
    /// Training configuration; `defense.method` and `seed` are replaced per cell.
    pub train: TrainConfig,
    pub eval: EvalPlan,
}

impl ExperimentConfig {
    /// Sets what every attack of the experiment (training, evaluation, ranking suite) may change
    /// in a grey image given as three equal channels.
    pub fn set_attack_channels(&mut self, channels: AttackChannels) {
        self.train.defense.attack.channels = channels;
        self.eval.attack.channels = channels;
        if let Some(plan) = &mut self.eval.ranking {
            plan.channels = channels;
        }
    }

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
        for (i, seed) in self.seeds.iter().enumerate() {
            if self.seeds[..i].contains(seed) {
                return Err(Error::Config(format!(
                    "--seeds lists {seed} twice; name each seed once (a seed run twice would \
                     count one run as two in the spread)"
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

    /// The seeds this process trains each method with.
    pub fn seed_list(&self) -> Vec<u64> {
        if self.seeds.is_empty() {
            vec![self.train.seed]
        } else {
            self.seeds.clone()
        }
    }

    /// The cells this process runs: per seed, every method in order (the undefended model of a
    /// seed first, when listed first, so its defended cells get their transfer rows).
    pub fn cells(&self) -> Vec<Cell> {
        self.seed_list()
            .into_iter()
            .flat_map(|seed| {
                self.methods
                    .iter()
                    .map(move |&method| Cell { method, seed })
            })
            .collect()
    }

    /// What every process of this experiment must share: everything but the cells.
    pub fn settings(&self, dataset: &Dataset) -> Settings {
        Settings {
            dataset: self.dataset.clone(),
            data: DataSummary {
                name: dataset.name.clone(),
                train_images: dataset.train.len(),
                train_classes: dataset.num_train_classes(),
                test_images: dataset.test.len(),
                test_classes: dataset.num_test_classes(),
            },
            train: self.train.clone(),
            eval: self.eval.clone(),
        }
    }
}

fn write(path: &Path, text: &str) -> Result<()> {
    run_dir::write_atomic(path, text.as_bytes())
}

/// An experiment directory resumes, or adds cells to, only the same experiment: other settings
/// are refused (naming the file), unless `overwrite` is set, which deletes the old results.
pub fn claim_experiment_dir(
    cfg: &ExperimentConfig,
    dataset: &Dataset,
    out: &Path,
    overwrite: bool,
) -> Result<()> {
    claim_settings(out, &cfg.settings(dataset), overwrite)
}

fn json<T: Serialize>(v: &T) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}

/// Runs (or resumes) this process's cells of the experiment in `out`, then merges every
/// finished cell, this process's or another's, into the tables and the report. Fails before any
/// work when a cell is in use by another process. Returns the merge.
pub fn run_experiment(
    cfg: &ExperimentConfig,
    dataset: &Dataset,
    device: &Device,
    out: &Path,
) -> Result<Merged> {
    check_channels(cfg, dataset)?;
    let settings = cfg.settings(dataset);
    claim_settings(out, &settings, false)?;
    let cells = cfg.cells();
    let claimed = claim_cells(out, &settings, &cells)?;
    for cell in &cells {
        if !claimed.iter().any(|c| c.cell == *cell) {
            eprintln!(
                "{}: already done ({}), skipping",
                cell.name(),
                cell.dir(out).join(REPORT_FILE).display()
            );
        }
    }
    for c in &claimed {
        run_cell(&settings, c, dataset, device, out)?;
    }
    drop(claimed);
    write_merged(out, &settings)
}

/// Refuses tied channels on a dataset with colour images before any training.
fn check_channels(cfg: &ExperimentConfig, dataset: &Dataset) -> Result<()> {
    let ranking = cfg.eval.ranking.as_ref().map(|r| r.channels);
    let tied = [cfg.train.defense.attack.channels, cfg.eval.attack.channels]
        .into_iter()
        .chain(ranking)
        .any(|c| c == AttackChannels::Tied);
    refuse_tied_on_colour(tied, dataset)
}

/// Trains and evaluates one claimed cell and writes its `report.json`.
fn run_cell(
    settings: &Settings,
    claimed: &ClaimedCell,
    dataset: &Dataset,
    device: &Device,
    out: &Path,
) -> Result<()> {
    let (cell, dir) = (claimed.cell, claimed.lock.path());
    let label = settings.cell_train(cell).label();
    eprintln!("== {label}, seed {} ==", cell.seed);
    let start = Instant::now();
    let run = train_cell(settings, cell, dataset, device, dir)?;
    let train_seconds = start.elapsed().as_secs_f64();
    let source = transfer_source(settings, cell, dataset, device, out)?;
    let start = Instant::now();
    let mut report = evaluate_run_with(
        &run,
        dataset,
        &settings.eval,
        device,
        source.as_ref().map(|r| (r.cfg.label(), r)),
    )?;
    report.train_seconds = train_seconds;
    report.eval_seconds = start.elapsed().as_secs_f64();
    report.seed = cell.seed;
    report.device = device_name(device);
    write(&dir.join(REPORT_FILE), &json(&report))?;
    eprintln!(
        "{}",
        table_markdown(
            std::slice::from_ref(&report),
            &format!("{label}, seed {}", cell.seed)
        )
    );
    if let Some(r) = &report.ranking {
        eprintln!("{}", ranking_markdown(label, r));
    }
    if let Some(o) = &report.objectives {
        eprintln!("{}", objectives_markdown(label, o));
    }
    if let Some(t) = &report.transfer {
        eprintln!("{}", transfer_markdown(label, t));
    }
    for line in failed_lines(&cell.name(), &report.sanity) {
        eprintln!("{line}");
    }
    Ok(())
}

fn device_name(device: &Device) -> String {
    match device {
        Device::Cpu => format!("CPU backend, {} threads", rayon::current_num_threads()),
        d => d.name(),
    }
}

/// Merges every finished cell of `out` into `table.md`, `metrics.json` (every cell's report)
/// and `report.html`, under the merge lock.
pub fn write_merged(out: &Path, settings: &Settings) -> Result<Merged> {
    with_merge_lock(out, || {
        let merged = merge_cells(out, settings);
        let reports = &merged.reports;
        let title = format!("{} / {:?}", settings.dataset, settings.train.arch);
        let table = table_markdown(
            reports,
            &format!(
                "Table 1 layout: {title}, PGD-{} at eps {:.1}/255",
                settings.eval.attack.steps,
                settings.eval.attack.eps * 255.0
            ),
        );
        let per_run = labeled_by_seed(reports);
        let missing: String = merged
            .missing_lines()
            .iter()
            .map(|l| format!("\n- {l}"))
            .collect();
        let missing = if missing.is_empty() {
            missing
        } else {
            format!("\n#### Cells not in the tables\n{missing}\n")
        };
        write(
            &out.join("table.md"),
            &(table
                + &threats_markdown(reports)
                + &missing
                + &sanity_tables(&per_run)
                + &strength_tables(&per_run)
                + &ranking_tables(&per_run)),
        )?;
        write(&out.join("metrics.json"), &json(reports))?;
        let info = RunInfo {
            title: format!("robust-dml experiment: {title}"),
            settings: settings_rows(settings, reports, &merged.missing_lines()),
            config_json: json(settings),
        };
        let html = html_report(reports, &info).map_err(Error::Config)?;
        write(&out.join("report.html"), &html)?;
        Ok(merged)
    })
}

/// `robust-dml report DIR`: the merge of an experiment directory's finished cells, without
/// running any; with the experiment's settings.
pub fn report_experiment(out: &Path) -> Result<(Settings, Merged)> {
    let settings = read_settings(out)?.ok_or_else(|| {
        Error::Config(format!(
            "{} has no {SETTINGS_FILE}: it is not an experiment directory (made by \
             `robust-dml experiment --out {}`)",
            out.display(),
            out.display()
        ))
    })?;
    let merged = write_merged(out, &settings)?;
    Ok((settings, merged))
}

/// The cell a report came from (None for a method this build does not know).
fn cell_of(report: &MethodReport) -> Option<Cell> {
    let method = Method::EVERY
        .iter()
        .copied()
        .find(|m| m.key() == report.method)?;
    Some(Cell {
        method,
        seed: report.seed,
    })
}

/// The loss the reported cells trained with: one text, or one per group of methods when they
/// differ (robrank's defenses train with the triplet loss in a Proxy-Anchor experiment).
fn loss_text(settings: &Settings, reports: &[MethodReport]) -> String {
    let mut groups: Vec<(String, Vec<&'static str>)> = Vec::new();
    for cell in reports.iter().filter_map(cell_of) {
        let t = settings.cell_train(cell);
        let text = match t.loss_kind() {
            LossKind::ProxyAnchor => {
                format!("Proxy Anchor (alpha {}, delta {})", t.pa_alpha, t.pa_delta)
            }
            LossKind::Triplet => {
                format!("triplet loss (margin {}, SPC-2 batches)", t.triplet_margin)
            }
        };
        let key = cell.method.key();
        match groups.iter_mut().find(|(g, _)| *g == text) {
            Some((_, methods)) if methods.contains(&key) => {}
            Some((_, methods)) => methods.push(key),
            None => groups.push((text, vec![key])),
        }
    }
    match groups.as_slice() {
        [] => "no finished cell".to_string(),
        [(text, _)] => text.clone(),
        _ => groups
            .iter()
            .map(|(text, methods)| format!("{text} for {}", methods.join(", ")))
            .collect::<Vec<_>>()
            .join("; "),
    }
}

/// The report's settings table: what was run, on what, and how long it took.
fn settings_rows(
    settings: &Settings,
    reports: &[MethodReport],
    missing: &[String],
) -> Vec<(String, String)> {
    let (t, eval, data) = (&settings.train, &settings.eval, &settings.data);
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
    let mut devices: Vec<&str> = reports.iter().map(|r| r.device.as_str()).collect();
    devices.sort_unstable();
    devices.dedup();
    let times = reports
        .iter()
        .map(|r| {
            format!(
                "{} seed {} {:.0}+{:.0}",
                r.label, r.seed, r.train_seconds, r.eval_seconds
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    let mut seeds: Vec<u64> = reports.iter().map(|r| r.seed).collect();
    seeds.sort_unstable();
    seeds.dedup();
    let seeds: Vec<String> = seeds.iter().map(u64::to_string).collect();
    let uses_proxies = reports
        .iter()
        .filter_map(cell_of)
        .any(|cell| settings.cell_train(cell).loss_kind() == LossKind::ProxyAnchor);
    let row = |k: &str, v: String| (k.to_string(), v);
    let mut rows = vec![
        row(
            "dataset",
            format!(
                "{}: {} training images ({} classes), {} test images ({} classes)",
                data.name,
                data.train_images,
                data.train_classes,
                data.test_images,
                data.test_classes
            ),
        ),
        row(
            "evaluated",
            format!("{tested} test images in the table, {curves} per curve point and projection"),
        ),
        row(
            "model",
            format!(
                "{:?} at {}x{}, {}-d embedding, {}",
                t.arch,
                t.image_size,
                t.image_size,
                t.embedding_dim,
                loss_text(settings, reports)
            ),
        ),
        row(
            "training",
            format!(
                "{} epoch(s), {steps}, batch {}, AdamW lr {}{proxies}, weight decay {}, \
                 warm-up {} epochs, gradient clip {}",
                t.epochs,
                t.batch_size,
                t.lr,
                t.weight_decay,
                t.warmup_epochs,
                match t.grad_clip {
                    0.0 => "off".to_string(),
                    c => c.to_string(),
                },
                proxies = if uses_proxies {
                    format!(" (proxies x{})", t.proxy_lr_mult)
                } else {
                    String::new()
                }
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
        row("evaluation attack", attack(&eval.attack)),
        row(
            "seeds",
            format!(
                "training {} (one cell per method and seed), evaluation {}",
                seeds.join(", "),
                eval.seed
            ),
        ),
        row("device", devices.join("; ")),
        row(
            "wall time",
            format!(
                "{:.1} min in all; per cell, train+evaluation (s): {times}",
                total / 60.0
            ),
        ),
    ];
    if !missing.is_empty() {
        rows.push(row("cells not in the tables", missing.join("; ")));
    }
    rows
}

/// The undefended model of `cell`'s seed, when `cell` is a defense, transfer rows are on and
/// that cell is finished (a checkpoint still training is not used).
fn transfer_source(
    settings: &Settings,
    cell: Cell,
    dataset: &Dataset,
    device: &Device,
    out: &Path,
) -> Result<Option<Run>> {
    if cell.method == Method::None || settings.eval.strength.transfer_samples == 0 {
        return Ok(None);
    }
    let source = Cell {
        method: Method::None,
        seed: cell.seed,
    };
    let dir = source.dir(out);
    let ckpt = dir.join(CHECKPOINT_FILE);
    let why = if finished_report(&dir).is_none() {
        "is not finished: run the undefended method first"
    } else if !ckpt.is_file() {
        "has no checkpoint (its report was kept without it)"
    } else {
        return Run::load(&ckpt, dataset, device).map(Some);
    };
    eprintln!(
        "{}: no transfer row (the cell {} {why})",
        cell.name(),
        source.name()
    );
    Ok(None)
}

/// Trains one cell, resuming from its checkpoint when one exists (a checkpoint of another
/// configuration is refused, naming it).
fn train_cell(
    settings: &Settings,
    cell: Cell,
    dataset: &Dataset,
    device: &Device,
    dir: &Path,
) -> Result<Run> {
    let tc = settings.cell_train(cell);
    let ckpt: PathBuf = dir.join(CHECKPOINT_FILE);
    let mut run = if ckpt.exists() {
        let run = Run::load(&ckpt, dataset, device)?;
        if run.cfg != tc {
            return Err(Error::Config(format!(
                "{} was trained with other settings than the cell {} asks for; remove it to \
                 train the cell again",
                ckpt.display(),
                cell.name()
            )));
        }
        eprintln!(
            "resuming {} from {} ({})",
            cell.name(),
            ckpt.display(),
            run.position()
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
        label: run.cfg.label().into(),
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
