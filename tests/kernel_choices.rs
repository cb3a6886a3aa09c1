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
