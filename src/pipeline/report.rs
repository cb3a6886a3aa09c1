//! The experiment's outputs: the paper's Table 1 layout (terminal and Markdown) and an HTML
//! report whose plots (SVG, drawn with `plotters`) are the paper's Figures 1 and 4 and the
//! Recall@1 / F1 curves against PGD steps and eps.

use std::fmt::Write as _;

use plotters::prelude::*;
use serde::{Deserialize, Serialize, Serializer};

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
        let [r1, r2, r4, r8] = self.recall.map(two_decimals);
        [
            two_decimals(self.nmi),
            two_decimals(self.f1),
            r1,
            r2,
            r4,
            r8,
            two_decimals(self.map_r),
        ]
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

fn two_decimals(v: f64) -> String {
    format!("{v:.2}")
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
    /// The ranking-attack suite and its ERS (SPEC section 11), when the plan asks for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ranking: Option<crate::pipeline::ranking::RankingReport>,
    /// Sanity checks of the evaluation attack, each pass or fail with its numbers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sanity: Vec<crate::pipeline::sanity::SanityCheck>,
    /// What the sanity probe measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sanity_probe: Option<crate::pipeline::sanity::AttackProbe>,
    /// The evaluation attack with every objective on a subset, and the worst per metric.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub objectives: Option<crate::pipeline::strength::ObjectivesReport>,
    /// Adversarial examples made on the undefended model, evaluated on this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transfer: Option<crate::pipeline::strength::TransferReport>,
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

/// The paper's Table 1: NMI, F1, R@1/2/4/8 for clean and PGD rows of each method, plus the
/// template-matching Recall@1 beside the clustering one.
pub fn table_markdown(reports: &[MethodReport], title: &str) -> String {
    let mut s = format!(
        "### {title}\n\n{}",
        markdown_header(&["method", "input"], &["R@1 template"])
    );
    for r in reports {
        for (input, m, template) in [
            ("clean", &r.clean, String::new()),
            ("PGD", &r.pgd, two_decimals(r.pgd_template.recall[0])),
        ] {
            let _ = writeln!(
                s,
                "| {} | {input} | {} | {template} |",
                r.label,
                m.cells().join(" | ")
            );
        }
    }
    s
}

const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

fn svg_error(e: impl std::fmt::Display) -> String {
    format!("plotting failed: {e}")
}

/// The y range of a curve chart: from a multiple of 10 above the highest point down to one low
/// enough that the lowest point sits above the lower 35% of the chart (the legend's place),
/// within 0-100. Differences of a few points stay visible, which a fixed 0-100 axis flattens.
fn curve_y_range(
    reports: &[MethodReport],
    curve: &impl Fn(&MethodReport) -> &Vec<CurvePoint>,
    value: &impl Fn(&CurvePoint) -> f64,
) -> std::ops::Range<f64> {
    let values: Vec<f64> = reports
        .iter()
        .flat_map(|r| curve(r).iter().map(value))
        .collect();
    let lowest = values.iter().copied().fold(100.0f64, f64::min);
    let highest = values.iter().copied().fold(0.0f64, f64::max);
    let top = ((highest + 5.0) / 10.0).ceil() * 10.0;
    let top = top.clamp(10.0, 100.0);
    let bottom = lowest - 0.6 * (top - lowest);
    let bottom = ((bottom / 10.0).floor() * 10.0).clamp(0.0, top - 10.0);
    bottom..top
}

/// One line per method of `value` against the curve's x.
fn curve_svg(
    reports: &[MethodReport],
    curve: impl Fn(&MethodReport) -> &Vec<CurvePoint>,
    value: impl Fn(&CurvePoint) -> f64,
    x_label: &str,
    y_label: &str,
) -> Result<String, String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (520, 340)).into_drawing_area();
        root.fill(&WHITE).map_err(svg_error)?;
        let xs: Vec<f64> = reports
            .iter()
            .flat_map(|r| curve(r).iter().map(|p| p.x))
            .collect();
        let (x0, x1) = xs
            .iter()
            .fold((f64::MAX, f64::MIN), |(a, b), &x| (a.min(x), b.max(x)));
        let (x0, x1) = if x0 < x1 { (x0, x1) } else { (0.0, 1.0) };
        let mut chart = ChartBuilder::on(&root)
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(44)
            .build_cartesian_2d(x0..x1, curve_y_range(reports, &curve, &value))
            .map_err(svg_error)?;
        chart
            .configure_mesh()
            .x_desc(x_label)
            .y_desc(y_label)
            .draw()
            .map_err(svg_error)?;
        for (i, r) in reports.iter().enumerate() {
            let color = PALETTE[i % PALETTE.len()];
            let pts: Vec<(f64, f64)> = curve(r).iter().map(|p| (p.x, value(p))).collect();
            chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                .map_err(svg_error)?
                .label(r.label.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
                });
            chart
                .draw_series(pts.into_iter().map(|p| Circle::new(p, 3, color.filled())))
                .map_err(svg_error)?;
        }
        // Attacks pull the curves down to the right: the lower left stays clear.
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(svg_error)?;
        root.present().map_err(svg_error)?;
    }
    Ok(svg)
}

