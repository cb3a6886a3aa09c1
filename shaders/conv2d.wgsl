// General 2-D convolution (stride, zero padding, dilation, groups) as implicit GEMM: every
// 64x64 output tile gathers its operands straight from the NCHW tensors into workgroup memory,
// 16 reduction steps at a time, and each of the 16x16 invocations accumulates a 4x4 block in
// registers (the scheme of matmul.wgsl). No im2col buffer is ever built.
//
//   conv_forward     y[n,co,oy,ox]  = sum_(ci,ky,kx) w[co,ci,ky,kx] x[n,ci,iy,ix]  (+ bias)
//   conv_input_grad  dx[n,ci,iy,ix] = sum_(co,ky,kx) w[co,ci,ky,kx] dy[n,co,oy,ox]  (gather:
//                    each dx element is owned by one invocation, so no float atomics)
//   conv_weight_grad dw[co,ci,ky,kx] = sum_(n,oy,ox) dy[n,co,oy,ox] x[n,ci,iy,ix], the long
//                    reduction cut into `splits` slices whose partial sums sum_splits adds
//   bias_grad        db[c] = sum_(n,y,x) dy[n,c,y,x], one workgroup reduction per channel
//
// with iy = oy*sh - ph + ky*dh and ix = ox*sw - pw + kx*dw. The grid is 1-D over
// (column tile, row tile, group, split), folded into 2-D by the host past 65,535.

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

const TILE: u32 = 64u;
const BK: u32 = 16u;

var<workgroup> a_tile: array<f32, 1024>; // [BK][TILE]: k * TILE + row
var<workgroup> b_tile: array<f32, 1024>; // [BK][TILE]: k * TILE + column
var<workgroup> red: array<f32, 256>;

// x / d for the sizes of one convolution. Integer division is scalarised on SIMD-on-CPU
// adapters such as llvmpipe; below 2^22 (the host checks) a float reciprocal is off by at most
// one, which the two comparisons correct.
fn qdiv(x: u32, d: u32, inv: f32) -> u32 {
    if (p.exact_div == 1u) { return x / d; }
    var q = u32(f32(x) * inv);
    if (q * d > x) { q -= 1u; } else if (q * d + d <= x) { q += 1u; }
    return q;
}

struct Tile { m0: u32, n0: u32, g: u32, split: u32, ok: bool }

fn tile_of(wid: vec3<u32>, nwg: vec3<u32>) -> Tile {
    let lin = wg_linear(wid, nwg);
    var t: Tile;
    t.ok = lin < p.total_groups;
    t.n0 = (lin % p.tiles_n) * TILE;
    let r = lin / p.tiles_n;
    t.m0 = (r % p.tiles_m) * TILE;
    let r2 = r / p.tiles_m;
    t.g = r2 % p.groups;
    t.split = r2 / p.groups;
    return t;
}

// acc += a_tile^T * b_tile for this invocation's 4x4 block.
fn multiply_tiles(lid: vec3<u32>, acc: ptr<function, array<f32, 16>>) {
    for (var kk = 0u; kk < BK; kk++) {
        let ar = kk * TILE + lid.y * 4u;
        let bc = kk * TILE + lid.x * 4u;
        let av = vec4<f32>(a_tile[ar], a_tile[ar + 1u], a_tile[ar + 2u], a_tile[ar + 3u]);
        let bv = vec4<f32>(b_tile[bc], b_tile[bc + 1u], b_tile[bc + 2u], b_tile[bc + 3u]);
        for (var i = 0u; i < 4u; i++) {
            (*acc)[i * 4u + 0u] += av[i] * bv.x;
            (*acc)[i * 4u + 1u] += av[i] * bv.y;
            (*acc)[i * 4u + 2u] += av[i] * bv.z;
            (*acc)[i * 4u + 3u] += av[i] * bv.w;
        }
    }
}

