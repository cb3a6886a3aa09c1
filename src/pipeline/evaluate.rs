//! Evaluation of trained models, clean and under attack: embeddings of the test set (attacked
//! on the fly, batch by batch), Recall@k and MAP@R through the device's neighbour search,
//! k-means NMI and F1; both attack scenarios from one attack pass.
//!
//! [`EvalContext`] is what every evaluation shares (the nets, the set, how it is fed); the
//! metric helpers (one model or an ensemble by voting, both scenarios of an attacked pass, the
//! 2-D projection) are here for every producer of `results` to use.

use crate::config::PgdConfig;
use crate::data::loader::{BatchLoader, LoaderConfig};
use crate::data::{Dataset, Sample};
use crate::dml::eval::{map_at_r, max_r, nearest_neighbors, recall_at_k, Neighbors};
use crate::dml::kmeans::{kmeans_on, KMeansConfig};
use crate::dml::metrics::{f1_pairs, nmi};
use crate::engine::{no_grad, Device, Rng, Tensor};
use crate::error::Result;
use crate::nn::{EmbeddingNet, ForwardMode};
use crate::pipeline::progress::Progress;
use crate::pipeline::results::Metrics;
use crate::pipeline::train_config::TrainConfig;
use crate::robust::attack::{attack, BoxedEmbedFn, EmbedFn, Goal};
use crate::robust::ensemble::{
    mean_embedding, recall_from_votes, vote_clusters, vote_ranked_labels,
};

pub const RECALL_KS: [usize; 4] = [1, 2, 4, 8];

/// The evaluation split of a dataset: samples, labels, and the query/gallery cut (In-Shop).
pub struct EvalSet {
    pub samples: Vec<Sample>,
    pub labels: Vec<usize>,
    pub query_count: Option<usize>,
    pub classes: usize,
}

impl EvalSet {
    pub fn of(dataset: &Dataset) -> EvalSet {
        EvalSet {
            samples: dataset.test.clone(),
            labels: dataset.test.iter().map(|s| s.label).collect(),
            query_count: dataset.query_count,
            classes: dataset.num_test_classes(),
        }
    }

    /// The samples at `indices`, in that order, as a clustering-scenario set (no query cut).
    pub fn subset(&self, indices: &[usize]) -> EvalSet {
        let labels: Vec<usize> = indices.iter().map(|&i| self.labels[i]).collect();
        let mut classes = labels.clone();
        classes.sort_unstable();
        classes.dedup();
        EvalSet {
            samples: indices.iter().map(|&i| self.samples[i].clone()).collect(),
            labels,
            query_count: None,
            classes: classes.len(),
        }
    }

    /// At most `max` samples (0 = all), spread evenly over the set so that every class of a
    /// class-ordered test set keeps its share; queries and gallery are thinned separately.
    pub fn capped(self, max: usize) -> EvalSet {
        let n = self.samples.len();
        if max == 0 || max >= n {
            return self;
        }
        let (mut indices, query_count) = match self.query_count {
            Some(q) => {
                let keep_q = (max * q / n).max(1).min(q);
                let mut idx = spread_indices(q, keep_q);
                idx.extend(
                    spread_indices(n - q, max - keep_q)
                        .into_iter()
                        .map(|i| q + i),
                );
                (idx, Some(keep_q))
            }
            None => (spread_indices(n, max), None),
        };
        indices.dedup();
        let mut out = self.subset(&indices);
        out.query_count = query_count;
        out
    }
}

/// `k` indices spread evenly over `0..n` (all of them when k >= n), increasing.
pub fn spread_indices(n: usize, k: usize) -> Vec<usize> {
    let k = k.min(n);
    (0..k).map(|i| i * n / k.max(1)).collect()
}

/// Embeddings of one evaluation pass, per model, on the host: [N, D] row-major.
pub struct Embedded {
    pub dim: usize,
    /// Clean embeddings, one matrix per model.
    pub clean: Vec<Vec<f32>>,
    /// Embeddings of the attacked inputs (absent without an attack).
    pub attacked: Option<Vec<Vec<f32>>>,
    /// With an attack: the mean and the largest per-image max |x_adv - x|.
    pub attack_linf: Option<(f32, f32)>,
}

