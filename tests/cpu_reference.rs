//! Every fast CPU kernel against the simple loops of `engine::reference`, forward and backward,
//! on random inputs with odd shapes: sizes that are not multiples of the vector width, planes
//! that share a task and planes that span several, more rows than one task takes, and every
//! route of the GEMM and convolution kernels. The ops run through their public entry points on
//! `Device::Cpu`; backward goes through the tape with a random output gradient. Finally, the
//! fast kernels give the same bits on every run and for any thread count.

// The test tables are (name, fast op, reference) tuples written inline, which is where they
// read best; named aliases for each would only move the types away from the rows.
#![allow(clippy::type_complexity)]

use robust_dml::engine::ops::attack::pgd_step;
use robust_dml::engine::ops::batchnorm::{batch_norm_eval, batch_norm_train};
use robust_dml::engine::ops::channels::{
    channel_affine, concat_channels, permute_channels, split_channels,
};
use robust_dml::engine::ops::conv::{conv2d, Conv2dParams};
use robust_dml::engine::ops::elementwise as ew;
use robust_dml::engine::ops::matmul::{add_row_bias, matmul_t};
use robust_dml::engine::ops::normalize::l2_normalize;
use robust_dml::engine::ops::optim::{adamw_step, AdamWStep};
use robust_dml::engine::ops::pool::{
    avg_pool2d, global_avg_pool, global_max_pool, max_pool2d, Pool2dParams,
};
use robust_dml::engine::ops::reduce::{
    logsumexp_dim, mean, mean_dim, sum, sum_dim, sum_squares_raw,
};
use robust_dml::engine::reference as r;
use robust_dml::engine::tape::backward_with;
use robust_dml::engine::testing::{assert_close, randn, uniform};
use robust_dml::engine::{Result, Tensor};

/// More elements than one flat task (cpu::FLAT_CHUNK = 16,384) takes, and not a multiple of 8.
const LONG: usize = 3 * 16_384 + 5;

fn values(t: &Tensor) -> Vec<f32> {
    t.to_vec().expect("cpu tensor")
}

fn tensor(v: Vec<f32>, shape: &[usize]) -> Tensor {
    Tensor::from_cpu(v, shape).expect("cpu tensor")
}

/// Runs `f` on leaf copies of `inputs`, then backward with output gradient `dy`: the output
/// and the gradient of every input.
fn forward_backward(
    inputs: &[&Tensor],
    dy: &[f32],
    f: impl Fn(&[Tensor]) -> Result<Tensor>,
) -> (Vec<f32>, Vec<Vec<f32>>) {
    let vars: Vec<Tensor> = inputs.iter().map(|t| t.var()).collect();
    let y = f(&vars).expect("forward");
    let out = values(&y);
    let seed = tensor(dy.to_vec(), y.shape());
    let grads = backward_with(y, seed).expect("backward");
    let grads = vars
        .iter()
        .map(|v| values(grads.get(v).expect("a gradient for every input")))
        .collect();
    (out, grads)
}

/// A random output gradient for an output of `len` elements.
fn dy(len: usize, seed: u64) -> Vec<f32> {
    values(&randn(&[len], seed))
}

const TOL: f32 = 1e-4;

fn close(what: &str, got: &[f32], want: &[f32]) {
    assert_close(what, got, want, TOL, TOL);
}

// ------------------------------------------------------------------ elementwise

