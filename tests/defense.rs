//! Defense objectives: EAT's data split, Mix-Up mixing, that every method's step loss is
//! finite and reaches the member's parameters and the proxies, and the paper's Table 3
//! ablations (naive ensemble, EAT without the split) trained for one step each on a tiny
//! synthetic set: each is told apart from plain EAT and plain AT by what it trains.

use robust_dml::config::PgdConfig;
use robust_dml::data::{self, DatasetKind, SyntheticConfig};
use robust_dml::dml::loss::{MetricLoss, ProxyAnchorConfig};
use robust_dml::engine::ops::matmul::linear;
use robust_dml::engine::ops::normalize::l2_normalize;
use robust_dml::engine::{Device, Result, Rng, Tensor};
use robust_dml::pipeline::cells::Cell;
use robust_dml::pipeline::experiment::{run_experiment, StrengthPlan};
use robust_dml::pipeline::presets::Preset;
use robust_dml::pipeline::train::{Arch, Run, TrainConfig};
use robust_dml::robust::attack::EmbedFn;
use robust_dml::robust::defense::{
    eat_member_indices, step_loss, DefenseConfig, EatSplit, Method, MixPlan, StepContext,
};

#[test]
fn eat_members_train_on_all_parts_but_their_own() {
    let n = 3;
    let sets = eat_member_indices(31, n, &mut Rng::new(1));
    assert_eq!(sets.len(), n);
    // Each sample is held out by exactly one member: it appears in n - 1 training sets.
    for s in 0..31 {
        let count = sets.iter().filter(|set| set.contains(&s)).count();
        assert_eq!(count, n - 1, "sample {s} is in {count} member sets");
    }
    // The held-out parts are disjoint and cover everything.
    let held: Vec<Vec<usize>> = sets
        .iter()
        .map(|set| (0..31).filter(|s| !set.contains(s)).collect())
        .collect();
    let total: usize = held.iter().map(|h| h.len()).sum();
    assert_eq!(total, 31);
    assert!(
        held.iter().all(|h| h.len() >= 10),
        "parts are not of equal size: {held:?}"
    );
}

#[test]
fn mix_plan_mixes_rows() {
    let plan = MixPlan {
        lambda: 0.25,
        partner: vec![1, 0, 2],
    };
    let t = Tensor::from_cpu(vec![1.0, 2.0, 10.0, 20.0, 5.0, 5.0], &[3, 2]).unwrap();
    let m = plan.mix(&t).unwrap().to_vec().unwrap();
    assert_eq!(
        m,
        vec![0.25 + 7.5, 0.5 + 15.0, 2.5 + 0.75, 5.0 + 1.5, 5.0, 5.0]
    );
}

#[test]
fn every_method_gives_a_finite_loss_with_gradients() {
    let d = Device::Cpu;
    let mut r = Rng::new(2);
    let ws: Vec<Tensor> = (0..3)
        .map(|_| Tensor::randn(&[5, 12], 0.3, &mut r, &d).unwrap().var())
        .collect();
    let proxies = Tensor::randn(&[3, 5], 1.0, &mut r, &d).unwrap().var();
    let x = Tensor::rand_uniform(&[6, 3, 2, 2], 0.0, 1.0, &mut r, &d).unwrap();
    let labels = [0usize, 1, 2, 0, 1, 2];
    // robrank's defenses train with the triplet loss on SPC-2 batches (pairs of one class).
    let pairs = [0usize, 0, 1, 1, 2, 2];
    let embed = |w: &Tensor, x: &Tensor| -> Result<Tensor> {
        let flat = x.reshape(&[x.shape()[0], 12])?;
        l2_normalize(&linear(&flat, w, None)?, 1, 1e-12)
    };
    let f0 = |x: &Tensor| embed(&ws[0], x);
    let f1 = |x: &Tensor| embed(&ws[1], x);
    let f2 = |x: &Tensor| embed(&ws[2], x);
    let ensemble: [EmbedFn; 3] = [&f0, &f1, &f2];
    for method in Method::EVERY {
        let mut cfg = DefenseConfig::new(method);
        cfg.attack = PgdConfig::new(16.0 / 255.0, 2);
        let attack_on: &[EmbedFn] = if method.attacks_ensemble() {
            &ensemble
        } else {
            &ensemble[..1]
        };
        let (loss, labels) = match method.needs_triplet() {
            true => (MetricLoss::Triplet { margin: 0.2 }, &pairs),
            false => (
                MetricLoss::ProxyAnchor(ProxyAnchorConfig::default()),
                &labels,
            ),
        };
        let lga_loss = std::cell::Cell::new(2.0);
        let ctx = StepContext {
            member: &f0,
            attack_on,
            proxies: &proxies,
            loss,
            defense: &cfg,
            lga_loss: &lga_loss,
        };
        let loss = step_loss(&ctx, &x, labels, &mut Rng::new(3)).unwrap();
        let v = loss.item().unwrap();
        assert!(v.is_finite() && v > 0.0, "{method:?}: loss {v}");
        let g = loss.backward().unwrap();
        assert!(
            g.get(&ws[0]).is_some(),
            "{method:?}: no gradient for the member"
        );
        // The triplet loss has no proxies.
        assert_eq!(
            g.get(&proxies).is_some(),
            !method.needs_triplet(),
            "{method:?}: proxies' gradient"
        );
        // Other members are attacked through, never trained by this member's loss.
        assert!(
            g.get(&ws[1]).is_none(),
            "{method:?}: gradient leaked into another member"
        );
    }
}

