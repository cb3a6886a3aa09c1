// Batched GEMM: out[b] = A[b] (M x K) * B[b] (K x N), with A and B read through arbitrary
// strides, so transposed operands cost nothing extra. 64x64 output tile per workgroup of
// 16x16 invocations, each accumulating a 4x4 block in registers; K is staged through
// workgroup memory 16 at a time.

struct Params {
    m: u32, n: u32, k: u32, batch: u32,
    sa_b: u32, sa_m: u32, sa_k: u32,
    sb_b: u32, sb_k: u32, sb_n: u32,
    accumulate: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

const TILE: u32 = 64u;
const BK: u32 = 16u;

var<workgroup> a_tile: array<f32, 1024>; // [BK][TILE], indexed k * TILE + m
var<workgroup> b_tile: array<f32, 1024>; // [BK][TILE], indexed k * TILE + n

@compute @workgroup_size(16, 16, 1)
fn matmul(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let bat = wid.z;
    let row0 = wid.y * TILE;
    let col0 = wid.x * TILE;
    let tid = lid.y * 16u + lid.x;
    let a_base = bat * p.sa_b;
    let b_base = bat * p.sb_b;
    var acc: array<f32, 16>;
    for (var i = 0u; i < 16u; i++) { acc[i] = 0.0; }

    for (var k0 = 0u; k0 < p.k; k0 += BK) {
        // Stage A: walk the operand along its contiguous dimension.
        for (var r = 0u; r < 4u; r++) {
            let e = tid + r * 256u;
            var m: u32; var kk: u32;
            if (p.sa_k == 1u) { m = e / BK; kk = e % BK; } else { kk = e / TILE; m = e % TILE; }
            let gm = row0 + m;
            let gk = k0 + kk;
            var v = 0.0;
            if (gm < p.m && gk < p.k) { v = a[a_base + gm * p.sa_m + gk * p.sa_k]; }
            a_tile[kk * TILE + m] = v;
        }
        for (var r = 0u; r < 4u; r++) {
            let e = tid + r * 256u;
            var n: u32; var kk: u32;
            if (p.sb_n == 1u) { kk = e / TILE; n = e % TILE; } else { n = e / BK; kk = e % BK; }
            let gn = col0 + n;
            let gk = k0 + kk;
            var v = 0.0;
            if (gn < p.n && gk < p.k) { v = b[b_base + gk * p.sb_k + gn * p.sb_n]; }
            b_tile[kk * TILE + n] = v;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < BK; kk++) {
            let av = vec4<f32>(a_tile[kk * TILE + lid.y * 4u], a_tile[kk * TILE + lid.y * 4u + 1u],
                               a_tile[kk * TILE + lid.y * 4u + 2u], a_tile[kk * TILE + lid.y * 4u + 3u]);
            let bv = vec4<f32>(b_tile[kk * TILE + lid.x * 4u], b_tile[kk * TILE + lid.x * 4u + 1u],
                               b_tile[kk * TILE + lid.x * 4u + 2u], b_tile[kk * TILE + lid.x * 4u + 3u]);
            for (var i = 0u; i < 4u; i++) {
                acc[i * 4u + 0u] += av[i] * bv.x;
                acc[i * 4u + 1u] += av[i] * bv.y;
                acc[i * 4u + 2u] += av[i] * bv.z;
                acc[i * 4u + 3u] += av[i] * bv.w;
            }
        }
        workgroupBarrier();
    }

    let o_base = bat * p.m * p.n;
    for (var i = 0u; i < 4u; i++) {
        let gm = row0 + lid.y * 4u + i;
        if (gm >= p.m) { continue; }
        for (var j = 0u; j < 4u; j++) {
            let gn = col0 + lid.x * 4u + j;
            if (gn < p.n) {
                let o = o_base + gm * p.n + gn;
                if (p.accumulate == 1u) { out[o] += acc[i * 4u + j]; } else { out[o] = acc[i * 4u + j]; }
            }
        }
    }
}
