//! The ranking-attack suite (docs/DESIGN.md, "The ranking-attack suite and ERS"): every attack
//! moves its score in the intended direction further than uniform +-eps sign noise of the same
//! size, on a tiny model whose clean retrieval is perfect; ERS matches a row computed by hand.

use robust_dml::config::{AttackChannels, GtmTarget};
use robust_dml::engine::testing::gpu_or_skip;
use robust_dml::engine::{no_grad, Device, Rng, Tensor};
use robust_dml::robust::ranking::{
    attack_batch, robrank_gtm_target, Database, Perturbation, RankAttack, RankBatch, RankPgd,
    RankScores,
};

mod common;
use common::Tiny;

const CLASSES: usize = 4;
const PER_CLASS: usize = 10;
const SHAPE: [usize; 3] = [3, 6, 5];

/// Class-structured images: one random base image per class plus small noise, so that the
/// clean model retrieves its own class; labels in class order.
fn dataset(d: &Device) -> (Tensor, Vec<usize>) {
    let mut r = Rng::new(7);
    let px: usize = SHAPE.iter().product();
    let bases: Vec<Vec<f32>> = (0..CLASSES)
        .map(|_| (0..px).map(|_| r.uniform()).collect())
        .collect();
    let mut data = Vec::new();
    let mut labels = Vec::new();
    for (c, base) in bases.iter().enumerate() {
        for _ in 0..PER_CLASS {
            data.extend(base.iter().map(|v| (v + 0.03 * r.normal()).clamp(0.0, 1.0)));
            labels.push(c);
        }
    }
    let n = labels.len();
    let x = Tensor::from_vec(data, &[n, SHAPE[0], SHAPE[1], SHAPE[2]], d).unwrap();
    (x, labels)
}

/// Scores of every attack, attacked and under noise, on a batch of 8 images (2 per class).
fn suite(d: &Device) -> (RankScores, RankScores, Vec<(f64, f64)>) {
    let m = Tiny::with_widths(1, 16, 8, d);
    let f = |x: &Tensor| m.embed(x);
    let (x, labels) = dataset(d);
    let emb = no_grad(|| m.embed(&x)).unwrap().to_vec().unwrap();
    let db = Database::new(emb, labels, 8, d).unwrap();
    let items: Vec<usize> = (0..CLASSES)
        .flat_map(|c| [c * PER_CLASS, c * PER_CLASS + 5])
        .collect();
    let px: usize = SHAPE.iter().product();
    let all = x.to_vec().unwrap();
    let rows: Vec<f32> = items
        .iter()
        .flat_map(|&i| all[i * px..(i + 1) * px].to_vec())
        .collect();
    let xb = Tensor::from_vec(rows, &[items.len(), SHAPE[0], SHAPE[1], SHAPE[2]], d).unwrap();
    let batch = RankBatch {
        x: &xb,
        items: &items,
    };
    let pgd = RankPgd {
        eps: 77.0 / 255.0,
        alpha: 3.0 / 255.0,
        steps: 32,
        channels: AttackChannels::Independent,
    };
    let (mut attacked, mut noise) = (RankScores::default(), RankScores::default());
    let mut losses = Vec::new();
    for (k, attack) in RankAttack::ALL.into_iter().enumerate() {
        let run = |p| attack_batch(&f, &batch, &db, attack, &pgd, p, &mut Rng::new(k as u64));
        let (a, la) = run(Perturbation::Attack).unwrap();
        let (n, ln) = run(Perturbation::Noise).unwrap();
        attacked.set(attack, &a);
        noise.set(attack, &n);
        losses.push((la, ln));
    }
    (attacked, noise, losses)
}

fn check_suite(d: &Device) {
    let (a, n, losses) = suite(d);
    eprintln!("attacked {a:?}\nnoise    {n:?}\nlosses   {losses:?}");
    for (attack, (la, ln)) in RankAttack::ALL.iter().zip(&losses) {
        assert!(
            la < ln,
            "{}: final loss {la} not below the noise's {ln}",
            attack.label()
        );
    }
    // Each score moves the way its attack intends, further than noise does.
    let lower = [
        ("CA+", a.ca_plus, n.ca_plus),
        ("QA+", a.qa_plus, n.qa_plus),
        ("ES:R", a.es_r, n.es_r),
        ("LTM", a.ltm, n.ltm),
        ("GTM", a.gtm, n.gtm),
        ("GTT", a.gtt, n.gtt),
    ];
    for (name, att, noi) in lower {
        assert!(att < noi, "{name}: attacked {att} not below noise {noi}");
    }
    let higher = [
        ("CA-", a.ca_minus, n.ca_minus),
        ("QA-", a.qa_minus, n.qa_minus),
        ("ES:D", a.es_d, n.es_d),
        ("TMA", a.tma, n.tma),
    ];
    for (name, att, noi) in higher {
        assert!(att > noi, "{name}: attacked {att} not above noise {noi}");
    }
    assert!(
        a.ers() < n.ers(),
        "ERS {} not below noise's {}",
        a.ers(),
        n.ers()
    );
}

