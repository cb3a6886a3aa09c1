//! Matmul family: GPU against CPU on odd shapes, gradient checks, a hand-computed case, and the
//! fast CPU kernels against the reference loops.

mod common;

use common::cpu_reference::{close, dy, forward_backward, values};
use robust_dml::engine::ops::matmul::{self as mm, add_row_bias, matmul_t, GemmKernel};
use robust_dml::engine::reference as r;
use robust_dml::engine::testing::{
    assert_close, assert_grad, assert_parity, gpu_or_skip, randn, GradCheck,
};
use robust_dml::engine::Tensor;

#[test]
fn matmul_hand_computed() {
    let a = Tensor::from_cpu(vec![1., 2., 3., 4., 5., 6.], &[2, 3]).unwrap();
    let b = Tensor::from_cpu(vec![7., 8., 9., 10., 11., 12.], &[3, 2]).unwrap();
    let c = mm::matmul(&a, &b).unwrap().to_vec().unwrap();
    assert_eq!(c, vec![58., 64., 139., 154.]);
    let ct = mm::matmul_t(&a, &a, false, true).unwrap().to_vec().unwrap();
    assert_eq!(ct, vec![14., 32., 32., 77.]);
}

#[test]
fn matmul_gradients() {
    let o = GradCheck::default();
    for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
        let a = randn(if ta { &[2, 5, 3] } else { &[2, 3, 5] }, 1);
        let b = randn(if tb { &[2, 4, 5] } else { &[2, 5, 4] }, 2);
        assert_grad(
            &format!("matmul ta={ta} tb={tb}"),
            |t| mm::matmul_t(&t[0], &t[1], ta, tb),
            &[a, b],
            o,
        );
    }
    let x = randn(&[3, 7], 3);
    let w = randn(&[5, 7], 4);
    let bias = randn(&[5], 5);
    assert_grad(
        "linear",
        |t| mm::linear(&t[0], &t[1], Some(&t[2])),
        &[x, w, bias],
        o,
    );
    let a3 = randn(&[2, 3, 4], 6);
    let shared = randn(&[4, 5], 7);
    assert_grad(
        "batched x shared",
        |t| mm::matmul(&t[0], &t[1]),
        &[a3, shared],
        o,
    );
}

#[test]
fn matmul_gpu_matches_cpu() {
    let Some(gpu) = gpu_or_skip("matmul_gpu_matches_cpu") else {
        return;
    };
    for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
        // Odd sizes straddle the 64-wide tile and the 16-deep K step.
        let (m, k, n) = (67, 19, 70);
        let a = randn(&(if ta { [3, k, m] } else { [3, m, k] }), 10);
        let b = randn(&(if tb { [3, n, k] } else { [3, k, n] }), 11);
        assert_parity(
            &format!("matmul ta={ta} tb={tb}"),
            &gpu,
            |t| mm::matmul_t(&t[0], &t[1], ta, tb),
            &[a, b],
            1e-4,
            1e-4,
        );
    }
    let x = randn(&[9, 13], 12);
    let w = randn(&[6, 13], 13);
    let bias = randn(&[6], 14);
    assert_parity(
        "linear",
        &gpu,
        |t| mm::linear(&t[0], &t[1], Some(&t[2])),
        &[x, w, bias],
        1e-4,
        1e-4,
    );
}

#[test]
fn large_matmul_gpu_matches_cpu_sample() {
    let Some(gpu) = gpu_or_skip("large_matmul_gpu_matches_cpu_sample") else {
        return;
    };
    let a = randn(&[130, 257], 20);
    let b = randn(&[257, 129], 21);
    let want = mm::matmul(&a, &b).unwrap().to_vec().unwrap();
    let got = mm::matmul(&a.to_device(&gpu).unwrap(), &b.to_device(&gpu).unwrap())
        .unwrap()
        .to_vec()
        .unwrap();
    assert_close("130x257x129", &got, &want, 1e-3, 1e-4);
}

/// Every GPU kernel against the CPU on shapes that hit each edge of their blockings: Tiled
/// (64 x 64, K by 16), Scalar (16 x 32 per workgroup) and Vec4 (16 x 8 per invocation, K by 4,
/// used when both operands' stored rows are a multiple of 4 long, else Scalar runs).
#[test]
fn every_gemm_kernel_matches_cpu_on_edge_shapes() {
    let Some(gpu) = gpu_or_skip("every_gemm_kernel_matches_cpu_on_edge_shapes") else {
        return;
    };
    // (m, k, n): multiples of 4 but not of the blocks (Vec4 for every transpose); odd K (Vec4
    // only when A is transposed and B is not: the K tail); K = 1; M = 1; N = 1; odd everything.
    let shapes = [
        (20, 12, 36),
        (36, 13, 20),
        (20, 1, 12),
        (1, 8, 12),
        (5, 7, 1),
        (17, 33, 9),
        (4, 4, 4),
    ];
    let mut seed = 100;
    for kernel in GemmKernel::ALL {
        for &(m, k, n) in &shapes {
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                // Batched both, batched A with a shared 2-D B, shared A with batched B.
                for (a_batch, b_batch) in [(Some(3), Some(3)), (Some(3), None), (None, Some(3))] {
                    let dims = |batch: Option<usize>, r, c| match batch {
                        Some(bn) => vec![bn, r, c],
                        None => vec![r, c],
                    };
                    let a_shape = if ta {
                        dims(a_batch, k, m)
                    } else {
                        dims(a_batch, m, k)
                    };
                    let b_shape = if tb {
                        dims(b_batch, n, k)
                    } else {
                        dims(b_batch, k, n)
                    };
                    seed += 2;
                    let (a, b) = (randn(&a_shape, seed), randn(&b_shape, seed + 1));
                    let want = mm::gemm_raw(&a, &b, ta, tb).unwrap().to_vec().unwrap();
                    let (ag, bg) = (a.to_device(&gpu).unwrap(), b.to_device(&gpu).unwrap());
                    let got = mm::gemm_raw_using(Some(kernel), &ag, &bg, ta, tb).unwrap();
                    assert_close(
                        &format!("{kernel:?} {a_shape:?}^{ta} x {b_shape:?}^{tb}"),
                        &got.to_vec().unwrap(),
                        &want,
                        1e-4,
                        1e-4,
                    );
                }
            }
        }
    }
}

/// The accumulating path (out += ones * bias) of every kernel.
#[test]
fn every_gemm_kernel_adds_row_bias() {
    let Some(gpu) = gpu_or_skip("every_gemm_kernel_adds_row_bias") else {
        return;
    };
    for kernel in GemmKernel::ALL {
        for (rows, cols) in [(1, 1), (19, 70), (16, 8), (67, 33)] {
            let mat = randn(&[rows, cols], 200);
            let bias = randn(&[cols], 201);
            let want = mm::add_row_bias_raw(&mat, &bias).unwrap().to_vec().unwrap();
            let got = mm::add_row_bias_raw_using(
                Some(kernel),
                &mat.to_device(&gpu).unwrap(),
                &bias.to_device(&gpu).unwrap(),
            )
            .unwrap();
            assert_close(
                &format!("{kernel:?} bias {rows}x{cols}"),
                &got.to_vec().unwrap(),
                &want,
                1e-5,
                1e-5,
            );
        }
    }
}

// ------------------------------------------------------------------ the fast CPU kernels against the reference loops

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
