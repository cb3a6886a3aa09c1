//! DML metrics: hand-computed Recall@k / MAP@R / F1, NMI against scikit-learn, retrieval against a
//! numpy brute force (fixtures from tests/fixtures/make_metric_fixtures.py), k-means recovery.

use robust_dml::dml::metrics::{
    cluster_scores, f1_pairs, kmeans, map_at_r, nmi, recall_at_k, recall_at_k_query_gallery,
    ClusterScores, KMeansConfig,
};
use robust_dml::engine::Rng;

fn close(what: &str, got: f64, want: f64, tol: f64) {
    assert!(
        (got - want).abs() <= tol,
        "{what}: got {got}, want {want} (tol {tol})"
    );
}

fn unit(deg: f32) -> [f32; 2] {
    let r = deg.to_radians();
    [r.cos(), r.sin()]
}

fn flat(points: &[[f32; 2]]) -> Vec<f32> {
    points.iter().flatten().copied().collect()
}

#[test]
fn recall_at_k_hand_computed() {
    // sims: p0.p1 = 0.8, p0.p2 = 0, p0.p3 = -1, p1.p2 = 0.6, p1.p3 = -0.8, p2.p3 = 0.
    let emb = flat(&[[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]]);
    let labels = [0, 0, 1, 1];
    // p0 -> p1 hit; p1 -> p0 hit; p2 -> p1, p0, p3 (tie broken by index): hit only at 3;
    // p3 -> p2 hit.
    let r = recall_at_k(&emb, 2, &labels, &[1, 2, 3]).unwrap();
    close("R@1", r[0], 0.75, 1e-12);
    close("R@2", r[1], 0.75, 1e-12);
    close("R@3", r[2], 1.0, 1e-12);
    // The query itself is never its own neighbour: with two identical points of different
    // labels, R@1 must be 0.
    let dup = flat(&[[1.0, 0.0], [1.0, 0.0]]);
    assert_eq!(recall_at_k(&dup, 2, &[0, 1], &[1]).unwrap(), vec![0.0]);
    assert_eq!(recall_at_k(&dup, 2, &[3, 3], &[1]).unwrap(), vec![1.0]);
}

#[test]
fn recall_query_gallery_does_not_drop_self() {
    let q = flat(&[[1.0, 0.0], [0.0, 1.0]]);
    let g = flat(&[[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]);
    // q0's nearest is g0 (same vector, other label), then g1 (its label); q1's nearest is g2.
    let r = recall_at_k_query_gallery(&q, &[0, 1], &g, &[1, 0, 1], 2, &[1, 2]).unwrap();
    close("R@1", r[0], 0.5, 1e-12);
    close("R@2", r[1], 1.0, 1e-12);
}

#[test]
fn map_at_r_hand_computed() {
    let emb = flat(&[[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]]);
    // R = 1 for everyone; only p2 misses its top-1.
    close(
        "MAP@R",
        map_at_r(&emb, 2, &[0, 0, 1, 1]).unwrap(),
        0.75,
        1e-12,
    );
    // Class A at 0, 10, 45 degrees, B (lone, left out) at 25: R = 2 for each A.
    // 0deg: [10 (A), 25 (B)] -> 1/2; 10deg: [0 (A), 25 (B)] -> 1/2; 45deg: [25 (B), 10 (A)] -> (1/2)/2.
    let emb = flat(&[unit(0.0), unit(10.0), unit(25.0), unit(45.0)]);
    let want = (0.5 + 0.5 + 0.25) / 3.0;
    close(
        "MAP@R",
        map_at_r(&emb, 2, &[0, 0, 1, 0]).unwrap(),
        want,
        1e-9,
    );
}

#[test]
fn f1_pairs_hand_computed() {
    // Cells (0,0)=2, (0,1)=1, (1,1)=2: TP = 2; clusters of 2 and 3: 1 + 3 = 4 pairs -> P = 1/2;
    // classes of 3 and 2: 3 + 1 = 4 pairs -> R = 1/2; F1 = 1/2.
    close(
        "F1",
        f1_pairs(&[0, 0, 0, 1, 1], &[0, 0, 1, 1, 1]).unwrap(),
        0.5,
        1e-12,
    );
    close(
        "F1 perfect",
        f1_pairs(&[0, 0, 1, 1], &[7, 7, 3, 3]).unwrap(),
        1.0,
        1e-12,
    );
    // One big cluster: P = 2 / C(4,2) = 1/3, R = 1 -> F1 = 0.5.
    close(
        "F1 one cluster",
        f1_pairs(&[0, 0, 1, 1], &[0, 0, 0, 0]).unwrap(),
        0.5,
        1e-12,
    );
    close(
        "F1 singletons",
        f1_pairs(&[0, 0, 1, 1], &[0, 1, 2, 3]).unwrap(),
        0.0,
        1e-12,
    );
    assert!(f1_pairs(&[0, 1], &[0]).is_err());
}

fn fixtures() -> serde_json::Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/metric_fixtures.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn usizes(v: &serde_json::Value) -> Vec<usize> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect()
}