// Bindings: a = x, b = w, c = bias, out = y. GEMM rows: output channels of the group;
// columns: (n, oy, ox); reduction: (ci, ky, kx) of the group.
@compute @workgroup_size(16, 16, 1)
fn conv_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_id) lid: vec3<u32>) {
    let t = tile_of(wid, nwg);
    if (!t.ok) { return; }
    let tid = lid.y * 16u + lid.x;
    let khkw = p.kh * p.kw;
    let ohw = p.oh * p.ow;
    let hw = p.h * p.w;
    // The output pixel this invocation gathers input for stays fixed over the whole K loop.
    let bcol = tid % TILE;
    let col = t.n0 + bcol;
    let col_ok = col < p.gn;
    let img = qdiv(col, ohw, p.inv_ohw);
    let pix = col - img * ohw;
    let oy = qdiv(pix, p.ow, p.inv_ow);
    let ox = pix - oy * p.ow;
    let iy0 = i32(oy * p.sh) - i32(p.ph);
    let ix0 = i32(ox * p.sw) - i32(p.pw);
    let x_base = (img * p.cin + t.g * p.cin_g) * hw;
    let w_base = t.g * p.cout_g * p.gk;
    var acc: array<f32, 16>;
    for (var i = 0u; i < 16u; i++) { acc[i] = 0.0; }

    for (var k0 = 0u; k0 < p.gk; k0 += BK) {
        for (var r = 0u; r < 4u; r++) {
            let e = tid + r * 256u;
            let m = e / BK;
            let kk = e % BK;
            let gm = t.m0 + m;
            let gk = k0 + kk;
            var v = 0.0;
            if (gm < p.gm && gk < p.gk) { v = b[w_base + gm * p.gk + gk]; }
            a_tile[kk * TILE + m] = v;
        }
        for (var r = 0u; r < 4u; r++) {
            let kk = tid / TILE + r * 4u;
            let gk = k0 + kk;
            var v = 0.0;
            if (col_ok && gk < p.gk) {
                let ci = qdiv(gk, khkw, p.inv_khkw);
                let tap = gk - ci * khkw;
                let ky = qdiv(tap, p.kw, p.inv_kw);
                let kx = tap - ky * p.kw;
                let iy = iy0 + i32(ky * p.dh);
                let ix = ix0 + i32(kx * p.dw);
                if (iy >= 0 && iy < i32(p.h) && ix >= 0 && ix < i32(p.w)) {
                    v = a[x_base + ci * hw + u32(iy) * p.w + u32(ix)];
                }
            }
            b_tile[kk * TILE + bcol] = v;
        }
        workgroupBarrier();
        multiply_tiles(lid, &acc);
        workgroupBarrier();
    }

    for (var j = 0u; j < 4u; j++) {
        let cj = t.n0 + lid.x * 4u + j;
        if (cj >= p.gn) { continue; }
        let im = qdiv(cj, ohw, p.inv_ohw);
        let px = cj - im * ohw;
        for (var i = 0u; i < 4u; i++) {
            let gm = t.m0 + lid.y * 4u + i;
            if (gm >= p.gm) { continue; }
            let co = t.g * p.cout_g + gm;
            var v = acc[i * 4u + j];
            if (p.has_bias == 1u) { v += c[co]; }
            out[(im * p.cout + co) * ohw + px] = v;
        }
    }
}

