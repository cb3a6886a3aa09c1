// Batch norm 2d. Per-channel work runs one workgroup per channel (strided loop over N*H*W and a
// tree reduction in workgroup memory); everything else is one elementwise "affine" pass whose
// per-channel coefficients the reductions compute.
//
// Per-channel buffer `chan` (planar, C values per slot):
//   forward:  [mean | invstd | new running mean | new running var | a | b | m | d]
//   backward: [dgamma | dbeta | a | b | m | d]
// and the affine pass computes, per element of channel c (coefficients at p.coef_off):
//   FORM_FORWARD:  b * (v - m) + d          (forward: v = x)
//   FORM_SCALE_U:  b * u                    (eval-mode dx = gamma * invstd * g, from forward coefs)
//   FORM_TRAIN_DX: a * u + b * (v - m) + d  (training dx: u = g, v = x)
//
// Element addressing avoids a division per element: a workgroup covers P = max(1, 256 / HW)
// planes of HWC = min(HW, 256) positions, so each thread splits its index once.

struct Params {
    n: u32,          // batch
    c: u32,          // channels
    hw: u32,         // H * W
    planes: u32,     // P: planes one workgroup pass covers
    hwc: u32,        // positions of a plane one workgroup pass covers
    form: u32,       // affine FORM_*, or MODE_* of the reductions
    coef_off: u32,   // offset of the a coefficients in `chan`
    momentum: f32,
    eps: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;        // input (u operand of affine)
@group(0) @binding(2) var<storage, read> g: array<f32>;        // output grad (v operand of affine)
@group(0) @binding(3) var<storage, read> gamma: array<f32>;
@group(0) @binding(4) var<storage, read> beta: array<f32>;
@group(0) @binding(5) var<storage, read> run_mean: array<f32>;
@group(0) @binding(6) var<storage, read> run_var: array<f32>;
@group(0) @binding(7) var<storage, read_write> chan: array<f32>;
@group(0) @binding(8) var<storage, read_write> out: array<f32>;

const WG: u32 = 256u;

// Forms of the affine pass (Rust: batchnorm::FORM_CODES).
const FORM_FORWARD: u32 = 0u;
const FORM_SCALE_U: u32 = 1u;
const FORM_TRAIN_DX: u32 = 2u;
// Modes of the reductions (Rust: batchnorm::MODE_CODES); partial: per-chunk results, when x
// exceeds one binding.
const MODE_TRAIN: u32 = 0u;
const MODE_EVAL: u32 = 1u;
const MODE_PARTIAL: u32 = 2u;

#include "workgroup_reduce.wgsl"

// First element index of plane (n, c).
fn plane_base(n: u32, c: u32) -> u32 {
    return (n * p.c + c) * p.hw;
}

// Writes the forward per-channel slots of channel c from its element count, mean and M2 (sum of
// squared deviations from the mean).
fn write_forward_stats(c: u32, count: f32, mean: f32, m2: f32) {
    let var_biased = m2 / count;
    let invstd = 1.0 / sqrt(var_biased + p.eps);
    let var_unbiased = m2 / (count - 1.0);
    let k = p.c;
    chan[c] = mean;
    chan[k + c] = invstd;
    chan[2u * k + c] = (1.0 - p.momentum) * run_mean[c] + p.momentum * mean;
    chan[3u * k + c] = (1.0 - p.momentum) * run_var[c] + p.momentum * var_unbiased;
    chan[4u * k + c] = 0.0;
    chan[5u * k + c] = gamma[c] * invstd;
    chan[6u * k + c] = mean;
    chan[7u * k + c] = beta[c];
}

// Batch statistics of channel c in one pass over x, stable in f32: each thread accumulates
// sums shifted by the first value it reads (so they stay near the data's spread, not its
// offset), then the workgroup merges (count, mean, M2) triples with Chan's formula. Thread 0
// writes the statistics, the new running statistics and the forward affine coefficients; in
// partial mode (p.form == MODE_PARTIAL, x one batch chunk of a tensor over a binding) it writes just the
// triple, at chan[p.coef_off + {0, C, 2C} + c], for bn_combine_stats.
var<workgroup> red_n: array<f32, 256>;
var<workgroup> red_a: array<f32, 256>;
var<workgroup> red_b: array<f32, 256>;

@compute @workgroup_size(256)
fn bn_batch_stats(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_index) lid: u32) {
    let c = wg_linear(wid, nwg);
    if (c >= p.c) {
        return; // uniform per workgroup
    }
    let sub = lid / p.hwc;
    let start = lid % p.hwc;
    var cnt = 0.0;
    var s1 = 0.0;
    var s2 = 0.0;
    var shift = 0.0;
    if (sub < p.planes && sub < p.n && start < p.hw) {
        shift = x[plane_base(sub, c) + start];
        for (var n = sub; n < p.n; n += p.planes) {
            let base = plane_base(n, c);
            for (var h = start; h < p.hw; h += p.hwc) {
                let d = x[base + h] - shift;
                s1 += d;
                s2 += d * d;
                cnt += 1.0;
            }
        }
    }
    var mean_t = shift;
    var m2_t = 0.0;
    if (cnt > 0.0) {
        mean_t = shift + s1 / cnt;
        m2_t = max(s2 - s1 * s1 / cnt, 0.0);
    }
    red_n[lid] = cnt;
    red_a[lid] = mean_t;
    red_b[lid] = m2_t;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        if (lid < s) {
            let na = red_n[lid];
            let nb = red_n[lid + s];
            let n = na + nb;
            if (nb > 0.0) {
                let delta = red_a[lid + s] - red_a[lid];
                red_a[lid] += delta * nb / n;
                red_b[lid] += red_b[lid + s] + delta * delta * na * nb / n;
                red_n[lid] = n;
            }
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        if (p.form == MODE_PARTIAL) {
            chan[p.coef_off + c] = red_n[0];
            chan[p.coef_off + p.c + c] = red_a[0];
            chan[p.coef_off + 2u * p.c + c] = red_b[0];
        } else {
            write_forward_stats(c, red_n[0], red_a[0], red_b[0]);
        }
    }
}

