//! The work of `eval` and `attack` on a stored checkpoint: load it, embed the test set clean and
//! attacked, and measure. Each command's flags arrive as a plain request; what comes back is
//! the output the tables of `tables.rs` (or `--json`) show, with the run's method for its label.

use std::path::Path;

use crate::config::{Objective, PgdConfig, Scenario};
use crate::data::Dataset;
use crate::dml::loss::ProxyAnchorConfig;
use crate::engine::Device;
use crate::error::{Error, Result};
use crate::nn::EmbeddingNet;
use crate::pipeline::evaluate::{
    embed_set, model_metrics, scenario_metrics, template_of_models, EvalContext, EvalSet,
};
use crate::pipeline::ranking::{run_ranking_suite, RankingPlan};
use crate::pipeline::results::{
    worst_of, AttackRow, EvalOutput, Metrics, RankingReport, StrengthOutput, TransferReport,
};
use crate::pipeline::sanity::transfer_check;
use crate::pipeline::strength::{attack_set, AttackSource};
use crate::pipeline::train::{Run, CHECKPOINT_FILE};
use crate::robust::defense::Method;

/// What a command measured on a checkpoint, and the method of its run (the tables' label).
pub struct Measured<T> {
    pub output: T,
    pub method: Method,
}

/// The run stored in the checkpoint file at `path`, refusing a directory or a missing file
/// with the fix.
pub fn load_run(path: &Path, dataset: &Dataset, device: &Device) -> Result<Run> {
    if path.is_dir() {
        return Err(Error::Config(format!(
            "--checkpoint {} is a directory; pass the checkpoint file inside it ({})",
            path.display(),
            path.join(CHECKPOINT_FILE).display()
        )));
    }
    if !path.exists() {
        return Err(Error::Config(format!(
            "checkpoint {} not found",
            path.display()
        )));
    }
    let run = Run::load(path, dataset, device)?;
    if run.progress.is_some() {
        eprintln!(
            "note: {} holds {}; `train --resume` finishes that epoch",
            path.display(),
            run.position()
        );
    }
    Ok(run)
}

fn member_nets(run: &Run) -> Vec<&EmbeddingNet> {
    run.members.iter().map(|m| &m.net).collect()
}

/// The clean test metrics of a trained run (voting for an ensemble), as `train` prints them
/// when it ends.
pub fn test_metrics(run: &Run, dataset: &Dataset, device: &Device) -> Result<Metrics> {
    let set = EvalSet::of(dataset);
    let nets = member_nets(run);
    let emb = embed_set(
        &EvalContext::of_run(&run.cfg, &nets, &set, 64, device),
        None,
    )?;
    model_metrics(&emb.clean, &set, emb.dim, device, 0)
}

/// `eval`, and `attack` with one PGD embedding-shift attack through the model itself.
pub struct EvalRequest<'a> {
    pub checkpoint: &'a Path,
    pub batch_size: usize,
    /// The attack and the scenarios to report; none: the clean metrics only.
    pub attack: Option<(PgdConfig, Scenario)>,
}

/// The clean metrics of the checkpoint's model (an ensemble by voting) and, with an attack,
/// those of the attacked test set in the requested scenarios.
pub fn evaluate_checkpoint(
    req: &EvalRequest,
    dataset: &Dataset,
    device: &Device,
) -> Result<Measured<EvalOutput>> {
    let run = load_run(req.checkpoint, dataset, device)?;
    let set = EvalSet::of(dataset);
    let nets = member_nets(&run);
    let all: Vec<usize> = (0..nets.len()).collect();
    let start = std::time::Instant::now();
    let ctx = EvalContext::of_run(&run.cfg, &nets, &set, req.batch_size, device);
    let emb = embed_set(
        &ctx,
        req.attack.as_ref().map(|(c, _)| (c, all.as_slice(), 1)),
    )?;
    let seconds = start.elapsed().as_secs_f64();
    let metrics = |embs: &[Vec<f32>]| model_metrics(embs, &set, emb.dim, device, 0);
    let mut out = EvalOutput {
        checkpoint: req.checkpoint.display().to_string(),
        dataset: dataset.name.clone(),
        clean: metrics(&emb.clean)?,
        pgd_clustering: None,
        pgd_template: None,
        attack: req.attack.map(|(c, _)| c),
        seconds,
    };
    if let (Some((_, scenario)), Some(adv)) = (req.attack, emb.attacked.as_ref()) {
        if scenario.clustering() {
            out.pgd_clustering = Some(metrics(adv)?);
        }
        if scenario.template() {
            let template = template_of_models(&emb.clean, adv, &set, emb.dim, device)?;
            out.pgd_template = Some((&template).into());
        }
    }
    Ok(Measured {
        output: out,
        method: run.cfg.defense.method,
    })
}

/// `attack` with other objectives, APGD or a transfer source.
pub struct StrengthRequest<'a> {
    pub checkpoint: &'a Path,
    /// The source model of a transfer attack.
    pub transfer_from: Option<&'a Path>,
    /// One white-box row (and one transfer row) per objective.
    pub objectives: Vec<Objective>,
    /// The attack; its objective is replaced by each of `objectives`.
    pub attack: PgdConfig,
    pub scenario: Scenario,
    pub batch_size: usize,
}

