//! Proxy Anchor loss: against the paper's formula written out directly, gradient checks,
//! GPU against CPU, numerical stability at alpha = 32 and beyond, classes absent from a batch.

use robust_dml::dml::loss::{init_proxies, proxy_anchor_loss, ProxyAnchorConfig};
use robust_dml::engine::testing::{assert_grad, assert_parity, gpu_or_skip, randn, GradCheck};
use robust_dml::engine::{Device, Rng, Tensor};

/// The loss exactly as docs/DESIGN.md (Proxy Anchor loss) writes it, in f64 with a naive log(1 + sum exp):
/// mean over P+ (proxies with a positive) of the positive terms, mean over all C proxies of
/// the negative terms.
fn direct_formula(emb: &Tensor, proxies: &Tensor, labels: &[usize], alpha: f64, delta: f64) -> f64 {
    let (b, d) = (emb.shape()[0], emb.shape()[1]);
    let c = proxies.shape()[0];
    let (e, p) = (emb.to_vec().unwrap(), proxies.to_vec().unwrap());
    let unit = |v: &[f32]| {
        let n = v.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
        v.iter().map(|&x| x as f64 / n).collect::<Vec<f64>>()
    };
    let xs: Vec<Vec<f64>> = (0..b).map(|i| unit(&e[i * d..(i + 1) * d])).collect();
    let ps: Vec<Vec<f64>> = (0..c).map(|j| unit(&p[j * d..(j + 1) * d])).collect();
    let cos = |x: &[f64], q: &[f64]| x.iter().zip(q).map(|(a, b)| a * b).sum::<f64>();
    let (mut pos_sum, mut neg_sum, mut num_pos) = (0.0, 0.0, 0);
    for (j, q) in ps.iter().enumerate() {
        let positives: Vec<usize> = (0..b).filter(|&i| labels[i] == j).collect();
        if !positives.is_empty() {
            num_pos += 1;
            let s: f64 = positives
                .iter()
                .map(|&i| (-alpha * (cos(&xs[i], q) - delta)).exp())
                .sum();
            pos_sum += (1.0 + s).ln();
        }
        let s: f64 = (0..b)
            .filter(|&i| labels[i] != j)
            .map(|i| (alpha * (cos(&xs[i], q) + delta)).exp())
            .sum();
        neg_sum += (1.0 + s).ln();
    }
    pos_sum / num_pos as f64 + neg_sum / c as f64
}

#[test]
fn default_config_is_the_official_one() {
    let c = ProxyAnchorConfig::default();
    assert_eq!((c.alpha, c.delta), (32.0, 0.1));
}

#[test]
fn matches_direct_formula() {
    // 6 samples, 4 classes; class 3 has no sample in the batch (|P+| = 3 < C = 4).
    let emb = randn(&[6, 5], 1);
    let proxies = randn(&[4, 5], 2);
    let labels = [0, 1, 2, 0, 1, 1];
    for (alpha, delta) in [(32.0, 0.1), (4.0, 0.3)] {
        let got = proxy_anchor_loss(&emb, &proxies, &labels, alpha, delta)
            .unwrap()
            .item()
            .unwrap();
        let want = direct_formula(&emb, &proxies, &labels, alpha as f64, delta as f64);
        assert!(
            ((got as f64) - want).abs() <= 1e-4 * want.abs().max(1.0),
            "alpha {alpha}: got {got}, want {want}"
        );
    }
}

#[test]
fn class_without_positives_counts_only_in_the_negative_term() {
    // Every sample is class 0: P+ = {0}, the positive term is not divided by C = 3.
    let emb = randn(&[4, 3], 3);
    let proxies = randn(&[3, 3], 4);
    let labels = [0, 0, 0, 0];
    let got = proxy_anchor_loss(&emb, &proxies, &labels, 32.0, 0.1)
        .unwrap()
        .item()
        .unwrap();
    let want = direct_formula(&emb, &proxies, &labels, 32.0, 0.1);
    assert!(
        ((got as f64) - want).abs() <= 1e-4 * want.abs().max(1.0),
        "got {got}, want {want}"
    );
    // The absent classes' proxies still get a gradient, from the negative term only.
    let (e, p) = (emb.var(), proxies.var());
    let grads = proxy_anchor_loss(&e, &p, &labels, 32.0, 0.1)
        .unwrap()
        .backward()
        .unwrap();
    let gp = grads.get(&p).unwrap().to_vec().unwrap();
    assert!(gp[3..].iter().any(|&v| v != 0.0) && gp.iter().all(|v| v.is_finite()));
}

#[test]
fn gradients_reach_embeddings_and_proxies() {
    let emb = randn(&[5, 4], 5);
    let proxies = randn(&[3, 4], 6);
    let labels = [0, 2, 2, 0, 1];
    let o = GradCheck::default();
    for alpha in [4.0f32, 16.0] {
        assert_grad(
            &format!("proxy anchor alpha {alpha}"),
            |t| proxy_anchor_loss(&t[0], &t[1], &labels, alpha, 0.1),
            &[emb.clone(), proxies.clone()],
            o,
        );
    }
    // The official alpha: sharper, so a smaller finite-difference step.
    assert_grad(
        "proxy anchor alpha 32",
        |t| proxy_anchor_loss(&t[0], &t[1], &labels, 32.0, 0.1),
        &[emb, proxies],
        GradCheck {
            eps: 2e-3,
            atol: 5e-3,
            rtol: 5e-2,
            ..o
        },
    );
}