// Merges the per-chunk (count, mean, M2) triples of bn_batch_stats' partial mode, read from x
// (p.n chunks of 3C values), with Chan's formula; one thread per channel.
@compute @workgroup_size(64)
fn bn_combine_stats(@builtin(global_invocation_id) gid: vec3<u32>) {
    let c = gid.x;
    if (c >= p.c) {
        return;
    }
    let k = p.c;
    var count = 0.0;
    var mean = 0.0;
    var m2 = 0.0;
    for (var j = 0u; j < p.n; j++) {
        let base = 3u * k * j;
        let nb = x[base + c];
        if (nb > 0.0) {
            let total = count + nb;
            let delta = x[base + k + c] - mean;
            mean += delta * nb / total;
            m2 += x[base + 2u * k + c] + delta * delta * count * nb / total;
            count = total;
        }
    }
    write_forward_stats(c, count, mean, m2);
}

// Eval mode: the same per-channel layout from the running statistics (one thread per channel).
@compute @workgroup_size(64)
fn bn_eval_stats(@builtin(global_invocation_id) gid: vec3<u32>) {
    let c = gid.x;
    if (c >= p.c) {
        return;
    }
    let k = p.c;
    let invstd = 1.0 / sqrt(run_var[c] + p.eps);
    chan[c] = run_mean[c];
    chan[k + c] = invstd;
    chan[2u * k + c] = run_mean[c];
    chan[3u * k + c] = run_var[c];
    chan[4u * k + c] = 0.0;
    chan[5u * k + c] = gamma[c] * invstd;
    chan[6u * k + c] = run_mean[c];
    chan[7u * k + c] = beta[c];
}