// Bindings: a = dy, b = w, out = dx. Rows: input channels of the group; columns: (n, iy, ix);
// reduction: (co, ky, kx) of the group, gathering the dy pixel each tap came from.
@compute @workgroup_size(16, 16, 1)
fn conv_input_grad(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_id) lid: vec3<u32>) {
    let t = tile_of(wid, nwg);
    if (!t.ok) { return; }
    let tid = lid.y * 16u + lid.x;
    let khkw = p.kh * p.kw;
    let ohw = p.oh * p.ow;
    let hw = p.h * p.w;
    let bcol = tid % TILE;
    let col = t.n0 + bcol;
    let col_ok = col < p.gn;
    let img = qdiv(col, hw, p.inv_hw);
    let pix = col - img * hw;
    let iy = qdiv(pix, p.w, p.inv_w);
    let ix = pix - iy * p.w;
    let ty0 = i32(iy + p.ph);
    let tx0 = i32(ix + p.pw);
    let dy_base = (img * p.cout + t.g * p.cout_g) * ohw;
    let w_group = t.g * p.cout_g * p.cin_g * khkw;
    var acc: array<f32, 16>;
    for (var i = 0u; i < 16u; i++) { acc[i] = 0.0; }

    for (var k0 = 0u; k0 < p.gk; k0 += BK) {
        for (var r = 0u; r < 4u; r++) {
            let e = tid + r * 256u;
            let m = e / BK;
            let kk = e % BK;
            let gm = t.m0 + m;
            let gk = k0 + kk;
            var v = 0.0;
            if (gm < p.gm && gk < p.gk) {
                let co = qdiv(gk, khkw, p.inv_khkw);
                let tap = gk - co * khkw;
                v = b[w_group + (co * p.cin_g + gm) * khkw + tap];
            }
            a_tile[kk * TILE + m] = v;
        }
        for (var r = 0u; r < 4u; r++) {
            let kk = tid / TILE + r * 4u;
            let gk = k0 + kk;
            var v = 0.0;
            if (col_ok && gk < p.gk) {
                let co = qdiv(gk, khkw, p.inv_khkw);
                let tap = gk - co * khkw;
                let ky = qdiv(tap, p.kw, p.inv_kw);
                let kx = tap - ky * p.kw;
                let ty = ty0 - i32(ky * p.dh);
                let tx = tx0 - i32(kx * p.dw);
                if (ty >= 0 && tx >= 0) {
                    var oy = u32(ty);
                    var ox = u32(tx);
                    var hit = true;
                    if (p.sh != 1u) { oy = qdiv(oy, p.sh, p.inv_sh); hit = oy * p.sh == u32(ty); }
                    if (p.sw != 1u) { ox = qdiv(ox, p.sw, p.inv_sw); hit = hit && ox * p.sw == u32(tx); }
                    if (hit && oy < p.oh && ox < p.ow) {
                        v = a[dy_base + co * ohw + oy * p.ow + ox];
                    }
                }
            }
            b_tile[kk * TILE + bcol] = v;
        }
        workgroupBarrier();
        multiply_tiles(lid, &acc);
        workgroupBarrier();
    }

    for (var j = 0u; j < 4u; j++) {
        let cj = t.n0 + lid.x * 4u + j;
        if (cj >= p.gn) { continue; }
        let im = qdiv(cj, hw, p.inv_hw);
        let px = cj - im * hw;
        for (var i = 0u; i < 4u; i++) {
            let gm = t.m0 + lid.y * 4u + i;
            if (gm >= p.gm) { continue; }
            out[(im * p.cin + t.g * p.cin_g + gm) * hw + px] = acc[i * 4u + j];
        }
    }
}

