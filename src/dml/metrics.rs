//! Retrieval and clustering metrics of deep metric learning (docs/DESIGN.md, Metrics), on host
//! embeddings: row-major `[N, D]` `f32`, assumed L2-normalised so that the dot product is the
//! cosine similarity.
//!
//! Nearest neighbours are ranked by similarity, ties broken by the lower index, so results are
//! deterministic. Queries are processed one row at a time per thread, so memory stays at
//! O(threads x N) whatever N is.

use std::collections::{BTreeMap, HashMap};

pub use crate::dml::kmeans::{kmeans, KMeansConfig, KMeansResult};
use crate::engine::error::{invalid, Result};

/// Checks `[N, D]` against its labels; returns N.
fn rows(op: &'static str, emb: &[f32], dim: usize, labels: &[usize]) -> Result<usize> {
    if dim == 0 || !emb.len().is_multiple_of(dim) {
        return invalid(
            op,
            format!(
                "embedding length {} is not a multiple of dim {dim}",
                emb.len()
            ),
        );
    }
    let n = emb.len() / dim;
    if n != labels.len() {
        return invalid(
            op,
            format!("{n} embeddings of dim {dim} but {} labels", labels.len()),
        );
    }
    Ok(n)
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Four accumulators let the compiler vectorise; the order is fixed, so results are stable.
    let mut acc = [0f32; 4];
    let chunks = a.len() / 4;
    for i in 0..chunks {
        for k in 0..4 {
            acc[k] += a[4 * i + k] * b[4 * i + k];
        }
    }
    let mut s = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    for i in 4 * chunks..a.len() {
        s += a[i] * b[i];
    }
    s
}

pub(crate) fn threads_for(work: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    cores.min(8).min(work.max(1))
}

/// For every query: rank the gallery by similarity (dropping the query itself when `self_drop`,
/// i.e. query i is gallery item i), keep the `k_of(i)` nearest and score them with `score`.
fn per_query<T: Send>(
    queries: &[f32],
    gallery: &[f32],
    dim: usize,
    self_drop: bool,
    k_of: &(dyn Fn(usize) -> usize + Sync),
    score: &(dyn Fn(usize, &[usize]) -> T + Sync),
) -> Vec<T> {
    let nq = queries.len() / dim;
    let ng = gallery.len() / dim;
    let threads = threads_for(nq);
    let per_thread = nq.div_ceil(threads.max(1)).max(1);
    let score_queries = |range: std::ops::Range<usize>| -> Vec<T> {
        let mut sims = vec![0f32; ng];
        let mut idx: Vec<usize> = Vec::with_capacity(ng);
        let mut out = Vec::with_capacity(range.len());
        for qi in range {
            let q = &queries[qi * dim..(qi + 1) * dim];
            for (gi, s) in sims.iter_mut().enumerate() {
                *s = dot(q, &gallery[gi * dim..(gi + 1) * dim]);
            }
            idx.clear();
            idx.extend((0..ng).filter(|&gi| !(self_drop && gi == qi)));
            let k = k_of(qi).min(idx.len());
            let order = |&a: &usize, &b: &usize| sims[b].total_cmp(&sims[a]).then(a.cmp(&b));
            if k > 0 && k < idx.len() {
                idx.select_nth_unstable_by(k - 1, order);
            }
            idx.truncate(k);
            idx.sort_unstable_by(order);
            out.push(score(qi, &idx));
        }
        out
    };
    if threads <= 1 {
        return score_queries(0..nq);
    }
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..nq)
            .step_by(per_thread)
            .map(|start| {
                let score_queries = &score_queries;
                s.spawn(move || score_queries(start..(start + per_thread).min(nq)))
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("metric worker panicked"))
            .collect()
    })
}

fn recall_from_hits(hits: Vec<Vec<bool>>, ks: &[usize]) -> Vec<f64> {
    let n = hits.len().max(1) as f64;
    (0..ks.len())
        .map(|j| hits.iter().filter(|h| h[j]).count() as f64 / n)
        .collect()
}