#[test]
fn nmi_matches_sklearn() {
    let fx = fixtures();
    let cases = fx["nmi"].as_array().unwrap();
    assert!(cases.len() >= 8);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let got = nmi(&usizes(&case["labels"]), &usizes(&case["clusters"])).unwrap();
        close(name, got, case["nmi"].as_f64().unwrap(), 1e-9);
    }
}

#[test]
fn retrieval_matches_numpy_brute_force() {
    let fx = fixtures();
    for (i, case) in fx["retrieval"].as_array().unwrap().iter().enumerate() {
        let dim = case["dim"].as_u64().unwrap() as usize;
        let emb: Vec<f32> = case["embeddings"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        let labels = usizes(&case["labels"]);
        let ks = usizes(&case["ks"]);
        let recall = recall_at_k(&emb, dim, &labels, &ks).unwrap();
        for (j, want) in case["recall"].as_array().unwrap().iter().enumerate() {
            close(
                &format!("case {i} R@{}", ks[j]),
                recall[j],
                want.as_f64().unwrap(),
                1e-12,
            );
        }
        close(
            &format!("case {i} MAP@R"),
            map_at_r(&emb, dim, &labels).unwrap(),
            case["map_at_r"].as_f64().unwrap(),
            1e-9,
        );
    }
}

/// `per` points around each of `k` well-separated unit-norm centres in `dim` dimensions.
fn blobs(k: usize, per: usize, dim: usize, spread: f32, seed: u64) -> (Vec<f32>, Vec<usize>) {
    let mut rng = Rng::new(seed);
    let mut data = Vec::new();
    let mut labels = Vec::new();
    for c in 0..k {
        // Centres on distinct axes (scaled) are far apart compared with the spread.
        let mut centre = vec![0f32; dim];
        centre[c % dim] = if c < dim { 1.0 } else { -1.0 };
        for _ in 0..per {
            let mut p: Vec<f32> = centre.iter().map(|&x| x + spread * rng.normal()).collect();
            let norm = p.iter().map(|x| x * x).sum::<f32>().sqrt();
            p.iter_mut().for_each(|x| *x /= norm);
            data.extend(p);
            labels.push(c);
        }
    }
    (data, labels)
}

#[test]
fn kmeans_recovers_separated_clusters() {
    let (data, labels) = blobs(6, 12, 4, 0.05, 1);
    let cfg = KMeansConfig::default();
    let km = kmeans(&data, 4, 6, &cfg).unwrap();
    assert_eq!(km.assignments.len(), labels.len());
    assert_eq!(km.centroids.len(), 6 * 4);
    close("NMI", nmi(&labels, &km.assignments).unwrap(), 1.0, 1e-9);
    close("F1", f1_pairs(&labels, &km.assignments).unwrap(), 1.0, 1e-9);
    // Deterministic for a fixed seed.
    assert_eq!(kmeans(&data, 4, 6, &cfg).unwrap(), km);
    let scores = cluster_scores(&data, 4, &labels, &cfg).unwrap();
    close("cluster NMI", scores.nmi, 1.0, 1e-9);
    // Recall@1 on the same blobs is perfect too.
    assert_eq!(recall_at_k(&data, 4, &labels, &[1]).unwrap(), vec![1.0]);
}

/// The clustering metrics are the same bits on every call and with 1, 2 or 3 threads. NMI sums
/// floats over the contingency cells, so their order must come from the data alone: a `HashMap`
/// (its hash keys change with every instance) made the NMI's last digits differ from call to
/// call, which this test caught (8 of 8 runs failed before the cells were ordered).
#[test]
fn cluster_scores_are_bit_identical_across_calls_and_thread_counts() {
    // Overlapping blobs, so that the clusters mix the labels and the contingency has many cells.
    let (data, labels) = blobs(20, 15, 8, 0.8, 3);
    let cfg = KMeansConfig::default();
    let bits = |s: ClusterScores| (s.nmi.to_bits(), s.f1.to_bits());
    let scores = || cluster_scores(&data, 8, &labels, &cfg).unwrap();
    let clusters = || kmeans(&data, 8, 20, &cfg).unwrap();
    let (first, first_clusters) = (scores(), clusters());
    assert!(first.nmi > 0.0 && first.nmi < 1.0, "{first:?}");
    for call in 1..8 {
        assert_eq!(bits(scores()), bits(first), "call {call}: {first:?}");
    }
    for threads in [1, 2, 3] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        assert_eq!(
            bits(pool.install(scores)),
            bits(first),
            "{threads} threads differ from the default pool"
        );
        assert_eq!(
            pool.install(clusters),
            first_clusters,
            "k-means with {threads} threads differs from the default pool"
        );
    }
}

