//! What every attack shares (docs/DESIGN.md, "Attacks"): the goal it climbs, the members'
//! summed objective, its gradient with respect to the input, and the start point. PGD, APGD and
//! the restarts build on these and on nothing else of the attack module.

use crate::config::{Objective, PgdConfig, PGD_START_NOISE};
use crate::dml::loss::{proxy_anchor_loss, ProxyAnchorConfig};
use crate::engine::ops::elementwise::{add, clamp, mul, square, sub};
use crate::engine::ops::reduce::{sum, sum_dim};
use crate::engine::{no_grad, EngineError, Result, Rng, Tensor};

use super::channels::start_noise;

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
/// because the embedding-shift objective has exactly zero gradient at x itself; with tied
/// channels the noise is grey too.
pub fn start_point(x: &Tensor, cfg: &PgdConfig, rng: &mut Rng) -> Result<Tensor> {
    let device = x.device();
    let noise = if cfg.random_start {
        Tensor::rand_uniform(x.shape(), -cfg.eps, cfg.eps, rng, &device)?
    } else {
        Tensor::randn(x.shape(), PGD_START_NOISE.min(cfg.eps), rng, &device)?
    };
    let noise = start_noise(noise, cfg.channels)?;
    clamp(&add(x, &noise)?, 0.0, 1.0)
}

/// The summed objective of every member at one point: the scalar to differentiate and, for
/// per-image objectives, its per-image terms [B] (None for the metric loss).
pub(crate) struct ObjectiveAt {
    pub total: Tensor,
    pub per_image: Option<Tensor>,
}

impl ObjectiveAt {
    /// Per image, the objective: its own term, or (metric loss) the batch's loss for every
    /// image of the `rows`.
    pub fn values(&self, rows: usize) -> Result<Vec<f32>> {
        match &self.per_image {
            Some(r) => r.to_vec(),
            None => Ok(vec![self.total.item()?; rows]),
        }
    }
}

/// The summed objective of every member at `x_adv`, measured from the members' `clean`
/// embeddings (see [`clean_embeddings`]).
pub(crate) fn objective_terms(
    members: &[EmbedFn],
    x_adv: &Tensor,
    clean: &[Tensor],
    goal: &Goal,
) -> Result<ObjectiveAt> {
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
        return Ok(ObjectiveAt {
            total: sum(&r)?,
            per_image: Some(r),
        });
    }
    let total =
        total.ok_or_else(|| EngineError::Autograd("PGD needs at least one model".into()))?;
    Ok(ObjectiveAt {
        total,
        per_image: None,
    })
}

/// The objective at `x_adv` and its gradient with respect to `x_adv` (no graph attached): the
/// one backward pass every attack step takes.
pub(crate) fn input_gradient(
    members: &[EmbedFn],
    x_adv: &Tensor,
    clean: &[Tensor],
    goal: &Goal,
) -> Result<(ObjectiveAt, Tensor)> {
    let var = x_adv.var();
    let at = objective_terms(members, &var, clean, goal)?;
    // The per-image terms stay readable after the pass (APGD reads them).
    let grads = at.total.clone().backward()?;
    let g = grads.get(&var).ok_or_else(|| {
        EngineError::Autograd("the attack objective does not depend on the input".into())
    })?;
    Ok((at, g.detach()))
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

/// Per image, the objective at `x_adv`: the member-summed per-image term (embedding shift,
/// retrieval), or (metric loss) the batch's loss for every image.
pub fn per_image_objective(
    members: &[EmbedFn],
    x: &Tensor,
    x_adv: &Tensor,
    goal: &Goal,
) -> Result<Vec<f32>> {
    let rows = x.shape().first().copied().unwrap_or(0);
    no_grad(|| {
        let clean = clean_embeddings(members, x, goal)?;
        objective_terms(members, x_adv, &clean, goal)?.values(rows)
    })
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
        objective_terms(members, x_adv, &clean, goal)?.total.item()
    })
}
