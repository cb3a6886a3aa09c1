// Proxy Anchor loss (Kim et al. 2020) from the cosine matrix cos [B, C] and the labels.
// Per proxy c, over the batch rows x:
//   positive term log(1 + sum_{y_x = c}  exp(-alpha (cos - delta)))
//   negative term log(1 + sum_{y_x != c} exp( alpha (cos + delta)))
// each a log-sum-exp over {0, z...}: shifted by max(0, max z), so alpha = 32 cannot overflow.

struct Params {
    b: u32,
    c: u32,
    alpha: f32,
    delta: f32,
    // 1 / |P+| (proxies with a positive in the batch) and 1 / C (all proxies).
    inv_pos: f32,
    inv_c: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
// cos [B, C] (forward, backward) or the per-proxy terms [2C] (total).
@group(0) @binding(1) var<storage, read> a: array<f32>;
// Class index of each row, as exact small floats.
@group(0) @binding(2) var<storage, read> labels: array<f32>;
// Per-proxy log-sum-exps [2C]: positive terms, then negative terms (backward).
@group(0) @binding(3) var<storage, read> lse: array<f32>;
// Gradient of the loss, one value (backward).
@group(0) @binding(4) var<storage, read> g: array<f32>;
@group(0) @binding(5) var<storage, read_write> out: array<f32>;

const WG: u32 = 256u;

#include "workgroup_reduce.wgsl"

fn is_positive(row: u32, proxy: u32) -> bool {
    return u32(labels[row]) == proxy;
}

// The exponent of row `row` for proxy `proxy`: positive or negative form by its label.
fn exponent(row: u32, proxy: u32) -> f32 {
    let s = a[row * p.c + proxy];
    return select(p.alpha * (s + p.delta), -p.alpha * (s - p.delta), is_positive(row, proxy));
}

// One workgroup per proxy: out[c] = positive log-sum-exp, out[C + c] = negative one.
@compute @workgroup_size(256)
fn pa_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let proxy = wg_linear(wid, nwg);
    if (proxy >= p.c) {
        return;
    }
    // Maxima start at 0: the zero exponent of the "1 +" is part of each set.
    var m = vec2<f32>(0.0, 0.0);
    for (var row = lid; row < p.b; row = row + WG) {
        let z = exponent(row, proxy);
        if (is_positive(row, proxy)) {
            m.x = max(m.x, z);
        } else {
            m.y = max(m.y, z);
        }
    }
    let mx = wg_max2(lid, m);
    var acc = vec2<f32>(0.0, 0.0);
    for (var row = lid; row < p.b; row = row + WG) {
        let z = exponent(row, proxy);
        if (is_positive(row, proxy)) {
            acc.x = acc.x + exp(z - mx.x);
        } else {
            acc.y = acc.y + exp(z - mx.y);
        }
    }
    let sums = wg_sum2(lid, acc);
    if (lid == 0u) {
        out[proxy] = mx.x + log(exp(-mx.x) + sums.x);
        out[p.c + proxy] = mx.y + log(exp(-mx.y) + sums.y);
    }
}

// One workgroup: loss = sum_c pos[c] / |P+| + sum_c neg[c] / C (a proxy without positives has
// pos[c] = log(1) = 0, so summing over all proxies equals summing over P+).
@compute @workgroup_size(256)
fn pa_total(@builtin(local_invocation_index) lid: u32) {
    var acc = 0.0;
    for (var k = lid; k < p.c; k = k + WG) {
        acc = acc + a[k] * p.inv_pos + a[p.c + k] * p.inv_c;
    }
    let total = wg_sum(lid, acc);
    if (lid == 0u) {
        out[0] = total;
    }
}

// d loss / d cos[x, c], one thread per element: the softmax weight of the exponent within its
// log-sum-exp, times d z / d cos (-alpha or alpha) and the term's 1/|P+| or 1/C.
@compute @workgroup_size(256)
fn pa_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let idx = wg_linear(wid, nwg) * WG + lid;
    if (idx >= p.b * p.c) {
        return;
    }
    let row = idx / p.c;
    let proxy = idx % p.c;
    let z = exponent(row, proxy);
    var d: f32;
    if (is_positive(row, proxy)) {
        d = -p.alpha * p.inv_pos * exp(z - lse[proxy]);
    } else {
        d = p.alpha * p.inv_c * exp(z - lse[p.c + proxy]);
    }
    out[idx] = g[0] * d;
}