fn check_ks(op: &'static str, ks: &[usize]) -> Result<usize> {
    if ks.is_empty() || ks.contains(&0) {
        return invalid(op, format!("ks {ks:?} must be non-empty and positive"));
    }
    Ok(*ks.iter().max().expect("non-empty"))
}

/// Recall@k for each k in `ks`: the fraction of samples whose k nearest other samples (the sample
/// itself dropped) include one of the same label. Every sample is a query, as in Proxy-Anchor's
/// evaluation (a sample alone in its class counts as a miss).
pub fn recall_at_k(emb: &[f32], dim: usize, labels: &[usize], ks: &[usize]) -> Result<Vec<f64>> {
    let n = rows("recall_at_k", emb, dim, labels)?;
    let kmax = check_ks("recall_at_k", ks)?;
    if n < 2 {
        return invalid("recall_at_k", format!("needs at least 2 samples, got {n}"));
    }
    let hits = per_query(emb, emb, dim, true, &|_| kmax, &|qi, nn: &[usize]| {
        ks.iter()
            .map(|&k| nn.iter().take(k).any(|&g| labels[g] == labels[qi]))
            .collect::<Vec<bool>>()
    });
    Ok(recall_from_hits(hits, ks))
}

/// Recall@k of queries against a separate gallery (In-Shop), without dropping anything.
pub fn recall_at_k_query_gallery(
    queries: &[f32],
    query_labels: &[usize],
    gallery: &[f32],
    gallery_labels: &[usize],
    dim: usize,
    ks: &[usize],
) -> Result<Vec<f64>> {
    let op = "recall_at_k_query_gallery";
    let nq = rows(op, queries, dim, query_labels)?;
    let ng = rows(op, gallery, dim, gallery_labels)?;
    let kmax = check_ks(op, ks)?;
    if nq == 0 || ng == 0 {
        return invalid(op, format!("empty query ({nq}) or gallery ({ng}) set"));
    }
    let hits = per_query(
        queries,
        gallery,
        dim,
        false,
        &|_| kmax,
        &|qi, nn: &[usize]| {
            ks.iter()
                .map(|&k| {
                    nn.iter()
                        .take(k)
                        .any(|&g| gallery_labels[g] == query_labels[qi])
                })
                .collect::<Vec<bool>>()
        },
    );
    Ok(recall_from_hits(hits, ks))
}

/// MAP@R as pytorch-metric-learning defines it: for a query with R other samples of its class,
/// retrieve the R nearest (itself dropped) and average precision@i over the relevant positions i,
/// dividing by R: `MAP@R = (1/R) * sum_{i<=R} P(i) * rel(i)`. Queries alone in their class are
/// left out (pytorch-metric-learning's "lone query labels"); returns 0 if all are.
pub fn map_at_r(emb: &[f32], dim: usize, labels: &[usize]) -> Result<f64> {
    rows("map_at_r", emb, dim, labels)?;
    let mut counts: HashMap<usize, usize> = HashMap::new();
    for &l in labels {
        *counts.entry(l).or_default() += 1;
    }
    let r_of = |i: usize| counts[&labels[i]] - 1;
    let scores = per_query(emb, emb, dim, true, &r_of, &|qi, nn: &[usize]| {
        let r = r_of(qi);
        if r == 0 {
            return None;
        }
        let mut relevant = 0usize;
        let mut sum = 0f64;
        for (pos, &g) in nn.iter().enumerate() {
            if labels[g] == labels[qi] {
                relevant += 1;
                sum += relevant as f64 / (pos + 1) as f64;
            }
        }
        Some(sum / r as f64)
    });
    let valid: Vec<f64> = scores.into_iter().flatten().collect();
    if valid.is_empty() {
        return Ok(0.0);
    }
    Ok(valid.iter().sum::<f64>() / valid.len() as f64)
}

/// Contingency counts of (label, cluster) pairs, and the marginals. Ordered maps: NMI sums
/// floats over these cells, and a `HashMap`'s iteration order (its hash keys are random, new
/// for every map) changed the last bits of the sum from call to call.
struct Contingency {
    joint: BTreeMap<(usize, usize), u64>,
    labels: BTreeMap<usize, u64>,
    clusters: BTreeMap<usize, u64>,
    n: u64,
}

