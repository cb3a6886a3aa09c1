// Batched GEMM for CPU adapters when both operands can be read as aligned vec4s: out[b] =
// A[b] (M x K) * B[b] (K x N), strides as in matmul.wgsl, every stride along a non-contiguous
// direction a multiple of 4 (the host checks). llvmpipe runs 8 invocations as the lanes of
// one SIMD vector and turns every storage load into a loop over the lanes; a vec4 load is ONE
// such loop fetching 4 values per lane, so loading vec4s cuts the dominant cost.
//
// Each invocation owns an 8 x 8 output block and steps K by 4: per step it loads an 8 x 4
// block of A and a 4 x 8 block of B as 8 vec4s each (along whichever direction is contiguous
// in memory: a vec4 of 4 k values of one row or 4 rows at one k, etc.; regrouping the
// components costs nothing since every component is a separate SIMD register) and does 256
// multiply-adds. The four layouts are four entry points sharing one inlined body, so the
// layout tests fold away at compile time.

#include "matmul_params.wgsl"

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> b: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

const BM: u32 = 16u;
const BN: u32 = 8u;
const WG: u32 = 8u;

// 8 rows of A at 4 consecutive k: r_i holds (A[i, k], .., A[i, k + 3]).
struct ABlock { r0: vec4<f32>, r1: vec4<f32>, r2: vec4<f32>, r3: vec4<f32>,
                r4: vec4<f32>, r5: vec4<f32>, r6: vec4<f32>, r7: vec4<f32> }
// 4 consecutive k of B at 8 columns: k{kk}{lo,hi} holds columns 0-3 / 4-7 of row k + kk.
struct BBlock { k0l: vec4<f32>, k0h: vec4<f32>, k1l: vec4<f32>, k1h: vec4<f32>,
                k2l: vec4<f32>, k2h: vec4<f32>, k3l: vec4<f32>, k3h: vec4<f32> }

// A stored with k contiguous (sa_k == 1): one vec4 per row. ro_* are vec4 indices of (row, k=0).
fn a_along_k(ro_lo: vec4<u32>, ro_hi: vec4<u32>, k4: u32) -> ABlock {
    return ABlock(a[ro_lo.x + k4], a[ro_lo.y + k4], a[ro_lo.z + k4], a[ro_lo.w + k4],
                  a[ro_hi.x + k4], a[ro_hi.y + k4], a[ro_hi.z + k4], a[ro_hi.w + k4]);
}

// A stored with m contiguous (sa_m == 1): one vec4 of 4 rows per k. Past K (only in the
// m/n layout, where K need not be a multiple of 4) it reads row K - 1; b_at_k zeroes B there.
fn a_at_k(base: u32, k: u32) -> vec4<f32> {
    return a[(base + min(k, p.k - 1u) * p.sa_k) / 4u];
}

fn a_along_m(base_lo: u32, base_hi: u32, k: u32) -> ABlock {
    let l0 = a_at_k(base_lo, k); let l1 = a_at_k(base_lo, k + 1u);
    let l2 = a_at_k(base_lo, k + 2u); let l3 = a_at_k(base_lo, k + 3u);
    let h0 = a_at_k(base_hi, k); let h1 = a_at_k(base_hi, k + 1u);
    let h2 = a_at_k(base_hi, k + 2u); let h3 = a_at_k(base_hi, k + 3u);
    return ABlock(vec4<f32>(l0.x, l1.x, l2.x, l3.x), vec4<f32>(l0.y, l1.y, l2.y, l3.y),
                  vec4<f32>(l0.z, l1.z, l2.z, l3.z), vec4<f32>(l0.w, l1.w, l2.w, l3.w),
                  vec4<f32>(h0.x, h1.x, h2.x, h3.x), vec4<f32>(h0.y, h1.y, h2.y, h3.y),
                  vec4<f32>(h0.z, h1.z, h2.z, h3.z), vec4<f32>(h0.w, h1.w, h2.w, h3.w));
}

// B stored with n contiguous (sb_n == 1): one vec4 of 4 columns per k. Past K: zeros, so the
// products of the last partial k step vanish.
fn b_at_k(base: u32, k: u32) -> vec4<f32> {
    return select(vec4<f32>(0.0), b[(base + min(k, p.k - 1u) * p.sb_k) / 4u], k < p.k);
}

fn b_along_n(base_lo: u32, base_hi: u32, k: u32) -> BBlock {
    return BBlock(b_at_k(base_lo, k), b_at_k(base_hi, k), b_at_k(base_lo, k + 1u), b_at_k(base_hi, k + 1u),
                  b_at_k(base_lo, k + 2u), b_at_k(base_hi, k + 2u), b_at_k(base_lo, k + 3u), b_at_k(base_hi, k + 3u));
}

