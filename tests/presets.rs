//! The experiment presets: the Fashion-MNIST protocol (docs/DESIGN.md, "The Fashion-MNIST
//! protocol") at two scales, and robrank's ("robrank's Fashion-MNIST protocol").

use std::process::Command as Process;

use robust_dml::cli::{Cli, Command};
use robust_dml::config::{AttackChannels, PgdConfig, RankProfile};
use robust_dml::pipeline::presets::{self, Preset};
use robust_dml::pipeline::train::{Arch, LossKind};
use robust_dml::robust::defense::Method;

use clap::Parser;

#[test]
fn quick_and_full_presets_are_the_fashion_mnist_protocol() {
    for (cfg, dataset) in [
        (presets::quick(), "fashion-mnist-embedded"),
        (presets::fashion_mnist(), "fashion-mnist-zero-shot"),
    ] {
        assert_eq!(cfg.dataset, dataset);
        let t = &cfg.train;
        assert_eq!(
            (t.arch, t.image_size, t.embedding_dim),
            (Arch::C2f2, 28, 128)
        );
        assert_eq!((t.batch_size, t.lr, t.warmup_epochs), (128, 1e-3, 0));
        assert_eq!(
            (t.proxy_lr_mult, t.grad_clip, t.lr_gamma),
            (100.0, 10.0, 1.0)
        );
        let (train, test) = (&t.defense.attack, &cfg.eval.attack);
        assert_eq!((train.eps, train.steps), (0.1, 5));
        assert!((train.alpha - 2.5 * 0.1 / 5.0).abs() < 1e-7);
        assert_eq!((test.eps, test.steps), (0.1, 10));
        assert!((test.alpha - 0.1 / 4.0).abs() < 1e-7);
        assert_eq!((t.defense.ensemble_size, t.defense.eat_beta), (3, 0.5));
        // Curves start at the clean point, on enough images that one is under half a point.
        assert_eq!(cfg.eval.steps_sweep[0], 0);
        assert_eq!(cfg.eval.eps_sweep[0], 0.0);
        assert!(cfg.eval.curve_samples >= 500);
        // The table uses the whole test set (2,000 or 5,000 images).
        assert_eq!(cfg.eval.max_test_samples, 0);
        cfg.validate().unwrap();
    }
    let full = presets::fashion_mnist();
    assert_eq!((full.train.epochs, full.train.max_steps_per_epoch), (3, 78));
    assert_eq!(full.methods, Method::ALL.to_vec());
    // The quick job: the paper's three methods, trained long enough for the full protocol's
    // ordering under attack (docs/RESULTS.md, section 1).
    let quick = presets::quick();
    assert_eq!(
        (quick.train.epochs, quick.train.max_steps_per_epoch),
        (2, 24)
    );
    assert_eq!(quick.methods, vec![Method::None, Method::At, Method::Eat]);
}

#[test]
fn presets_are_chosen_by_name_on_the_command_line() {
    let parse = |args: &[&str]| match Cli::try_parse_from(args).unwrap().command {
        Command::Experiment(a) => a.preset,
        _ => panic!("experiment parsed as something else"),
    };
    assert_eq!(parse(&["robust-dml", "experiment"]), Preset::Quick);
    assert_eq!(
        parse(&["robust-dml", "experiment", "--preset", "fashion-mnist"]),
        Preset::FashionMnist
    );
    assert_eq!(
        parse(&["robust-dml", "experiment", "--preset", "paper"]),
        Preset::Paper
    );
    assert_eq!(
        parse(&["robust-dml", "experiment", "--preset", "robrank-fashion"]),
        Preset::RobrankFashion
    );
    // The synthetic stand-in (tests, --dataset synthetic) is drawn at the preset's size.
    let (cfg, synth) = Preset::Quick.config();
    assert_eq!(synth.image_size, cfg.train.image_size);
}

#[test]
fn curve_points_are_the_evaluation_attack_cut_short_or_scaled() {
    let plan = presets::quick().eval;
    let a = plan.attack;
    // The steps curve keeps alpha: PGD-k is the first k steps of the evaluation attack's path.
    for steps in [1, 3, 20] {
        let c = plan.attack_with_steps(steps);
        assert_eq!((c.steps, c.alpha, c.eps), (steps, a.alpha, a.eps));
    }
    // The eps curve keeps alpha / eps.
    let half = plan.attack_with_eps(a.eps / 2.0);
    assert!((half.alpha - a.alpha / 2.0).abs() < 1e-9, "{half:?}");
    assert_eq!(half.steps, a.steps);
    // Both meet the evaluation attack itself exactly, so its embeddings are reused there.
    assert_eq!(plan.attack_with_steps(a.steps), a);
    assert_eq!(plan.attack_with_eps(a.eps), a);
}

