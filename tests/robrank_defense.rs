//! robrank's defenses (docs/DESIGN.md, "robrank's defenses"): EST, ACT and HM, each trained
//! on a tiny synthetic set, improve the robustness figure of the attack they train against
//! over the undefended triplet model, and do not when their adversarial step is switched off
//! (a training eps of 1e-4/255: the same code, examples that do not move). Also LGA's target,
//! and that the triplet-only methods refuse Proxy Anchor.

use std::cell::Cell;

use robust_dml::config::PgdConfig;
use robust_dml::data::{self, BatchLoader, DatasetKind, LoaderConfig, SyntheticConfig};
use robust_dml::dml::loss::MetricLoss;
use robust_dml::dml::triplet::{pairwise_distance, select_rows, triplet_margin_loss, Triplets};
use robust_dml::engine::ops::reduce::mean;
use robust_dml::engine::{no_grad, Device, Rng, Tensor};
use robust_dml::nn::ForwardMode;
use robust_dml::pipeline::train::{Arch, LossKind, Method, Run, TrainConfig};
use robust_dml::robust::attack::{attack, EmbedFn, Goal};
use robust_dml::robust::defense::{step_loss, DefenseConfig, StepContext};
use robust_dml::robust::robrank::{hardness_manipulation, lga_target, pn_collapse};

const EPS: f32 = 24.0 / 255.0;
const ATTACK_STEPS: usize = 8;
const WARM_EPOCHS: usize = 4;
const TUNE_EPOCHS: usize = 12;

fn tiny_dataset() -> data::Dataset {
    let synth = SyntheticConfig {
        num_classes: 8,
        train_per_class: 16,
        test_per_class: 8,
        image_size: 8,
        seed: 3,
    };
    data::load(&DatasetKind::Synthetic(synth), None).unwrap()
}

/// A c2f2 run of epochs of 8 steps on batches of 8 pairs, triplet loss, training attack of 4
/// steps at `attack_eps`.
fn config(method: Method, attack_eps: f32) -> TrainConfig {
    let mut c = TrainConfig::new(Arch::C2f2, method);
    c.loss = Some(LossKind::Triplet);
    c.image_size = 8;
    c.embedding_dim = 8;
    c.epochs = WARM_EPOCHS;
    c.batch_size = 16;
    c.max_steps_per_epoch = 8;
    c.lr = 1e-2;
    c.warmup_epochs = 0;
    c.workers = 0;
    c.seed = 11;
    c.defense.attack = PgdConfig::new(attack_eps, 4);
    c
}

fn trained(cfg: &TrainConfig, ds: &data::Dataset) -> Run {
    let mut run = Run::new(cfg.clone(), ds, &Device::Cpu).unwrap();
    for epoch in 0..cfg.epochs {
        run.train_epoch(ds, epoch, true).unwrap();
    }
    run
}

/// The test images, one tensor, and their labels.
fn test_images(ds: &data::Dataset) -> (Tensor, Vec<usize>) {
    let loader = BatchLoader::new(ds.test.clone(), LoaderConfig::eval(ds.test.len(), 8)).unwrap();
    let batch = loader.epoch(0).next().unwrap();
    (batch.images_tensor(&Device::Cpu).unwrap(), batch.labels)
}

/// Test triplets: each image an anchor, the next of its class the positive, the first image
/// of the next class the negative.
fn test_triplets(labels: &[usize]) -> Triplets {
    let n = labels.len();
    let mut t = Triplets {
        anchors: vec![],
        positives: vec![],
        negatives: vec![],
    };
    for a in 0..n {
        let same = (1..n)
            .map(|k| (a + k) % n)
            .find(|&j| labels[j] == labels[a]);
        let other = (1..n)
            .map(|k| (a + k) % n)
            .find(|&j| labels[j] != labels[a]);
        if let (Some(p), Some(q)) = (same, other) {
            t.anchors.push(a);
            t.positives.push(p);
            t.negatives.push(q);
        }
    }
    t
}

fn eval_attack() -> PgdConfig {
    PgdConfig::new(EPS, ATTACK_STEPS)
}

fn rows(e: &Tensor, from: usize, len: usize) -> Tensor {
    select_rows(e, &(from..from + len).collect::<Vec<_>>()).unwrap()
}