#[test]
fn elementwise_ops_match_reference() {
    let x = randn(&[LONG], 1);
    let y = randn(&[LONG], 2);
    let (xv, yv) = (values(&x), values(&y));
    let g = dy(LONG, 3);
    type Op = fn(&Tensor) -> Result<Tensor>;
    let unary: [(&str, Op, fn(f32) -> f32, fn(f32) -> f32); 6] = [
        ("relu", ew::relu, |v| v.max(0.0), |v| (v > 0.0) as u8 as f32),
        (
            "relu6",
            ew::relu6,
            |v| v.clamp(0.0, 6.0),
            |v| (v > 0.0 && v < 6.0) as u8 as f32,
        ),
        (
            "clamp",
            |t| ew::clamp(t, -0.5, 0.7),
            |v| v.clamp(-0.5, 0.7),
            |v| (-0.5..=0.7).contains(&v) as u8 as f32,
        ),
        ("sign", ew::sign, r::sign, |_| 0.0),
        ("square", ew::square, |v| v * v, |v| 2.0 * v),
        (
            "affine",
            |t| ew::affine(t, 1.5, -0.25),
            |v| 1.5 * v - 0.25,
            |_| 1.5,
        ),
    ];
    for (name, op, value, slope) in unary {
        let (out, grads) = forward_backward(&[&x], &g, |t| op(&t[0]));
        close(name, &out, &r::map(&xv, value));
        let want = r::zip_map(&xv, &g, |v, g| slope(v) * g);
        close(&format!("{name} backward"), &grads[0], &want);
    }
    let binary: [(
        &str,
        fn(&Tensor, &Tensor) -> Result<Tensor>,
        fn(f32, f32) -> f32,
    ); 4] = [
        ("add", ew::add, |a, b| a + b),
        ("sub", ew::sub, |a, b| a - b),
        ("mul", ew::mul, |a, b| a * b),
        (
            "axpby",
            |a, b| ew::axpby(0.5, a, -2.0, b),
            |a, b| 0.5 * a - 2.0 * b,
        ),
    ];
    for (name, op, value) in binary {
        let (out, grads) = forward_backward(&[&x, &y], &g, |t| op(&t[0], &t[1]));
        close(name, &out, &r::zip_map(&xv, &yv, value));
        // The partial derivatives of these bilinear maps, by differences at 0 and 1.
        let dx = r::zip_map(&yv, &g, |b, g| (value(1.0, b) - value(0.0, b)) * g);
        let dy = r::zip_map(&xv, &g, |a, g| (value(a, 1.0) - value(a, 0.0)) * g);
        close(&format!("{name} backward x"), &grads[0], &dx);
        close(&format!("{name} backward y"), &grads[1], &dy);
    }
}

// ------------------------------------------------------------------ matrix products

/// Every transpose pair, batched and shared operands, one multi-threaded GEMM and a batch of
/// single-threaded ones, forward and both gradients.
#[test]
fn matmul_matches_reference() {
    let shapes = [
        (1, 1, 1, 1),
        (1, 7, 13, 5),
        (3, 33, 17, 65),
        (1, 129, 67, 71),
        (2, 64, 301, 9),
    ];
    let mut seed = 0;
    for (batch, m, k, n) in shapes {
        for (ta, tb, shared_b) in (0..8).map(|i| (i & 1 == 1, i & 2 == 2, i & 4 == 4)) {
            seed += 3;
            let what = format!("batch {batch} m {m} k {k} n {n} ta {ta} tb {tb} shared {shared_b}");
            let a_dims = if ta {
                vec![batch, k, m]
            } else {
                vec![batch, m, k]
            };
            let mut b_dims = if tb {
                vec![batch, n, k]
            } else {
                vec![batch, k, n]
            };
            if shared_b {
                b_dims.remove(0);
            }
            let (a, b) = (randn(&a_dims, seed), randn(&b_dims, seed + 1));
            let (av, bv) = (values(&a), values(&b));
            let g = dy(batch * m * n, seed + 2);
            let (out, grads) = forward_backward(&[&a, &b], &g, |t| matmul_t(&t[0], &t[1], ta, tb));
            let (want, shape) = r::matmul(&av, &a_dims, ta, &bv, &b_dims, tb);
            close(&what, &out, &want);
            // dA = dY op(B)^T (transposed back when A was read transposed), dB likewise.
            let g_dims = shape;
            let da = if ta {
                r::matmul(&bv, &b_dims, tb, &g, &g_dims, true).0
            } else {
                r::matmul(&g, &g_dims, false, &bv, &b_dims, !tb).0
            };
            let db = if tb {
                r::matmul(&g, &g_dims, true, &av, &a_dims, ta).0
            } else {
                r::matmul(&av, &a_dims, !ta, &g, &g_dims, false).0
            };
            close(&format!("{what}: dA"), &grads[0], &da);
            let db = if shared_b {
                // A shared operand's gradient is the sum over the batch.
                let per = db.len() / batch;
                (0..per)
                    .map(|i| (0..batch).map(|e| db[e * per + i]).sum())
                    .collect()
            } else {
                db
            };
            close(&format!("{what}: dB"), &grads[1], &db);
        }
    }
}

