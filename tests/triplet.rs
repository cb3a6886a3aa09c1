//! robrank's triplet loss and SPC-2 batches (docs/DESIGN.md, "Triplet loss and SPC-2
//! batches"): the loss against its formula written out in f64 loops on odd shapes, the miners
//! against robrank's conditions, central-difference gradients, GPU against CPU, that the
//! comparison catches a wrong margin or a wrong distance, and the SPC-2 sampler.

use robust_dml::data::synthetic::load_synthetic;
use robust_dml::data::{BatchLoader, LoaderConfig, SyntheticConfig};
use robust_dml::dml::triplet::{
    check_spc2, mine_random, mine_softhard, pairwise_distance, select_rows, spc2_triplet_loss,
    triplet_loss_on, triplet_margin_loss, Triplets, PAIRWISE_EPS,
};
use robust_dml::engine::testing::{assert_grad, assert_parity, gpu_or_skip, randn, GradCheck};
use robust_dml::engine::{Rng, Tensor};

fn rows(t: &Tensor) -> Vec<Vec<f64>> {
    let (n, d) = (t.shape()[0], t.shape()[1]);
    let v = t.to_vec().unwrap();
    (0..n)
        .map(|i| v[i * d..(i + 1) * d].iter().map(|&x| x as f64).collect())
        .collect()
}

fn unit(v: &[f64]) -> Vec<f64> {
    let n = v.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
    v.iter().map(|x| x / n).collect()
}

/// How `distance` measures a pair, so that a wrong one can be shown to be caught.
#[derive(Clone, Copy)]
enum Dist {
    /// robrank's: ||x - y + 1e-6||.
    Robrank,
    /// A plausible mistake: the squared distance.
    Squared,
}

fn distance(x: &[f64], y: &[f64], kind: Dist) -> f64 {
    let eps = PAIRWISE_EPS as f64;
    let s: f64 = x.iter().zip(y).map(|(a, b)| (a - b + eps).powi(2)).sum();
    match kind {
        Dist::Robrank => s.sqrt(),
        Dist::Squared => s,
    }
}

/// robrank's `fn_ptriplet` for metric N, in f64 loops: rows normalised, then
/// mean_t max(d(a, p) - d(a, n) + margin, 0).
fn reference(emb: &Tensor, t: &Triplets, margin: f64, kind: Dist) -> f64 {
    let e: Vec<Vec<f64>> = rows(emb).iter().map(|r| unit(r)).collect();
    let sum: f64 = (0..t.len())
        .map(|k| {
            let a = &e[t.anchors[k]];
            let hinge = distance(a, &e[t.positives[k]], kind)
                - distance(a, &e[t.negatives[k]], kind)
                + margin;
            hinge.max(0.0)
        })
        .sum();
    sum / t.len() as f64
}

fn agrees(got: f32, want: f64) -> bool {
    ((got as f64) - want).abs() <= 1e-5 * want.abs().max(1.0)
}

/// An SPC-2 label list: pair i is of class `classes[i]`.
fn spc2_labels(classes: &[usize]) -> Vec<usize> {
    classes.iter().flat_map(|&c| [c, c]).collect()
}

#[test]
fn loss_matches_robrank_formula_on_odd_shapes() {
    // 7 pairs (14 rows) of 4 classes, 9 dimensions, rows far from unit length.
    let labels = spc2_labels(&[0, 1, 2, 0, 3, 1, 2]);
    let emb = randn(&[14, 9], 21);
    for margin in [0.2f32, 0.0, 1.3] {
        let t = mine_random(&labels, &mut Rng::new(4)).unwrap();
        let got = triplet_loss_on(&emb, &t, margin).unwrap().item().unwrap();
        let want = reference(&emb, &t, margin as f64, Dist::Robrank);
        assert!(agrees(got, want), "margin {margin}: got {got}, want {want}");
        // spc2_triplet_loss mines the same triplets from the same generator.
        let spc2 = spc2_triplet_loss(&emb, &labels, margin, &mut Rng::new(4))
            .unwrap()
            .item()
            .unwrap();
        assert_eq!(spc2, got, "margin {margin}");
    }
}

