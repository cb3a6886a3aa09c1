//! The experiment report: Table 1 layout and an HTML page with the plots; the tables `eval` and
//! `attack` print.

use robust_dml::config::{AttackKind, Objective, PgdConfig, Scenario};
use robust_dml::pipeline::evaluate::pca_2d;
use robust_dml::pipeline::report::{html_report, RunInfo};
use robust_dml::pipeline::results::{
    AttackRow, CurvePoint, EvalOutput, MethodReport, Metrics, ObjectivesReport, Projection,
    RankingReport, SanityCheck, StrengthOutput, WorstMetric,
};
use robust_dml::pipeline::tables::{
    eval_table, strength_table, table_markdown, threat_table, threats_markdown,
};

fn sample() -> Vec<MethodReport> {
    let m = |r1: f64| Metrics {
        nmi: 50.0,
        f1: 20.0,
        recall: [r1, r1 + 5.0, r1 + 9.0, r1 + 12.0],
        map_r: 10.0,
    };
    let curve = |base: f64| {
        (1..=3)
            .map(|i| CurvePoint {
                x: i as f64,
                recall1: base / i as f64,
                f1: 10.0,
            })
            .collect()
    };
    vec![
        MethodReport {
            method: "none".into(),
            label: "PAL".into(),
            clean: m(53.27),
            pgd: m(7.16),
            pgd_template: m(3.0),
            steps_curve: curve(40.0),
            eps_curve: curve(30.0),
            ..Default::default()
        },
        MethodReport {
            method: "eat".into(),
            label: "+ EAT".into(),
            clean: m(52.78),
            pgd: m(24.02),
            pgd_template: m(12.0),
            steps_curve: curve(50.0),
            eps_curve: curve(45.0),
            members: vec![(50.0, 20.0), (49.0, 21.0), (51.0, 19.0)],
            projection: Some(Projection {
                clean: vec![(0.0, 0.0), (1.0, 1.0)],
                attacked: vec![(0.5, 0.1), (0.9, 1.2)],
                labels: vec![0, 1],
                class_names: vec!["a".into(), "b".into()],
            }),
            ..Default::default()
        },
    ]
}

#[test]
fn table_has_clean_and_pgd_rows_per_method() {
    let t = table_markdown(&sample(), "test");
    assert!(t.contains("| PAL | clean | 50.00 | 20.00 | 53.27 |"), "{t}");
    assert!(t.contains("| + EAT | PGD | 50.00 | 20.00 | 24.02 |"), "{t}");
    assert_eq!(
        t.lines()
            .filter(|l| l.starts_with("| PAL") || l.starts_with("| + EAT"))
            .count(),
        4
    );
}

#[test]
fn html_report_holds_every_figure() {
    let info = RunInfo {
        title: "test run".into(),
        settings: vec![("dataset".into(), "tiny <set>".into())],
        config_json: "{}".into(),
    };
    let h = html_report(&sample(), &info).unwrap();
    // Four curves, the members chart and one projection.
    assert_eq!(h.matches("<svg").count(), 6, "figures missing");
    assert!(h.contains("members alone"));
    assert!(h.contains("+ EAT"));
    // Every figure says how to read it; the settings are shown (escaped).
    assert_eq!(h.matches("<figcaption><b>How to read this:").count(), 6);
    assert!(h.contains("tiny &lt;set&gt;"));
    // The ensemble's members are numbered 1, 2, 3 on the axis, never 0.0 or 2.0.
    let members = &h[h.find("members alone").unwrap()..];
    let members = &members[..members.find("</svg>").unwrap()];
    for k in ["1", "2", "3"] {
        assert!(
            members.contains(&format!(">\n{k}\n</text>")),
            "member {k} unlabelled"
        );
    }
    for wrong in ["0.5", "1.0", "1.5", "2.0"] {
        assert!(
            !members.contains(&format!(">\n{wrong}\n</text>")),
            "tick {wrong}"
        );
    }
    // The projection names its classes in a legend.
    assert!(h.contains(">\na\n</text>") && h.contains(">\nb\n</text>"));
}