// B stored with k contiguous (sb_k == 1): one vec4 of 4 k per column. co_* are vec4 indices.
fn b_along_k(co_lo: vec4<u32>, co_hi: vec4<u32>, k4: u32) -> BBlock {
    let c0 = b[co_lo.x + k4]; let c1 = b[co_lo.y + k4]; let c2 = b[co_lo.z + k4]; let c3 = b[co_lo.w + k4];
    let c4 = b[co_hi.x + k4]; let c5 = b[co_hi.y + k4]; let c6 = b[co_hi.z + k4]; let c7 = b[co_hi.w + k4];
    return BBlock(vec4<f32>(c0.x, c1.x, c2.x, c3.x), vec4<f32>(c4.x, c5.x, c6.x, c7.x),
                  vec4<f32>(c0.y, c1.y, c2.y, c3.y), vec4<f32>(c4.y, c5.y, c6.y, c7.y),
                  vec4<f32>(c0.z, c1.z, c2.z, c3.z), vec4<f32>(c4.z, c5.z, c6.z, c7.z),
                  vec4<f32>(c0.w, c1.w, c2.w, c3.w), vec4<f32>(c4.w, c5.w, c6.w, c7.w));
}

// One output row (4 columns, low or high half) over 4 k.
fn row_lo(r: vec4<f32>, y: BBlock) -> vec4<f32> { return r.x * y.k0l + r.y * y.k1l + r.z * y.k2l + r.w * y.k3l; }
fn row_hi(r: vec4<f32>, y: BBlock) -> vec4<f32> { return r.x * y.k0h + r.y * y.k1h + r.z * y.k2h + r.w * y.k3h; }

fn store4(o_row: u32, row_ok: bool, n: u32, v: vec4<f32>) {
    if (!row_ok) { return; }
    for (var j = 0u; j < 4u; j++) {
        if (n + j < p.n) {
            let o = o_row + n + j;
            if (p.accumulate == 1u) { out[o] += v[j]; } else { out[o] = v[j]; }
        }
    }
}

fn store_row(o_base: u32, m: u32, n0: u32, lo: vec4<f32>, hi: vec4<f32>) {
    let o_row = o_base + m * p.n;
    store4(o_row, m < p.m, n0, lo);
    store4(o_row, m < p.m, n0 + 4u, hi);
}

// Element index of (row, col) clamped into the matrix, for four consecutive rows/cols.
fn clamp4(first: u32, last: u32) -> vec4<u32> {
    return min(vec4<u32>(first, first + 1u, first + 2u, first + 3u), vec4<u32>(last));
}