// Bindings: a = dy, b = x, out = dw (or the split's slice of the partial sums). Rows: output
// channels of the group; columns: (ci, ky, kx); reduction: (n, oy, ox) within the split.
@compute @workgroup_size(16, 16, 1)
fn conv_weight_grad(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_id) lid: vec3<u32>) {
    let t = tile_of(wid, nwg);
    if (!t.ok) { return; }
    let tid = lid.y * 16u + lid.x;
    let khkw = p.kh * p.kw;
    let ohw = p.oh * p.ow;
    let hw = p.h * p.w;
    // Both tiles are loaded with the reduction index kk = tid % 16 fixed per invocation, so
    // the (n, oy, ox) it stands for is decoded once per step and serves both loads.
    let kk = tid % BK;
    let row_or_col = tid / BK; // 0..15, plus 16 * r
    var ci_off: array<u32, 4>;
    var ky_off: array<i32, 4>;
    var kx_off: array<i32, 4>;
    var col_ok: array<bool, 4>;
    for (var r = 0u; r < 4u; r++) {
        let col = t.n0 + row_or_col + r * 16u;
        col_ok[r] = col < p.gn;
        let ci = qdiv(col, khkw, p.inv_khkw);
        let tap = col - ci * khkw;
        let ky = qdiv(tap, p.kw, p.inv_kw);
        let kx = tap - ky * p.kw;
        ci_off[r] = (t.g * p.cin_g + ci) * hw;
        ky_off[r] = i32(ky * p.dh) - i32(p.ph);
        kx_off[r] = i32(kx * p.dw) - i32(p.pw);
    }
    let k_begin = t.split * p.k_chunk;
    let k_end = min(p.gk, k_begin + p.k_chunk);
    let co0 = t.g * p.cout_g;
    var acc: array<f32, 16>;
    for (var i = 0u; i < 16u; i++) { acc[i] = 0.0; }

    for (var k0 = k_begin; k0 < k_end; k0 += BK) {
        let gk = k0 + kk;
        let k_ok = gk < k_end;
        let img = qdiv(gk, ohw, p.inv_ohw);
        let pix = gk - img * ohw;
        let oy = qdiv(pix, p.ow, p.inv_ow);
        let ox = pix - oy * p.ow;
        let dy_base = img * p.cout * ohw + pix;
        let x_base = img * p.cin * hw;
        let iy0 = i32(oy * p.sh);
        let ix0 = i32(ox * p.sw);
        for (var r = 0u; r < 4u; r++) {
            let m = row_or_col + r * 16u;
            let gm = t.m0 + m;
            var v = 0.0;
            if (k_ok && gm < p.gm) { v = a[dy_base + (co0 + gm) * ohw]; }
            a_tile[kk * TILE + m] = v;
        }
        for (var r = 0u; r < 4u; r++) {
            let iy = iy0 + ky_off[r];
            let ix = ix0 + kx_off[r];
            var v = 0.0;
            if (k_ok && col_ok[r] && iy >= 0 && iy < i32(p.h) && ix >= 0 && ix < i32(p.w)) {
                v = b[x_base + ci_off[r] + u32(iy) * p.w + u32(ix)];
            }
            b_tile[kk * TILE + row_or_col + r * 16u] = v;
        }
        workgroupBarrier();
        multiply_tiles(lid, &acc);
        workgroupBarrier();
    }

    let slice = t.split * p.cout * p.gn;
    for (var i = 0u; i < 4u; i++) {
        let gm = t.m0 + lid.y * 4u + i;
        if (gm >= p.gm) { continue; }
        for (var j = 0u; j < 4u; j++) {
            let cj = t.n0 + lid.x * 4u + j;
            if (cj < p.gn) { out[slice + (co0 + gm) * p.gn + cj] = acc[i * 4u + j]; }
        }
    }
}

// out[i] = sum over s < splits of a[s * gn + i], for i < gn.
@compute @workgroup_size(256, 1, 1)
fn sum_splits(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = wg_linear(wid, nwg) * 256u + lid.x;
    if (i >= p.gn) { return; }
    var s = 0.0;
    for (var k = 0u; k < p.splits; k++) { s += a[k * p.gn + i]; }
    out[i] = s;
}

// out[ch] = sum of channel ch of the NCHW tensor a (shape n, cout, oh, ow).
@compute @workgroup_size(256, 1, 1)
fn bias_grad(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_id) lid: vec3<u32>) {
    let ch = wg_linear(wid, nwg);
    if (ch >= p.cout) { return; }
    let ohw = p.oh * p.ow;
    var s = 0.0;
    for (var img = 0u; img < p.n; img++) {
        let base = (img * p.cout + ch) * ohw;
        for (var i = lid.x; i < ohw; i += 256u) { s += a[base + i]; }
    }
    red[lid.x] = s;
    workgroupBarrier();
    for (var width = 128u; width > 0u; width >>= 1u) {
        if (lid.x < width) { red[lid.x] += red[lid.x + width]; }
        workgroupBarrier();
    }
    if (lid.x == 0u) { out[ch] = red[0]; }
}

