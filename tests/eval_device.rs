//! Device evaluation: neighbours on GPU equal the CPU reference, chunking changes nothing, and
//! Recall@k / MAP@R on hand-computed cases.

use robust_dml::dml::eval::{
    map_at_r, max_r, nearest_neighbors, nearest_neighbors_chunked, recall_at_k, Neighbors,
};
use robust_dml::engine::policy::TopkPlacement;
use robust_dml::engine::testing::{gpu_or_skip, randn};
use robust_dml::engine::Tensor;

fn normalised(n: usize, d: usize, seed: u64) -> Tensor {
    let v = randn(&[n, d], seed).to_vec().unwrap();
    let mut out = Vec::with_capacity(v.len());
    for row in v.chunks(d) {
        let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
        out.extend(row.iter().map(|x| x / norm));
    }
    Tensor::from_cpu(out, &[n, d]).unwrap()
}

#[test]
fn hand_computed_recall_and_map() {
    // 4 queries; neighbours chosen by hand.
    let nn = Neighbors {
        k: 3,
        index: vec![1, 2, 3, 0, 2, 3, 3, 0, 1, 2, 1, 0],
        score: vec![0.0; 12],
    };
    let labels = [0, 0, 1, 1];
    let r = recall_at_k(&nn, &labels, &labels, &[1, 2, 3]);
    // q0: first neighbour 1 (label 0) hit. q1: 0 hit. q2: 3 hit. q3: 2 hit at rank 1.
    assert_eq!(r, vec![1.0, 1.0, 1.0]);
    let nn2 = Neighbors {
        k: 2,
        index: vec![2, 1, 2, 0, 0, 3, 1, 2],
        score: vec![0.0; 8],
    };
    let r2 = recall_at_k(&nn2, &labels, &labels, &[1, 2]);
    // q0: [2(l1),1(l0)] -> R@1 miss, R@2 hit; q1: [2,0] miss, hit; q2: [0,3] miss, hit; q3: [1,2] miss, hit
    assert_eq!(r2, vec![0.0, 1.0]);
    // R = 1 for every query (one other item per class): AP = hit at rank 1.
    assert_eq!(max_r(&labels, &labels, true), 1);
    assert_eq!(map_at_r(&nn, &labels, &labels, true), 1.0);
    assert_eq!(map_at_r(&nn2, &labels, &labels, true), 0.0);
}

#[test]
fn map_at_r_partial_precision() {
    // One query with R = 2 relevant items at ranks 1 and 3: AP@R = (1/1 + 0) / 2 = 0.5
    // (only the first R = 2 ranks count).
    let nn = Neighbors {
        k: 3,
        index: vec![1, 3, 2],
        score: vec![0.0; 3],
    };
    let gl = [0, 0, 0, 1];
    assert_eq!(map_at_r(&nn, &[0], &gl, true), 0.5);
}

#[test]
fn chunking_changes_nothing_on_cpu() {
    let e = normalised(37, 8, 1);
    let full = nearest_neighbors(&e, &e, 5, true).unwrap();
    let tiny = nearest_neighbors_chunked(&e, &e, 5, true, 4 * 7 * 9).unwrap();
    assert_eq!(full.index, tiny.index);
    let q = normalised(11, 8, 2);
    let a = nearest_neighbors(&q, &e, 4, false).unwrap();
    let b = nearest_neighbors_chunked(&q, &e, 4, false, 4 * 10 * 5).unwrap();
    assert_eq!(a.index, b.index);
    // Self never appears among its own neighbours.
    for i in 0..37 {
        assert!(!full.of(i).contains(&(i as u32)));
    }
}

#[test]
fn gpu_neighbours_match_cpu() {
    let Some(gpu) = gpu_or_skip("gpu_neighbours_match_cpu") else {
        return;
    };
    // Both selections: the device kernel (chosen by policy, as CPU adapters select on the host)
    // and the host one (the default on CPU adapters and for large k).
    let default = gpu.policy().expect("a GPU device has a policy");
    for placement in [TopkPlacement::Device, TopkPlacement::Host] {
        let gpu = gpu.with_policy(default.with_topk(placement));
        let e = normalised(45, 16, 3);
        let want = nearest_neighbors(&e, &e, 6, true).unwrap();
        let eg = e.to_device(&gpu).unwrap();
        let got = nearest_neighbors(&eg, &eg, 6, true).unwrap();
        assert_eq!(got.index, want.index, "{placement:?}");
        let chunked = nearest_neighbors_chunked(&eg, &eg, 6, true, 4 * 10 * 16).unwrap();
        assert_eq!(chunked.index, want.index);
        let q = normalised(9, 16, 4);
        let a = nearest_neighbors(&q, &e, 3, false).unwrap();
        let b = nearest_neighbors(&q.to_device(&gpu).unwrap(), &eg, 3, false).unwrap();
        assert_eq!(a.index, b.index, "{placement:?}");
    }
    // Large k (MAP@R's R): selected on the host whatever the adapter.
    let e = normalised(90, 8, 5);
    let want = nearest_neighbors(&e, &e, 70, true).unwrap();
    let got = nearest_neighbors(
        &e.to_device(&gpu).unwrap(),
        &e.to_device(&gpu).unwrap(),
        70,
        true,
    )
    .unwrap();
    assert_eq!(got.index, want.index);
}