#[test]
fn row_bias_matches_reference() {
    for (rows, cols) in [(1, 1), (3, 5), (2_001, 37), (7, 3_001)] {
        let (m, b) = (randn(&[rows, cols], 1), randn(&[cols], 2));
        let g = dy(rows * cols, 3);
        let (out, grads) = forward_backward(&[&m, &b], &g, |t| add_row_bias(&t[0], &t[1]));
        close(
            "row bias",
            &out,
            &r::add_row_bias(&values(&m), cols, &values(&b)),
        );
        close("row bias dmat", &grads[0], &g);
        close(
            "row bias dbias",
            &grads[1],
            &r::sum_dim(&g, (1, rows, cols)),
        );
    }
}

// ------------------------------------------------------------------ convolution

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
    ]
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

// ------------------------------------------------------------------ pooling

fn pool(k: usize, s: usize, pad: usize, ceil: bool, include_pad: bool) -> Pool2dParams {
    Pool2dParams {
        kernel: (k, k),
        stride: (s, s),
        padding: (pad, pad),
        ceil_mode: ceil,
        count_include_pad: include_pad,
    }
}

/// Large planes (one task each), small planes (many to a task, several tasks) and odd sizes.
const POOL_SHAPES: [[usize; 4]; 3] = [[2, 3, 13, 11], [2, 300, 9, 7], [5, 3, 4, 4]];

fn pool_params() -> Vec<Pool2dParams> {
    vec![
        pool(3, 2, 0, true, true),
        pool(3, 1, 1, false, true),
        pool(3, 1, 1, false, false),
        pool(2, 2, 0, false, true),
        pool(3, 2, 1, true, true),
        pool(3, 2, 1, true, false),
        Pool2dParams {
            kernel: (3, 2),
            stride: (2, 1),
            padding: (1, 0),
            ceil_mode: true,
            count_include_pad: false,
        },
    ]
}

#[test]
fn pooling_matches_reference() {
    let mut seed = 0;
    for shape in POOL_SHAPES {
        for p in pool_params() {
            seed += 2;
            let x = randn(&shape, seed);
            let xv = values(&x);
            let what = format!("{shape:?} {p:?}");

            let (want, _, out_shape) = r::max_pool2d(&xv, shape, p);
            let g = dy(out_shape.iter().product(), seed + 1);
            let (out, grads) = forward_backward(&[&x], &g, |t| max_pool2d(&t[0], p));
            close(&format!("max pool {what}"), &out, &want);
            let dx = r::max_pool2d_backward(&xv, shape, p, &g);
            close(&format!("max pool backward {what}"), &grads[0], &dx);

            let (want, _) = r::avg_pool2d(&xv, shape, p);
            let (out, grads) = forward_backward(&[&x], &g, |t| avg_pool2d(&t[0], p));
            close(&format!("avg pool {what}"), &out, &want);
            let dx = r::avg_pool2d_backward(shape, p, &g);
            close(&format!("avg pool backward {what}"), &grads[0], &dx);
        }
        // Global pools: one window per plane.
        let x = randn(&shape, seed + 100);
        let xv = values(&x);
        let whole = pool(1, 1, 0, false, true);
        let whole = Pool2dParams {
            kernel: (shape[2], shape[3]),
            stride: (shape[2], shape[3]),
            ..whole
        };
        let g = dy(shape[0] * shape[1], seed + 101);
        let (out, grads) = forward_backward(&[&x], &g, |t| global_avg_pool(&t[0]));
        close("global avg pool", &out, &r::avg_pool2d(&xv, shape, whole).0);
        close(
            "global avg pool backward",
            &grads[0],
            &r::avg_pool2d_backward(shape, whole, &g),
        );
        let (out, grads) = forward_backward(&[&x], &g, |t| global_max_pool(&t[0]));
        close("global max pool", &out, &r::max_pool2d(&xv, shape, whole).0);
        let dx = r::max_pool2d_backward(&xv, shape, whole, &g);
        close("global max pool backward", &grads[0], &dx);
    }
}