/// The models under evaluation, the set they see and how it is fed to them: what embedding,
/// the attacked passes, the sanity probe and the ranking suite share.
#[derive(Clone, Copy)]
pub struct EvalContext<'a> {
    /// One model, or an ensemble's members.
    pub nets: &'a [&'a EmbeddingNet],
    pub set: &'a EvalSet,
    pub image_size: usize,
    pub batch_size: usize,
    /// The loader's worker threads (`LoaderConfig::workers`).
    pub workers: usize,
    pub device: &'a Device,
}

impl<'a> EvalContext<'a> {
    /// The nets of a trained run (`nets`, from its members) on `set`, fed at the run's image
    /// size by its loader threads.
    pub fn of_run(
        cfg: &TrainConfig,
        nets: &'a [&'a EmbeddingNet],
        set: &'a EvalSet,
        batch_size: usize,
        device: &'a Device,
    ) -> Self {
        EvalContext {
            nets,
            set,
            image_size: cfg.image_size,
            batch_size,
            workers: cfg.workers,
            device,
        }
    }

    /// The same models, fed the same way, on `set`.
    pub fn on<'b>(&self, set: &'b EvalSet) -> EvalContext<'b>
    where
        'a: 'b,
    {
        EvalContext { set, ..*self }
    }

    /// The embedding width of the models.
    pub fn dim(&self) -> usize {
        self.nets[0].embedding_dim
    }

    /// The set's batches, in order, without augmentation.
    pub fn loader(&self) -> Result<BatchLoader> {
        let samples = &self.set.samples;
        let mut lc = LoaderConfig::eval(self.batch_size, self.image_size).for_samples(samples);
        lc.workers = self.workers;
        Ok(BatchLoader::new(samples.clone(), lc)?)
    }

    /// Eval-mode views of the nets on the device, for attacks to differentiate.
    pub fn frozen(&self) -> Result<Vec<EmbeddingNet>> {
        frozen_views(self.nets, self.device)
    }
}

/// Eval-mode views of `nets` on `device` (see [`EmbeddingNet::frozen_view`]).
pub fn frozen_views(nets: &[&EmbeddingNet], device: &Device) -> Result<Vec<EmbeddingNet>> {
    nets.iter()
        .map(|n| n.frozen_view(device).map_err(Into::into))
        .collect()
}

/// Each frozen net as an embedding function with eval-mode BatchNorm.
pub fn eval_fns(frozen: &[EmbeddingNet]) -> Vec<BoxedEmbedFn<'_>> {
    frozen
        .iter()
        .map(|v| {
            Box::new(move |x: &Tensor| v.forward(x, ForwardMode::Eval)) as Box<dyn Fn(&Tensor) -> _>
        })
        .collect()
}

/// Embeds the context's set with every net (eval-mode BatchNorm). With an attack (its config,
/// the indices of the nets it is made against, one or the whole ensemble, and its seed), also
/// embeds the attacked inputs.
pub fn embed_set(
    ctx: &EvalContext,
    with_attack: Option<(&PgdConfig, &[usize], u64)>,
) -> Result<Embedded> {
    let EvalContext {
        nets,
        set,
        image_size,
        device,
        ..
    } = *ctx;
    let loader = ctx.loader()?;
    let frozen = ctx.frozen()?;
    let fns = eval_fns(&frozen);
    let dim = nets[0].embedding_dim;
    let mut clean = vec![Vec::with_capacity(set.samples.len() * dim); nets.len()];
    let mut attacked =
        with_attack.map(|_| vec![Vec::with_capacity(set.samples.len() * dim); nets.len()]);
    let model = format!("{:?} at {image_size}x{image_size}", nets[0].backbone);
    let mut linf: Vec<f32> = Vec::new();
    let label = match with_attack {
        Some((cfg, on, _)) => format!(
            "PGD-{} at eps {:.1}/255 on {} model{}",
            cfg.steps,
            cfg.eps * 255.0,
            on.len(),
            if on.len() == 1 { "" } else { "s" }
        ),
        None => format!(
            "embedding with {} model{}",
            nets.len(),
            if nets.len() == 1 { "" } else { "s" }
        ),
    };
    let bar = Progress::new(label, set.samples.len() as u64, "img", false);
    for batch in loader.epoch(0) {
        let mut embed_batch = || -> Result<()> {
            let x = batch.images_tensor(device)?;
            for (k, f) in fns.iter().enumerate() {
                clean[k].extend(no_grad(|| f(&x))?.to_vec()?);
            }
            if let (Some((cfg, on, seed)), Some(adv_out)) = (with_attack, attacked.as_mut()) {
                let targets: Vec<EmbedFn> =
                    on.iter().map(|&k| fns[k].as_ref() as EmbedFn).collect();
                let mut rng = Rng::new(seed ^ batch.batch_index as u64);
                let adv = attack(&targets, &x, cfg, &Goal::EmbeddingShift, &mut rng)?;
                linf.extend(per_image_linf(&x, &adv)?);
                for (k, f) in fns.iter().enumerate() {
                    adv_out[k].extend(no_grad(|| f(&adv))?.to_vec()?);
                }
            }
            Ok(())
        };
        embed_batch().map_err(|e| e.in_step(&model, batch.labels.len()))?;
        bar.inc(batch.labels.len() as u64);
    }
    bar.finish("");
    let attack_linf = (!linf.is_empty()).then(|| {
        let mean = linf.iter().map(|&v| v as f64).sum::<f64>() / linf.len() as f64;
        (mean as f32, linf.iter().copied().fold(0.0, f32::max))
    });
    Ok(Embedded {
        dim,
        clean,
        attacked,
        attack_linf,
    })
}

