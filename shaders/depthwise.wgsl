// Depthwise convolution (groups == C_in, C_out = mult * C_in: output channel co filters input
// channel co / mult with its own kh x kw taps). One dispatch covers every channel.
//
//   dw_forward      one invocation per run of 8 output pixels of one row
//   dw_input_grad   one invocation per run of 8 input pixels, gathering the dy pixels they fed
//                   (no atomics)
//   dw_weight_grad  one workgroup per (channel, image slice): each invocation sums its pixels
//                   for every tap, then a workgroup tree reduction; slices are added by
//                   conv2d.wgsl's sum_splits when there are several.
//
#include "conv_layout.wgsl"

const MAXTAPS: u32 = 9u; // taps accumulated at once by dw_weight_grad
const WG: u32 = 256u;

var<workgroup> red: array<f32, 2304>; // [MAXTAPS][WG]

// Every non-constant load costs a per-lane loop on SIMD-on-CPU adapters (llvmpipe), so the
// pixel kernels give each invocation a run of PX pixels of one row: a tap's weight is loaded
// once for PX pixels, and the common 3-wide, stride-1 case reads one sliding window per row.
const PX: u32 = 8u;

// (row, first column, plane) of this invocation over planes of rows x cols, PX columns each.
struct Run { y: u32, x0: u32, plane: u32, ok: bool }

fn run_of(wid: vec3<u32>, nwg: vec3<u32>, lid: vec3<u32>, rows: u32, cols: u32, planes: u32) -> Run {
    let gid = wg_linear(wid, nwg) * 64u + lid.x;
    let runs = (cols + PX - 1u) / PX;
    var r: Run;
    r.x0 = (gid % runs) * PX;
    let q = gid / runs;
    r.y = q % rows;
    r.plane = q / rows;
    r.ok = r.plane < planes;
    return r;
}

// Writes the run's values that fall inside its row to `out` (planes of rows x cols).
fn store_run(r: Run, rows: u32, cols: u32, values: ptr<function, array<f32, 8>>) {
    let row = r.plane * rows * cols + r.y * cols;
    for (var j = 0u; j < PX; j++) {
        if (r.x0 + j < cols) { out[row + r.x0 + j] = (*values)[j]; }
    }
}

// Bindings: a = x, b = w, c = bias, out = y.
@compute @workgroup_size(64, 1, 1)
fn dw_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_id) lid: vec3<u32>) {
    let o = run_of(wid, nwg, lid, p.oh, p.ow, p.n * p.cout);
    if (!o.ok) { return; }
    let mult = p.cout / p.cin;
    let co = o.plane % p.cout;
    let img = o.plane / p.cout;
    let x_base = (img * p.cin + co / mult) * p.h * p.w;
    let w_base = co * p.kh * p.kw;
    let iy0 = i32(o.y * p.sh) - i32(p.ph);
    var acc: array<f32, 8>;
    var b0 = 0.0;
    if (p.has_bias == 1u) { b0 = c[co]; }
    for (var j = 0u; j < PX; j++) { acc[j] = b0; }
    let window = p.sw == 1u && p.dw == 1u && p.kw == 3u;
    for (var ky = 0u; ky < p.kh; ky++) {
        let iy = iy0 + i32(ky * p.dh);
        if (iy < 0 || iy >= i32(p.h)) { continue; }
        let row = x_base + u32(iy) * p.w;
        if (window) {
            // x[ix0 - pw + j], j < PX + 2, serves output j through tap kx as win[j + kx].
            var win: array<f32, 10>;
            for (var j = 0u; j < PX + 2u; j++) {
                let ix = i32(o.x0 + j) - i32(p.pw);
                let ok = ix >= 0 && ix < i32(p.w);
                win[j] = select(0.0, a[select(0u, row + u32(ix), ok)], ok);
            }
            let w0 = b[w_base + ky * 3u];
            let w1 = b[w_base + ky * 3u + 1u];
            let w2 = b[w_base + ky * 3u + 2u];
            for (var j = 0u; j < PX; j++) { acc[j] += w0 * win[j] + w1 * win[j + 1u] + w2 * win[j + 2u]; }
        } else {
            for (var kx = 0u; kx < p.kw; kx++) {
                let wt = b[w_base + ky * p.kw + kx];
                for (var j = 0u; j < PX; j++) {
                    let ix = i32((o.x0 + j) * p.sw + kx * p.dw) - i32(p.pw);
                    let ok = ix >= 0 && ix < i32(p.w);
                    acc[j] += wt * select(0.0, a[select(0u, row + u32(ix), ok)], ok);
                }
            }
        }
    }
    store_run(o, p.oh, p.ow, &acc);
}

