//! What the pipeline measures, as plain data: every producer (evaluation, the sanity probe, the
//! strength rows, the ranking suite, the `eval` and `attack` commands) fills these types, and
//! every renderer (`tables` for Markdown, `report` for HTML, `plots` for SVG) only reads them.
//! Nothing here imports the rest of the pipeline.

use serde::{Deserialize, Serialize, Serializer};

use crate::config::{GtmTarget, Objective, PgdConfig, Scenario};
use crate::robust::ranking::{RankPgd, RankScores};

/// Retrieval and clustering metrics of one evaluation, in percent.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// Absent from a template-matching row's JSON, which has no clustering (read back as 0).
    #[serde(default)]
    pub nmi: f64,
    #[serde(default)]
    pub f1: f64,
    /// Recall@1, @2, @4, @8.
    pub recall: [f64; 4],
    pub map_r: f64,
}

/// The metric columns of every results table, in the order of [`Metrics::cells`].
pub const METRIC_COLUMNS: [&str; 7] = ["NMI", "F1", "R@1", "R@2", "R@4", "R@8", "MAP@R"];

impl Metrics {
    /// The cells of [`METRIC_COLUMNS`]: NMI, F1, R@1, R@2, R@4, R@8 and MAP@R, in percent to two
    /// decimals. Every results table, Markdown or HTML, writes its metrics with it.
    pub fn cells(&self) -> [String; 7] {
        self.values().map(two_decimals)
    }

    /// The values of [`METRIC_COLUMNS`], in percent.
    pub fn values(&self) -> [f64; 7] {
        let [r1, r2, r4, r8] = self.recall;
        [self.nmi, self.f1, r1, r2, r4, r8, self.map_r]
    }
}

/// The template-matching columns of an attack row, in the order of [`Metrics::template_cells`].
pub const TEMPLATE_COLUMNS: [&str; 2] = ["R@1 template", "MAP@R template"];

impl Metrics {
    /// The cells of [`TEMPLATE_COLUMNS`] for template-matching metrics: R@1 and MAP@R, in
    /// percent to two decimals.
    pub fn template_cells(&self) -> [String; 2] {
        [two_decimals(self.recall[0]), two_decimals(self.map_r)]
    }
}

pub fn two_decimals(v: f64) -> String {
    format!("{v:.2}")
}

/// A point of a robustness curve.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CurvePoint {
    /// PGD steps or eps * 255.
    pub x: f64,
    pub recall1: f64,
    pub f1: f64,
}

/// Everything measured for one method.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MethodReport {
    pub method: String,
    pub label: String,
    /// The training seed of this run (an experiment's cell is one method and one seed).
    #[serde(default)]
    pub seed: u64,
    /// The device it was trained and evaluated on, in words.
    #[serde(default)]
    pub device: String,
    pub clean: Metrics,
    /// Clustering scenario: every test sample perturbed.
    pub pgd: Metrics,
    /// Template-matching scenario: queries perturbed, gallery clean (Recall@k only). Its JSON
    /// has no NMI or F1: a metric that was not computed is absent, never 0.
    #[serde(serialize_with = "serialize_retrieval_only")]
    pub pgd_template: Metrics,
    pub steps_curve: Vec<CurvePoint>,
    pub eps_curve: Vec<CurvePoint>,
    /// Per member (ensembles only): clean and PGD Recall@1 of each member alone.
    pub members: Vec<(f64, f64)>,
    /// Ensembles only: the mean-embedding ensemble, clean and PGD.
    pub mean_embedding: Option<(Metrics, Metrics)>,
    /// 2-D projection of clean and attacked test embeddings with labels (Figure 1).
    pub projection: Option<Projection>,
    pub train_seconds: f64,
    /// Wall time of the evaluation: clean, attacked, curves and projection.
    #[serde(default)]
    pub eval_seconds: f64,
    /// Test images in the table's rows.
    #[serde(default)]
    pub test_samples: usize,
    /// Test images behind each curve point and the projection.
    #[serde(default)]
    pub curve_samples: usize,
    /// How far the evaluation attack moved the images: the mean and the largest per-image
    /// max |x_adv - x| (the attack should reach its eps).
    #[serde(default)]
    pub attack_linf: Option<(f32, f32)>,
    /// The ranking-attack suite and its ERS (docs/DESIGN.md, "The ranking-attack suite and
    /// ERS"), when the plan asks for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ranking: Option<RankingReport>,
    /// Sanity checks of the evaluation attack, each pass or fail with its numbers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sanity: Vec<SanityCheck>,
    /// What the sanity probe measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sanity_probe: Option<AttackProbe>,
    /// The evaluation attack with every objective on a subset, and the worst per metric.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub objectives: Option<ObjectivesReport>,
    /// Adversarial examples made on the undefended model, evaluated on this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transfer: Option<TransferReport>,
}

