//! robrank's training attacks and the losses of its ACT and HM defenses (docs/DESIGN.md,
//! "robrank's defenses"), as `robrank/defenses/pnp.py` and `robrank/defenses/amd.py` define
//! them for the triplet loss `ptripletN`. EST, the third, is AT with the triplet loss and needs
//! nothing here.
//!
//! Both attacks start from the clean images (no random start) and descend their objective:
//! x <- clip_[0,1](clip_{x0 +- eps}(x - alpha sign(grad))), alpha = eps for a single step (FGSM),
//! as robrank's loops (`pncollapse`, `HardnessManipulate`).

use std::cell::Cell;

use crate::config::{PgdConfig, HM_FLAT, HM_ICS_LAMBDA};
use crate::dml::triplet::{
    mine_random, mine_softhard, pairwise_distance, select_rows, triplet_margin_loss, Triplets,
};
use crate::engine::ops::attack::pgd_step;
use crate::engine::ops::elementwise::{add, affine, axpby, relu, scale, square, sub};
use crate::engine::ops::normalize::l2_normalize;
use crate::engine::ops::reduce::mean;
use crate::engine::{no_grad, EngineError, Result, Rng, Tensor};

use super::attack::channels::{check_input, step_direction};
use super::attack::EmbedFn;

const NORMALIZE_EPS: f32 = 1e-12;

/// What one ACT or HM step needs.
pub struct TripletStep<'a> {
    /// The member being trained, in its training mode.
    pub member: EmbedFn<'a>,
    /// The models the attack runs on, as it sees them (no parameter gradients, evaluation
    /// BatchNorm): the member alone (ACT, HM), or every member of an ensemble (EAT with ACT or
    /// HM inside), whose objectives are summed as EAT's eq. 10.
    pub attacked: &'a [EmbedFn<'a>],
    pub attack: &'a PgdConfig,
    pub margin: f32,
}

fn normalized(f: EmbedFn, x: &Tensor) -> Result<Tensor> {
    l2_normalize(&f(x)?, 1, NORMALIZE_EPS)
}

/// `objective` of each model's normalised embeddings of `x`, summed over the models: one model's
/// objective as it is, an ensemble's as EAT's eq. 10.
fn summed(
    models: &[EmbedFn],
    x: &Tensor,
    objective: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let mut total: Option<Tensor> = None;
    for &f in models {
        let term = objective(&normalized(f, x)?)?;
        total = Some(match total {
            Some(t) => add(&t, &term)?,
            None => term,
        });
    }
    total.ok_or_else(|| EngineError::Invalid {
        op: "robrank attack",
        detail: "no model to attack".into(),
    })
}

/// The clean embeddings triplets are mined on, not recorded: the model's own, or an ensemble's
/// members' side by side [B, M x D], so that squared distances add up over the members.
fn mining_embeddings(models: &[EmbedFn], x: &Tensor) -> Result<Tensor> {
    let x = x.detach();
    if let [one] = models {
        return no_grad(|| one(&x));
    }
    let mut rows: Vec<Vec<f32>> = Vec::new();
    let mut width = 0;
    for &f in models {
        let e = no_grad(|| f(&x))?;
        width += e.dims2("triplet miner")?.1;
        rows.push(e.to_vec()?);
    }
    let b = x.shape()[0];
    let mut side = Vec::with_capacity(b * width);
    for r in 0..b {
        for m in &rows {
            let d = m.len() / b;
            side.extend_from_slice(&m[r * d..(r + 1) * d]);
        }
    }
    Tensor::from_vec(side, &[b, width], &x.device())
}

/// Rows `part * len .. (part + 1) * len` of `t`, recorded.
fn part(t: &Tensor, part: usize, len: usize) -> Result<Tensor> {
    let idx: Vec<usize> = (part * len..(part + 1) * len).collect();
    select_rows(t, &idx)
}

/// robrank's PGD for its training attacks: `cfg.steps` descent steps on `objective` from `x0`
/// itself; with `stop_when_flat`, it stops after the step at which the objective moved by less
/// than [`HM_FLAT`] (HM's saturation stop). Returns the adversarial inputs, no graph attached.
pub fn descend(
    x0: &Tensor,
    cfg: &PgdConfig,
    stop_when_flat: bool,
    objective: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let x0 = x0.detach();
    check_input(&x0, cfg.channels)?;
    let alpha = if cfg.steps > 1 { cfg.alpha } else { cfg.eps };
    let mut x = x0.clone();
    // robrank's `state_for_saturate_stop`.
    let mut last = -1.0f32;
    for _ in 0..cfg.steps {
        let var = x.var();
        let value = objective(&var)?;
        let v = value.item()?;
        let grads = value.backward()?;
        // An objective that does not reach the input has a zero gradient: nothing moves.
        let Some(g) = grads.get(&var) else { break };
        let down = no_grad(|| scale(&step_direction(&g.detach(), cfg.channels)?, -1.0))?;
        x = pgd_step(&x, &down, &x0, alpha, cfg.eps)?;
        if stop_when_flat {
            if (last - v).abs() < HM_FLAT {
                break;
            }
            last = v;
        }
    }
    Ok(x)
}

