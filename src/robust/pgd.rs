//! PGD on embeddings (docs/DESIGN.md, Attacks): L-infinity, sign-gradient steps fused with the
//! projection and [0, 1] clipping in one kernel (`shaders/pgd.wgsl`), on one model or on an
//! ensemble (members' objectives summed, so their gradients are summed before the sign).

use crate::config::{Objective, PgdConfig, PGD_START_NOISE};
use crate::dml::loss::{proxy_anchor_loss, ProxyAnchorConfig};
use crate::engine::ops::attack::pgd_step;
use crate::engine::ops::elementwise::square;
use crate::engine::ops::elementwise::{add, clamp, sub};
use crate::engine::ops::reduce::sum;
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
}

impl Goal<'_> {
    pub fn objective(&self) -> Objective {
        match self {
            Goal::EmbeddingShift => Objective::EmbeddingShift,
            Goal::MetricLoss { .. } => Objective::MetricLoss,
        }
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

/// The summed objective of every member at `x_adv`.
fn objective(members: &[EmbedFn], x_adv: &Tensor, clean: &[Tensor], goal: &Goal) -> Result<Tensor> {
    let mut total: Option<Tensor> = None;
    for (i, member) in members.iter().enumerate() {
        let emb = member(x_adv)?;
        let term = match goal {
            Goal::EmbeddingShift => sum(&square(&sub(&emb, &clean[i])?)?)?,
            Goal::MetricLoss {
                proxies,
                labels,
                loss,
            } => proxy_anchor_loss(&emb, proxies[i], labels, loss.alpha, loss.delta)?,
        };
        total = Some(match total {
            Some(t) => add(&t, &term)?,
            None => term,
        });
    }
    total.ok_or_else(|| EngineError::Autograd("PGD needs at least one model".into()))
}

/// Runs PGD against the ensemble `members` from clean inputs `x` (RGB in [0, 1]); returns the
/// adversarial inputs (no graph attached). At eps = 0 it returns x unchanged.
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
    let x = x.detach();
    let clean: Vec<Tensor> = match goal {
        Goal::EmbeddingShift => no_grad(|| {
            members
                .iter()
                .map(|m| m(&x).map(|e| e.detach()))
                .collect::<Result<_>>()
        })?,
        Goal::MetricLoss { .. } => Vec::new(),
    };
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
        let clean: Vec<Tensor> = match goal {
            Goal::EmbeddingShift => members.iter().map(|m| m(x)).collect::<Result<_>>()?,
            Goal::MetricLoss { .. } => Vec::new(),
        };
        objective(members, x_adv, &clean, goal)?.item()
    })
}
