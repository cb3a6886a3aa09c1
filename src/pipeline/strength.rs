//! Attack strength beyond one PGD objective: the same attack with every objective (embedding
//! shift, metric loss, retrieval) and, per metric, the worst of them with the objective that
//! won; and transfer rows, adversarial examples made on a source model (the undefended one in
//! an experiment) and evaluated on the target, beside the white-box figures.

use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::config::{Objective, PgdConfig};
use crate::data::loader::{BatchLoader, LoaderConfig};
use crate::dml::loss::ProxyAnchorConfig;
use crate::engine::{no_grad, Device, Rng, Tensor};
use crate::error::Result;
use crate::nn::{EmbeddingNet, ForwardMode};
use crate::pipeline::evaluate::{per_image_linf, template_of_models, EvalSet};
use crate::pipeline::experiment::model_metrics;
use crate::pipeline::progress::Progress;
use crate::pipeline::report::{
    html_escape, markdown_header, Metrics, METRIC_COLUMNS, TEMPLATE_COLUMNS,
};
use crate::robust::objectives::{retrieval_directions, CentroidProxies};
use crate::robust::pgd::{pgd, BoxedEmbedFn, EmbedFn, Goal};

/// The model an attack differentiates: its nets, their clean embeddings of the whole set
/// (the metric loss's proxies and the retrieval gallery come from them) and its loss.
pub struct AttackSource<'a> {
    pub nets: &'a [&'a EmbeddingNet],
    pub clean: &'a [Vec<f32>],
    pub loss: ProxyAnchorConfig,
}

/// The targets' embeddings of the attacked set, one matrix per target net.
pub struct AttackedSet {
    pub attacked: Vec<Vec<f32>>,
    /// The mean and the largest per-image max |x_adv - x|.
    pub linf: (f32, f32),
    pub seconds: f64,
}

fn frozen_fns<'a>(frozen: &'a [EmbeddingNet]) -> Vec<BoxedEmbedFn<'a>> {
    frozen
        .iter()
        .map(|v| {
            Box::new(move |x: &Tensor| v.forward(x, ForwardMode::Eval)) as Box<dyn Fn(&Tensor) -> _>
        })
        .collect()
}

