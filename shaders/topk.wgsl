// Top-k per row of a similarity matrix, one workgroup per row: k passes of a workgroup argmax
// reduction, each step removing its winner from the row (the row is a scratch copy). Ties go
// to the lower column index, so results are deterministic and match the CPU reference.

struct Params {
    rows: u32,
    cols: u32,
    k: u32,
    // Column excluded from row r: r + self_offset (the query itself), or none if >= cols.
    self_offset: u32,
    exclude_self: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> scores: array<f32>;
@group(0) @binding(2) var<storage, read_write> out_idx: array<f32>;
@group(0) @binding(3) var<storage, read_write> out_val: array<f32>;

const WG: u32 = 256u;
const NEG_INF: f32 = -3.0e38;

var<workgroup> best_val: array<f32, WG>;
var<workgroup> best_idx: array<u32, WG>;

fn better(v: f32, i: u32, bv: f32, bi: u32) -> bool {
    return v > bv || (v == bv && i < bi);
}

@compute @workgroup_size(256)
fn row_topk(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lid: u32) {
    let row = wg_linear(wid, nwg);
    if (row >= p.rows) { return; }
    let base = row * p.cols;
    if (p.exclude_self == 1u && lid == 0u) {
        let c = row + p.self_offset;
        if (c < p.cols) { scores[base + c] = NEG_INF; }
    }
    storageBarrier();
    workgroupBarrier();
    for (var step = 0u; step < p.k; step++) {
        var bv = NEG_INF;
        var bi = 0xffffffffu;
        for (var c = lid; c < p.cols; c += WG) {
            let v = scores[base + c];
            if (better(v, c, bv, bi)) { bv = v; bi = c; }
        }
        best_val[lid] = bv;
        best_idx[lid] = bi;
        workgroupBarrier();
        for (var s = WG / 2u; s > 0u; s >>= 1u) {
            if (lid < s && better(best_val[lid + s], best_idx[lid + s], best_val[lid], best_idx[lid])) {
                best_val[lid] = best_val[lid + s];
                best_idx[lid] = best_idx[lid + s];
            }
            workgroupBarrier();
        }
        if (lid == 0u) {
            let i = best_idx[0];
            out_idx[row * p.k + step] = f32(i);
            out_val[row * p.k + step] = best_val[0];
            if (i < p.cols) { scores[base + i] = NEG_INF; }
        }
        storageBarrier();
        workgroupBarrier();
    }
}
