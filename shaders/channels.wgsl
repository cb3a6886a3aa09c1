// Channel ops on [N, C, HW] tensors (NCHW with the spatial dimensions flattened), one thread
// per output element.

struct Params {
    batch: u32,
    hw: u32,
    src_c: u32,
    src_off: u32,
    dst_c: u32,
    dst_off: u32,
    count: u32,
}

const WG: u32 = 256u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<f32>;
// Per-channel data: source channel indices (gather) or scales (affine).
@group(0) @binding(2) var<storage, read> aux: array<f32>;
// Per-channel shifts (affine).
@group(0) @binding(3) var<storage, read> aux2: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

// Element idx of a [batch, channels, hw] tensor: image n, channel c, spatial position s.
struct Element {
    n: u32,
    c: u32,
    s: u32,
}

fn element_of(idx: u32, channels: u32) -> Element {
    var e: Element;
    e.s = idx % p.hw;
    e.c = (idx / p.hw) % channels;
    e.n = idx / (p.hw * channels);
    return e;
}

// out[n, dst_off + c, s] = src[n, src_off + c, s] for c < count: concat writes each input into
// its slice of the output, split reads one slice, split's backward pads into zeros.
@compute @workgroup_size(256)
fn copy_channels(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    let idx = wg_linear(wid, nwg) * WG + lid;
    if (idx >= p.batch * p.count * p.hw) {
        return;
    }
    let e = element_of(idx, p.count);
    out[(e.n * p.dst_c + p.dst_off + e.c) * p.hw + e.s] =
        src[(e.n * p.src_c + p.src_off + e.c) * p.hw + e.s];
}

// out[n, c, s] = src[n, aux[c], s] (channel permutation; aux holds exact small integers).
@compute @workgroup_size(256)
fn gather_channels(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) lid: u32) {
    let idx = wg_linear(wid, nwg) * WG + lid;
    if (idx >= p.batch * p.dst_c * p.hw) {
        return;
    }
    let e = element_of(idx, p.dst_c);
    let src_ch = u32(aux[e.c]);
    out[idx] = src[(e.n * p.src_c + src_ch) * p.hw + e.s];
}

// out[n, c, s] = src[n, c, s] * aux[c] + aux2[c]
@compute @workgroup_size(256)
fn channel_affine(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_index) lid: u32) {
    let idx = wg_linear(wid, nwg) * WG + lid;
    if (idx >= p.batch * p.dst_c * p.hw) {
        return;
    }
    let c = (idx / p.hw) % p.dst_c;
    out[idx] = src[idx] * aux[c] + aux2[c];
}
