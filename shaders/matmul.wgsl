// Batched GEMM: out[b] = A[b] (M x K) * B[b] (K x N), with A and B read through arbitrary
// strides, so transposed operands cost nothing extra. A 64x64 output tile per workgroup of
// 16x16 invocations, each accumulating a 4x4 block in four vec4 registers; K is staged
// through workgroup memory 16 at a time. Accumulators are named vectors rather than an
// indexed array: dynamically indexed private arrays spill to memory on CPU-based drivers.

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