// ------------------------------------------------------------------ batch norm

#[test]
fn batch_norm_matches_reference() {
    let eps = 1e-5;
    for (case, shape) in [[3, 5, 7, 9], [2, 300, 3, 3], [16, 4, 1, 1]]
        .into_iter()
        .enumerate()
    {
        let seed = 10 * case as u64;
        let [n, c, h, w] = shape;
        let lay = (n, c, h * w);
        let x = randn(&shape, seed);
        let gamma = uniform(&[c], 0.5, 1.5, seed + 1);
        let beta = randn(&[c], seed + 2);
        let (xv, gv, bv) = (values(&x), values(&gamma), values(&beta));
        let g = dy(x.numel(), seed + 3);

        let rm = randn(&[c], seed + 4);
        let rv = uniform(&[c], 0.5, 2.0, seed + 5);
        let (rm0, rv0) = (values(&rm), values(&rv));
        let momentum = 0.1;
        let (out, grads) = forward_backward(&[&x, &gamma, &beta], &g, |t| {
            batch_norm_train(&t[0], &t[1], &t[2], &rm, &rv, momentum, eps)
        });
        let (want, mean, var) = r::batch_norm_train(&xv, lay, &gv, &bv, eps);
        let what = format!("{shape:?}");
        close(&format!("train {what}"), &out, &want);
        let count = (n * h * w) as f64;
        let want_rm: Vec<f32> = (0..c)
            .map(|i| (1.0 - momentum) * rm0[i] + momentum * mean[i] as f32)
            .collect();
        let want_rv: Vec<f32> = (0..c)
            .map(|i| (1.0 - momentum) * rv0[i] + momentum * (var[i] * count / (count - 1.0)) as f32)
            .collect();
        close(&format!("running mean {what}"), &values(&rm), &want_rm);
        close(&format!("running var {what}"), &values(&rv), &want_rv);
        let m32: Vec<f32> = mean.iter().map(|&m| m as f32).collect();
        let invstd: Vec<f32> = var
            .iter()
            .map(|&v| (1.0 / (v + eps as f64).sqrt()) as f32)
            .collect();
        let (dx, dgamma, dbeta) = r::batch_norm_backward(&xv, lay, &m32, &invstd, &gv, &g, true);
        close(&format!("train dx {what}"), &grads[0], &dx);
        close(&format!("train dgamma {what}"), &grads[1], &dgamma);
        close(&format!("train dbeta {what}"), &grads[2], &dbeta);

        let (out, grads) = forward_backward(&[&x, &gamma, &beta], &g, |t| {
            batch_norm_eval(&t[0], &t[1], &t[2], &rm, &rv, eps)
        });
        let mean = values(&rm);
        let invstd: Vec<f32> = values(&rv)
            .iter()
            .map(|&v| 1.0 / (v + eps).sqrt())
            .collect();
        close(
            &format!("eval {what}"),
            &out,
            &r::batch_norm_apply(&xv, lay, &mean, &invstd, &gv, &bv),
        );
        let (dx, dgamma, dbeta) = r::batch_norm_backward(&xv, lay, &mean, &invstd, &gv, &g, false);
        close(&format!("eval dx {what}"), &grads[0], &dx);
        close(&format!("eval dgamma {what}"), &grads[1], &dgamma);
        close(&format!("eval dbeta {what}"), &grads[2], &dbeta);
    }
}