#[test]
fn pca_separates_two_clusters_along_the_first_axis() {
    let a: Vec<f32> = [
        [1.0, 0.0, 0.0],
        [1.1, 0.1, 0.0],
        [-1.0, 0.0, 0.1],
        [-1.1, -0.1, 0.0],
    ]
    .concat();
    let (p, _) = pca_2d(&a, &a, 3);
    assert!(p[0].0.signum() == p[1].0.signum() && p[0].0.signum() != p[2].0.signum());
}

#[test]
fn template_rows_in_json_have_no_clustering_metrics() {
    let reports = sample();
    let json = serde_json::to_value(&reports).unwrap();
    let template = &json[0]["pgd_template"];
    assert!(template.get("recall").is_some(), "{template}");
    assert!(template.get("map_r").is_some(), "{template}");
    assert!(
        template.get("nmi").is_none(),
        "NMI was not computed: {template}"
    );
    assert!(
        template.get("f1").is_none(),
        "F1 was not computed: {template}"
    );
    // Measured rows keep theirs, and a saved report reads back (a resumed experiment does).
    assert!(json[0]["pgd"].get("nmi").is_some());
    let back: Vec<MethodReport> = serde_json::from_value(json).unwrap();
    assert_eq!(back[0].pgd_template.recall, reports[0].pgd_template.recall);
    assert_eq!(back[0].pgd, reports[0].pgd);
}

/// The Markdown rows of `table`: each has as many cells as the header, or the table breaks.
fn assert_rows_match_header(table: &str) {
    let rows: Vec<&str> = table.lines().filter(|l| l.starts_with('|')).collect();
    let cells = |row: &str| row.matches('|').count() - 1;
    assert!(rows.len() > 2, "no rows: {table}");
    for row in &rows {
        assert_eq!(cells(row), cells(rows[0]), "{row}\nin\n{table}");
    }
}

#[test]
fn eval_and_attack_tables_have_every_row_as_wide_as_the_header() {
    let m = |v: f64| Metrics {
        nmi: v,
        f1: v / 2.0,
        recall: [v, v + 1.0, v + 2.0, v + 3.0],
        map_r: v / 4.0,
    };
    let eval = EvalOutput {
        checkpoint: "run/checkpoint.safetensors".into(),
        dataset: "synthetic".into(),
        clean: m(40.0),
        pgd_clustering: Some(m(10.0)),
        pgd_template: Some((&m(20.0)).into()),
        attack: Some(PgdConfig::new(8.0 / 255.0, 10)),
        seconds: 1.5,
    };
    let t = eval_table(&eval, "PAL");
    assert_rows_match_header(&t);
    assert!(t.starts_with("### run/checkpoint.safetensors on synthetic: PGD-10 eps 8.0/255"));
    assert!(t.contains("| PAL | clean | 40.00 | 20.00 | 40.00 | 41.00 | 42.00 | 43.00 | 10.00 |"));
    assert!(
        t.contains("| PAL | PGD (template) | - | - | 20.00 |"),
        "{t}"
    );
    let attack = |objective, kind| AttackRow {
        objective: Some(objective),
        attack: Some(PgdConfig {
            kind,
            ..PgdConfig::new(8.0 / 255.0, 10)
        }),
        clustering: m(5.0),
        template: m(6.0),
        seconds: 2.0,
    };
    let mut strength = StrengthOutput {
        checkpoint: "target".into(),
        dataset: "synthetic".into(),
        scenario: Scenario::Both,
        clean: m(40.0),
        white_box: vec![
            attack(Objective::EmbeddingShift, AttackKind::Pgd),
            attack(Objective::Retrieval, AttackKind::Apgd),
        ],
        worst: (0..9)
            .map(|i| WorstMetric {
                metric: format!("metric {i}"),
                value: i as f64,
                objective: Objective::Retrieval,
            })
            .collect(),
        transfer_from: Some("source".into()),
        transfer: vec![attack(Objective::EmbeddingShift, AttackKind::Pgd)],
        checks: vec![SanityCheck::default()],
    };
    let t = strength_table(&strength, "+ EAT");
    assert_rows_match_header(&t);
    assert!(
        t.contains("| + EAT | transfer from source PGD-10 shift eps 8.0/255 alpha "),
        "{t}"
    );
    // --scenario picks the columns: template matching alone has no NMI; clustering alone no
    // template columns.
    strength.scenario = Scenario::Template;
    let t = strength_table(&strength, "+ EAT");
    assert_rows_match_header(&t);
    assert!(
        t.contains("| R@1 template | MAP@R template | s |") && !t.contains("NMI"),
        "{t}"
    );
    assert!(t.contains("| + EAT | clean | 40.00 | 10.00 |  |"), "{t}");
    assert!(
        t.contains("| + EAT | **worst (objective)** | 7.00 (retrieval) | 8.00 (retrieval) |"),
        "{t}"
    );
    strength.scenario = Scenario::Clustering;
    let t = strength_table(&strength, "+ EAT");
    assert_rows_match_header(&t);
    assert!(t.contains("NMI") && !t.contains("template"), "{t}");
    assert_rows_match_header(&table_markdown(&sample(), "test"));
}

