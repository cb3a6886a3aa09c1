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

#include "workgroup_reduce.wgsl"

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
    let denom = max(sqrt(wg_sum(lid, acc)), p.eps);
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
    // (sum of x^2, sum of g*x), reduced together.
    let sums = wg_sum2(lid, acc);
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