// Bindings: a = dy, b = w, out = dx. Each input pixel gathers the dy pixels its taps fed.
@compute @workgroup_size(64, 1, 1)
fn dw_input_grad(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = run_of(wid, nwg, lid, p.h, p.w, p.n * p.cin);
    if (!i.ok) { return; }
    let ci = i.plane % p.cin;
    let img = i.plane / p.cin;
    let mult = p.cout / p.cin;
    let ohw = p.oh * p.ow;
    let khkw = p.kh * p.kw;
    var acc: array<f32, 8>;
    for (var j = 0u; j < PX; j++) { acc[j] = 0.0; }
    let window = p.sw == 1u && p.dw == 1u && p.kw == 3u;
    for (var m = 0u; m < mult; m++) {
        let co = ci * mult + m;
        let dy_base = (img * p.cout + co) * ohw;
        for (var ky = 0u; ky < p.kh; ky++) {
            let ty = i32(i.y + p.ph) - i32(ky * p.dh);
            if (ty < 0) { continue; }
            let oy = u32(ty) / p.sh;
            if (oy * p.sh != u32(ty) || oy >= p.oh) { continue; }
            let row = dy_base + oy * p.ow;
            if (window) {
                // dy[ix0 + pw - 2 + j] serves input j through tap kx as win[j + 2 - kx].
                var win: array<f32, 10>;
                for (var j = 0u; j < PX + 2u; j++) {
                    let ox = i32(i.x0 + p.pw + j) - 2;
                    let ok = ox >= 0 && ox < i32(p.ow);
                    win[j] = select(0.0, a[select(0u, row + u32(ox), ok)], ok);
                }
                let w0 = b[co * khkw + ky * 3u];
                let w1 = b[co * khkw + ky * 3u + 1u];
                let w2 = b[co * khkw + ky * 3u + 2u];
                for (var j = 0u; j < PX; j++) { acc[j] += w0 * win[j + 2u] + w1 * win[j + 1u] + w2 * win[j]; }
            } else {
                for (var kx = 0u; kx < p.kw; kx++) {
                    let wt = b[co * khkw + ky * p.kw + kx];
                    for (var j = 0u; j < PX; j++) {
                        let tx = i32(i.x0 + j + p.pw) - i32(kx * p.dw);
                        let ox = u32(max(tx, 0)) / p.sw;
                        let ok = tx >= 0 && ox * p.sw == u32(tx) && ox < p.ow;
                        acc[j] += wt * select(0.0, a[select(0u, row + ox, ok)], ok);
                    }
                }
            }
        }
    }
    store_run(i, p.h, p.w, &acc);
}

