//! Test support shared by unit and integration tests: the GPU-or-skip rule, closeness checks,
//! the central-difference gradient checker and the GPU-versus-CPU parity harness.

use super::error::{EngineError, Result};
use super::rng::Rng;
use super::tape::{backward_with, no_grad};
use super::tensor::Tensor;
use super::Device;

/// The GPU device, or `None` after printing that the test is skipped. With
/// `ROBUST_DML_REQUIRE_GPU=1` (set by CI) a missing adapter fails the test instead.
pub fn gpu_or_skip(test: &str) -> Option<Device> {
    match Device::gpu() {
        Ok(d) => Some(d),
        Err(e) => {
            if std::env::var("ROBUST_DML_REQUIRE_GPU").is_ok_and(|v| v == "1") {
                panic!("{test}: ROBUST_DML_REQUIRE_GPU=1 but no GPU adapter: {e}");
            }
            eprintln!("SKIPPED {test}: no GPU adapter ({e})");
            None
        }
    }
}

/// A CPU tensor of normal values, deterministic in `seed`.
pub fn randn(shape: &[usize], seed: u64) -> Tensor {
    Tensor::randn(shape, 1.0, &mut Rng::new(seed), &Device::Cpu).expect("cpu tensor")
}

/// A CPU tensor of uniform values in [lo, hi).
pub fn uniform(shape: &[usize], lo: f32, hi: f32, seed: u64) -> Tensor {
    Tensor::rand_uniform(shape, lo, hi, &mut Rng::new(seed), &Device::Cpu).expect("cpu tensor")
}

/// The largest violation of |got - want| <= atol + rtol * |want|, as a message, if any.
pub fn compare(
    got: &[f32],
    want: &[f32],
    atol: f32,
    rtol: f32,
) -> std::result::Result<f32, String> {
    if got.len() != want.len() {
        return Err(format!("lengths differ: {} vs {}", got.len(), want.len()));
    }
    let mut worst = (0usize, 0.0f32, 0.0f32);
    let mut max_abs = 0.0f32;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs();
        if !(err.is_finite() || g.is_nan() && w.is_nan()) && g != w {
            return Err(format!("element {i}: got {g}, want {w}"));
        }
        max_abs = max_abs.max(err);
        let excess = err - (atol + rtol * w.abs());
        if excess > worst.1 {
            worst = (i, excess, err);
        }
    }
    if worst.1 > 0.0 {
        let i = worst.0;
        return Err(format!(
            "element {i}: got {}, want {} (|diff| {}, atol {atol}, rtol {rtol})",
            got[i], want[i], worst.2
        ));
    }
    Ok(max_abs)
}

/// Panics with `what` and the worst element when the two slices are not close.
pub fn assert_close(what: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) {
    if let Err(e) = compare(got, want, atol, rtol) {
        panic!("{what}: {e}");
    }
}

/// Compares named tensors of a whole network (embeddings, gradients) with a tolerance scaled by
/// each tensor's largest value plus 1e-3 of the network's largest: some gradients are zero in
/// exact arithmetic (a BN bias ahead of a training-mode BN), so their values are rounding noise
/// that only the network's scale measures. Panics naming `what` and the tensor.
pub fn assert_close_network(
    what: &str,
    got: &[(String, Vec<f32>)],
    want: &[(String, Vec<f32>)],
    rel: f32,
    rtol: f32,
) {
    assert_eq!(got.len(), want.len(), "{what}: tensor counts differ");
    let max_abs = |v: &[f32]| v.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    let global = want.iter().map(|(_, c)| max_abs(c)).fold(0.0f32, f32::max);
    for ((name, g), (_, c)) in got.iter().zip(want) {
        let scale = max_abs(c) + 1e-3 * global;
        assert_close(&format!("{what} {name}"), g, c, rel * scale, rtol);
    }
}

/// Compares named tensors of a whole network by their relative L2 error, ||got - want|| /
/// ||want||, at most `tol` per tensor. For gradients through max pools, ReLU6 and a GAP+GMP head,
/// where single elements are chaotic: a different summation order flips a few masks or argmaxes,
/// and each flip moves a few elements by their whole size. The norm of a tensor moves by a few
/// percent at most (a 1e-6 relative change of the input moves MobileNetV2 x0.5's frozen-BN
/// gradients by up to 2.3%), while a wrong kernel moves it by tens of percent. Panics naming
/// `what`, the tensor and its error.
pub fn assert_close_network_l2(
    what: &str,
    got: &[(String, Vec<f32>)],
    want: &[(String, Vec<f32>)],
    tol: f32,
) {
    assert_eq!(got.len(), want.len(), "{what}: tensor counts differ");
    for ((name, g), (_, w)) in got.iter().zip(want) {
        assert_eq!(g.len(), w.len(), "{what} {name}: lengths differ");
        let err: f64 = g
            .iter()
            .zip(w)
            .map(|(a, b)| (f64::from(*a) - f64::from(*b)).powi(2))
            .sum::<f64>()
            .sqrt();
        let norm: f64 = w.iter().map(|b| f64::from(*b).powi(2)).sum::<f64>().sqrt();
        let rel = err / norm.max(1e-12);
        assert!(
            rel <= f64::from(tol),
            "{what} {name}: relative L2 error {rel:.4} > {tol} (||want|| {norm:.4e})"
        );
    }
}

