//! The ranking-attack suite (SPEC section 11) run on a trained model: the database is the
//! clean embeddings of the whole evaluation set; the attacked queries are a subset spread
//! evenly over it (all of it with `queries` 0). An ensemble is attacked and ranked through
//! its mean embedding (the differentiable ensemble, L2-normalised).
//!
//! Beside each attack's scores the report gives the same scores under uniform +-eps sign noise
//! (the reference every attack must beat), the PGD parameters, and the wall time per attack.

use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::config::RankProfile;
use crate::data::loader::{BatchLoader, LoaderConfig};
use crate::engine::ops::elementwise::add;
use crate::engine::ops::normalize::l2_normalize;
use crate::engine::{Device, Rng, Tensor};
use crate::error::Result;
use crate::nn::embedding::L2_EPS;
use crate::nn::{EmbeddingNet, ForwardMode};
use crate::pipeline::evaluate::{embed_set, spread_indices, EvalSet};
use crate::pipeline::report::{html_escape, MethodReport};
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
}

/// The suite's results for one model.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RankingReport {
    pub profile: String,
    pub pgd: Option<RankPgd>,
    /// Attacked images and database size.
    pub queries: usize,
    pub database: usize,
    pub attacked: RankScores,
    pub ers: f64,
    /// The same scores under +-eps sign noise instead of the attack.
    pub noise: RankScores,
    pub noise_ers: f64,
    /// Per attack: its label, wall time in seconds and final mean loss (attack and noise).
    pub attacks: Vec<AttackTiming>,
    pub wall_seconds: f64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AttackTiming {
    pub attack: String,
    pub seconds: f64,
    pub loss: f64,
    pub noise_loss: f64,
}

/// Runs every attack of the suite on `nets` (one model, or an ensemble's members).
#[allow(clippy::too_many_arguments)]
pub fn run_ranking_suite(
    nets: &[&EmbeddingNet],
    set: &EvalSet,
    image_size: usize,
    batch_size: usize,
    workers: usize,
    device: &Device,
    plan: &RankingPlan,
    seed: u64,
) -> Result<RankingReport> {
    let start = Instant::now();
    let (eps, alpha, steps) = plan.profile.params();
    let pgd = RankPgd { eps, alpha, steps };
    let emb = embed_set(nets, set, image_size, batch_size, workers, device, None)?;
    let db_rows = match emb.clean.as_slice() {
        [single] => single.clone(),
        many => mean_embedding(many, emb.dim),
    };
    let db = Database::new(db_rows, set.labels.clone(), emb.dim, device)?;
    let frozen: Vec<EmbeddingNet> = nets
        .iter()
        .map(|n| n.frozen_view(device).map_err(Into::into))
        .collect::<Result<_>>()?;
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
    let mut lc = LoaderConfig::eval(batch_size, image_size).for_samples(&sub.samples);
    lc.workers = workers;
    let loader = BatchLoader::new(sub.samples.clone(), lc)?;
    let attacks = RankAttack::ALL;
    let mut sums = vec![(Vec::<f64>::new(), Vec::<f64>::new()); attacks.len()];
    let mut timings: Vec<AttackTiming> = attacks
        .iter()
        .map(|a| AttackTiming {
            attack: a.label().into(),
            ..Default::default()
        })
        .collect();
    let mut batches = 0usize;
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
    Ok(RankingReport {
        profile: plan.profile.key().into(),
        pgd: Some(pgd),
        queries: picks.len(),
        database: db.len(),
        ers: attacked.ers(),
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

/// The suite of one model as a Markdown table: per score, the attacked and the noise value.
pub fn ranking_markdown(label: &str, r: &RankingReport) -> String {
    let mut s = String::new();
    let p = r.pgd.unwrap_or(RankPgd {
        eps: 0.0,
        alpha: 0.0,
        steps: 0,
    });
    s += &format!(
        "#### Ranking attacks: {label} ({}: eps {:.0}/255, alpha {:.0}/255, {} steps; {} queries \
         against a database of {}; {:.1} s)\n\n",
        r.profile,
        p.eps * 255.0,
        p.alpha * 255.0,
        p.steps,
        r.queries,
        r.database,
        r.wall_seconds
    );
    s += "| score | attacked | +-eps noise | attack time (s) |\n| --- | ---: | ---: | ---: |\n";
    for (a, t) in RankAttack::ALL.iter().zip(&r.attacks) {
        for ((name, v), (_, nv)) in r.attacked.of(*a).into_iter().zip(r.noise.of(*a)) {
            s += &format!("| {name} | {v:.2} | {nv:.2} | {:.1} |\n", t.seconds);
        }
    }
    s += &format!("| **ERS** | **{:.1}** | {:.1} | |\n", r.ers, r.noise_ers);
    s
}

/// One ranking table per method that ran the suite (empty when none did).
pub fn ranking_tables(reports: &[MethodReport]) -> String {
    reports
        .iter()
        .filter_map(|r| {
            r.ranking
                .as_ref()
                .map(|k| format!("\n{}", ranking_markdown(&r.label, k)))
        })
        .collect()
}

/// The HTML section of the ranking tables (empty when no method ran the suite).
pub fn ranking_html(reports: &[MethodReport]) -> String {
    let mut h = String::new();
    for r in reports {
        let Some(k) = &r.ranking else { continue };
        h += &format!(
            "<h2>{}: ranking attacks ({}, {} queries, database {})</h2><table><tr><th>score</th>\
             <th>attacked</th><th>+-eps noise</th><th>attack time (s)</th></tr>",
            html_escape(&r.label),
            k.profile,
            k.queries,
            k.database
        );
        for (a, t) in RankAttack::ALL.iter().zip(&k.attacks) {
            for ((name, v), (_, nv)) in k.attacked.of(*a).into_iter().zip(k.noise.of(*a)) {
                h += &format!(
                    "<tr><td>{name}</td><td>{v:.2}</td><td>{nv:.2}</td><td>{:.1}</td></tr>",
                    t.seconds
                );
            }
        }
        h += &format!(
            "<tr><th>ERS</th><th>{:.1}</th><td>{:.1}</td><td></td></tr></table>",
            k.ers, k.noise_ers
        );
    }
    h
}