/// The rows at `picks`, in that order, of a row-major [N, dim] matrix.
pub fn rows_at(matrix: &[f32], picks: &[usize], dim: usize) -> Vec<f32> {
    picks
        .iter()
        .flat_map(|&i| matrix[i * dim..(i + 1) * dim].iter().copied())
        .collect()
}

/// [`rows_at`] of each matrix.
pub fn rows_at_each(matrices: &[Vec<f32>], picks: &[usize], dim: usize) -> Vec<Vec<f32>> {
    matrices.iter().map(|m| rows_at(m, picks, dim)).collect()
}

/// max |adv - x| of each image of a batch (on the host: a batch is small).
pub(crate) fn per_image_linf(x: &Tensor, adv: &Tensor) -> Result<Vec<f32>> {
    let per_image = x.shape()[1..].iter().product::<usize>().max(1);
    let (x, adv) = (x.to_vec()?, adv.to_vec()?);
    Ok(x.chunks(per_image)
        .zip(adv.chunks(per_image))
        .map(|(a, b)| {
            a.iter()
                .zip(b)
                .map(|(p, q)| (p - q).abs())
                .fold(0.0, f32::max)
        })
        .collect())
}

/// Neighbour lists for retrieval: query rows against gallery rows (self excluded when the
/// query set is the gallery).
pub fn neighbors(
    query: &[f32],
    gallery: &[f32],
    dim: usize,
    k: usize,
    same_set: bool,
    device: &Device,
) -> Result<Neighbors> {
    let q = Tensor::from_vec(query.to_vec(), &[query.len() / dim, dim], device)?;
    let g = if same_set {
        q.clone()
    } else {
        Tensor::from_vec(gallery.to_vec(), &[gallery.len() / dim, dim], device)?
    };
    Ok(nearest_neighbors(&q, &g, k, same_set)?)
}

/// Splits labels into (query, gallery) per the set's cut.
fn label_views(set: &EvalSet) -> (&[usize], &[usize]) {
    match set.query_count {
        Some(q) => (&set.labels[..q], &set.labels[q..]),
        None => (&set.labels, &set.labels),
    }
}

/// Recall@1/2/4/8 and MAP@R of `query` embeddings against `gallery` embeddings (percent).
/// For single-set datasets pass the same matrix twice with `same_set`.
pub fn retrieval(
    query: &[f32],
    gallery: &[f32],
    set: &EvalSet,
    dim: usize,
    same_set: bool,
    device: &Device,
) -> Result<([f64; 4], f64, Neighbors)> {
    let (ql, gl) = label_views(set);
    let (query, gallery) = match set.query_count {
        Some(q) if same_set => (&query[..q * dim], &gallery[q * dim..]),
        _ => (query, gallery),
    };
    let self_drop = same_set && set.query_count.is_none();
    let k = max_r(ql, gl, self_drop).max(8);
    let nn = neighbors(query, gallery, dim, k, self_drop, device)?;
    let r = recall_at_k(&nn, ql, gl, &RECALL_KS);
    let map = map_at_r(&nn, ql, gl, self_drop);
    Ok((
        [r[0] * 100.0, r[1] * 100.0, r[2] * 100.0, r[3] * 100.0],
        map * 100.0,
        nn,
    ))
}

