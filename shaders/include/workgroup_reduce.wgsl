// Tree reductions over one workgroup. The including file declares `const WG: u32`, its
// workgroup size (a power of two). Every thread of the workgroup must call them, each with its
// own value; each returns the workgroup's total to every thread. Two lanes are reduced at once
// (a scalar uses .x), so a kernel that needs two sums pays for one tree.

var<workgroup> wg_lanes: array<vec2<f32>, WG>;

fn wg_reduce2(lid: u32, v: vec2<f32>, take_max: bool) -> vec2<f32> {
    wg_lanes[lid] = v;
    for (var s = WG / 2u; s > 0u; s = s / 2u) {
        workgroupBarrier();
        if (lid < s) {
            let a = wg_lanes[lid];
            let b = wg_lanes[lid + s];
            wg_lanes[lid] = select(a + b, max(a, b), take_max);
        }
    }
    workgroupBarrier();
    let r = wg_lanes[0];
    // No thread may overwrite its lane for the next reduction before every thread has read r.
    workgroupBarrier();
    return r;
}

fn wg_sum2(lid: u32, v: vec2<f32>) -> vec2<f32> {
    return wg_reduce2(lid, v, false);
}

fn wg_max2(lid: u32, v: vec2<f32>) -> vec2<f32> {
    return wg_reduce2(lid, v, true);
}

fn wg_sum(lid: u32, v: f32) -> f32 {
    return wg_reduce2(lid, vec2<f32>(v, 0.0), false).x;
}

fn wg_max(lid: u32, v: f32) -> f32 {
    return wg_reduce2(lid, vec2<f32>(v, 0.0), true).x;
}
