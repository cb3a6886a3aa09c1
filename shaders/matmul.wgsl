// Batched GEMM: out[b] = A[b] (M x K) * B[b] (K x N), with A and B read through arbitrary
// strides, so transposed operands cost nothing extra. A 64x64 output tile per workgroup of
// 16x16 invocations, each accumulating a 4x4 block in four vec4 registers; K is staged
// through workgroup memory 16 at a time. Accumulators are named vectors rather than an
// indexed array: dynamically indexed private arrays spill to memory on CPU-based drivers.

#include "matmul_params.wgsl"

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

const TILE: u32 = 64u;
const BK: u32 = 16u;

// [BK][TILE / 4] vectors: element (k, m) lives in a_tile[k * 16 + m / 4][m % 4].
var<workgroup> a_tile: array<vec4<f32>, 256>;
var<workgroup> b_tile: array<vec4<f32>, 256>;

fn load_a(bat: u32, gm: u32, gk: u32) -> f32 {
    if (gm < p.m && gk < p.k) { return a[bat * p.sa_b + gm * p.sa_m + gk * p.sa_k]; }
    return 0.0;
}

fn load_b(bat: u32, gk: u32, gn: u32) -> f32 {
    if (gn < p.n && gk < p.k) { return b[bat * p.sb_b + gk * p.sb_k + gn * p.sb_n]; }
    return 0.0;
}

fn store(o_base: u32, gm: u32, col: u32, v: vec4<f32>) {
    if (gm >= p.m) { return; }
    for (var j = 0u; j < 4u; j++) {
        let gn = col + j;
        if (gn < p.n) {
            let o = o_base + gm * p.n + gn;
            if (p.accumulate == 1u) { out[o] += v[j]; } else { out[o] = v[j]; }
        }
    }
}

@compute @workgroup_size(16, 16, 1)
fn matmul(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let bat = wid.z;
    let row0 = wid.y * TILE;
    let col0 = wid.x * TILE;
    let tid = lid.y * 16u + lid.x;
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);

    for (var k0 = 0u; k0 < p.k; k0 += BK) {
        // Each invocation stages one vec4 of A and one of B. A: 4 consecutive rows m at one k.
        {
            let kk = tid / 16u;
            let m4 = (tid % 16u) * 4u;
            a_tile[tid] = vec4<f32>(load_a(bat, row0 + m4, k0 + kk), load_a(bat, row0 + m4 + 1u, k0 + kk),
                                    load_a(bat, row0 + m4 + 2u, k0 + kk), load_a(bat, row0 + m4 + 3u, k0 + kk));
            b_tile[tid] = vec4<f32>(load_b(bat, k0 + kk, col0 + m4), load_b(bat, k0 + kk, col0 + m4 + 1u),
                                    load_b(bat, k0 + kk, col0 + m4 + 2u), load_b(bat, k0 + kk, col0 + m4 + 3u));
        }
        workgroupBarrier();
        for (var kk = 0u; kk < BK; kk++) {
            let av = a_tile[kk * 16u + lid.y];
            let bv = b_tile[kk * 16u + lid.x];
            acc0 += av.x * bv;
            acc1 += av.y * bv;
            acc2 += av.z * bv;
            acc3 += av.w * bv;
        }
        workgroupBarrier();
    }

    let o_base = bat * p.m * p.n;
    let row = row0 + lid.y * 4u;
    let col = col0 + lid.x * 4u;
    store(o_base, row, col, acc0);
    store(o_base, row + 1u, col, acc1);
    store(o_base, row + 2u, col, acc2);
    store(o_base, row + 3u, col, acc3);
}

// ---------------------------------------------------------------------------------------
// CPU-adapter fallback (matmul_vec4.wgsl is used instead when both operands' rows are a
// multiple of 4 long). llvmpipe runs 8 invocations as the lanes of one SIMD vector, and every
// storage load becomes a loop over the lanes (also when the address is the same for all
// lanes: Mesa 22.3 scalarises uniform loads only outside control flow, never in the k loop),
// so what counts is multiply-adds per load. A workgroup of 8 invocations owns 16 rows x 32
// columns: lane l owns columns n0 + l + 8c (c < 4) of the 16 rows, so each k step loads 16 A
// and 4 B values for 64 multiply-adds. Rows and columns past the matrix read the last valid
// one (clamped, never stored), so the k loop has no bounds tests.

const RU: u32 = 16u;
const LANES: u32 = 8u;