fn mean_distance(x: &Tensor, y: &Tensor) -> f32 {
    no_grad(|| mean(&pairwise_distance(x, y)?)?.item()).unwrap()
}

/// EST's figure: the mean embedding shift ||F(x_adv) - F(x)|| that the embedding-shift PGD
/// reaches (lower is more robust).
fn shift_figure(run: &Run, ds: &data::Dataset) -> f32 {
    let net = run.members[0].frozen_net().unwrap();
    let f = |x: &Tensor| net.forward(x, ForwardMode::Eval);
    let members: [EmbedFn; 1] = [&f];
    let (x, _) = test_images(ds);
    let adv = attack(
        &members,
        &x,
        &eval_attack(),
        &Goal::EmbeddingShift,
        &mut Rng::new(1),
    )
    .unwrap();
    let clean = no_grad(|| f(&x)).unwrap();
    let moved = no_grad(|| f(&adv)).unwrap();
    mean_distance(&moved, &clean)
}

/// ACT's figure: the triplet loss (margin 0.2) of the clean test anchors against positives
/// and negatives that ACT's collapse attack moved (lower is more robust).
fn collapse_figure(run: &Run, ds: &data::Dataset) -> f32 {
    let net = run.members[0].frozen_net().unwrap();
    let f = |x: &Tensor| net.forward(x, ForwardMode::Eval);
    let (x, labels) = test_images(ds);
    let t = test_triplets(&labels);
    let n = t.len();
    let pn = pn_collapse(&[&f], &x, &t, &eval_attack()).unwrap();
    no_grad(|| {
        let adv = f(&pn)?;
        let anchors = select_rows(&f(&x)?, &t.anchors)?;
        triplet_margin_loss(&anchors, &rows(&adv, 0, n), &rows(&adv, n, n), 0.2)?.item()
    })
    .unwrap()
}

/// HM's figure: the triplet loss (margin 0.2) of the test triplets after the HM attack pushed
/// them towards the hardest target (lower is more robust).
fn hardness_figure(run: &Run, ds: &data::Dataset) -> f32 {
    let net = run.members[0].frozen_net().unwrap();
    let f = |x: &Tensor| net.forward(x, ForwardMode::Eval);
    let (x, labels) = test_images(ds);
    let t = test_triplets(&labels);
    let n = t.len();
    let adv = hardness_manipulation(&[&f], &x, &t, 2.0, &eval_attack()).unwrap();
    no_grad(|| {
        let e = f(&adv)?;
        triplet_margin_loss(&rows(&e, 0, n), &rows(&e, n, n), &rows(&e, 2 * n, n), 0.2)?.item()
    })
    .unwrap()
}

/// `defended` beats `undefended` by at least 10% of the latter (`higher`: larger is better).
fn improves(defended: f32, undefended: f32, higher: bool) -> bool {
    let gain = if higher {
        defended - undefended
    } else {
        undefended - defended
    };
    gain > 0.1 * undefended.abs()
}

/// The undefended triplet model after `WARM_EPOCHS`, saved; each variant fine-tunes a copy.
/// The file is named after the test's method too: the tests run in parallel threads.
fn warm_start(ds: &data::Dataset, seed: u64, method: Method) -> std::path::PathBuf {
    let mut c = config(Method::None, EPS);
    c.seed = seed;
    c.epochs = WARM_EPOCHS;
    let run = trained(&c, ds);
    let path = std::env::temp_dir().join(format!(
        "robust-dml-robrank-warm-{}-{}-{seed}.safetensors",
        std::process::id(),
        method.key()
    ));
    run.save(&path).unwrap();
    path
}

/// The warm model fine-tuned `TUNE_EPOCHS` more with `method`, its training attack at `eps`.
fn fine_tuned(warm: &std::path::Path, ds: &data::Dataset, method: Method, eps: f32) -> Run {
    let mut run = Run::load(warm, ds, &Device::Cpu).unwrap();
    run.cfg.defense = config(method, eps).defense;
    run.cfg.validate().unwrap();
    for epoch in WARM_EPOCHS..WARM_EPOCHS + TUNE_EPOCHS {
        run.train_epoch(ds, epoch, true).unwrap();
    }
    run
}