fn block(gid: u32, a_k_contiguous: bool, b_k_contiguous: bool) {
    let tiles_n = (p.n + BN - 1u) / BN;
    let tiles_m = (p.m + BM - 1u) / BM;
    let tn = gid % tiles_n;
    let rest = gid / tiles_n;
    let tm = rest % tiles_m;
    let bat = rest / tiles_m;
    if (bat >= p.batch) { return; }
    let m0 = tm * BM;
    let n0 = tn * BN;
    // A: vec4 indices of (row, k = 0) per row, or element bases of the two 4-row groups
    // (rows past M use the last 4-row group; M is a multiple of 4 in that layout).
    let a_b = bat * p.sa_b;
    let a_rows = array<vec4<u32>, 4>(
        (a_b + clamp4(m0, p.m - 1u) * p.sa_m) / 4u, (a_b + clamp4(m0 + 4u, p.m - 1u) * p.sa_m) / 4u,
        (a_b + clamp4(m0 + 8u, p.m - 1u) * p.sa_m) / 4u, (a_b + clamp4(m0 + 12u, p.m - 1u) * p.sa_m) / 4u);
    let a_grp = a_b + min(vec4<u32>(m0, m0 + 4u, m0 + 8u, m0 + 12u), vec4<u32>(p.m - 4u));
    let b_cols_lo = (bat * p.sb_b + clamp4(n0, p.n - 1u) * p.sb_n) / 4u;
    let b_cols_hi = (bat * p.sb_b + clamp4(n0 + 4u, p.n - 1u) * p.sb_n) / 4u;
    let b_grp_lo = bat * p.sb_b + min(n0, p.n - 4u);
    let b_grp_hi = bat * p.sb_b + min(n0 + 4u, p.n - 4u);

    var c0l = vec4<f32>(0.0); var c0h = vec4<f32>(0.0); var c1l = vec4<f32>(0.0); var c1h = vec4<f32>(0.0);
    var c2l = vec4<f32>(0.0); var c2h = vec4<f32>(0.0); var c3l = vec4<f32>(0.0); var c3h = vec4<f32>(0.0);
    var c4l = vec4<f32>(0.0); var c4h = vec4<f32>(0.0); var c5l = vec4<f32>(0.0); var c5h = vec4<f32>(0.0);
    var c6l = vec4<f32>(0.0); var c6h = vec4<f32>(0.0); var c7l = vec4<f32>(0.0); var c7h = vec4<f32>(0.0);
    var d0l = vec4<f32>(0.0); var d0h = vec4<f32>(0.0); var d1l = vec4<f32>(0.0); var d1h = vec4<f32>(0.0);
    var d2l = vec4<f32>(0.0); var d2h = vec4<f32>(0.0); var d3l = vec4<f32>(0.0); var d3h = vec4<f32>(0.0);
    var d4l = vec4<f32>(0.0); var d4h = vec4<f32>(0.0); var d5l = vec4<f32>(0.0); var d5h = vec4<f32>(0.0);
    var d6l = vec4<f32>(0.0); var d6h = vec4<f32>(0.0); var d7l = vec4<f32>(0.0); var d7h = vec4<f32>(0.0);
    for (var k = 0u; k < p.k; k += 4u) {
        var x: ABlock;
        var z: ABlock;
        if (a_k_contiguous) {
            x = a_along_k(a_rows[0], a_rows[1], k / 4u);
            z = a_along_k(a_rows[2], a_rows[3], k / 4u);
        } else {
            x = a_along_m(a_grp.x, a_grp.y, k);
            z = a_along_m(a_grp.z, a_grp.w, k);
        }
        var y: BBlock;
        if (b_k_contiguous) { y = b_along_k(b_cols_lo, b_cols_hi, k / 4u); }
        else { y = b_along_n(b_grp_lo, b_grp_hi, k); }
        c0l += row_lo(x.r0, y); c0h += row_hi(x.r0, y);
        c1l += row_lo(x.r1, y); c1h += row_hi(x.r1, y);
        c2l += row_lo(x.r2, y); c2h += row_hi(x.r2, y);
        c3l += row_lo(x.r3, y); c3h += row_hi(x.r3, y);
        c4l += row_lo(x.r4, y); c4h += row_hi(x.r4, y);
        c5l += row_lo(x.r5, y); c5h += row_hi(x.r5, y);
        c6l += row_lo(x.r6, y); c6h += row_hi(x.r6, y);
        c7l += row_lo(x.r7, y); c7h += row_hi(x.r7, y);
        d0l += row_lo(z.r0, y); d0h += row_hi(z.r0, y);
        d1l += row_lo(z.r1, y); d1h += row_hi(z.r1, y);
        d2l += row_lo(z.r2, y); d2h += row_hi(z.r2, y);
        d3l += row_lo(z.r3, y); d3h += row_hi(z.r3, y);
        d4l += row_lo(z.r4, y); d4h += row_hi(z.r4, y);
        d5l += row_lo(z.r5, y); d5h += row_hi(z.r5, y);
        d6l += row_lo(z.r6, y); d6h += row_hi(z.r6, y);
        d7l += row_lo(z.r7, y); d7h += row_hi(z.r7, y);
    }
    let o_base = bat * p.m * p.n;
    store_row(o_base, m0, n0, c0l, c0h);
    store_row(o_base, m0 + 1u, n0, c1l, c1h);
    store_row(o_base, m0 + 2u, n0, c2l, c2h);
    store_row(o_base, m0 + 3u, n0, c3l, c3h);
    store_row(o_base, m0 + 4u, n0, c4l, c4h);
    store_row(o_base, m0 + 5u, n0, c5l, c5h);
    store_row(o_base, m0 + 6u, n0, c6l, c6h);
    store_row(o_base, m0 + 7u, n0, c7l, c7h);
    store_row(o_base, m0 + 8u, n0, d0l, d0h);
    store_row(o_base, m0 + 9u, n0, d1l, d1h);
    store_row(o_base, m0 + 10u, n0, d2l, d2h);
    store_row(o_base, m0 + 11u, n0, d3l, d3h);
    store_row(o_base, m0 + 12u, n0, d4l, d4h);
    store_row(o_base, m0 + 13u, n0, d5l, d5h);
    store_row(o_base, m0 + 14u, n0, d6l, d6h);
    store_row(o_base, m0 + 15u, n0, d7l, d7h);
}

// Entry names: mm4_<A layout><B layout>, k = k contiguous in memory, m / n = rows / columns.
@compute @workgroup_size(8, 1, 1)
fn mm4_kn(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_id) lid: vec3<u32>) {
    block(wg_linear(wid, nwg) * WG + lid.x, true, false);
}

@compute @workgroup_size(8, 1, 1)
fn mm4_kk(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_id) lid: vec3<u32>) {
    block(wg_linear(wid, nwg) * WG + lid.x, true, true);
}

@compute @workgroup_size(8, 1, 1)
fn mm4_mn(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_id) lid: vec3<u32>) {
    block(wg_linear(wid, nwg) * WG + lid.x, false, false);
}

@compute @workgroup_size(8, 1, 1)
fn mm4_mk(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_id) lid: vec3<u32>) {
    block(wg_linear(wid, nwg) * WG + lid.x, false, true);
}
