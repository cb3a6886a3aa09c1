//! PGD (or APGD) with restarts: R runs from uniform random starts in the eps-ball; per image
//! the run with the largest objective is kept. The embedding-shift and retrieval objectives
//! are sums over images, so the choice is per image; the metric loss couples the batch (Proxy
//! Anchor's terms mix samples), so there the whole run with the largest loss is kept.

use crate::engine::{Result, Rng, Tensor};

use super::goal::{per_image_objective, EmbedFn, Goal};

/// The adversarial inputs of the best of `restarts` runs of `run` (one attack from a random
/// start, drawing from the stream it is given) and, per image, the objective the kept run
/// reached (the batch's loss, repeated, for the metric loss).
pub fn best_of_runs(
    members: &[EmbedFn],
    x: &Tensor,
    goal: &Goal,
    restarts: usize,
    rng: &mut Rng,
    mut run: impl FnMut(&mut Rng) -> Result<Tensor>,
) -> Result<(Tensor, Vec<f32>)> {
    let rows = x.shape().first().copied().unwrap_or(0);
    let row_len = x.numel() / rows.max(1);
    let mut best: Option<(Vec<f32>, Vec<f32>)> = None;
    for _ in 0..restarts.max(1) {
        let adv = run(rng)?;
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
