//! Ensemble inference by voting: hand-computed retrieval votes (ties included), the Hungarian
//! method against brute force, cluster alignment and voting, and the mean embedding.

use std::time::Instant;

use robust_dml::dml::eval::Neighbors;
use robust_dml::robust::ensemble::{
    align_clusters, hungarian_max, mean_embedding, recall_from_votes, vote_clusters,
    vote_ranked_labels,
};

/// A member whose neighbour lists are the given gallery indices, one list per query.
fn member(lists: &[&[u32]]) -> Neighbors {
    let k = lists[0].len();
    let index: Vec<u32> = lists.iter().flat_map(|l| l.iter().copied()).collect();
    let score = vec![0.0; index.len()];
    Neighbors { k, index, score }
}

/// Gallery item i has label i, so index lists below read directly as label lists.
fn identity_labels(n: usize) -> Vec<usize> {
    (0..n).collect()
}

/// Deterministic pseudo-random numbers in [0, 1) (splitmix64), so the tests need no RNG crate.
struct Mix(u64);
impl Mix {
    fn next(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }
    fn matrix(&mut self, rows: usize, cols: usize) -> Vec<Vec<f64>> {
        (0..rows)
            .map(|_| (0..cols).map(|_| self.next() * 20.0 - 5.0).collect())
            .collect()
    }
}

#[test]
fn majority_label_wins_each_rank() {
    // Labels via a non-identity map: gallery items 0..6 have labels [3, 3, 1, 1, 8, 8].
    let labels = vec![3, 3, 1, 1, 8, 8];
    let members = [
        member(&[&[0, 2, 4]]), // 3 1 8
        member(&[&[1, 4, 2]]), // 3 8 1
        member(&[&[2, 3, 5]]), // 1 1 8
    ];
    let votes = vote_ranked_labels(&members, &labels, 3);
    // rank 1: 3,3,1 -> 3; rank 2: 1,8,1 -> 1; rank 3: 8,1,8 -> 8.
    assert_eq!(votes, vec![vec![3, 1, 8]]);
}

/// Tie rules a voter might plausibly (but wrongly, except the first) implement; used to show
/// that the hand-computed cases below tell the correct rule from the wrong ones.
#[derive(Clone, Copy, Debug)]
enum TieRule {
    /// The documented rule: first position, absent = k + 1, averaged over all members.
    MeanRank,
    SmallestLabel,
    /// Absent counts k instead of k + 1.
    AbsentAsK,
    /// Members lacking the label are left out of its mean.
    PresentOnly,
    /// A repeated label is ranked by its last position in a list.
    LastPosition,
}

/// A plain re-statement of the voting rule for one rank of label lists, under `rule`.
fn reference_vote(lists: &[&[usize]], rank: usize, rule: TieRule) -> usize {
    let k = lists[0].len();
    let named: Vec<usize> = lists.iter().map(|l| l[rank]).collect();
    let votes = |x: usize| named.iter().filter(|&&y| y == x).count();
    let top = named.iter().map(|&x| votes(x)).max().unwrap();
    let mean_rank = |x: usize| -> f64 {
        let positions: Vec<Option<usize>> = lists
            .iter()
            .map(|l| match rule {
                TieRule::LastPosition => l.iter().rposition(|&y| y == x),
                _ => l.iter().position(|&y| y == x),
            })
            .collect();
        let absent = match rule {
            TieRule::AbsentAsK => k,
            _ => k + 1,
        };
        let ranks: Vec<f64> = positions
            .iter()
            .filter(|p| !matches!(rule, TieRule::PresentOnly) || p.is_some())
            .map(|p| p.map_or(absent, |p| p + 1) as f64)
            .collect();
        ranks.iter().sum::<f64>() / ranks.len() as f64
    };
    let mut tied: Vec<usize> = named.iter().copied().filter(|&x| votes(x) == top).collect();
    tied.sort_unstable();
    tied.dedup();
    match rule {
        TieRule::SmallestLabel => tied[0],
        _ => *tied
            .iter()
            .min_by(|&&a, &&b| mean_rank(a).total_cmp(&mean_rank(b)).then(a.cmp(&b)))
            .unwrap(),
    }
}

