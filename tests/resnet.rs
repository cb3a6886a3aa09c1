//! ResNet-18 and ResNet-50 against torchvision: golden fixtures from
//! tests/fixtures/make_resnet_fixtures.py (full depth, random weights, a 37x45 input) on the CPU
//! and the GPU, in eval, frozen-BN and train mode; F16 / BF16 weight files; the input gradient
//! of the embedding-shift loss; key names; `robust-dml embed --arch resnet18|resnet50`.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use clap::Parser;
use common::{
    assert_embeddings_match, check_fixture, cosine, fixture, full_weights, read_float_tensors,
    scratch, D,
};
use robust_dml::cli::{self, Cli};
use robust_dml::engine::ops::elementwise::{square, sub};
use robust_dml::engine::ops::reduce::sum;
use robust_dml::engine::testing::gpu_or_skip;
use robust_dml::engine::{no_grad, Device, Rng, Tensor};
use robust_dml::nn::weights::{read_safetensors, write_safetensors, FileTensor};
use robust_dml::nn::{Backbone, Checkpoint, EmbeddingNet, ForwardMode, LoadMode};
use robust_dml::pipeline::train::Arch;
use safetensors::Dtype;

fn io(name: &str) -> BTreeMap<String, FileTensor> {
    read_safetensors(&fixture(&format!("{name}.io.safetensors"))).unwrap()
}

fn tensor(t: &FileTensor, device: &Device) -> Tensor {
    Tensor::from_vec(t.data.clone(), &t.shape, device).unwrap()
}

// ------------------------------------------------------------------ embeddings, both devices

#[test]
fn resnet18_matches_torchvision_cpu() {
    check_fixture(
        "resnet18",
        Backbone::ResNet18,
        Some("bn1"),
        &Device::Cpu,
        "r18-cpu",
    );
}

#[test]
fn resnet50_matches_torchvision_cpu() {
    check_fixture(
        "resnet50",
        Backbone::ResNet50,
        Some("bn1"),
        &Device::Cpu,
        "r50-cpu",
    );
}

#[test]
fn resnet18_matches_torchvision_gpu() {
    let Some(gpu) = gpu_or_skip("resnet18_matches_torchvision_gpu") else {
        return;
    };
    check_fixture("resnet18", Backbone::ResNet18, Some("bn1"), &gpu, "r18-gpu");
}

#[test]
fn resnet50_matches_torchvision_gpu() {
    let Some(gpu) = gpu_or_skip("resnet50_matches_torchvision_gpu") else {
        return;
    };
    check_fixture("resnet50", Backbone::ResNet50, Some("bn1"), &gpu, "r50-gpu");
}

// ------------------------------------------------------------------ input gradient (attacks)

