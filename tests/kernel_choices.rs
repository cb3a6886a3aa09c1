//! Every kernel choice is made by the context's `KernelPolicy`, and each place in the source
//! that reads the policy is listed here with the test that runs every variant it chooses
//! between on both devices (a context with another policy, `Device::with_policy`). A new choice
//! fails here until it has such a test.

/// Every place where a kernel choice reads the policy (or the adapter type), and the tests that
/// run each variant against the CPU. A new choice fails here until it is covered and listed.
const POLICY_CHOICES: &[(&str, usize, &str)] = &[
    // batch norm's affine pass
    (
        "src/engine/ops/batchnorm.rs",
        1,
        "ops_norm_pool::batch_norm_kernels_of_both_targets_match_cpu",
    ),
    // the route of ungrouped convolutions. On CPU adapters the im2col route also takes
    // reductions over 2,048 (C x taps); a GPU takes the implicit-GEMM route there, which is
    // forced at shorter reductions only, because llvmpipe's loop limit makes the implicit
    // kernels wrong beyond about 3,000 (benches/gpu-check.sh runs the long ones on a real GPU).
    (
        "src/engine/ops/conv/im2col.rs",
        1,
        "ops_conv::{both_conv_routes_match_cpu, deep_convolutions_gpu_match_cpu}",
    ),
    // the depthwise weight gradient
    (
        "src/engine/ops/conv/implicit_gemm.rs",
        1,
        "ops_conv::depthwise_kernels_of_both_targets_match_cpu",
    ),
    // the GEMM kernel: every kernel is run by gemm_raw_using
    (
        "src/engine/ops/matmul.rs",
        2,
        "ops_matmul::every_gemm_kernel_matches_cpu_on_edge_shapes",
    ),
    // the device top-k
    (
        "src/engine/ops/topk.rs",
        1,
        "eval_device::gpu_neighbours_match_cpu",
    ),
    // not kernel choices: Device::policy, and, with ROBUST_DML_DEVICE unset, a software adapter
    // means the CPU backend (every GPU test opens the adapter explicitly, Device::gpu)
    (
        "src/engine/device.rs",
        2,
        "hostile_inputs (the binary on the default device)",
    ),
];

fn rust_files(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src/") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn every_kernel_choice_is_covered() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    let mut found = Vec::new();
    for path in files {
        let rel = path
            .strip_prefix(root)
            .unwrap()
            .to_string_lossy()
            .replace('\\', "/");
        if rel == "src/engine/gpu/mod.rs" || rel == "src/engine/policy.rs" {
            continue; // where the policy is defined and held
        }
        let text = std::fs::read_to_string(&path).expect("read a source file");
        let sites = text
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .filter(|l| l.contains("policy()") || l.contains("device_type"))
            .count();
        if sites > 0 {
            found.push((rel, sites));
        }
    }
    found.sort();
    let mut listed: Vec<(String, usize)> = POLICY_CHOICES
        .iter()
        .map(|(f, n, _)| (f.to_string(), *n))
        .collect();
    listed.sort();
    assert_eq!(
        found, listed,
        "kernel choices that read the policy changed: run every variant against the CPU in the op \
         family's test file (Device::with_policy), then update POLICY_CHOICES in tests/kernel_choices.rs"
    );
}
