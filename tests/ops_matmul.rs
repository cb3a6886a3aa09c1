//! Matmul family: GPU against CPU on odd shapes, gradient checks, and a hand-computed case.

use robust_dml::engine::ops::matmul as mm;
use robust_dml::engine::testing::{assert_close, assert_grad, assert_parity, gpu_or_skip, randn, GradCheck};
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
        assert_grad(&format!("matmul ta={ta} tb={tb}"), |t| mm::matmul_t(&t[0], &t[1], ta, tb), &[a, b], o);
    }
    let x = randn(&[3, 7], 3);
    let w = randn(&[5, 7], 4);
    let bias = randn(&[5], 5);
    assert_grad("linear", |t| mm::linear(&t[0], &t[1], Some(&t[2])), &[x, w, bias], o);
    let a3 = randn(&[2, 3, 4], 6);
    let shared = randn(&[4, 5], 7);
    assert_grad("batched x shared", |t| mm::matmul(&t[0], &t[1]), &[a3, shared], o);
}

#[test]
fn matmul_gpu_matches_cpu() {
    let Some(gpu) = gpu_or_skip("matmul_gpu_matches_cpu") else { return };
    for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
        // Odd sizes straddle the 64-wide tile and the 16-deep K step.
        let (m, k, n) = (67, 19, 70);
        let a = randn(&(if ta { [3, k, m] } else { [3, m, k] }), 10);
        let b = randn(&(if tb { [3, n, k] } else { [3, k, n] }), 11);
        assert_parity(&format!("matmul ta={ta} tb={tb}"), &gpu, |t| mm::matmul_t(&t[0], &t[1], ta, tb), &[a, b], 1e-4, 1e-4);
    }
    let x = randn(&[9, 13], 12);
    let w = randn(&[6, 13], 13);
    let bias = randn(&[6], 14);
    assert_parity("linear", &gpu, |t| mm::linear(&t[0], &t[1], Some(&t[2])), &[x, w, bias], 1e-4, 1e-4);
}

#[test]
fn large_matmul_gpu_matches_cpu_sample() {
    let Some(gpu) = gpu_or_skip("large_matmul_gpu_matches_cpu_sample") else { return };
    let a = randn(&[130, 257], 20);
    let b = randn(&[257, 129], 21);
    let want = mm::matmul(&a, &b).unwrap().to_vec().unwrap();
    let got = mm::matmul(&a.to_device(&gpu).unwrap(), &b.to_device(&gpu).unwrap()).unwrap().to_vec().unwrap();
    assert_close("130x257x129", &got, &want, 1e-3, 1e-4);
}