/// k-means (k = number of test classes) on all embeddings, on `device`, then NMI and
/// pair-counting F1.
pub fn clustering(
    emb: &[f32],
    set: &EvalSet,
    dim: usize,
    device: &Device,
    seed: u64,
) -> Result<(f64, f64, Vec<usize>)> {
    let km = kmeans_on(
        device,
        emb,
        dim,
        set.classes,
        &KMeansConfig {
            seed,
            ..Default::default()
        },
    )?;
    Ok((
        nmi(&set.labels, &km.assignments)? * 100.0,
        f1_pairs(&set.labels, &km.assignments)? * 100.0,
        km.assignments,
    ))
}

/// Every metric of one embedding matrix, in the clustering scenario (queries and gallery both
/// from `emb`).
pub fn full_metrics(
    emb: &[f32],
    set: &EvalSet,
    dim: usize,
    device: &Device,
    seed: u64,
) -> Result<Metrics> {
    let (recall, map_r, _) = retrieval(emb, emb, set, dim, true, device)?;
    let (nmi, f1, _) = clustering(emb, set, dim, device, seed)?;
    Ok(Metrics {
        nmi,
        f1,
        recall,
        map_r,
    })
}

/// Template matching: attacked queries against the clean gallery (Recall@k and MAP@R only).
pub fn template_metrics(
    attacked: &[f32],
    clean: &[f32],
    set: &EvalSet,
    dim: usize,
    device: &Device,
) -> Result<Metrics> {
    let (ql, gl) = label_views(set);
    let (query, gallery, self_drop) = match set.query_count {
        Some(q) => (&attacked[..q * dim], &clean[q * dim..], false),
        None => (attacked, clean, true),
    };
    let k = max_r(ql, gl, self_drop).max(8);
    let nn = neighbors(query, gallery, dim, k, false, device)?;
    // With one set, query i's clean twin is gallery i: drop it as the clean evaluation does.
    let nn = if self_drop { drop_self(nn) } else { nn };
    let r = recall_at_k(&nn, ql, gl, &RECALL_KS);
    let map = map_at_r(&nn, ql, gl, self_drop);
    Ok(Metrics {
        nmi: 0.0,
        f1: 0.0,
        recall: [r[0] * 100.0, r[1] * 100.0, r[2] * 100.0, r[3] * 100.0],
        map_r: map * 100.0,
    })
}

/// Template matching of a model's attacked embeddings against its clean ones, one matrix per
/// member: a single model's directly, an ensemble's through the members' mean embedding.
pub fn template_of_models(
    clean: &[Vec<f32>],
    attacked: &[Vec<f32>],
    set: &EvalSet,
    dim: usize,
    device: &Device,
) -> Result<Metrics> {
    match (clean, attacked) {
        ([c], [a]) => template_metrics(a, c, set, dim, device),
        _ => template_metrics(
            &mean_embedding(attacked, dim),
            &mean_embedding(clean, dim),
            set,
            dim,
            device,
        ),
    }
}

/// Removes each query's own index from its neighbour list (keeping k - 1 columns).
fn drop_self(nn: Neighbors) -> Neighbors {
    let queries = nn.index.len() / nn.k.max(1);
    let k = nn.k.saturating_sub(1).max(1);
    let mut index = Vec::with_capacity(queries * k);
    let mut score = Vec::with_capacity(queries * k);
    for q in 0..queries {
        let row = (0..nn.k)
            .map(|j| (nn.index[q * nn.k + j], nn.score[q * nn.k + j]))
            .filter(|&(i, _)| i as usize != q)
            .take(k);
        for (i, s) in row {
            index.push(i);
            score.push(s);
        }
        while index.len() < (q + 1) * k {
            index.push(*index.last().unwrap_or(&0));
            score.push(f32::MIN);
        }
    }
    Neighbors { k, index, score }
}

/// A point of a 2-D projection.
pub type Point2 = (f32, f32);