/// The template-matching scenario measures retrieval only: no clustering, so no NMI or F1.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TemplateMetrics {
    /// Recall@1, @2, @4, @8.
    pub recall: [f64; 4],
    pub map_r: f64,
}

impl TemplateMetrics {
    /// The cells of [`METRIC_COLUMNS`], with "-" for NMI and F1, which were not computed.
    pub fn cells(&self) -> [String; 7] {
        let [r1, r2, r4, r8] = self.recall.map(two_decimals);
        let not_computed = || "-".to_string();
        [
            not_computed(),
            not_computed(),
            r1,
            r2,
            r4,
            r8,
            two_decimals(self.map_r),
        ]
    }
}

impl From<&Metrics> for TemplateMetrics {
    fn from(m: &Metrics) -> Self {
        TemplateMetrics {
            recall: m.recall,
            map_r: m.map_r,
        }
    }
}

pub(crate) fn serialize_retrieval_only<S: Serializer>(
    m: &Metrics,
    s: S,
) -> Result<S::Ok, S::Error> {
    TemplateMetrics::from(m).serialize(s)
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Projection {
    pub clean: Vec<(f32, f32)>,
    pub attacked: Vec<(f32, f32)>,
    pub labels: Vec<usize>,
    /// Names of the test classes, by label (empty in reports written before they were kept).
    #[serde(default)]
    pub class_names: Vec<String>,
}

/// The suite's results for one model.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RankingReport {
    pub profile: String,
    pub pgd: Option<RankPgd>,
    /// Attacked images and database size.
    pub queries: usize,
    pub database: usize,
    /// Which target GTM pulled towards (docs/DESIGN.md, "The ranking-attack suite and ERS").
    #[serde(default)]
    pub gtm_target: GtmTarget,
    pub attacked: RankScores,
    pub ers: f64,
    /// The same scores under +-eps sign noise instead of the attack.
    pub noise: RankScores,
    pub noise_ers: f64,
    /// Per attack: its label, wall time in seconds and final mean loss (attack and noise).
    pub attacks: Vec<AttackTiming>,
    pub wall_seconds: f64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AttackTiming {
    pub attack: String,
    pub seconds: f64,
    pub loss: f64,
    pub noise_loss: f64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SanityCheck {
    pub name: String,
    pub passed: bool,
    pub detail: String,
}

/// What the probe measured on one batch.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AttackProbe {
    pub images: usize,
    pub eps: f32,
    pub max_move: f32,
    pub max_move_at_eps0: f32,
    pub zero_gradient_fraction: f64,
    /// Mean per-image objective of the single run and of the best of the restarts.
    pub objective_single: f64,
    pub objective_restarts: f64,
    pub restarts: usize,
    /// Recall@1 (%) of the probe's attacked images against the clean set, single and restarts.
    pub recall1_single: Option<f64>,
    pub recall1_restarts: Option<f64>,
    pub seconds_single: f64,
    pub seconds_restarts: f64,
    /// APGD with the same eps and start and `apgd_steps` iterations: mean per-image objective,
    /// probe Recall@1, time.
    #[serde(default)]
    pub apgd_steps: usize,
    #[serde(default)]
    pub objective_apgd: f64,
    /// PGD with `apgd_steps` iterations (alpha 2.5 eps / iterations): APGD's equal-budget peer
    /// (the single run when `apgd_steps` is the attack's steps).
    #[serde(default)]
    pub objective_pgd_equal: f64,
    #[serde(default)]
    pub seconds_pgd_equal: f64,
    #[serde(default)]
    pub recall1_apgd: Option<f64>,
    #[serde(default)]
    pub seconds_apgd: f64,
}

/// One attacked row: which attack, its metrics in both scenarios and its wall time.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AttackRow {
    pub objective: Option<Objective>,
    pub attack: Option<PgdConfig>,
    pub clustering: Metrics,
    /// Recall@k and MAP@R only (its JSON has no NMI or F1).
    #[serde(serialize_with = "serialize_retrieval_only")]
    pub template: Metrics,
    pub seconds: f64,
}

