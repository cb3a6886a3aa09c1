//! Inference of an ensemble by voting (docs/DESIGN.md, Defenses), host side.
//!
//! Retrieval: every member ranks the gallery on its own; the ensemble's prediction at each rank
//! is the class label most members name at that rank. Clustering: every member runs k-means on
//! its own embeddings; cluster ids are arbitrary per member, so each member's ids are first
//! aligned to member 0's with the Hungarian method on the contingency table, then each sample
//! takes the majority cluster. The mean-embedding ensemble (differentiable, and the one the
//! attack sees through eq. 10) is `mean_embedding`.
//!
//! These functions take results computed elsewhere and never fail: inconsistent inputs are
//! handled by the documented rules below (shortest length wins, out-of-range ids cast no vote)
//! rather than by panicking.

use crate::dml::eval::Neighbors;

/// The ensemble's predicted class label at each rank 1..=k of every query.
///
/// Rule, for query q and rank r (1-based):
/// 1. every member whose list reaches rank r names `gallery_labels[index]` of its r-th
///    neighbour (a gallery index outside `gallery_labels` names nothing);
/// 2. the label named by the most members wins;
/// 3. ties: the smallest *mean rank*, the label's first (best) 1-based position in each
///    member's top-k label list averaged over ALL members, a member whose top-k lacks the label
///    counting k+1;
/// 4. still tied: the smallest label.
///
/// The same label may win several ranks (several gallery items share a class), just as one
/// member's own list names a class several times. `k` is capped at the shortest member list;
/// the number of queries is the smallest over the members. Returns `[queries][k]`; an empty
/// `members` gives an empty result.
pub fn vote_ranked_labels(
    members: &[Neighbors],
    gallery_labels: &[usize],
    k: usize,
) -> Vec<Vec<usize>> {
    let Some(k) = members.iter().map(|m| m.k).min().map(|mk| mk.min(k)) else {
        return Vec::new();
    };
    let queries = members
        .iter()
        .map(|m| m.index.len().checked_div(m.k).unwrap_or(0))
        .min()
        .unwrap_or(0);
    (0..queries)
        .map(|q| {
            let lists: Vec<Vec<Option<usize>>> = members
                .iter()
                .map(|m| member_labels(m, q, k, gallery_labels))
                .collect();
            (0..k).map(|r| vote_at_rank(&lists, r, k)).collect()
        })
        .collect()
}

/// The labels of member `m`'s first `k` neighbours of query `q` (`None`: index out of range).
fn member_labels(
    m: &Neighbors,
    q: usize,
    k: usize,
    gallery_labels: &[usize],
) -> Vec<Option<usize>> {
    m.of(q)
        .iter()
        .take(k)
        .map(|&g| gallery_labels.get(g as usize).copied())
        .collect()
}

/// The winning label at 0-based rank `r` of the members' label lists (see `vote_ranked_labels`).
/// A rank where no member names a valid label yields `usize::MAX`, which matches no query label.
fn vote_at_rank(lists: &[Vec<Option<usize>>], r: usize, k: usize) -> usize {
    let mut counts: Vec<(usize, usize)> = Vec::new(); // (label, votes)
    for label in lists.iter().filter_map(|l| l.get(r).copied().flatten()) {
        match counts.iter_mut().find(|(l, _)| *l == label) {
            Some((_, c)) => *c += 1,
            None => counts.push((label, 1)),
        }
    }
    let Some(top) = counts.iter().map(|&(_, c)| c).max() else {
        return usize::MAX;
    };
    counts
        .iter()
        .filter(|&&(_, c)| c == top)
        .map(|&(label, _)| (rank_sum(lists, label, k), label))
        // Comparing rank sums is comparing mean ranks: every label is averaged over all members.
        .min()
        .map(|(_, label)| label)
        .unwrap_or(usize::MAX)
}

/// Sum over members of the label's first 1-based position in the member's list (k+1 if absent).
fn rank_sum(lists: &[Vec<Option<usize>>], label: usize, k: usize) -> usize {
    lists
        .iter()
        .map(|l| {
            l.iter()
                .position(|&x| x == Some(label))
                .map_or(k + 1, |p| p + 1)
        })
        .sum()
}

