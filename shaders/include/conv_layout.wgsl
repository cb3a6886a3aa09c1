// The parameter block and bindings of conv2d.wgsl and depthwise.wgsl (Rust: conv::ConvParams,
// built by one host function; every kernel of both files takes inputs a, b, c and writes out).
// Fields gm/gn/gk/exact_div/inv_* are kept for layout stability (gn = element count for
// sum_splits, gk = reduction length for the weight gradient).

struct Params {
    n: u32, cin: u32, h: u32, w: u32,
    cout: u32, kh: u32, kw: u32, oh: u32,
    ow: u32, sh: u32, sw: u32, ph: u32,
    pw: u32, dh: u32, dw: u32, groups: u32,
    cin_g: u32, cout_g: u32, gm: u32, gn: u32,
    gk: u32, tiles_m: u32, tiles_n: u32, splits: u32,
    k_chunk: u32, has_bias: u32, exact_div: u32, total_groups: u32,
    inv_kw: f32, inv_khkw: f32, inv_ow: f32, inv_ohw: f32,
    inv_w: f32, inv_hw: f32, inv_sh: f32, inv_sw: f32,
    inv_mult: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read> c: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;
