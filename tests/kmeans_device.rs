//! k-means on the GPU against the CPU reference: same seed, same clusters; the empty-cluster
//! rule (farthest point, claimed once, ties to the lower row) on hand-computed starts; the
//! device path really dispatches kernels; the evaluation's clustering on either device.

use std::sync::{Mutex, MutexGuard};

use robust_dml::dml::kmeans::{kmeans_on, lloyd_on, KMeansConfig, KMeansResult};
use robust_dml::dml::metrics::{kmeans, nmi};
use robust_dml::engine::testing::{assert_close, gpu_or_skip};
use robust_dml::engine::{Device, Rng};
use robust_dml::pipeline::evaluate::{clustering, EvalSet};

/// Serialises the GPU tests of this file, so that the dispatch counter sees only its own test.
static GPU_LOCK: Mutex<()> = Mutex::new(());

fn gpu_lock() -> MutexGuard<'static, ()> {
    GPU_LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// `n` rows of dimension `dim` around `k` centres spread over [-3, 3]^dim with noise `spread`;
/// row i belongs to blob i % k. Returns (data, labels).
fn blobs(n: usize, dim: usize, k: usize, spread: f32, seed: u64) -> (Vec<f32>, Vec<usize>) {
    let mut rng = Rng::new(seed);
    let centres: Vec<f32> = (0..k * dim).map(|_| rng.uniform_range(-3.0, 3.0)).collect();
    let mut data = Vec::with_capacity(n * dim);
    let labels: Vec<usize> = (0..n).map(|i| i % k).collect();
    for &l in &labels {
        for d in 0..dim {
            data.push(centres[l * dim + d] + spread * rng.normal());
        }
    }
    (data, labels)
}

fn assert_same_clustering(what: &str, gpu: &KMeansResult, cpu: &KMeansResult) {
    assert_eq!(gpu.assignments, cpu.assignments, "{what}: assignments");
    let rel = (gpu.inertia - cpu.inertia).abs() / cpu.inertia.abs().max(1e-12);
    assert!(
        rel <= 1e-3,
        "{what}: inertia {} on the GPU, {} on the CPU",
        gpu.inertia,
        cpu.inertia
    );
    assert_close(
        &format!("{what}: centroids"),
        &gpu.centroids,
        &cpu.centroids,
        1e-5,
        1e-4,
    );
}

fn both(
    gpu: &Device,
    data: &[f32],
    dim: usize,
    k: usize,
    cfg: &KMeansConfig,
) -> (KMeansResult, KMeansResult) {
    (
        kmeans_on(gpu, data, dim, k, cfg).unwrap(),
        kmeans_on(&Device::Cpu, data, dim, k, cfg).unwrap(),
    )
}

#[test]
fn gpu_matches_cpu_on_separated_blobs() {
    let Some(gpu) = gpu_or_skip("gpu_matches_cpu_on_separated_blobs") else {
        return;
    };
    let _lock = gpu_lock();
    let (data, labels) = blobs(203, 13, 7, 0.05, 11);
    let cfg = KMeansConfig {
        seed: 3,
        ..Default::default()
    };
    let (g, c) = both(&gpu, &data, 13, 7, &cfg);
    assert_same_clustering("blobs", &g, &c);
    // The blobs are recovered, so the comparison is between two right answers.
    assert!((nmi(&labels, &g.assignments).unwrap() - 1.0).abs() < 1e-9);
    // metrics::kmeans is the CPU path.
    assert_eq!(kmeans(&data, 13, 7, &cfg).unwrap(), c);
}

#[test]
fn gpu_matches_cpu_on_overlapping_data() {
    let Some(gpu) = gpu_or_skip("gpu_matches_cpu_on_overlapping_data") else {
        return;
    };
    let _lock = gpu_lock();
    // Overlapping blobs: Lloyd moves the centres for several iterations. Dimension 8 takes the
    // GEMM's vec4 route on CPU adapters (13 above takes the scalar one).
    let (data, _) = blobs(150, 8, 5, 1.5, 12);
    let cfg = KMeansConfig {
        iterations: 20,
        restarts: 2,
        seed: 9,
    };
    let (g, c) = both(&gpu, &data, 8, 5, &cfg);
    assert_same_clustering("overlapping", &g, &c);
}

#[test]
fn gpu_matches_cpu_far_from_the_origin() {
    let Some(gpu) = gpu_or_skip("gpu_matches_cpu_far_from_the_origin") else {
        return;
    };
    let _lock = gpu_lock();
    // Rows near (3000, ..., 3000): ||x||² + ||c||² - 2 x.c cancels ~10^8 down to distances of
    // a few units, losing about as much to rounding; the kernel's exact recomputation of the near
    // candidates must still give the CPU's clusters.
    let (mut data, _) = blobs(90, 6, 4, 1.5, 17);
    for v in &mut data {
        *v += 3000.0;
    }
    let (g, c) = both(&gpu, &data, 6, 4, &KMeansConfig::default());
    assert_same_clustering("far from the origin", &g, &c);
}

#[test]
fn gpu_matches_cpu_with_one_cluster() {
    let Some(gpu) = gpu_or_skip("gpu_matches_cpu_with_one_cluster") else {
        return;
    };
    let _lock = gpu_lock();
    let (data, _) = blobs(31, 6, 3, 0.5, 13);
    let (g, c) = both(&gpu, &data, 6, 1, &KMeansConfig::default());
    assert_same_clustering("k = 1", &g, &c);
    assert!(g.assignments.iter().all(|&a| a == 0));
}

