//! Elementwise ops: GPU against CPU, central-difference gradients, and flat ranges over tensors
//! larger than one storage binding; the fast CPU kernels against the reference loops.

mod common;

use common::binding_cap::{capped, over_cap, CAP, X};
use common::cpu_reference::{close, dy, forward_backward, values, LONG};
use robust_dml::engine::ops::elementwise as ew;
use robust_dml::engine::reference as r;
use robust_dml::engine::testing::{assert_grad, assert_parity, gpu_or_skip, randn, GradCheck};
use robust_dml::engine::{Result, Tensor};

/// Values kept away from the kinks of relu/relu6/clamp so that central differences are exact.
fn away_from_kinks(shape: &[usize], seed: u64) -> Tensor {
    let t = randn(shape, seed);
    let v: Vec<f32> = t
        .to_vec()
        .unwrap()
        .into_iter()
        .map(|x| {
            let x = x * 4.0;
            let mut y = x;
            for k in [0.0f32, 6.0, -0.5, 0.5] {
                if (y - k).abs() < 0.05 {
                    y = k + 0.05f32.copysign(y - k);
                }
            }
            y
        })
        .collect();
    Tensor::from_cpu(v, shape).unwrap()
}

const SHAPE: [usize; 4] = [2, 3, 7, 5];

#[test]
fn elementwise_gradients() {
    let x = away_from_kinks(&SHAPE, 1);
    let y = randn(&SHAPE, 2);
    let o = GradCheck::default();
    assert_grad("relu", |t| ew::relu(&t[0]), std::slice::from_ref(&x), o);
    assert_grad("relu6", |t| ew::relu6(&t[0]), std::slice::from_ref(&x), o);
    assert_grad(
        "clamp",
        |t| ew::clamp(&t[0], -0.5, 0.5),
        std::slice::from_ref(&x),
        o,
    );
    assert_grad("sign", |t| ew::sign(&t[0]), std::slice::from_ref(&x), o);
    assert_grad("square", |t| ew::square(&t[0]), std::slice::from_ref(&x), o);
    assert_grad(
        "affine",
        |t| ew::affine(&t[0], -1.5, 0.25),
        std::slice::from_ref(&x),
        o,
    );
    assert_grad("add", |t| ew::add(&t[0], &t[1]), &[x.clone(), y.clone()], o);
    assert_grad("sub", |t| ew::sub(&t[0], &t[1]), &[x.clone(), y.clone()], o);
    assert_grad("mul", |t| ew::mul(&t[0], &t[1]), &[x.clone(), y.clone()], o);
    assert_grad(
        "reuse x*x+x",
        |t| ew::add(&ew::mul(&t[0], &t[0])?, &t[0]),
        &[x],
        o,
    );
}

#[test]
fn elementwise_gpu_matches_cpu() {
    let Some(gpu) = gpu_or_skip("elementwise_gpu_matches_cpu") else {
        return;
    };
    let x = away_from_kinks(&SHAPE, 3);
    let y = randn(&SHAPE, 4);
    let tol = (1e-6, 1e-5);
    assert_parity(
        "relu",
        &gpu,
        |t| ew::relu(&t[0]),
        std::slice::from_ref(&x),
        tol.0,
        tol.1,
    );
    assert_parity(
        "relu6",
        &gpu,
        |t| ew::relu6(&t[0]),
        std::slice::from_ref(&x),
        tol.0,
        tol.1,
    );
    assert_parity(
        "clamp",
        &gpu,
        |t| ew::clamp(&t[0], -0.5, 0.5),
        std::slice::from_ref(&x),
        tol.0,
        tol.1,
    );
    assert_parity(
        "sign",
        &gpu,
        |t| ew::sign(&t[0]),
        std::slice::from_ref(&x),
        tol.0,
        tol.1,
    );
    assert_parity(
        "square",
        &gpu,
        |t| ew::square(&t[0]),
        std::slice::from_ref(&x),
        tol.0,
        tol.1,
    );
    assert_parity(
        "affine",
        &gpu,
        |t| ew::affine(&t[0], -1.5, 0.25),
        std::slice::from_ref(&x),
        tol.0,
        tol.1,
    );
    assert_parity(
        "axpby",
        &gpu,
        |t| ew::axpby(0.3, &t[0], -2.0, &t[1]),
        &[x.clone(), y.clone()],
        tol.0,
        tol.1,
    );
    assert_parity(
        "mul",
        &gpu,
        |t| ew::mul(&t[0], &t[1]),
        &[x, y],
        tol.0,
        tol.1,
    );
}

#[test]
fn sign_of_zero_is_zero_on_both_devices() {
    let x = Tensor::from_cpu(vec![-2.0, 0.0, 3.0], &[3]).unwrap();
    assert_eq!(
        ew::sign(&x).unwrap().to_vec().unwrap(),
        vec![-1.0, 0.0, 1.0]
    );
    if let Some(gpu) = gpu_or_skip("sign_of_zero_is_zero_on_both_devices") {
        let g = x.to_device(&gpu).unwrap();
        assert_eq!(
            ew::sign(&g).unwrap().to_vec().unwrap(),
            vec![-1.0, 0.0, 1.0]
        );
    }
}

// ------------------------------------------------------------------ over the binding cap

/// Elementwise ops run over flat ranges of a tensor larger than one binding.
#[test]
fn elementwise_ops_split() {
    let Some(dev) = capped("elementwise_ops_split", CAP) else {
        return;
    };
    let x = randn(&X, 12);
    let y = randn(&X, 13);
    over_cap(&dev, &x.to_device(&dev).unwrap());
    // Spread over the ReLU6 knees.
    let x6 = Tensor::from_cpu(
        x.to_vec().unwrap().iter().map(|v| 4.0 * v + 2.0).collect(),
        &X,
    )
    .unwrap();
    assert_parity("relu6", &dev, |t| ew::relu6(&t[0]), &[x6], 1e-5, 1e-5);
    assert_parity("add", &dev, |t| ew::add(&t[0], &t[1]), &[x, y], 1e-5, 1e-5);
}

// ------------------------------------------------------------------ the fast CPU kernels against the reference loops

// The tables are (name, fast op, reference) tuples written inline, which is where they read
// best; named aliases for each would only move the types away from the rows.
#[allow(clippy::type_complexity)]
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