// ---------------------------------------------------------------------------------------
// Register-blocked direct kernels. On SIMD-on-CPU adapters (llvmpipe) every non-constant
// load costs a per-lane scalar loop whether it hits workgroup or storage memory, so what
// counts is multiply-adds per value loaded: each invocation keeps RB x 8 accumulators and
// loads RB + 8 values per reduction step (workgroup staging would only add loads). On
// discrete GPUs the weight loads are uniform across a subgroup (broadcast) and the pixel
// loads coalesce, so the same kernels stay reasonable there.

const RB: u32 = 16u;   // rows (channels) per invocation
const CB: u32 = 8u;    // consecutive pixels of one row per invocation

// Forward: invocation = (group, block of RB output channels, 8 pixels of one output row).
// tiles_m = channel blocks, tiles_n = pixel groups (n * oh * ceil(ow / 8)).
@compute @workgroup_size(64, 1, 1)
fn conv_forward_rb(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_id) lid: vec3<u32>) {
    let gid = wg_linear(wid, nwg) * 64u + lid.x;
    let pg = gid % p.tiles_n;
    let rest = gid / p.tiles_n;
    let cb = rest % p.tiles_m;
    let g = rest / p.tiles_m;
    if (g >= p.groups) { return; }
    let owb = (p.ow + CB - 1u) / CB;
    let ox0 = (pg % owb) * CB;
    let r1 = pg / owb;
    let oy = r1 % p.oh;
    let img = r1 / p.oh;
    let khkw = p.kh * p.kw;
    let hw = p.h * p.w;
    let co0 = cb * RB;
    let w_stride = p.cin_g * khkw;
    // Rows past the group's channels read the last valid row; their results are never stored.
    var w_row: array<u32, 16>;
    for (var r = 0u; r < RB; r++) {
        w_row[r] = (g * p.cout_g + min(co0 + r, p.cout_g - 1u)) * w_stride;
    }
    var acc: array<vec4<f32>, 32>;
    for (var i = 0u; i < 32u; i++) { acc[i] = vec4<f32>(0.0); }
    let x_img = (img * p.cin + g * p.cin_g) * hw;
    let iy0 = i32(oy * p.sh) - i32(p.ph);
    for (var ci = 0u; ci < p.cin_g; ci++) {
        let x_ch = x_img + ci * hw;
        for (var ky = 0u; ky < p.kh; ky++) {
            let iy = iy0 + i32(ky * p.dh);
            let row_ok = iy >= 0 && iy < i32(p.h);
            let x_row = x_ch + u32(max(iy, 0)) * p.w;
            for (var kx = 0u; kx < p.kw; kx++) {
                var xv: array<f32, 8>;
                for (var c = 0u; c < CB; c++) {
                    let ix = i32((ox0 + c) * p.sw + kx * p.dw) - i32(p.pw);
                    let ok = row_ok && ix >= 0 && ix < i32(p.w);
                    xv[c] = select(0.0, a[select(0u, x_row + u32(ix), ok)], ok);
                }
                let x0 = vec4<f32>(xv[0], xv[1], xv[2], xv[3]);
                let x1 = vec4<f32>(xv[4], xv[5], xv[6], xv[7]);
                let tap = (ci * p.kh + ky) * p.kw + kx;
                for (var r = 0u; r < RB; r++) {
                    let wv = b[w_row[r] + tap];
                    acc[2u * r] += wv * x0;
                    acc[2u * r + 1u] += wv * x1;
                }
            }
        }
    }
    let ohw = p.oh * p.ow;
    for (var r = 0u; r < RB; r++) {
        let co = co0 + r;
        if (co >= p.cout_g) { break; }
        let och = g * p.cout_g + co;
        var bias = 0.0;
        if (p.has_bias == 1u) { bias = c[och]; }
        let o_row = (img * p.cout + och) * ohw + oy * p.ow;
        for (var cc = 0u; cc < CB; cc++) {
            if (ox0 + cc < p.ow) { out[o_row + ox0 + cc] = acc[2u * r + cc / 4u][cc % 4u] + bias; }
        }
    }
}