#[test]
fn kmeans_restarts_never_worse() {
    let (data, _) = blobs(5, 10, 3, 0.4, 2);
    let one = kmeans(
        &data,
        3,
        5,
        &KMeansConfig {
            restarts: 1,
            ..Default::default()
        },
    )
    .unwrap();
    let many = kmeans(
        &data,
        3,
        5,
        &KMeansConfig {
            restarts: 6,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(many.inertia <= one.inertia + 1e-9);
    assert!(one.assignments.iter().all(|&c| c < 5));
}

#[test]
fn metrics_reject_bad_shapes() {
    assert!(recall_at_k(&[1.0, 0.0, 0.0], 2, &[0], &[1]).is_err());
    assert!(recall_at_k(&[1.0, 0.0, 0.0, 1.0], 2, &[0], &[1]).is_err());
    assert!(recall_at_k(&[1.0, 0.0, 0.0, 1.0], 2, &[0, 1], &[0]).is_err());
    assert!(kmeans(&[1.0, 0.0], 2, 2, &KMeansConfig::default()).is_err());
    assert!(nmi(&[], &[]).is_err());
}

fn eval_set(
    labels: &[usize],
    query_count: Option<usize>,
) -> robust_dml::pipeline::evaluate::EvalSet {
    use robust_dml::data::{ImageSource, Sample};
    let samples = labels
        .iter()
        .map(|&label| Sample {
            source: ImageSource::File(format!("img{label}.png").into()),
            label,
        })
        .collect();
    robust_dml::pipeline::evaluate::EvalSet {
        samples,
        labels: labels.to_vec(),
        query_count,
        classes: 1 + labels.iter().max().copied().unwrap_or(0),
    }
}

/// Capping a class-ordered test set keeps every class (a prefix would keep the first few).
#[test]
fn capped_eval_set_spreads_over_classes() {
    use robust_dml::pipeline::evaluate::spread_indices;
    assert_eq!(spread_indices(10, 4), vec![0, 2, 5, 7]);
    assert_eq!(spread_indices(3, 5), vec![0, 1, 2]);
    let labels: Vec<usize> = (0..5).flat_map(|c| [c; 10]).collect();
    let capped = eval_set(&labels, None).capped(10);
    assert_eq!(capped.labels, vec![0, 0, 1, 1, 2, 2, 3, 3, 4, 4]);
    assert_eq!(capped.classes, 5);
    assert_eq!(eval_set(&labels, None).capped(0).labels.len(), 50);
    // Queries and gallery are thinned separately and the cut moves with them.
    let capped = eval_set(&labels, Some(20)).capped(10);
    assert_eq!(capped.query_count, Some(4));
    assert_eq!(capped.labels, vec![0, 0, 1, 1, 2, 2, 3, 3, 4, 4]);
}
