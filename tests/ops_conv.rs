//! Convolution family: GPU against CPU (forward and every gradient) for every kernel variant
//! (both routes of ungrouped convolutions, the depthwise kernels of both targets), central-
//! difference gradient checks on the CPU reference, a hand-computed case, shape errors, ResNet-50's
//! deepest layers, the split over the batch of tensors larger than one storage binding, and the
//! fast CPU kernels (every route) against the reference loops.

mod common;

use common::binding_cap::{capped, over_cap, CAP, X, X_GEMM};
use common::cpu_reference::{close, dy, forward_backward, values};
use robust_dml::engine::ops::conv::{conv2d, Conv2dParams, ConvRoute};
use robust_dml::engine::ops::elementwise::relu6;
use robust_dml::engine::policy::KernelTarget;
use robust_dml::engine::reference as r;
use robust_dml::engine::tape::no_grad;
use robust_dml::engine::testing::{
    assert_close, assert_grad, assert_parity, gpu_or_skip, randn, GradCheck,
};
use robust_dml::engine::{Device, Tensor};

/// One test configuration: input shape, output channels, kernel size and hyper-parameters.
struct Case {
    name: &'static str,
    x: [usize; 4],
    cout: usize,
    k: (usize, usize),
    p: Conv2dParams,
    bias: bool,
}

fn params(stride: usize, padding: usize, dilation: usize, groups: usize) -> Conv2dParams {
    Conv2dParams {
        stride: (stride, stride),
        padding: (padding, padding),
        dilation: (dilation, dilation),
        groups,
    }
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "3x3 pad 1",
            x: [2, 3, 7, 5],
            cout: 4,
            k: (3, 3),
            p: params(1, 1, 1, 1),
            bias: true,
        },
        Case {
            name: "3x3 stride 2 odd spatial",
            x: [2, 3, 7, 5],
            cout: 4,
            k: (3, 3),
            p: params(2, 1, 1, 1),
            bias: true,
        },
        Case {
            name: "3x3 dilation 2",
            x: [2, 3, 7, 6],
            cout: 4,
            k: (3, 3),
            p: params(1, 2, 2, 1),
            bias: false,
        },
        Case {
            name: "groups 3",
            x: [2, 6, 5, 5],
            cout: 9,
            k: (3, 3),
            p: params(1, 1, 1, 3),
            bias: true,
        },
        Case {
            name: "depthwise stride 1",
            x: [2, 5, 7, 5],
            cout: 5,
            k: (3, 3),
            p: params(1, 1, 1, 5),
            bias: true,
        },
        Case {
            name: "depthwise stride 2",
            x: [2, 5, 7, 5],
            cout: 5,
            k: (3, 3),
            p: params(2, 1, 1, 5),
            bias: false,
        },
        Case {
            name: "depthwise multiplier 2",
            x: [2, 3, 6, 5],
            cout: 6,
            k: (3, 3),
            p: params(1, 1, 1, 3),
            bias: true,
        },
        Case {
            name: "1x1",
            x: [2, 5, 4, 3],
            cout: 7,
            k: (1, 1),
            p: params(1, 0, 1, 1),
            bias: false,
        },
        Case {
            name: "7x7 stride 2 pad 3",
            x: [2, 3, 9, 8],
            cout: 4,
            k: (7, 7),
            p: params(2, 3, 1, 1),
            bias: true,
        },
        Case {
            name: "rectangular kernel, mixed stride",
            x: [2, 2, 6, 7],
            cout: 3,
            k: (2, 3),
            p: Conv2dParams {
                stride: (1, 2),
                padding: (0, 1),
                dilation: (2, 1),
                groups: 1,
            },
            bias: true,
        },
    ]
}