/// Options of the gradient checker.
#[derive(Clone, Copy, Debug)]
pub struct GradCheck {
    pub eps: f32,
    pub atol: f32,
    pub rtol: f32,
    /// Elements probed per input (all of them when the input is smaller).
    pub max_probes: usize,
    pub seed: u64,
}

impl Default for GradCheck {
    fn default() -> Self {
        GradCheck {
            eps: 1e-2,
            atol: 2e-3,
            rtol: 2e-2,
            max_probes: 48,
            seed: 12345,
        }
    }
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

/// Checks the autograd gradients of `f` at `inputs` (CPU tensors) against central differences
/// of the scalar `sum(f(inputs) * w)`, `w` a fixed random projection, so that every output
/// element's gradient matters. Returns the largest absolute error, or a message naming the
/// input and element whose analytic and numeric derivatives disagree.
pub fn grad_check(
    f: impl Fn(&[Tensor]) -> Result<Tensor>,
    inputs: &[Tensor],
    opts: GradCheck,
) -> std::result::Result<f32, String> {
    let err = |e: EngineError| e.to_string();
    let vars: Vec<Tensor> = inputs.iter().map(|t| t.var()).collect();
    let out = f(&vars).map_err(err)?;
    let mut rng = Rng::new(opts.seed);
    let w: Vec<f32> = (0..out.numel()).map(|_| rng.normal()).collect();
    let seed = Tensor::from_vec(w.clone(), out.shape(), &out.device()).map_err(err)?;
    let grads = backward_with(out, seed).map_err(err)?;
    let mut max_err = 0.0f32;
    for (idx, (inp, var)) in inputs.iter().zip(&vars).enumerate() {
        let base = inp.to_vec().map_err(err)?;
        let analytic = match grads.get(var) {
            Some(g) => g.to_vec().map_err(err)?,
            None => vec![0.0; base.len()],
        };
        let probes: Vec<usize> = if base.len() <= opts.max_probes {
            (0..base.len()).collect()
        } else {
            (0..opts.max_probes)
                .map(|_| rng.below(base.len()))
                .collect()
        };
        for &j in &probes {
            let eval = |delta: f32| -> std::result::Result<f64, String> {
                let mut v = base.clone();
                v[j] += delta;
                let shifted = Tensor::from_vec(v, inp.shape(), &inp.device()).map_err(err)?;
                let args: Vec<Tensor> = inputs
                    .iter()
                    .enumerate()
                    .map(|(k, t)| if k == idx { shifted.clone() } else { t.clone() })
                    .collect();
                let y = no_grad(|| f(&args)).map_err(err)?;
                Ok(dot(&y.to_vec().map_err(err)?, &w))
            };
            let numeric = ((eval(opts.eps)? - eval(-opts.eps)?) / (2.0 * opts.eps as f64)) as f32;
            let a = analytic[j];
            let e = (a - numeric).abs();
            // Written so that a NaN error fails too.
            let within = e <= opts.atol + opts.rtol * numeric.abs().max(a.abs());
            if !within {
                return Err(format!(
                    "input {idx} element {j}: analytic {a}, numeric {numeric} (|diff| {e})"
                ));
            }
            max_err = max_err.max(e);
        }
    }
    Ok(max_err)
}

/// Panics unless [`grad_check`] passes.
pub fn assert_grad(
    what: &str,
    f: impl Fn(&[Tensor]) -> Result<Tensor>,
    inputs: &[Tensor],
    opts: GradCheck,
) {
    if let Err(e) = grad_check(f, inputs, opts) {
        panic!("{what}: gradient check failed: {e}");
    }
}

/// Runs `f` on the CPU inputs and on their GPU copies, then backward with the same random
/// projection on both, and compares outputs and every input gradient.
pub fn assert_parity(
    what: &str,
    gpu: &Device,
    f: impl Fn(&[Tensor]) -> Result<Tensor>,
    inputs: &[Tensor],
    atol: f32,
    rtol: f32,
) {
    let output_and_input_gradients = |dev: &Device| -> Result<(Vec<f32>, Vec<Vec<f32>>)> {
        let vars: Vec<Tensor> = inputs
            .iter()
            .map(|t| t.to_device(dev).map(|t| t.var()))
            .collect::<Result<_>>()?;
        let out = f(&vars)?;
        let y = out.to_vec()?;
        let mut rng = Rng::new(99);
        let w: Vec<f32> = (0..out.numel()).map(|_| rng.normal()).collect();
        let seed = Tensor::from_vec(w, out.shape(), dev)?;
        let grads = backward_with(out, seed)?;
        let gs = vars
            .iter()
            .map(|v| match grads.get(v) {
                Some(g) => g.to_vec(),
                None => Ok(Vec::new()),
            })
            .collect::<Result<_>>()?;
        Ok((y, gs))
    };
    let (cy, cg) =
        output_and_input_gradients(&Device::Cpu).unwrap_or_else(|e| panic!("{what} on cpu: {e}"));
    let (gy, gg) = output_and_input_gradients(gpu).unwrap_or_else(|e| panic!("{what} on gpu: {e}"));
    assert_close(&format!("{what}: forward"), &gy, &cy, atol, rtol);
    for (i, (g, c)) in gg.iter().zip(&cg).enumerate() {
        assert_close(&format!("{what}: gradient of input {i}"), g, c, atol, rtol);
    }
}