/// Attacks every image of `set` with `cfg` (its objective and optimizer) on `source` and embeds
/// the adversarial inputs with `targets` (eval-mode BatchNorm). Each batch's random stream is
/// seeded as `embed_set`'s, so an embedding-shift attack with the targets as source gives the
/// same inputs as `embed_set`'s attack.
#[allow(clippy::too_many_arguments)]
pub fn attack_set(
    targets: &[&EmbeddingNet],
    source: &AttackSource,
    set: &EvalSet,
    image_size: usize,
    batch_size: usize,
    workers: usize,
    device: &Device,
    cfg: &PgdConfig,
    seed: u64,
) -> Result<AttackedSet> {
    let start = Instant::now();
    let mut lc = LoaderConfig::eval(batch_size, image_size).for_samples(&set.samples);
    lc.workers = workers;
    let loader = BatchLoader::new(set.samples.clone(), lc)?;
    let freeze = |nets: &[&EmbeddingNet]| -> Result<Vec<EmbeddingNet>> {
        nets.iter()
            .map(|n| n.frozen_view(device).map_err(Into::into))
            .collect()
    };
    let (target_views, source_views) = (freeze(targets)?, freeze(source.nets)?);
    let (target_fns, source_fns) = (frozen_fns(&target_views), frozen_fns(&source_views));
    let members: Vec<EmbedFn> = source_fns.iter().map(|f| f.as_ref() as EmbedFn).collect();
    let dim = source.nets[0].embedding_dim;
    let proxies: Vec<(CentroidProxies, Tensor)> = match cfg.objective {
        Objective::MetricLoss => source
            .clean
            .iter()
            .map(|emb| {
                let p = CentroidProxies::of(emb, &set.labels, dim);
                let t = Tensor::from_vec(p.matrix.clone(), &[p.classes.len(), dim], device)?;
                Ok((p, t))
            })
            .collect::<Result<_>>()?,
        _ => Vec::new(),
    };
    let mut attacked = vec![Vec::with_capacity(set.samples.len() * dim); targets.len()];
    let mut linf = Vec::with_capacity(set.samples.len());
    let bar = Progress::new(
        format!(
            "{}-{} ({}) at eps {:.1}/255",
            cfg.optimizer.key(),
            cfg.steps,
            cfg.objective.key(),
            cfg.eps * 255.0
        ),
        set.samples.len() as u64,
        "img",
        false,
    );
    for batch in loader.epoch(0) {
        let x = batch.images_tensor(device)?;
        let rows = &batch.indices;
        let labels: Vec<usize> = rows.iter().map(|&i| set.labels[i]).collect();
        let proxy_rows = proxies
            .first()
            .map(|(p, _)| p.rows_of(&labels))
            .unwrap_or_default();
        let goal = match cfg.objective {
            Objective::EmbeddingShift => Goal::EmbeddingShift,
            Objective::MetricLoss => Goal::MetricLoss {
                proxies: proxies.iter().map(|(_, t)| t).collect(),
                labels: &proxy_rows,
                loss: source.loss,
            },
            Objective::Retrieval => Goal::Retrieval {
                directions: source
                    .clean
                    .iter()
                    .map(|g| {
                        let d = retrieval_directions(g, &set.labels, dim, rows);
                        Tensor::from_vec(d, &[rows.len(), dim], device)
                    })
                    .collect::<crate::engine::Result<_>>()?,
            },
        };
        let mut rng = Rng::new(seed ^ batch.batch_index as u64);
        let adv = pgd(&members, &x, cfg, &goal, &mut rng)?;
        linf.extend(per_image_linf(&x, &adv)?);
        for (out, f) in attacked.iter_mut().zip(&target_fns) {
            out.extend(no_grad(|| f(&adv))?.to_vec()?);
        }
        bar.inc(rows.len() as u64);
    }
    bar.finish("");
    let mean = linf.iter().map(|&v| v as f64).sum::<f64>() / linf.len().max(1) as f64;
    Ok(AttackedSet {
        attacked,
        linf: (mean as f32, linf.iter().copied().fold(0.0, f32::max)),
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Metrics of one attacked pass: the clustering scenario (voting for an ensemble) and the
/// template scenario (the members' mean embedding against the clean gallery).
pub fn scenario_metrics(
    clean: &[Vec<f32>],
    attacked: &[Vec<f32>],
    set: &EvalSet,
    dim: usize,
    device: &Device,
    seed: u64,
) -> Result<(Metrics, Metrics)> {
    let clustering = model_metrics(attacked, set, dim, device, seed)?;
    let template = template_of_models(clean, attacked, set, dim, device)?;
    Ok((clustering, template))
}

/// One attacked row: which attack, its metrics in both scenarios and its wall time.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AttackRow {
    pub objective: Option<Objective>,
    pub attack: Option<PgdConfig>,
    pub clustering: Metrics,
    /// Recall@k and MAP@R only (its JSON has no NMI or F1).
    #[serde(serialize_with = "crate::pipeline::report::serialize_retrieval_only")]
    pub template: Metrics,
    pub seconds: f64,
}

impl AttackRow {
    /// The row of attack `cfg` from its (clustering, template) metrics, as
    /// [`scenario_metrics`] gives them, and its wall time.
    pub fn of(cfg: &PgdConfig, (clustering, template): (Metrics, Metrics), seconds: f64) -> Self {
        AttackRow {
            objective: Some(cfg.objective),
            attack: Some(*cfg),
            clustering,
            template,
            seconds,
        }
    }
}

/// The worst (lowest) value of one metric over the objectives, and the objective that won.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorstMetric {
    pub metric: String,
    pub value: f64,
    pub objective: Objective,
}

/// The metrics the worst-of table covers, by name, read from an [`AttackRow`].
type MetricRead = fn(&AttackRow) -> f64;
const WORST_METRICS: [(&str, MetricRead); 9] = [
    ("NMI", |r| r.clustering.nmi),
    ("F1", |r| r.clustering.f1),
    ("R@1", |r| r.clustering.recall[0]),
    ("R@2", |r| r.clustering.recall[1]),
    ("R@4", |r| r.clustering.recall[2]),
    ("R@8", |r| r.clustering.recall[3]),
    ("MAP@R", |r| r.clustering.map_r),
    ("R@1 template", |r| r.template.recall[0]),
    ("MAP@R template", |r| r.template.map_r),
];

/// Per metric, the lowest value over `rows` and the objective of that row (ties go to the
/// earlier row). Rows without an objective are skipped.
pub fn worst_of(rows: &[AttackRow]) -> Vec<WorstMetric> {
    WORST_METRICS
        .iter()
        .filter_map(|(name, read)| {
            let mut best: Option<(f64, Objective)> = None;
            for row in rows {
                let Some(objective) = row.objective else {
                    continue;
                };
                let v = read(row);
                if best.is_none_or(|(b, _)| v < b) {
                    best = Some((v, objective));
                }
            }
            best.map(|(value, objective)| WorstMetric {
                metric: name.to_string(),
                value,
                objective,
            })
        })
        .collect()
}

/// The evaluation attack with every objective, on a subset of the test set.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ObjectivesReport {
    /// Test images attacked (spread over the test set; they are also the gallery).
    pub samples: usize,
    pub rows: Vec<AttackRow>,
    pub worst: Vec<WorstMetric>,
}

/// Adversarial examples made on a source model, evaluated on the target, beside the target's
/// white-box figures on the same images.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TransferReport {
    /// What the source is ("PAL", or a checkpoint path).
    pub source: String,
    pub samples: usize,
    pub transfer: AttackRow,
    pub white_box: AttackRow,
}