fn contingency(op: &'static str, labels: &[usize], clusters: &[usize]) -> Result<Contingency> {
    if labels.len() != clusters.len() || labels.is_empty() {
        return invalid(
            op,
            format!(
                "{} labels and {} cluster assignments (need equal, non-zero lengths)",
                labels.len(),
                clusters.len()
            ),
        );
    }
    let mut c = Contingency {
        joint: BTreeMap::new(),
        labels: BTreeMap::new(),
        clusters: BTreeMap::new(),
        n: labels.len() as u64,
    };
    for (&y, &k) in labels.iter().zip(clusters) {
        *c.joint.entry((y, k)).or_default() += 1;
        *c.labels.entry(y).or_default() += 1;
        *c.clusters.entry(k).or_default() += 1;
    }
    Ok(c)
}

fn entropy(counts: &BTreeMap<usize, u64>, n: u64) -> f64 {
    let n = n as f64;
    -counts
        .values()
        .map(|&c| {
            let p = c as f64 / n;
            p * p.ln()
        })
        .sum::<f64>()
}

/// Normalised mutual information with the arithmetic-mean normalisation (sklearn's default):
/// `I(Y; C) / ((H(Y) + H(C)) / 2)`. Two single-cluster labelings score 1, as in sklearn.
pub fn nmi(labels: &[usize], clusters: &[usize]) -> Result<f64> {
    let c = contingency("nmi", labels, clusters)?;
    if c.labels.len() == 1 && c.clusters.len() == 1 {
        return Ok(1.0);
    }
    let n = c.n as f64;
    let mut mi = 0f64;
    for (&(y, k), &nyk) in &c.joint {
        let (ny, nk) = (c.labels[&y] as f64, c.clusters[&k] as f64);
        let nyk = nyk as f64;
        mi += nyk / n * (n * nyk / (ny * nk)).ln();
    }
    let mi = mi.max(0.0);
    if mi == 0.0 {
        return Ok(0.0);
    }
    let norm = (entropy(&c.labels, c.n) + entropy(&c.clusters, c.n)) / 2.0;
    Ok(mi / norm.max(f64::EPSILON))
}

fn pairs(n: u64) -> f64 {
    (n as f64) * (n as f64 - 1.0) / 2.0
}

/// Pair-counting F1 of a clustering (Roth et al. / HDML): TP = sum over (class, cluster) cells of
/// C(n_ij, 2); precision = TP / sum over clusters C(n_j, 2); recall = TP / sum over classes
/// C(n_i, 2); F1 = 2PR / (P + R). Zero when undefined (no pairs).
pub fn f1_pairs(labels: &[usize], clusters: &[usize]) -> Result<f64> {
    let c = contingency("f1_pairs", labels, clusters)?;
    let tp: f64 = c.joint.values().map(|&v| pairs(v)).sum();
    let predicted: f64 = c.clusters.values().map(|&v| pairs(v)).sum();
    let actual: f64 = c.labels.values().map(|&v| pairs(v)).sum();
    if tp == 0.0 || predicted == 0.0 || actual == 0.0 {
        return Ok(0.0);
    }
    let (p, r) = (tp / predicted, tp / actual);
    Ok(2.0 * p * r / (p + r))
}

/// NMI and F1 of a k-means clustering with k = number of distinct labels.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ClusterScores {
    pub nmi: f64,
    pub f1: f64,
}

/// Clusters the embeddings with k-means (k = number of distinct labels) and scores the clusters.
pub fn cluster_scores(
    emb: &[f32],
    dim: usize,
    labels: &[usize],
    cfg: &KMeansConfig,
) -> Result<ClusterScores> {
    rows("cluster_scores", emb, dim, labels)?;
    let mut distinct = labels.to_vec();
    distinct.sort_unstable();
    distinct.dedup();
    let km = kmeans(emb, dim, distinct.len(), cfg)?;
    Ok(ClusterScores {
        nmi: nmi(labels, &km.assignments)?,
        f1: f1_pairs(labels, &km.assignments)?,
    })
}