#[test]
fn empty_clusters_from_duplicates_agree() {
    let Some(gpu) = gpu_or_skip("empty_clusters_from_duplicates_agree") else {
        return;
    };
    let _lock = gpu_lock();
    // 4 distinct rows repeated 15 times, 6 clusters: at least 2 clusters are empty after every
    // assignment (coincident centres tie, the lower index wins), so every iteration relocates.
    let (distinct, _) = blobs(4, 5, 4, 0.0, 14);
    let data: Vec<f32> = (0..60)
        .flat_map(|i| distinct[(i % 4) * 5..(i % 4 + 1) * 5].to_vec())
        .collect();
    let (g, c) = both(&gpu, &data, 5, 6, &KMeansConfig::default());
    assert_same_clustering("duplicates", &g, &c);
    let mut used = c.assignments.clone();
    used.sort_unstable();
    used.dedup();
    assert!(used.len() < 6, "no cluster was empty: {used:?}");
    assert_eq!(c.inertia, 0.0);
}

#[test]
fn empty_clusters_take_the_farthest_points() {
    // 1-D rows 0, 1, 3, 10, 11, 12 from centres 1, 11, 100, 200. First assignment: clusters 2
    // and 3 are empty; distances² 1, 0, 4, 1, 0, 1, so cluster 2 takes row 2 (value 3) and
    // cluster 3 the farthest row left, a tie at 1 between rows 0, 3 and 5 won by row 0. Centres
    // 4/3, 11, 3, 0; then rows go to 3, 0, 2, 1, 1, 1, centres 1, 11, 3, 0, and nothing moves.
    let data = [0.0, 1.0, 3.0, 10.0, 11.0, 12.0];
    let init = [1.0, 11.0, 100.0, 200.0];
    let mut devices = vec![("cpu", Device::Cpu)];
    let _lock = gpu_lock();
    if let Some(gpu) = gpu_or_skip("empty_clusters_take_the_farthest_points") {
        devices.push(("gpu", gpu));
    }
    for (name, device) in devices {
        let km = lloyd_on(&device, &data, 1, &init, 20).unwrap();
        assert_eq!(km.assignments, vec![3, 0, 2, 1, 1, 1], "{name}");
        assert_close(
            &format!("{name}: centres"),
            &km.centroids,
            &[1.0, 11.0, 3.0, 0.0],
            1e-6,
            0.0,
        );
        assert!((km.inertia - 2.0).abs() < 1e-6, "{name}: {}", km.inertia);
    }
}

#[test]
fn gpu_path_dispatches_kernels() {
    let Some(gpu) = gpu_or_skip("gpu_path_dispatches_kernels") else {
        return;
    };
    let _lock = gpu_lock();
    let Device::Gpu(ctx) = &gpu else {
        unreachable!("gpu_or_skip returns the GPU")
    };
    let (data, _) = blobs(40, 4, 3, 0.1, 15);
    let cfg = KMeansConfig {
        iterations: 5,
        restarts: 2,
        seed: 1,
    };
    let before = ctx.dispatches();
    kmeans_on(&Device::Cpu, &data, 4, 3, &cfg).unwrap();
    assert_eq!(ctx.dispatches(), before, "the CPU path dispatched kernels");
    kmeans_on(&gpu, &data, 4, 3, &cfg).unwrap();
    // Per restart at least one assignment: norms, GEMM and nearest-centre kernels.
    let ran = ctx.dispatches() - before;
    assert!(ran >= 3 * 2, "the GPU path dispatched only {ran} kernels");
}

#[test]
fn gpu_rejects_bad_arguments() {
    let Some(gpu) = gpu_or_skip("gpu_rejects_bad_arguments") else {
        return;
    };
    let cfg = KMeansConfig::default();
    let data = [0.0f32; 12];
    assert!(kmeans_on(&gpu, &data, 3, 0, &cfg).is_err());
    assert!(kmeans_on(&gpu, &data, 3, 5, &cfg).is_err());
    assert!(kmeans_on(&gpu, &data, 5, 2, &cfg).is_err());
    assert!(kmeans_on(&gpu, &data, 0, 2, &cfg).is_err());
    assert!(lloyd_on(&gpu, &data, 3, &[0.0; 4], 3).is_err());
}

#[test]
fn evaluation_clustering_on_either_device() {
    let Some(gpu) = gpu_or_skip("evaluation_clustering_on_either_device") else {
        return;
    };
    let _lock = gpu_lock();
    let (data, labels) = blobs(45, 8, 5, 0.3, 16);
    let set = EvalSet {
        samples: Vec::new(),
        labels,
        query_count: None,
        classes: 5,
    };
    let on_gpu = clustering(&data, &set, 8, &gpu, 4).unwrap();
    let on_cpu = clustering(&data, &set, 8, &Device::Cpu, 4).unwrap();
    assert_eq!(on_gpu.2, on_cpu.2);
    assert_eq!((on_gpu.0, on_gpu.1), (on_cpu.0, on_cpu.1));
    assert!(on_cpu.0 > 99.0, "NMI {} on well-separated blobs", on_cpu.0);
}
