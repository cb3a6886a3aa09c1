//! Attack strength beyond one PGD objective: a set attacked with any objective (embedding
//! shift, metric loss, retrieval), made on a source model (the target itself, or for transfer
//! rows the undefended one in an experiment) and embedded by the target. The rows and the
//! worst per metric are `results::AttackRow` and `results::worst_of`.

use std::time::Instant;

use crate::config::{Objective, PgdConfig};
use crate::dml::loss::ProxyAnchorConfig;
use crate::engine::{no_grad, Rng, Tensor};
use crate::error::Result;
use crate::nn::EmbeddingNet;
use crate::pipeline::evaluate::{eval_fns, frozen_views, per_image_linf, EvalContext};
use crate::pipeline::progress::Progress;
use crate::robust::attack::{attack, EmbedFn, Goal};
use crate::robust::objectives::{retrieval_directions, CentroidProxies};

/// The model an attack differentiates: its nets, their clean embeddings of the whole set
/// (the metric loss's proxies and the retrieval gallery come from them) and its loss.
pub struct AttackSource<'a> {
    pub nets: &'a [&'a EmbeddingNet],
    pub clean: &'a [Vec<f32>],
    pub loss: ProxyAnchorConfig,
}

/// The targets' embeddings of the attacked set, one matrix per target net.
pub struct AttackedSet {
    pub attacked: Vec<Vec<f32>>,
    /// The mean and the largest per-image max |x_adv - x|.
    pub linf: (f32, f32),
    pub seconds: f64,
}

/// Attacks every image of the context's set with `cfg` (its objective and attack kind) on
/// `source` and embeds the adversarial inputs with the context's nets (eval-mode BatchNorm). Each batch's random stream is
/// seeded as `embed_set`'s, so an embedding-shift attack with the targets as source gives the
/// same inputs as `embed_set`'s attack.
pub fn attack_set(
    ctx: &EvalContext,
    source: &AttackSource,
    cfg: &PgdConfig,
    seed: u64,
) -> Result<AttackedSet> {
    let (set, device) = (ctx.set, ctx.device);
    let start = Instant::now();
    let loader = ctx.loader()?;
    let (target_views, source_views) = (ctx.frozen()?, frozen_views(source.nets, device)?);
    let (target_fns, source_fns) = (eval_fns(&target_views), eval_fns(&source_views));
    let members: Vec<EmbedFn> = source_fns.iter().map(|f| f.as_ref() as EmbedFn).collect();
    let dim = source.nets[0].embedding_dim;
    let proxies: Vec<(CentroidProxies, Tensor)> = match cfg.objective {
        Objective::MetricLoss => source
            .clean
            .iter()
            .map(|emb| {
                let p = CentroidProxies::of(emb, &set.labels, dim);
                let t = Tensor::from_vec(p.matrix.clone(), &[p.classes.len(), dim], device)?;
                Ok((p, t))
            })
            .collect::<Result<_>>()?,
        _ => Vec::new(),
    };
    let mut attacked = vec![Vec::with_capacity(set.samples.len() * dim); ctx.nets.len()];
    let mut linf = Vec::with_capacity(set.samples.len());
    let bar = Progress::new(
        format!(
            "{}-{} ({}) at eps {:.1}/255",
            cfg.kind.key(),
            cfg.steps,
            cfg.objective.key(),
            cfg.eps * 255.0
        ),
        set.samples.len() as u64,
        "img",
        false,
    );
    for batch in loader.epoch(0) {
        let x = batch.images_tensor(device)?;
        let rows = &batch.indices;
        let labels: Vec<usize> = rows.iter().map(|&i| set.labels[i]).collect();
        let proxy_rows = proxies
            .first()
            .map(|(p, _)| p.rows_of(&labels))
            .unwrap_or_default();
        let goal = match cfg.objective {
            Objective::EmbeddingShift => Goal::EmbeddingShift,
            Objective::MetricLoss => Goal::MetricLoss {
                proxies: proxies.iter().map(|(_, t)| t).collect(),
                labels: &proxy_rows,
                loss: source.loss,
            },
            Objective::Retrieval => Goal::Retrieval {
                directions: source
                    .clean
                    .iter()
                    .map(|g| {
                        let d = retrieval_directions(g, &set.labels, dim, rows);
                        Tensor::from_vec(d, &[rows.len(), dim], device)
                    })
                    .collect::<crate::engine::Result<_>>()?,
            },
        };
        let mut rng = Rng::new(seed ^ batch.batch_index as u64);
        let adv = attack(&members, &x, cfg, &goal, &mut rng)?;
        linf.extend(per_image_linf(&x, &adv)?);
        for (out, f) in attacked.iter_mut().zip(&target_fns) {
            out.extend(no_grad(|| f(&adv))?.to_vec()?);
        }
        bar.inc(rows.len() as u64);
    }
    bar.finish("");
    let mean = linf.iter().map(|&v| v as f64).sum::<f64>() / linf.len().max(1) as f64;
    Ok(AttackedSet {
        attacked,
        linf: (mean as f32, linf.iter().copied().fold(0.0, f32::max)),
        seconds: start.elapsed().as_secs_f64(),
    })
}
