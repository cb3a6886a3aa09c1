// k-means on the device (src/dml/kmeans.rs): squared row norms, the assignment step (nearest
// centre from a GEMM of products, near-ties settled with exact distances) and the update step
// (centroid means over host-built member lists). Indices travel as f32 (exact below 2^24).
// One invocation per item, 64 per workgroup, on a grid the host may fold into 2-D.

struct Params {
    n: u32,     // rows of the data
    k: u32,     // centres
    dim: u32,
    count: u32, // items of this dispatch
}

@group(0) @binding(0) var<uniform> p: Params;
// [n, dim]
@group(0) @binding(1) var<storage, read> data: array<f32>;
// [k, dim]: read by sqnorms and assign_nearest, written by centroid_means.
@group(0) @binding(2) var<storage, read_write> centroids: array<f32>;
// n + k squared norms: the rows', then the centres'.
@group(0) @binding(3) var<storage, read_write> norms: array<f32>;
// [n, k] products x . c
@group(0) @binding(4) var<storage, read> gram: array<f32>;
// [n] nearest centre index and its squared distance.
@group(0) @binding(5) var<storage, read_write> assign: array<f32>;
@group(0) @binding(6) var<storage, read_write> d2: array<f32>;
// CSR member lists: k + 1 offsets, then the row indices of each cluster.
@group(0) @binding(7) var<storage, read> members: array<f32>;

const WG: u32 = 64u;

// Relative width of the band of near-best centres whose distances are recomputed exactly: well
// above the rounding of ||x||² + ||c||² - 2 x.c (about dim x 1.2e-7 of the norms at worst, far
// less in practice), so the exact comparison decides every close call.
const NEAR_TIE: f32 = 2e-4;

fn item(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return wg_linear(wid, nwg) * WG + lid;
}

// norms[j] = ||row j||² for the rows of [data; centroids].
@compute @workgroup_size(64)
fn sqnorms(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_index) lid: u32) {
    let j = item(wid, nwg, lid);
    if (j >= p.count) { return; }
    var s = 0.0;
    if (j < p.n) {
        let base = j * p.dim;
        for (var d = 0u; d < p.dim; d++) { let v = data[base + d]; s += v * v; }
    } else {
        let base = (j - p.n) * p.dim;
        for (var d = 0u; d < p.dim; d++) { let v = centroids[base + d]; s += v * v; }
    }
    norms[j] = s;
}

// ||x_i - c||² summed in dimension order, as the CPU reference does.
fn exact_sq_dist(i: u32, c: u32) -> f32 {
    let xb = i * p.dim;
    let cb = c * p.dim;
    var s = 0.0;
    for (var d = 0u; d < p.dim; d++) {
        let t = data[xb + d] - centroids[cb + d];
        s += t * t;
    }
    return s;
}

// The nearest centre of row i: the GEMM distances find the best and every centre within the
// near-tie band of it; among those the exact distances decide, ties to the lower index (strict
// < in index order, as the CPU reference).
@compute @workgroup_size(64)
fn assign_nearest(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_index) lid: u32) {
    let i = item(wid, nwg, lid);
    if (i >= p.count) { return; }
    let xn = norms[i];
    let row = i * p.k;
    var best = 0.0;
    var widest = 0.0;
    for (var c = 0u; c < p.k; c++) {
        let cn = norms[p.n + c];
        let d = xn + cn - 2.0 * gram[row + c];
        if (c == 0u || d < best) { best = d; }
        widest = max(widest, cn);
    }
    let band = best + NEAR_TIE * (xn + widest);
    var best_c = 0u;
    var best_d = 0.0;
    var found = false;
    for (var c = 0u; c < p.k; c++) {
        let d = xn + norms[p.n + c] - 2.0 * gram[row + c];
        if (d <= band) {
            let exact = exact_sq_dist(i, c);
            if (!found || exact < best_d) {
                best_c = c;
                best_d = exact;
                found = true;
            }
        }
    }
    assign[i] = f32(best_c);
    d2[i] = best_d;
}

// centroids[c, d] = mean over the member rows of cluster c of data[row, d]. The sum runs over
// the deviations from the first member, in member order, with compensation: the mean of
// identical points is then that point exactly, as with the CPU reference's f64 sums (a plain
// f32 sum of 15 copies divided by 15 can miss by an ulp, which turns exact ties between
// coincident centres into wins for the other one). The host gives every cluster at least one
// member (an empty one gets its farthest point).
@compute @workgroup_size(64)
fn centroid_means(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_index) lid: u32) {
    let j = item(wid, nwg, lid);
    if (j >= p.count) { return; }
    let c = j / p.dim;
    let d = j % p.dim;
    let start = u32(members[c]);
    let end = u32(members[c + 1u]);
    let rows = p.k + 1u;
    let origin = data[u32(members[rows + start]) * p.dim + d];
    var s = 0.0;
    var lost = 0.0;
    for (var m = start + 1u; m < end; m++) {
        let y = (data[u32(members[rows + m]) * p.dim + d] - origin) - lost;
        let t = s + y;
        lost = (t - s) - y;
        s = t;
    }
    centroids[j] = origin + (s - lost) / f32(max(end - start, 1u));
}
