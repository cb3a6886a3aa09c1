//! AdamW (decoupled weight decay, per-parameter-group learning rate) as one WGSL kernel per
//! parameter tensor, with a CPU twin. GPU: `shaders/adamw.wgsl`.

use crate::engine::error::{invalid, Result};
use crate::engine::tensor::Tensor;

/// Hyper-parameters of one AdamW step for one parameter tensor.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWStep {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// 1-based step count, for bias correction.
    pub step: u32,
}

/// Updates `param`, and the moments `m`, `v`, in place from `grad` (PyTorch's AdamW:
/// p -= lr * wd * p; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
/// p -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)).
pub fn adamw_step(_param: &Tensor, _grad: &Tensor, _m: &Tensor, _v: &Tensor, _h: AdamWStep) -> Result<()> {
    invalid("adamw_step", "not implemented yet")
}
