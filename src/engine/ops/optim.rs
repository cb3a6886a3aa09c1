//! AdamW (decoupled weight decay, per-parameter-group learning rate) as one WGSL kernel per
//! parameter tensor, with a CPU twin, and global-norm gradient clipping.
//! GPU: `shaders/adamw.wgsl`.

use crate::engine::cpu;
use crate::engine::error::{invalid, shape_err, Result};
use crate::engine::gpu::{groups_for, to_u32, Kernel};
use crate::engine::launch::{by_device, Launch};
use crate::engine::ops::elementwise::{unary_raw, Unary};
use crate::engine::ops::reduce::sum_squares_raw;
use crate::engine::tensor::Tensor;
use crate::{kernel, kernel_params};

const ADAMW: Kernel = kernel!(
    "adamw.wgsl",
    "adamw",
    [ReadWrite, Read, ReadWrite, ReadWrite]
);

kernel_params! {
    pub struct AdamwParams for ["adamw.wgsl"] {
        n: u32,
        lr: f32,
        beta1: f32,
        beta2: f32,
        eps: f32,
        weight_decay: f32,
        /// lr / (1 - beta1^t)
        step_size: f32,
        /// sqrt(1 - beta2^t)
        bc2_sqrt: f32,
    }
}

/// Hyper-parameters of one AdamW step for one parameter tensor.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWStep {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// 1-based step count, for bias correction.
    pub step: u32,
}

/// Updates `param`, and the moments `m`, `v`, in place from `grad` (PyTorch's AdamW:
/// p -= lr * wd * p; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
/// p -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)).
/// Not recorded; every tensor sharing the storage of `param`, `m` or `v` sees the update.
pub fn adamw_step(
    param: &Tensor,
    grad: &Tensor,
    m: &Tensor,
    v: &Tensor,
    h: AdamWStep,
) -> Result<()> {
    if h.step == 0 {
        return invalid(
            "adamw_step",
            "step counts from 1 (bias correction divides by 1 - beta^step)",
        );
    }
    for (name, t) in [("grad", grad), ("m", m), ("v", v)] {
        if t.shape() != param.shape() {
            return shape_err(
                "adamw_step",
                format!(
                    "{name} of shape {:?} for a parameter of shape {:?}",
                    t.shape(),
                    param.shape()
                ),
            );
        }
    }
    // PyTorch computes the bias corrections in double precision on the host.
    let bc1 = 1.0 - (h.beta1 as f64).powi(h.step as i32);
    let bc2 = 1.0 - (h.beta2 as f64).powi(h.step as i32);
    let step_size = (h.lr as f64 / bc1) as f32;
    let bc2_sqrt = bc2.sqrt() as f32;
    // Separate storage: one lock (CPU) or binding (GPU) per tensor, written or read.
    let all = [param, grad, m, v];
    for (i, a) in all.iter().enumerate() {
        if all[i + 1..].iter().any(|b| a.shares_storage(b)) {
            return invalid("adamw_step", "param, grad, m and v must not share storage");
        }
    }
    // In place: no outputs.
    let [] = Launch::new("adamw_step", &all).run(
        [],
        || {
            use rayon::prelude::*;
            let g = grad.cpu()?;
            let (mut p, mut mv, mut vv) = (param.cpu_mut()?, m.cpu_mut()?, v.cpu_mut()?);
            // Element by element, so the chunks over cores change no result.
            let chunk = cpu::FLAT_CHUNK;
            p.par_chunks_mut(chunk)
                .zip(mv.par_chunks_mut(chunk))
                .zip(vv.par_chunks_mut(chunk))
                .zip(g.par_chunks(chunk))
                .for_each(|(((p, mv), vv), g)| {
                    for i in 0..p.len() {
                        p[i] *= 1.0 - h.lr * h.weight_decay;
                        mv[i] += (1.0 - h.beta1) * (g[i] - mv[i]);
                        vv[i] = vv[i] * h.beta2 + (1.0 - h.beta2) * g[i] * g[i];
                        let denom = vv[i].sqrt() / bc2_sqrt + h.eps;
                        p[i] -= step_size * (mv[i] / denom);
                    }
                });
            Ok([])
        },
        |call| {
            let n = param.numel();
            let params = AdamwParams {
                n: to_u32(n)?,
                lr: h.lr,
                beta1: h.beta1,
                beta2: h.beta2,
                eps: h.eps,
                weight_decay: h.weight_decay,
                step_size,
                bc2_sqrt,
            };
            let bufs = [
                call.input(0)?,
                call.input(1)?,
                call.input(2)?,
                call.input(3)?,
            ];
            call.ctx
                .dispatch(&ADAMW, &params, &bufs, groups_for(n, 256)?)
        },
    )?;
    Ok(())
}

/// Global L2 norm of all `grads` together (one readback on the GPU).
fn global_norm(grads: &[Tensor]) -> Result<f32> {
    let inputs: Vec<&Tensor> = grads.iter().collect();
    let partials: Vec<Tensor> = grads.iter().map(sum_squares_raw).collect::<Result<_>>()?;
    let squares: Vec<f32> = by_device(
        "clip_grad_norm",
        &inputs,
        || partials.iter().map(|t| t.item()).collect(),
        |ctx| {
            // Gather the per-tensor sums into one buffer so the host waits only once.
            let all = ctx.alloc(partials.len())?;
            for (i, t) in partials.iter().enumerate() {
                ctx.copy(t.gpu()?, 0, &all, i, 1);
            }
            ctx.download(&all)
        },
    )?;
    Ok(squares.iter().map(|&s| s as f64).sum::<f64>().sqrt() as f32)
}

/// Scales `grads` so that their global L2 norm is at most `max_norm`, like
/// `torch.nn.utils.clip_grad_norm_`: when the norm exceeds `max_norm`, every gradient is
/// multiplied by max_norm / (norm + 1e-6). Returns the (possibly) clipped gradients and the
/// norm before clipping. Not recorded.
pub fn clip_grad_norm(grads: &[Tensor], max_norm: f32) -> Result<(Vec<Tensor>, f32)> {
    if max_norm.is_nan() || max_norm <= 0.0 {
        return invalid(
            "clip_grad_norm",
            format!("max_norm must be positive, got {max_norm}"),
        );
    }
    if grads.is_empty() {
        return Ok((Vec::new(), 0.0));
    }
    let norm = global_norm(grads)?;
    let coef = max_norm / (norm + 1e-6);
    if coef >= 1.0 {
        return Ok((grads.iter().map(Tensor::detach).collect(), norm));
    }
    let clipped = grads
        .iter()
        .map(|g| unary_raw(g, Unary::Affine(coef, 0.0)))
        .collect::<Result<_>>()?;
    Ok((clipped, norm))
}