#[test]
fn the_comparison_catches_a_wrong_margin_or_distance() {
    let labels = spc2_labels(&[0, 1, 2, 1, 0]);
    let emb = randn(&[10, 6], 22);
    let t = mine_random(&labels, &mut Rng::new(5)).unwrap();
    let got = triplet_loss_on(&emb, &t, 0.2).unwrap().item().unwrap();
    assert!(agrees(got, reference(&emb, &t, 0.2, Dist::Robrank)));
    let wrong_margin = reference(&emb, &t, 0.3, Dist::Robrank);
    assert!(!agrees(got, wrong_margin), "margin 0.3 not told apart");
    let wrong_distance = reference(&emb, &t, 0.2, Dist::Squared);
    assert!(
        !agrees(got, wrong_distance),
        "the squared distance not told apart"
    );
    // And the loss with a wrong margin disagrees with the right reference.
    let other = triplet_loss_on(&emb, &t, 0.25).unwrap().item().unwrap();
    assert!(!agrees(other, reference(&emb, &t, 0.2, Dist::Robrank)));
}

#[test]
fn pairwise_distance_is_pytorchs() {
    let x = randn(&[3, 5], 23);
    let y = randn(&[3, 5], 24);
    let got = pairwise_distance(&x, &y).unwrap().to_vec().unwrap();
    for (i, (a, b)) in rows(&x).iter().zip(rows(&y)).enumerate() {
        let want = distance(a, &b, Dist::Robrank);
        assert!(((got[i] as f64) - want).abs() < 1e-5, "row {i}");
    }
    // Equal rows: the 1e-6 keeps the distance (and its gradient) defined.
    let same = pairwise_distance(&x, &x).unwrap().to_vec().unwrap();
    for v in same {
        assert!((v as f64 - 1e-6 * 5f64.sqrt()).abs() < 1e-9, "{v}");
    }
}

#[test]
fn random_miner_follows_spc2() {
    let labels = spc2_labels(&[3, 1, 3, 0, 2, 1]);
    let t = mine_random(&labels, &mut Rng::new(6)).unwrap();
    assert_eq!(t.anchors, vec![0, 2, 4, 6, 8, 10]);
    assert_eq!(t.positives, vec![1, 3, 5, 7, 9, 11]);
    for k in 0..t.len() {
        assert_ne!(labels[t.negatives[k]], labels[t.anchors[k]], "triplet {k}");
    }
    // Every other-class row gets drawn over many batches (uniform, not the first).
    let mut seen = vec![false; 12];
    let mut rng = Rng::new(7);
    for _ in 0..200 {
        seen[mine_random(&labels, &mut rng).unwrap().negatives[0]] = true;
    }
    let other: Vec<usize> = (0..12).filter(|&j| labels[j] != 3).collect();
    assert!(other.iter().all(|&j| seen[j]), "{seen:?}");
    // A batch of one class: robrank falls back to any row.
    let one = mine_random(&[5, 5, 5, 5], &mut Rng::new(8)).unwrap();
    assert!(one.negatives.iter().all(|&n| n < 4));
}