fn a_rows(base: u32, m: u32) -> vec4<u32> {
    let last = vec4<u32>(p.m - 1u);
    return base + min(vec4<u32>(m, m + 1u, m + 2u, m + 3u), last) * p.sa_m;
}

fn a4(o: vec4<u32>, ak: u32) -> vec4<f32> {
    return vec4<f32>(a[o.x + ak], a[o.y + ak], a[o.z + ak], a[o.w + ak]);
}

// Rows m..m+3 of column n (those inside the matrix).
fn store_rows(o_base: u32, m: u32, n: u32, v: vec4<f32>) {
    if (n >= p.n) { return; }
    for (var r = 0u; r < 4u; r++) {
        if (m + r < p.m) {
            let o = o_base + (m + r) * p.n + n;
            if (p.accumulate == 1u) { out[o] += v[r]; } else { out[o] = v[r]; }
        }
    }
}

fn rows_block(bat: u32, m0: u32, n0: u32) {
    let a_base = bat * p.sa_b;
    let ro0 = a_rows(a_base, m0);
    let ro1 = a_rows(a_base, m0 + 4u);
    let ro2 = a_rows(a_base, m0 + 8u);
    let ro3 = a_rows(a_base, m0 + 12u);
    let last_n = vec4<u32>(p.n - 1u);
    let cols = vec4<u32>(n0, n0 + LANES, n0 + 2u * LANES, n0 + 3u * LANES);
    let bo = bat * p.sb_b + min(cols, last_n) * p.sb_n;
    var c00 = vec4<f32>(0.0); var c10 = vec4<f32>(0.0); var c20 = vec4<f32>(0.0); var c30 = vec4<f32>(0.0);
    var c01 = vec4<f32>(0.0); var c11 = vec4<f32>(0.0); var c21 = vec4<f32>(0.0); var c31 = vec4<f32>(0.0);
    var c02 = vec4<f32>(0.0); var c12 = vec4<f32>(0.0); var c22 = vec4<f32>(0.0); var c32 = vec4<f32>(0.0);
    var c03 = vec4<f32>(0.0); var c13 = vec4<f32>(0.0); var c23 = vec4<f32>(0.0); var c33 = vec4<f32>(0.0);
    for (var k = 0u; k < p.k; k++) {
        let ak = k * p.sa_k;
        let bk = k * p.sb_k;
        let x0 = a4(ro0, ak);
        let x1 = a4(ro1, ak);
        let x2 = a4(ro2, ak);
        let x3 = a4(ro3, ak);
        let y0 = b[bo.x + bk];
        let y1 = b[bo.y + bk];
        let y2 = b[bo.z + bk];
        let y3 = b[bo.w + bk];
        c00 += x0 * y0; c10 += x1 * y0; c20 += x2 * y0; c30 += x3 * y0;
        c01 += x0 * y1; c11 += x1 * y1; c21 += x2 * y1; c31 += x3 * y1;
        c02 += x0 * y2; c12 += x1 * y2; c22 += x2 * y2; c32 += x3 * y2;
        c03 += x0 * y3; c13 += x1 * y3; c23 += x2 * y3; c33 += x3 * y3;
    }
    let o_base = bat * p.m * p.n;
    store_rows(o_base, m0, cols.x, c00); store_rows(o_base, m0 + 4u, cols.x, c10);
    store_rows(o_base, m0 + 8u, cols.x, c20); store_rows(o_base, m0 + 12u, cols.x, c30);
    store_rows(o_base, m0, cols.y, c01); store_rows(o_base, m0 + 4u, cols.y, c11);
    store_rows(o_base, m0 + 8u, cols.y, c21); store_rows(o_base, m0 + 12u, cols.y, c31);
    store_rows(o_base, m0, cols.z, c02); store_rows(o_base, m0 + 4u, cols.z, c12);
    store_rows(o_base, m0 + 8u, cols.z, c22); store_rows(o_base, m0 + 12u, cols.z, c32);
    store_rows(o_base, m0, cols.w, c03); store_rows(o_base, m0 + 4u, cols.w, c13);
    store_rows(o_base, m0 + 8u, cols.w, c23); store_rows(o_base, m0 + 12u, cols.w, c33);
}

@compute @workgroup_size(8, 1, 1)
fn matmul_scalar_blocks(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    rows_block(wid.z, wid.y * RU, wid.x * (4u * LANES) + lid.x);
}