/// A 2-D PCA projection of rows of `a` and `b` (D wide) on the top two principal axes of `a`
/// (power iteration; deterministic).
pub fn pca_2d(a: &[f32], b: &[f32], d: usize) -> (Vec<Point2>, Vec<Point2>) {
    let n = a.len() / d.max(1);
    let mut mean = vec![0.0f64; d];
    for row in a.chunks(d) {
        for (m, &v) in mean.iter_mut().zip(row) {
            *m += v as f64 / n.max(1) as f64;
        }
    }
    let centred =
        |row: &[f32]| -> Vec<f64> { row.iter().zip(&mean).map(|(&v, m)| v as f64 - m).collect() };
    let rows: Vec<Vec<f64>> = a.chunks(d).map(centred).collect();
    let mut axes: Vec<Vec<f64>> = Vec::new();
    for k in 0..2 {
        let mut v: Vec<f64> = (0..d)
            .map(|i| ((i * 7 + k * 3) % 11) as f64 + 1.0)
            .collect();
        for _ in 0..100 {
            let mut w = vec![0.0; d];
            for r in &rows {
                let dot: f64 = r.iter().zip(&v).map(|(x, y)| x * y).sum();
                for (wi, ri) in w.iter_mut().zip(r) {
                    *wi += dot * ri;
                }
            }
            for u in &axes {
                let dot: f64 = w.iter().zip(u).map(|(x, y)| x * y).sum();
                for (wi, ui) in w.iter_mut().zip(u) {
                    *wi -= dot * ui;
                }
            }
            let norm = w.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
            v = w.into_iter().map(|x| x / norm).collect();
        }
        axes.push(v);
    }
    let project = |data: &[f32]| -> Vec<(f32, f32)> {
        data.chunks(d)
            .map(|row| {
                let c = centred(row);
                let p = |u: &Vec<f64>| c.iter().zip(u).map(|(x, y)| x * y).sum::<f64>() as f32;
                (p(&axes[0]), p(&axes[1]))
            })
            .collect()
    };
    (project(a), project(b))
}

/// Metrics of one model's embeddings, or of an ensemble's by voting.
pub fn model_metrics(
    embs: &[Vec<f32>],
    set: &EvalSet,
    dim: usize,
    device: &Device,
    seed: u64,
) -> Result<Metrics> {
    match embs {
        [single] => full_metrics(single, set, dim, device, seed),
        _ => voted_metrics(embs, set, dim, device, seed),
    }
}

/// Ensemble metrics by voting (docs/DESIGN.md, Defenses): retrieval votes over the members' rankings,
/// clustering votes over the members' aligned k-means clusters; MAP@R of the mean embedding.
pub fn voted_metrics(
    embs: &[Vec<f32>],
    set: &EvalSet,
    dim: usize,
    device: &Device,
    seed: u64,
) -> Result<Metrics> {
    let mut nns = Vec::new();
    let mut clusters = Vec::new();
    for e in embs {
        let (_, _, nn) = retrieval(e, e, set, dim, true, device)?;
        nns.push(nn);
        clusters.push(clustering(e, set, dim, device, seed)?.2);
    }
    let (ql, gl) = match set.query_count {
        Some(q) => (&set.labels[..q], &set.labels[q..]),
        None => (&set.labels[..], &set.labels[..]),
    };
    let votes = vote_ranked_labels(&nns, gl, 8);
    let r = recall_from_votes(&votes, ql, &RECALL_KS);
    let voted = vote_clusters(&clusters, set.classes);
    let mean = mean_embedding(embs, dim);
    let (_, map_r, _) = retrieval(&mean, &mean, set, dim, true, device)?;
    Ok(Metrics {
        nmi: pct(crate::dml::metrics::nmi(&set.labels, &voted)?),
        f1: pct(crate::dml::metrics::f1_pairs(&set.labels, &voted)?),
        recall: [pct(r[0]), pct(r[1]), pct(r[2]), pct(r[3])],
        map_r,
    })
}

fn pct(v: f64) -> f64 {
    v * 100.0
}

/// Metrics of one attacked pass: the clustering scenario (voting for an ensemble) and the
/// template scenario (the members' mean embedding against the clean gallery).
pub fn scenario_metrics(
    clean: &[Vec<f32>],
    attacked: &[Vec<f32>],
    set: &EvalSet,
    dim: usize,
    device: &Device,
    seed: u64,
) -> Result<(Metrics, Metrics)> {
    let clustering = model_metrics(attacked, set, dim, device, seed)?;
    let template = template_of_models(clean, attacked, set, dim, device)?;
    Ok((clustering, template))
}
