//! What the `eval` and `attack` commands measured, and the Markdown tables they print. Their
//! metric cells come from [`Metrics::cells`], as those of the experiment's Table 1 do.

use serde::Serialize;

use crate::config::{Optimizer, PgdConfig, Scenario};
use crate::pipeline::report::{
    markdown_columns, markdown_header, Metrics, TemplateMetrics, TEMPLATE_COLUMNS,
};
use crate::pipeline::sanity::SanityCheck;
use crate::pipeline::strength::{AttackRow, WorstMetric};

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

/// The rows `eval` and `attack` measured, as a Markdown table (a row only for what was run),
/// under a title that names the checkpoint, the dataset and the attack.
pub fn eval_table(out: &EvalOutput, label: &str) -> String {
    let mut s = format!(
        "### {}\n\n{}",
        eval_title(out),
        markdown_header(&["method", "input"], &[])
    );
    let mut row = |input: &str, cells: [String; 7]| {
        s += &format!("| {label} | {input} | {} |\n", cells.join(" | "));
    };
    row("clean", out.clean.cells());
    if let Some(m) = &out.pgd_clustering {
        row("PGD (clustering)", m.cells());
    }
    if let Some(m) = &out.pgd_template {
        row("PGD (template)", m.cells());
    }
    s
}

fn eval_title(out: &EvalOutput) -> String {
    let (checkpoint, dataset) = (&out.checkpoint, &out.dataset);
    match &out.attack {
        Some(c) => format!(
            "{checkpoint} on {dataset}: PGD-{} eps {:.1}/255 alpha {:.2}/255{}{}, {:.1} s",
            c.steps,
            c.eps * 255.0,
            c.alpha * 255.0,
            if c.random_start { ", random start" } else { "" },
            if c.restarts > 1 {
                format!(", best of {} random restarts", c.restarts)
            } else {
                String::new()
            },
            out.seconds
        ),
        None => format!("{checkpoint} on {dataset}"),
    }
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

/// The rows of a [`StrengthOutput`] as Markdown: clean, each white-box and transfer attack with
/// its parameters and wall time, the worst per metric, then the sanity checks. The clustering
/// columns (the metrics) and the template-matching ones (R@1 and MAP@R) appear as the
/// output's scenario asks.
pub fn strength_table(out: &StrengthOutput, label: &str) -> String {
    let (clustering, template) = (out.scenario.clustering(), out.scenario.template());
    let trailing: &[&str] = if template {
        &[TEMPLATE_COLUMNS[0], TEMPLATE_COLUMNS[1], "s"]
    } else {
        &["s"]
    };
    let header = if clustering {
        markdown_header(&["method", "input"], trailing)
    } else {
        let names: Vec<&str> = ["method", "input"]
            .iter()
            .chain(trailing)
            .copied()
            .collect();
        markdown_columns(&names, 2)
    };
    let mut s = format!("### {} on {}\n\n{header}", out.checkpoint, out.dataset);
    // One row: the metric cells (clustering), then template R@1 and MAP@R, then the rest.
    let mut row = |input: &str, metrics: [String; 7], tail: [String; 2], rest: &[String]| {
        let mut cells: Vec<String> = Vec::new();
        if clustering {
            cells.extend(metrics);
        }
        if template {
            cells.extend(tail);
        }
        cells.extend(rest.iter().cloned());
        s += &format!("| {label} | {input} | {} |\n", cells.join(" | "));
    };
    // Clean, the template scenario's figures are the clustering ones; they are written there
    // only when the clustering columns are not shown.
    let clean_tail = if clustering {
        [String::new(), String::new()]
    } else {
        out.clean.template_cells()
    };
    row("clean", out.clean.cells(), clean_tail, &[String::new()]);
    for r in &out.white_box {
        let input = format!("white-box {}", attack_description(r));
        row(
            &input,
            r.clustering.cells(),
            r.template.template_cells(),
            &[format!("{:.1}", r.seconds)],
        );
    }
    let source = out.transfer_from.as_deref().unwrap_or("");
    for r in &out.transfer {
        let input = format!("transfer from {source} {}", attack_description(r));
        row(
            &input,
            r.clustering.cells(),
            r.template.template_cells(),
            &[format!("{:.1}", r.seconds)],
        );
    }
    if !out.worst.is_empty() {
        let cells: Vec<String> = out
            .worst
            .iter()
            .map(|w| format!("{:.2} ({})", w.value, w.objective.key()))
            .collect();
        let (metrics, tail) = cells.split_at(cells.len().min(7));
        let metrics: [String; 7] =
            std::array::from_fn(|i| metrics.get(i).cloned().unwrap_or_default());
        let tail = [0, 1].map(|i| tail.get(i).cloned().unwrap_or_default());
        row("**worst (objective)**", metrics, tail, &[String::new()]);
    }
    for c in &out.checks {
        s += &format!(
            "\n{}: {} ({})",
            c.name,
            if c.passed { "pass" } else { "FAIL" },
            c.detail
        );
    }
    s
}

/// The attack of a row with its parameters, e.g. "PGD-10 shift eps 8.0/255 alpha 2.00/255".
fn attack_description(r: &AttackRow) -> String {
    let (Some(c), Some(o)) = (r.attack, r.objective) else {
        return "attacked".into();
    };
    format!(
        "{}-{} {} eps {:.1}/255{}{}",
        c.optimizer.key(),
        c.steps,
        o.key(),
        c.eps * 255.0,
        if c.optimizer == Optimizer::Pgd {
            format!(" alpha {:.2}/255", c.alpha * 255.0)
        } else {
            String::new()
        },
        if c.restarts > 1 {
            format!(", best of {} restarts", c.restarts)
        } else {
            String::new()
        }
    )
}
