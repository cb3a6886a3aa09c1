//! Pooling with PyTorch semantics: max and average pool 2d (`ceil_mode`, `count_include_pad`),
//! global average and global max pool; forward and backward on both devices.
//! GPU: `shaders/pool.wgsl`.

use crate::engine::error::{invalid, Result};
use crate::engine::tensor::Tensor;

/// PyTorch's `MaxPool2d` / `AvgPool2d` hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pool2dParams {
    pub kernel: (usize, usize),
    pub stride: (usize, usize),
    pub padding: (usize, usize),
    pub ceil_mode: bool,
    /// Average pool only: divide by the full window including padding (PyTorch's default).
    pub count_include_pad: bool,
}

pub fn max_pool2d(_x: &Tensor, _p: Pool2dParams) -> Result<Tensor> {
    invalid("max_pool2d", "not implemented yet")
}

pub fn avg_pool2d(_x: &Tensor, _p: Pool2dParams) -> Result<Tensor> {
    invalid("avg_pool2d", "not implemented yet")
}

/// [N, C, H, W] -> [N, C], mean over H and W.
pub fn global_avg_pool(_x: &Tensor) -> Result<Tensor> {
    invalid("global_avg_pool", "not implemented yet")
}

/// [N, C, H, W] -> [N, C], max over H and W.
pub fn global_max_pool(_x: &Tensor) -> Result<Tensor> {
    invalid("global_max_pool", "not implemented yet")
}
