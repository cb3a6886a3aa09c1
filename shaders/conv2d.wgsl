// General 2-D convolution (stride, zero padding, dilation, groups): implicit GEMM without
// any im2col buffer. Each invocation owns a register block of output values and gathers its
// operands straight from the NCHW tensors:
//
//   conv_forward_rb      y[n,co,oy,ox]  = sum_(ci,ky,kx) w[co,ci,ky,kx] x[n,ci,iy,ix] (+ bias)
//   conv_input_grad_rb   dx[n,ci,iy,ix] = sum_(co,ky,kx) w[co,ci,ky,kx] dy[n,co,oy,ox]
//                        (the transposed convolution as a gather: each dx element is owned by
//                        one invocation, so no float atomics)
//   conv_weight_grad_rb  dw[co,ci,ky,kx] = sum_(n,oy,ox) dy[n,co,oy,ox] x[n,ci,iy,ix], the long
//                        reduction cut into `splits` slices whose partial sums sum_splits adds
//   bias_grad            db[c] = sum_(n,y,x) dy[n,c,y,x], one workgroup reduction per channel
//
// with iy = oy*sh - ph + ky*dh and ix = ox*sw - pw + kx*dw. Grids are 1-D, folded into 2-D by
// the host past 65,535 workgroups.

#include "conv_layout.wgsl"

var<workgroup> red: array<f32, 256>;

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

// Where an invocation of the register-blocked pixel kernels works: group g, block cb of RB
// channels, and `run` consecutive pixels from column x0 of row y of image img, over planes of
// rows x cols (tiles_m = channel blocks, tiles_n = n * rows * ceil(cols / run) pixel runs).
struct PixelRun { g: u32, cb: u32, img: u32, y: u32, x0: u32 }

fn pixel_run(gid: u32, rows: u32, cols: u32, run: u32) -> PixelRun {
    let pixel_group = gid % p.tiles_n;
    let rest = gid / p.tiles_n;
    let runs = (cols + run - 1u) / run;
    let row = pixel_group / runs;
    return PixelRun(rest / p.tiles_m, rest % p.tiles_m, row / rows, row % rows, (pixel_group % runs) * run);
}

// Forward: invocation = (group, block of RB output channels, FB pixels of one output row).
// tiles_m = channel blocks, tiles_n = pixel groups (n * oh * ceil(ow / FB)). With stride 1,
// dilation 1 and 3 taps per row, one sliding window of FB + 2 inputs serves all three taps.
const FB: u32 = 16u;

