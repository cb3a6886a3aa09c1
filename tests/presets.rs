//! The experiment presets: the Fashion-MNIST protocol (docs/DESIGN.md, "The Fashion-MNIST
//! protocol") at two scales.

use robust_dml::cli::{Cli, Command};
use robust_dml::pipeline::presets::{self, Preset};
use robust_dml::pipeline::train::Arch;
use robust_dml::robust::defense::Method;

use clap::Parser;

#[test]
fn quick_and_full_presets_are_the_fashion_mnist_protocol() {
    for (cfg, dataset) in [
        (presets::quick(), "fashion-mnist-embedded"),
        (presets::fashion_mnist(), "fashion-mnist-zero-shot"),
    ] {
        assert_eq!(cfg.dataset, dataset);
        assert_eq!(cfg.methods, Method::ALL.to_vec());
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
    let quick = presets::quick();
    assert_eq!(
        (quick.train.epochs, quick.train.max_steps_per_epoch),
        (2, 8)
    );
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