/// A row's nine metric cells: the clustering ones, then template R@1 and MAP@R.
fn metric_cells(r: &AttackRow) -> Vec<String> {
    let mut cells = r.clustering.cells().to_vec();
    cells.extend(r.template.template_cells());
    cells
}

/// The columns after the metric ones: template R@1 and MAP@R, then the wall time.
const TRAILING: [&str; 3] = [TEMPLATE_COLUMNS[0], TEMPLATE_COLUMNS[1], "s"];

fn header() -> String {
    markdown_header(&["input"], &TRAILING)
}

fn row_markdown(input: &str, r: &AttackRow) -> String {
    format!(
        "| {input} | {} | {:.1} |\n",
        metric_cells(r).join(" | "),
        r.seconds
    )
}

fn attack_name(r: &AttackRow) -> String {
    match (r.attack, r.objective) {
        (Some(a), Some(o)) => format!(
            "{}-{} {} (eps {:.1}/255)",
            a.optimizer.key(),
            a.steps,
            o.key(),
            a.eps * 255.0
        ),
        _ => "attacked".into(),
    }
}

/// The objectives table: one row per objective, then the worst per metric and its objective.
pub fn objectives_markdown(label: &str, r: &ObjectivesReport) -> String {
    let mut s = format!(
        "#### Attack objectives: {label} ({} test images; worst = lowest over the objectives)\n\n{}",
        r.samples,
        header()
    );
    for row in &r.rows {
        s += &row_markdown(&attack_name(row), row);
    }
    let cells: Vec<String> = WORST_METRICS
        .iter()
        .map(|(name, _)| {
            r.worst
                .iter()
                .find(|w| w.metric == *name)
                .map_or("".into(), |w| {
                    format!("{:.2} ({})", w.value, w.objective.key())
                })
        })
        .collect();
    s += &format!("| **worst** | {} | |\n", cells.join(" | "));
    s
}

/// The transfer table: transfer and white-box rows on the same images.
pub fn transfer_markdown(label: &str, t: &TransferReport) -> String {
    format!(
        "#### Transfer: {label} attacked through {} ({} test images)\n\n{}{}{}",
        t.source,
        t.samples,
        header(),
        row_markdown(
            &format!("transfer from {}: {}", t.source, attack_name(&t.transfer)),
            &t.transfer
        ),
        row_markdown(
            &format!("white-box: {}", attack_name(&t.white_box)),
            &t.white_box
        )
    )
}

/// Both tables as HTML, for the report.
pub fn strength_html(
    label: &str,
    o: Option<&ObjectivesReport>,
    t: Option<&TransferReport>,
) -> String {
    let columns: String = METRIC_COLUMNS
        .iter()
        .chain(&TRAILING)
        .map(|name| format!("<th>{name}</th>"))
        .collect();
    let head = format!("<tr><th class=\"l\">input</th>{columns}</tr>");
    let row = |input: &str, cells: Vec<String>, seconds: String| {
        format!(
            "<tr><td class=\"l\">{}</td>{}<td>{seconds}</td></tr>",
            html_escape(input),
            cells
                .iter()
                .map(|c| format!("<td>{}</td>", html_escape(c)))
                .collect::<String>()
        )
    };
    let mut h = String::new();
    if let Some(o) = o {
        h += &format!(
            "<h2>Attack objectives: {} ({} test images)</h2><table>{head}",
            html_escape(label),
            o.samples
        );
        for r in &o.rows {
            h += &row(
                &attack_name(r),
                metric_cells(r),
                format!("{:.1}", r.seconds),
            );
        }
        let worst = WORST_METRICS
            .iter()
            .map(|(name, _)| {
                o.worst
                    .iter()
                    .find(|w| w.metric == *name)
                    .map_or(String::new(), |w| {
                        format!("{:.2} ({})", w.value, w.objective.key())
                    })
            })
            .collect();
        h += &row("worst", worst, String::new());
        h += "</table><p class=\"how\"><b>How to read this:</b> the evaluation attack with each \
              objective on the same images; the last row is each metric's lowest value and the \
              objective that reached it. A defense is only as robust as its worst row.</p>";
    }
    if let Some(t) = t {
        h += &format!(
            "<h2>Transfer: {} attacked through {} ({} test images)</h2><table>{head}",
            html_escape(label),
            html_escape(&t.source),
            t.samples
        );
        h += &row(
            &format!("transfer from {}", t.source),
            metric_cells(&t.transfer),
            format!("{:.1}", t.transfer.seconds),
        );
        h += &row(
            "white-box",
            metric_cells(&t.white_box),
            format!("{:.1}", t.white_box.seconds),
        );
        h += "</table><p class=\"how\"><b>How to read this:</b> adversarial examples made on the \
              source model (black-box for the target) against the target's own white-box attack \
              on the same images; white-box should be at least as strong.</p>";
    }
    h
}
