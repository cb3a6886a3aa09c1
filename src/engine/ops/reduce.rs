//! Reductions: sum and mean (whole tensor and along a dimension), log-sum-exp along a
//! dimension; forward and backward on both devices. GPU: `shaders/reduce.wgsl`.

use crate::engine::error::{invalid, Result};
use crate::engine::tensor::Tensor;

/// Sum of all elements, shape [1].
pub fn sum(_x: &Tensor) -> Result<Tensor> {
    invalid("sum", "not implemented yet")
}

/// Mean of all elements, shape [1].
pub fn mean(_x: &Tensor) -> Result<Tensor> {
    invalid("mean", "not implemented yet")
}

/// Sum along `dim` (removed from the shape).
pub fn sum_dim(_x: &Tensor, _dim: usize) -> Result<Tensor> {
    invalid("sum_dim", "not implemented yet")
}

/// Mean along `dim` (removed from the shape).
pub fn mean_dim(_x: &Tensor, _dim: usize) -> Result<Tensor> {
    invalid("mean_dim", "not implemented yet")
}

/// log(sum(exp(x))) along `dim` (removed from the shape), computed stably.
pub fn logsumexp_dim(_x: &Tensor, _dim: usize) -> Result<Tensor> {
    invalid("logsumexp_dim", "not implemented yet")
}
