//! PGD on embeddings (docs/DESIGN.md, "Attacks"): L-infinity, sign-gradient steps fused with
//! the projection and [0, 1] clipping in one kernel (`shaders/pgd.wgsl`), on one model or on an
//! ensemble (members' objectives summed, so their gradients are summed before the sign).

use crate::config::PgdConfig;
use crate::engine::ops::attack::pgd_step;
use crate::engine::{no_grad, Result, Rng, Tensor};

use super::channels::{check_input, step_direction};
use super::goal::{clean_embeddings, input_gradient, start_point, EmbedFn, Goal};

/// `cfg.steps` PGD steps against the ensemble `members` from clean inputs `x` (RGB in [0, 1]);
/// returns the adversarial inputs (no graph attached).
pub fn pgd(
    members: &[EmbedFn],
    x: &Tensor,
    cfg: &PgdConfig,
    goal: &Goal,
    rng: &mut Rng,
) -> Result<Tensor> {
    let x = x.detach();
    check_input(&x, cfg.channels)?;
    let clean = clean_embeddings(members, &x, goal)?;
    let mut x_adv = no_grad(|| start_point(&x, cfg, rng))?;
    for _ in 0..cfg.steps {
        let (_, g) = input_gradient(members, &x_adv, &clean, goal)?;
        let g = step_direction(&g, cfg.channels)?;
        x_adv = pgd_step(&x_adv, &g, &x, cfg.alpha, cfg.eps)?;
    }
    Ok(x_adv)
}