#[test]
fn softhard_miner_follows_robrank_conditions() {
    let labels = spc2_labels(&[0, 1, 0, 2, 1, 0, 2]);
    let emb = randn(&[14, 4], 25);
    let e: Vec<Vec<f64>> = rows(&emb).iter().map(|r| unit(r)).collect();
    let d = |i: usize, j: usize| distance(&e[i], &e[j], Dist::Robrank);
    let mut rng = Rng::new(9);
    for _ in 0..20 {
        let t = mine_softhard(&emb, &labels, &mut rng).unwrap();
        for k in 0..t.len() {
            let (a, p, n) = (t.anchors[k], t.positives[k], t.negatives[k]);
            assert_eq!(a, 2 * k);
            assert_eq!(labels[p], labels[a]);
            assert_ne!(labels[n], labels[a]);
            let same: Vec<usize> = (0..14).filter(|&j| labels[j] == labels[a]).collect();
            let other: Vec<usize> = (0..14).filter(|&j| labels[j] != labels[a]).collect();
            let max_ap = same.iter().map(|&j| d(a, j)).fold(0.0, f64::max);
            let min_an = other.iter().map(|&j| d(a, j)).fold(f64::MAX, f64::min);
            // Soft negatives (nearer than the farthest positive) are taken when there are any.
            if other.iter().any(|&j| d(a, j) < max_ap - 1e-5) {
                assert!(d(a, n) < max_ap + 1e-5, "triplet {k}: negative not soft");
            }
            if same.iter().any(|&j| d(a, j) > min_an + 1e-5) {
                assert!(d(a, p) > min_an - 1e-5, "triplet {k}: positive not soft");
            }
        }
    }
}

#[test]
fn spc2_batches_are_checked() {
    assert!(check_spc2(&[0, 0, 1, 1]).is_ok());
    let odd = check_spc2(&[0, 0, 1]).unwrap_err().to_string();
    assert!(odd.contains("pairs"), "{odd}");
    let mixed = check_spc2(&[0, 0, 1, 2]).unwrap_err().to_string();
    assert!(mixed.contains("rows 2 and 3"), "{mixed}");
    let emb = randn(&[6, 3], 1);
    assert!(spc2_triplet_loss(&emb, &[0, 0, 1, 1], 0.2, &mut Rng::new(1)).is_err());
}

/// Fixed triplets whose hinges all lie at least `gap` from the kink at 0, so central
/// differences see one side of it.
fn triplets_away_from_kink(emb: &Tensor, margin: f32, gap: f64) -> Triplets {
    let labels = spc2_labels(&[0, 1, 2, 1, 0]);
    let e: Vec<Vec<f64>> = rows(emb).iter().map(|r| unit(r)).collect();
    let mut rng = Rng::new(10);
    loop {
        let t = mine_random(&labels, &mut rng).unwrap();
        let clear = (0..t.len()).all(|k| {
            let a = &e[t.anchors[k]];
            let h = distance(a, &e[t.positives[k]], Dist::Robrank)
                - distance(a, &e[t.negatives[k]], Dist::Robrank)
                + margin as f64;
            h.abs() > gap
        });
        if clear {
            return t;
        }
    }
}

#[test]
fn gradients_match_central_differences() {
    let emb = randn(&[10, 7], 26);
    for margin in [0.2f32, 0.6] {
        let t = triplets_away_from_kink(&emb, margin, 0.1);
        assert_grad(
            &format!("triplet margin {margin}"),
            |x| triplet_loss_on(&x[0], &t, margin),
            std::slice::from_ref(&emb),
            GradCheck {
                eps: 1e-3,
                ..GradCheck::default()
            },
        );
    }
    let a = randn(&[4, 5], 27);
    let b = randn(&[4, 5], 28);
    assert_grad(
        "pairwise distance",
        |x| pairwise_distance(&x[0], &x[1]),
        &[a.clone(), b.clone()],
        GradCheck::default(),
    );
    assert_grad(
        "select rows",
        |x| select_rows(&x[0], &[3, 0, 0, 2]),
        &[a],
        GradCheck::default(),
    );
}