/// From one warm undefended model per seed, fine-tunes without a defense, with `method`, and
/// with `method` switched off, and checks the figure: better with the defense, not with it
/// switched off.
fn check_defense(method: Method, figure: fn(&Run, &data::Dataset) -> f32, higher: bool) {
    let ds = tiny_dataset();
    let (mut none, mut on, mut off) = (0.0, 0.0, 0.0);
    let seeds = [11u64, 12];
    for seed in seeds {
        let warm = warm_start(&ds, seed, method);
        none += figure(&fine_tuned(&warm, &ds, Method::None, EPS), &ds);
        on += figure(&fine_tuned(&warm, &ds, method, EPS), &ds);
        off += figure(&fine_tuned(&warm, &ds, method, 1e-4 / 255.0), &ds);
        let _ = std::fs::remove_file(&warm);
    }
    let k = seeds.len() as f32;
    let (none, on, off) = (none / k, on / k, off / k);
    eprintln!("{method:?}: undefended {none:.4}, defended {on:.4}, switched off {off:.4}");
    assert!(
        improves(on, none, higher),
        "{method:?} does not improve its figure: {on} against {none} undefended"
    );
    // What the defense owes to its adversarial examples, not to its loss or its mining: the
    // same method with examples that do not move must do worse.
    assert!(
        improves(on, off, higher),
        "{method:?} is no better than itself switched off: {on} against {off}"
    );
}

#[test]
fn est_shrinks_the_embedding_shift() {
    check_defense(Method::Est, shift_figure, false);
}

#[test]
fn act_keeps_positives_and_negatives_apart() {
    check_defense(Method::Act, collapse_figure, false);
}

#[test]
fn hm_resists_hardness_manipulation() {
    check_defense(Method::Hm, hardness_figure, false);
}

#[test]
fn lga_target_follows_the_previous_loss() {
    // robrank: destH = -0.2 * clamp(loss, 0, 0.2) / 0.2.
    assert!((lga_target(2.0, 0.2) + 0.2).abs() < 1e-7);
    assert!((lga_target(0.2, 0.2) + 0.2).abs() < 1e-7);
    assert!((lga_target(0.05, 0.2) + 0.05).abs() < 1e-7);
    assert_eq!(lga_target(0.0, 0.2), 0.0);
    assert_eq!(lga_target(-1.0, 0.2), 0.0);
}

#[test]
fn robrank_methods_refuse_proxy_anchor_and_odd_batches() {
    for method in Method::ROBRANK {
        let mut c = config(method, EPS);
        c.loss = None;
        c.validate().unwrap();
        assert_eq!(c.loss_kind(), LossKind::Triplet, "{method:?}");
        c.loss = Some(LossKind::ProxyAnchor);
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("--loss proxy-anchor") && e.contains(&format!("--method {}", method.key())),
            "{e}"
        );
        let mut odd = config(method, EPS);
        odd.batch_size = 7;
        let e = odd.validate().unwrap_err().to_string();
        assert!(e.contains("--batch-size 7 is odd"), "{e}");
    }
    let mut c = config(Method::Act, EPS);
    c.defense.hm_ics = true;
    let e = c.validate().unwrap_err().to_string();
    assert!(e.contains("--hm-ics") && e.contains("--method act"), "{e}");
    for margin in [f32::NAN, -0.1, f32::INFINITY] {
        let mut c = config(Method::Est, EPS);
        c.triplet_margin = margin;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("--triplet-margin"), "{e}");
    }
}

