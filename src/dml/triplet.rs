//! robrank's triplet loss on SPC-2 batches (docs/DESIGN.md, "Triplet loss and SPC-2 batches"),
//! as `robrank/losses/triplet.py` (`ptripletN`) and `robrank/losses/miner.py` define it:
//!
//! ```text
//! L = 1/T sum_t relu(d(a_t, p_t) - d(a_t, n_t) + margin),   d(x, y) = ||x - y + 1e-6||_2
//! ```
//!
//! on L2-normalised embeddings (robrank's metric "N"), margin 0.2. The batch is SPC-2: rows
//! (2i, 2i + 1) are a pair of one class; anchor t is row 2t, its positive row 2t + 1, and its
//! negative is mined in the batch. The 1e-6 is `torch.nn.functional.pairwise_distance`'s eps
//! (added to the difference), which `F.triplet_margin_loss` uses.
//!
//! The loss is composed of recorded engine ops (a selection-matrix GEMM gathers the rows, the
//! norm is <v, v / ||v||>), so it has a backward on both devices without a kernel of its own.

use serde::{Deserialize, Serialize};

use crate::engine::error::{invalid, shape_err, Result};
use crate::engine::ops::elementwise::{affine, mul, relu, sub};
use crate::engine::ops::matmul::matmul;
use crate::engine::ops::normalize::l2_normalize;
use crate::engine::ops::reduce::{mean, sum_dim};
use crate::engine::{no_grad, Rng, Tensor};

/// `torch.nn.functional.pairwise_distance`'s eps, added to every difference.
pub const PAIRWISE_EPS: f32 = 1e-6;
/// `F.normalize`'s eps.
const NORMALIZE_EPS: f32 = 1e-12;

/// The metric loss a run trains with (`--loss`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
#[value(rename_all = "kebab-case")]
pub enum LossKind {
    /// Proxy Anchor (Kim et al. 2020), the paper's loss.
    ProxyAnchor,
    /// robrank's triplet loss (`ptripletN`) on SPC-2 batches of class pairs.
    Triplet,
}

impl LossKind {
    pub fn key(self) -> &'static str {
        match self {
            LossKind::ProxyAnchor => "proxy-anchor",
            LossKind::Triplet => "triplet",
        }
    }
}

/// Row indices of the mined triplets, one per anchor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Triplets {
    pub anchors: Vec<usize>,
    pub positives: Vec<usize>,
    pub negatives: Vec<usize>,
}

impl Triplets {
    pub fn len(&self) -> usize {
        self.anchors.len()
    }
    pub fn is_empty(&self) -> bool {
        self.anchors.is_empty()
    }
}

/// Refuses labels that are not an SPC-2 batch: an even number of rows, at least one pair,
/// rows 2i and 2i + 1 of one class.
pub fn check_spc2(labels: &[usize]) -> Result<()> {
    if labels.len() < 2 || !labels.len().is_multiple_of(2) {
        return invalid(
            "triplet loss",
            format!(
                "an SPC-2 batch holds pairs of images; got {} rows",
                labels.len()
            ),
        );
    }
    if let Some(i) = (0..labels.len() / 2).find(|&i| labels[2 * i] != labels[2 * i + 1]) {
        return invalid(
            "triplet loss",
            format!(
                "rows {} and {} of an SPC-2 batch must be one class (labels {} and {})",
                2 * i,
                2 * i + 1,
                labels[2 * i],
                labels[2 * i + 1]
            ),
        );
    }
    Ok(())
}

/// Uniform pick among `candidates`, or among all `n` rows when there are none (robrank's
/// fallback for a batch without another class).
fn pick(candidates: &[usize], n: usize, rng: &mut Rng) -> usize {
    if candidates.is_empty() {
        rng.below(n)
    } else {
        candidates[rng.below(candidates.len())]
    }
}

