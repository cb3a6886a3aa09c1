//! PGD (or APGD) with restarts: R runs from uniform random starts in the eps-ball; per image
//! the run with the largest objective is kept. The embedding-shift and retrieval objectives
//! are sums over images, so the choice is per image; the metric loss couples the batch (Proxy
//! Anchor's terms mix samples), so there the whole run with the largest loss is kept.

use crate::config::PgdConfig;
use crate::engine::{no_grad, Result, Rng, Tensor};
use crate::robust::pgd::{clean_embeddings, objective_terms, pgd, EmbedFn, Goal};

/// The adversarial inputs of the best of `restarts` random-start runs and, per image, the
/// objective the kept run reached (the batch's loss, repeated, for the metric loss).
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
    let rows = x.shape().first().copied().unwrap_or(0);
    let row_len = x.numel() / rows.max(1);
    let mut best: Option<(Vec<f32>, Vec<f32>)> = None;
    for _ in 0..restarts.max(1) {
        let adv = pgd(members, x, &random, goal, rng)?;
        let score = per_image_objective(members, x, &adv, goal)?;
        let adv = adv.to_vec()?;
        best = Some(match best {
            None => (adv, score),
            Some((mut keep, mut kept)) => {
                for i in 0..rows {
                    if score[i] > kept[i] {
                        kept[i] = score[i];
                        keep[i * row_len..(i + 1) * row_len]
                            .copy_from_slice(&adv[i * row_len..(i + 1) * row_len]);
                    }
                }
                (keep, kept)
            }
        });
    }
    let (adv, score) = best.unwrap_or_default();
    Ok((Tensor::from_vec(adv, x.shape(), &x.device())?, score))
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
        let (total, per_row) = objective_terms(members, x_adv, &clean, goal)?;
        match per_row {
            Some(r) => r.to_vec(),
            None => Ok(vec![total.item()?; rows]),
        }
    })
}
