//! The autograd tape: branching, reuse, no-grad mode, input gradients, and proof that the
//! gradient checker catches a wrong backward.

use robust_dml::engine::ops::elementwise as ew;
use robust_dml::engine::tape::{no_grad, Backward};
use robust_dml::engine::testing::{grad_check, randn, GradCheck};
use robust_dml::engine::{Result, Tensor};

#[test]
fn branching_and_reuse_accumulate() {
    // f(x) = x*y + x*3 + relu(x): x is used three times, y once.
    let x = Tensor::from_cpu(vec![1.0, -2.0], &[2]).unwrap().var();
    let y = Tensor::from_cpu(vec![5.0, 7.0], &[2]).unwrap().var();
    let a = ew::mul(&x, &y).unwrap();
    let b = ew::scale(&x, 3.0).unwrap();
    let c = ew::relu(&x).unwrap();
    let f = ew::add(&ew::add(&a, &b).unwrap(), &c).unwrap();
    let g = f.backward().unwrap();
    assert_eq!(
        g.get(&x).unwrap().to_vec().unwrap(),
        vec![5.0 + 3.0 + 1.0, 7.0 + 3.0]
    );
    assert_eq!(g.get(&y).unwrap().to_vec().unwrap(), vec![1.0, -2.0]);
}

#[test]
fn diamond_graph() {
    // z = (x + x) * (x * 2): dz/dx = 8x
    let x = Tensor::from_cpu(vec![0.5, 3.0], &[2]).unwrap().var();
    let p = ew::add(&x, &x).unwrap();
    let q = ew::scale(&x, 2.0).unwrap();
    let z = ew::mul(&p, &q).unwrap();
    let g = z.backward().unwrap();
    assert_eq!(g.get(&x).unwrap().to_vec().unwrap(), vec![4.0, 24.0]);
}

#[test]
fn no_grad_records_nothing() {
    let x = randn(&[3], 1).var();
    let y = no_grad(|| ew::relu(&x)).unwrap();
    assert!(!y.requires_grad());
    assert!(y.backward().is_err());
    let z = ew::relu(&x).unwrap();
    assert!(z.requires_grad());
}

#[test]
fn untracked_inputs_get_no_gradient() {
    let x = randn(&[3], 1).var();
    let c = randn(&[3], 2); // a constant
    let g = ew::mul(&x, &c).unwrap().backward().unwrap();
    assert!(g.get(&c).is_none());
    assert_eq!(g.get(&x).unwrap().to_vec().unwrap(), c.to_vec().unwrap());
}

#[test]
fn intermediates_are_freed_after_backward() {
    let x = randn(&[4], 3).var();
    let h = ew::relu(&x).unwrap();
    let weak = std::sync::Arc::downgrade(&h.inner_for_tests());
    let y = ew::square(&h).unwrap();
    drop(h);
    let _ = y.backward().unwrap();
    assert!(
        weak.upgrade().is_none(),
        "the intermediate outlived backward"
    );
}

/// An op whose backward is deliberately wrong (twice the true gradient of x^2).
struct WrongSquareBack;
impl Backward for WrongSquareBack {
    fn name(&self) -> &'static str {
        "wrong_square"
    }
    fn backward(&self, i: &[Tensor], _o: &Tensor, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let four_x = ew::unary_raw(&i[0], ew::Unary::Affine(4.0, 0.0))?;
        Ok(vec![Some(ew::binary_raw(&four_x, g, ew::Binary::Mul)?)])
    }
}

fn wrong_square(x: &Tensor) -> Result<Tensor> {
    Ok(ew::unary_raw(x, ew::Unary::Square)?.record(WrongSquareBack, &[x]))
}

#[test]
fn checker_catches_a_wrong_backward() {
    let x = randn(&[2, 3], 4);
    let bad = grad_check(
        |t| wrong_square(&t[0]),
        std::slice::from_ref(&x),
        GradCheck::default(),
    );
    assert!(bad.is_err(), "a doubled gradient passed the checker");
    let good = grad_check(|t| ew::square(&t[0]), &[x], GradCheck::default());
    assert!(good.is_ok(), "{good:?}");
}