// ------------------------------------------------------------------ channel ops

#[test]
fn channel_ops_match_reference() {
    // Large planes, small planes (many to a task) and 2-D [N, C] tensors (planes of one).
    for (case, (n, hw_shape)) in [(3, vec![7, 5]), (2, vec![3, 3]), (5, vec![])]
        .into_iter()
        .enumerate()
    {
        let seed = 20 * case as u64;
        let hw: usize = hw_shape.iter().product();
        let shape = |c: usize| [vec![n, c], hw_shape.clone()].concat();
        let counts = [3, 1, 2_001];
        let parts: Vec<Tensor> = counts
            .iter()
            .enumerate()
            .map(|(i, &c)| randn(&shape(c), seed + i as u64))
            .collect();
        let total: usize = counts.iter().sum();
        let g = dy(n * total * hw, seed + 5);
        let refs: Vec<&Tensor> = parts.iter().collect();
        let (out, grads) = forward_backward(&refs, &g, |t| {
            concat_channels(&t.iter().collect::<Vec<_>>())
        });
        let pv: Vec<Vec<f32>> = parts.iter().map(values).collect();
        let slices: Vec<(&[f32], usize)> =
            pv.iter().zip(counts).map(|(v, c)| (&v[..], c)).collect();
        close("concat", &out, &r::concat_channels(&slices, n, hw));
        // Concat's gradient is the split of g, i.e. the gather of each part's channels.
        let mut offset = 0;
        for (i, &c) in counts.iter().enumerate() {
            let index: Vec<usize> = (offset..offset + c).collect();
            close(
                "concat backward",
                &grads[i],
                &r::gather_channels(&g, (n, total, hw), &index),
            );
            offset += c;
        }

        let x = randn(&shape(total), seed + 6);
        let xv = values(&x);
        // Split, then backward through one piece only (the others get no gradient: zeros).
        let pieces_g = dy(n * counts[2] * hw, seed + 7);
        let (out, grads) = forward_backward(&[&x], &pieces_g, |t| {
            Ok(split_channels(&t[0], &counts)?.remove(2))
        });
        let index: Vec<usize> = (counts[0] + counts[1]..total).collect();
        close(
            "split",
            &out,
            &r::gather_channels(&xv, (n, total, hw), &index),
        );
        let mut want = vec![0.0; xv.len()];
        for img in 0..n {
            for (j, &ch) in index.iter().enumerate() {
                for s in 0..hw {
                    want[(img * total + ch) * hw + s] = pieces_g[(img * counts[2] + j) * hw + s];
                }
            }
        }
        close("split backward", &grads[0], &want);

        let perm: Vec<usize> = (0..total).map(|i| (i * 7 + 3) % total).collect();
        let g = dy(xv.len(), seed + 8);
        let (out, grads) = forward_backward(&[&x], &g, |t| permute_channels(&t[0], &perm));
        close(
            "permute",
            &out,
            &r::gather_channels(&xv, (n, total, hw), &perm),
        );
        let mut inverse = vec![0; total];
        for (i, &p) in perm.iter().enumerate() {
            inverse[p] = i;
        }
        close(
            "permute backward",
            &grads[0],
            &r::gather_channels(&g, (n, total, hw), &inverse),
        );

        let scale = values(&randn(&[total], seed + 9));
        let shift = values(&randn(&[total], seed + 10));
        let (out, grads) = forward_backward(&[&x], &g, |t| channel_affine(&t[0], &scale, &shift));
        close(
            "channel affine",
            &out,
            &r::channel_affine(&xv, (n, total, hw), &scale, &shift),
        );
        let zeros = vec![0.0; total];
        close(
            "channel affine backward",
            &grads[0],
            &r::channel_affine(&g, (n, total, hw), &scale, &zeros),
        );
    }
}