// Input gradient: invocation = (group, block of RB input channels, 8 pixels of one input row),
// gathering for each (co, ky, kx) the dy pixel that tap read from (when the stride hits it).
// tiles_m = channel blocks, tiles_n = pixel groups (n * h * ceil(w / 8)).
@compute @workgroup_size(64, 1, 1)
fn conv_input_grad_rb(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                      @builtin(local_invocation_id) lid: vec3<u32>) {
    let gid = wg_linear(wid, nwg) * 64u + lid.x;
    let pg = gid % p.tiles_n;
    let rest = gid / p.tiles_n;
    let cb = rest % p.tiles_m;
    let g = rest / p.tiles_m;
    if (g >= p.groups) { return; }
    let wb = (p.w + CB - 1u) / CB;
    let ix0 = (pg % wb) * CB;
    let r1 = pg / wb;
    let iy = r1 % p.h;
    let img = r1 / p.h;
    let khkw = p.kh * p.kw;
    let ohw = p.oh * p.ow;
    let ci0 = cb * RB;
    var w_col: array<u32, 16>;
    for (var r = 0u; r < RB; r++) { w_col[r] = min(ci0 + r, p.cin_g - 1u) * khkw; }
    var acc: array<vec4<f32>, 32>;
    for (var i = 0u; i < 32u; i++) { acc[i] = vec4<f32>(0.0); }
    let dy_img = (img * p.cout + g * p.cout_g) * ohw;
    for (var co = 0u; co < p.cout_g; co++) {
        let dy_ch = dy_img + co * ohw;
        let w_co = (g * p.cout_g + co) * p.cin_g * khkw;
        for (var ky = 0u; ky < p.kh; ky++) {
            let ty = i32(iy + p.ph) - i32(ky * p.dh);
            var oy = u32(max(ty, 0)) / p.sh;
            let row_ok = ty >= 0 && oy * p.sh == u32(ty) && oy < p.oh;
            let dy_row = dy_ch + select(0u, oy, row_ok) * p.ow;
            for (var kx = 0u; kx < p.kw; kx++) {
                var dv: array<f32, 8>;
                for (var c = 0u; c < CB; c++) {
                    let tx = i32(ix0 + c + p.pw) - i32(kx * p.dw);
                    var ox = u32(max(tx, 0));
                    var ok = row_ok && tx >= 0;
                    if (p.sw != 1u) { ox = ox / p.sw; ok = ok && ox * p.sw == u32(tx); }
                    ok = ok && ox < p.ow;
                    dv[c] = select(0.0, a[select(0u, dy_row + ox, ok)], ok);
                }
                let d0 = vec4<f32>(dv[0], dv[1], dv[2], dv[3]);
                let d1 = vec4<f32>(dv[4], dv[5], dv[6], dv[7]);
                let tap = ky * p.kw + kx;
                for (var r = 0u; r < RB; r++) {
                    let wv = b[w_co + w_col[r] + tap];
                    acc[2u * r] += wv * d0;
                    acc[2u * r + 1u] += wv * d1;
                }
            }
        }
    }
    let hw = p.h * p.w;
    for (var r = 0u; r < RB; r++) {
        let ci = ci0 + r;
        if (ci >= p.cin_g) { break; }
        let o_row = (img * p.cin + g * p.cin_g + ci) * hw + iy * p.w;
        for (var cc = 0u; cc < CB; cc++) {
            if (ix0 + cc < p.w) { out[o_row + ix0 + cc] = acc[2u * r + cc / 4u][cc % 4u]; }
        }
    }
}

