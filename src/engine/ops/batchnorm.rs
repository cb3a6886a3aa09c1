//! Batch norm 2d: training mode (batch statistics, running statistics updated in place by
//! momentum, PyTorch's unbiased running variance) and eval mode; forward and backward on both
//! devices. GPU: `shaders/batchnorm.wgsl` (per-channel workgroup reductions + one elementwise pass).

use crate::engine::error::{invalid, Result};
use crate::engine::tensor::Tensor;

/// Training-mode batch norm over x [N, C, H, W] with affine gamma, beta [C]. Updates
/// running_mean and running_var [C] in place: r = (1 - momentum) * r + momentum * batch_stat.
/// Recorded (gradients for x, gamma, beta).
pub fn batch_norm_train(
    _x: &Tensor,
    _gamma: &Tensor,
    _beta: &Tensor,
    _running_mean: &Tensor,
    _running_var: &Tensor,
    _momentum: f32,
    _eps: f32,
) -> Result<Tensor> {
    invalid("batch_norm_train", "not implemented yet")
}

/// Eval-mode batch norm with the running statistics. Recorded (gradients for x, gamma, beta).
pub fn batch_norm_eval(
    _x: &Tensor,
    _gamma: &Tensor,
    _beta: &Tensor,
    _running_mean: &Tensor,
    _running_var: &Tensor,
    _eps: f32,
) -> Result<Tensor> {
    invalid("batch_norm_eval", "not implemented yet")
}
