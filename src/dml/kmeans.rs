//! k-means for the clustering metrics (docs/DESIGN.md, Metrics): k-means++ seeding, restarts, Lloyd
//! iterations, an empty cluster takes the farthest point. One Lloyd loop drives two backends:
//! the CPU reference (plain loops) and the GPU (`engine::ops::kmeans`: `shaders/kmeans.wgsl` plus
//! the engine's GEMM).
//!
//! What stays on the host on both devices, so that a seed gives the same run on either: the
//! k-means++ seeding (its random draws and distance updates), the convergence test and the
//! per-iteration member lists (O(n) work on the assignments, which the convergence test reads
//! anyway). The GPU does the O(n k dim) distances and the O(n dim) centroid means; the data is
//! uploaded once per call.

use crate::engine::cpu;
use crate::engine::error::{invalid, EngineError, Result};
use crate::engine::ops::kmeans::{Assignment, KmeansPoints};
use crate::engine::{Device, Rng, Tensor};

/// k-means settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KMeansConfig {
    /// Lloyd iterations per restart.
    pub iterations: usize,
    /// Independent k-means++ initialisations; the lowest inertia wins.
    pub restarts: usize,
    pub seed: u64,
}

impl Default for KMeansConfig {
    fn default() -> Self {
        KMeansConfig {
            iterations: 20,
            restarts: 3,
            seed: 0,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct KMeansResult {
    /// Cluster of every row, in `0..k`.
    pub assignments: Vec<usize>,
    /// `[k, D]` centroids.
    pub centroids: Vec<f32>,
    /// Sum of squared distances of the rows to their centroids.
    pub inertia: f64,
}

/// k-means with k-means++ initialisation, `cfg.restarts` restarts (lowest inertia kept) and
/// `cfg.iterations` Lloyd iterations each, deterministic from `cfg.seed`. CPU reference.
pub fn kmeans(data: &[f32], dim: usize, k: usize, cfg: &KMeansConfig) -> Result<KMeansResult> {
    kmeans_on(&Device::Cpu, data, dim, k, cfg)
}

/// [`kmeans`] on `device`. On the GPU the distances and centroid means run in kernels; the
/// seeding and restarts draw the same random numbers as on the CPU, so with the same seed both
/// devices start from the same centres (and, up to float rounding, end at the same clusters).
pub fn kmeans_on(
    device: &Device,
    data: &[f32],
    dim: usize,
    k: usize,
    cfg: &KMeansConfig,
) -> Result<KMeansResult> {
    check_args("kmeans", data, dim, k)?;
    match device {
        Device::Cpu => best_of_restarts(cfg, |rng| {
            let init = kmeans_pp(data, dim, k, rng);
            lloyd(&mut CpuLloyd::new(data, dim, init), k, cfg.iterations)
        }),
        Device::Gpu(_) => {
            let points = KmeansPoints::upload(device, data, dim, k)?;
            best_of_restarts(cfg, |rng| {
                let init = kmeans_pp(data, dim, k, rng);
                lloyd(&mut GpuLloyd::new(&points, &init)?, k, cfg.iterations)
            })
        }
    }
}

/// Lloyd iterations from the given `[k, D]` centres on `device` (no seeding, no restarts): the
/// inner loop of [`kmeans_on`], public so that tests can force particular starts (an empty
/// cluster, for instance).
pub fn lloyd_on(
    device: &Device,
    data: &[f32],
    dim: usize,
    init: &[f32],
    iterations: usize,
) -> Result<KMeansResult> {
    let k = init.len().checked_div(dim).unwrap_or(0);
    check_args("lloyd_on", data, dim, k)?;
    if init.len() != k * dim {
        return invalid(
            "lloyd_on",
            format!(
                "{} initial centre values, not a multiple of dim {dim}",
                init.len()
            ),
        );
    }
    match device {
        Device::Cpu => lloyd(&mut CpuLloyd::new(data, dim, init.to_vec()), k, iterations),
        Device::Gpu(_) => {
            let points = KmeansPoints::upload(device, data, dim, k)?;
            lloyd(&mut GpuLloyd::new(&points, init)?, k, iterations)
        }
    }
}

fn check_args(op: &'static str, data: &[f32], dim: usize, k: usize) -> Result<()> {
    if dim == 0 || !data.len().is_multiple_of(dim) {
        return invalid(
            op,
            format!("data length {} not a multiple of dim {dim}", data.len()),
        );
    }
    let n = data.len() / dim;
    if k == 0 || k > n {
        return invalid(
            op,
            format!("k = {k} must be in 1..={n} (the number of rows)"),
        );
    }
    Ok(())
}

/// Runs one k-means per restart, each from its own generator forked off `cfg.seed`, and keeps
/// the lowest inertia (the first on ties).
fn best_of_restarts(
    cfg: &KMeansConfig,
    mut run: impl FnMut(&mut Rng) -> Result<KMeansResult>,
) -> Result<KMeansResult> {
    let mut rng = Rng::new(cfg.seed);
    let mut best: Option<KMeansResult> = None;
    for restart in 0..cfg.restarts.max(1) {
        let mut run_rng = rng.fork(restart as u64);
        let result = run(&mut run_rng)?;
        if best.as_ref().is_none_or(|b| result.inertia < b.inertia) {
            best = Some(result);
        }
    }
    Ok(best.expect("at least one restart"))
}

fn sq_dist(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

/// k-means++ seeding: the first centre uniformly, each next one with probability proportional to
/// the squared distance to the nearest centre chosen so far. Host only on both devices, so
/// that the draws and the cumulative sums they land in are the same bits everywhere.
fn kmeans_pp(data: &[f32], dim: usize, k: usize, rng: &mut Rng) -> Vec<f32> {
    use rayon::prelude::*;
    let n = data.len() / dim;
    let row = |i: usize| &data[i * dim..(i + 1) * dim];
    let mut centroids = row(rng.below(n)).to_vec();
    let mut d2: Vec<f64> = (0..n)
        .into_par_iter()
        .map(|i| sq_dist(row(i), &centroids[..dim]) as f64)
        .collect();
    for _ in 1..k {
        let total: f64 = d2.iter().sum();
        let pick = if total <= 0.0 {
            rng.below(n)
        } else {
            let target = rng.uniform() as f64 * total;
            let mut acc = 0.0;
            d2.iter()
                .position(|&d| {
                    acc += d;
                    acc > target
                })
                .unwrap_or(n - 1)
        };
        let c = row(pick).to_vec();
        // Each entry depends on its own row only, so splitting over threads keeps the bits.
        d2.par_iter_mut().enumerate().for_each(|(i, d)| {
            *d = d.min(sq_dist(row(i), &c) as f64);
        });
        centroids.extend_from_slice(&c);
    }
    centroids
}

/// The rows of every cluster for the next centroid update, in CSR form: cluster c's rows are
/// `rows[offsets[c]..offsets[c + 1]]`, ascending. An empty cluster gets one row, the farthest
/// from its centroid that no other empty cluster took (as sklearn does), so its new centre is
/// that point; the point also stays in its own cluster.
struct Members {
    offsets: Vec<usize>,
    rows: Vec<usize>,
}

impl Members {
    /// `distances` (squared, of the current assignment) is only called when a cluster is empty.
    fn plan(
        assignments: &[usize],
        k: usize,
        distances: impl FnOnce() -> Result<Vec<f32>>,
    ) -> Result<Members> {
        let n = assignments.len();
        let mut counts = vec![0usize; k];
        for &c in assignments {
            counts[c] += 1;
        }
        let mut farthest = FarthestFirst::default();
        if counts.contains(&0) {
            farthest.d2 = distances()?;
            farthest.taken = vec![false; n];
        }
        let mut offsets = Vec::with_capacity(k + 1);
        offsets.push(0);
        for &count in &counts {
            offsets.push(offsets.last().copied().unwrap_or(0) + count.max(1));
        }
        let mut rows = vec![0usize; offsets[k]];
        let mut fill = offsets[..k].to_vec();
        for (i, &c) in assignments.iter().enumerate() {
            rows[fill[c]] = i;
            fill[c] += 1;
        }
        for c in 0..k {
            if counts[c] == 0 {
                rows[offsets[c]] = farthest.claim();
            }
        }
        Ok(Members { offsets, rows })
    }

    fn of(&self, c: usize) -> &[usize] {
        &self.rows[self.offsets[c]..self.offsets[c + 1]]
    }
}

/// Hands out the rows farthest from their centroids, each at most once; ties go to the lower row.
#[derive(Default)]
struct FarthestFirst {
    d2: Vec<f32>,
    taken: Vec<bool>,
}

impl FarthestFirst {
    fn claim(&mut self) -> usize {
        let far = (0..self.d2.len())
            .filter(|&i| !self.taken[i])
            .max_by(|&a, &b| self.d2[a].total_cmp(&self.d2[b]).then(b.cmp(&a)))
            .unwrap_or(0);
        if let Some(t) = self.taken.get_mut(far) {
            *t = true;
        }
        far
    }
}

/// What the Lloyd loop needs from a device.
trait LloydBackend {
    /// Assigns every row to its nearest current centre (ties to the lower centre index).
    fn assign(&mut self) -> Result<Vec<usize>>;
    /// Squared distances of the rows to their centres in the last assignment.
    fn distances(&mut self) -> Result<Vec<f32>>;
    /// Replaces every centre by the mean of its member rows.
    fn update(&mut self, members: &Members) -> Result<()>;
    /// The centres and the inertia (sum of the last assignment's squared distances).
    fn finish(&mut self) -> Result<(Vec<f32>, f64)>;
}

/// Lloyd iterations until the assignments stop changing or `iterations` updates ran.
fn lloyd(backend: &mut impl LloydBackend, k: usize, iterations: usize) -> Result<KMeansResult> {
    let mut assignments = backend.assign()?;
    for _ in 0..iterations {
        let members = Members::plan(&assignments, k, || backend.distances())?;
        backend.update(&members)?;
        let next = backend.assign()?;
        let converged = next == assignments;
        assignments = next;
        if converged {
            break;
        }
    }
    let (centroids, inertia) = backend.finish()?;
    Ok(KMeansResult {
        assignments,
        centroids,
        inertia,
    })
}

fn inertia(d2: &[f32]) -> f64 {
    d2.iter().map(|&d| d as f64).sum()
}

// ------------------------------------------------------------------------------------ CPU

struct CpuLloyd<'a> {
    data: &'a [f32],
    dim: usize,
    centroids: Vec<f32>,
    d2: Vec<f32>,
}

impl<'a> CpuLloyd<'a> {
    fn new(data: &'a [f32], dim: usize, centroids: Vec<f32>) -> Self {
        CpuLloyd {
            data,
            dim,
            centroids,
            d2: Vec::new(),
        }
    }
}

impl LloydBackend for CpuLloyd<'_> {
    fn assign(&mut self) -> Result<Vec<usize>> {
        let (assignments, d2) = assign(self.data, self.dim, &self.centroids);
        self.d2 = d2;
        Ok(assignments)
    }

    fn distances(&mut self) -> Result<Vec<f32>> {
        Ok(self.d2.clone())
    }

    fn update(&mut self, members: &Members) -> Result<()> {
        let dim = self.dim;
        for (c, centre) in self.centroids.chunks_mut(dim).enumerate() {
            // f64 sums in row order: the reference the GPU's compensated f32 sums approach.
            let rows = members.of(c);
            let mut sums = vec![0f64; dim];
            for &i in rows {
                for (s, &x) in sums.iter_mut().zip(&self.data[i * dim..(i + 1) * dim]) {
                    *s += x as f64;
                }
            }
            for (dst, s) in centre.iter_mut().zip(sums) {
                *dst = (s / rows.len() as f64) as f32;
            }
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<(Vec<f32>, f64)> {
        Ok((self.centroids.clone(), inertia(&self.d2)))
    }
}

/// Rows per task of [`assign`]: one GEMM of this many rows against every centre.
const ASSIGN_ROWS: usize = 256;

/// Assigns every row to its nearest centroid (in parallel); returns (assignments, distances²).
/// Ties go to the lower centroid index (strict `<` in index order).
///
/// The products x.c of all rows and centres come from one SGEMM per block of rows; each row's
/// candidates are the centres whose ||x||² + ||c||² - 2 x.c lies within twice a rounding bound
/// of the smallest, and among them the exact [`sq_dist`] decides. The bound covers the error of
/// both the expansion and `sq_dist`, so the centre with the smallest exact distance is always
/// a candidate: the result is bit for bit that of the plain loops ([`assign_reference`]).
fn assign(data: &[f32], dim: usize, centroids: &[f32]) -> (Vec<usize>, Vec<f32>) {
    use rayon::prelude::*;
    let n = data.len() / dim;
    let k = centroids.len() / dim;
    let centre_sq: Vec<f32> = centroids.chunks(dim).map(|c| cpu::lane_dot(c, c)).collect();
    let largest_centre = centre_sq.iter().fold(0.0f32, |m, &v| m.max(v)).sqrt();
    let mut nearest = vec![(0usize, f32::INFINITY); n];
    nearest
        .par_chunks_mut(ASSIGN_ROWS)
        .enumerate()
        .for_each(|(block, out)| {
            let first = block * ASSIGN_ROWS;
            let x = &data[first * dim..(first + out.len()) * dim];
            let mut products = vec![0.0f32; out.len() * k];
            cpu::sgemm(
                (out.len(), k, dim),
                x,
                cpu::Strides::rows(dim),
                centroids,
                cpu::Strides::transposed(dim),
                &mut products,
                k,
                false,
                false,
            );
            for ((row, o), dots) in x.chunks(dim).zip(out.iter_mut()).zip(products.chunks(k)) {
                let row_sq = cpu::lane_dot(row, row);
                let estimate = |c: usize| row_sq + centre_sq[c] - 2.0 * dots[c];
                let smallest = (0..k).map(estimate).fold(f32::INFINITY, f32::min);
                let slack = 2.0 * rounding_bound(dim, row_sq.sqrt() + largest_centre);
                let limit = smallest + slack;
                let candidate = |c: &usize| !limit.is_finite() || estimate(*c) <= limit;
                *o = nearest_of(row, centroids, dim, (0..k).filter(candidate));
            }
        });
    nearest.into_iter().unzip()
}

/// A bound on |(||x||² + ||c||² - 2 x.c) - sq_dist(x, c)| in f32 for vectors of `dim` entries
/// with ||x|| + ||c|| <= `norms`: each side is within about (dim + 2) u (||x|| + ||c||)² of
/// the true value (u = EPSILON / 2); twice that again for safety.
fn rounding_bound(dim: usize, norms: f32) -> f32 {
    2.0 * (dim as f32 + 4.0) * f32::EPSILON * norms * norms
}

/// The centre among `candidates` (ascending) nearest to `x` by exact [`sq_dist`], the first on
/// ties; (0, inf) when none is finite, as the plain loops give.
fn nearest_of(
    x: &[f32],
    centroids: &[f32],
    dim: usize,
    candidates: impl Iterator<Item = usize>,
) -> (usize, f32) {
    let mut best = (0usize, f32::INFINITY);
    for c in candidates {
        let d = sq_dist(x, &centroids[c * dim..(c + 1) * dim]);
        if d < best.1 {
            best = (c, d);
        }
    }
    best
}

/// The plain loops [`assign`] must agree with bit for bit: every row against every centre.
#[cfg(test)]
fn assign_reference(data: &[f32], dim: usize, centroids: &[f32]) -> (Vec<usize>, Vec<f32>) {
    let k = centroids.len() / dim;
    data.chunks(dim)
        .map(|x| nearest_of(x, centroids, dim, 0..k))
        .unzip()
}

// ------------------------------------------------------------------------------------ GPU

/// One Lloyd run on the device (the kernels are `engine::ops::kmeans`); the centres never
/// leave it until [`LloydBackend::finish`].
struct GpuLloyd<'a> {
    points: &'a KmeansPoints,
    /// `[k, D]`.
    centroids: Tensor,
    /// The latest assignment, on the device.
    last: Option<Assignment>,
}

impl<'a> GpuLloyd<'a> {
    fn new(points: &'a KmeansPoints, init: &[f32]) -> Result<Self> {
        Ok(GpuLloyd {
            points,
            centroids: points.centres(init)?,
            last: None,
        })
    }

    fn last(&self) -> Result<&Assignment> {
        self.last
            .as_ref()
            .ok_or_else(|| EngineError::Gpu("k-means: no assignment made yet".into()))
    }
}

impl LloydBackend for GpuLloyd<'_> {
    fn assign(&mut self) -> Result<Vec<usize>> {
        let k = self.points.k();
        let assignment = self.points.assign_nearest(&self.centroids)?;
        let assign = assignment.assign.to_vec()?;
        self.last = Some(assignment);
        // The host indexes with these: a broken kernel must give an error, not a panic.
        assign
            .into_iter()
            .map(|c| match c as usize {
                c if c < k => Ok(c),
                _ => Err(EngineError::Gpu(format!(
                    "k-means assignment kernel returned centre {c} of {k}"
                ))),
            })
            .collect()
    }

    fn distances(&mut self) -> Result<Vec<f32>> {
        self.last()?.d2.to_vec()
    }

    fn update(&mut self, members: &Members) -> Result<()> {
        let csr: Vec<f32> = members
            .offsets
            .iter()
            .chain(&members.rows)
            .map(|&i| i as f32)
            .collect();
        self.centroids = self.points.centroid_means(&csr, self.last()?)?;
        Ok(())
    }

    fn finish(&mut self) -> Result<(Vec<f32>, f64)> {
        let d2 = self.last()?.d2.to_vec()?;
        Ok((self.centroids.to_vec()?, inertia(&d2)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::testing::randn;

    fn check(data: &[f32], dim: usize, centroids: &[f32]) {
        let (fast, reference) = (
            assign(data, dim, centroids),
            assign_reference(data, dim, centroids),
        );
        assert_eq!(fast.0, reference.0, "assignments differ");
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&fast.1), bits(&reference.1), "distances differ");
    }

    /// Odd shapes, a block boundary, ties (repeated centres, rows equidistant from two), rows
    /// far from the origin (the expansion cancels badly there) and non-finite rows.
    #[test]
    fn gemm_assignment_matches_the_plain_loops() {
        for (n, dim, k, seed) in [
            (1, 1, 1, 1),
            (37, 13, 7, 2),
            (2 * ASSIGN_ROWS + 5, 33, 11, 3),
        ] {
            let data = randn(&[n * dim], seed).to_vec().unwrap();
            let mut centroids = randn(&[k * dim], seed + 100).to_vec().unwrap();
            check(&data, dim, &centroids);
            // A repeated centre: exact ties go to the lower index.
            if k > 2 {
                let (first, rest) = centroids.split_at_mut(dim);
                rest[dim..2 * dim].copy_from_slice(first);
            }
            check(&data, dim, &centroids);
            let shifted: Vec<f32> = data.iter().map(|v| v * 1e-3 + 1e3).collect();
            let near: Vec<f32> = centroids.iter().map(|v| v * 1e-3 + 1e3).collect();
            check(&shifted, dim, &near);
        }
        // Rows at the midpoint of two centres, and non-finite rows.
        let centroids = [0.0, 0.0, 2.0, 0.0, 0.0, 2.0];
        let data = [
            1.0,
            0.0,
            1.0,
            1.0,
            f32::NAN,
            0.0,
            f32::INFINITY,
            1.0,
            3e38,
            3e38,
        ];
        check(&data, 2, &centroids);
    }
}
