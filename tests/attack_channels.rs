//! Attacks with tied channels (docs/DESIGN.md, "Attacks"): on a grey image given as three equal
//! channels, the step direction is the gradient with respect to the grey image, every attack
//! keeps the image grey bit for bit, and colour images are refused.

use robust_dml::config::{AttackChannels, AttackKind, PgdConfig};
use robust_dml::engine::ops::elementwise::mul;
use robust_dml::engine::ops::reduce::sum;
use robust_dml::engine::testing::gpu_or_skip;
use robust_dml::engine::{Device, Rng, Tensor};
use robust_dml::robust::attack::channels::{check_input, start_noise, step_direction};
use robust_dml::robust::attack::{attack, EmbedFn, Goal};
use robust_dml::robust::robrank::descend;

mod common;
use common::Tiny;

const SHAPE: [usize; 4] = [3, 3, 5, 7];

/// A batch of grey images given as three equal channels.
fn grey_batch(seed: u64, d: &Device) -> Tensor {
    let [n, _, h, w] = SHAPE;
    let mut r = Rng::new(seed);
    let grey: Vec<f32> = (0..n * h * w).map(|_| 0.2 + 0.6 * r.uniform()).collect();
    let rgb: Vec<f32> = grey
        .chunks_exact(h * w)
        .flat_map(|plane| {
            plane
                .iter()
                .chain(plane)
                .chain(plane)
                .copied()
                .collect::<Vec<_>>()
        })
        .collect();
    Tensor::from_vec(rgb, &SHAPE, d).unwrap()
}

/// Whether every image of `x` has three bit-identical channels.
fn is_grey(x: &Tensor) -> bool {
    let plane = SHAPE[2] * SHAPE[3];
    x.to_vec()
        .unwrap()
        .chunks_exact(3 * plane)
        .all(|im| im[..plane] == im[plane..2 * plane] && im[..plane] == im[2 * plane..])
}

/// Checks `tied` against the loop it must equal: per pixel, g_r + g_g + g_b on every channel.
fn check_tied_sum(g: &[f32], tied: &[f32]) -> Result<(), String> {
    let plane = SHAPE[2] * SHAPE[3];
    for (img, (gi, ti)) in g
        .chunks_exact(3 * plane)
        .zip(tied.chunks_exact(3 * plane))
        .enumerate()
    {
        for p in 0..plane {
            let want = gi[p] + gi[plane + p] + gi[2 * plane + p];
            for c in 0..3 {
                let got = ti[c * plane + p];
                if (got - want).abs() > 1e-6 * want.abs().max(1.0) {
                    return Err(format!(
                        "image {img}, channel {c}, pixel {p}: {got} != {want}"
                    ));
                }
            }
        }
    }
    Ok(())
}

fn check_step_direction(d: &Device) {
    let g = Tensor::randn(&SHAPE, 1.0, &mut Rng::new(1), d).unwrap();
    let host = g.to_vec().unwrap();
    let tied = step_direction(&g, AttackChannels::Tied).unwrap();
    assert_eq!(tied.shape(), &SHAPE);
    check_tied_sum(&host, &tied.to_vec().unwrap()).unwrap();
    let same = step_direction(&g, AttackChannels::Independent).unwrap();
    assert_eq!(
        same.to_vec().unwrap(),
        host,
        "independent channels change the gradient"
    );
    // The checker catches a wrong tie: the first channel copied instead of the sum.
    let noise = start_noise(g.clone(), AttackChannels::Tied).unwrap();
    assert!(check_tied_sum(&host, &noise.to_vec().unwrap()).is_err());
    // and the untied gradient itself.
    assert!(check_tied_sum(&host, &host).is_err());
}

#[test]
fn tied_direction_sums_the_channels() {
    check_step_direction(&Device::Cpu);
    if let Some(gpu) = gpu_or_skip("tied_direction_sums_the_channels_gpu") {
        check_step_direction(&gpu);
    }
}

/// The tied direction is the gradient with respect to the grey image: central differences of
/// an objective of the network on three equal channels, one grey pixel at a time.
#[test]
fn tied_direction_is_the_grey_images_gradient() {
    let d = Device::Cpu;
    let m = Tiny::new(7, &d);
    let dir = Tensor::randn(&[SHAPE[0], 6], 1.0, &mut Rng::new(8), &d).unwrap();
    let objective = |x: &Tensor| sum(&mul(&m.embed(x).unwrap(), &dir).unwrap()).unwrap();
    let x = grey_batch(9, &d);
    let var = x.var();
    let grads = objective(&var).backward().unwrap();
    let g = grads.get(&var).unwrap().detach();
    let tied = step_direction(&g, AttackChannels::Tied)
        .unwrap()
        .to_vec()
        .unwrap();
    let host = x.to_vec().unwrap();
    let plane = SHAPE[2] * SHAPE[3];
    let h = 1e-2f32;
    for (img, p) in [(0, 0), (1, 13), (2, plane - 1)] {
        let moved = |by: f32| {
            let mut v = host.clone();
            for c in 0..3 {
                v[img * 3 * plane + c * plane + p] += by;
            }
            objective(&Tensor::from_vec(v, &SHAPE, &d).unwrap())
                .item()
                .unwrap()
        };
        let numeric = (moved(h) - moved(-h)) / (2.0 * h);
        let analytic = tied[img * 3 * plane + p];
        assert!(
            (numeric - analytic).abs() <= 2e-2 * numeric.abs().max(0.1),
            "image {img} pixel {p}: central difference {numeric}, tied gradient {analytic}"
        );
    }
}

