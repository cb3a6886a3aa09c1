//! The `robust-dml` binary as a user runs it: `embed` against the PyTorch fixtures, and clear
//! non-zero exits for bad input files.

use std::process::Command;

use robust_dml::engine::Device;
use robust_dml::nn::Checkpoint;

const BIN: &str = env!("CARGO_BIN_EXE_robust-dml");

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// `robust-dml embed` for MobileNetV2 at `width` with the fixture's input.
fn embed(width: &str, weights: &str, output: &std::path::Path) -> Command {
    let mut c = Command::new(BIN);
    c.env("ROBUST_DML_DEVICE", "cpu")
        .args([
            "embed",
            "--arch",
            "mobilenet-v2",
            "--width-mult",
            width,
            "--embedding-dim",
            "64",
            "--weights",
            weights,
        ])
        .args(["--input", &fixture("mobilenet_v2_w050.io.safetensors")])
        .arg("--output")
        .arg(output);
    c
}

/// A scratch file path, removed when it goes out of scope (pass or fail).
struct TmpFile(std::path::PathBuf);

impl std::ops::Deref for TmpFile {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TmpFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn tmp(name: &str) -> TmpFile {
    TmpFile(std::env::temp_dir().join(format!("robust-dml-cli-{}-{name}", std::process::id())))
}

#[test]
fn embed_matches_torchvision_on_a_non_square_input() {
    let out = tmp("emb.safetensors");
    let weights = fixture("mobilenet_v2_w050.weights.safetensors");
    assert!(embed("0.5", &weights, &out).status().unwrap().success());
    let got = Checkpoint::load(&*out)
        .unwrap()
        .tensor("embedding", &Device::Cpu)
        .unwrap()
        .to_vec()
        .unwrap();
    let io = Checkpoint::load(fixture("mobilenet_v2_w050.io.safetensors")).unwrap();
    let want = io
        .tensor("expected_eval", &Device::Cpu)
        .unwrap()
        .to_vec()
        .unwrap();
    for (g, w) in got.chunks(64).zip(want.chunks(64)) {
        let dot: f32 = g.iter().zip(w).map(|(a, b)| a * b).sum();
        let norm = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>().sqrt();
        let cos = dot / (norm(g) * norm(w));
        assert!(cos > 0.9999, "cosine {cos}");
        assert!(g.iter().zip(w).all(|(a, b)| (a - b).abs() < 1e-3));
    }
}

/// The input goes to the device a batch at a time; eval mode makes the batch size irrelevant.
#[test]
fn embed_batches_do_not_change_the_embeddings() {
    let weights = fixture("mobilenet_v2_w050.weights.safetensors");
    let read = |path: &std::path::Path| {
        Checkpoint::load(path)
            .unwrap()
            .tensor("embedding", &Device::Cpu)
            .unwrap()
            .to_vec()
            .unwrap()
    };
    let whole = tmp("emb-whole.safetensors");
    assert!(embed("0.5", &weights, &whole).status().unwrap().success());
    let batched = tmp("emb-batched.safetensors");
    let mut c = embed("0.5", &weights, &batched);
    assert!(c.args(["--batch-size", "1"]).status().unwrap().success());
    let (a, b) = (read(&whole), read(&batched));
    assert!(a.len() > 64, "the fixture has more than one image");
    assert_eq!(a, b);
}

/// Runs a command that must fail; returns its stderr after checking it is a message, not a panic.
fn failure(mut c: Command) -> String {
    let out = c.output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(err.contains("error:") && !err.contains("panicked"), "{err}");
    err
}

#[test]
fn bad_weight_files_fail_with_a_message() {
    let truncated = tmp("truncated.safetensors");
    let bytes = std::fs::read(fixture("mobilenet_v2_w050.weights.safetensors")).unwrap();
    std::fs::write(&*truncated, &bytes[..bytes.len() / 2]).unwrap();
    let never = tmp("never.safetensors");
    let err = failure(embed("0.5", &truncated.display().to_string(), &never));
    assert!(err.contains("truncated"), "{err}");
    let err = failure(embed("0.5", "/nonexistent/w.safetensors", &never));
    assert!(err.contains("w.safetensors"), "{err}");
}

#[test]
fn wrong_shapes_name_the_key() {
    // MobileNetV2 width 1.0 against width-0.5 weights: a shape mismatch naming the key.
    let err = failure(embed(
        "1.0",
        &fixture("mobilenet_v2_w050.weights.safetensors"),
        &tmp("never.safetensors"),
    ));
    assert!(err.contains("features.") && err.contains("shape"), "{err}");
}
