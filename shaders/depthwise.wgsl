// Depthwise convolution (groups == C_in, C_out = mult * C_in: output channel co filters input
// channel co / mult with its own kh x kw taps). One dispatch covers every channel.
//
//   dw_forward      one invocation per output pixel, 8x8 pixel tiles of one (n, co) plane
//   dw_input_grad   one invocation per input pixel, gathering the dy pixels it fed (no atomics)
//   dw_weight_grad  one workgroup per (channel, image slice): each invocation sums its pixels
//                   for every tap, then a workgroup tree reduction; slices are added by
//                   conv2d.wgsl's sum_splits when there are several.
//
// The parameter block is the one conv2d.wgsl uses (built by the same host function).

struct Params {
    n: u32, cin: u32, h: u32, w: u32,
    cout: u32, kh: u32, kw: u32, oh: u32,
    ow: u32, sh: u32, sw: u32, ph: u32,
    pw: u32, dh: u32, dw: u32, groups: u32,
    cin_g: u32, cout_g: u32, gm: u32, gn: u32,
    gk: u32, tiles_m: u32, tiles_n: u32, splits: u32,
    k_chunk: u32, has_bias: u32, exact_div: u32, total_groups: u32,
    inv_kw: f32, inv_khkw: f32, inv_ow: f32, inv_ohw: f32,
    inv_w: f32, inv_hw: f32, inv_sh: f32, inv_sw: f32,
    inv_mult: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read> c: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

const T: u32 = 8u;     // pixel tile edge of dw_forward / dw_input_grad
const MAXTAPS: u32 = 9u; // taps accumulated at once by dw_weight_grad
const WG: u32 = 256u;

var<workgroup> red: array<f32, 2304>; // [MAXTAPS][WG]

// Pixel (y, x) and plane index of this invocation in a grid of T x T tiles over planes of
// rows x cols; ok is false past the edge.
struct Pixel { y: u32, x: u32, plane: u32, ok: bool }

fn pixel_of(wid: vec3<u32>, nwg: vec3<u32>, lid: vec3<u32>, rows: u32, cols: u32) -> Pixel {
    let lin = wg_linear(wid, nwg);
    let tiles_x = (cols + T - 1u) / T;
    let tiles_y = (rows + T - 1u) / T;
    var px: Pixel;
    px.x = (lin % tiles_x) * T + lid.x;
    let r = lin / tiles_x;
    px.y = (r % tiles_y) * T + lid.y;
    px.plane = r / tiles_y;
    px.ok = lin < p.total_groups && px.x < cols && px.y < rows;
    return px;
}

// Bindings: a = x, b = w, c = bias, out = y.
@compute @workgroup_size(8, 8, 1)
fn dw_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_id) lid: vec3<u32>) {
    let o = pixel_of(wid, nwg, lid, p.oh, p.ow);
    if (!o.ok) { return; }
    let mult = p.cout / p.cin;
    let co = o.plane % p.cout;
    let img = o.plane / p.cout;
    let x_base = (img * p.cin + co / mult) * p.h * p.w;
    let w_base = co * p.kh * p.kw;
    let iy0 = i32(o.y * p.sh) - i32(p.ph);
    let ix0 = i32(o.x * p.sw) - i32(p.pw);
    var s = 0.0;
    if (p.has_bias == 1u) { s = c[co]; }
    for (var ky = 0u; ky < p.kh; ky++) {
        let iy = iy0 + i32(ky * p.dh);
        if (iy < 0 || iy >= i32(p.h)) { continue; }
        let row = x_base + u32(iy) * p.w;
        for (var kx = 0u; kx < p.kw; kx++) {
            let ix = ix0 + i32(kx * p.dw);
            if (ix >= 0 && ix < i32(p.w)) { s += a[row + u32(ix)] * b[w_base + ky * p.kw + kx]; }
        }
    }
    out[o.plane * p.oh * p.ow + o.y * p.ow + o.x] = s;
}

// Bindings: a = dy, b = w, out = dx.
@compute @workgroup_size(8, 8, 1)
fn dw_input_grad(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = pixel_of(wid, nwg, lid, p.h, p.w);
    if (!i.ok) { return; }
    let mult = p.cout / p.cin;
    let ci = i.plane % p.cin;
    let img = i.plane / p.cin;
    let ohw = p.oh * p.ow;
    let khkw = p.kh * p.kw;
    var s = 0.0;
    for (var m = 0u; m < mult; m++) {
        let co = ci * mult + m;
        let dy_base = (img * p.cout + co) * ohw;
        for (var ky = 0u; ky < p.kh; ky++) {
            let ty = i32(i.y + p.ph) - i32(ky * p.dh);
            if (ty < 0) { continue; }
            var oy = u32(ty);
            if (p.sh != 1u) {
                oy = oy / p.sh;
                if (oy * p.sh != u32(ty)) { continue; }
            }
            if (oy >= p.oh) { continue; }
            for (var kx = 0u; kx < p.kw; kx++) {
                let tx = i32(i.x + p.pw) - i32(kx * p.dw);
                if (tx < 0) { continue; }
                var ox = u32(tx);
                if (p.sw != 1u) {
                    ox = ox / p.sw;
                    if (ox * p.sw != u32(tx)) { continue; }
                }
                if (ox < p.ow) { s += a[dy_base + oy * p.ow + ox] * b[co * khkw + ky * p.kw + kx]; }
            }
        }
    }
    out[i.plane * p.h * p.w + i.y * p.w + i.x] = s;
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