// Bindings: a = dy, b = x, out = dw (splits == 1) or partial sums [splits][cout][kh][kw].
// Workgroup (co, split) covers images [split * k_chunk, (split + 1) * k_chunk).
@compute @workgroup_size(16, 16, 1)
fn dw_weight_grad(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_id) lid: vec3<u32>) {
    let lin = wg_linear(wid, nwg);
    if (lin >= p.total_groups) { return; }
    let co = lin % p.cout;
    let split = lin / p.cout;
    let tid = lid.y * 16u + lid.x;
    let mult = p.cout / p.cin;
    let ci = co / mult;
    let khkw = p.kh * p.kw;
    let ohw = p.oh * p.ow;
    let img_end = min(p.n, (split + 1u) * p.k_chunk);
    for (var t0 = 0u; t0 < khkw; t0 += MAXTAPS) {
        // Tap offsets of this chunk, decoded once.
        var ty: array<i32, 9>;
        var tx: array<i32, 9>;
        var acc: array<f32, 9>;
        for (var j = 0u; j < MAXTAPS; j++) {
            let tap = min(t0 + j, khkw - 1u);
            ty[j] = i32((tap / p.kw) * p.dh) - i32(p.ph);
            tx[j] = i32((tap % p.kw) * p.dw) - i32(p.pw);
            acc[j] = 0.0;
        }
        let taps = min(MAXTAPS, khkw - t0);
        for (var img = split * p.k_chunk; img < img_end; img++) {
            let dy_base = (img * p.cout + co) * ohw;
            let x_base = (img * p.cin + ci) * p.h * p.w;
            for (var oy = lid.y; oy < p.oh; oy += 16u) {
                let iy0 = i32(oy * p.sh);
                for (var ox = lid.x; ox < p.ow; ox += 16u) {
                    let g = a[dy_base + oy * p.ow + ox];
                    let ix0 = i32(ox * p.sw);
                    for (var j = 0u; j < MAXTAPS; j++) {
                        let iy = iy0 + ty[j];
                        let ix = ix0 + tx[j];
                        if (j < taps && iy >= 0 && iy < i32(p.h) && ix >= 0 && ix < i32(p.w)) {
                            acc[j] += g * b[x_base + u32(iy) * p.w + u32(ix)];
                        }
                    }
                }
            }
        }
        for (var j = 0u; j < MAXTAPS; j++) { red[j * WG + tid] = acc[j]; }
        workgroupBarrier();
        for (var width = WG / 2u; width > 0u; width >>= 1u) {
            if (tid < width) {
                for (var j = 0u; j < MAXTAPS; j++) { red[j * WG + tid] += red[j * WG + tid + width]; }
            }
            workgroupBarrier();
        }
        if (tid < taps) { out[(split * p.cout + co) * khkw + t0 + tid] = red[tid * WG]; }
        workgroupBarrier();
    }
}

// Small planes: one invocation per (image slice, channel, tap), summing dy * x over its images'
// planes; no workgroup reduction (for a plane of a few pixels, dw_weight_grad's 256-lane tree
// costs far more than the products). The rows and columns whose tap falls inside the input are
// clipped once, so the inner loop has no bounds checks. p.gm holds the invocation count.
@compute @workgroup_size(64)
fn dw_weight_grad_taps(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                       @builtin(local_invocation_index) lid: u32) {
    let t = wg_linear(wid, nwg) * 64u + lid;
    if (t >= p.gm) { return; }
    let khkw = p.kh * p.kw;
    let tap = t % khkw;
    let rest = t / khkw;
    let co = rest % p.cout;
    let split = rest / p.cout;
    let ci = co / (p.cout / p.cin);
    let ty = i32((tap / p.kw) * p.dh) - i32(p.ph);
    let tx = i32((tap % p.kw) * p.dw) - i32(p.pw);
    let oy_lo = clip_lo(ty, p.sh);
    let oy_hi = clip_hi(ty, p.sh, p.h, p.oh);
    let ox_lo = clip_lo(tx, p.sw);
    let ox_hi = clip_hi(tx, p.sw, p.w, p.ow);
    var acc = 0.0;
    let img_end = min(p.n, (split + 1u) * p.k_chunk);
    for (var img = split * p.k_chunk; img < img_end; img++) {
        let dy_base = (img * p.cout + co) * p.oh * p.ow;
        let x_base = (img * p.cin + ci) * p.h * p.w;
        for (var oy = oy_lo; oy < oy_hi; oy++) {
            let drow = dy_base + oy * p.ow;
            let xrow = i32(x_base + (oy * p.sh) * p.w) + ty * i32(p.w) + tx;
            for (var ox = ox_lo; ox < ox_hi; ox++) {
                acc += a[drow + ox] * b[u32(xrow + i32(ox * p.sw))];
            }
        }
    }
    out[(split * p.cout + co) * khkw + tap] = acc;
}

// First output index o with o * stride + off >= 0.
fn clip_lo(off: i32, stride: u32) -> u32 {
    if (off >= 0) { return 0u; }
    return (u32(-off) + stride - 1u) / stride;
}

// One past the last output index o < out_len with o * stride + off < len.
fn clip_hi(off: i32, stride: u32, len: u32, out_len: u32) -> u32 {
    let room = i32(len) - 1 - off;
    if (room < 0) { return 0u; }
    return min(out_len, u32(room) / stride + 1u);
}