#[test]
fn gpu_matches_cpu() {
    let Some(gpu) = gpu_or_skip("proxy_anchor gpu_matches_cpu") else {
        return;
    };
    let emb = randn(&[7, 9], 7);
    let proxies = randn(&[5, 9], 8);
    let labels = [0, 1, 1, 3, 0, 3, 3]; // classes 2 and 4 absent
    assert_parity(
        "proxy anchor",
        &gpu,
        |t| proxy_anchor_loss(&t[0], &t[1], &labels, 32.0, 0.1),
        &[emb, proxies],
        1e-4,
        1e-3,
    );
    // A batch larger than one 256-thread workgroup.
    let emb = randn(&[300, 6], 9);
    let proxies = randn(&[4, 6], 10);
    let labels: Vec<usize> = (0..300).map(|i| (i * 7) % 4).collect();
    assert_parity(
        "proxy anchor 300",
        &gpu,
        |t| proxy_anchor_loss(&t[0], &t[1], &labels, 32.0, 0.1),
        &[emb, proxies],
        1e-4,
        1e-3,
    );
}

/// Embeddings lying exactly on their own proxy (orthogonal to the others), scaled far from 1.
fn separated(classes: usize, per_class: usize, dim: usize) -> (Tensor, Tensor, Vec<usize>) {
    let mut proxies = vec![0.0f32; classes * dim];
    for c in 0..classes {
        proxies[c * dim + c] = 1.0;
    }
    let labels: Vec<usize> = (0..classes * per_class).map(|i| i % classes).collect();
    let emb: Vec<f32> = labels
        .iter()
        .flat_map(|&l| proxies[l * dim..(l + 1) * dim].iter().map(|v| v * 100.0))
        .collect();
    (
        Tensor::from_cpu(emb, &[labels.len(), dim]).unwrap(),
        Tensor::from_cpu(proxies, &[classes, dim]).unwrap(),
        labels,
    )
}

#[test]
fn stable_for_large_alpha_and_separated_embeddings() {
    let (emb, proxies, labels) = separated(3, 2, 4);
    let mut devices = vec![Device::Cpu];
    devices.extend(gpu_or_skip("proxy anchor stability"));
    for dev in &devices {
        // alpha = 32 is the official value; alpha = 200 would overflow a naive exp in f32
        // (exp(-200 (cos - delta)) with cos = -1 is e^220).
        for alpha in [32.0f32, 200.0] {
            let (e, p) = (
                emb.to_device(dev).unwrap().var(),
                proxies.to_device(dev).unwrap().var(),
            );
            // Flip the sign of the embeddings: every positive cosine becomes -1.
            let far = robust_dml::engine::ops::elementwise::scale(&e, -1.0).unwrap();
            for (what, x) in [("separated", &e), ("opposite", &far)] {
                let loss = proxy_anchor_loss(x, &p, &labels, alpha, 0.1).unwrap();
                let value = loss.item().unwrap();
                assert!(
                    value.is_finite(),
                    "{}: {what} alpha {alpha}: loss {value}",
                    dev.name()
                );
                let grads = loss.backward().unwrap();
                for g in [grads.get(&e).unwrap(), grads.get(&p).unwrap()] {
                    assert!(
                        g.to_vec().unwrap().iter().all(|v| v.is_finite()),
                        "{}: {what} alpha {alpha}: gradient",
                        dev.name()
                    );
                }
            }
        }
    }
    // Separated: the positive terms vanish (exponent -alpha * 0.9), the negative ones are
    // log(1 + 4 e^(alpha delta)) with cos = 0; the value still matches the direct formula.
    let value = proxy_anchor_loss(&emb, &proxies, &labels, 32.0, 0.1)
        .unwrap()
        .item()
        .unwrap();
    let want = direct_formula(&emb, &proxies, &labels, 32.0, 0.1);
    let negative_only = (1.0 + 4.0 * (3.2f64).exp()).ln();
    assert!(
        (value as f64 - want).abs() < 1e-4,
        "loss {value}, want {want}"
    );
    assert!(
        (want - negative_only).abs() < 1e-6,
        "positive terms should vanish: {want}"
    );
}

#[test]
fn rejects_bad_labels_and_shapes() {
    let emb = randn(&[3, 4], 1);
    let proxies = randn(&[2, 4], 2);
    assert!(
        proxy_anchor_loss(&emb, &proxies, &[0, 1], 32.0, 0.1).is_err(),
        "too few labels"
    );
    assert!(
        proxy_anchor_loss(&emb, &proxies, &[0, 1, 2], 32.0, 0.1).is_err(),
        "label past C"
    );
    assert!(
        proxy_anchor_loss(&emb, &randn(&[2, 5], 3), &[0, 1, 1], 32.0, 0.1).is_err(),
        "dims differ"
    );
}

#[test]
fn proxies_are_kaiming_normal_fan_out() {
    let (classes, dim) = (50, 400);
    let p = init_proxies(classes, dim, &mut Rng::new(1), &Device::Cpu).unwrap();
    assert_eq!(p.shape(), &[classes, dim]);
    assert!(p.requires_grad(), "proxies are trainable leaves");
    let v = p.to_vec().unwrap();
    let mean = v.iter().sum::<f32>() / v.len() as f32;
    let std = (v.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / v.len() as f32).sqrt();
    let want = (2.0f32 / classes as f32).sqrt(); // gain sqrt(2) over sqrt(fan_out = C)
    assert!(
        mean.abs() < 0.01 && (std - want).abs() < 0.01 * want * 3.0,
        "mean {mean}, std {std}, want {want}"
    );
}