/// Three reports for the threats table: PAL (one seed, no objectives or suite) and EAT over two
/// seeds, one with the objectives and the suite and one without the suite.
fn threat_sample() -> Vec<MethodReport> {
    let worst = |r1: f64| ObjectivesReport {
        samples: 100,
        rows: Vec::new(),
        worst: vec![
            WorstMetric {
                metric: "NMI".into(),
                value: 1.0,
                objective: Objective::MetricLoss,
            },
            WorstMetric {
                metric: "R@1".into(),
                value: r1,
                objective: Objective::Retrieval,
            },
        ],
    };
    let mut reports = sample();
    reports[1].seed = 0;
    reports[1].objectives = Some(worst(60.0));
    reports[1].ranking = Some(RankingReport {
        ers: 40.0,
        ..Default::default()
    });
    let mut second = reports[1].clone();
    second.seed = 1;
    second.pgd.recall[0] = 26.02;
    second.objectives = Some(worst(62.0));
    second.ranking = None;
    reports.push(second);
    reports
}

#[test]
fn threats_table_puts_every_method_on_both_threats() {
    let reports = threat_sample();
    let table = threat_table(&reports);
    let rows = &table.rows;
    assert_eq!(rows.len(), 2);
    assert_eq!(table.columns.len(), 5);
    // PAL measured neither the objectives nor the suite: "-", not 0.
    assert_eq!(
        rows[0].cells,
        ["53.27", "7.16", "3.00", "-", "-"].map(String::from)
    );
    // EAT: the mean ± std over its two seeds; the worst R@1 is the objectives' R@1 entry, not
    // their NMI; ERS over the one seed that ran the suite.
    assert_eq!(rows[1].seeds, "0, 1");
    assert_eq!(rows[1].cells[1], "25.02 ± 1.41");
    assert_eq!(rows[1].cells[3], "61.00 ± 1.41");
    assert_eq!(rows[1].cells[4], "40.00");
    let t = threats_markdown(&reports);
    assert_rows_match_header(&t);
    assert!(
        t.contains("| + EAT | 0, 1 | 52.78 ± 0.00 | 25.02 ± 1.41 |"),
        "{t}"
    );
    let info = RunInfo {
        title: "t".into(),
        settings: Vec::new(),
        config_json: "{}".into(),
    };
    let h = html_report(&reports, &info).unwrap();
    assert!(
        h.contains("Both threats") && h.contains("61.00 ± 1.41"),
        "threats table missing"
    );
}

#[test]
fn threats_table_leaves_out_what_no_run_measured() {
    // The objectives without the suite: no ERS column at all, rather than a column of dashes.
    let mut reports = threat_sample();
    for r in &mut reports {
        r.ranking = None;
    }
    let table = threat_table(&reports);
    assert!(!table.columns.contains(&"ERS"), "{:?}", table.columns);
    assert_eq!(table.columns.len(), 4);
    assert!(table.rows.iter().all(|r| r.cells.len() == 4));
    assert!(!threats_markdown(&reports).contains("ERS |"));
}

#[test]
fn threats_table_is_left_out_when_table_1_says_it_all() {
    // Without objectives or the suite every threat column is already in Table 1.
    assert_eq!(threats_markdown(&sample()), "");
    let info = RunInfo {
        title: "t".into(),
        settings: Vec::new(),
        config_json: "{}".into(),
    };
    assert!(!html_report(&sample(), &info)
        .unwrap()
        .contains("Both threats"));
}
