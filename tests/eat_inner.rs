//! EAT with robrank's attacks inside (`--method eat --eat-inner act|hm`, or `eat-act` and
//! `eat-hm`; docs/DESIGN.md, "EAT with ACT or HM inside"): the attacks run on the whole
//! ensemble (their objectives summed over the members), the member's loss is EAT's
//! beta L(clean) + (1 - beta) L(adv) with ACT's or HM's adversarial loss, and the flags are
//! checked and stored.

use std::cell::Cell;

use robust_dml::config::PgdConfig;
use robust_dml::data::{self, DatasetKind, SyntheticConfig};
use robust_dml::dml::loss::MetricLoss;
use robust_dml::dml::triplet::{mine_random, pairwise_distance, select_rows, spc2_triplet_loss};
use robust_dml::engine::ops::elementwise::{add, affine, axpby, relu, square, sub};
use robust_dml::engine::ops::matmul::linear;
use robust_dml::engine::ops::normalize::l2_normalize;
use robust_dml::engine::ops::reduce::mean;
use robust_dml::engine::{Device, Result, Rng, Tensor};
use robust_dml::pipeline::train::{Arch, EatInner, LossKind, Method, Run, TrainConfig};
use robust_dml::robust::attack::EmbedFn;
use robust_dml::robust::defense::{step_loss, DefenseConfig, StepContext};
use robust_dml::robust::robrank::{
    act_loss, descend, hardness_manipulation, hm_loss, pn_collapse, TripletStep,
};

const LABELS: [usize; 8] = [0, 0, 1, 1, 0, 0, 2, 2];

/// Two different linear "members" on 8 images of 3x2x2, and the images.
struct Pair {
    w: [Tensor; 2],
    x: Tensor,
}

impl Pair {
    fn new() -> Pair {
        let d = Device::Cpu;
        let mut r = Rng::new(21);
        let mut w = || Tensor::randn(&[6, 12], 0.5, &mut r, &d).unwrap().var();
        let w = [w(), w()];
        let x = Tensor::rand_uniform(&[8, 3, 2, 2], 0.0, 1.0, &mut Rng::new(22), &d).unwrap();
        Pair { w, x }
    }
    fn member(&self, i: usize) -> impl Fn(&Tensor) -> Result<Tensor> + '_ {
        move |x: &Tensor| linear(&x.reshape(&[x.shape()[0], 12])?, &self.w[i], None)
    }
}

fn attack() -> PgdConfig {
    PgdConfig::new(16.0 / 255.0, 3)
}

fn normalized(f: EmbedFn, x: &Tensor) -> Result<Tensor> {
    l2_normalize(&f(x)?, 1, 1e-12)
}

fn rows(t: &Tensor, from: usize, len: usize) -> Result<Tensor> {
    select_rows(t, &(from..from + len).collect::<Vec<_>>())
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.to_vec().unwrap().iter().map(|v| v.to_bits()).collect()
}

fn stacked(x: &Tensor, idx: &[Vec<usize>]) -> Tensor {
    select_rows(&x.detach(), &idx.concat()).unwrap().detach()
}

/// ACT's and HM's attacks on an ensemble descend the sum of the members' objectives, written
/// out here member by member; on one member they are that member's attack, and on two they
/// differ from either member's alone (a version that attacked one member would pass neither).
#[test]
fn inner_attacks_descend_the_ensembles_summed_objective() {
    let p = Pair::new();
    let (f, g) = (p.member(0), p.member(1));
    let both: [EmbedFn; 2] = [&f, &g];
    let t = mine_random(&LABELS, &mut Rng::new(3)).unwrap();
    let n = t.len();
    let collapse = |e: &Tensor| mean(&pairwise_distance(&rows(e, 0, n)?, &rows(e, n, n)?)?);
    let pn = stacked(&p.x, &[t.positives.clone(), t.negatives.clone()]);
    let expected = descend(&pn, &attack(), false, |xa| {
        add(
            &collapse(&normalized(&f, xa)?)?,
            &collapse(&normalized(&g, xa)?)?,
        )
    })
    .unwrap();
    let on_both = pn_collapse(&both, &p.x, &t, &attack()).unwrap();
    assert_eq!(
        bits(&on_both),
        bits(&expected),
        "ACT: not the summed objective"
    );
    for one in [&f as EmbedFn, &g] {
        assert_ne!(
            bits(&pn_collapse(&[one], &p.x, &t, &attack()).unwrap()),
            bits(&on_both),
            "ACT on the ensemble is one member's attack"
        );
    }

    let target = -0.1;
    let hardness = |e: &Tensor| {
        let a = rows(e, 0, n)?;
        let h = sub(
            &pairwise_distance(&a, &rows(e, n, n)?)?,
            &pairwise_distance(&a, &rows(e, 2 * n, n)?)?,
        )?;
        mean(&square(&relu(&affine(&h, -1.0, target)?)?)?)
    };
    let apn = stacked(
        &p.x,
        &[t.anchors.clone(), t.positives.clone(), t.negatives.clone()],
    );
    let expected = descend(&apn, &attack(), true, |xa| {
        add(
            &hardness(&normalized(&f, xa)?)?,
            &hardness(&normalized(&g, xa)?)?,
        )
    })
    .unwrap();
    let on_both = hardness_manipulation(&both, &p.x, &t, target, &attack()).unwrap();
    assert_eq!(
        bits(&on_both),
        bits(&expected),
        "HM: not the summed objective"
    );
    for one in [&f as EmbedFn, &g] {
        assert_ne!(
            bits(&hardness_manipulation(&[one], &p.x, &t, target, &attack()).unwrap()),
            bits(&on_both),
            "HM on the ensemble is one member's attack"
        );
    }
}

