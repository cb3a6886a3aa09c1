// Reductions. A tensor reduced along one dimension is viewed as [outer, n, inner]; one
// workgroup of 256 threads reduces one (outer, inner) column with a tree in workgroup memory.
// Whole-tensor sums run in passes: every pass turns CHUNK values into one partial sum, until
// one value is left (no float atomics).

struct Params {
    outer: u32,
    n: u32,
    inner: u32,
    op: u32,
    scale: f32,
}

const WG: u32 = 256u;
// Values folded into one partial sum by one workgroup of `sum_partial` (8 per thread).
const CHUNK: u32 = 2048u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
// Forward output (logsumexp backward only).
@group(0) @binding(2) var<storage, read> y: array<f32>;
// Output gradient (backward entries only).
@group(0) @binding(3) var<storage, read> g: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

// What reduce_dim and expand_dim compute (Rust: reduce::DIM_CODES).
const REDUCE_SCALED_SUM: u32 = 0u;  // sum * scale (sum, mean)
const REDUCE_LOGSUMEXP: u32 = 1u;   // shifted by the column maximum
// What sum_partial adds up in its first pass (Rust: reduce::SUM_CODES).
const SUM_OF_VALUES: u32 = 0u;
const SUM_OF_SQUARES: u32 = 1u;

#include "workgroup_reduce.wgsl"

@compute @workgroup_size(256)
fn reduce_dim(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let col = wg_linear(wid, nwg);
    if (col >= p.outer * p.inner) {
        return;
    }
    let o = col / p.inner;
    let i = col % p.inner;
    let base = o * p.n * p.inner + i;
    if (p.op == REDUCE_SCALED_SUM) {
        var acc = 0.0;
        for (var k = lid; k < p.n; k = k + WG) {
            acc = acc + x[base + k * p.inner];
        }
        let total = wg_sum(lid, acc);
        if (lid == 0u) {
            out[col] = total * p.scale;
        }
    } else {
        var m = -3.4028235e38;
        for (var k = lid; k < p.n; k = k + WG) {
            m = max(m, x[base + k * p.inner]);
        }
        let col_max = wg_max(lid, m);
        var acc = 0.0;
        for (var k = lid; k < p.n; k = k + WG) {
            acc = acc + exp(x[base + k * p.inner] - col_max);
        }
        let total = wg_sum(lid, acc);
        if (lid == 0u) {
            out[col] = col_max + log(total);
        }
    }
}

// One pass of a whole-tensor sum: out[w] = scale * sum of x[w*CHUNK .. (w+1)*CHUNK), with
// each value squared first when op == 1 (sum of squares, for gradient norms).
@compute @workgroup_size(256)
fn sum_partial(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let w = wg_linear(wid, nwg);
    let start = w * CHUNK;
    if (start >= p.n) {
        return;
    }
    var acc = 0.0;
    // Consecutive threads read consecutive values on every step (coalesced).
    for (var k = 0u; k < CHUNK / WG; k = k + 1u) {
        let idx = start + k * WG + lid;
        if (idx < p.n) {
            let v = x[idx];
            acc = acc + select(v, v * v, p.op == SUM_OF_SQUARES);
        }
    }
    let total = wg_sum(lid, acc);
    if (lid == 0u) {
        out[w] = total * p.scale;
    }
}

// Backward of the reductions along a dimension, one thread per input element:
// g[col] * scale (REDUCE_SCALED_SUM), g[col] * exp(x - y[col]) (REDUCE_LOGSUMEXP).
@compute @workgroup_size(256)
fn expand_dim(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let idx = wg_linear(wid, nwg) * WG + lid;
    if (idx >= p.outer * p.n * p.inner) {
        return;
    }
    let o = idx / (p.n * p.inner);
    let i = idx % p.inner;
    let col = o * p.inner + i;
    if (p.op == REDUCE_SCALED_SUM) {
        out[idx] = g[col] * p.scale;
    } else {
        out[idx] = g[col] * exp(x[idx] - y[col]);
    }
}
