//! The report's plots as SVG, drawn with `plotters`: the paper's Figures 1 and 4 (the 2-D
//! projection, the members' Recall@1) and the Recall@1 / F1 curves against PGD steps and eps.

use plotters::prelude::*;

use crate::pipeline::results::{CurvePoint, MethodReport, Projection};
use crate::pipeline::spread::{MethodSeeds, SpreadPoint};

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
fn curve_y_range(values: &[f64]) -> std::ops::Range<f64> {
    let lowest = values.iter().copied().fold(100.0f64, f64::min);
    let highest = values.iter().copied().fold(0.0f64, f64::max);
    let top = ((highest + 5.0) / 10.0).ceil() * 10.0;
    let top = top.clamp(10.0, 100.0);
    let bottom = lowest - 0.6 * (top - lowest);
    let bottom = ((bottom / 10.0).floor() * 10.0).clamp(0.0, top - 10.0);
    bottom..top
}

/// One line per method of `value` against the curve's x. A method with several seeds is drawn
/// at its mean over them, in a band of plus and minus one standard deviation.
pub(crate) fn curve_svg(
    methods: &[MethodSeeds],
    curve: impl Fn(&MethodReport) -> &Vec<CurvePoint>,
    value: impl Fn(&CurvePoint) -> f64,
    x_label: &str,
    y_label: &str,
) -> Result<String, String> {
    let lines: Vec<(&str, Vec<SpreadPoint>)> = methods
        .iter()
        .map(|g| (g.label, g.curve(&curve, &value)))
        .collect();
    let points = || lines.iter().flat_map(|(_, l)| l.iter());
    let ys: Vec<f64> = points()
        .flat_map(|p| [p.mean - p.std, p.mean + p.std])
        .collect();
    let (x0, x1) = points().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.x), b.max(p.x)));
    let (x0, x1) = if x0 < x1 { (x0, x1) } else { (0.0, 1.0) };
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (520, 340)).into_drawing_area();
        root.fill(&WHITE).map_err(svg_error)?;
        let mut chart = ChartBuilder::on(&root)
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(44)
            .build_cartesian_2d(x0..x1, curve_y_range(&ys))
            .map_err(svg_error)?;
        chart
            .configure_mesh()
            .x_desc(x_label)
            .y_desc(y_label)
            .draw()
            .map_err(svg_error)?;
        for (i, (label, line)) in lines.iter().enumerate() {
            let color = PALETTE[i % PALETTE.len()];
            if line.iter().any(|p| p.std > 0.0) {
                let band: Vec<(f64, f64)> = line
                    .iter()
                    .map(|p| (p.x, p.mean + p.std))
                    .chain(line.iter().rev().map(|p| (p.x, p.mean - p.std)))
                    .collect();
                chart
                    .draw_series(std::iter::once(Polygon::new(
                        band,
                        color.mix(0.18).filled(),
                    )))
                    .map_err(svg_error)?;
            }
            let pts: Vec<(f64, f64)> = line.iter().map(|p| (p.x, p.mean)).collect();
            chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                .map_err(svg_error)?
                .label(label.to_string())
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
pub(crate) fn members_svg(r: &MethodReport) -> Result<String, String> {
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
pub(crate) fn projection_svg(label: &str, p: &Projection) -> Result<String, String> {
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