// ------------------------------------------------------------------ reductions

#[test]
fn whole_tensor_reductions_match_reference() {
    for len in [1, 7, LONG] {
        let x = randn(&[len], len as u64);
        let xv = values(&x);
        let g = [0.75f32];
        let (out, grads) = forward_backward(&[&x], &g, |t| sum(&t[0]));
        close("sum", &out, &[r::sum_all(&xv)]);
        close("sum backward", &grads[0], &vec![0.75; len]);
        let (out, grads) = forward_backward(&[&x], &g, |t| mean(&t[0]));
        close("mean", &out, &[r::sum_all(&xv) / len as f32]);
        close("mean backward", &grads[0], &vec![0.75 / len as f32; len]);
        let squares = values(&sum_squares_raw(&x).unwrap());
        close("sum of squares", &squares, &[r::sum_squares(&xv)]);
    }
}

#[test]
fn reductions_along_a_dimension_match_reference() {
    // Contiguous rows (last dim), strided columns, more columns than one task takes.
    let shapes: [&[usize]; 4] = [&[5, 7, 300], &[3, 2_500, 2], &[2, 3, 1_500], &[4_099]];
    for (case, shape) in shapes.into_iter().enumerate() {
        for dim in 0..shape.len() {
            let seed = 10 * case as u64 + dim as u64;
            let x = randn(shape, seed);
            let xv = values(&x);
            let lay = r::outer_n_inner(shape, dim);
            let what = format!("{shape:?} dim {dim}");
            let g = dy(lay.0 * lay.2, seed + 100);

            let (out, grads) = forward_backward(&[&x], &g, |t| sum_dim(&t[0], dim));
            close(&format!("sum_dim {what}"), &out, &r::sum_dim(&xv, lay));
            close(
                &format!("sum_dim backward {what}"),
                &grads[0],
                &r::reduce_backward(&g, lay, 1.0, None),
            );

            let (out, grads) = forward_backward(&[&x], &g, |t| mean_dim(&t[0], dim));
            let scale = 1.0 / lay.1 as f32;
            let want: Vec<f32> = r::sum_dim(&xv, lay).iter().map(|v| v * scale).collect();
            close(&format!("mean_dim {what}"), &out, &want);
            close(
                &format!("mean_dim backward {what}"),
                &grads[0],
                &r::reduce_backward(&g, lay, scale, None),
            );

            let (out, grads) = forward_backward(&[&x], &g, |t| logsumexp_dim(&t[0], dim));
            let lse = r::logsumexp_dim(&xv, lay);
            close(&format!("logsumexp_dim {what}"), &out, &lse);
            let want = r::reduce_backward(&g, lay, 1.0, Some((&xv, &lse)));
            close(&format!("logsumexp_dim backward {what}"), &grads[0], &want);
        }
    }
}

// ------------------------------------------------------------------ L2 normalisation

#[test]
fn l2_normalize_matches_reference() {
    // [1_030, 67] along 1 and [40, 30, 20] along 1 split into several parallel tasks of slabs.
    let shapes: [&[usize]; 4] = [&[5, 6, 7], &[1_030, 67], &[3, 2_000], &[40, 30, 20]];
    for (case, shape) in shapes.into_iter().enumerate() {
        for dim in 0..shape.len() {
            let seed = 10 * case as u64 + dim as u64;
            let mut xv = values(&randn(shape, seed));
            // A zero column: the norm is clamped to eps.
            let lay = r::outer_n_inner(shape, dim);
            for k in 0..lay.1 {
                xv[k * lay.2] = 0.0;
            }
            let x = tensor(xv.clone(), shape);
            let eps = 1e-6;
            let g = dy(xv.len(), seed + 100);
            let (out, grads) = forward_backward(&[&x], &g, |t| l2_normalize(&t[0], dim, eps));
            let what = format!("{shape:?} dim {dim}");
            close(
                &format!("l2_normalize {what}"),
                &out,
                &r::l2_normalize(&xv, lay, eps),
            );
            let want = r::l2_normalize_backward(&xv, &g, lay, eps);
            // Gradients at a clamped norm are scaled by 1 / eps: compare relative to that.
            assert_close(
                &format!("l2_normalize backward {what}"),
                &grads[0],
                &want,
                TOL,
                TOL,
            );
        }
    }
}