fn inputs(c: &Case, seed: u64) -> Vec<Tensor> {
    let w_shape = [c.cout, c.x[1] / c.p.groups, c.k.0, c.k.1];
    let mut t = vec![randn(&c.x, seed), randn(&w_shape, seed + 1)];
    if c.bias {
        t.push(randn(&[c.cout], seed + 2));
    }
    t
}

fn run(t: &[Tensor], p: Conv2dParams) -> robust_dml::engine::Result<Tensor> {
    conv2d(&t[0], &t[1], t.get(2), p)
}

#[test]
fn conv_gradients() {
    let opts = GradCheck {
        max_probes: 24,
        ..GradCheck::default()
    };
    for (i, c) in cases().iter().enumerate() {
        let p = c.p;
        assert_grad(c.name, |t| run(t, p), &inputs(c, 10 * i as u64), opts);
    }
}

#[test]
fn conv_gpu_matches_cpu() {
    let Some(gpu) = gpu_or_skip("conv_gpu_matches_cpu") else {
        return;
    };
    for (i, c) in cases().iter().enumerate() {
        let p = c.p;
        assert_parity(
            c.name,
            &gpu,
            |t| run(t, p),
            &inputs(c, 100 + i as u64),
            1e-4,
            1e-4,
        );
    }
}

/// Sizes that straddle the 64-wide GEMM tiles, the 16-deep reduction step, several
/// weight-gradient slices, several depthwise image slices and 8x8 pixel tiles.
#[test]
fn conv_gpu_matches_cpu_tile_edges() {
    let Some(gpu) = gpu_or_skip("conv_gpu_matches_cpu_tile_edges") else {
        return;
    };
    let big = [
        Case {
            name: "65 out channels, 17 x 9 taps",
            x: [3, 17, 9, 10],
            cout: 65,
            k: (3, 3),
            p: params(1, 1, 1, 1),
            bias: true,
        },
        Case {
            name: "depthwise 3 images",
            x: [3, 4, 9, 17],
            cout: 4,
            k: (3, 3),
            p: params(1, 1, 1, 4),
            bias: true,
        },
        Case {
            name: "depthwise plane over 256 pixels (workgroup weight gradient)",
            x: [2, 3, 18, 17],
            cout: 3,
            k: (3, 3),
            p: params(1, 1, 1, 3),
            bias: false,
        },
        Case {
            name: "depthwise dilation 2 stride 2",
            x: [3, 4, 11, 9],
            cout: 4,
            k: (3, 3),
            p: params(2, 2, 2, 4),
            bias: false,
        },
        Case {
            name: "depthwise 5x5 (two tap chunks)",
            x: [2, 3, 9, 10],
            cout: 3,
            k: (5, 5),
            p: params(2, 2, 1, 3),
            bias: false,
        },
    ];
    for (i, c) in big.iter().enumerate() {
        let p = c.p;
        assert_parity(
            c.name,
            &gpu,
            |t| run(t, p),
            &inputs(c, 200 + i as u64),
            2e-4,
            2e-4,
        );
    }
}

/// Ungrouped convolutions on each GPU route (implicit GEMM, and im2col + GEMM), chosen by
/// policy whatever the adapter picks by default.
#[test]
fn both_conv_routes_match_cpu() {
    let Some(gpu) = gpu_or_skip("both_conv_routes_match_cpu") else {
        return;
    };
    let default = gpu.policy().expect("a GPU device has a policy");
    for route in [ConvRoute::ImplicitGemm, ConvRoute::Im2colGemm] {
        let gpu = gpu.with_policy(default.with_conv_route(route));
        for (i, c) in route_cases().iter().enumerate() {
            let p = Conv2dParams {
                stride: c.stride,
                padding: c.padding,
                dilation: c.dilation,
                groups: 1,
            };
            assert_parity(
                &format!("{} via {route:?}", c.name),
                &gpu,
                |t| conv2d(&t[0], &t[1], t.get(2), p),
                &route_inputs(c, 300 + i as u64),
                2e-4,
                2e-4,
            );
        }
    }
}