/// Recall@k of voted label lists (fractions in [0, 1], like `dml::eval::recall_at_k`): a query
/// is a hit at k if any of its first k voted labels equals its own label. Queries beyond the
/// shorter of `votes` and `query_labels` are ignored.
pub fn recall_from_votes(votes: &[Vec<usize>], query_labels: &[usize], ks: &[usize]) -> Vec<f64> {
    let n = votes.len().min(query_labels.len());
    ks.iter()
        .map(|&k| {
            let hits = votes
                .iter()
                .zip(query_labels)
                .filter(|(v, &l)| v.iter().take(k).any(|&x| x == l))
                .count();
            hits as f64 / n.max(1) as f64
        })
        .collect()
}

/// Maximum-weight assignment of rows to columns (Kuhn-Munkres with potentials, the
/// Jonker-Volgenant shortest-augmenting-path form, O(rows^2 * cols)).
///
/// `weights` is `[rows][cols]`; rows shorter than the longest are padded with 0. Returns, for
/// every row, its column. With rows <= cols every row gets a distinct column; with rows > cols
/// only `cols` rows get one and the others get `usize::MAX`. Non-finite weights are clamped to
/// the finite range (NaN counts as the smallest weight) so the search always terminates.
pub fn hungarian_max(weights: &[Vec<f64>]) -> Vec<usize> {
    let rows = weights.len();
    let cols = weights.iter().map(Vec::len).max().unwrap_or(0);
    if rows == 0 || cols == 0 {
        return vec![usize::MAX; rows];
    }
    let cost = sanitized_costs(weights, rows, cols);
    if rows <= cols {
        min_cost_assignment(&cost, rows, cols)
    } else {
        // Assign every column a row on the transpose, then invert.
        let transposed: Vec<f64> = (0..cols * rows)
            .map(|i| cost[(i % rows) * cols + i / rows])
            .collect();
        let row_of_col = min_cost_assignment(&transposed, cols, rows);
        let mut col_of_row = vec![usize::MAX; rows];
        for (c, &r) in row_of_col.iter().enumerate() {
            col_of_row[r] = c;
        }
        col_of_row
    }
}

/// Row-major `[rows, cols]` costs = -weights, padded with 0 and clamped to finite values.
fn sanitized_costs(weights: &[Vec<f64>], rows: usize, cols: usize) -> Vec<f64> {
    let finite = weights.iter().flatten().copied().filter(|w| w.is_finite());
    let lo = finite.clone().fold(0.0f64, f64::min);
    let hi = finite.fold(0.0f64, f64::max);
    let mut cost = vec![0.0; rows * cols];
    for (r, row) in weights.iter().enumerate() {
        for (c, &w) in row.iter().enumerate() {
            let w = if w.is_nan() { lo } else { w.clamp(lo, hi) };
            cost[r * cols + c] = -w;
        }
    }
    cost
}

/// Minimum-cost assignment of each of `n` rows to a distinct one of `m >= n` columns, on a
/// row-major `[n, m]` cost matrix. Rows are added one at a time; each addition finds the
/// cheapest augmenting path in reduced costs (Dijkstra-like, dense), keeping dual potentials
/// `u` (rows) and `v` (columns) feasible. Index 0 is a sentinel, real rows/columns are 1-based.
fn min_cost_assignment(cost: &[f64], n: usize, m: usize) -> Vec<usize> {
    let cost_at = |i: usize, j: usize| cost[(i - 1) * m + (j - 1)];
    let mut u = vec![0.0f64; n + 1];
    let mut v = vec![0.0f64; m + 1];
    let mut row_of_col = vec![0usize; m + 1];
    let mut way = vec![0usize; m + 1];
    for i in 1..=n {
        row_of_col[0] = i;
        let mut j0 = 0;
        let mut min_v = vec![f64::INFINITY; m + 1];
        let mut used = vec![false; m + 1];
        loop {
            used[j0] = true;
            let i0 = row_of_col[j0];
            let mut delta = f64::INFINITY;
            let mut j1 = 0;
            for j in 1..=m {
                if used[j] {
                    continue;
                }
                let reduced = cost_at(i0, j) - u[i0] - v[j];
                if reduced < min_v[j] {
                    min_v[j] = reduced;
                    way[j] = j0;
                }
                if min_v[j] < delta {
                    delta = min_v[j];
                    j1 = j;
                }
            }
            for j in 0..=m {
                if used[j] {
                    u[row_of_col[j]] += delta;
                    v[j] -= delta;
                } else {
                    min_v[j] -= delta;
                }
            }
            j0 = j1;
            if row_of_col[j0] == 0 {
                break;
            }
        }
        // Flip the augmenting path back to the sentinel.
        while j0 != 0 {
            let j1 = way[j0];
            row_of_col[j0] = row_of_col[j1];
            j0 = j1;
        }
    }
    let mut col_of_row = vec![usize::MAX; n];
    for j in 1..=m {
        if row_of_col[j] != 0 {
            col_of_row[row_of_col[j] - 1] = j - 1;
        }
    }
    col_of_row
}