/// A c2f2 run small enough to train one step per member in well under a second: 32 training
/// images of 4 classes at 8x8, batches of 8, a 1-step training attack.
fn tiny_run(method: Method) -> TrainConfig {
    let mut c = TrainConfig::new(Arch::C2f2, method);
    c.image_size = 8;
    c.embedding_dim = 8;
    c.epochs = 1;
    c.batch_size = 8;
    c.max_steps_per_epoch = 1;
    c.lr = 1e-2;
    c.warmup_epochs = 0;
    c.workers = 0;
    c.seed = 5;
    c.defense.attack = PgdConfig::new(16.0 / 255.0, 1);
    c
}

fn tiny_dataset() -> data::Dataset {
    let synth = SyntheticConfig {
        num_classes: 8,
        train_per_class: 8,
        test_per_class: 2,
        image_size: 8,
        seed: 1,
    };
    data::load(&DatasetKind::Synthetic(synth), None).unwrap()
}

/// Every trainable tensor and the proxies of member `i`, by name.
fn member_values(run: &Run, i: usize) -> Vec<(String, Vec<f32>)> {
    let m = &run.members[i];
    let mut v: Vec<(String, Vec<f32>)> = m
        .net
        .params()
        .all_trainable()
        .into_iter()
        .map(|(n, t)| (n, t.to_vec().unwrap()))
        .collect();
    v.push(("proxies".into(), m.proxies.to_vec().unwrap()));
    v
}

/// Member 0 after one epoch of `cfg` (one step), optionally with member 2's weights replaced
/// by others first: member 0 trains first, so only an attack on the whole ensemble can see
/// member 2.
fn member0_after_one_step(cfg: &TrainConfig, ds: &data::Dataset, disturb_member2: bool) -> Run {
    let mut run = Run::new(cfg.clone(), ds, &Device::Cpu).unwrap();
    if disturb_member2 {
        let mut r = Rng::new(99);
        for (_, t) in run.members[2].net.params().all_trainable() {
            let other = Tensor::randn(t.shape(), 0.5, &mut r, &Device::Cpu).unwrap();
            t.assign(&other).unwrap();
        }
    }
    run.train_epoch(ds, 0, true).unwrap();
    run
}

fn whole_set(run: &Run, train_len: usize) -> bool {
    let all: Vec<usize> = (0..train_len).collect();
    run.members.iter().all(|m| m.train_indices == all)
}

/// The naive ensemble (Table 3): `--ensemble-size` AT models on the whole training set, each
/// with its own seed. Plain AT has one member; plain EAT splits the data and attacks the
/// ensemble, so its member 0 is not the AT model of the same seed; this one's member 0 is, bit
/// for bit.
#[test]
fn naive_ensemble_is_at_models_on_the_whole_set() {
    let ds = tiny_dataset();
    let n = ds.train.len();
    let naive = member0_after_one_step(&tiny_run(Method::NaiveEnsemble), &ds, false);
    assert_eq!(naive.members.len(), 3, "the naive ensemble has 3 members");
    assert!(
        whole_set(&naive, n),
        "a member lost part of the training set"
    );
    for i in 0..3 {
        assert_eq!(
            naive.attacked_members(i),
            vec![i],
            "member {i} is attacked alone"
        );
    }
    let at = member0_after_one_step(&tiny_run(Method::At), &ds, false);
    assert!(
        member_values(&naive, 0) == member_values(&at, 0),
        "member 0 is not the AT model of the same seed"
    );
    // The same test tells EAT apart: split data and an ensemble attack.
    let eat = member0_after_one_step(&tiny_run(Method::Eat), &ds, false);
    assert!(!whole_set(&eat, n));
    assert!(member_values(&eat, 0) != member_values(&at, 0));
    // Its own seed per member: no two members are the same model.
    let values: Vec<_> = (0..3).map(|i| member_values(&naive, i)).collect();
    assert!(values[0] != values[1] && values[1] != values[2] && values[0] != values[2]);
    // A member's training never sees another member.
    let disturbed = member0_after_one_step(&tiny_run(Method::NaiveEnsemble), &ds, true);
    assert!(
        member_values(&disturbed, 0) == member_values(&naive, 0),
        "member 0's training saw member 2"
    );
}

