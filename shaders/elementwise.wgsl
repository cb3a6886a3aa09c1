// Elementwise ops: one unary and one binary entry, the operation picked by a uniform code
// (uniform branches cost nothing next to the memory traffic these kernels are bound by).

struct Params {
    n: u32,
    op: u32,
    a: f32,
    b: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
// Both entries share one layout; the unary entry binds x twice and ignores y.
@group(0) @binding(2) var<storage, read> y: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

// Unary op codes (Rust: elementwise::UNARY_CODES).
const UNARY_AFFINE: u32 = 0u;  // a * x + b
const UNARY_RELU: u32 = 1u;
const UNARY_RELU6: u32 = 2u;
const UNARY_SIGN: u32 = 3u;
const UNARY_CLAMP: u32 = 4u;   // to [a, b]
const UNARY_SQUARE: u32 = 5u;

fn unary_op(v: f32) -> f32 {
    switch p.op {
        case UNARY_AFFINE: { return p.a * v + p.b; }
        case UNARY_RELU: { return max(v, 0.0); }
        case UNARY_RELU6: { return clamp(v, 0.0, 6.0); }
        case UNARY_SIGN: { return sign(v); }
        case UNARY_CLAMP: { return clamp(v, p.a, p.b); }
        case UNARY_SQUARE: { return v * v; }
        default: { return v; }
    }
}

@compute @workgroup_size(256)
fn unary(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
         @builtin(local_invocation_index) lid: u32) {
    let i = wg_linear(wid, nwg) * 256u + lid;
    if (i < p.n) {
        out[i] = unary_op(x[i]);
    }
}

// Binary op codes (Rust: elementwise::BINARY_CODES). The backward ones take x = the forward
// input and y = the output gradient.
const BINARY_AXPBY: u32 = 0u;  // a * x + b * y
const BINARY_MUL: u32 = 1u;
const BINARY_RELU_BACK: u32 = 2u;
const BINARY_RELU6_BACK: u32 = 3u;
const BINARY_CLAMP_BACK: u32 = 4u;  // to [a, b]

fn binary_op(u: f32, v: f32) -> f32 {
    switch p.op {
        case BINARY_AXPBY: { return p.a * u + p.b * v; }
        case BINARY_MUL: { return u * v; }
        case BINARY_RELU_BACK: { return select(0.0, v, u > 0.0); }
        case BINARY_RELU6_BACK: { return select(0.0, v, u > 0.0 && u < 6.0); }
        case BINARY_CLAMP_BACK: { return select(0.0, v, u >= p.a && u <= p.b); }
        default: { return 0.0; }
    }
}

@compute @workgroup_size(256)
fn binary(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) lid: u32) {
    let i = wg_linear(wid, nwg) * 256u + lid;
    if (i < p.n) {
        out[i] = binary_op(x[i], y[i]);
    }
}
