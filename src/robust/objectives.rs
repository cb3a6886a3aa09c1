//! The data the label-aware attack objectives need, built once from clean embeddings on the
//! host (docs/DESIGN.md, Attacks):
//!
//! - metric loss: the Proxy Anchor loss against class-centroid proxies (the evaluation's classes
//!   are not the training classes, so the trained proxies do not apply): each class's proxy is
//!   the L2-normalised mean of its clean embeddings;
//! - retrieval: per query i, d_i = g(n_i) - g(p_i), where g are the clean gallery embeddings,
//!   n_i the nearest gallery item of another class and p_i the nearest other item of the same
//!   class (inner product, the query's own clean copy excluded). The attack maximises
//!   sum_i <F(x_adv_i), d_i>, which for L2-normalised embeddings is
//!   (||F - g(p_i)||^2 - ||F - g(n_i)||^2) / 2: towards the other class, away from its own.

use rayon::prelude::*;

/// Class-centroid proxies of a labelled embedding matrix.
#[derive(Clone, Debug, PartialEq)]
pub struct CentroidProxies {
    /// The distinct labels, increasing: row r of `matrix` is class `classes[r]`.
    pub classes: Vec<usize>,
    /// [classes.len(), dim], row-major, each row of unit length (or zero).
    pub matrix: Vec<f32>,
}

impl CentroidProxies {
    /// Proxies from `emb` ([N, dim], row-major) with one label per row.
    pub fn of(emb: &[f32], labels: &[usize], dim: usize) -> CentroidProxies {
        let mut classes = labels.to_vec();
        classes.sort_unstable();
        classes.dedup();
        let mut matrix = vec![0.0f32; classes.len() * dim];
        for (row, &label) in emb.chunks(dim).zip(labels) {
            let r = classes.binary_search(&label).unwrap_or(0);
            for (m, v) in matrix[r * dim..(r + 1) * dim].iter_mut().zip(row) {
                *m += v;
            }
        }
        for proxy in matrix.chunks_mut(dim) {
            let norm = proxy.iter().map(|v| v * v).sum::<f32>().sqrt();
            if norm > 0.0 {
                proxy.iter_mut().for_each(|v| *v /= norm);
            }
        }
        CentroidProxies { classes, matrix }
    }

    /// The proxy row of each label (a label it does not know maps to row 0).
    pub fn rows_of(&self, labels: &[usize]) -> Vec<usize> {
        labels
            .iter()
            .map(|l| self.classes.binary_search(l).unwrap_or(0))
            .collect()
    }
}

/// The retrieval objective's directions d_i = g(n_i) - g(p_i) ([queries.len(), dim]) for the
/// gallery rows `queries` of `gallery` ([N, dim]); a missing neighbour contributes zero.
pub fn retrieval_directions(
    gallery: &[f32],
    labels: &[usize],
    dim: usize,
    queries: &[usize],
) -> Vec<f32> {
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(p, q)| p * q).sum::<f32>();
    queries
        .par_iter()
        .flat_map_iter(|&q| {
            let query = &gallery[q * dim..(q + 1) * dim];
            // The best (similarity, index) of the query's class and of the other classes.
            let mut same: Option<(f32, usize)> = None;
            let mut other: Option<(f32, usize)> = None;
            for (j, g) in gallery.chunks(dim).enumerate().filter(|&(j, _)| j != q) {
                let s = dot(query, g);
                let slot = if labels[j] == labels[q] {
                    &mut same
                } else {
                    &mut other
                };
                if slot.is_none_or(|(best, _)| s > best) {
                    *slot = Some((s, j));
                }
            }
            let row = |n: Option<(f32, usize)>| n.map(|(_, j)| &gallery[j * dim..(j + 1) * dim]);
            let (towards, away) = (row(other), row(same));
            (0..dim).map(move |k| towards.map_or(0.0, |t| t[k]) - away.map_or(0.0, |a| a[k]))
        })
        .collect()
}
