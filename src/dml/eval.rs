//! Retrieval evaluation on the device: chunked cosine-similarity GEMMs and the engine's row
//! top-k (`engine::ops::topk`), so test sets far larger than one binding work; Recall@k and MAP@R
//! from the neighbour lists. The CPU path runs the same algorithm in plain loops.

use crate::engine::error::{shape_err, Result};
use crate::engine::ops::matmul::gemm_raw;
use crate::engine::ops::topk::{row_topk, topk_host};
use crate::engine::Tensor;

/// Similarity chunks are kept at or below this many bytes (and the adapter's binding limit).
const CHUNK_BYTES: u64 = 64 << 20;

/// The k nearest gallery items of every query, best first.
#[derive(Clone, Debug, PartialEq)]
pub struct Neighbors {
    pub k: usize,
    /// [queries, k] gallery indices.
    pub index: Vec<u32>,
    /// [queries, k] similarities.
    pub score: Vec<f32>,
}

impl Neighbors {
    pub fn of(&self, q: usize) -> &[u32] {
        &self.index[q * self.k..(q + 1) * self.k]
    }
}

/// The `k` most similar gallery rows (cosine: inputs are L2-normalised embeddings) of every
/// query row. With `exclude_self`, query i and gallery i are the same sample and i is skipped.
pub fn nearest_neighbors(
    query: &Tensor,
    gallery: &Tensor,
    k: usize,
    exclude_self: bool,
) -> Result<Neighbors> {
    let limit = query
        .device()
        .max_binding_bytes()
        .map_or(CHUNK_BYTES, |b| b.min(CHUNK_BYTES));
    nearest_neighbors_chunked(query, gallery, k, exclude_self, limit)
}

/// [`nearest_neighbors`] with similarity chunks of at most `limit` bytes (tests force many
/// small chunks through this).
pub fn nearest_neighbors_chunked(
    query: &Tensor,
    gallery: &Tensor,
    k: usize,
    exclude_self: bool,
    limit: u64,
) -> Result<Neighbors> {
    let (nq, d) = query.dims2("nearest_neighbors")?;
    let (ng, dg) = gallery.dims2("nearest_neighbors")?;
    if d != dg {
        return shape_err(
            "nearest_neighbors",
            format!("query dim {d}, gallery dim {dg}"),
        );
    }
    let k = k.min(ng - usize::from(exclude_self)).max(1);
    let max_elems = (limit / 4) as usize;
    let g_chunk = ng.min(max_elems.max(k + 1));
    let q_chunk = (max_elems / g_chunk).clamp(1, nq.max(1));
    let mut index = Vec::with_capacity(nq * k);
    let mut score = Vec::with_capacity(nq * k);
    for q0 in (0..nq).step_by(q_chunk) {
        let qn = q_chunk.min(nq - q0);
        let q = query.rows(q0, qn)?;
        // Candidates from every gallery chunk, merged on the host.
        let mut cand: Vec<Vec<(f32, u32)>> = vec![Vec::new(); qn];
        for g0 in (0..ng).step_by(g_chunk) {
            let gn = g_chunk.min(ng - g0);
            let g = if gn == ng {
                gallery.clone()
            } else {
                gallery.rows(g0, gn)?
            };
            let sim = gemm_raw(&q, &g, false, true)?;
            // The query's own column inside this gallery chunk, if it falls here.
            let self_offset = exclude_self.then(|| q0 as isize - g0 as isize);
            let kk = k.min(gn);
            let (i, v) = match self_offset {
                Some(o) if o >= 0 => {
                    row_topk(&sim, kk.min(gn.saturating_sub(1)).max(1), Some(o as usize))?
                }
                Some(o) => topk_rows_with_negative_offset(&sim, kk, o)?,
                None => row_topk(&sim, kk, None)?,
            };
            let kk = i.len() / qn;
            for r in 0..qn {
                for j in 0..kk {
                    cand[r].push((v[r * kk + j], i[r * kk + j] + g0 as u32));
                }
            }
        }
        for mut c in cand {
            c.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            c.truncate(k);
            for (v, i) in c {
                score.push(v);
                index.push(i);
            }
        }
    }
    Ok(Neighbors { k, index, score })
}

/// A gallery chunk that starts after the query chunk's rows: row r's own column is r + o with
/// o < 0, which lies inside the chunk only for some rows; handled on the host for simplicity.
fn topk_rows_with_negative_offset(
    sim: &Tensor,
    k: usize,
    o: isize,
) -> Result<(Vec<u32>, Vec<f32>)> {
    let (rows, cols) = sim.dims2("topk")?;
    let v = sim.to_vec()?;
    Ok(topk_host(&v, rows, cols, k, |r| {
        let c = r as isize + o;
        (c >= 0 && (c as usize) < cols).then_some(c as usize)
    }))
}

/// Recall@k for each k in `ks`: the fraction of queries with a same-label item among their
/// k nearest gallery items.
pub fn recall_at_k(
    nn: &Neighbors,
    query_labels: &[usize],
    gallery_labels: &[usize],
    ks: &[usize],
) -> Vec<f64> {
    ks.iter()
        .map(|&k| {
            let hits = query_labels
                .iter()
                .enumerate()
                .filter(|&(q, &l)| {
                    nn.of(q)
                        .iter()
                        .take(k)
                        .any(|&g| gallery_labels[g as usize] == l)
                })
                .count();
            hits as f64 / query_labels.len().max(1) as f64
        })
        .collect()
}

/// MAP@R (pytorch-metric-learning): R = number of gallery items sharing the query's label
/// (the query itself excluded); AP over the first R neighbours, divided by R. `nn` must hold at
/// least max R neighbours.
pub fn map_at_r(
    nn: &Neighbors,
    query_labels: &[usize],
    gallery_labels: &[usize],
    exclude_self: bool,
) -> f64 {
    let mut count = std::collections::HashMap::new();
    for &l in gallery_labels {
        *count.entry(l).or_insert(0usize) += 1;
    }
    let mut total = 0.0;
    for (q, &l) in query_labels.iter().enumerate() {
        let r = count.get(&l).copied().unwrap_or(0) - usize::from(exclude_self);
        if r == 0 {
            continue;
        }
        let mut hits = 0usize;
        let mut ap = 0.0;
        for (i, &g) in nn.of(q).iter().take(r).enumerate() {
            if gallery_labels[g as usize] == l {
                hits += 1;
                ap += hits as f64 / (i + 1) as f64;
            }
        }
        total += ap / r as f64;
    }
    total / query_labels.len().max(1) as f64
}

/// The largest R (same-label gallery items per query) that [`map_at_r`] needs.
pub fn max_r(query_labels: &[usize], gallery_labels: &[usize], exclude_self: bool) -> usize {
    let mut count = std::collections::HashMap::new();
    for &l in gallery_labels {
        *count.entry(l).or_insert(0usize) += 1;
    }
    query_labels
        .iter()
        .map(|l| {
            count
                .get(l)
                .copied()
                .unwrap_or(0)
                .saturating_sub(usize::from(exclude_self))
        })
        .max()
        .unwrap_or(1)
        .max(1)
}