/// Figure 4: clean and PGD Recall@1 of each ensemble member alone (members numbered from 1).
fn members_svg(r: &MethodReport) -> Result<String, String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (520, 340)).into_drawing_area();
        root.fill(&WHITE).map_err(svg_error)?;
        let n = r.members.len();
        let mut chart = ChartBuilder::on(&root)
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(44)
            .caption(format!("{}: members alone", r.label), ("sans-serif", 16))
            .build_cartesian_2d(0.5f64..(n as f64 + 0.5), 0.0..100.0)
            .map_err(svg_error)?;
        // Ticks only at the members' whole numbers: 1, 2, 3 (never 0.0 or 1.5).
        let whole = |x: &f64| {
            let k = x.round();
            if (x - k).abs() < 1e-6 && k >= 1.0 && k <= n as f64 {
                format!("{k:.0}")
            } else {
                String::new()
            }
        };
        chart
            .configure_mesh()
            .x_desc("member")
            .y_desc("Recall@1 (%)")
            .x_labels(2 * n + 1)
            .x_label_formatter(&whole)
            .disable_x_mesh()
            .draw()
            .map_err(svg_error)?;
        for (series, (offset, color, name)) in
            [(-0.15, PALETTE[0], "clean"), (0.15, PALETTE[3], "PGD")]
                .into_iter()
                .enumerate()
        {
            chart
                .draw_series(r.members.iter().enumerate().map(|(i, m)| {
                    let v = if series == 0 { m.0 } else { m.1 };
                    let x = (i + 1) as f64 + offset;
                    Rectangle::new([(x - 0.12, 0.0), (x + 0.12, v)], color.filled())
                }))
                .map_err(svg_error)?
                .label(name)
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled())
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(svg_error)?;
        root.present().map_err(svg_error)?;
    }
    Ok(svg)
}

