//! Kernels that CPU adapters skip. On llvmpipe, batch norm's affine pass runs one invocation per
//! plane and the depthwise weight gradient one invocation per tap, whatever the size, while
//! discrete GPUs use wide workgroups for large planes. This binary makes the choices act as on a
//! discrete GPU, so that CI (llvmpipe only) checks those kernels against the CPU too.

use robust_dml::engine::gpu::force_discrete_kernel_choice;
use robust_dml::engine::ops::batchnorm::{batch_norm_eval, batch_norm_train};
use robust_dml::engine::ops::conv::{conv2d, Conv2dParams};
use robust_dml::engine::testing::{assert_parity, gpu_or_skip, randn, uniform};
use robust_dml::engine::{Device, Tensor};

/// One test, so that nothing else runs while the choice is forced.
#[test]
fn discrete_gpu_kernels_match_cpu() {
    let Some(gpu) = gpu_or_skip("discrete_gpu_kernels_match_cpu") else {
        return;
    };
    force_discrete_kernel_choice(true);
    batch_norm_cases(&gpu);
    depthwise_cases(&gpu);
    force_discrete_kernel_choice(false);
}

fn batch_norm_cases(gpu: &Device) {
    // Planes of 65-255 pixels (several per workgroup) and over 256 (one per pass), with
    // reductions over 2,048 values a channel (one workgroup per channel) and under.
    for shape in [[30, 3, 9, 10], [3, 2, 17, 19], [2, 3, 9, 10]] {
        let c = shape[1];
        let x = randn(&shape, 1);
        let inputs = [x, uniform(&[c], 0.5, 1.5, 2), randn(&[c], 3)];
        let running = |d: &Device| -> (Tensor, Tensor) {
            (
                randn(&[c], 4).to_device(d).unwrap(),
                uniform(&[c], 0.5, 2.0, 5).to_device(d).unwrap(),
            )
        };
        let (cpu, dev) = (running(&Device::Cpu), running(gpu));
        let pick = |t: &[Tensor]| {
            if t[0].is_gpu() {
                dev.clone()
            } else {
                cpu.clone()
            }
        };
        assert_parity(
            &format!("batch_norm_train {shape:?}"),
            gpu,
            |t| {
                let (rm, rv) = pick(t);
                batch_norm_train(&t[0], &t[1], &t[2], &rm, &rv, 0.1, 1e-5)
            },
            &inputs,
            1e-3,
            1e-3,
        );
        assert_parity(
            &format!("batch_norm_eval {shape:?}"),
            gpu,
            |t| {
                let (rm, rv) = pick(t);
                batch_norm_eval(&t[0], &t[1], &t[2], &rm, &rv, 1e-5)
            },
            &inputs,
            1e-3,
            1e-3,
        );
    }
}

fn depthwise_cases(gpu: &Device) {
    // Output planes over 256 pixels take the workgroup weight gradient on discrete GPUs.
    for (shape, stride) in [([2, 3, 18, 17], 1), ([3, 4, 35, 33], 2)] {
        let c = shape[1];
        let p = Conv2dParams {
            stride: (stride, stride),
            padding: (1, 1),
            groups: c,
            ..Default::default()
        };
        assert_parity(
            &format!("depthwise {shape:?} stride {stride}"),
            gpu,
            |t| conv2d(&t[0], &t[1], Some(&t[2]), p),
            &[randn(&shape, 6), randn(&[c, 1, 3, 3], 7), randn(&[c], 8)],
            1e-3,
            1e-3,
        );
    }
}

/// Every place where a kernel choice depends on the adapter type, and the test that forces the
/// choice a discrete GPU makes and checks it against the CPU on llvmpipe. A new adapter-dependent
/// choice fails here until it is forced somewhere and listed.
const ADAPTER_CHOICES: &[(&str, usize, &str)] = &[
    // batch norm's affine pass and the depthwise weight gradient: this file
    (
        "src/engine/ops/batchnorm.rs",
        1,
        "kernel_choices::discrete_gpu_kernels_match_cpu",
    ),
    // the depthwise weight gradient (forced here) and, on CPU adapters, the im2col route for
    // reductions over 2,048 (C x taps). A discrete GPU takes the implicit-GEMM route there; that
    // route is forced by ops_conv_routes at shorter reductions only, because llvmpipe's loop
    // limit makes the implicit kernels wrong beyond about 3,000 (benches/gpu-check.sh runs the
    // long ones on a real GPU). The CPU-adapter side: resnet::deep_convolutions_gpu_match_cpu.
    (
        "src/engine/ops/conv.rs",
        2,
        "kernel_choices::discrete_gpu_kernels_match_cpu, resnet::deep_convolutions_gpu_match_cpu",
    ),
    // not a kernel choice: with ROBUST_DML_DEVICE unset, a software adapter means the CPU
    // backend; every GPU test opens the adapter explicitly (Device::gpu)
    (
        "src/engine/device.rs",
        1,
        "hostile_inputs (the binary on the default device)",
    ),
    // GemmKernel::for_adapter: every kernel is run by gemm_raw_using
    (
        "src/engine/ops/matmul.rs",
        1,
        "ops_matmul::every_gemm_kernel_matches_cpu_on_edge_shapes",
    ),
    // the device top-k: FORCE_DEVICE_TOPK
    (
        "src/dml/eval.rs",
        1,
        "eval_device::gpu_neighbours_match_cpu",
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
fn every_adapter_dependent_kernel_choice_is_covered() {
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
        if rel == "src/engine/gpu.rs" {
            continue; // where is_cpu_adapter and the forcing switch are defined
        }
        let text = std::fs::read_to_string(&path).expect("read a source file");
        let sites = text
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .filter(|l| l.contains("is_cpu_adapter()") || l.contains("device_type"))
            .count();
        if sites > 0 {
            found.push((rel, sites));
        }
    }
    found.sort();
    let mut listed: Vec<(String, usize)> = ADAPTER_CHOICES
        .iter()
        .map(|(f, n, _)| (f.to_string(), *n))
        .collect();
    listed.sort();
    assert_eq!(
        found, listed,
        "kernel choices that depend on the adapter type changed: force the discrete-GPU choice in a \
         test that compares it with the CPU, then update ADAPTER_CHOICES in tests/kernel_choices.rs"
    );
}