/// Pairwise distances of the L2-normalised rows of `emb` [B, D], as robrank's miners compute
/// them: sqrt(|x|^2 + |y|^2 - 2 <x, y>) (clamped at 0 where rounding makes it negative).
fn host_distances(emb: &Tensor) -> Result<Vec<Vec<f32>>> {
    let (b, d) = emb.dims2("triplet miner")?;
    let v = no_grad(|| l2_normalize(&emb.detach(), 1, NORMALIZE_EPS))?.to_vec()?;
    let row = |i: usize| &v[i * d..(i + 1) * d];
    let dot = |i: usize, j: usize| -> f32 { row(i).iter().zip(row(j)).map(|(x, y)| x * y).sum() };
    Ok((0..b)
        .map(|i| {
            (0..b)
                .map(|j| (dot(i, i) + dot(j, j) - 2.0 * dot(i, j)).max(0.0).sqrt())
                .collect()
        })
        .collect())
}

/// robrank's `spc2-random` miner: anchor 2t, positive 2t + 1, negative uniform among the rows
/// of another class (any row when the batch has no other class). Reads only the labels.
pub fn mine_random(labels: &[usize], rng: &mut Rng) -> Result<Triplets> {
    check_spc2(labels)?;
    let b = labels.len();
    let anchors: Vec<usize> = (0..b / 2).map(|i| 2 * i).collect();
    let negatives = anchors
        .iter()
        .map(|&a| {
            let other: Vec<usize> = (0..b).filter(|&j| labels[j] != labels[a]).collect();
            pick(&other, b, rng)
        })
        .collect();
    Ok(Triplets {
        positives: anchors.iter().map(|&a| a + 1).collect(),
        anchors,
        negatives,
    })
}

/// robrank's `spc2-softhard` miner on the embeddings `emb` [B, D] of an SPC-2 batch: per anchor
/// 2t, the negative uniform among the other-class rows nearer than its farthest same-class row
/// (else among all other-class rows), then the positive uniform among the same-class rows (the
/// anchor itself included, as robrank's mask) farther than its nearest other-class row (else
/// among all same-class rows).
pub fn mine_softhard(emb: &Tensor, labels: &[usize], rng: &mut Rng) -> Result<Triplets> {
    check_spc2(labels)?;
    let (b, _) = emb.dims2("triplet miner")?;
    if b != labels.len() {
        return shape_err(
            "triplet miner",
            format!("{} labels for {b} embeddings", labels.len()),
        );
    }
    let anchors: Vec<usize> = (0..b / 2).map(|i| 2 * i).collect();
    softhard(&host_distances(emb)?, labels, anchors, rng)
}

/// `__miner_spc2_softhard`: the negative first, then the positive, per anchor.
fn softhard(
    dist: &[Vec<f32>],
    labels: &[usize],
    anchors: Vec<usize>,
    rng: &mut Rng,
) -> Result<Triplets> {
    let b = labels.len();
    let (mut positives, mut negatives) = (Vec::new(), Vec::new());
    for &a in &anchors {
        let d2 = |j: usize| dist[a][j] * dist[a][j];
        let same: Vec<usize> = (0..b).filter(|&j| labels[j] == labels[a]).collect();
        let other: Vec<usize> = (0..b).filter(|&j| labels[j] != labels[a]).collect();
        let negative = if other.is_empty() {
            rng.below(b)
        } else {
            let max_ap2 = same.iter().map(|&j| d2(j)).fold(f32::MIN, f32::max);
            let soft: Vec<usize> = other.iter().copied().filter(|&j| d2(j) < max_ap2).collect();
            pick(if soft.is_empty() { &other } else { &soft }, b, rng)
        };
        negatives.push(negative);
        let positive = if other.is_empty() {
            a + 1
        } else {
            let min_an2 = other.iter().map(|&j| d2(j)).fold(f32::MAX, f32::min);
            let soft: Vec<usize> = same.iter().copied().filter(|&j| d2(j) > min_an2).collect();
            pick(if soft.is_empty() { &same } else { &soft }, b, rng)
        };
        positives.push(positive);
    }
    Ok(Triplets {
        anchors,
        positives,
        negatives,
    })
}