#[test]
fn ranking_attacks_beat_noise_cpu() {
    check_suite(&Device::Cpu);
}

#[test]
fn ranking_attacks_beat_noise_gpu() {
    if let Some(gpu) = gpu_or_skip("ranking_attacks_beat_noise_gpu") {
        check_suite(&gpu);
    }
}

#[test]
fn ers_of_a_hand_computed_row() {
    let s = RankScores {
        ca_plus: 10.0,
        ca_minus: 90.0,
        qa_plus: 5.0,
        qa_minus: 80.0,
        es_d: 1.2,
        es_r: 20.0,
        tma: 0.9,
        ltm: 10.0,
        gtm: 15.0,
        gtt: 30.0,
    };
    // 2*10, 100-90, 2*5, 100-80, 100*(1-0.9), 100*(2-1.2)/2, 20, 10, 15, 30
    let terms = [20.0, 10.0, 10.0, 20.0, 10.0, 40.0, 20.0, 10.0, 15.0, 30.0];
    for (got, want) in s.ers_terms().iter().zip(terms) {
        assert!((got - want).abs() < 1e-9, "term {got} != {want}");
    }
    assert!((s.ers() - 18.5).abs() < 1e-9, "ERS {}", s.ers());
    // Nothing is clipped: an ES shift over 2 gives a negative term.
    let over = RankScores { es_d: 2.5, ..s };
    assert!((over.ers_terms()[5] + 25.0).abs() < 1e-9);
}

#[test]
fn database_refuses_inconsistent_rows() {
    let d = Device::Cpu;
    assert!(Database::new(vec![0.0; 5], vec![0, 1], 2, &d).is_err());
    assert!(Database::new(vec![0.0; 2], vec![0], 2, &d).is_err());
    assert!(Database::new(vec![], vec![], 0, &d).is_err());
}

/// robrank's GTM target, worked by hand from its `_sel_gtm`: the position of the nearest
/// other-label item within the other-label subset, read as an index of the whole database.
#[test]
fn gtm_robrank_target_is_the_position_read_as_an_index() {
    // Query 0 (label 0); its top-1 is item 2 (label 0). The other-label items are 1, 3 and 4
    // (positions 0, 1, 2); the nearest of them is item 4, at position 2, so robrank's code
    // reads item 2, of the query's own label. The stated target would be item 4.
    let labels = [0, 1, 0, 1, 2, 0];
    let row = [0.0, 0.5, 0.1, 0.3, 0.2, 0.9];
    assert_eq!(robrank_gtm_target(&row, 0, &labels), 2);
    // A query whose own label differs from its top-1's sits in the other-label subset: it
    // keeps its position there (so the others' positions shift) but is never the target.
    // Query 1 (label 1): top-1 is item 0 (label 0); other-label items 1, 3, 4 at positions
    // 0, 1, 2; the nearest apart from the query is item 3, at position 1.
    let row = [0.05, 0.0, 0.4, 0.3, 0.35, 0.01];
    assert_eq!(robrank_gtm_target(&row, 1, &labels), 1);
}

/// The suite runs GTM with the chosen target, in GTM's place, and scores it as GTM.
#[test]
fn suite_puts_robranks_gtm_in_gtms_place() {
    assert_eq!(RankAttack::suite(GtmTarget::Nearest), RankAttack::ALL);
    let coded = RankAttack::suite(GtmTarget::RobrankCode);
    for (a, b) in RankAttack::ALL.iter().zip(&coded) {
        if *a == RankAttack::Gtm {
            assert_eq!(*b, RankAttack::GtmRobrankCode);
        } else {
            assert_eq!(a, b);
        }
    }
    let mut s = RankScores::default();
    s.set(RankAttack::GtmRobrankCode, &[42.0]);
    assert_eq!(s.gtm, 42.0);
    assert_eq!(s.of(RankAttack::GtmRobrankCode)[0].1, 42.0);
}