/// `other`'s cluster ids renamed to best match `reference`: the renaming maximises the number
/// of samples whose two ids agree (Hungarian method on the contingency table
/// `table[a][b] = #{i : reference[i] = a, other[i] = b}`). Ids at or above `k` widen the table
/// rather than being dropped; samples beyond the shorter input do not count towards the table
/// but are still renamed. Returns one id per sample of `other`.
pub fn align_clusters(reference: &[usize], other: &[usize], k: usize) -> Vec<usize> {
    let ids = reference
        .iter()
        .chain(other)
        .map(|&c| c + 1)
        .max()
        .unwrap_or(0)
        .max(k);
    let mut table = vec![vec![0.0f64; ids]; ids];
    for (&a, &b) in reference.iter().zip(other) {
        table[a][b] += 1.0;
    }
    // hungarian_max gives, for each reference id a, the other id b it is matched with.
    let mut rename = vec![0usize; ids];
    for (a, &b) in hungarian_max(&table).iter().enumerate() {
        rename[b] = a;
    }
    other.iter().map(|&b| rename[b]).collect()
}

/// Majority vote of several members' cluster assignments. Every member is aligned to member
/// 0 (`align_clusters`); each sample then takes the id most members give it. Ties go to member
/// 0's id when it is among the tied, otherwise to the smallest tied id. The result has the
/// length of the shortest member.
pub fn vote_clusters(assignments: &[Vec<usize>], k: usize) -> Vec<usize> {
    let Some(first) = assignments.first() else {
        return Vec::new();
    };
    let n = assignments.iter().map(Vec::len).min().unwrap_or(0);
    let aligned: Vec<Vec<usize>> = assignments
        .iter()
        .map(|a| align_clusters(first, a, k))
        .collect();
    (0..n)
        .map(|i| {
            let mut counts: Vec<(usize, usize)> = Vec::new(); // (cluster, votes)
            for member in &aligned {
                match counts.iter_mut().find(|(c, _)| *c == member[i]) {
                    Some((_, v)) => *v += 1,
                    None => counts.push((member[i], 1)),
                }
            }
            let top = counts.iter().map(|&(_, v)| v).max().unwrap_or(0);
            let own = aligned[0][i];
            counts
                .iter()
                .filter(|&&(_, v)| v == top)
                .map(|&(c, _)| (c != own, c))
                .min()
                .map_or(own, |(_, c)| c)
        })
        .collect()
}

/// The mean-embedding ensemble: the members' `[rows, dim]` embeddings averaged row by row,
/// then L2-normalised (a zero row stays zero). Rows are counted from the shortest member; an
/// empty `members` or `dim == 0` gives an empty result.
pub fn mean_embedding(members: &[Vec<f32>], dim: usize) -> Vec<f32> {
    let len = members.iter().map(Vec::len).min().unwrap_or(0);
    if dim == 0 || len < dim {
        return Vec::new();
    }
    let len = len - len % dim;
    let mut mean = vec![0.0f32; len];
    for member in members {
        for (m, &x) in mean.iter_mut().zip(member) {
            *m += x;
        }
    }
    for row in mean.chunks_mut(dim) {
        // Dividing by the member count is skipped: normalisation removes any positive scale.
        let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
        if norm > 0.0 {
            row.iter_mut().for_each(|x| *x /= norm);
        }
    }
    mean
}
