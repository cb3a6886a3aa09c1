// One AdamW step for one parameter tensor, in place on the parameter and both moments,
// following PyTorch's single-tensor AdamW operation by operation.

struct Params {
    n: u32,
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,
    // lr / (1 - beta1^t)
    step_size: f32,
    // sqrt(1 - beta2^t)
    bc2_sqrt: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> param: array<f32>;
@group(0) @binding(2) var<storage, read> grad: array<f32>;
@group(0) @binding(3) var<storage, read_write> m: array<f32>;
@group(0) @binding(4) var<storage, read_write> v: array<f32>;

@compute @workgroup_size(256)
fn adamw(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
         @builtin(local_invocation_index) lid: u32) {
    let i = wg_linear(wid, nwg) * 256u + lid;
    if (i >= p.n) {
        return;
    }
    let g = grad[i];
    // Decoupled weight decay first, then the Adam update.
    let decayed = param[i] * (1.0 - p.lr * p.weight_decay);
    // exp_avg.lerp_(grad, 1 - beta1)
    let m_new = m[i] + (1.0 - p.beta1) * (g - m[i]);
    let v_new = v[i] * p.beta2 + (1.0 - p.beta2) * g * g;
    let denom = sqrt(v_new) / p.bc2_sqrt + p.eps;
    m[i] = m_new;
    v[i] = v_new;
    param[i] = decayed - p.step_size * (m_new / denom);
}