@compute @workgroup_size(64, 1, 1)
fn conv_forward_rb(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_id) lid: vec3<u32>) {
    let at = pixel_run(wg_linear(wid, nwg) * 64u + lid.x, p.oh, p.ow, FB);
    if (at.g >= p.groups) { return; }
    let khkw = p.kh * p.kw;
    let hw = p.h * p.w;
    let co0 = at.cb * RB;
    let w_stride = p.cin_g * khkw;
    // Rows past the group's channels read the last valid row; their results are never stored.
    var w_row: array<u32, 16>;
    for (var r = 0u; r < RB; r++) {
        w_row[r] = (at.g * p.cout_g + min(co0 + r, p.cout_g - 1u)) * w_stride;
    }
    var acc: array<vec4<f32>, 64>; // [RB][FB / 4]
    for (var i = 0u; i < 64u; i++) { acc[i] = vec4<f32>(0.0); }
    let x_img = (at.img * p.cin + at.g * p.cin_g) * hw;
    let iy0 = i32(at.y * p.sh) - i32(p.ph);
    let window = p.sw == 1u && p.dw == 1u && p.kw == 3u;
    for (var ci = 0u; ci < p.cin_g; ci++) {
        let x_ch = x_img + ci * hw;
        for (var ky = 0u; ky < p.kh; ky++) {
            let iy = iy0 + i32(ky * p.dh);
            let row_ok = iy >= 0 && iy < i32(p.h);
            let x_row = x_ch + u32(max(iy, 0)) * p.w;
            let tap0 = (ci * p.kh + ky) * p.kw;
            if (window) {
                var win: array<f32, 18>;
                for (var j = 0u; j < FB + 2u; j++) {
                    let ix = i32(at.x0 + j) - i32(p.pw);
                    let ok = row_ok && ix >= 0 && ix < i32(p.w);
                    win[j] = select(0.0, a[select(0u, x_row + u32(ix), ok)], ok);
                }
                let x0_0 = vec4<f32>(win[0], win[1], win[2], win[3]);
                let x0_1 = vec4<f32>(win[4], win[5], win[6], win[7]);
                let x0_2 = vec4<f32>(win[8], win[9], win[10], win[11]);
                let x0_3 = vec4<f32>(win[12], win[13], win[14], win[15]);
                let x1_0 = vec4<f32>(win[1], win[2], win[3], win[4]);
                let x1_1 = vec4<f32>(win[5], win[6], win[7], win[8]);
                let x1_2 = vec4<f32>(win[9], win[10], win[11], win[12]);
                let x1_3 = vec4<f32>(win[13], win[14], win[15], win[16]);
                let x2_0 = vec4<f32>(win[2], win[3], win[4], win[5]);
                let x2_1 = vec4<f32>(win[6], win[7], win[8], win[9]);
                let x2_2 = vec4<f32>(win[10], win[11], win[12], win[13]);
                let x2_3 = vec4<f32>(win[14], win[15], win[16], win[17]);
                for (var r = 0u; r < RB; r++) {
                    let w0 = b[w_row[r] + tap0];
                    let w1 = b[w_row[r] + tap0 + 1u];
                    let w2 = b[w_row[r] + tap0 + 2u];
                    acc[4u * r] += w0 * x0_0 + w1 * x1_0 + w2 * x2_0;
                    acc[4u * r + 1u] += w0 * x0_1 + w1 * x1_1 + w2 * x2_1;
                    acc[4u * r + 2u] += w0 * x0_2 + w1 * x1_2 + w2 * x2_2;
                    acc[4u * r + 3u] += w0 * x0_3 + w1 * x1_3 + w2 * x2_3;
                }
            } else {
                for (var kx = 0u; kx < p.kw; kx++) {
                    var xv: array<f32, 16>;
                    for (var c = 0u; c < FB; c++) {
                        let ix = i32((at.x0 + c) * p.sw + kx * p.dw) - i32(p.pw);
                        let ok = row_ok && ix >= 0 && ix < i32(p.w);
                        xv[c] = select(0.0, a[select(0u, x_row + u32(ix), ok)], ok);
                    }
                    let x0 = vec4<f32>(xv[0], xv[1], xv[2], xv[3]);
                    let x1 = vec4<f32>(xv[4], xv[5], xv[6], xv[7]);
                    let x2 = vec4<f32>(xv[8], xv[9], xv[10], xv[11]);
                    let x3 = vec4<f32>(xv[12], xv[13], xv[14], xv[15]);
                    for (var r = 0u; r < RB; r++) {
                        let wv = b[w_row[r] + tap0 + kx];
                        acc[4u * r] += wv * x0;
                        acc[4u * r + 1u] += wv * x1;
                        acc[4u * r + 2u] += wv * x2;
                        acc[4u * r + 3u] += wv * x3;
                    }
                }
            }
        }
    }
    let ohw = p.oh * p.ow;
    for (var r = 0u; r < RB; r++) {
        let co = co0 + r;
        if (co >= p.cout_g) { break; }
        let och = at.g * p.cout_g + co;
        var bias = 0.0;
        if (p.has_bias == 1u) { bias = c[och]; }
        let o_row = (at.img * p.cout + och) * ohw + at.y * p.ow;
        for (var cc = 0u; cc < FB; cc++) {
            if (at.x0 + cc < p.ow) { out[o_row + at.x0 + cc] = acc[4u * r + cc / 4u][cc % 4u] + bias; }
        }
    }
}

// Input gradient: invocation = (group, block of RB input channels, 8 pixels of one input row),
// gathering for each (co, ky, kx) the dy pixel that tap read from (when the stride hits it).
// tiles_m = channel blocks, tiles_n = pixel groups (n * h * ceil(w / 8)).
@compute @workgroup_size(64, 1, 1)
fn conv_input_grad_rb(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                      @builtin(local_invocation_id) lid: vec3<u32>) {
    let at = pixel_run(wg_linear(wid, nwg) * 64u + lid.x, p.h, p.w, CB);
    if (at.g >= p.groups) { return; }
    let ci0 = at.cb * RB;
    let khkw = p.kh * p.kw;
    let ohw = p.oh * p.ow;
    var w_col: array<u32, 16>;
    for (var r = 0u; r < RB; r++) { w_col[r] = min(ci0 + r, p.cin_g - 1u) * khkw; }
    var acc: array<vec4<f32>, 32>;
    for (var i = 0u; i < 32u; i++) { acc[i] = vec4<f32>(0.0); }
    let dy_img = (at.img * p.cout + at.g * p.cout_g) * ohw;
    for (var co = 0u; co < p.cout_g; co++) {
        let dy_ch = dy_img + co * ohw;
        let w_co = (at.g * p.cout_g + co) * p.cin_g * khkw;
        for (var ky = 0u; ky < p.kh; ky++) {
            let ty = i32(at.y + p.ph) - i32(ky * p.dh);
            var oy = u32(max(ty, 0)) / p.sh;
            let row_ok = ty >= 0 && oy * p.sh == u32(ty) && oy < p.oh;
            let dy_row = dy_ch + select(0u, oy, row_ok) * p.ow;
            for (var kx = 0u; kx < p.kw; kx++) {
                var dv: array<f32, 8>;
                for (var c = 0u; c < CB; c++) {
                    let tx = i32(at.x0 + c + p.pw) - i32(kx * p.dw);
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
        let o_row = (at.img * p.cin + at.g * p.cin_g + ci) * hw + at.y * p.w;
        for (var cc = 0u; cc < CB; cc++) {
            if (at.x0 + cc < p.w) { out[o_row + at.x0 + cc] = acc[2u * r + cc / 4u][cc % 4u]; }
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