/// HM's ICS term: (clean anchor, adversarial anchor, clean positive) with margin 0, weight
/// 0.5, on top of the adversarial triplet loss, which LGA remembers.
#[test]
fn hm_ics_adds_the_intra_class_term_and_lga_remembers_the_loss() {
    let d = Device::Cpu;
    let mut r = Rng::new(4);
    let w = Tensor::randn(&[6, 12], 0.5, &mut r, &d).unwrap().var();
    let x = Tensor::rand_uniform(&[8, 3, 2, 2], 0.0, 1.0, &mut r, &d).unwrap();
    let labels = [0usize, 0, 1, 1, 0, 0, 2, 2];
    let f = |x: &Tensor| {
        let flat = x.reshape(&[x.shape()[0], 12])?;
        robust_dml::engine::ops::matmul::linear(&flat, &w, None)
    };
    let attack_on: [EmbedFn; 1] = [&f];
    let loss_with = |ics: bool| {
        let mut cfg = DefenseConfig::new(Method::Hm);
        cfg.attack = PgdConfig::new(16.0 / 255.0, 3);
        cfg.hm_ics = ics;
        let lga = Cell::new(2.0);
        let ctx = StepContext {
            member: &f,
            attack_on: &attack_on,
            proxies: &w,
            loss: MetricLoss::Triplet { margin: 0.2 },
            defense: &cfg,
            lga_loss: &lga,
        };
        let loss = step_loss(&ctx, &x, &labels, &mut Rng::new(5)).unwrap();
        (loss.item().unwrap(), lga.get())
    };
    let (plain, remembered) = loss_with(false);
    let (with_ics, remembered_ics) = loss_with(true);
    assert_eq!(remembered, plain, "LGA keeps the adversarial triplet loss");
    assert_eq!(remembered_ics, plain, "ICS is not part of LGA's memory");
    assert!(with_ics >= plain, "{with_ics} < {plain}");
}

