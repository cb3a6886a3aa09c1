// The parameter block of matmul.wgsl and matmul_vec4.wgsl (Rust: matmul::MatmulParams).
// Operand strides in values: A[b, m, k] = a[b * sa_b + m * sa_m + k * sa_k], likewise B;
// `accumulate` adds to `out` instead of overwriting it.

struct Params {
    m: u32, n: u32, k: u32, batch: u32,
    sa_b: u32, sa_m: u32, sa_k: u32,
    sb_b: u32, sb_k: u32, sb_n: u32,
    accumulate: u32,
}
