//! Both GPU routes of ungrouped convolutions (implicit GEMM, and im2col + GEMM) against the
//! CPU reference, forced in turn so that each is covered whatever the adapter picks by default.
//! One test: the route switch is process-wide.

use robust_dml::engine::ops::conv::{conv2d, force_conv_route, Conv2dParams, ConvRoute};
use robust_dml::engine::testing::{assert_parity, gpu_or_skip, randn};
use robust_dml::engine::Tensor;

struct Case {
    name: &'static str,
    x: [usize; 4],
    cout: usize,
    k: (usize, usize),
    stride: (usize, usize),
    padding: (usize, usize),
    dilation: (usize, usize),
    bias: bool,
}

fn cases() -> Vec<Case> {
    let case = |name, x, cout, k, stride, padding, dilation, bias| Case {
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

fn inputs(c: &Case, seed: u64) -> Vec<Tensor> {
    let mut t = vec![
        randn(&c.x, seed),
        randn(&[c.cout, c.x[1], c.k.0, c.k.1], seed + 1),
    ];
    if c.bias {
        t.push(randn(&[c.cout], seed + 2));
    }
    t
}

#[test]
fn both_conv_routes_match_cpu() {
    let Some(gpu) = gpu_or_skip("both_conv_routes_match_cpu") else {
        return;
    };
    for route in [ConvRoute::ImplicitGemm, ConvRoute::Im2colGemm] {
        force_conv_route(route);
        for (i, c) in cases().iter().enumerate() {
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
                &inputs(c, 300 + i as u64),
                2e-4,
                2e-4,
            );
        }
    }
    force_conv_route(ConvRoute::Auto);
}