// The per-channel affine pass. Grid: x over chunks of a plane, y channel, z groups of planes.
// Each thread handles AFFINE_ITEMS elements of its channel so that the coefficient loads are
// amortised (CPU adapters execute a storage load indexed by the workgroup id lane by lane; a
// workgroup-memory broadcast is slower there because of the barrier). Loads and the
// single store stay outside the form branches, which CPU adapters also run under lane masks.
const AFFINE_ITEMS: u32 = 16u;

fn affine_one(i: u32, a: f32, b: f32, m: f32, d: f32) {
    if (p.form == FORM_SCALE_U) {
        out[i] = b * x[i];
        return;
    }
    let v = g[i];
    var u = 0.0;
    if (p.form == FORM_TRAIN_DX) {
        u = x[i];
    }
    out[i] = a * u + b * (v - m) + d;
}

@compute @workgroup_size(256)
fn bn_affine(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let c = wid.y;
    let a = chan[p.coef_off + c];
    let b = chan[p.coef_off + p.c + c];
    let m = chan[p.coef_off + 2u * p.c + c];
    let d = chan[p.coef_off + 3u * p.c + c];
    if (p.planes == 1u) {
        // A plane spans at least a workgroup: walk it in steps of 256 (no integer division,
        // which CPU adapters scalarise).
        let base = plane_base(wid.z, c);
        let end = base + min(p.hw, (wid.x + 1u) * (256u * AFFINE_ITEMS));
        for (var i = base + wid.x * (256u * AFFINE_ITEMS) + lid; i < end; i += 256u) {
            affine_one(i, a, b, m, d);
        }
    } else {
        let sub = lid / p.hwc;
        let h = lid % p.hwc;
        if (sub < p.planes) {
            for (var j = 0u; j < AFFINE_ITEMS; j++) {
                let n = (wid.z * AFFINE_ITEMS + j) * p.planes + sub;
                if (n < p.n) {
                    affine_one(plane_base(n, c) + h, a, b, m, d);
                }
            }
        }
    }
}

// Backward reduction of channel c: dbeta = sum g, dgamma = sum g * xhat with
// xhat = (x - mean) * invstd from the forward's `chan` (batch or running statistics).
// Writes out = [dgamma | dbeta | a | b | m | d]; in training mode (p.form == MODE_TRAIN) the
// coefficients give dx = gamma * invstd * (g - mean(g) - xhat * mean(g * xhat)).
@compute @workgroup_size(256)
fn bn_grad_reduce(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_index) lid: u32) {
    let c = wg_linear(wid, nwg);
    if (c >= p.c) {
        return;
    }
    let k = p.c;
    let mean = chan[c];
    let invstd = chan[k + c];
    let sub = lid / p.hwc;
    let start = lid % p.hwc;
    var sg = 0.0;
    var sgx = 0.0;
    if (sub < p.planes) {
        for (var n = sub; n < p.n; n += p.planes) {
            let base = plane_base(n, c);
            for (var h = start; h < p.hw; h += p.hwc) {
                let gv = g[base + h];
                sg += gv;
                sgx += gv * (x[base + h] - mean);
            }
        }
    }
    let sums = wg_sum2(lid, vec2<f32>(sg, sgx));
    if (lid == 0u) {
        if (p.form == MODE_PARTIAL) {
            out[p.coef_off + c] = sums.y * invstd;
            out[p.coef_off + k + c] = sums.x;
        } else {
            write_grad_coefs(c, sums.x, sums.y * invstd, f32(p.n * p.hw), p.form == MODE_TRAIN);
        }
    }
}

// Writes [dgamma | dbeta | a | b | m | d] of channel c from its sums of g and g * xhat over
// `count` elements (the training-mode dx coefficients only when `train`).
fn write_grad_coefs(c: u32, sum_g: f32, sum_gxhat: f32, count: f32, train: bool) {
    let k = p.c;
    out[c] = sum_gxhat;
    out[k + c] = sum_g;
    if (train) {
        let invstd = chan[k + c];
        let scale = gamma[c] * invstd;
        out[2u * k + c] = scale;
        out[3u * k + c] = -scale * invstd * sum_gxhat / count;
        out[4u * k + c] = chan[c];
        out[5u * k + c] = -scale * sum_g / count;
    }
}