struct RouteCase {
    name: &'static str,
    x: [usize; 4],
    cout: usize,
    k: (usize, usize),
    stride: (usize, usize),
    padding: (usize, usize),
    dilation: (usize, usize),
    bias: bool,
}

fn route_cases() -> Vec<RouteCase> {
    let case = |name, x, cout, k, stride, padding, dilation, bias| RouteCase {
        name,
        x,
        cout,
        k,
        stride,
        padding,
        dilation,
        bias,
    };
    vec![
        case(
            "5x5 pad 2 (c2f2)",
            [2, 3, 8, 6],
            5,
            (5, 5),
            (1, 1),
            (2, 2),
            (1, 1),
            true,
        ),
        case(
            "3x3 stride 2, odd plane",
            [2, 3, 7, 5],
            4,
            (3, 3),
            (2, 2),
            (1, 1),
            (1, 1),
            true,
        ),
        case(
            "pointwise, 8 channels",
            [2, 8, 4, 5],
            6,
            (1, 1),
            (1, 1),
            (0, 0),
            (1, 1),
            false,
        ),
        case(
            "pointwise, odd plane",
            [3, 4, 3, 3],
            5,
            (1, 1),
            (1, 1),
            (0, 0),
            (1, 1),
            true,
        ),
        case(
            "1x1, 5 channels (padded K)",
            [2, 5, 4, 3],
            7,
            (1, 1),
            (1, 1),
            (0, 0),
            (1, 1),
            false,
        ),
        case(
            "1x1 stride 2",
            [2, 4, 6, 5],
            3,
            (1, 1),
            (2, 2),
            (0, 0),
            (1, 1),
            false,
        ),
        case(
            "dilated rectangular",
            [2, 2, 6, 7],
            3,
            (2, 3),
            (1, 2),
            (0, 1),
            (2, 1),
            true,
        ),
        case(
            "3x3 stride 3",
            [2, 3, 9, 8],
            4,
            (3, 3),
            (3, 3),
            (1, 1),
            (1, 1),
            false,
        ),
        case(
            "17 in, 9 out, 3x3",
            [3, 17, 6, 6],
            9,
            (3, 3),
            (1, 1),
            (1, 1),
            (1, 1),
            true,
        ),
    ]
}

fn route_inputs(c: &RouteCase, seed: u64) -> Vec<Tensor> {
    let mut t = vec![
        randn(&c.x, seed),
        randn(&[c.cout, c.x[1], c.k.0, c.k.1], seed + 1),
    ];
    if c.bias {
        t.push(randn(&[c.cout], seed + 2));
    }
    t
}

/// The depthwise weight gradient of both targets: one invocation per tap (CPU adapters, and
/// small planes everywhere) and one workgroup per channel slice (GPUs, planes over 256 pixels).
#[test]
fn depthwise_kernels_of_both_targets_match_cpu() {
    let Some(gpu) = gpu_or_skip("depthwise_kernels_of_both_targets_match_cpu") else {
        return;
    };
    let default = gpu.policy().expect("a GPU device has a policy");
    for target in [KernelTarget::CpuAdapter, KernelTarget::Gpu] {
        let gpu: Device = gpu.with_policy(default.with_target(target));
        for (shape, stride) in [([2, 3, 18, 17], 1), ([3, 4, 35, 33], 2)] {
            let c = shape[1];
            let p = Conv2dParams {
                stride: (stride, stride),
                padding: (1, 1),
                groups: c,
                ..Default::default()
            };
            assert_parity(
                &format!("depthwise {shape:?} stride {stride} for {target:?}"),
                &gpu,
                |t| conv2d(&t[0], &t[1], Some(&t[2]), p),
                &[randn(&shape, 6), randn(&[c, 1, 3, 3], 7), randn(&[c], 8)],
                1e-3,
                1e-3,
            );
        }
    }
}