/// The step of `method` for member f of the ensemble (f, g): its loss and LGA's memory after.
fn eat_step(p: &Pair, method: Method, inner: EatInner) -> (f32, f32) {
    let (f, g) = (p.member(0), p.member(1));
    let both: [EmbedFn; 2] = [&f, &g];
    let mut defense = DefenseConfig::new(method);
    defense.eat_inner = inner;
    defense.attack = attack();
    let lga = Cell::new(0.15);
    let ctx = StepContext {
        member: &f,
        attack_on: &both,
        proxies: &p.w[0],
        loss: MetricLoss::Triplet { margin: 0.2 },
        defense: &defense,
        lga_loss: &lga,
    };
    let loss = step_loss(&ctx, &p.x, &LABELS, &mut Rng::new(5)).unwrap();
    (loss.item().unwrap(), lga.get())
}

/// eat-act's and eat-hm's step is beta L(clean) + (1 - beta) ACT's or HM's loss with the attack
/// on the ensemble, computed here from the parts; it is neither plain EAT's step nor ACT's or
/// HM's on the member alone, and `--method eat --eat-inner` gives the same step.
#[test]
fn eat_step_with_act_or_hm_inside_is_eats_mix_of_their_losses() {
    let p = Pair::new();
    let (f, g) = (p.member(0), p.member(1));
    let both: [EmbedFn; 2] = [&f, &g];
    let cfg = attack();
    let beta = DefenseConfig::new(Method::EatAct).eat_beta;
    let expected = |inner: EatInner, attacked: &[EmbedFn]| -> (f32, f32) {
        let mut rng = Rng::new(5);
        let step = TripletStep {
            member: &f,
            attacked,
            attack: &cfg,
            margin: 0.2,
        };
        let clean = spc2_triplet_loss(&f(&p.x).unwrap(), &LABELS, 0.2, &mut rng).unwrap();
        let lga = Cell::new(0.15);
        let robust = match inner {
            EatInner::Act => act_loss(&step, &p.x, &LABELS, &mut rng),
            _ => hm_loss(&step, &p.x, &LABELS, false, &lga, &mut rng),
        }
        .unwrap();
        let loss = axpby(beta, &clean, 1.0 - beta, &robust).unwrap();
        (loss.item().unwrap(), lga.get())
    };
    let plain_eat = eat_step(&p, Method::Eat, EatInner::Pgd).0;
    for (method, inner) in [
        (Method::EatAct, EatInner::Act),
        (Method::EatHm, EatInner::Hm),
    ] {
        let got = eat_step(&p, method, inner);
        assert_eq!(got, expected(inner, &both), "{method:?}");
        assert_eq!(got, eat_step(&p, Method::Eat, inner), "--eat-inner");
        assert_ne!(got.0, plain_eat, "{method:?} is plain EAT");
        assert_ne!(
            got.0,
            expected(inner, &[&f]).0,
            "{method:?} attacks the member alone"
        );
    }
    // HM inside remembers the member's adversarial loss for LGA's next target.
    let (_, remembered) = eat_step(&p, Method::EatHm, EatInner::Hm);
    assert_ne!(remembered, 0.15, "LGA's memory was not updated");
}

fn tiny_dataset() -> data::Dataset {
    let synth = SyntheticConfig {
        num_classes: 6,
        train_per_class: 8,
        test_per_class: 4,
        image_size: 8,
        seed: 5,
    };
    data::load(&DatasetKind::Synthetic(synth), None).unwrap()
}

fn config(method: Method) -> TrainConfig {
    let mut c = TrainConfig::new(Arch::C2f2, method);
    c.image_size = 8;
    c.embedding_dim = 8;
    c.epochs = 1;
    c.batch_size = 8;
    c.max_steps_per_epoch = 2;
    c.warmup_epochs = 0;
    c.workers = 0;
    c.defense.attack = PgdConfig::new(8.0 / 255.0, 2);
    c
}

