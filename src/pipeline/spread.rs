//! Figures over seeds: an experiment's reports grouped by method, each figure as the mean and
//! the sample standard deviation over the method's seeds. Only reads
//! [`crate::pipeline::results`]; the tables and the report render what it gives.

use crate::pipeline::results::{two_decimals, CurvePoint, MethodReport, Metrics};

/// A curve point over seeds: the x, and the mean and standard deviation of the value.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SpreadPoint {
    pub x: f64,
    pub mean: f64,
    pub std: f64,
}

/// One method's runs, one per seed, in seed order.
pub struct MethodSeeds<'a> {
    pub label: &'a str,
    pub runs: Vec<&'a MethodReport>,
}

/// The reports grouped by method, methods in the order they first appear.
pub fn by_method(reports: &[MethodReport]) -> Vec<MethodSeeds<'_>> {
    let mut groups: Vec<MethodSeeds> = Vec::new();
    for r in reports {
        match groups.iter_mut().find(|g| g.runs[0].method == r.method) {
            Some(g) => g.runs.push(r),
            None => groups.push(MethodSeeds {
                label: &r.label,
                runs: vec![r],
            }),
        }
    }
    for g in &mut groups {
        g.runs.sort_by_key(|r| r.seed);
    }
    groups
}

/// Whether the reports hold more than one seed of some method.
pub fn has_seeds(reports: &[MethodReport]) -> bool {
    by_method(reports).iter().any(|g| g.runs.len() > 1)
}

/// The mean and the sample standard deviation (n - 1 in the denominator; 0 for one value).
pub fn mean_std(values: &[f64]) -> (f64, f64) {
    let n = values.len();
    if n == 0 {
        return (f64::NAN, 0.0);
    }
    let mean = values.iter().sum::<f64>() / n as f64;
    if n == 1 {
        return (mean, 0.0);
    }
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    (mean, var.sqrt())
}

/// A figure over seeds to two decimals: "84.50" for one seed, "84.50 ± 1.23" for several.
pub fn spread_cell(values: &[f64]) -> String {
    let (mean, std) = mean_std(values);
    if values.len() > 1 {
        format!("{} ± {}", two_decimals(mean), two_decimals(std))
    } else {
        two_decimals(mean)
    }
}

impl MethodSeeds<'_> {
    /// The seeds, as "0, 1, 2".
    pub fn seeds(&self) -> String {
        let seeds: Vec<String> = self.runs.iter().map(|r| r.seed.to_string()).collect();
        seeds.join(", ")
    }

    /// One figure over the seeds.
    pub fn cell(&self, value: impl Fn(&MethodReport) -> f64) -> String {
        let values: Vec<f64> = self.runs.iter().map(|r| value(r)).collect();
        spread_cell(&values)
    }

    /// One figure over the seeds that measured it; "-" when none did.
    pub fn cell_if(&self, value: impl Fn(&MethodReport) -> Option<f64>) -> String {
        let values: Vec<f64> = self.runs.iter().filter_map(|r| value(r)).collect();
        if values.is_empty() {
            "-".into()
        } else {
            spread_cell(&values)
        }
    }

    /// The cells of `METRIC_COLUMNS` for the metrics `of` each run picks.
    pub fn metric_cells(&self, of: impl Fn(&MethodReport) -> &Metrics) -> [String; 7] {
        std::array::from_fn(|i| self.cell(|r| of(r).values()[i]))
    }

    /// A curve over the seeds: per x of the first run, the mean and the standard deviation of
    /// `value` over the runs that have that point.
    pub fn curve(
        &self,
        curve: impl Fn(&MethodReport) -> &Vec<CurvePoint>,
        value: impl Fn(&CurvePoint) -> f64,
    ) -> Vec<SpreadPoint> {
        curve(self.runs[0])
            .iter()
            .map(|p| {
                let values: Vec<f64> = self
                    .runs
                    .iter()
                    .filter_map(|r| curve(r).iter().find(|q| q.x == p.x).map(&value))
                    .collect();
                let (mean, std) = mean_std(&values);
                SpreadPoint { x: p.x, mean, std }
            })
            .collect()
    }
}

/// The reports with each label naming its seed ("EAT, seed 1") when some method has several
/// seeds, for the sections that show every run on its own (sanity, members, projection).
pub fn labeled_by_seed(reports: &[MethodReport]) -> Vec<MethodReport> {
    let several = has_seeds(reports);
    reports
        .iter()
        .map(|r| {
            let mut r = r.clone();
            if several {
                r.label = format!("{}, seed {}", r.label, r.seed);
            }
            r
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_and_sample_std() {
        let (m, s) = mean_std(&[1.0, 2.0, 3.0]);
        assert_eq!(m, 2.0);
        assert!(
            (s - 1.0).abs() < 1e-12,
            "sample std of 1, 2, 3 is 1, got {s}"
        );
        assert_eq!(mean_std(&[5.0]), (5.0, 0.0));
        assert_eq!(spread_cell(&[5.0]), "5.00");
        assert_eq!(spread_cell(&[80.0, 82.0]), "81.00 ± 1.41");
    }

    #[test]
    fn groups_keep_method_order_and_sort_seeds() {
        let r = |method: &str, seed: u64| MethodReport {
            method: method.into(),
            label: method.to_uppercase(),
            seed,
            ..Default::default()
        };
        let reports = [r("none", 1), r("at", 0), r("none", 0)];
        let g = by_method(&reports);
        assert_eq!(g.len(), 2);
        assert_eq!((g[0].label, g[0].seeds()), ("NONE", "0, 1".to_string()));
        assert_eq!(g[1].seeds(), "0");
        assert!(has_seeds(&reports));
        assert_eq!(labeled_by_seed(&reports)[0].label, "NONE, seed 1");
    }
}