/// Only the gradients that are asked for are computed, and they match the full backward.
#[test]
fn conv_input_gradient_only() {
    let c = &cases()[1];
    let t = inputs(c, 7);
    let x = t[0].var();
    let y = conv2d(&x, &t[1], t.get(2), c.p).unwrap();
    let grads = y.backward().unwrap();
    assert!(grads.get(&x).is_some());
    assert_eq!(grads.len(), 1, "frozen weight and bias got gradients");
}

#[test]
fn conv_hand_computed() {
    // x = 1..9 as a 3x3 image, w = [[1, 0], [0, -1]] (2x2), bias 0.5, no padding:
    // y[i][j] = x[i][j] - x[i+1][j+1] + 0.5 = -4 + 0.5 everywhere.
    let x = Tensor::from_cpu((1..=9).map(|v| v as f32).collect(), &[1, 1, 3, 3]).unwrap();
    let w = Tensor::from_cpu(vec![1., 0., 0., -1.], &[1, 1, 2, 2]).unwrap();
    let b = Tensor::from_cpu(vec![0.5], &[1]).unwrap();
    let y = conv2d(&x, &w, Some(&b), Conv2dParams::default()).unwrap();
    assert_eq!(y.shape(), &[1, 1, 2, 2]);
    assert_eq!(y.to_vec().unwrap(), vec![-3.5; 4]);
    // Padding 1, stride 2: outputs at (-1,-1), (-1,1), (1,-1), (1,1) of the padded grid.
    let p = Conv2dParams {
        stride: (2, 2),
        padding: (1, 1),
        ..Default::default()
    };
    let y = conv2d(&x, &w, None, p).unwrap();
    assert_eq!(y.to_vec().unwrap(), vec![-1., -3., -7., 5. - 9.]);
    // dL/dx for L = sum(y) of the unpadded conv: each x gets sum of the weights it met.
    let xv = x.var();
    let y = conv2d(&xv, &w, None, Conv2dParams::default()).unwrap();
    let loss_grads = y.backward().unwrap();
    let dx = loss_grads.get(&xv).unwrap().to_vec().unwrap();
    assert_close(
        "hand dx",
        &dx,
        &[1., 1., 0., 1., 0., -1., 0., -1., -1.],
        0.0,
        0.0,
    );
    if let Some(gpu) = gpu_or_skip("conv_hand_computed") {
        let y = conv2d(
            &x.to_device(&gpu).unwrap(),
            &w.to_device(&gpu).unwrap(),
            None,
            p,
        )
        .unwrap();
        assert_eq!(y.to_vec().unwrap(), vec![-1., -3., -7., -4.]);
    }
}

#[test]
fn conv_shape_errors() {
    let x = randn(&[1, 4, 5, 5], 1);
    no_grad(|| {
        // weight expects 3 input channels, x has 4
        assert!(conv2d(&x, &randn(&[2, 3, 3, 3], 2), None, Conv2dParams::default()).is_err());
        // groups 3 does not divide 4 input channels
        let p = Conv2dParams {
            groups: 3,
            ..Default::default()
        };
        assert!(conv2d(&x, &randn(&[3, 1, 3, 3], 3), None, p).is_err());
        // groups 2 does not divide 3 output channels
        let p = Conv2dParams {
            groups: 2,
            ..Default::default()
        };
        assert!(conv2d(&x, &randn(&[3, 2, 3, 3], 4), None, p).is_err());
        // zero stride, zero groups
        let p = Conv2dParams {
            stride: (0, 1),
            ..Default::default()
        };
        assert!(conv2d(&x, &randn(&[2, 4, 3, 3], 5), None, p).is_err());
        let p = Conv2dParams {
            groups: 0,
            ..Default::default()
        };
        assert!(conv2d(&x, &randn(&[2, 4, 3, 3], 5), None, p).is_err());
        // kernel larger than the padded input; wrong bias length; 3-D input
        assert!(conv2d(&x, &randn(&[2, 4, 7, 7], 6), None, Conv2dParams::default()).is_err());
        assert!(conv2d(
            &x,
            &randn(&[2, 4, 3, 3], 7),
            Some(&randn(&[3], 8)),
            Conv2dParams::default()
        )
        .is_err());
        assert!(conv2d(
            &randn(&[4, 5, 5], 9),
            &randn(&[2, 4, 3, 3], 7),
            None,
            Conv2dParams::default()
        )
        .is_err());
    });
}