#[test]
fn gpu_matches_cpu() {
    let Some(gpu) = gpu_or_skip("triplet gpu_matches_cpu") else {
        return;
    };
    let emb = randn(&[10, 7], 29);
    let t = triplets_away_from_kink(&emb, 0.2, 0.01);
    assert_parity(
        "triplet loss",
        &gpu,
        |x| triplet_loss_on(&x[0], &t, 0.2),
        std::slice::from_ref(&emb),
        1e-4,
        1e-3,
    );
    let a = randn(&[5, 9], 30);
    let b = randn(&[5, 9], 31);
    assert_parity(
        "pairwise distance",
        &gpu,
        |x| pairwise_distance(&x[0], &x[1]),
        &[a, b],
        1e-4,
        1e-3,
    );
    // Rows of images (select_rows gathers [B, 3, H, W] too).
    let imgs = randn(&[4, 3, 5, 5], 32);
    assert_parity(
        "select rows of images",
        &gpu,
        |x| select_rows(&x[0], &[2, 2, 0]),
        &[imgs],
        0.0,
        0.0,
    );
    let m = triplet_margin_loss(
        &randn(&[3, 4], 33).to_device(&gpu).unwrap(),
        &randn(&[3, 4], 34).to_device(&gpu).unwrap(),
        &randn(&[3, 4], 35).to_device(&gpu).unwrap(),
        f32::NAN,
    );
    assert!(m.is_err(), "a NaN margin must be refused");
}

fn spc2_loader(batch: usize, workers: usize) -> (BatchLoader, Vec<usize>) {
    let samples = load_synthetic(&SyntheticConfig {
        num_classes: 4,
        train_per_class: 5,
        test_per_class: 1,
        image_size: 8,
        seed: 9,
    })
    .unwrap()
    .train;
    let cfg = LoaderConfig {
        workers,
        ..LoaderConfig::train(batch, 8, 42).spc2()
    };
    let labels = samples.iter().map(|s| s.label).collect();
    (BatchLoader::new(samples, cfg).unwrap(), labels)
}

#[test]
fn spc2_sampler_pairs_each_anchor_with_its_class() {
    let (loader, labels) = spc2_loader(6, 0);
    // 10 anchors (the training half of the classes) in groups of 3 pairs: 3 batches, the
    // last anchor dropped.
    assert_eq!(loader.num_samples(), 10);
    assert_eq!(loader.batches_per_epoch(), 3);
    let batches = loader.batch_indices(3);
    assert_eq!(batches.len(), 3);
    let mut anchors = Vec::new();
    for b in &batches {
        assert_eq!(b.len(), 6);
        for pair in b.chunks(2) {
            assert_eq!(labels[pair[0]], labels[pair[1]], "pair {pair:?}");
            anchors.push(pair[0]);
        }
    }
    anchors.sort_unstable();
    anchors.dedup();
    assert_eq!(anchors.len(), 9, "each anchor once per epoch");
    // The batches' labels are an SPC-2 batch, as the loss checks.
    let batch = loader.epoch(3).next().unwrap();
    check_spc2(&batch.labels).unwrap();
    // Positives are drawn again every epoch, from the whole class.
    let positives = |epoch| -> Vec<usize> {
        let mut p: Vec<(usize, usize)> = loader
            .batch_indices(epoch)
            .iter()
            .flat_map(|b| b.chunks(2).map(|c| (c[0], c[1])).collect::<Vec<_>>())
            .collect();
        p.sort_unstable();
        p.into_iter().map(|(_, p)| p).collect()
    };
    assert_ne!(positives(3), positives(4));
    // Deterministic, and independent of the decoding threads.
    let reference: Vec<_> = loader.epoch(2).collect();
    for workers in [1, 3] {
        let other: Vec<_> = spc2_loader(6, workers).0.epoch(2).collect();
        assert_eq!(other, reference, "{workers} workers");
    }
}

#[test]
fn spc2_sampler_refuses_an_odd_batch() {
    let samples = load_synthetic(&SyntheticConfig {
        num_classes: 2,
        train_per_class: 3,
        test_per_class: 1,
        image_size: 8,
        seed: 9,
    })
    .unwrap()
    .train;
    let err = BatchLoader::new(samples, LoaderConfig::train(5, 8, 1).spc2())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("odd"), "{err}");
}