/// Every requested objective white-box, the worst per metric (with several objectives), and
/// the transfer rows with their checks. A transfer source that cannot attack the target is
/// refused before anything runs.
pub fn attack_strength(
    req: &StrengthRequest,
    dataset: &Dataset,
    device: &Device,
) -> Result<Measured<StrengthOutput>> {
    let run = load_run(req.checkpoint, dataset, device)?;
    let source = match req.transfer_from {
        Some(path) => Some((
            path,
            transfer_source(path, &run, req.checkpoint, dataset, device)?,
        )),
        None => None,
    };
    let set = EvalSet::of(dataset);
    let nets = member_nets(&run);
    let dim = run.cfg.embedding_dim;
    let ctx = EvalContext::of_run(&run.cfg, &nets, &set, req.batch_size, device);
    let clean = embed_set(&ctx, None)?.clean;
    let rows_through = |source: &AttackSource| -> Result<Vec<AttackRow>> {
        req.objectives
            .iter()
            .map(|&objective| {
                let c = PgdConfig {
                    objective,
                    ..req.attack
                };
                let r = attack_set(&ctx, source, &c, 1)?;
                let scenarios = scenario_metrics(&clean, &r.attacked, &set, dim, device, 0)?;
                Ok(AttackRow::of(&c, scenarios, r.seconds))
            })
            .collect()
    };
    let white_box = rows_through(&AttackSource {
        nets: &nets,
        clean: &clean,
        loss: loss_of(&run),
    })?;
    let mut out = StrengthOutput {
        checkpoint: req.checkpoint.display().to_string(),
        dataset: dataset.name.clone(),
        scenario: req.scenario,
        clean: model_metrics(&clean, &set, dim, device, 0)?,
        worst: if white_box.len() > 1 {
            worst_of(&white_box)
        } else {
            Vec::new()
        },
        white_box,
        transfer_from: None,
        transfer: Vec::new(),
        checks: Vec::new(),
    };
    if let Some((path, source)) = source {
        let source_nets = member_nets(&source);
        let source_ctx =
            EvalContext::of_run(&source.cfg, &source_nets, &set, req.batch_size, device);
        let source_clean = embed_set(&source_ctx, None)?.clean;
        out.transfer = rows_through(&AttackSource {
            nets: &source_nets,
            clean: &source_clean,
            loss: loss_of(&source),
        })?;
        out.transfer_from = Some(path.display().to_string());
        for (t, w) in out.transfer.iter().zip(&out.white_box) {
            let mut check = transfer_check(&TransferReport {
                source: path.display().to_string(),
                samples: set.samples.len(),
                transfer: t.clone(),
                white_box: w.clone(),
            });
            check.name += &format!(" ({})", t.objective.map_or("", |o| o.key()));
            out.checks.push(check);
        }
    }
    Ok(Measured {
        output: out,
        method: run.cfg.defense.method,
    })
}

fn loss_of(run: &Run) -> ProxyAnchorConfig {
    ProxyAnchorConfig {
        alpha: run.cfg.pa_alpha,
        delta: run.cfg.pa_delta,
    }
}

/// The source run of a transfer attack on `target`, refused unless it takes the same input
/// size and embeds in the same dimension.
fn transfer_source(
    path: &Path,
    target: &Run,
    target_path: &Path,
    dataset: &Dataset,
    device: &Device,
) -> Result<Run> {
    let source = load_run(path, dataset, device)?;
    let (size, dim) = (target.cfg.image_size, target.cfg.embedding_dim);
    if source.cfg.image_size != size || source.cfg.embedding_dim != dim {
        return Err(Error::Config(format!(
            "--transfer-from {} takes {} px images and embeds in {} dimensions, the target \
             {} takes {size} px and embeds in {dim}: transfer needs the same input size \
             (pass a source trained at {size} px)",
            path.display(),
            source.cfg.image_size,
            source.cfg.embedding_dim,
            target_path.display()
        )));
    }
    Ok(source)
}

/// `attack --suite ranking`.
pub struct RankingRequest<'a> {
    pub checkpoint: &'a Path,
    pub batch_size: usize,
    pub plan: RankingPlan,
}

/// The ranking attacks on the checkpoint's model (an ensemble through its mean embedding).
pub fn rank_checkpoint(
    req: &RankingRequest,
    dataset: &Dataset,
    device: &Device,
) -> Result<Measured<RankingReport>> {
    let run = load_run(req.checkpoint, dataset, device)?;
    let set = EvalSet::of(dataset);
    let nets = member_nets(&run);
    let ctx = EvalContext::of_run(&run.cfg, &nets, &set, req.batch_size, device);
    let report = run_ranking_suite(&ctx, &req.plan, 1)?;
    Ok(Measured {
        output: report,
        method: run.cfg.defense.method,
    })
}