/// Checks the library on `lists` (labels = gallery indices) at rank 1 against `want`, the
/// reference under the documented rule against `want`, and that every rule in `wrong` differs.
fn check_tie_case(lists: &[&[usize]], want: usize, wrong: &[TieRule]) {
    let labels = identity_labels(10);
    let members: Vec<Neighbors> = lists
        .iter()
        .map(|l| member(&[&l.iter().map(|&x| x as u32).collect::<Vec<_>>()]))
        .collect();
    let k = lists[0].len();
    assert_eq!(
        vote_ranked_labels(&members, &labels, k)[0][0],
        want,
        "{lists:?}"
    );
    assert_eq!(reference_vote(lists, 0, TieRule::MeanRank), want);
    for &rule in wrong {
        assert_ne!(
            reference_vote(lists, 0, rule),
            want,
            "{lists:?} does not tell {rule:?} from the documented rule"
        );
    }
}

#[test]
fn tie_goes_to_best_mean_rank_not_smallest_label() {
    // Rank 1: 7 and 2 have one vote each. Mean ranks: 7 -> (1 + 2) / 2 = 1.5,
    // 2 -> (3 + 1) / 2 = 2. The ensemble says 7 though 2 is the smaller label.
    check_tie_case(&[&[7, 9, 2], &[2, 7, 7]], 7, &[TieRule::SmallestLabel]);
    // Rank 2: 9 vs 7: 9 -> (2 + 4) / 2 = 3, 7 -> 1.5. Rank 3: 2 vs 7 as at rank 1.
    let labels = identity_labels(10);
    let members = [member(&[&[7, 9, 2]]), member(&[&[2, 7, 7]])];
    assert_eq!(
        vote_ranked_labels(&members, &labels, 3),
        vec![vec![7, 7, 7]]
    );
}

#[test]
fn absent_label_counts_k_plus_one() {
    // Rank 1: 7 vs 2, one vote each. 7 -> (1 + 3) / 2 = 2; 2 is absent from member 0's top-3
    // -> (4 + 1) / 2 = 2.5: 7 wins. Absent as k (3) ties at 2 and hands it to 2 (smaller);
    // leaving member 0 out of 2's mean gives 2 a mean of 1.
    check_tie_case(
        &[&[7, 9, 9], &[2, 2, 7]],
        7,
        &[
            TieRule::SmallestLabel,
            TieRule::AbsentAsK,
            TieRule::PresentOnly,
        ],
    );
}

#[test]
fn repeated_label_ranked_by_first_position() {
    // Rank 1: 6 vs 4. 6 -> first positions (1 + 2) / 2 = 1.5, 4 -> (3 + 1) / 2 = 2: 6 wins.
    // By last positions 6 -> (2 + 2) / 2 = 2 ties 4 and the smaller label 4 would win.
    check_tie_case(
        &[&[6, 6, 4], &[4, 6, 1]],
        6,
        &[TieRule::SmallestLabel, TieRule::LastPosition],
    );
}

#[test]
fn full_tie_goes_to_smallest_label() {
    // Mirror lists: 5 and 3 tie in votes and in mean rank (1.5) at every rank -> 3.
    check_tie_case(&[&[5, 3], &[3, 5]], 3, &[]);
    let labels = identity_labels(10);
    let members = [member(&[&[5, 3]]), member(&[&[3, 5]])];
    assert_eq!(vote_ranked_labels(&members, &labels, 2), vec![vec![3, 3]]);
}

#[test]
fn several_queries_and_capped_k() {
    let labels = identity_labels(10);
    let members = [
        member(&[&[1, 2, 3], &[4, 5, 6]]),
        member(&[&[1, 3, 2], &[5, 5, 6]]),
        member(&[&[2, 3, 1], &[5, 4, 9]]),
    ];
    // Asking for more ranks than the lists hold gives the lists' length.
    let votes = vote_ranked_labels(&members, &labels, 10);
    assert_eq!(votes.len(), 2);
    assert!(votes.iter().all(|v| v.len() == 3));
    // q0 rank 1: 1,1,2 -> 1. q1 rank 1: 4,5,5 -> 5; rank 2: 5,5,4 -> 5.
    assert_eq!(votes[0][0], 1);
    assert_eq!(&votes[1][..2], &[5, 5]);
    assert!(vote_ranked_labels(&[], &labels, 3).is_empty());
}

#[test]
fn recall_from_votes_counts_hits_in_first_k() {
    let votes = vec![vec![1, 2, 3], vec![5, 5, 5], vec![0, 0, 9]];
    let query_labels = [2, 5, 7];
    let r = recall_from_votes(&votes, &query_labels, &[1, 2, 3]);
    assert_eq!(r, vec![1.0 / 3.0, 2.0 / 3.0, 2.0 / 3.0]);
}