// Weight gradient: invocation = (split, block of RB output channels, block of 8 weight
// columns (ci, ky, kx) of the group, group), summing over its slice of (n, oy, ox).
// tiles_m = channel blocks, tiles_n = column blocks, k_chunk = slice length.
@compute @workgroup_size(64, 1, 1)
fn conv_weight_grad_rb(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                       @builtin(local_invocation_id) lid: vec3<u32>) {
    let gid = wg_linear(wid, nwg) * 64u + lid.x;
    let split = gid % p.splits;
    let r0 = gid / p.splits;
    let nb = r0 % p.tiles_n;
    let r1 = r0 / p.tiles_n;
    let cb = r1 % p.tiles_m;
    let g = r1 / p.tiles_m;
    if (g >= p.groups) { return; }
    let khkw = p.kh * p.kw;
    let hw = p.h * p.w;
    let ohw = p.oh * p.ow;
    let ncols = p.cin_g * khkw;
    let co0 = cb * RB;
    var dy_ch: array<u32, 16>;
    for (var r = 0u; r < RB; r++) { dy_ch[r] = (g * p.cout_g + min(co0 + r, p.cout_g - 1u)) * ohw; }
    // Each column's input channel offset and tap displacement, decoded once.
    var x_ch: array<u32, 8>;
    var dyo: array<i32, 8>;
    var dxo: array<i32, 8>;
    for (var c = 0u; c < CB; c++) {
        let col = min(nb * CB + c, ncols - 1u);
        let ci = col / khkw;
        let tap = col % khkw;
        x_ch[c] = (g * p.cin_g + ci) * hw;
        dyo[c] = i32((tap / p.kw) * p.dh) - i32(p.ph);
        dxo[c] = i32((tap % p.kw) * p.dw) - i32(p.pw);
    }
    var acc: array<vec4<f32>, 32>;
    for (var i = 0u; i < 32u; i++) { acc[i] = vec4<f32>(0.0); }
    let k_begin = split * p.k_chunk;
    let k_end = min(p.gk, k_begin + p.k_chunk);
    // (img, oy, ox) of k, advanced incrementally.
    var img = k_begin / ohw;
    var oy = (k_begin % ohw) / p.ow;
    var ox = k_begin % p.ow;
    for (var k = k_begin; k < k_end; k++) {
        let dy_pix = img * p.cout * ohw + oy * p.ow + ox;
        let x_img = img * p.cin * hw;
        let iy = i32(oy * p.sh);
        let ix = i32(ox * p.sw);
        var xv: array<f32, 8>;
        for (var c = 0u; c < CB; c++) {
            let y = iy + dyo[c];
            let x = ix + dxo[c];
            let ok = y >= 0 && y < i32(p.h) && x >= 0 && x < i32(p.w);
            xv[c] = select(0.0, b[select(0u, x_img + x_ch[c] + u32(y) * p.w + u32(x), ok)], ok);
        }
        let x0 = vec4<f32>(xv[0], xv[1], xv[2], xv[3]);
        let x1 = vec4<f32>(xv[4], xv[5], xv[6], xv[7]);
        for (var r = 0u; r < RB; r++) {
            let dv = a[dy_pix + dy_ch[r]];
            acc[2u * r] += dv * x0;
            acc[2u * r + 1u] += dv * x1;
        }
        ox += 1u;
        if (ox == p.ow) {
            ox = 0u;
            oy += 1u;
            if (oy == p.oh) { oy = 0u; img += 1u; }
        }
    }
    let slice = split * p.cout * ncols;
    for (var r = 0u; r < RB; r++) {
        let co = co0 + r;
        if (co >= p.cout_g) { break; }
        let o_row = slice + (g * p.cout_g + co) * ncols;
        for (var cc = 0u; cc < CB; cc++) {
            let col = nb * CB + cc;
            if (col < ncols) { out[o_row + col] = acc[2u * r + cc / 4u][cc % 4u]; }
        }
    }
}
