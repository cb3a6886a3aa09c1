//! The ranking-attack suite (docs/DESIGN.md, "The ranking-attack suite and ERS") run on a trained
//! model: the database is the clean embeddings of the whole evaluation set; the attacked queries
//! are a subset spread evenly over it (all of it with `queries` 0). An ensemble is attacked and
//! ranked through its mean embedding (the differentiable ensemble, L2-normalised).
//!
//! Beside each attack's scores the report gives the same scores under uniform +-eps sign noise
//! (the reference every attack must beat), the PGD parameters, and the wall time per attack.

use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::config::{AttackChannels, GtmTarget, RankProfile};
use crate::engine::ops::elementwise::add;
use crate::engine::ops::normalize::l2_normalize;
use crate::engine::{Rng, Tensor};
use crate::error::Result;
use crate::nn::embedding::L2_EPS;
use crate::nn::ForwardMode;
use crate::pipeline::evaluate::{embed_set, spread_indices, EvalContext};
use crate::pipeline::progress::Progress;
use crate::pipeline::results::{AttackTiming, RankingReport};
use crate::robust::ensemble::mean_embedding;
use crate::robust::ranking::{
    attack_batch, Database, Perturbation, RankAttack, RankBatch, RankPgd, RankScores,
};

/// Which suite to run, and on how many queries.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct RankingPlan {
    pub profile: RankProfile,
    /// Attacked test images, spread over the set (0 = all of them).
    pub queries: usize,
    /// GTM's target: the stated one, or robrank's coded one (for comparing with its tables).
    #[serde(default, skip_serializing_if = "is_nearest")]
    pub gtm: GtmTarget,
    /// What the suite's attacks may change in a grey image given as three equal channels.
    #[serde(default, skip_serializing_if = "AttackChannels::is_independent")]
    pub channels: AttackChannels,
}

fn is_nearest(gtm: &GtmTarget) -> bool {
    *gtm == GtmTarget::Nearest
}

/// Runs every attack of the suite on the context's nets (one model, or an ensemble's members).
pub fn run_ranking_suite(
    ctx: &EvalContext,
    plan: &RankingPlan,
    seed: u64,
) -> Result<RankingReport> {
    let (set, device) = (ctx.set, ctx.device);
    let start = Instant::now();
    let (eps, alpha, steps) = plan.profile.params();
    let pgd = RankPgd {
        eps,
        alpha,
        steps,
        channels: plan.channels,
    };
    let emb = embed_set(ctx, None)?;
    let db_rows = match emb.clean.as_slice() {
        [single] => single.clone(),
        many => mean_embedding(many, emb.dim),
    };
    let db = Database::new(db_rows, set.labels.clone(), emb.dim, device)?;
    let frozen = ctx.frozen()?;
    let model = |x: &Tensor| -> crate::engine::Result<Tensor> {
        let mut sum: Option<Tensor> = None;
        for net in &frozen {
            let e = net.forward(x, ForwardMode::Eval)?;
            sum = Some(match sum {
                Some(s) => add(&s, &e)?,
                None => e,
            });
        }
        let sum = sum.ok_or_else(|| crate::engine::EngineError::Invalid {
            op: "ranking suite",
            detail: "no model to attack".into(),
        })?;
        if frozen.len() == 1 {
            Ok(sum)
        } else {
            l2_normalize(&sum, 1, L2_EPS)
        }
    };
    let picks = match plan.queries {
        0 => (0..set.samples.len()).collect(),
        q => spread_indices(set.samples.len(), q),
    };
    let sub = set.subset(&picks);
    let loader = ctx.on(&sub).loader()?;
    let attacks = RankAttack::suite(plan.gtm);
    let mut sums = vec![(Vec::<f64>::new(), Vec::<f64>::new()); attacks.len()];
    let mut timings: Vec<AttackTiming> = attacks
        .iter()
        .map(|a| AttackTiming {
            attack: a.label().into(),
            ..Default::default()
        })
        .collect();
    let mut batches = 0usize;
    // Every query takes each attack of the suite, a full PGD run: on a CPU a whole test set
    // takes hours, so show the count.
    let bar = Progress::new(
        format!(
            "ranking suite {} ({} attacks)",
            plan.profile.key(),
            attacks.len()
        ),
        picks.len() as u64,
        "queries",
        false,
    );
    for batch in loader.epoch(0) {
        let x = batch.images_tensor(device)?;
        let items: Vec<usize> = batch.indices.iter().map(|&k| picks[k]).collect();
        let rb = RankBatch {
            x: &x,
            items: &items,
        };
        for (a, &attack) in attacks.iter().enumerate() {
            let salt = ((a as u64) << 40) ^ batch.batch_index as u64;
            let t0 = Instant::now();
            let mut rng = Rng::new(seed ^ salt);
            let (v, loss) = attack_batch(
                &model,
                &rb,
                &db,
                attack,
                &pgd,
                Perturbation::Attack,
                &mut rng,
            )?;
            timings[a].seconds += t0.elapsed().as_secs_f64();
            // The noise reference draws the same targets (same seed) as the attack.
            let mut rng = Rng::new(seed ^ salt);
            let (nv, nloss) = attack_batch(
                &model,
                &rb,
                &db,
                attack,
                &pgd,
                Perturbation::Noise,
                &mut rng,
            )?;
            accumulate(&mut sums[a].0, &v);
            accumulate(&mut sums[a].1, &nv);
            timings[a].loss += loss;
            timings[a].noise_loss += nloss;
        }
        batches += 1;
        bar.inc(items.len() as u64);
    }
    let mut attacked = RankScores::default();
    let mut noise = RankScores::default();
    let per_batch =
        |v: &[f64]| -> Vec<f64> { v.iter().map(|s| s / batches.max(1) as f64).collect() };
    for (a, &attack) in attacks.iter().enumerate() {
        attacked.set(attack, &per_batch(&sums[a].0));
        noise.set(attack, &per_batch(&sums[a].1));
        timings[a].loss /= batches.max(1) as f64;
        timings[a].noise_loss /= batches.max(1) as f64;
    }
    let ers = attacked.ers();
    bar.finish(&format!("ERS {ers:.1}"));
    Ok(RankingReport {
        profile: plan.profile.key().into(),
        pgd: Some(pgd),
        queries: picks.len(),
        database: db.len(),
        gtm_target: plan.gtm,
        ers,
        noise_ers: noise.ers(),
        attacked,
        noise,
        attacks: timings,
        wall_seconds: start.elapsed().as_secs_f64(),
    })
}

fn accumulate(sum: &mut Vec<f64>, values: &[f64]) {
    if sum.len() < values.len() {
        sum.resize(values.len(), 0.0);
    }
    for (s, v) in sum.iter_mut().zip(values) {
        *s += v;
    }
}
