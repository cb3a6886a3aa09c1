//! PGD on embeddings (docs/DESIGN.md, Attacks): L-infinity, sign-gradient steps fused with the
//! projection and [0, 1] clipping in one kernel (`shaders/pgd.wgsl`), on one model or on an
//! ensemble (members' objectives summed, so their gradients are summed before the sign).

use crate::config::{Objective, Optimizer, PgdConfig, PGD_START_NOISE};
use crate::dml::loss::{proxy_anchor_loss, ProxyAnchorConfig};
use crate::engine::ops::attack::pgd_step;
use crate::engine::ops::elementwise::square;
use crate::engine::ops::elementwise::{add, clamp, mul, sub};
use crate::engine::ops::reduce::{sum, sum_dim};
use crate::engine::{no_grad, EngineError, Result, Rng, Tensor};

/// A differentiable embedding function x [B, 3, H, W] -> [B, D] (one ensemble member, in the
/// BatchNorm mode the caller chose).
pub type EmbedFn<'a> = &'a (dyn Fn(&Tensor) -> Result<Tensor> + 'a);

/// An owned [`EmbedFn`], for lists of members built at run time.
pub type BoxedEmbedFn<'a> = Box<dyn Fn(&Tensor) -> Result<Tensor> + 'a>;

/// What the attack maximises, with the data the metric-loss objective needs.
pub enum Goal<'a> {
    EmbeddingShift,
    MetricLoss {
        /// One proxy matrix per member.
        proxies: Vec<&'a Tensor>,
        labels: &'a [usize],
        loss: ProxyAnchorConfig,
    },
    /// sum_i <F(x_adv_i), d_i>: one direction matrix [B, D] per member, each row
    /// d_i = g(n_i) - g(p_i), the clean gallery embeddings of the query's nearest other-class
    /// and nearest same-class neighbours (`robust::objectives::retrieval_directions`).
    Retrieval {
        directions: Vec<Tensor>,
    },
}

impl Goal<'_> {
    pub fn objective(&self) -> Objective {
        match self {
            Goal::EmbeddingShift => Objective::EmbeddingShift,
            Goal::MetricLoss { .. } => Objective::MetricLoss,
            Goal::Retrieval { .. } => Objective::Retrieval,
        }
    }
    /// Whether the objective is a sum of per-image terms (the metric loss couples the batch).
    pub fn per_image(&self) -> bool {
        !matches!(self, Goal::MetricLoss { .. })
    }
}

/// The starting point: uniform in the eps-ball with `random_start`, else x + 0.001 N(0, 1),
/// because the embedding-shift objective has exactly zero gradient at x itself.
pub fn start_point(x: &Tensor, cfg: &PgdConfig, rng: &mut Rng) -> Result<Tensor> {
    let device = x.device();
    let noise = if cfg.random_start {
        Tensor::rand_uniform(x.shape(), -cfg.eps, cfg.eps, rng, &device)?
    } else {
        Tensor::randn(x.shape(), PGD_START_NOISE.min(cfg.eps), rng, &device)?
    };
    clamp(&add(x, &noise)?, 0.0, 1.0)
}

/// The summed objective of every member at `x_adv`: the scalar to differentiate and, for
/// per-image objectives, its per-image terms [B] (None for the metric loss).
pub(crate) fn objective_terms(
    members: &[EmbedFn],
    x_adv: &Tensor,
    clean: &[Tensor],
    goal: &Goal,
) -> Result<(Tensor, Option<Tensor>)> {
    let mut rows: Option<Tensor> = None;
    let mut total: Option<Tensor> = None;
    for (i, member) in members.iter().enumerate() {
        let emb = member(x_adv)?;
        let per_row = match goal {
            Goal::EmbeddingShift => Some(sum_dim(&square(&sub(&emb, &clean[i])?)?, 1)?),
            Goal::Retrieval { directions } => Some(sum_dim(&mul(&emb, &directions[i])?, 1)?),
            Goal::MetricLoss {
                proxies,
                labels,
                loss,
            } => {
                let term = proxy_anchor_loss(&emb, proxies[i], labels, loss.alpha, loss.delta)?;
                total = Some(match total {
                    Some(t) => add(&t, &term)?,
                    None => term,
                });
                None
            }
        };
        if let Some(r) = per_row {
            rows = Some(match rows {
                Some(t) => add(&t, &r)?,
                None => r,
            });
        }
    }
    if let Some(r) = rows {
        return Ok((sum(&r)?, Some(r)));
    }
    let total =
        total.ok_or_else(|| EngineError::Autograd("PGD needs at least one model".into()))?;
    Ok((total, None))
}

/// The summed objective of every member at `x_adv`.
fn objective(members: &[EmbedFn], x_adv: &Tensor, clean: &[Tensor], goal: &Goal) -> Result<Tensor> {
    Ok(objective_terms(members, x_adv, clean, goal)?.0)
}

/// The members' clean embeddings of `x`, which the embedding-shift objective measures from
/// (empty for the other objectives).
pub(crate) fn clean_embeddings(
    members: &[EmbedFn],
    x: &Tensor,
    goal: &Goal,
) -> Result<Vec<Tensor>> {
    match goal {
        Goal::EmbeddingShift => no_grad(|| {
            members
                .iter()
                .map(|m| m(x).map(|e| e.detach()))
                .collect::<Result<_>>()
        }),
        _ => Ok(Vec::new()),
    }
}

/// Runs PGD against the ensemble `members` from clean inputs `x` (RGB in [0, 1]); returns the
/// adversarial inputs (no graph attached). At eps = 0 it returns x unchanged. With
/// `cfg.optimizer` APGD, runs [`crate::robust::apgd::apgd`] instead.
pub fn pgd(
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
        return crate::robust::restarts::pgd_restarts(members, x, cfg, goal, cfg.restarts, rng)
            .map(|(adv, _)| adv);
    }
    if cfg.optimizer == Optimizer::Apgd {
        return crate::robust::apgd::apgd(members, x, cfg, goal, rng).map(|(adv, _)| adv);
    }
    let x = x.detach();
    let clean = clean_embeddings(members, &x, goal)?;
    let mut x_adv = no_grad(|| start_point(&x, cfg, rng))?;
    for _ in 0..cfg.steps {
        let var = x_adv.var();
        let obj = objective(members, &var, &clean, goal)?;
        let grads = obj.backward()?;
        let g = grads.get(&var).ok_or_else(|| {
            EngineError::Autograd("the attack objective does not depend on the input".into())
        })?;
        x_adv = pgd_step(&x_adv, g, &x, cfg.alpha, cfg.eps)?;
    }
    Ok(x_adv)
}

/// The objective's value at `x_adv` (for tests and reports).
pub fn objective_value(
    members: &[EmbedFn],
    x: &Tensor,
    x_adv: &Tensor,
    goal: &Goal,
) -> Result<f32> {
    no_grad(|| {
        let clean = clean_embeddings(members, x, goal)?;
        objective(members, x_adv, &clean, goal)?.item()
    })
}
