//! Attacks on embeddings (docs/DESIGN.md, "Attacks"): which optimizer climbs the objective,
//! and how many times. The goal, the objective, its input gradient and the start point live in
//! [`goal`]; [`pgd`], [`apgd`] and [`restarts`] build on it alone, and only this file
//! chooses between them.

pub mod apgd;
pub mod channels;
pub mod goal;
pub mod pgd;
pub mod restarts;

pub use goal::{objective_value, per_image_objective, start_point, BoxedEmbedFn, EmbedFn, Goal};

use crate::config::{AttackKind, PgdConfig};
use crate::engine::{Result, Rng, Tensor};

/// Attacks the ensemble `members` from clean inputs `x` (RGB in [0, 1]) as `cfg` says: PGD or
/// APGD, best of `cfg.restarts` random starts when above one. Returns the adversarial inputs
/// (no graph attached); at eps = 0 or zero steps, x unchanged.
pub fn attack(
    members: &[EmbedFn],
    x: &Tensor,
    cfg: &PgdConfig,
    goal: &Goal,
    rng: &mut Rng,
) -> Result<Tensor> {
    if cfg.eps == 0.0 || cfg.steps == 0 {
        return Ok(x.detach());
    }
    if cfg.restarts > 1 {
        return pgd_restarts(members, x, cfg, goal, cfg.restarts, rng).map(|(adv, _)| adv);
    }
    match cfg.kind {
        AttackKind::Pgd => pgd::pgd(members, x, cfg, goal, rng),
        AttackKind::Apgd => apgd::apgd(members, x, cfg, goal, rng).map(|(adv, _)| adv),
    }
}

/// The adversarial inputs of the best of `restarts` runs of `cfg`'s attack from uniform random
/// starts and, per image, the objective the kept run reached (the batch's loss, repeated, for
/// the metric loss).
pub fn pgd_restarts(
    members: &[EmbedFn],
    x: &Tensor,
    cfg: &PgdConfig,
    goal: &Goal,
    restarts: usize,
    rng: &mut Rng,
) -> Result<(Tensor, Vec<f32>)> {
    let random = PgdConfig {
        random_start: true,
        restarts: 1,
        ..*cfg
    };
    restarts::best_of_runs(members, x, goal, restarts, rng, |rng| {
        attack(members, x, &random, goal, rng)
    })
}
