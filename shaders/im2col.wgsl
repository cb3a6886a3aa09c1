// The im2col + GEMM route of conv2d (src/engine/ops/conv/im2col.rs), used where the vec4 GEMM is
// the fastest kernel we have (CPU adapters): unfolding the input into columns, folding column
// gradients back into an input gradient (a gather, so no float atomics), the per-channel bias, and
// zero-padding a matrix's rows to a multiple of 4 (vec4 reads) and back.

struct Params {
    n: u32, cin: u32, h: u32, w: u32,
    kh: u32, kw: u32, oh: u32, ow: u32,
    sh: u32, sw: u32, ph: u32, pw: u32,
    dh: u32, dw: u32,
    // Rows of the unfolded weight (cin * kh * kw) and that padded to a multiple of 4.
    k: u32, kp: u32,
    // add_channel_bias: channels and plane size; resize_cols: columns in and out.
    channels: u32, plane: u32,
    cols_in: u32, cols_out: u32,
    total: u32,
}

const WG: u32 = 64u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read_write> dst: array<f32>;

// dst [n, kp, oh * ow] from src [n, cin, h, w]: row (ci, ky, kx) of image n holds the input
// pixels that tap reads for every output pixel; rows k..kp are zero. One invocation per
// (image, row, output row), looping over the output row so the divisions happen once.
@compute @workgroup_size(64)
fn im2col(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) li: u32) {
    let id = wg_linear(wid, nwg) * WG + li;
    if (id >= p.total) {
        return;
    }
    let oy = id % p.oh;
    let t = id / p.oh;
    let r = t % p.kp;
    let img = t / p.kp;
    let out_base = id * p.ow;
    let iy = i32(oy * p.sh + ((r / p.kw) % p.kh) * p.dh) - i32(p.ph);
    if (r >= p.k || iy < 0 || iy >= i32(p.h)) {
        for (var ox = 0u; ox < p.ow; ox++) {
            dst[out_base + ox] = 0.0;
        }
        return;
    }
    let kx = r % p.kw;
    let ci = r / (p.kw * p.kh);
    let row = ((img * p.cin + ci) * p.h + u32(iy)) * p.w;
    for (var ox = 0u; ox < p.ow; ox++) {
        let ix = i32(ox * p.sw + kx * p.dw) - i32(p.pw);
        var v = 0.0;
        if (ix >= 0 && ix < i32(p.w)) {
            v = src[row + u32(ix)];
        }
        dst[out_base + ox] = v;
    }
}

// dst [n, cin, h, w] from column gradients src [n, kp, oh * ow]: every input pixel sums the
// column entries that read it. One invocation per (image, channel, input row).
@compute @workgroup_size(64)
fn col2im(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) li: u32) {
    let id = wg_linear(wid, nwg) * WG + li;
    if (id >= p.total) {
        return;
    }
    let iy = id % p.h;
    let t = id / p.h;
    let ci = t % p.cin;
    let img = t / p.cin;
    let plane = p.oh * p.ow;
    let col_base = (img * p.kp + ci * p.kh * p.kw) * plane;
    for (var ix = 0u; ix < p.w; ix++) {
        var acc = 0.0;
        for (var ky = 0u; ky < p.kh; ky++) {
            let oy = output_index(i32(iy + p.ph) - i32(ky * p.dh), p.sh, p.oh);
            if (oy < 0) {
                continue;
            }
            for (var kx = 0u; kx < p.kw; kx++) {
                let ox = output_index(i32(ix + p.pw) - i32(kx * p.dw), p.sw, p.ow);
                if (ox < 0) {
                    continue;
                }
                acc += src[col_base + (ky * p.kw + kx) * plane + u32(oy) * p.ow + u32(ox)];
            }
        }
        dst[id * p.w + ix] = acc;
    }
}

// The output index whose window starts at padded offset `t` (t = o * stride), or -1. Strides 1
// and 2 avoid integer division, which CPU adapters run lane by lane.
fn output_index(t: i32, stride: u32, len: u32) -> i32 {
    if (t < 0) {
        return -1;
    }
    var o = u32(t);
    if (stride == 2u) {
        if ((o & 1u) != 0u) {
            return -1;
        }
        o = o >> 1u;
    } else if (stride != 1u) {
        if (o % stride != 0u) {
            return -1;
        }
        o = o / stride;
    }
    if (o >= len) {
        return -1;
    }
    return i32(o);
}

const BIAS_RUN: u32 = 16u;

// dst [n, channels, plane] += src[channel], in place on a fresh GEMM output. One invocation
// per run of BIAS_RUN elements of one plane (total = n * channels * runs per plane).
@compute @workgroup_size(64)
fn add_channel_bias(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_index) li: u32) {
    let id = wg_linear(wid, nwg) * WG + li;
    if (id >= p.total) {
        return;
    }
    let runs = (p.plane + BIAS_RUN - 1u) / BIAS_RUN;
    let row = id / runs;
    let start = (id % runs) * BIAS_RUN;
    let b = src[row % p.channels];
    let end = min(start + BIAS_RUN, p.plane);
    for (var i = start; i < end; i++) {
        dst[row * p.plane + i] += b;
    }
}

// dst [cols_out, rows] = src [rows, cols_in] transposed, rows past cols_in zero: the
// unfolded weight transposed and padded, so the input-gradient GEMM reads k-contiguous rows.
@compute @workgroup_size(64)
fn transpose_pad(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) li: u32) {
    let id = wg_linear(wid, nwg) * WG + li;
    if (id >= p.total) {
        return;
    }
    let r = id % p.channels;
    let c = id / p.channels;
    var v = 0.0;
    if (c < p.cols_in) {
        v = src[r * p.cols_in + c];
    }
    dst[id] = v;
}

// dst [rows, cols_out] from src [rows, cols_in]: the common columns copied, the rest zero.
@compute @workgroup_size(64)
fn resize_cols(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) li: u32) {
    let id = wg_linear(wid, nwg) * WG + li;
    if (id >= p.total) {
        return;
    }
    let c = id % p.cols_out;
    let r = id / p.cols_out;
    var v = 0.0;
    if (c < p.cols_in) {
        v = src[r * p.cols_in + c];
    }
    dst[id] = v;
}