/// Rows `idx` of `t` [B, ...] as one recorded op: a 0/1 selection matrix [len, B] times `t`,
/// so gradients flow back to the selected rows on both devices.
pub fn select_rows(t: &Tensor, idx: &[usize]) -> Result<Tensor> {
    let b = t.shape().first().copied().unwrap_or(0);
    if idx.is_empty() || b == 0 {
        return shape_err(
            "select_rows",
            format!("{} rows of {:?}", idx.len(), t.shape()),
        );
    }
    if let Some(&bad) = idx.iter().find(|&&i| i >= b) {
        return shape_err("select_rows", format!("row {bad} of {b}"));
    }
    let mut s = vec![0.0f32; idx.len() * b];
    for (r, &i) in idx.iter().enumerate() {
        s[r * b + i] = 1.0;
    }
    let sel = Tensor::from_vec(s, &[idx.len(), b], &t.device())?;
    let row = t.numel() / b;
    let mut shape = t.shape().to_vec();
    shape[0] = idx.len();
    matmul(&sel, &t.reshape(&[b, row])?)?.reshape(&shape)
}

/// d(x_i, y_i) = ||x_i - y_i + 1e-6||_2 per row of x, y [T, D] -> [T] (PyTorch's
/// `pairwise_distance`). The norm is <v, v / ||v||>, whose gradient is v / ||v||.
pub fn pairwise_distance(x: &Tensor, y: &Tensor) -> Result<Tensor> {
    if x.shape() != y.shape() || x.rank() != 2 {
        return shape_err(
            "pairwise_distance",
            format!("{:?} and {:?}", x.shape(), y.shape()),
        );
    }
    let v = affine(&sub(x, y)?, 1.0, PAIRWISE_EPS)?;
    sum_dim(&mul(&v, &l2_normalize(&v, 1, NORMALIZE_EPS)?)?, 1)
}

/// robrank's `fn_ptriplet_kernel` for metric N: mean_t relu(d(a, p) - d(a, n) + margin) over
/// rows of a, p, n [T, D] (already normalised where the caller wants it), shape [1].
pub fn triplet_margin_loss(a: &Tensor, p: &Tensor, n: &Tensor, margin: f32) -> Result<Tensor> {
    if !margin.is_finite() {
        return invalid("triplet loss", format!("margin {margin}"));
    }
    let hinge = sub(&pairwise_distance(a, p)?, &pairwise_distance(a, n)?)?;
    mean(&relu(&affine(&hinge, 1.0, margin)?)?)
}

/// The triplet loss of an SPC-2 batch (`ptripletN`): rows normalised, triplets mined with
/// [`mine_random`], [`triplet_margin_loss`] on them. Recorded: gradients flow to `emb`.
pub fn spc2_triplet_loss(
    emb: &Tensor,
    labels: &[usize],
    margin: f32,
    rng: &mut Rng,
) -> Result<Tensor> {
    let (b, _) = emb.dims2("triplet loss")?;
    if b != labels.len() {
        return shape_err(
            "triplet loss",
            format!("{} labels for {b} embeddings", labels.len()),
        );
    }
    let t = mine_random(labels, rng)?;
    triplet_loss_on(emb, &t, margin)
}

/// [`triplet_margin_loss`] on the rows `t` of `emb` [B, D], normalised first.
pub fn triplet_loss_on(emb: &Tensor, t: &Triplets, margin: f32) -> Result<Tensor> {
    let e = l2_normalize(emb, 1, NORMALIZE_EPS)?;
    triplet_margin_loss(
        &select_rows(&e, &t.anchors)?,
        &select_rows(&e, &t.positives)?,
        &select_rows(&e, &t.negatives)?,
        margin,
    )
}
