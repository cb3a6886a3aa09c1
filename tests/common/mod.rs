//! Helpers shared by the tests: the PyTorch fixtures of tests/fixtures (their synthetic weights,
//! made whole on load), the closeness checks of embeddings against them, and the tiny
//! embedding net the attack tests (pgd, sanity, ranking) run on; `binding_cap`, the GPU contexts
//! with bindings of a few KiB on which the op families' split tests run; `cpu_reference`, the
//! harness of their fast-CPU-kernel-against-reference-loops tests.
#![allow(dead_code)] // each test binary uses its own subset

pub mod binding_cap;
pub mod cpu_reference;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use robust_dml::engine::ops::conv::{conv2d, Conv2dParams};
use robust_dml::engine::ops::elementwise::relu;
use robust_dml::engine::ops::matmul::linear;
use robust_dml::engine::ops::normalize::l2_normalize;
use robust_dml::engine::ops::reduce::mean_dim;
use robust_dml::engine::{Device, Result, Rng, Tensor};
use robust_dml::nn::weights::{read_safetensors, write_safetensors, FileTensor};
use robust_dml::nn::{Backbone, EmbeddingNet, ForwardMode, LoadMode};
use safetensors::{Dtype, SafeTensors};

/// Embedding width of every model fixture.
pub const D: usize = 64;

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// A fresh scratch directory per test.
pub fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("robust-dml-models-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

// ------------------------------------------------------------------ synthetic fixture weights

pub fn fnv1a64(text: &str) -> u64 {
    let mut h: u64 = 0xCBF2_9CE4_8422_2325;
    for b in text.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01B3);
    }
    h
}

