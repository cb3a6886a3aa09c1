// Max and average pooling 2d with PyTorch's semantics. Forward: one thread per output element.
// Backward: one thread per input element (max pool: per input row) gathering from the outputs whose windows contain it
// (deterministic, no atomics); max pool routes through the argmax the forward saved as
// f32-encoded indices within the plane (first maximum on ties, as PyTorch).

struct Params {
    total: u32,      // threads wanted: outputs (forward) or inputs (backward)
    h: u32,
    w: u32,
    oh: u32,
    ow: u32,
    kh: u32,
    kw: u32,
    sh: u32,
    sw: u32,
    ph: u32,
    pw: u32,
    include_pad: u32, // average pool: divide by the window clipped to the padded input
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<f32>;          // input, or output gradient
@group(0) @binding(2) var<storage, read_write> dst: array<f32>;    // output, or input gradient
@group(0) @binding(3) var<storage, read_write> argmax: array<f32>; // max pool: index in plane

// The window of output (oy, ox) along one axis, as PyTorch computes it: start (may be negative),
// end clipped to the padded input, then both clipped to the input.
struct Window {
    start: i32,
    end: i32,
    padded_len: i32,
}

fn window(o: u32, stride: u32, pad: u32, k: u32, len: u32) -> Window {
    let start = i32(o * stride) - i32(pad);
    let end_padded = min(start + i32(k), i32(len + pad));
    var win: Window;
    win.padded_len = end_padded - start;
    win.start = max(start, 0);
    win.end = min(end_padded, i32(len));
    return win;
}

fn thread_index(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return wg_linear(wid, nwg) * 256u + lid;
}

// Output element i (forward): where its plane starts in src, and its window along each axis.
struct OutputWindow {
    base: u32,
    wy: Window,
    wx: Window,
}

fn output_window(i: u32) -> OutputWindow {
    let ox = i % p.ow;
    let t = i / p.ow;
    let oy = t % p.oh;
    var o: OutputWindow;
    o.base = (t / p.oh) * p.h * p.w;
    o.wy = window(oy, p.sh, p.ph, p.kh, p.h);
    o.wx = window(ox, p.sw, p.pw, p.kw, p.w);
    return o;
}

@compute @workgroup_size(256)
fn max_pool_fwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let i = thread_index(wid, nwg, lid);
    if (i >= p.total) {
        return;
    }
    let o = output_window(i);
    var best = bitcast<f32>(0xff800000u); // -inf
    var best_at = u32(o.wy.start) * p.w + u32(o.wx.start);
    for (var y = o.wy.start; y < o.wy.end; y++) {
        for (var x = o.wx.start; x < o.wx.end; x++) {
            let at = u32(y) * p.w + u32(x);
            let v = src[o.base + at];
            // Strictly greater keeps the first maximum; NaN wins, as in PyTorch.
            if (v > best || v != v) {
                best = v;
                best_at = at;
            }
        }
    }
    dst[i] = best;
    argmax[i] = f32(best_at);
}

fn avg_divisor(wy: Window, wx: Window) -> f32 {
    if (p.include_pad != 0u) {
        return f32(wy.padded_len * wx.padded_len);
    }
    return f32((wy.end - wy.start) * (wx.end - wx.start));
}

@compute @workgroup_size(256)
fn avg_pool_fwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let i = thread_index(wid, nwg, lid);
    if (i >= p.total) {
        return;
    }
    let o = output_window(i);
    var s = 0.0;
    for (var y = o.wy.start; y < o.wy.end; y++) {
        for (var x = o.wx.start; x < o.wx.end; x++) {
            s += src[o.base + u32(y) * p.w + u32(x)];
        }
    }
    if (o.wy.start >= o.wy.end || o.wx.start >= o.wx.end) {
        dst[i] = 0.0;
    } else {
        dst[i] = s / avg_divisor(o.wy, o.wx);
    }
}

// Outputs along one axis whose window [o * stride - pad, o * stride - pad + k) holds `pos`.
fn covering(pos: u32, stride: u32, pad: u32, k: u32, n_out: u32) -> vec2<u32> {
    let a = pos + pad;
    var lo = 0u;
    if (a >= k) {
        lo = (a - k) / stride + 1u;
    }
    let hi = min(a / stride + 1u, n_out); // exclusive
    return vec2<u32>(lo, hi);
}

// One thread per input row (total = planes * h): it zeroes its row, then adds the gradient of
// every output whose argmax falls in that row. The row is the thread's alone, so the adds need no
// atomics, and only a few integer divisions per row are paid (CPU adapters run them lane by lane).
@compute @workgroup_size(256)
fn max_pool_bwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let i = thread_index(wid, nwg, lid);
    if (i >= p.total) {
        return;
    }
    let y = i % p.h;
    let out_base = (i / p.h) * p.oh * p.ow;
    let row = i * p.w;
    for (var x = 0u; x < p.w; x++) {
        dst[row + x] = 0.0;
    }
    let first = f32(y * p.w);
    let last = f32(y * p.w + p.w - 1u);
    let ry = covering(y, p.sh, p.ph, p.kh, p.oh);
    for (var oy = ry.x; oy < ry.y; oy++) {
        for (var ox = 0u; ox < p.ow; ox++) {
            let o = out_base + oy * p.ow + ox;
            let a = argmax[o];
            if (a >= first && a <= last) {
                let x = u32(a - first);
                dst[row + x] += src[o];
            }
        }
    }
}

@compute @workgroup_size(256)
fn avg_pool_bwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let i = thread_index(wid, nwg, lid);
    if (i >= p.total) {
        return;
    }
    let x = i % p.w;
    let t = i / p.w;
    let y = t % p.h;
    let out_base = (t / p.h) * p.oh * p.ow;
    let ry = covering(y, p.sh, p.ph, p.kh, p.oh);
    let rx = covering(x, p.sw, p.pw, p.kw, p.ow);
    var s = 0.0;
    for (var oy = ry.x; oy < ry.y; oy++) {
        let wy = window(oy, p.sh, p.ph, p.kh, p.h);
        for (var ox = rx.x; ox < rx.y; ox++) {
            let wx = window(ox, p.sw, p.pw, p.kw, p.w);
            s += src[out_base + oy * p.ow + ox] / avg_divisor(wy, wx);
        }
    }
    dst[i] = s;
}