/// The images of rows `idx` of the batch `x`, not recorded.
fn images(x: &Tensor, idx: &[usize]) -> Result<Tensor> {
    no_grad(|| select_rows(&x.detach(), idx))
}

/// ACT's attack (`PositiveNegativePerplexing.pncollapse`): the positives and negatives of `t`,
/// stacked [p; n], moved to bring each positive's embedding towards its negative's
/// (minimising the mean of d(F(p), F(n)) on normalised embeddings, summed over `attacked`).
pub fn pn_collapse(
    attacked: &[EmbedFn],
    x: &Tensor,
    t: &Triplets,
    cfg: &PgdConfig,
) -> Result<Tensor> {
    let n = t.len();
    let pn = images(x, &[t.positives.clone(), t.negatives.clone()].concat())?;
    descend(&pn, cfg, false, |xa| {
        summed(attacked, xa, |e| {
            mean(&pairwise_distance(&part(e, 0, n)?, &part(e, 1, n)?)?)
        })
    })
}

/// ACT's loss (`pnp_training_step`): random SPC-2 triplets, [`pn_collapse`] on their
/// positives and negatives, then the triplet loss of the clean anchors against the
/// adversarial positives and negatives.
pub fn act_loss(s: &TripletStep, x: &Tensor, labels: &[usize], rng: &mut Rng) -> Result<Tensor> {
    let t = mine_random(labels, rng)?;
    let pn = pn_collapse(s.attacked, x, &t, s.attack)?;
    let pn_emb = normalized(s.member, &pn)?;
    let anchors = normalized(s.member, &images(x, &t.anchors)?)?;
    let n = t.len();
    triplet_margin_loss(
        &anchors,
        &part(&pn_emb, 0, n)?,
        &part(&pn_emb, 1, n)?,
        s.margin,
    )
}

/// HM's attack (`MadryInnerMax.HardnessManipulate`, method ET): the anchors, positives and
/// negatives of `t`, stacked [a; p; n], moved until every triplet's hardness
/// H = d(a, p) - d(a, n) reaches `target`: it minimises mean(min(H - target, 0)^2), and stops
/// once that stops moving. The objective is summed over `attacked`.
pub fn hardness_manipulation(
    attacked: &[EmbedFn],
    x: &Tensor,
    t: &Triplets,
    target: f32,
    cfg: &PgdConfig,
) -> Result<Tensor> {
    let n = t.len();
    let idx = [t.anchors.clone(), t.positives.clone(), t.negatives.clone()].concat();
    descend(&images(x, &idx)?, cfg, true, |xa| {
        summed(attacked, xa, |e| {
            let a = part(e, 0, n)?;
            let hardness = sub(
                &pairwise_distance(&a, &part(e, 1, n)?)?,
                &pairwise_distance(&a, &part(e, 2, n)?)?,
            )?;
            // min(H - target, 0)^2 = relu(target - H)^2.
            mean(&square(&relu(&affine(&hardness, -1.0, target)?)?)?)
        })
    })
}

/// LGA's target hardness (robrank's `_G = 4` branch, "pure GA"): -margin * min(max(l, 0),
/// margin) / margin, where l is the member's adversarial triplet loss at its previous step.
/// A model that still fails on hard triplets (l at or above the margin) gets semi-hard ones
/// (H = -margin); as it learns, the target rises towards 0.
pub fn lga_target(previous_loss: f32, margin: f32) -> f32 {
    if margin <= 0.0 {
        return 0.0;
    }
    -margin * previous_loss.clamp(0.0, margin) / margin
}

/// HM's loss (`hm_training_step`, robrank's `ghmetsm`, `ghmetsmi` with `ics`): soft-hard SPC-2
/// triplets mined on the clean embeddings (of every attacked model, side by side), [`hardness_manipulation`] towards LGA's target,
/// the triplet loss on the adversarial triplets; with ICS, plus 0.5 x the triplet loss of
/// (clean anchor, adversarial anchor, clean positive) with margin 0. `previous_loss` is LGA's
/// memory: read for the target, then set to this step's adversarial triplet loss.
pub fn hm_loss(
    s: &TripletStep,
    x: &Tensor,
    labels: &[usize],
    ics: bool,
    previous_loss: &Cell<f32>,
    rng: &mut Rng,
) -> Result<Tensor> {
    let t = mine_softhard(&mining_embeddings(s.attacked, x)?, labels, rng)?;
    let target = lga_target(previous_loss.get(), s.margin);
    let adv = hardness_manipulation(s.attacked, x, &t, target, s.attack)?;
    let n = t.len();
    let clean_ap = match ics {
        true => Some(normalized(
            s.member,
            &images(x, &[t.anchors.clone(), t.positives.clone()].concat())?,
        )?),
        false => None,
    };
    let e = normalized(s.member, &adv)?;
    let adv_anchors = part(&e, 0, n)?;
    let loss = triplet_margin_loss(&adv_anchors, &part(&e, 1, n)?, &part(&e, 2, n)?, s.margin)?;
    previous_loss.set(loss.item()?);
    let Some(ap) = clean_ap else {
        return Ok(loss);
    };
    let structure = triplet_margin_loss(&part(&ap, 0, n)?, &adv_anchors, &part(&ap, 1, n)?, 0.0)?;
    axpby(1.0, &loss, HM_ICS_LAMBDA, &structure)
}
