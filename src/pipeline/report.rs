//! The experiment's HTML report: Table 1, every method on both threats, the plots of `plots`
//! (the paper's Figures 1 and 4 and the Recall@1 / F1 curves against PGD steps and eps), the
//! sanity, strength and ranking sections and the settings. It only reads
//! [`crate::pipeline::results`].

use std::fmt::Write as _;

use crate::pipeline::plots::{curve_svg, members_svg, projection_svg};
use crate::pipeline::results::{
    has_threat_figures, MethodReport, ObjectivesReport, TransferReport, METRIC_COLUMNS,
    WORST_METRICS,
};
use crate::pipeline::spread::{by_method, has_seeds, labeled_by_seed};
use crate::pipeline::tables::{attack_name, metric_cells, threat_table, TRAILING};
use crate::robust::ranking::RankAttack;

pub(crate) fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// What the report states about the run besides the measurements: the data, the device and
/// the settings (label, value), in the order shown.
#[derive(Clone, Debug, Default)]
pub struct RunInfo {
    pub title: String,
    pub settings: Vec<(String, String)>,
    /// The experiment's configuration as JSON (shown folded, for the record).
    pub config_json: String,
}

const STYLE: &str = "body{font-family:sans-serif;max-width:1120px;margin:auto;padding:0 12px;color:#222}\
table{border-collapse:collapse;margin:6px 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}\
th{background:#f4f4f4}td.l,th.l{text-align:left}figure{display:inline-block;margin:6px;vertical-align:top}\
figcaption,p.how{font-size:13px;color:#555;max-width:520px}p.how{max-width:none}";

/// The sentence under a figure that says how to read it.
fn how(text: &str) -> String {
    format!(
        "<figcaption><b>How to read this:</b> {}</figcaption>",
        html_escape(text)
    )
}

fn figure(svg: &str, caption: &str) -> String {
    format!("<figure>{svg}{}</figure>", how(caption))
}

/// A self-contained HTML page: the run's settings, the table, the robustness curves, Figure 4
/// (EAT's members) and Figure 1 (the projection), each with a line on how to read it.
pub fn html_report(reports: &[MethodReport], info: &RunInfo) -> Result<String, String> {
    let mut h = String::new();
    let _ = write!(
        h,
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{t}</title>\
         <style>{STYLE}</style></head><body><h1>{t}</h1>",
        t = html_escape(&info.title)
    );
    h.push_str(&results_table(reports));
    h.push_str(&threats_html(reports));
    let methods = by_method(reports);
    let per_run = labeled_by_seed(reports);
    h.push_str("<h2>Robustness curves (clustering scenario)</h2>");
    let samples = reports.iter().map(|r| r.curve_samples).max().unwrap_or(0);
    let on = if samples > 0 {
        format!(
            " Each point is measured on the same {samples} test images (one image is {:.2} points); \
             Recall@1 among fewer images is lower, so the clean point sits below the table's clean \
             row.",
            100.0 / samples as f64
        )
    } else {
        String::new()
    };
    let band = if has_seeds(reports) {
        " A method run with several seeds is drawn at its mean, in a band of one standard \
         deviation either side."
    } else {
        ""
    };
    let steps_how = format!(
        "Recall@1 of every method as the attack gets more PGD steps at the evaluation eps and \
         step size (k steps are the first k of the evaluation attack's path); 0 steps is the \
         clean score. A flat line is a robust model; the higher the line at the right, the \
         better.{on}{band}"
    );
    let eps_how = format!(
        "The same, as the attack's budget eps grows at the evaluation steps (the step size \
         grows with eps); eps 0 is the clean score.{on}{band}"
    );
    let f1_how = "Pair-counting F1 of k-means clustering (the paper's clustering metric) on \
                  the same attacked images; higher is better.";
    let figures = [
        (
            curve_svg(
                &methods,
                |r| &r.steps_curve,
                |p| p.recall1,
                "PGD steps",
                "Recall@1 (%)",
            )?,
            steps_how.clone(),
        ),
        (
            curve_svg(
                &methods,
                |r| &r.steps_curve,
                |p| p.f1,
                "PGD steps",
                "F1 (%)",
            )?,
            f1_how.to_string(),
        ),
        (
            curve_svg(
                &methods,
                |r| &r.eps_curve,
                |p| p.recall1,
                "eps (x/255)",
                "Recall@1 (%)",
            )?,
            eps_how,
        ),
        (
            curve_svg(
                &methods,
                |r| &r.eps_curve,
                |p| p.f1,
                "eps (x/255)",
                "F1 (%)",
            )?,
            f1_how.to_string(),
        ),
    ];
    for (svg, caption) in &figures {
        h.push_str(&figure(svg, caption));
    }
    for r in per_run.iter().filter(|r| !r.members.is_empty()) {
        let _ = write!(
            h,
            "<h2>{}: ensemble members (Figure 4)</h2>{}",
            html_escape(&r.label),
            figure(
                &members_svg(r)?,
                "Recall@1 of each member alone, clean (blue) and under the attack on the whole \
                 ensemble (red). The table's row is the members' vote; a vote above every \
                 member's red bar is what the ensemble adds."
            )
        );
    }
    h.push_str("<h2>Clean versus attacked embeddings (Figure 1)</h2>");
    for r in &per_run {
        if let Some(p) = &r.projection {
            h.push_str(&figure(
                &projection_svg(&r.label, p)?,
                &format!(
                    "{} test images projected on the two main axes of their clean embeddings \
                     (PCA; ensembles: the members' mean). Dots are clean, crosses attacked, \
                     colour is the class; each line is one image's shift. Short lines and \
                     crosses that stay in their own colour's cluster mean a robust model.",
                    p.labels.len()
                ),
            ));
        }
    }
    h.push_str(&sanity_html(&per_run));
    for r in &per_run {
        h.push_str(&strength_html(
            &r.label,
            r.objectives.as_ref(),
            r.transfer.as_ref(),
        ));
    }
    h.push_str(&ranking_html(&per_run));
    h.push_str(&settings_html(&per_run, info));
    let _ = write!(
        h,
        "<details><summary>Configuration (JSON)</summary><pre>{}</pre></details></body></html>",
        html_escape(&info.config_json)
    );
    Ok(h)
}