/// EAT without the split (Table 3): EAT's loss and ensemble attack with every member on the
/// whole training set. `--method eat-no-split` and `--method eat --eat-split none` train the
/// same bits; plain EAT splits the data, plain AT (or a per-member attack) would leave member
/// 0 blind to member 2.
#[test]
fn eat_no_split_is_eat_on_the_whole_set() {
    let ds = tiny_dataset();
    let n = ds.train.len();
    let cfg = tiny_run(Method::EatNoSplit);
    assert_eq!(cfg.defense.eat_split, EatSplit::None);
    let no_split = member0_after_one_step(&cfg, &ds, false);
    assert_eq!(no_split.members.len(), 3);
    assert!(
        whole_set(&no_split, n),
        "a member lost part of the training set"
    );
    assert_eq!(no_split.attacked_members(0), vec![0, 1, 2]);
    let mut flag = tiny_run(Method::Eat);
    flag.defense.eat_split = EatSplit::None;
    let by_flag = member0_after_one_step(&flag, &ds, false);
    assert!(whole_set(&by_flag, n));
    for i in 0..3 {
        assert!(
            member_values(&by_flag, i) == member_values(&no_split, i),
            "member {i} differs between eat-no-split and eat --eat-split none"
        );
    }
    // The attack on member 0's batches runs through member 2.
    let disturbed = member0_after_one_step(&cfg, &ds, true);
    assert!(
        member_values(&disturbed, 0) != member_values(&no_split, 0),
        "member 0's training did not see member 2: no ensemble attack"
    );
    // Neither the AT model of the same seed nor EAT with its split.
    let at = member0_after_one_step(&tiny_run(Method::At), &ds, false);
    assert!(member_values(&no_split, 0) != member_values(&at, 0));
    let eat = Run::new(tiny_run(Method::Eat), &ds, &Device::Cpu).unwrap();
    assert!(!whole_set(&eat, n));
}

/// The ablations are opt-in: the default methods stay the six of Table 1, every preset accepts
/// them in `--methods`, and `--eat-split leave-one-out` contradicts them.
#[test]
fn table3_variants_are_opt_in_and_checked() {
    for m in Method::TABLE3 {
        assert!(
            !Method::ALL.contains(&m),
            "{m:?} joined the default methods"
        );
        assert!(m.is_ensemble() && m.uses_attack());
    }
    assert_eq!(Method::EVERY[..6], Method::ALL);
    for preset in [Preset::Quick, Preset::FashionMnist, Preset::Paper] {
        let (mut cfg, _) = preset.config();
        cfg.methods = Method::TABLE3.to_vec();
        cfg.validate().unwrap();
        for m in Method::TABLE3 {
            let d = cfg.train.defense.with_method(m);
            assert_eq!((d.method, d.eat_split), (m, EatSplit::None));
        }
    }
    for m in Method::TABLE3 {
        let mut c = tiny_run(m);
        c.defense.eat_split = EatSplit::LeaveOneOut;
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("--eat-split leave-one-out"), "{err}");
    }
}

/// Both ablations run in an experiment (as `experiment --methods naive-ensemble,eat-no-split`
/// does), are voted and attacked as EAT's ensemble, and get Figure 4's per-member bars in the
/// report; the stored run says how its data was split.
#[test]
fn table3_variants_run_in_an_experiment_with_member_bars() {
    let ds = tiny_dataset();
    let (mut cfg, _) = Preset::Quick.config();
    cfg.dataset = ds.name.clone();
    cfg.methods = Method::TABLE3.to_vec();
    cfg.train = tiny_run(Method::None);
    cfg.eval.attack = PgdConfig::new(0.1, 2);
    cfg.eval.steps_sweep = vec![0, 2];
    cfg.eval.eps_sweep = vec![0.0, 25.5];
    cfg.eval.curve_samples = 8;
    cfg.eval.max_test_samples = 8;
    cfg.eval.batch_size = 8;
    cfg.eval.strength = StrengthPlan {
        objective_samples: 0,
        transfer_samples: 0,
    };
    cfg.validate().unwrap();
    let dir = std::env::temp_dir().join(format!("robust-dml-table3-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let reports = run_experiment(&cfg, &ds, &Device::Cpu, &dir)
        .unwrap()
        .reports;
    let html = std::fs::read_to_string(dir.join("report.html")).unwrap();
    let table = std::fs::read_to_string(dir.join("table.md")).unwrap();
    for (method, report) in Method::TABLE3.into_iter().zip(&reports) {
        assert_eq!(report.members.len(), 3, "{method:?}: not 3 members");
        assert!(
            report.mean_embedding.is_some(),
            "{method:?}: no mean-embedding rows"
        );
        assert!(
            html.contains(&format!("{}: ensemble members (Figure 4)", method.label())),
            "{method:?}: no member bars in the report"
        );
        assert!(
            table.contains(method.label()),
            "{method:?} missing from table.md"
        );
        let ck = robust_dml::nn::checkpoint::Checkpoint::load(
            Cell {
                method,
                seed: report.seed,
            }
            .dir(&dir)
            .join("checkpoint.safetensors"),
        )
        .unwrap();
        let stored = Run::config_of(&ck).unwrap();
        assert_eq!(
            (stored.defense.method, stored.defense.eat_split),
            (method, EatSplit::None)
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