// ------------------------------------------------------------------ attack and optimiser

#[test]
fn pgd_step_matches_reference() {
    let x0 = uniform(&[LONG], 0.0, 1.0, 1);
    let xa = uniform(&[LONG], -0.1, 1.1, 2);
    let mut gv = values(&randn(&[LONG], 3));
    gv[5] = 0.0;
    let grad = tensor(gv.clone(), &[LONG]);
    let out = values(&pgd_step(&xa, &grad, &x0, 0.01, 0.03).unwrap());
    close(
        "pgd step",
        &out,
        &r::pgd_step(&values(&xa), &gv, &values(&x0), 0.01, 0.03),
    );
}

#[test]
fn adamw_step_matches_reference() {
    let h = AdamWStep {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 1e-2,
        step: 3,
    };
    let (p, g) = (randn(&[LONG], 1), randn(&[LONG], 2));
    let m = randn(&[LONG], 3);
    let v = uniform(&[LONG], 0.0, 1.0, 4);
    let (mut pv, gv, mut mv, mut vv) = (values(&p), values(&g), values(&m), values(&v));
    adamw_step(&p, &g, &m, &v, h).unwrap();
    r::adamw_step(&mut pv, &gv, &mut mv, &mut vv, h);
    close("adamw param", &values(&p), &pv);
    close("adamw m", &values(&m), &mv);
    close("adamw v", &values(&v), &vv);
}

// ------------------------------------------------------------------ determinism

/// Outputs and gradients of a mix of fast kernels (GEMM, convolution, batch norm, pooling,
/// reductions, normalisation) on one input.
fn fingerprint() -> Vec<Vec<f32>> {
    let x = randn(&[6, 5, 17, 13], 1);
    let w = randn(&[7, 5, 3, 3], 2);
    let gamma = uniform(&[7], 0.5, 1.5, 3);
    let beta = randn(&[7], 4);
    let (rm, rv) = (randn(&[7], 5), uniform(&[7], 0.5, 2.0, 6));
    let p = conv((1, 1), (1, 1), (1, 1), 1);
    let (out, grads) = forward_backward(&[&x, &w, &gamma, &beta], &[1.0], |t| {
        let y = conv2d(&t[0], &t[1], None, p)?;
        let y = batch_norm_train(&y, &t[2], &t[3], &rm, &rv, 0.1, 1e-5)?;
        let y = avg_pool2d(&ew::relu(&y)?, pool(3, 2, 1, true, false))?;
        let e = l2_normalize(&global_avg_pool(&y)?, 1, 1e-12)?;
        let lse = logsumexp_dim(&matmul_t(&e, &e, false, true)?, 1)?;
        sum(&ew::add(&sum_dim(&e, 1)?, &lse)?)
    });
    let mut all = vec![out];
    all.extend(grads);
    all
}

/// The same bits on every run, and with 1, 2 or 3 threads: every sum has a fixed order.
#[test]
fn fast_kernels_are_deterministic_for_any_thread_count() {
    let first = fingerprint();
    let same_bits = |a: &[Vec<f32>], b: &[Vec<f32>]| {
        a.iter().zip(b).all(|(a, b)| {
            a.iter()
                .map(|v| v.to_bits())
                .eq(b.iter().map(|v| v.to_bits()))
        })
    };
    assert!(same_bits(&first, &fingerprint()), "two runs differ");
    for threads in [1, 2, 3] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let run = pool.install(fingerprint);
        assert!(
            same_bits(&first, &run),
            "{threads} threads differ from the default pool"
        );
    }
}
