// One PGD step, fused: ascend along the sign of the gradient, project onto the L-infinity
// ball around the clean input, clip to the image range [0, 1].

struct Params {
    n: u32,
    alpha: f32,
    eps: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x_adv: array<f32>;
@group(0) @binding(2) var<storage, read> grad: array<f32>;
@group(0) @binding(3) var<storage, read> x_orig: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(256)
fn pgd_step(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lid: u32) {
    let i = wg_linear(wid, nwg) * 256u + lid;
    if (i >= p.n) {
        return;
    }
    // WGSL's sign(0) is 0: a zero gradient leaves the pixel where it is.
    let stepped = x_adv[i] + p.alpha * sign(grad[i]);
    let x0 = x_orig[i];
    out[i] = clamp(clamp(stepped, x0 - p.eps, x0 + p.eps), 0.0, 1.0);
}