// ------------------------------------------------------------------ deep layers on the GPU

/// ResNet-50's deepest convolutions at odd input sizes (output planes of 2x3 pixels, batch 3):
/// 3x3 convs over 512 channels and 1x1 convs over 2048, forward and both gradients, GPU against
/// CPU. On llvmpipe a shader invocation's loops stop after about 65,535 iterations in all, so the
/// implicit-GEMM kernels, looping over C_in x taps, returned wrong values here; and the weight
/// gradient's sum over a batch that is not a multiple of 4 overflowed the grid of a dispatch.
#[test]
fn deep_convolutions_gpu_match_cpu() {
    let Some(gpu) = gpu_or_skip("deep_convolutions_gpu_match_cpu") else {
        return;
    };
    // (C_in, C_out, kernel, stride, padding, input H, W)
    let layers = [
        (512, 512, 3, 2, 1, 4, 6),
        (512, 512, 3, 1, 1, 2, 3),
        (2048, 512, 1, 1, 0, 2, 3),
        (1024, 2048, 1, 2, 0, 4, 6),
    ];
    for (c_in, c_out, k, s, p, h, w) in layers {
        let params = Conv2dParams {
            stride: (s, s),
            padding: (p, p),
            ..Conv2dParams::default()
        };
        let run = |device: &Device| {
            let x = randn(&[3, c_in, h, w], 1).to_device(device).unwrap().var();
            let weight = randn(&[c_out, c_in, k, k], 2)
                .to_device(device)
                .unwrap()
                .var();
            let y = conv2d(&x, &weight, None, params).unwrap();
            let dy = randn(y.shape(), 3).to_device(device).unwrap();
            let values = y.to_vec().unwrap();
            let grads = robust_dml::engine::tape::backward_with(y, dy).unwrap();
            let grad = |t: &Tensor| grads.get(t).unwrap().to_vec().unwrap();
            [values, grad(&x), grad(&weight)]
        };
        let (want, got) = (run(&Device::Cpu), run(&gpu));
        for (i, what) in ["y", "dx", "dw"].iter().enumerate() {
            let case = format!("{what} of {c_in}->{c_out} k{k} s{s} on {h}x{w}");
            assert_close(&case, &got[i], &want[i], 1e-2, 1e-3);
        }
    }
}

// ------------------------------------------------------------------ over the binding cap

#[test]
fn a_sample_over_the_cap_is_a_clear_error() {
    let Some(dev) = capped("a_sample_over_the_cap_is_a_clear_error", 1024) else {
        return;
    };
    // 315 values a sample, but aligned chunks need several samples: over 1 KiB.
    let x = randn(&X, 2).to_device(&dev).unwrap();
    let err = relu6(&x).map(|_| ()).and_then(|_| {
        let w = randn(&[5, 5, 3, 3], 3).to_device(&dev)?;
        conv2d(&x, &w, None, Conv2dParams::default()).map(|_| ())
    });
    let msg = err
        .expect_err("a chunk over the cap must be refused")
        .to_string();
    assert!(msg.contains("conv2d") && msg.contains("binding"), "{msg}");
}