/// The Table 1 layout as HTML, with how to read it; several seeds as in the Markdown table.
fn results_table(reports: &[MethodReport]) -> String {
    let several = has_seeds(reports);
    let headers: String = METRIC_COLUMNS
        .iter()
        .chain(&["R@1 template"])
        .map(|name| format!("<th>{name}</th>"))
        .collect();
    let seeds_header = if several { "<th>seeds</th>" } else { "" };
    let mut h = format!(
        "<h2>Results (Table 1 layout, percent)</h2><table><tr><th class=\"l\">method</th>\
         {seeds_header}<th>input</th>{headers}</tr>"
    );
    for g in by_method(reports) {
        let seeds = if several {
            format!("<td>{}</td>", g.seeds())
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
            let cells: String = cells.iter().map(|c| format!("<td>{c}</td>")).collect();
            let _ = write!(
                h,
                "<tr><td class=\"l\">{}</td>{seeds}<td>{input}</td>{cells}<td>{template}</td></tr>",
                html_escape(g.label)
            );
        }
    }
    let tested = reports.iter().map(|r| r.test_samples).max().unwrap_or(0);
    let per_image = if tested > 0 {
        format!(
            " The rows use {tested} test images (one image is {:.2} points of R@1).",
            100.0 / tested as f64
        )
    } else {
        String::new()
    };
    let spread = if several {
        " With several seeds, each figure is the mean over the seeds ± their standard \
         deviation (n - 1); metrics.json keeps every seed's figures, and the sections below \
         show each seed on its own."
    } else {
        ""
    };
    let _ = write!(
        h,
        "</table><p class=\"how\"><b>How to read this:</b> each method has a clean row and a \
         PGD row. PGD is the clustering scenario: every test image attacked, metrics on the \
         attacked embeddings alone. R@1 template is the template-matching scenario: attacked \
         queries against the clean gallery. Higher is better everywhere; robustness is the PGD \
         row, its cost the clean row's drop against PAL. An ensemble's rows are its members' \
         vote.{per_image}{spread}</p>"
    );
    h
}

