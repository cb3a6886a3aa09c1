//! APGD (Croce and Hein 2020, "Reliable evaluation of adversarial robustness with an ensemble
//! of diverse parameter-free attacks", Algorithm 1) on any attack objective, L-infinity:
//!
//! - step size eta starts at 2 eps, one per image;
//! - z = P(x_k + eta sign(grad f(x_k))), x_{k+1} = P(x_k + a (z - x_k) + (1 - a)(x_k - x_{k-1}))
//!   with momentum a = 0.75 (the first step is z itself);
//! - at the checkpoints w_j = ceil(p_j N) (p_0 = 0, p_1 = 0.22,
//!   p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)) an image's eta is halved, and the image
//!   restarts from its best point, when fewer than rho = 75% of the steps since the last
//!   checkpoint increased its objective, or when its eta was not halved at the last checkpoint
//!   and its best objective has not improved since;
//! - the best point per image is tracked and returned.
//!
//! Everything runs on the device with existing ops: the projection P is `pgd_step` with a zero
//! gradient, per-image selections multiply by 0/1 masks built on the host. The metric loss
//! couples the batch, so its per-image value is the batch loss and the whole batch moves
//! together. N steps take N + 1 gradient evaluations (the start point is evaluated too).

use crate::config::{
    AttackChannels, PgdConfig, APGD_INITIAL_STEP, APGD_MOMENTUM, APGD_P1, APGD_P_DECAY,
    APGD_P_MIN_GAP, APGD_RHO,
};
use crate::engine::ops::attack::pgd_step;
use crate::engine::ops::elementwise::{add, axpby, mul, sign, zeros_like};
use crate::engine::{no_grad, Result, Rng, Tensor};

use super::channels::{check_input, step_direction};
use super::goal::{
    clean_embeddings, input_gradient, per_image_objective, start_point, EmbedFn, Goal,
};

/// The checkpoint iterations w_j (1 <= w_j <= steps, increasing, no repeats) of a run of
/// `steps` iterations.
pub fn checkpoints(steps: usize) -> Vec<usize> {
    let (mut before, mut p) = (0.0f64, APGD_P1);
    let mut marks = Vec::new();
    while p <= 1.0 {
        // The small offset keeps 0.7 * 10 = 7.000000000000001 at 7.
        let w = ((p * steps as f64) - 1e-9).ceil().max(1.0) as usize;
        if w <= steps && marks.last() != Some(&w) {
            marks.push(w);
        }
        let next = p + (p - before - APGD_P_DECAY).max(APGD_P_MIN_GAP);
        before = p;
        p = next;
    }
    marks
}

/// Per-image values spread over each image's elements, as a tensor shaped like `like`.
fn per_row(values: &[f32], like: &Tensor) -> Result<Tensor> {
    let row_len = like.numel() / values.len().max(1);
    let data = values
        .iter()
        .flat_map(|&v| std::iter::repeat_n(v, row_len))
        .collect();
    Tensor::from_vec(data, like.shape(), &like.device())
}

/// Per image, `a` where `take` is set, else `b` (exact: a * 1 + b * 0).
fn select(take: &[bool], a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let on: Vec<f32> = take.iter().map(|&t| if t { 1.0 } else { 0.0 }).collect();
    let off: Vec<f32> = on.iter().map(|v| 1.0 - v).collect();
    add(&mul(a, &per_row(&on, a)?)?, &mul(b, &per_row(&off, b)?)?)
}

/// The objective per image at `x_adv` and the gradient of their sum.
fn evaluate(
    members: &[EmbedFn],
    x_adv: &Tensor,
    clean: &[Tensor],
    goal: &Goal,
    channels: AttackChannels,
) -> Result<(Vec<f32>, Tensor)> {
    let rows = x_adv.shape().first().copied().unwrap_or(0);
    let (at, g) = input_gradient(members, x_adv, clean, goal)?;
    Ok((at.values(rows)?, step_direction(&g, channels)?))
}