fn cfg(channels: AttackChannels, kind: AttackKind) -> PgdConfig {
    PgdConfig {
        channels,
        kind,
        ..PgdConfig::new(16.0 / 255.0, 6)
    }
}

fn check_attacks_keep_grey(d: &Device) {
    let m = Tiny::new(3, d);
    let f = |x: &Tensor| m.embed(x);
    let members: [EmbedFn; 1] = [&f];
    let x = grey_batch(4, d);
    for kind in [AttackKind::Pgd, AttackKind::Apgd] {
        for random_start in [false, true] {
            let mut c = cfg(AttackChannels::Tied, kind);
            c.random_start = random_start;
            let adv = attack(&members, &x, &c, &Goal::EmbeddingShift, &mut Rng::new(5)).unwrap();
            assert!(
                is_grey(&adv),
                "{kind:?} (random start {random_start}) left grey"
            );
            assert_ne!(
                adv.to_vec().unwrap(),
                x.to_vec().unwrap(),
                "{kind:?} did not move"
            );
            // The check can fail: the same attack with independent channels makes colour.
            c.channels = AttackChannels::Independent;
            let free = attack(&members, &x, &c, &Goal::EmbeddingShift, &mut Rng::new(5)).unwrap();
            assert!(
                !is_grey(&free),
                "{kind:?} with independent channels stayed grey"
            );
        }
    }
    // robrank's training PGD (EST, ACT, HM).
    let dir = Tensor::randn(&[SHAPE[0], 6], 1.0, &mut Rng::new(6), d).unwrap();
    let objective = |x: &Tensor| sum(&mul(&m.embed(x)?, &dir)?);
    let tied = descend(
        &x,
        &cfg(AttackChannels::Tied, AttackKind::Pgd),
        false,
        objective,
    )
    .unwrap();
    assert!(is_grey(&tied), "robrank's descend left grey");
    let free = descend(
        &x,
        &cfg(AttackChannels::Independent, AttackKind::Pgd),
        false,
        objective,
    );
    assert!(
        !is_grey(&free.unwrap()),
        "robrank's descend stayed grey untied"
    );
}

#[test]
fn tied_attacks_keep_the_image_grey() {
    check_attacks_keep_grey(&Device::Cpu);
    if let Some(gpu) = gpu_or_skip("tied_attacks_keep_the_image_grey_gpu") {
        check_attacks_keep_grey(&gpu);
    }
}

#[test]
fn tied_channels_refuse_colour_images() {
    let d = Device::Cpu;
    let colour = Tensor::rand_uniform(&SHAPE, 0.0, 1.0, &mut Rng::new(1), &d).unwrap();
    let err = check_input(&colour, AttackChannels::Tied)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("has colour") && err.contains("--attack-channels independent"),
        "{err}"
    );
    check_input(&colour, AttackChannels::Independent).unwrap();
    check_input(&grey_batch(2, &d), AttackChannels::Tied).unwrap();
    let one = Tensor::rand_uniform(&[2, 1, 4, 4], 0.0, 1.0, &mut Rng::new(1), &d).unwrap();
    let err = check_input(&one, AttackChannels::Tied)
        .unwrap_err()
        .to_string();
    assert!(err.contains("1 channels, not 3"), "{err}");
    // Through the attack itself: an error, no panic.
    let m = Tiny::new(3, &d);
    let f = |x: &Tensor| m.embed(x);
    let members: [EmbedFn; 1] = [&f];
    let c = cfg(AttackChannels::Tied, AttackKind::Pgd);
    assert!(attack(
        &members,
        &colour,
        &c,
        &Goal::EmbeddingShift,
        &mut Rng::new(5)
    )
    .is_err());
}

#[test]
fn channels_setting_reads_from_old_configs() {
    let mut old: serde_json::Value = serde_json::to_value(PgdConfig::new(0.1, 10)).unwrap();
    assert!(
        old.get("channels").is_none(),
        "independent is left out of written configs"
    );
    old.as_object_mut().unwrap().remove("channels");
    let read: PgdConfig = serde_json::from_value(old).unwrap();
    assert_eq!(read.channels, AttackChannels::Independent);
    let tied = cfg(AttackChannels::Tied, AttackKind::Pgd);
    let text = serde_json::to_string(&tied).unwrap();
    assert!(text.contains("\"channels\":\"tied\""), "{text}");
    assert_eq!(serde_json::from_str::<PgdConfig>(&text).unwrap(), tied);
}
