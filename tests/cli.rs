//! The `robust-dml` binary as a user runs it: `embed` against the PyTorch fixtures, and clear
//! non-zero exits for bad input files.

use std::process::Command;

use robust_dml::engine::Device;
use robust_dml::nn::Checkpoint;

const BIN: &str = env!("CARGO_BIN_EXE_robust-dml");

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn tmp(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("robust-dml-cli-{}-{name}", std::process::id()))
}

#[test]
fn embed_matches_torchvision_on_a_non_square_input() {
    let out = tmp("emb.safetensors");
    let status = Command::new(BIN)
        .env("ROBUST_DML_DEVICE", "cpu")
        .args([
            "embed",
            "--arch",
            "mobilenet-v2",
            "--width-mult",
            "0.5",
            "--embedding-dim",
            "64",
        ])
        .args([
            "--weights",
            &fixture("mobilenet_v2_w050.weights.safetensors"),
        ])
        .args(["--input", &fixture("mobilenet_v2_w050.io.safetensors")])
        .arg("--output")
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    let got = Checkpoint::load(&out)
        .unwrap()
        .tensor("embedding", &Device::Cpu)
        .unwrap()
        .to_vec()
        .unwrap();
    let want = Checkpoint::load(fixture("mobilenet_v2_w050.io.safetensors"))
        .unwrap()
        .tensor("expected_eval", &Device::Cpu)
        .unwrap()
        .to_vec()
        .unwrap();
    for (g, w) in got.chunks(64).zip(want.chunks(64)) {
        let dot: f32 = g.iter().zip(w).map(|(a, b)| a * b).sum();
        let (ng, nw) = (
            g.iter().map(|a| a * a).sum::<f32>().sqrt(),
            w.iter().map(|a| a * a).sum::<f32>().sqrt(),
        );
        assert!(dot / (ng * nw) > 0.9999, "cosine {}", dot / (ng * nw));
        assert!(g.iter().zip(w).all(|(a, b)| (a - b).abs() < 1e-3));
    }
}

#[test]
fn bad_weight_files_fail_with_a_message() {
    let truncated = tmp("truncated.safetensors");
    let bytes = std::fs::read(fixture("mobilenet_v2_w050.weights.safetensors")).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    for (weights, expect) in [
        (truncated.display().to_string(), "truncated"),
        ("/nonexistent/w.safetensors".to_string(), "w.safetensors"),
    ] {
        let out = Command::new(BIN)
            .env("ROBUST_DML_DEVICE", "cpu")
            .args([
                "embed",
                "--arch",
                "mobilenet-v2",
                "--width-mult",
                "0.5",
                "--embedding-dim",
                "64",
                "--weights",
                &weights,
            ])
            .args([
                "--input",
                &fixture("mobilenet_v2_w050.io.safetensors"),
                "--output",
                "/tmp/never.safetensors",
            ])
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("error:") && err.contains(expect), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn wrong_shapes_name_the_key() {
    // MobileNetV2 width 1.0 against width-0.5 weights: a shape mismatch naming the key.
    let out = Command::new(BIN)
        .env("ROBUST_DML_DEVICE", "cpu")
        .args([
            "embed",
            "--arch",
            "mobilenet-v2",
            "--width-mult",
            "1.0",
            "--embedding-dim",
            "64",
        ])
        .args([
            "--weights",
            &fixture("mobilenet_v2_w050.weights.safetensors"),
        ])
        .args([
            "--input",
            &fixture("mobilenet_v2_w050.io.safetensors"),
            "--output",
            "/tmp/never.safetensors",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("features.") && err.contains("shape"), "{err}");
}
