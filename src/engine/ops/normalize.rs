//! L2 normalisation along a dimension and the cosine similarity matrix; forward and backward
//! on both devices. GPU: `shaders/normalize.wgsl` (+ the GEMM for the similarity matrix).

use crate::engine::error::{invalid, Result};
use crate::engine::tensor::Tensor;

/// x / max(||x||_2, eps) along `dim` (PyTorch's `F.normalize`).
pub fn l2_normalize(_x: &Tensor, _dim: usize, _eps: f32) -> Result<Tensor> {
    invalid("l2_normalize", "not implemented yet")
}

/// cos(a_i, b_j) for a [N, D], b [M, D] -> [N, M].
pub fn cosine_similarity(_a: &Tensor, _b: &Tensor) -> Result<Tensor> {
    invalid("cosine_similarity", "not implemented yet")
}