/// d/d adv of the embedding-shift loss sum((f(adv) - f(x))^2), f(x) constant, in eval mode on a
/// frozen network: what every PGD step of the attacks computes.
fn check_shift_gradient(device: &Device, test: &str) {
    let dir = scratch(test);
    let mut model =
        EmbeddingNet::new(Backbone::ResNet18, D, &Device::Cpu, &mut Rng::new(5)).unwrap();
    let path = dir.join("w.safetensors");
    write_safetensors(&path, &full_weights("resnet18", &model), Dtype::F32).unwrap();
    model.load_weights(&path, LoadMode::Strict).unwrap();
    let net = model.frozen_view(device).unwrap();
    let io = io("resnet18");
    let (x, adv) = (
        tensor(&io["input"], device),
        tensor(&io["adv_input"], device),
    );
    let clean = no_grad(|| net.forward(&x, ForwardMode::Eval)).unwrap();
    let adv = adv.var();
    let shift = sum(
        &square(&sub(&net.forward(&adv, ForwardMode::Eval).unwrap(), &clean).unwrap()).unwrap(),
    )
    .unwrap();
    let grads = shift.backward().unwrap();
    let got = grads
        .get(&adv)
        .expect("an input gradient")
        .to_vec()
        .unwrap();
    let want = &io["expected_shift_grad"].data;
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let max_diff = got
        .iter()
        .zip(want)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    let cos = cosine(&got, want);
    assert!(
        cos > 0.999 && max_diff < 1e-2 * scale,
        "shift gradient on {}: cosine {cos}, max |diff| {max_diff} (max |grad| {scale})",
        device.name()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn resnet18_shift_gradient_matches_torchvision_cpu() {
    check_shift_gradient(&Device::Cpu, "r18-grad-cpu");
}

#[test]
fn resnet18_shift_gradient_matches_torchvision_gpu() {
    let Some(gpu) = gpu_or_skip("resnet18_shift_gradient_matches_torchvision_gpu") else {
        return;
    };
    check_shift_gradient(&gpu, "r18-grad-gpu");
}

// ------------------------------------------------------------------ half-precision weight files

/// A whole-model file in `dtype` loads (the ImageNet classifier ignored with a note) and gives
/// torchvision's embeddings for the same rounded weights.
fn check_half_precision(name: &str, backbone: Backbone) {
    let dir = scratch(&format!("{name}-half"));
    for (dtype, label) in [(Dtype::F16, "f16"), (Dtype::BF16, "bf16")] {
        let mut model =
            EmbeddingNet::new(backbone.clone(), D, &Device::Cpu, &mut Rng::new(5)).unwrap();
        let path = dir.join(format!("{label}.safetensors"));
        write_safetensors(&path, &full_weights(name, &model), dtype).unwrap();
        let report = model.load_weights(&path, LoadMode::Strict).unwrap();
        let summary = report.summary();
        assert!(
            report.dtypes.contains(&format!("{dtype:?}")) && report.fresh.is_empty(),
            "{summary}"
        );
        assert!(
            summary.contains("ImageNet classifier") && summary.contains("fc.bias"),
            "the ignored classifier is noted: {summary}"
        );
        let io = io(name);
        let x = tensor(&io["input"], &Device::Cpu);
        let e = no_grad(|| model.forward(&x, ForwardMode::Eval)).unwrap();
        assert_embeddings_match(
            &format!("{name} with {label} weights"),
            &e,
            &io[&format!("expected_eval_{label}")],
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn resnet18_half_precision_weights_match_torchvision() {
    check_half_precision("resnet18", Backbone::ResNet18);
}

#[test]
fn resnet50_half_precision_weights_match_torchvision() {
    check_half_precision("resnet50", Backbone::ResNet50);
}

// ------------------------------------------------------------------ layout and key names

/// The model's keys are exactly torchvision's state dict (less `fc.*`) plus `embedding.*`,
/// and its parameter count is torchvision's less the classifier.
#[test]
fn key_names_and_sizes_are_torchvisions() {
    // torchvision's resnet18 / resnet50 hold 11,689,512 / 25,557,032 parameters, of which the
    // fc layer has 513,000 / 2,049,000.
    for (name, backbone, backbone_params, features) in [
        ("resnet18", Backbone::ResNet18, 11_689_512 - 513_000, 512),
        ("resnet50", Backbone::ResNet50, 25_557_032 - 2_049_000, 2048),
    ] {
        let model = EmbeddingNet::new(backbone, D, &Device::Cpu, &mut Rng::new(0)).unwrap();
        assert_eq!(model.feature_dim, features);
        let (stored, meta) = read_float_tensors(&fixture(&format!("{name}.weights.safetensors")));
        let mut file_keys: Vec<&str> = stored
            .keys()
            .map(String::as_str)
            .filter(|k| !k.starts_with("fc."))
            .chain(meta["synthetic_keys"].split(','))
            .collect();
        file_keys.sort_unstable();
        let mut names = model.params().names();
        names.sort_unstable();
        assert_eq!(names, file_keys, "{name}");
        let trainable: usize = model
            .parameters()
            .iter()
            .filter(|(n, _)| !EmbeddingNet::is_head_param(n))
            .map(|(_, t)| t.numel())
            .sum();
        assert_eq!(trainable, backbone_params, "{name}");
    }
    let r50 = EmbeddingNet::new(Backbone::ResNet50, D, &Device::Cpu, &mut Rng::new(0)).unwrap();
    for key in [
        "conv1.weight",
        "bn1.running_mean",
        "layer1.0.downsample.0.weight",
        "layer2.0.downsample.1.running_var",
        "layer4.2.conv3.weight",
        "layer4.2.bn3.bias",
    ] {
        assert!(r50.params().by_name(key).is_some(), "{key}");
    }
}

/// Frozen-BN training (the default): gradients reach every trainable parameter and the input,
/// and the running statistics do not move.
#[test]
fn frozen_bn_training_reaches_every_parameter() {
    let model = EmbeddingNet::new(Backbone::ResNet18, 8, &Device::Cpu, &mut Rng::new(6)).unwrap();
    let stats_before: Vec<Vec<f32>> = model
        .params()
        .buffers()
        .iter()
        .map(|(_, t)| t.to_vec().unwrap())
        .collect();
    let x = Tensor::rand_uniform(&[2, 3, 35, 33], 0.0, 1.0, &mut Rng::new(7), &Device::Cpu)
        .unwrap()
        .var();
    let e = model.forward(&x, ForwardMode::FrozenBn).unwrap();
    let w = Tensor::randn(e.shape(), 1.0, &mut Rng::new(8), &Device::Cpu).unwrap();
    let grads = robust_dml::engine::tape::backward_with(e, w).unwrap();
    for (name, p) in model.parameters() {
        let g = grads
            .get(&p)
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        assert!(g.to_vec().unwrap().iter().all(|v| v.is_finite()), "{name}");
    }
    assert!(grads.get(&x).is_some(), "input gradient");
    let stats_after: Vec<Vec<f32>> = model
        .params()
        .buffers()
        .iter()
        .map(|(_, t)| t.to_vec().unwrap())
        .collect();
    assert_eq!(stats_before, stats_after, "frozen BN moved its statistics");
}

// ------------------------------------------------------------------ the command line

#[test]
fn every_arch_option_accepts_the_resnets() {
    for (arg, arch) in [("resnet18", Arch::Resnet18), ("resnet50", Arch::Resnet50)] {
        let train = Cli::try_parse_from(["robust-dml", "train", "--arch", arg]).unwrap();
        let cli::Command::Train(t) = train.command else {
            panic!("train parsed as something else")
        };
        assert_eq!(t.arch, arch);
        assert_eq!(t.config().image_size, 224);
        let expected = match arch {
            Arch::Resnet18 => Backbone::ResNet18,
            _ => Backbone::ResNet50,
        };
        assert_eq!(t.config().backbone(), expected);
        let exp = Cli::try_parse_from(["robust-dml", "experiment", "--arch", arg]).unwrap();
        let cli::Command::Experiment(x) = exp.command else {
            panic!("experiment parsed as something else")
        };
        assert_eq!(x.arch, Some(arch));
        let embed = [
            "embed",
            "--arch",
            arg,
            "--weights",
            "w",
            "--input",
            "i",
            "--output",
            "o",
        ];
        let cli = Cli::try_parse_from(std::iter::once("robust-dml").chain(embed)).unwrap();
        assert!(matches!(cli.command, cli::Command::Embed(e) if e.arch == arch));
    }
}

/// `robust-dml embed` as a user runs it, with F16 and BF16 files of a whole model, against
/// torchvision's embeddings for the same rounded weights.
#[test]
fn embed_command_matches_torchvision_with_half_weights() {
    let dir = scratch("embed-cli");
    for (name, arch, backbone) in [
        ("resnet18", "resnet18", Backbone::ResNet18),
        ("resnet50", "resnet50", Backbone::ResNet50),
    ] {
        let model = EmbeddingNet::new(backbone, D, &Device::Cpu, &mut Rng::new(0)).unwrap();
        let weights = full_weights(name, &model);
        for (dtype, label) in [(Dtype::F16, "f16"), (Dtype::BF16, "bf16")] {
            let path = dir.join(format!("{name}-{label}.safetensors"));
            write_safetensors(&path, &weights, dtype).unwrap();
            let out = dir.join(format!("{name}-{label}-emb.safetensors"));
            run_embed(
                arch,
                &path,
                &fixture(&format!("{name}.io.safetensors")),
                &out,
            );
            let got = Checkpoint::load(&out)
                .unwrap()
                .tensor("embedding", &Device::Cpu)
                .unwrap();
            assert_embeddings_match(
                &format!("embed --arch {arch} with {label} weights"),
                &got,
                &io(name)[&format!("expected_eval_{label}")],
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn run_embed(arch: &str, weights: &Path, input: &Path, output: &Path) {
    let out = Command::new(env!("CARGO_BIN_EXE_robust-dml"))
        .env("ROBUST_DML_DEVICE", "cpu")
        .args(["embed", "--arch", arch, "--embedding-dim", &D.to_string()])
        .arg("--weights")
        .arg(weights)
        .arg("--input")
        .arg(input)
        .arg("--output")
        .arg(output)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "embed --arch {arch} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
