//! PGD with restarts: R runs from uniform random starts in the eps-ball; per image the run
//! with the largest objective is kept. The embedding-shift objective is a sum over images, so
//! the choice is per image; the metric loss couples the batch (Proxy Anchor's terms mix
//! samples), so there the whole run with the largest loss is kept.

use crate::config::PgdConfig;
use crate::engine::{no_grad, Result, Rng, Tensor};
use crate::robust::pgd::{objective_value, pgd, EmbedFn, Goal};

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

/// Per image, the objective at `x_adv`: the squared embedding shift summed over members, or
/// (metric loss) the batch's loss for every image.
pub fn per_image_objective(
    members: &[EmbedFn],
    x: &Tensor,
    x_adv: &Tensor,
    goal: &Goal,
) -> Result<Vec<f32>> {
    let rows = x.shape().first().copied().unwrap_or(0);
    match goal {
        Goal::EmbeddingShift => no_grad(|| {
            let mut out = vec![0.0f32; rows];
            for m in members {
                let (clean, adv) = (m(x)?.to_vec()?, m(x_adv)?.to_vec()?);
                let dim = clean.len() / rows.max(1);
                for (i, o) in out.iter_mut().enumerate() {
                    let (c, a) = (&clean[i * dim..(i + 1) * dim], &adv[i * dim..(i + 1) * dim]);
                    *o += c.iter().zip(a).map(|(c, a)| (a - c) * (a - c)).sum::<f32>();
                }
            }
            Ok(out)
        }),
        Goal::MetricLoss { .. } => Ok(vec![objective_value(members, x, x_adv, goal)?; rows]),
    }
}