// Sums the per-chunk (sum g * xhat, sum g) pairs of bn_grad_reduce's partial mode, read from x
// (p.n chunks of 2C values), into the layout of bn_grad_reduce; p.hw holds the element count
// per channel of the whole batch and p.form the mode (MODE_TRAIN or MODE_EVAL). One thread per channel.
@compute @workgroup_size(64)
fn bn_combine_grads(@builtin(global_invocation_id) gid: vec3<u32>) {
    let c = gid.x;
    if (c >= p.c) {
        return;
    }
    let k = p.c;
    var sum_gxhat = 0.0;
    var sum_g = 0.0;
    for (var j = 0u; j < p.n; j++) {
        sum_gxhat += x[2u * k * j + c];
        sum_g += x[2u * k * j + k + c];
    }
    write_grad_coefs(c, sum_g, sum_gxhat, f32(p.hw), p.form == MODE_TRAIN);
}

// ---------------------------------------------------------------- small planes
// When a channel holds few values (deep layers at small inputs: 4-64 pixels a plane), one
// 256-lane workgroup per channel, its tree reduction and its mostly idle lanes cost far more
// than the work. These variants give one invocation a whole channel (reductions) or a whole
// plane (affine pass), with the same bindings, modes and outputs as the kernels above.

@compute @workgroup_size(64)
fn bn_batch_stats_serial(@builtin(global_invocation_id) gid: vec3<u32>) {
    let c = gid.x;
    if (c >= p.c) {
        return;
    }
    // Sums shifted by the channel's first value stay near the data's spread.
    let shift = x[plane_base(0u, c)];
    var s1 = 0.0;
    var s2 = 0.0;
    for (var n = 0u; n < p.n; n++) {
        let base = plane_base(n, c);
        for (var h = 0u; h < p.hw; h++) {
            let d = x[base + h] - shift;
            s1 += d;
            s2 += d * d;
        }
    }
    let count = f32(p.n * p.hw);
    let mean = shift + s1 / count;
    let m2 = max(s2 - s1 * s1 / count, 0.0);
    if (p.form == MODE_PARTIAL) {
        chan[p.coef_off + c] = count;
        chan[p.coef_off + p.c + c] = mean;
        chan[p.coef_off + 2u * p.c + c] = m2;
    } else {
        write_forward_stats(c, count, mean, m2);
    }
}

@compute @workgroup_size(64)
fn bn_grad_reduce_serial(@builtin(global_invocation_id) gid: vec3<u32>) {
    let c = gid.x;
    if (c >= p.c) {
        return;
    }
    let mean = chan[c];
    let invstd = chan[p.c + c];
    var sg = 0.0;
    var sgx = 0.0;
    for (var n = 0u; n < p.n; n++) {
        let base = plane_base(n, c);
        for (var h = 0u; h < p.hw; h++) {
            let gv = g[base + h];
            sg += gv;
            sgx += gv * (x[base + h] - mean);
        }
    }
    if (p.form == MODE_PARTIAL) {
        out[p.coef_off + c] = sgx * invstd;
        out[p.coef_off + p.c + c] = sg;
    } else {
        write_grad_coefs(c, sg, sgx * invstd, f32(p.n * p.hw), p.form == MODE_TRAIN);
    }
}

// One invocation per (image, channel) plane.
@compute @workgroup_size(64)
fn bn_affine_planes(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_index) lid: u32) {
    let t = wg_linear(wid, nwg) * 64u + lid;
    if (t >= p.n * p.c) {
        return;
    }
    let c = t % p.c;
    let a = chan[p.coef_off + c];
    let b = chan[p.coef_off + p.c + c];
    let m = chan[p.coef_off + 2u * p.c + c];
    let d = chan[p.coef_off + 3u * p.c + c];
    let base = t * p.hw;
    for (var h = 0u; h < p.hw; h++) {
        affine_one(base + h, a, b, m, d);
    }
}
