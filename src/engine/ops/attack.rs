//! The fused PGD update: one step along the sign of the gradient, projected onto the
//! L-infinity ball around the clean input and clipped to [0, 1] (docs/DESIGN.md, Attacks).
//! GPU: `shaders/pgd.wgsl`.

use crate::engine::cpu;
use crate::engine::error::{invalid, shape_err, Result};
use crate::engine::gpu::{groups_for, to_u32, Kernel};
use crate::engine::launch::Launch;
use crate::engine::tensor::Tensor;
use crate::{kernel, kernel_params};

const PGD: Kernel = kernel!("pgd.wgsl", "pgd_step", [Read, Read, Read, ReadWrite]);

kernel_params! {
    pub struct PgdParams for ["pgd.wgsl"] {
        n: u32,
        alpha: f32,
        eps: f32,
    }
}

/// sign with sign(0) = 0 (WGSL's convention; Rust's `signum` gives 1 for +0).
fn sign0(v: f32) -> f32 {
    if v > 0.0 {
        1.0
    } else if v < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// clamp(clamp(x_adv + alpha * sign(grad), x_orig - eps, x_orig + eps), 0, 1), not recorded.
pub fn pgd_step(
    x_adv: &Tensor,
    grad: &Tensor,
    x_orig: &Tensor,
    alpha: f32,
    eps: f32,
) -> Result<Tensor> {
    // Written so that a NaN eps is rejected too.
    if eps.is_nan() || eps < 0.0 || !alpha.is_finite() {
        return invalid(
            "pgd_step",
            format!("alpha {alpha} and eps {eps} (eps must be >= 0)"),
        );
    }
    for (name, t) in [("grad", grad), ("x_orig", x_orig)] {
        if t.shape() != x_adv.shape() {
            return shape_err(
                "pgd_step",
                format!(
                    "{name} of shape {:?} for x_adv of shape {:?}",
                    t.shape(),
                    x_adv.shape()
                ),
            );
        }
    }
    let [y] = Launch::flat("pgd_step", &[x_adv, grad, x_orig]).run(
        [x_adv.shape()],
        || {
            let (xa, g, x0) = (x_adv.cpu()?, grad.cpu()?, x_orig.cpu()?);
            let stepped = cpu::zip_map(&xa, &g, |xa, g| xa + alpha * sign0(g));
            Ok([cpu::zip_map(&stepped, &x0, |s, x0| {
                s.max(x0 - eps).min(x0 + eps).clamp(0.0, 1.0)
            })])
        },
        |call| {
            let n = call.out[0].len();
            let bufs = [call.input(0)?, call.input(1)?, call.input(2)?, &call.out[0]];
            let params = PgdParams {
                n: to_u32(n)?,
                alpha,
                eps,
            };
            call.ctx.dispatch(&PGD, &params, &bufs, groups_for(n, 256)?)
        },
    )?;
    Ok(y)
}