/// robrank's `rc2f2` configuration for its `ptripletN` loss (robrank/configs/configs_rank.py),
/// as docs/DESIGN.md states it; every method of the project trains with it.
#[test]
fn robrank_fashion_preset_is_robranks_protocol() {
    let cfg = presets::robrank_fashion();
    assert_eq!(cfg.dataset, "fashion-mnist");
    assert_eq!(cfg.methods, vec![Method::None, Method::Est, Method::Act]);
    let t = &cfg.train;
    assert_eq!(
        (t.arch, t.image_size, t.embedding_dim),
        (Arch::C2f2, 28, 512)
    );
    assert_eq!((t.loss_kind(), t.triplet_margin), (LossKind::Triplet, 0.2));
    // 16 epochs halved for pair batches; 128 pairs = 256 images; whole epochs.
    assert_eq!((t.epochs, t.batch_size, t.max_steps_per_epoch), (8, 256, 0));
    assert_eq!((t.lr, t.weight_decay), (1e-3, 1e-7));
    assert_eq!((t.warmup_epochs, t.lr_gamma, t.grad_clip), (0, 1.0, 0.0));
    let a = &t.defense.attack;
    assert_eq!((a.eps, a.alpha, a.steps), (77.0 / 255.0, 3.0 / 255.0, 32));
    assert!(!a.random_start);
    // The ranking suite at rob28 on every test image; the table on every test image too.
    let ranking = cfg.eval.ranking.expect("the preset runs the ranking suite");
    assert_eq!((ranking.profile, ranking.queries), (RankProfile::Rob28, 0));
    assert_eq!(cfg.eval.max_test_samples, 0);
    // The clustering attack is the Fashion-MNIST protocol's, so both tables share the column,
    // except that every attack moves the grey image, as robrank's one-channel network is
    // attacked.
    let fashion = presets::fashion_mnist().eval.attack;
    assert_eq!(fashion.channels, AttackChannels::Independent);
    assert_eq!(
        cfg.eval.attack,
        PgdConfig {
            channels: AttackChannels::Tied,
            ..fashion
        }
    );
    assert_eq!(a.channels, AttackChannels::Tied);
    assert_eq!(ranking.channels, AttackChannels::Tied);
    for method in Method::EVERY {
        let mut one = cfg.clone();
        one.methods = vec![method];
        one.validate()
            .unwrap_or_else(|e| panic!("{method:?} with robrank-fashion: {e}"));
    }
}

/// `experiment --preset robrank-fashion --dataset <dataset>` on the CPU backend, for the caller
/// to add its flags to.
fn robrank_experiment(dataset: &str) -> Process {
    let mut command = Process::new(env!("CARGO_BIN_EXE_robust-dml"));
    command.env("ROBUST_DML_DEVICE", "cpu").args([
        "experiment",
        "--preset",
        "robrank-fashion",
        "--dataset",
        dataset,
    ]);
    command
}

/// The preset from the command line on the built-in Fashion-MNIST subset, cut to one training
/// step and a few ranking queries: the undefended model trains with the triplet loss at 512-d,
/// the ranking suite gives an ERS with tied channels, and the report names the loss and calls
/// the model "Triplet", not "PAL". On the synthetic stand-in, whose images have colour, the
/// preset's tied channels are refused before any training.
/// (EST's and ACT's 32-step training is tested in tests/robrank_defense.rs.)
#[test]
fn robrank_fashion_runs_from_the_command_line() {
    let dir =
        std::env::temp_dir().join(format!("robust-dml-robrank-preset-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = dir.join("exp");
    let output = robrank_experiment("fashion-mnist-embedded")
        .args(["--methods", "none", "--epochs", "1", "--max-steps", "1"])
        .args(["--test-samples", "40", "--ranking-queries", "4"])
        .args([
            "--objective-samples",
            "0",
            "--transfer-samples",
            "0",
            "--out",
        ])
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let report = std::fs::read_to_string(out.join("none/seed0/report.json")).unwrap();
    let report: serde_json::Value = serde_json::from_str(&report).unwrap();
    let ranking = &report["ranking"];
    assert_eq!(ranking["profile"], "rob28");
    assert_eq!(ranking["queries"], 4);
    assert_eq!(ranking["pgd"]["channels"], "tied", "{ranking}");
    assert!(ranking["ers"].as_f64().unwrap().is_finite(), "{ranking}");
    let settings = std::fs::read_to_string(out.join("config.json")).unwrap();
    let settings: serde_json::Value = serde_json::from_str(&settings).unwrap();
    assert_eq!(settings["train"]["embedding_dim"], 512);
    assert_eq!(settings["train"]["loss"], "triplet");
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(
        html.contains("512-d embedding, triplet loss (margin 0.2, SPC-2 batches)"),
        "the report's settings do not name the loss"
    );
    let table = std::fs::read_to_string(out.join("table.md")).unwrap();
    assert!(table.contains("| Triplet | clean |"), "{table}");
    assert!(!table.contains("PAL"), "{table}");
    let colour = robrank_experiment("synthetic")
        .args(["--methods", "none", "--out"])
        .arg(dir.join("colour"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&colour.stderr);
    assert!(!colour.status.success());
    assert!(
        stderr.contains("has colour; use --attack-channels independent"),
        "{stderr}"
    );
    assert!(
        !dir.join("colour/none/seed0").exists(),
        "a refused run left a cell behind"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