/// Every method on both threats, as the Markdown threats table (empty when no run measured
/// the objectives or the ranking suite).
fn threats_html(reports: &[MethodReport]) -> String {
    if !has_threat_figures(reports) {
        return String::new();
    }
    let several = has_seeds(reports);
    let table = threat_table(reports);
    let headers: String = table
        .columns
        .iter()
        .map(|name| format!("<th>{name}</th>"))
        .collect();
    let seeds_header = if several { "<th>seeds</th>" } else { "" };
    let mut h = format!(
        "<h2>Both threats, one row per method (percent)</h2><table><tr><th class=\"l\">method</th>\
         {seeds_header}{headers}</tr>"
    );
    for row in table.rows {
        let seeds = if several {
            format!("<td>{}</td>", row.seeds)
        } else {
            String::new()
        };
        let cells: String = row.cells.iter().map(|c| format!("<td>{c}</td>")).collect();
        let _ = write!(
            h,
            "<tr><td class=\"l\">{}</td>{seeds}{cells}</tr>",
            html_escape(&row.label)
        );
    }
    h.push_str(
        "</table><p class=\"how\"><b>How to read this:</b> one row per method, one figure per \
         threat. Clean R@1, then R@1 under the evaluation attack in the clustering and the \
         template-matching scenario (as in the table above), the lowest clustering R@1 over the \
         attack objectives (on their subset of the test set; section Attack objectives), and \
         robrank's ERS over its ranking-attack suite (higher is more robust); a column no \
         method measured is left out, and \"-\" marks a figure not measured for that method. \
         A defense that leads one column and not another is robust to one threat, not to \
         all.</p>",
    );
    h
}

/// The run's settings, and per method its wall times and how far its attack moved the images.
fn settings_html(reports: &[MethodReport], info: &RunInfo) -> String {
    let mut h = String::from("<h2>Settings</h2><table>");
    for (k, v) in &info.settings {
        let _ = write!(
            h,
            "<tr><th class=\"l\">{}</th><td class=\"l\">{}</td></tr>",
            html_escape(k),
            html_escape(v)
        );
    }
    h.push_str(
        "</table><h2>Per method</h2><table><tr><th class=\"l\">method</th><th>train (s)</th>\
         <th>evaluation (s)</th><th>test images</th><th>curve images</th>\
         <th>mean max|x_adv - x|</th><th>largest max|x_adv - x|</th></tr>",
    );
    let linf = |v: Option<f32>| v.map_or("-".to_string(), |v| format!("{v:.4}"));
    for r in reports {
        let _ = write!(
            h,
            "<tr><td class=\"l\">{}</td><td>{:.0}</td><td>{:.0}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            html_escape(&r.label),
            r.train_seconds,
            r.eval_seconds,
            r.test_samples,
            r.curve_samples,
            linf(r.attack_linf.map(|a| a.0)),
            linf(r.attack_linf.map(|a| a.1)),
        );
    }
    h.push_str(
        "</table><p class=\"how\"><b>How to read this:</b> wall times on the device above. \
         The last two columns are the evaluation attack's per-image movement (L-infinity, \
         images in [0, 1]): an attack that works reaches its eps; one that stays near 0 \
         never left the clean point.</p>",
    );
    h
}

/// The HTML section of the ranking tables (empty when no method ran the suite).
pub fn ranking_html(reports: &[MethodReport]) -> String {
    let mut h = String::new();
    for r in reports {
        let Some(k) = &r.ranking else { continue };
        h += &format!(
            "<h2>{}: ranking attacks ({}, {} queries, database {})</h2><table><tr><th>score</th>\
             <th>attacked</th><th>+-eps noise</th><th>attack time (s)</th></tr>",
            html_escape(&r.label),
            k.profile,
            k.queries,
            k.database
        );
        for (a, t) in RankAttack::suite(k.gtm_target).iter().zip(&k.attacks) {
            for ((name, v), (_, nv)) in k.attacked.of(*a).into_iter().zip(k.noise.of(*a)) {
                h += &format!(
                    "<tr><td>{name}</td><td>{v:.2}</td><td>{nv:.2}</td><td>{:.1}</td></tr>",
                    t.seconds
                );
            }
        }
        h += &format!(
            "<tr><th>ERS</th><th>{:.1}</th><td>{:.1}</td><td></td></tr></table>",
            k.ers, k.noise_ers
        );
    }
    h
}

/// The HTML "Sanity" section.
pub fn sanity_html(reports: &[MethodReport]) -> String {
    let mut h = String::new();
    for r in reports.iter().filter(|r| !r.sanity.is_empty()) {
        h += &format!(
            "<h2>Sanity: {}</h2><table><tr><th>check</th><th>result</th><th>numbers</th></tr>",
            html_escape(&r.label)
        );
        for c in &r.sanity {
            h += &format!(
                "<tr><td style=\"text-align:left\">{}</td><td>{}</td><td style=\"text-align:left\">{}</td></tr>",
                html_escape(&c.name),
                if c.passed { "pass" } else { "<b>FAIL</b>" },
                html_escape(&c.detail)
            );
        }
        h += "</table>";
    }
    h
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
