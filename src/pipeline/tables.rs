//! Every Markdown table: the experiment's Table 1, the threats table, the sanity, strength and
//! ranking tables, and what the `eval` and `attack` commands print. They only read
//! [`crate::pipeline::results`]; their metric cells come from [`Metrics::cells`].

use std::fmt::Write as _;

use crate::config::{AttackChannels, AttackKind};
use crate::pipeline::results::{
    has_threat_figures, AttackRow, EvalOutput, MethodReport, ObjectivesReport, RankingReport,
    SanityCheck, StrengthOutput, ThreatRead, TransferReport, METRIC_COLUMNS, TEMPLATE_COLUMNS,
    THREAT_COLUMNS, WORST_METRICS,
};
use crate::pipeline::spread::{by_method, has_seeds};
use crate::robust::ranking::{RankAttack, RankPgd};

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

/// The attack title's note on grey images: said only when the channels are tied.
fn channels_note(channels: AttackChannels) -> &'static str {
    match channels {
        AttackChannels::Tied => ", channels tied",
        AttackChannels::Independent => "",
    }
}

fn eval_title(out: &EvalOutput) -> String {
    let (checkpoint, dataset) = (&out.checkpoint, &out.dataset);
    match &out.attack {
        Some(c) => format!(
            "{checkpoint} on {dataset}: PGD-{} eps {:.1}/255 alpha {:.2}/255{}{}{}, {:.1} s",
            c.steps,
            c.eps * 255.0,
            c.alpha * 255.0,
            if c.random_start { ", random start" } else { "" },
            channels_note(c.channels),
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
        c.kind.key(),
        c.steps,
        o.key(),
        c.eps * 255.0,
        if c.kind == AttackKind::Pgd {
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

/// The two lines that open a Markdown table: the `leading` columns (left-aligned), the metric
/// columns, then the `trailing` ones (right-aligned, as numbers are).
pub fn markdown_header(leading: &[&str], trailing: &[&str]) -> String {
    let names: Vec<&str> = leading
        .iter()
        .chain(&METRIC_COLUMNS)
        .chain(trailing)
        .copied()
        .collect();
    markdown_columns(&names, leading.len())
}

/// A Markdown table header of `names`, the first `left` of them left-aligned (labels) and the
/// rest right-aligned (numbers).
pub fn markdown_columns(names: &[&str], left: usize) -> String {
    let alignments: Vec<&str> = (0..names.len())
        .map(|i| if i < left { "---" } else { "---:" })
        .collect();
    format!(
        "| {} |\n| {} |\n",
        names.join(" | "),
        alignments.join(" | ")
    )
}

/// The paper's Table 1: NMI, F1, R@1/2/4/8 for clean and PGD rows of each method, plus the
/// template-matching Recall@1 beside the clustering one. A method run with several seeds has
/// one pair of rows, each figure the mean ± the standard deviation over its seeds, and its
/// seeds in a column of their own.
pub fn table_markdown(reports: &[MethodReport], title: &str) -> String {
    let several = has_seeds(reports);
    let leading: &[&str] = if several {
        &["method", "seeds", "input"]
    } else {
        &["method", "input"]
    };
    let mut s = format!(
        "### {title}\n\n{}",
        markdown_header(leading, &["R@1 template"])
    );
    for g in by_method(reports) {
        let seeds = if several {
            format!(" {} |", g.seeds())
        } else {
            String::new()
        };
        let rows = [
            ("clean", g.metric_cells(|r| &r.clean), String::new()),
            (
                "PGD",
                g.metric_cells(|r| &r.pgd),
                g.cell(|r| r.pgd_template.recall[0]),
            ),
        ];
        for (input, cells, template) in rows {
            let _ = writeln!(
                s,
                "| {} |{seeds} {input} | {} | {template} |",
                g.label,
                cells.join(" | ")
            );
        }
    }
    s
}

/// The threats table: the names of the columns some run measured (of [`THREAT_COLUMNS`]; a
/// column no run measured is left out rather than shown as dashes), and one row per method.
pub struct ThreatTable {
    pub columns: Vec<&'static str>,
    pub rows: Vec<ThreatRow>,
}

/// One row of the threats table: the method, its seeds, and a cell per shown column.
pub struct ThreatRow {
    pub label: String,
    pub seeds: String,
    pub cells: Vec<String>,
}

/// The threats table of `reports`, each figure over the method's seeds ("-" where none of its
/// seeds measured it).
pub fn threat_table(reports: &[MethodReport]) -> ThreatTable {
    let shown: Vec<(&'static str, ThreatRead)> = THREAT_COLUMNS
        .into_iter()
        .filter(|(_, read)| reports.iter().any(|r| read(r).is_some()))
        .collect();
    let rows = by_method(reports)
        .iter()
        .map(|g| ThreatRow {
            label: g.label.to_string(),
            seeds: g.seeds(),
            cells: shown.iter().map(|(_, read)| g.cell_if(read)).collect(),
        })
        .collect();
    ThreatTable {
        columns: shown.iter().map(|(name, _)| *name).collect(),
        rows,
    }
}

/// Every method on both threats, one row each (empty when no run measured the objectives or
/// the ranking suite, as Table 1 then says it all): clean R@1, R@1 under the evaluation attack
/// in both scenarios, the worst R@1 over the objectives and ERS.
pub fn threats_markdown(reports: &[MethodReport]) -> String {
    if !has_threat_figures(reports) {
        return String::new();
    }
    let several = has_seeds(reports);
    let table = threat_table(reports);
    let leading: &[&str] = if several {
        &["method", "seeds"]
    } else {
        &["method"]
    };
    let mut s = format!(
        "\n### Both threats, one row per method\n\n{}",
        markdown_columns(&[leading, &table.columns[..]].concat(), leading.len())
    );
    for row in table.rows {
        let seeds = if several {
            format!(" {} |", row.seeds)
        } else {
            String::new()
        };
        let _ = writeln!(s, "| {} |{seeds} {} |", row.label, row.cells.join(" | "));
    }
    s
}

/// The suite of one model as a Markdown table: per score, the attacked and the noise value.
pub fn ranking_markdown(label: &str, r: &RankingReport) -> String {
    let mut s = String::new();
    let p = r.pgd.unwrap_or(RankPgd {
        eps: 0.0,
        alpha: 0.0,
        steps: 0,
        channels: AttackChannels::Independent,
    });
    let tied = channels_note(p.channels);
    s += &format!(
        "#### Ranking attacks: {label} ({}: eps {:.0}/255, alpha {:.0}/255, {} steps{tied}; {} \
         queries against a database of {}; {:.1} s)\n\n",
        r.profile,
        p.eps * 255.0,
        p.alpha * 255.0,
        p.steps,
        r.queries,
        r.database,
        r.wall_seconds
    );
    s += "| score | attacked | +-eps noise | attack time (s) |\n| --- | ---: | ---: | ---: |\n";
    for (a, t) in RankAttack::suite(r.gtm_target).iter().zip(&r.attacks) {
        for ((name, v), (_, nv)) in r.attacked.of(*a).into_iter().zip(r.noise.of(*a)) {
            s += &format!("| {name} | {v:.2} | {nv:.2} | {:.1} |\n", t.seconds);
        }
    }
    s += &format!("| **ERS** | **{:.1}** | {:.1} | |\n", r.ers, r.noise_ers);
    s
}

/// One ranking table per method that ran the suite (empty when none did).
pub fn ranking_tables(reports: &[MethodReport]) -> String {
    reports
        .iter()
        .filter_map(|r| {
            r.ranking
                .as_ref()
                .map(|k| format!("\n{}", ranking_markdown(&r.label, k)))
        })
        .collect()
}

/// The checks as a Markdown table ("Sanity").
pub fn sanity_markdown(label: &str, checks: &[SanityCheck]) -> String {
    let mut s =
        format!("#### Sanity: {label}\n\n| check | result | numbers |\n| --- | --- | --- |\n");
    for c in checks {
        s += &format!(
            "| {} | {} | {} |\n",
            c.name,
            if c.passed { "pass" } else { "**FAIL**" },
            c.detail
        );
    }
    s
}

/// Sanity tables of every method that has checks.
pub fn sanity_tables(reports: &[MethodReport]) -> String {
    reports
        .iter()
        .filter(|r| !r.sanity.is_empty())
        .map(|r| format!("\n{}", sanity_markdown(&r.label, &r.sanity)))
        .collect()
}

/// Failed checks, one line each, for the terminal summary.
pub fn failed_lines(label: &str, checks: &[SanityCheck]) -> Vec<String> {
    checks
        .iter()
        .filter(|c| !c.passed)
        .map(|c| format!("SANITY FAIL [{label}] {}: {}", c.name, c.detail))
        .collect()
}

/// A row's nine metric cells: the clustering ones, then template R@1 and MAP@R.
pub(crate) fn metric_cells(r: &AttackRow) -> Vec<String> {
    let mut cells = r.clustering.cells().to_vec();
    cells.extend(r.template.template_cells());
    cells
}

/// The columns after the metric ones: template R@1 and MAP@R, then the wall time.
pub(crate) const TRAILING: [&str; 3] = [TEMPLATE_COLUMNS[0], TEMPLATE_COLUMNS[1], "s"];

pub(crate) fn header() -> String {
    markdown_header(&["input"], &TRAILING)
}

fn row_markdown(input: &str, r: &AttackRow) -> String {
    format!(
        "| {input} | {} | {:.1} |\n",
        metric_cells(r).join(" | "),
        r.seconds
    )
}

pub(crate) fn attack_name(r: &AttackRow) -> String {
    match (r.attack, r.objective) {
        (Some(a), Some(o)) => format!(
            "{}-{} {} (eps {:.1}/255)",
            a.kind.key(),
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

/// The objectives and transfer tables of every method that has them.
pub fn strength_tables(reports: &[MethodReport]) -> String {
    let mut s = String::new();
    for r in reports {
        if let Some(o) = &r.objectives {
            s += &format!("\n{}", objectives_markdown(&r.label, o));
        }
        if let Some(t) = &r.transfer {
            s += &format!("\n{}", transfer_markdown(&r.label, t));
        }
    }
    s
}