/// A trained HM run resumed from its checkpoint continues bit for bit: LGA's memory is saved.
#[test]
fn hm_resumes_bit_for_bit_with_lgas_memory() {
    let ds = tiny_dataset();
    let dir = std::env::temp_dir().join(format!("robust-dml-hm-resume-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut cfg = config(Method::Hm, EPS);
    cfg.epochs = 2;
    cfg.max_steps_per_epoch = 3;
    let mut whole = Run::new(cfg.clone(), &ds, &Device::Cpu).unwrap();
    whole.train(&ds, &dir.join("whole"), true).unwrap();
    let mut first = cfg.clone();
    first.epochs = 1;
    let mut half = Run::new(first, &ds, &Device::Cpu).unwrap();
    half.train(&ds, &dir.join("half"), true).unwrap();
    let ckpt = dir
        .join("half")
        .join(robust_dml::pipeline::train::CHECKPOINT_FILE);
    let mut resumed = Run::load(&ckpt, &ds, &Device::Cpu).unwrap();
    assert_eq!(resumed.members[0].lga_loss, half.members[0].lga_loss);
    assert_ne!(
        resumed.members[0].lga_loss, 2.0,
        "LGA's memory was not saved"
    );
    resumed.cfg.epochs = 2;
    resumed.train(&ds, &dir.join("half"), true).unwrap();
    let values = |run: &Run| -> Vec<Vec<f32>> {
        let m = &run.members[0];
        m.net
            .params()
            .all_trainable()
            .into_iter()
            .map(|(_, t)| t.to_vec().unwrap())
            .collect()
    };
    assert_eq!(values(&resumed), values(&whole));
    assert_eq!(resumed.members[0].lga_loss, whole.members[0].lga_loss);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The command line: robrank's methods with their flags, the refusals naming them, and
/// `--resume` keeping the loss, the margin and `--hm-ics`.
#[test]
fn cli_trains_robrank_methods_and_refuses_bad_flags() {
    let dir = std::env::temp_dir().join(format!("robust-dml-robrank-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let run = |extra: &[&str]| {
        let defaults = [
            ("--epochs", "1"),
            ("--max-steps", "1"),
            ("--batch-size", "8"),
            ("--embedding-dim", "8"),
            ("--image-size", "16"),
            ("--warmup-epochs", "0"),
            ("--workers", "0"),
            ("--train-steps", "2"),
        ];
        let mut args = vec!["train"];
        for (flag, value) in defaults {
            if !extra.contains(&flag) {
                args.extend([flag, value]);
            }
        }
        args.extend_from_slice(extra);
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_robust-dml"))
            .current_dir(&dir)
            .env("ROBUST_DML_DEVICE", "cpu")
            .args(&args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(!err.contains("panicked"), "{args:?}:\n{err}");
        (out.status.code(), err)
    };
    let refused = |extra: &[&str], fragment: &str| {
        let (code, err) = run(extra);
        assert!(matches!(code, Some(1 | 2)), "{extra:?}: {code:?}\n{err}");
        assert!(
            err.contains(fragment),
            "{extra:?}: lacks {fragment:?}:\n{err}"
        );
    };
    for method in ["est", "act", "hm"] {
        let out = format!("run-{method}");
        let (code, err) = run(&["--method", method, "--out", &out]);
        assert_eq!(code, Some(0), "{method}:\n{err}");
        refused(
            &["--method", method, "--loss", "proxy-anchor", "--out", "x"],
            &format!("--loss proxy-anchor contradicts --method {method}"),
        );
    }
    refused(
        &["--method", "est", "--batch-size", "7", "--out", "x"],
        "--batch-size 7 is odd",
    );
    refused(
        &["--loss", "triplet", "--triplet-margin", "nan", "--out", "x"],
        "--triplet-margin",
    );
    refused(
        &["--method", "act", "--triplet-margin", "-0.5", "--out", "x"],
        "--triplet-margin -0.5",
    );
    refused(&["--method", "at", "--hm-ics", "--out", "x"], "--hm-ics");
    refused(&["--loss", "triplets", "--out", "x"], "--loss");
    let (code, err) = run(&["--method", "hm", "--hm-ics", "--out", "hm-ics"]);
    assert_eq!(code, Some(0), "{err}");
    let resume = |extra: &[&str], fragment: &str| {
        let mut args = vec!["--resume", "--out", "hm-ics", "--epochs", "2"];
        args.extend_from_slice(extra);
        refused(&args, fragment);
    };
    resume(
        &["--triplet-margin", "0.3"],
        "--triplet-margin 0.3 (the run has 0.2)",
    );
    resume(
        &["--loss", "proxy-anchor"],
        "--loss proxy-anchor (the run has triplet)",
    );
    let (code, err) = run(&["--resume", "--out", "hm-ics", "--epochs", "2", "--hm-ics"]);
    assert_eq!(code, Some(0), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// ACT's and HM's step losses (their PGD, the mining, the triplet loss and its backward) give
/// the same loss and member gradient on the GPU as on the CPU.
#[test]
fn act_and_hm_agree_between_devices() {
    let Some(gpu) = robust_dml::engine::testing::gpu_or_skip("robrank act_and_hm_agree") else {
        return;
    };
    let labels = [0usize, 0, 1, 1, 0, 0, 2, 2, 1, 1];
    let on = |device: &Device, method: Method| -> (f32, Vec<f32>, f32) {
        let mut r = Rng::new(6);
        let w = Tensor::randn(&[5, 27], 0.4, &mut r, &Device::Cpu)
            .unwrap()
            .to_device(device)
            .unwrap()
            .var();
        let x = Tensor::rand_uniform(&[10, 3, 3, 3], 0.0, 1.0, &mut r, &Device::Cpu)
            .unwrap()
            .to_device(device)
            .unwrap();
        let f = |x: &Tensor| {
            let flat = x.reshape(&[x.shape()[0], 27])?;
            robust_dml::engine::ops::matmul::linear(&flat, &w, None)
        };
        let attack_on: [EmbedFn; 1] = [&f];
        let mut cfg = DefenseConfig::new(method);
        cfg.attack = PgdConfig::new(16.0 / 255.0, 3);
        cfg.hm_ics = method == Method::Hm;
        let lga = Cell::new(0.1);
        let ctx = StepContext {
            member: &f,
            attack_on: &attack_on,
            proxies: &w,
            loss: MetricLoss::Triplet { margin: 0.2 },
            defense: &cfg,
            lga_loss: &lga,
        };
        let loss = step_loss(&ctx, &x, &labels, &mut Rng::new(7)).unwrap();
        let value = loss.item().unwrap();
        let g = loss.backward().unwrap();
        (value, g.get(&w).unwrap().to_vec().unwrap(), lga.get())
    };
    for method in [Method::Act, Method::Hm] {
        let (cl, cg, clga) = on(&Device::Cpu, method);
        let (gl, gg, glga) = on(&gpu, method);
        assert!(cl > 0.0, "{method:?}: a zero loss checks nothing");
        robust_dml::engine::testing::assert_close(
            &format!("{method:?} loss"),
            &[gl, glga],
            &[cl, clga],
            1e-4,
            1e-3,
        );
        robust_dml::engine::testing::assert_close(
            &format!("{method:?} gradient"),
            &gg,
            &cg,
            1e-4,
            1e-3,
        );
    }
}