#[test]
fn convolutions_split_over_the_batch() {
    let Some(dev) = capped("convolutions_split_over_the_batch", CAP) else {
        return;
    };
    for shape in [X, X_GEMM] {
        let x = randn(&shape, 4);
        over_cap(&dev, &x.to_device(&dev).unwrap());
        let dense = Conv2dParams {
            padding: (1, 1),
            ..Default::default()
        };
        let depthwise = Conv2dParams {
            stride: (2, 2),
            padding: (1, 1),
            groups: 5,
            ..Default::default()
        };
        let cases = [
            ("3x3 dense + bias", vec![6, 5, 3, 3], dense, true),
            (
                "1x1 pointwise",
                vec![7, 5, 1, 1],
                Conv2dParams::default(),
                false,
            ),
            ("3x3 depthwise stride 2", vec![5, 1, 3, 3], depthwise, true),
        ];
        for (name, w_shape, p, bias) in cases {
            let mut inputs = vec![x.clone(), randn(&w_shape, 5)];
            if bias {
                inputs.push(randn(&[w_shape[0]], 6));
            }
            assert_parity(
                &format!("{name} on {shape:?}"),
                &dev,
                |t| conv2d(&t[0], &t[1], t.get(2), p),
                &inputs,
                1e-3,
                1e-3,
            );
        }
    }
}

// ------------------------------------------------------------------ the fast CPU kernels against the reference loops

fn conv(
    stride: (usize, usize),
    padding: (usize, usize),
    dilation: (usize, usize),
    groups: usize,
) -> Conv2dParams {
    Conv2dParams {
        stride,
        padding,
        dilation,
        groups,
    }
}

/// Odd geometries covering every fast route: im2col with stride, padding and dilation, plain
/// pointwise, padded 1x1, grouped, depthwise (multiplier 1 and 2, strided), one image
/// (multi-threaded GEMMs) and more images than reduction blocks.
fn conv_geometries() -> Vec<([usize; 4], [usize; 4], Conv2dParams)> {
    vec![
        ([3, 5, 11, 9], [7, 5, 3, 3], conv((1, 1), (1, 1), (1, 1), 1)),
        (
            [2, 3, 13, 10],
            [4, 3, 5, 5],
            conv((2, 2), (2, 2), (1, 1), 1),
        ),
        ([2, 4, 9, 7], [6, 2, 3, 2], conv((1, 2), (1, 0), (2, 1), 2)),
        ([3, 6, 7, 5], [5, 6, 1, 1], conv((1, 1), (0, 0), (1, 1), 1)),
        ([1, 2, 3, 3], [3, 2, 1, 1], conv((1, 1), (2, 2), (1, 1), 1)),
        ([2, 5, 9, 11], [5, 1, 3, 3], conv((1, 1), (1, 1), (1, 1), 5)),
        ([2, 3, 10, 9], [6, 1, 3, 3], conv((2, 2), (1, 1), (1, 1), 3)),
        ([1, 4, 7, 6], [4, 1, 5, 5], conv((1, 1), (1, 3), (1, 2), 4)),
        (
            [1, 7, 33, 31],
            [9, 7, 3, 3],
            conv((1, 1), (1, 1), (1, 1), 1),
        ),
        ([19, 3, 5, 5], [4, 3, 3, 3], conv((1, 1), (1, 1), (1, 1), 1)),
        // MobileNetV2's small planes: stride-2 depthwise down to 1x1, pointwise on 2x2.
        ([8, 6, 4, 4], [6, 1, 3, 3], conv((1, 1), (1, 1), (1, 1), 6)),
        ([8, 6, 4, 4], [6, 1, 3, 3], conv((2, 2), (1, 1), (1, 1), 6)),
        ([8, 6, 2, 2], [6, 1, 3, 3], conv((2, 2), (1, 1), (1, 1), 6)),
        ([8, 6, 2, 2], [10, 6, 1, 1], conv((1, 1), (0, 0), (1, 1), 1)),
        (
            [8, 3, 16, 16],
            [8, 3, 3, 3],
            conv((2, 2), (1, 1), (1, 1), 1),
        ),
        // Depthwise 3x3 through the fused interior paths: multiplier 2 without padding, dilation
        // 2 with uneven padding, unequal strides.
        ([2, 3, 8, 7], [6, 1, 3, 3], conv((1, 1), (0, 0), (1, 1), 3)),
        ([1, 2, 9, 10], [2, 1, 3, 3], conv((1, 1), (2, 1), (2, 2), 2)),
        ([2, 3, 7, 9], [3, 1, 3, 3], conv((1, 2), (1, 1), (1, 1), 3)),
        // Per image with several images: grouped, and plain pointwise, on planes of 64+ pixels.
        ([3, 4, 9, 8], [6, 2, 3, 3], conv((1, 1), (1, 1), (1, 1), 2)),
        // Stride 1 through the padded image: c2f2's 5x5 with padding 2 on an odd plane, and a
        // rectangular kernel padded in one direction only.
        ([2, 3, 11, 9], [4, 3, 5, 5], conv((1, 1), (2, 2), (1, 1), 1)),
        (
            [2, 3, 12, 10],
            [4, 3, 5, 3],
            conv((1, 1), (2, 0), (1, 1), 1),
        ),
        ([2, 5, 8, 9], [3, 5, 1, 1], conv((1, 1), (0, 0), (1, 1), 1)),
        // Blocks of images (planes under 64 pixels): ResNet's last stages, a last block shorter
        // than the others (37 images of 9 pixels: blocks of 29 and 8), grouped with dilation.
        ([5, 8, 4, 4], [6, 8, 3, 3], conv((2, 2), (1, 1), (1, 1), 1)),
        ([37, 3, 3, 3], [4, 3, 3, 3], conv((1, 1), (1, 1), (1, 1), 1)),
        ([4, 6, 7, 6], [4, 3, 3, 2], conv((1, 1), (2, 1), (2, 1), 2)),
    ]
}

