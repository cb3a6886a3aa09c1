//! Convolutions: general conv2d (stride, padding, dilation, groups, bias) as implicit GEMM,
//! and dedicated depthwise kernels; forward and backward on both devices.
//! GPU: `shaders/conv2d.wgsl`, `shaders/depthwise.wgsl`.

use crate::engine::error::{invalid, Result};
use crate::engine::tensor::Tensor;

/// PyTorch's `nn.Conv2d` hyper-parameters. Weight layout: [C_out, C_in / groups, kh, kw].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2dParams {
    pub stride: (usize, usize),
    pub padding: (usize, usize),
    pub dilation: (usize, usize),
    pub groups: usize,
}

impl Default for Conv2dParams {
    fn default() -> Self {
        Conv2dParams { stride: (1, 1), padding: (0, 0), dilation: (1, 1), groups: 1 }
    }
}

/// y = conv2d(x, w) + bias, x [N, C_in, H, W] -> y [N, C_out, H_out, W_out]. Recorded.
pub fn conv2d(_x: &Tensor, _w: &Tensor, _bias: Option<&Tensor>, _p: Conv2dParams) -> Result<Tensor> {
    invalid("conv2d", "not implemented yet")
}
