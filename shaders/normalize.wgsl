// L2 normalisation along one dimension of a tensor viewed as [outer, n, inner]: one workgroup
// of 256 threads per (outer, inner) column, tree reductions in workgroup memory.

struct Params {
    outer: u32,
    n: u32,
    inner: u32,
    eps: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
// Output gradient (backward only; the forward binds x here too).
@group(0) @binding(2) var<storage, read> g: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

const WG: u32 = 256u;

// (sum of x^2, sum of g*x) per thread, reduced together.
var<workgroup> sh: array<vec2<f32>, 256>;

fn tree_sum2(lid: u32) -> vec2<f32> {
    for (var s = WG / 2u; s > 0u; s = s / 2u) {
        workgroupBarrier();
        if (lid < s) {
            sh[lid] = sh[lid] + sh[lid + s];
        }
    }
    workgroupBarrier();
    return sh[0];
}

// y = x / max(||x||, eps)
@compute @workgroup_size(256)
fn l2n_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let col = wg_linear(wid, nwg);
    if (col >= p.outer * p.inner) {
        return;
    }
    let base = (col / p.inner) * p.n * p.inner + col % p.inner;
    var acc = 0.0;
    for (var k = lid; k < p.n; k = k + WG) {
        let v = x[base + k * p.inner];
        acc = acc + v * v;
    }
    sh[lid] = vec2<f32>(acc, 0.0);
    let denom = max(sqrt(tree_sum2(lid).x), p.eps);
    for (var k = lid; k < p.n; k = k + WG) {
        let idx = base + k * p.inner;
        out[idx] = x[idx] / denom;
    }
}

// dx = (g - y (g . y)) / r with y = x / r, where r = ||x|| > eps; dx = g / eps where the norm is clamped.
@compute @workgroup_size(256)
fn l2n_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let col = wg_linear(wid, nwg);
    if (col >= p.outer * p.inner) {
        return;
    }
    let base = (col / p.inner) * p.n * p.inner + col % p.inner;
    var acc = vec2<f32>(0.0, 0.0);
    for (var k = lid; k < p.n; k = k + WG) {
        let idx = base + k * p.inner;
        let v = x[idx];
        acc = acc + vec2<f32>(v * v, g[idx] * v);
    }
    sh[lid] = acc;
    let sums = tree_sum2(lid);
    let r = sqrt(sums.x);
    for (var k = lid; k < p.n; k = k + WG) {
        let idx = base + k * p.inner;
        if (r > p.eps) {
            out[idx] = (g[idx] - (x[idx] / r) * (sums.y / r)) / r;
        } else {
            out[idx] = g[idx] / p.eps;
        }
    }
}
