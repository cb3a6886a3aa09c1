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
}

/// The template-matching scenario measures retrieval only: no clustering, so no NMI or F1.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TemplateMetrics {
    /// Recall@1, @2, @4, @8.
    pub recall: [f64; 4],
    pub map_r: f64,
}

impl From<&Metrics> for TemplateMetrics {
    fn from(m: &Metrics) -> Self {
        TemplateMetrics {
            recall: m.recall,
            map_r: m.map_r,
        }
    }
}

fn serialize_retrieval_only<S: Serializer>(m: &Metrics, s: S) -> Result<S::Ok, S::Error> {
    TemplateMetrics::from(m).serialize(s)
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Projection {
    pub clean: Vec<(f32, f32)>,
    pub attacked: Vec<(f32, f32)>,
    pub labels: Vec<usize>,
}

/// The paper's Table 1: NMI, F1, R@1/2/4/8 for clean and PGD rows of each method, plus the
/// template-matching Recall@1 beside the clustering one.
pub fn table_markdown(reports: &[MethodReport], title: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "### {title}\n");
    let _ = writeln!(
        s,
        "| method | input | NMI | F1 | R@1 | R@2 | R@4 | R@8 | MAP@R | R@1 template |"
    );
    let _ = writeln!(
        s,
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for r in reports {
        for (input, m, t) in [
            ("clean", &r.clean, None),
            ("PGD", &r.pgd, Some(r.pgd_template.recall[0])),
        ] {
            let _ = writeln!(
                s,
                "| {} | {input} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {} |",
                r.label,
                m.nmi,
                m.f1,
                m.recall[0],
                m.recall[1],
                m.recall[2],
                m.recall[3],
                m.map_r,
                t.map_or("".to_string(), |v| format!("{v:.2}"))
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
            .build_cartesian_2d(x0..x1, 0.0..100.0)
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
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(svg_error)?;
        root.present().map_err(svg_error)?;
    }
    Ok(svg)
}

/// Figure 4: clean and PGD Recall@1 of each ensemble member alone.
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
            .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), 0.0..100.0)
            .map_err(svg_error)?;
        chart
            .configure_mesh()
            .x_desc("member")
            .y_desc("Recall@1 (%)")
            .x_labels(n.max(1))
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
                    let x = i as f64 + offset;
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
            .border_style(BLACK)
            .draw()
            .map_err(svg_error)?;
        root.present().map_err(svg_error)?;
    }
    Ok(svg)
}

/// Figure 1: clean (dots) and attacked (crosses) test embeddings in 2-D, coloured by class.
fn projection_svg(label: &str, p: &Projection) -> Result<String, String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (420, 420)).into_drawing_area();
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
            .caption(
                format!("{label}: clean (o) vs attacked (x)"),
                ("sans-serif", 15),
            )
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(svg_error)?;
        chart
            .configure_mesh()
            .disable_mesh()
            .draw()
            .map_err(svg_error)?;
        chart
            .draw_series(
                p.clean
                    .iter()
                    .zip(&p.labels)
                    .map(|(&pt, &l)| Circle::new(pt, 3, PALETTE[l % 8].filled())),
            )
            .map_err(svg_error)?;
        chart
            .draw_series(
                p.attacked
                    .iter()
                    .zip(&p.labels)
                    .map(|(&pt, &l)| Cross::new(pt, 3, PALETTE[l % 8].stroke_width(1))),
            )
            .map_err(svg_error)?;
        root.present().map_err(svg_error)?;
    }
    Ok(svg)
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A self-contained HTML page: the table, the robustness curves, Figure 4 and Figure 1.
pub fn html_report(
    reports: &[MethodReport],
    title: &str,
    config_json: &str,
) -> Result<String, String> {
    let mut h = String::new();
    let _ = write!(
        h,
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{t}</title>\
         <style>body{{font-family:sans-serif;max-width:1100px;margin:auto}}table{{border-collapse:collapse}}\
         td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}figure{{display:inline-block;margin:6px}}</style>\
         </head><body><h1>{t}</h1>",
        t = html_escape(title)
    );
    h.push_str("<h2>Table 1 layout (percent)</h2><table><tr><th>method</th><th>input</th><th>NMI</th><th>F1</th><th>R@1</th><th>R@2</th><th>R@4</th><th>R@8</th><th>MAP@R</th><th>R@1 template</th></tr>");
    for r in reports {
        for (input, m, t) in [
            ("clean", &r.clean, String::new()),
            ("PGD", &r.pgd, format!("{:.2}", r.pgd_template.recall[0])),
        ] {
            let _ = write!(
                h,
                "<tr><td style=\"text-align:left\">{}</td><td>{input}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{t}</td></tr>",
                html_escape(&r.label), m.nmi, m.f1, m.recall[0], m.recall[1], m.recall[2], m.recall[3], m.map_r
            );
        }
    }
    h.push_str("</table><h2>Robustness curves (clustering scenario)</h2>");
    let figures = [
        curve_svg(
            reports,
            |r| &r.steps_curve,
            |p| p.recall1,
            "PGD steps",
            "Recall@1 (%)",
        )?,
        curve_svg(reports, |r| &r.steps_curve, |p| p.f1, "PGD steps", "F1 (%)")?,
        curve_svg(
            reports,
            |r| &r.eps_curve,
            |p| p.recall1,
            "eps (x/255)",
            "Recall@1 (%)",
        )?,
        curve_svg(reports, |r| &r.eps_curve, |p| p.f1, "eps (x/255)", "F1 (%)")?,
    ];
    for f in figures {
        let _ = write!(h, "<figure>{f}</figure>");
    }
    for r in reports.iter().filter(|r| !r.members.is_empty()) {
        let _ = write!(
            h,
            "<h2>{}: ensemble members (Figure 4)</h2><figure>{}</figure>",
            html_escape(&r.label),
            members_svg(r)?
        );
    }
    h.push_str("<h2>Clean versus attacked embeddings (Figure 1)</h2>");
    for r in reports {
        if let Some(p) = &r.projection {
            let _ = write!(h, "<figure>{}</figure>", projection_svg(&r.label, p)?);
        }
    }
    let _ = write!(
        h,
        "<h2>Configuration</h2><pre>{}</pre></body></html>",
        html_escape(config_json)
    );
    Ok(h)
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