fn permutations(n: usize) -> Vec<Vec<usize>> {
    if n == 0 {
        return vec![vec![]];
    }
    let mut out = Vec::new();
    for p in permutations(n - 1) {
        for pos in 0..=p.len() {
            let mut q = p.clone();
            q.insert(pos, n - 1);
            out.push(q);
        }
    }
    out
}

fn weight(w: &[Vec<f64>], cols: &[usize]) -> f64 {
    cols.iter()
        .enumerate()
        .filter(|&(_, &c)| c != usize::MAX)
        .map(|(r, &c)| w[r][c])
        .sum()
}

fn assert_distinct_columns(cols: &[usize], width: usize) {
    let mut seen = vec![false; width];
    for &c in cols.iter().filter(|&&c| c != usize::MAX) {
        assert!(c < width, "column {c} out of range {width}");
        assert!(!seen[c], "column {c} used twice");
        seen[c] = true;
    }
}

#[test]
fn hungarian_matches_brute_force() {
    let mut rng = Mix(7);
    for n in [1, 2, 3, 5, 6] {
        for _ in 0..20 {
            let w = rng.matrix(n, n);
            let got = hungarian_max(&w);
            assert_eq!(got.len(), n);
            assert!(got.iter().all(|&c| c != usize::MAX));
            assert_distinct_columns(&got, n);
            let best = permutations(n)
                .iter()
                .map(|p| weight(&w, p))
                .fold(f64::NEG_INFINITY, f64::max);
            assert!(
                (weight(&w, &got) - best).abs() < 1e-9,
                "n={n}: hungarian {} vs brute force {best}",
                weight(&w, &got)
            );
        }
    }
}

#[test]
fn hungarian_rectangular_matches_brute_force() {
    let mut rng = Mix(11);
    for (rows, cols) in [(3, 5), (5, 3), (2, 6), (6, 4)] {
        for _ in 0..10 {
            let w = rng.matrix(rows, cols);
            let got = hungarian_max(&w);
            assert_eq!(got.len(), rows);
            assert_distinct_columns(&got, cols);
            assert_eq!(
                got.iter().filter(|&&c| c != usize::MAX).count(),
                rows.min(cols)
            );
            // Brute force on the square padding: rows or columns beyond the matrix weigh 0.
            let n = rows.max(cols);
            let best = permutations(n)
                .iter()
                .map(|p| {
                    (0..rows)
                        .filter(|&r| p[r] < cols)
                        .map(|r| w[r][p[r]])
                        .sum::<f64>()
                })
                .fold(f64::NEG_INFINITY, f64::max);
            assert!(
                (weight(&w, &got) - best).abs() < 1e-9,
                "{rows}x{cols}: {} vs {best}",
                weight(&w, &got)
            );
        }
    }
}

/// Greedy assignment: take the heaviest remaining entry whose row and column are free.
fn greedy(w: &[Vec<f64>]) -> f64 {
    let n = w.len();
    let mut entries: Vec<(f64, usize, usize)> = (0..n)
        .flat_map(|r| (0..n).map(move |c| (w[r][c], r, c)))
        .collect();
    entries.sort_by(|a, b| b.0.total_cmp(&a.0));
    let (mut row_used, mut col_used) = (vec![false; n], vec![false; n]);
    let mut total = 0.0;
    for (x, r, c) in entries {
        if !row_used[r] && !col_used[c] {
            row_used[r] = true;
            col_used[c] = true;
            total += x;
        }
    }
    total
}

#[test]
fn hungarian_large_is_fast_and_beats_greedy() {
    let n = 150;
    let w = Mix(3).matrix(n, n);
    let start = Instant::now();
    let got = hungarian_max(&w);
    // Timing is not asserted (tests never assert speed); the size keeps an O(n^4) regression visible.
    let _ = start;
    assert_eq!(got.len(), n);
    let mut sorted = got.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..n).collect::<Vec<_>>(), "not a permutation");
    let (opt, greedy) = (weight(&w, &got), greedy(&w));
    assert!(opt >= greedy - 1e-9, "hungarian {opt} < greedy {greedy}");
}

#[test]
fn hungarian_handles_degenerate_inputs() {
    assert!(hungarian_max(&[]).is_empty());
    // All-equal and non-finite weights still give a permutation.
    let got = hungarian_max(&vec![vec![1.0; 4]; 4]);
    assert_distinct_columns(&got, 4);
    let got = hungarian_max(&[vec![f64::NAN, 1.0], vec![f64::INFINITY, f64::NEG_INFINITY]]);
    assert_eq!(got, vec![1, 0]);
}