/// Runs APGD for `cfg.steps` iterations from `start_point`; returns the best point per image
/// and its objective (the batch loss repeated, for the metric loss). `cfg.alpha` is unused.
pub fn apgd(
    members: &[EmbedFn],
    x: &Tensor,
    cfg: &PgdConfig,
    goal: &Goal,
    rng: &mut Rng,
) -> Result<(Tensor, Vec<f32>)> {
    let x = x.detach();
    if cfg.eps == 0.0 || cfg.steps == 0 {
        let value = per_image_objective(members, &x, &x, goal)?;
        return Ok((x, value));
    }
    check_input(&x, cfg.channels)?;
    let rows = x.shape().first().copied().unwrap_or(0);
    let clean = clean_embeddings(members, &x, goal)?;
    let zero = zeros_like(&x)?;
    let project = |y: &Tensor| pgd_step(y, &zero, &x, 0.0, cfg.eps);
    let mut x_cur = no_grad(|| start_point(&x, cfg, rng))?;
    let (mut f_cur, mut g_cur) = evaluate(members, &x_cur, &clean, goal, cfg.channels)?;
    let (mut best_x, mut best_f, mut best_g) = (x_cur.clone(), f_cur.clone(), g_cur.clone());
    let mut x_prev = x_cur.clone();
    let mut eta = vec![APGD_INITIAL_STEP * cfg.eps; rows];
    let mut eta_t = per_row(&eta, &x)?;
    let marks = checkpoints(cfg.steps);
    let (mut last_mark, mut increases) = (0usize, vec![0usize; rows]);
    let mut halved_last = vec![false; rows];
    let mut best_at_last_mark = best_f.clone();
    for k in 0..cfg.steps {
        let next = no_grad(|| {
            let z = project(&add(&x_cur, &mul(&sign(&g_cur)?, &eta_t)?)?)?;
            if k == 0 {
                return Ok(z);
            }
            let a = APGD_MOMENTUM;
            let blend = axpby(a, &z, 2.0 * (1.0 - a), &x_cur)?;
            project(&axpby(1.0, &blend, -(1.0 - a), &x_prev)?)
        })?;
        x_prev = std::mem::replace(&mut x_cur, next);
        let (f_new, g_new) = evaluate(members, &x_cur, &clean, goal, cfg.channels)?;
        let improved: Vec<bool> = f_new.iter().zip(&best_f).map(|(n, b)| n > b).collect();
        if improved.iter().any(|&i| i) {
            best_x = no_grad(|| select(&improved, &x_cur, &best_x))?;
            best_g = no_grad(|| select(&improved, &g_new, &best_g))?;
            for (i, _) in improved.iter().enumerate().filter(|(_, &i)| i) {
                best_f[i] = f_new[i];
            }
        }
        for (count, (n, c)) in increases.iter_mut().zip(f_new.iter().zip(&f_cur)) {
            *count += usize::from(n > c);
        }
        (f_cur, g_cur) = (f_new, g_new);
        if !marks.contains(&(k + 1)) {
            continue;
        }
        let interval = (k + 1 - last_mark) as f64;
        let halve: Vec<bool> = (0..rows)
            .map(|i| {
                let oscillating = (increases[i] as f64) < APGD_RHO * interval;
                let stalled = !halved_last[i] && best_f[i] <= best_at_last_mark[i];
                oscillating || stalled
            })
            .collect();
        if halve.iter().any(|&h| h) {
            for (e, _) in eta.iter_mut().zip(&halve).filter(|(_, &h)| h) {
                *e /= 2.0;
            }
            eta_t = per_row(&eta, &x)?;
            x_cur = no_grad(|| select(&halve, &best_x, &x_cur))?;
            g_cur = no_grad(|| select(&halve, &best_g, &g_cur))?;
            for (i, _) in halve.iter().enumerate().filter(|(_, &h)| h) {
                f_cur[i] = best_f[i];
            }
        }
        halved_last = halve;
        best_at_last_mark.clone_from(&best_f);
        increases.iter_mut().for_each(|c| *c = 0);
        last_mark = k + 1;
    }
    Ok((best_x, best_f))
}