impl AttackRow {
    /// The row of attack `cfg` from its (clustering, template) metrics, as
    /// `evaluate::scenario_metrics` gives them, and its wall time.
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
pub type MetricRead = fn(&AttackRow) -> f64;

pub const WORST_METRICS: [(&str, MetricRead); 9] = [
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

/// Reads one threat's figure from a report; `None` where the run did not measure it.
pub type ThreatRead = fn(&MethodReport) -> Option<f64>;

/// The threats table's columns (docs/DESIGN.md, "Metrics"): one figure per threat, so that
/// every method can be read against both lines of work at once. Clean R@1, then the clustering
/// and template-matching R@1 under the evaluation attack, the lowest clustering R@1 over the
/// attack objectives (on their subset), and robrank's ERS.
pub const THREAT_COLUMNS: [(&str, ThreatRead); 5] = [
    ("clean R@1", |r| Some(r.clean.recall[0])),
    ("PGD R@1", |r| Some(r.pgd.recall[0])),
    ("R@1 template", |r| Some(r.pgd_template.recall[0])),
    ("worst R@1 over objectives", |r| {
        r.objectives
            .as_ref()?
            .worst
            .iter()
            .find(|w| w.metric == "R@1")
            .map(|w| w.value)
    }),
    ("ERS", |r| r.ranking.as_ref().map(|k| k.ers)),
];

/// Whether the threats table adds anything to Table 1: some run measured the objectives or
/// ran the ranking suite.
pub fn has_threat_figures(reports: &[MethodReport]) -> bool {
    reports
        .iter()
        .any(|r| r.objectives.is_some() || r.ranking.is_some())
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

/// What `eval` and `attack` (PGD on one model or ensemble) measured.
#[derive(Serialize)]
pub struct EvalOutput {
    pub checkpoint: String,
    pub dataset: String,
    pub clean: Metrics,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pgd_clustering: Option<Metrics>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pgd_template: Option<TemplateMetrics>,
    /// The attack's parameters and the wall time of the embedding pass with it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attack: Option<PgdConfig>,
    pub seconds: f64,
}

/// What `attack` with other objectives, APGD or a transfer source measured.
#[derive(Serialize)]
pub struct StrengthOutput {
    pub checkpoint: String,
    pub dataset: String,
    /// The scenarios the table shows; the rows carry the figures of both (the attack is the
    /// same, only the gallery differs, so both cost one attack).
    pub scenario: Scenario,
    pub clean: Metrics,
    /// The target attacked through itself, one row per objective.
    pub white_box: Vec<AttackRow>,
    /// With three objectives: per metric, the lowest white-box value and its objective.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub worst: Vec<WorstMetric>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transfer_from: Option<String>,
    /// Made on the source, evaluated on the target, one row per objective.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub transfer: Vec<AttackRow>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub checks: Vec<SanityCheck>,
}