#[test]
fn align_clusters_recovers_a_permutation_of_ids() {
    let k = 4;
    let reference: Vec<usize> = (0..40).map(|i| (i * 7 + i / 3) % k).collect();
    let perm = [2, 0, 3, 1];
    let mut other: Vec<usize> = reference.iter().map(|&c| perm[c]).collect();
    assert_eq!(align_clusters(&reference, &other, k), reference);
    // With a few disagreements the majority mapping still wins.
    other[0] = (other[0] + 1) % k;
    other[5] = (other[5] + 2) % k;
    let aligned = align_clusters(&reference, &other, k);
    let agree = aligned
        .iter()
        .zip(&reference)
        .filter(|(a, b)| a == b)
        .count();
    assert_eq!(agree, reference.len() - 2);
}

#[test]
fn vote_clusters_majority_after_relabelling() {
    let k = 3;
    let m0 = vec![0, 0, 1, 1, 2, 2, 0];
    // Member 1 is member 0 with ids renamed (0->2, 1->0, 2->1) and sample 6 moved.
    let m1 = vec![2, 2, 0, 0, 1, 1, 1];
    // Member 2 disagrees with both on samples 0 and 6 but mostly agrees after renaming.
    let m2 = vec![1, 0, 2, 2, 1, 1, 0];
    // Aligned to m0: m1 -> [0,0,1,1,2,2,2]; m2 (0->0, 2->1, 1->2) -> [2,0,1,1,2,2,0].
    assert_eq!(align_clusters(&m0, &m1, k), vec![0, 0, 1, 1, 2, 2, 2]);
    assert_eq!(align_clusters(&m0, &m2, k), vec![2, 0, 1, 1, 2, 2, 0]);
    let voted = vote_clusters(&[m0.clone(), m1.clone(), m2.clone()], k);
    // Sample 0: 0,0,2 -> 0. Sample 6: 0,2,0 -> 0.
    assert_eq!(voted, vec![0, 0, 1, 1, 2, 2, 0]);
    // Two members where they disagree: member 0 decides the tie.
    assert_eq!(vote_clusters(&[m1.clone(), m0.clone()], k), {
        // Aligned to m1 ids: m0 -> [2,2,0,0,1,1,2], m1 says 1 at sample 6.
        vec![2, 2, 0, 0, 1, 1, 1]
    });
    assert!(vote_clusters(&[], k).is_empty());
}

#[test]
fn vote_clusters_three_way_tie_goes_to_member_zero() {
    // Identity-aligned members (same partition ids elsewhere) that split three ways on sample 3.
    let m0 = vec![0, 1, 2, 2, 1, 2];
    let m1 = vec![0, 1, 2, 1, 1, 2];
    let m2 = vec![0, 1, 2, 0, 1, 2];
    assert_eq!(
        vote_clusters(&[m0, m1, m2], 3),
        vec![0, 1, 2, 2, 1, 2],
        "member 0's id must win a full tie (not the smallest or the last)"
    );
}

#[test]
fn mean_embedding_is_normalised_average() {
    let dim = 3;
    let a = vec![1.0, 0.0, 0.0, 0.0, 3.0, 4.0];
    let b = vec![0.0, 1.0, 0.0, 0.0, -3.0, -4.0];
    let mean = mean_embedding(&[a, b], dim);
    let h = std::f32::consts::FRAC_1_SQRT_2;
    let want = [h, h, 0.0, 0.0, 0.0, 0.0];
    for (g, w) in mean.iter().zip(want) {
        assert!((g - w).abs() < 1e-6, "{mean:?} vs {want:?}");
    }
    assert_eq!(mean.len(), 6);

    let c = vec![0.2, -0.5, 0.1, 0.3, 0.3, 0.9];
    let d = vec![0.4, 0.1, -0.7, 0.0, 0.6, 0.2];
    let mean = mean_embedding(&[c.clone(), d.clone()], dim);
    for (r, row) in mean.chunks(dim).enumerate() {
        let norm: f32 = row.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "row {r} norm {norm}");
        // Parallel to the plain sum of the members.
        let sum: Vec<f32> = (0..dim).map(|j| c[r * dim + j] + d[r * dim + j]).collect();
        let sum_norm: f32 = sum.iter().map(|x| x * x).sum::<f32>().sqrt();
        for j in 0..dim {
            assert!((row[j] - sum[j] / sum_norm).abs() < 1e-5);
        }
    }
}