/// The geometries above reach every fast CPU route, several images on each GEMM route.
#[test]
fn conv_geometries_cover_every_cpu_route() {
    use robust_dml::engine::ops::conv::{cpu_route, CpuConvRoute};
    let mut seen = std::collections::HashSet::new();
    for (xs, ws, p) in conv_geometries() {
        let route = cpu_route(&xs, &ws, p).unwrap();
        seen.insert((route, xs[0] > 1));
    }
    for route in [
        CpuConvRoute::Depthwise,
        CpuConvRoute::PerImage,
        CpuConvRoute::ImageBlocks,
    ] {
        assert!(
            seen.contains(&(route, true)),
            "{route:?} with several images"
        );
    }
    assert!(seen.contains(&(CpuConvRoute::PerImage, false)));
}

#[test]
fn conv2d_matches_reference() {
    for (case, (xs, ws, p)) in conv_geometries().into_iter().enumerate() {
        let seed = 10 * case as u64;
        let (x, w, b) = (
            randn(&xs, seed),
            randn(&ws, seed + 1),
            randn(&[ws[0]], seed + 2),
        );
        let (xv, wv, bv) = (values(&x), values(&w), values(&b));
        let (want, out_shape) = r::conv2d_forward(&xv, xs, &wv, ws, Some(&bv), p);
        let g = dy(out_shape.iter().product(), seed + 3);
        let (out, grads) =
            forward_backward(&[&x, &w, &b], &g, |t| conv2d(&t[0], &t[1], Some(&t[2]), p));
        let what = format!("x {xs:?} w {ws:?} {p:?}");
        close(&format!("{what}: forward"), &out, &want);
        let (dx, dw, db) = r::conv2d_backward(&xv, xs, &wv, ws, p, &g);
        close(&format!("{what}: input gradient"), &grads[0], &dx);
        close(&format!("{what}: weight gradient"), &grads[1], &dw);
        close(&format!("{what}: bias gradient"), &grads[2], &db);
    }
}