/// Figure 1: clean (dots) and attacked (crosses) test embeddings in 2-D, coloured by class,
/// with a line from each clean point to its attacked one.
fn projection_svg(label: &str, p: &Projection) -> Result<String, String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (520, 470)).into_drawing_area();
        root.fill(&WHITE).map_err(svg_error)?;
        let all = p.clean.iter().chain(&p.attacked);
        let (mut lo, mut hi) = ((f32::MAX, f32::MAX), (f32::MIN, f32::MIN));
        for &(x, y) in all {
            lo = (lo.0.min(x), lo.1.min(y));
            hi = (hi.0.max(x), hi.1.max(y));
        }
        let pad = |a: f32, b: f32| {
            if a < b {
                (a - 0.05 * (b - a), b + 0.05 * (b - a))
            } else {
                (a - 1.0, a + 1.0)
            }
        };
        let (x0, x1) = pad(lo.0, hi.0);
        let (y0, y1) = pad(lo.1, hi.1);
        let mut chart = ChartBuilder::on(&root)
            .margin(10)
            .x_label_area_size(28)
            .y_label_area_size(36)
            .caption(
                format!("{label}: clean (o), attacked (x)"),
                ("sans-serif", 15),
            )
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(svg_error)?;
        chart
            .configure_mesh()
            .disable_mesh()
            .x_desc("PC 1")
            .y_desc("PC 2")
            .x_labels(5)
            .y_labels(5)
            .draw()
            .map_err(svg_error)?;
        let color = |l: usize| PALETTE[l % PALETTE.len()];
        chart
            .draw_series(
                p.clean
                    .iter()
                    .zip(&p.attacked)
                    .zip(&p.labels)
                    .map(|((&a, &b), &l)| PathElement::new(vec![a, b], color(l).mix(0.45))),
            )
            .map_err(svg_error)?;
        let mut classes: Vec<usize> = p.labels.clone();
        classes.sort_unstable();
        classes.dedup();
        for &class in &classes {
            let name = p
                .class_names
                .get(class)
                .cloned()
                .unwrap_or_else(|| format!("class {class}"));
            let c = color(class);
            let of_class = || {
                p.labels
                    .iter()
                    .enumerate()
                    .filter(move |&(_, &l)| l == class)
            };
            chart
                .draw_series(of_class().map(|(i, _)| Circle::new(p.clean[i], 3, c.filled())))
                .map_err(svg_error)?
                .label(name)
                .legend(move |(x, y)| Circle::new((x + 6, y), 4, c.filled()));
            chart
                .draw_series(
                    of_class().map(|(i, _)| Cross::new(p.attacked[i], 3, c.stroke_width(1))),
                )
                .map_err(svg_error)?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 12))
            .draw()
            .map_err(svg_error)?;
        root.present().map_err(svg_error)?;
    }
    Ok(svg)
}

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
    let steps_how = format!(
        "Recall@1 of every method as the attack gets more PGD steps at the evaluation eps and \
         step size (k steps are the first k of the evaluation attack's path); 0 steps is the \
         clean score. A flat line is a robust model; the higher the line at the right, the \
         better.{on}"
    );
    let eps_how = format!(
        "The same, as the attack's budget eps grows at the evaluation steps (the step size \
         grows with eps); eps 0 is the clean score.{on}"
    );
    let f1_how = "Pair-counting F1 of k-means clustering (the paper's clustering metric) on \
                  the same attacked images; higher is better.";
    let figures = [
        (
            curve_svg(
                reports,
                |r| &r.steps_curve,
                |p| p.recall1,
                "PGD steps",
                "Recall@1 (%)",
            )?,
            steps_how.clone(),
        ),
        (
            curve_svg(reports, |r| &r.steps_curve, |p| p.f1, "PGD steps", "F1 (%)")?,
            f1_how.to_string(),
        ),
        (
            curve_svg(
                reports,
                |r| &r.eps_curve,
                |p| p.recall1,
                "eps (x/255)",
                "Recall@1 (%)",
            )?,
            eps_how,
        ),
        (
            curve_svg(reports, |r| &r.eps_curve, |p| p.f1, "eps (x/255)", "F1 (%)")?,
            f1_how.to_string(),
        ),
    ];
    for (svg, caption) in &figures {
        h.push_str(&figure(svg, caption));
    }
    for r in reports.iter().filter(|r| !r.members.is_empty()) {
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
    for r in reports {
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
    h.push_str(&crate::pipeline::sanity::sanity_html(reports));
    for r in reports {
        h.push_str(&crate::pipeline::strength::strength_html(
            &r.label,
            r.objectives.as_ref(),
            r.transfer.as_ref(),
        ));
    }
    h.push_str(&crate::pipeline::ranking::ranking_html(reports));
    h.push_str(&settings_html(reports, info));
    let _ = write!(
        h,
        "<details><summary>Configuration (JSON)</summary><pre>{}</pre></details></body></html>",
        html_escape(&info.config_json)
    );
    Ok(h)
}

/// The Table 1 layout as HTML, with how to read it.
fn results_table(reports: &[MethodReport]) -> String {
    let headers: String = METRIC_COLUMNS
        .iter()
        .chain(&["R@1 template"])
        .map(|name| format!("<th>{name}</th>"))
        .collect();
    let mut h = format!(
        "<h2>Results (Table 1 layout, percent)</h2><table><tr><th class=\"l\">method</th>\
         <th>input</th>{headers}</tr>"
    );
    for r in reports {
        for (input, m, template) in [
            ("clean", &r.clean, String::new()),
            ("PGD", &r.pgd, two_decimals(r.pgd_template.recall[0])),
        ] {
            let cells: String = m.cells().iter().map(|c| format!("<td>{c}</td>")).collect();
            let _ = write!(
                h,
                "<tr><td class=\"l\">{}</td><td>{input}</td>{cells}<td>{template}</td></tr>",
                html_escape(&r.label)
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
    let _ = write!(
        h,
        "</table><p class=\"how\"><b>How to read this:</b> each method has a clean row and a \
         PGD row. PGD is the clustering scenario: every test image attacked, metrics on the \
         attacked embeddings alone. R@1 template is the template-matching scenario: attacked \
         queries against the clean gallery. Higher is better everywhere; robustness is the PGD \
         row, its cost the clean row's drop against PAL. An ensemble's rows are its members' \
         vote.{per_image}</p>"
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

/// A point of a 2-D projection.
pub type Point2 = (f32, f32);

/// A 2-D PCA projection of rows of `a` and `b` (D wide) on the top two principal axes of `a`
/// (power iteration; deterministic).
pub fn pca_2d(a: &[f32], b: &[f32], d: usize) -> (Vec<Point2>, Vec<Point2>) {
    let n = a.len() / d.max(1);
    let mut mean = vec![0.0f64; d];
    for row in a.chunks(d) {
        for (m, &v) in mean.iter_mut().zip(row) {
            *m += v as f64 / n.max(1) as f64;
        }
    }
    let centred =
        |row: &[f32]| -> Vec<f64> { row.iter().zip(&mean).map(|(&v, m)| v as f64 - m).collect() };
    let rows: Vec<Vec<f64>> = a.chunks(d).map(centred).collect();
    let mut axes: Vec<Vec<f64>> = Vec::new();
    for k in 0..2 {
        let mut v: Vec<f64> = (0..d)
            .map(|i| ((i * 7 + k * 3) % 11) as f64 + 1.0)
            .collect();
        for _ in 0..100 {
            let mut w = vec![0.0; d];
            for r in &rows {
                let dot: f64 = r.iter().zip(&v).map(|(x, y)| x * y).sum();
                for (wi, ri) in w.iter_mut().zip(r) {
                    *wi += dot * ri;
                }
            }
            for u in &axes {
                let dot: f64 = w.iter().zip(u).map(|(x, y)| x * y).sum();
                for (wi, ui) in w.iter_mut().zip(u) {
                    *wi -= dot * ui;
                }
            }
            let norm = w.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
            v = w.into_iter().map(|x| x / norm).collect();
        }
        axes.push(v);
    }
    let project = |data: &[f32]| -> Vec<(f32, f32)> {
        data.chunks(d)
            .map(|row| {
                let c = centred(row);
                let p = |u: &Vec<f64>| c.iter().zip(u).map(|(x, y)| x * y).sum::<f64>() as f32;
                (p(&axes[0]), p(&axes[1]))
            })
            .collect()
    };
    (project(a), project(b))
}