/// Both train as EAT ensembles with the triplet loss by default, on Algorithm 1's split, and
/// each HM member keeps its own LGA memory.
#[test]
fn eat_act_and_eat_hm_train_ensembles_with_the_triplet_loss() {
    let ds = tiny_dataset();
    for method in Method::EAT_INNER {
        let cfg = config(method);
        cfg.validate().unwrap();
        assert_eq!(cfg.loss_kind(), LossKind::Triplet, "{method:?}");
        assert_eq!(cfg.defense.eat_inner, method.default_eat_inner());
        assert!(cfg.defense.splits_data(), "{method:?}: no data split");
        let mut run = Run::new(cfg.clone(), &ds, &Device::Cpu).unwrap();
        let stats = run.train_epoch(&ds, 0, true).unwrap();
        assert_eq!(run.members.len(), 3, "{method:?}");
        assert!(stats.loss.is_finite(), "{method:?}: {stats:?}");
        let remembered: Vec<f32> = run.members.iter().map(|m| m.lga_loss).collect();
        let initial = robust_dml::config::LGA_INITIAL_LOSS;
        match method {
            Method::EatHm => assert!(remembered.iter().all(|&l| l != initial), "{remembered:?}"),
            _ => assert!(remembered.iter().all(|&l| l == initial), "{remembered:?}"),
        }
    }
}

/// An eat-hm run resumed from its checkpoint continues bit for bit: every member's LGA memory
/// is saved with it.
#[test]
fn eat_hm_resumes_bit_for_bit_with_each_members_lga_memory() {
    let ds = tiny_dataset();
    let dir = std::env::temp_dir().join(format!("robust-dml-eat-hm-resume-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut cfg = config(Method::EatHm);
    cfg.epochs = 2;
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
    let memory = |run: &Run| -> Vec<f32> { run.members.iter().map(|m| m.lga_loss).collect() };
    assert_eq!(
        memory(&resumed),
        memory(&half),
        "LGA's memory was not saved"
    );
    resumed.cfg.epochs = 2;
    resumed.train(&ds, &dir.join("half"), true).unwrap();
    let values = |run: &Run| -> Vec<Vec<f32>> {
        run.members
            .iter()
            .flat_map(|m| m.net.params().all_trainable())
            .map(|(_, t)| t.to_vec().unwrap())
            .collect()
    };
    assert!(
        values(&resumed) == values(&whole),
        "the resumed run drifted"
    );
    assert_eq!(memory(&resumed), memory(&whole));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The flags: the triplet loss by default and nothing else; --eat-inner only with EAT, never
/// against eat-act's or eat-hm's own; stored, so --resume refuses a change.
#[test]
fn eat_inner_flags_are_checked_and_stored() {
    let mut eat = config(Method::Eat);
    eat.defense.eat_inner = EatInner::Act;
    eat.validate().unwrap();
    assert_eq!(eat.loss_kind(), LossKind::Triplet);
    eat.loss = Some(LossKind::ProxyAnchor);
    let e = eat.validate().unwrap_err().to_string();
    assert!(
        e.contains("--loss proxy-anchor contradicts --eat-inner act"),
        "{e}"
    );
    let mut at = config(Method::At);
    at.defense.eat_inner = EatInner::Hm;
    let e = at.validate().unwrap_err().to_string();
    assert!(
        e.contains("--eat-inner hm") && e.contains("--method at"),
        "{e}"
    );
    let mut own = config(Method::EatAct);
    own.defense.eat_inner = EatInner::Hm;
    let e = own.validate().unwrap_err().to_string();
    assert!(
        e.contains("--eat-inner hm contradicts --method eat-act"),
        "{e}"
    );
    let mut pa = config(Method::EatHm);
    pa.loss = Some(LossKind::ProxyAnchor);
    let e = pa.validate().unwrap_err().to_string();
    assert!(
        e.contains("--loss proxy-anchor contradicts --method eat-hm"),
        "{e}"
    );

    let dir = std::env::temp_dir().join(format!("robust-dml-eat-inner-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let run = |extra: &[&str]| {
        let mut args = vec![
            "train",
            "--max-steps",
            "1",
            "--batch-size",
            "8",
            "--embedding-dim",
            "8",
            "--image-size",
            "16",
            "--warmup-epochs",
            "0",
            "--workers",
            "0",
            "--train-steps",
            "2",
            "--out",
            "run",
        ];
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
    let (code, err) = run(&["--epochs", "1", "--method", "at", "--eat-inner", "act"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("--eat-inner act"), "{err}");
    let (code, err) = run(&["--epochs", "1", "--method", "eat", "--eat-inner", "hm"]);
    assert_eq!(code, Some(0), "{err}");
    let (code, err) = run(&["--resume", "--epochs", "2", "--eat-inner", "act"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("--eat-inner act (the run has hm)"), "{err}");
    let (code, err) = run(&["--resume", "--epochs", "2"]);
    assert_eq!(code, Some(0), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
