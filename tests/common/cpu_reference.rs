//! The harness of the fast CPU kernels' tests against the simple loops of `engine::reference`
//! (used by each op family's file): random inputs with odd shapes, the ops run through their
//! public entry points on `Device::Cpu`, backward through the tape with a random output gradient.

use robust_dml::engine::tape::backward_with;
use robust_dml::engine::testing::{assert_close, randn};
use robust_dml::engine::{Result, Tensor};

/// More elements than one flat task (cpu::FLAT_CHUNK = 16,384) takes, and not a multiple of 8.
pub const LONG: usize = 3 * 16_384 + 5;

pub fn values(t: &Tensor) -> Vec<f32> {
    t.to_vec().expect("cpu tensor")
}

pub fn tensor(v: Vec<f32>, shape: &[usize]) -> Tensor {
    Tensor::from_cpu(v, shape).expect("cpu tensor")
}

/// Runs `f` on leaf copies of `inputs`, then backward with output gradient `dy`: the output
/// and the gradient of every input.
pub fn forward_backward(
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
pub fn dy(len: usize, seed: u64) -> Vec<f32> {
    values(&randn(&[len], seed))
}

pub const TOL: f32 = 1e-4;

pub fn close(what: &str, got: &[f32], want: &[f32]) {
    assert_close(what, got, want, TOL, TOL);
}