/// Mirror of `synthetic_uniform` in make_model_fixtures.py: He-uniform values from a
/// counter-based hash of the key name, so large weights need not be committed.
pub fn synthetic_uniform(key: &str, shape: &[usize]) -> Vec<f32> {
    let n: usize = shape.iter().product();
    let fan_in: usize = shape[1..].iter().product();
    let seed = fnv1a64(key);
    let bound = (6.0f32 / fan_in as f32).sqrt();
    (1..=n as u64)
        .map(|i| {
            let mut z = seed.wrapping_add(i.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            let u = (z >> 40) as f32 / (1u64 << 24) as f32;
            (2.0 * u - 1.0) * bound
        })
        .collect()
}

/// The float tensors of a safetensors file (integer counters skipped) and its metadata.
pub fn read_float_tensors(path: &Path) -> (BTreeMap<String, FileTensor>, BTreeMap<String, String>) {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut out = BTreeMap::new();
    for (k, v) in st.iter() {
        if v.dtype() != Dtype::F32 {
            continue;
        }
        let data = v
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        out.insert(
            k.to_string(),
            FileTensor {
                shape: v.shape().to_vec(),
                data,
                dtype: "F32".into(),
            },
        );
    }
    let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
    let meta = header
        .metadata()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    (out, meta)
}

/// The fixture's complete weights: the stored ones plus the synthetic ones, written to a file.
pub fn full_weights_file(name: &str, model: &EmbeddingNet, dir: &Path) -> PathBuf {
    let path = dir.join(format!("{name}.full.safetensors"));
    write_safetensors(&path, &full_weights(name, model), Dtype::F32).unwrap();
    path
}

/// The fixture's complete weights: the stored ones plus the synthetic ones (shapes from `model`).
pub fn full_weights(name: &str, model: &EmbeddingNet) -> BTreeMap<String, FileTensor> {
    let (mut tensors, meta) = read_float_tensors(&fixture(&format!("{name}.weights.safetensors")));
    let synthetic = meta.get("synthetic_keys").cloned().unwrap_or_default();
    for key in synthetic.split(',').filter(|k| !k.is_empty()) {
        let shape = model
            .params()
            .by_name(key)
            .unwrap_or_else(|| panic!("model lacks synthetic key {key}"))
            .shape()
            .to_vec();
        let data = synthetic_uniform(key, &shape);
        tensors.insert(
            key.to_string(),
            FileTensor {
                shape,
                data,
                dtype: "F32".into(),
            },
        );
    }
    tensors
}

// ------------------------------------------------------------------ parity with PyTorch

pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum();
    let na: f64 = a.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

pub fn assert_embeddings_match(what: &str, got: &Tensor, want: &FileTensor) {
    assert_eq!(got.shape(), want.shape.as_slice(), "{what}: shape");
    let g = got.to_vec().unwrap();
    let d = want.shape[1];
    for (i, (gr, wr)) in g.chunks(d).zip(want.data.chunks(d)).enumerate() {
        let cos = cosine(gr, wr);
        let max_abs = gr
            .iter()
            .zip(wr)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(
            cos > 0.9999 && max_abs < 1e-3,
            "{what}: sample {i}: cosine {cos}, max |diff| {max_abs}"
        );
    }
}

pub fn assert_values_close(what: &str, got: &Tensor, want: &FileTensor, tol: f32) {
    let g = got.to_vec().unwrap();
    assert_eq!(g.len(), want.data.len(), "{what}");
    for (i, (a, b)) in g.iter().zip(&want.data).enumerate() {
        assert!(
            (a - b).abs() <= tol * (1.0 + b.abs()),
            "{what}[{i}]: {a} vs {b}"
        );
    }
}

/// Loads the fixture, checks eval-mode embeddings, then train-mode embeddings (batch
/// statistics) and the first BN's running statistics after that step.
pub fn check_fixture(
    name: &str,
    backbone: Backbone,
    first_bn: Option<&str>,
    device: &Device,
    test: &str,
) {
    let dir = scratch(test);
    let mut model = EmbeddingNet::new(backbone, D, device, &mut Rng::new(5)).unwrap();
    let path = full_weights_file(name, &model, &dir);
    let report = model.load_weights(&path, LoadMode::Strict).unwrap();
    assert!(report.fresh.is_empty(), "{:?}", report.fresh);
    let io = read_safetensors(&fixture(&format!("{name}.io.safetensors"))).unwrap();
    let input = &io["input"];
    let x = Tensor::from_vec(input.data.clone(), &input.shape, device).unwrap();
    let eval = robust_dml::engine::no_grad(|| model.forward(&x, ForwardMode::Eval)).unwrap();
    assert_embeddings_match(
        &format!("{name} eval on {}", device.name()),
        &eval,
        &io["expected_eval"],
    );
    let frozen = model.forward(&x, ForwardMode::FrozenBn).unwrap();
    assert_embeddings_match(
        &format!("{name} frozen-BN on {}", device.name()),
        &frozen,
        &io["expected_eval"],
    );
    let train = robust_dml::engine::no_grad(|| model.forward(&x, ForwardMode::Train)).unwrap();
    assert_embeddings_match(
        &format!("{name} train on {}", device.name()),
        &train,
        &io["expected_train"],
    );
    if let Some(bn) = first_bn {
        for stat in ["running_mean", "running_var"] {
            let key = format!("{bn}.{stat}");
            let got = model.params().by_name(&key).unwrap();
            assert_values_close(
                &format!("{name} {key} after one train step"),
                got,
                &io[&format!("after_train/{key}")],
                1e-4,
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

// ------------------------------------------------------------------ the attack tests' model

/// A tiny embedding net: conv 3x3 -> relu -> spatial mean -> linear -> L2 normalise.
pub struct Tiny {
    w: Tensor,
    fc: Tensor,
}

impl Tiny {
    /// 8 channels, a 6-d embedding.
    pub fn new(seed: u64, d: &Device) -> Tiny {
        Tiny::with_widths(seed, 8, 6, d)
    }
    pub fn with_widths(seed: u64, channels: usize, dim: usize, d: &Device) -> Tiny {
        let mut r = Rng::new(seed);
        Tiny {
            w: Tensor::randn(&[channels, 3, 3, 3], 0.5, &mut r, d).unwrap(),
            fc: Tensor::randn(&[dim, channels], 0.5, &mut r, d).unwrap(),
        }
    }
    pub fn embed(&self, x: &Tensor) -> Result<Tensor> {
        let p = Conv2dParams {
            padding: (1, 1),
            ..Default::default()
        };
        let h = relu(&conv2d(x, &self.w, None, p)?)?;
        let (n, c, hh, ww) = h.dims4("tiny")?;
        let pooled = mean_dim(&h.reshape(&[n, c, hh * ww])?, 2)?;
        l2_normalize(&linear(&pooled, &self.fc, None)?, 1, 1e-12)
    }
}

/// Asserts that two checkpoints hold the same tensor names and the same values in each
/// (`context` names the comparison in a failure).
pub fn assert_same_tensors(
    got: &robust_dml::nn::checkpoint::Checkpoint,
    want: &robust_dml::nn::checkpoint::Checkpoint,
    context: &str,
) {
    assert_eq!(
        got.tensors.keys().collect::<Vec<_>>(),
        want.tensors.keys().collect::<Vec<_>>(),
        "{context}: tensor names"
    );
    for (name, t) in &want.tensors {
        assert_eq!(t.data, got.tensors[name].data, "{context}: {name} differs");
    }
}
