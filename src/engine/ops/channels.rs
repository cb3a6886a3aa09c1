//! Channel ops on NCHW tensors: concat and split along channels, channel permutation (RGB to
//! BGR), per-channel affine (input normalisation); forward and backward on both devices.
//! GPU: `shaders/channels.wgsl`.

use crate::engine::error::{invalid, Result};
use crate::engine::tensor::Tensor;

/// Concatenates NCHW tensors along C.
pub fn concat_channels(_xs: &[&Tensor]) -> Result<Tensor> {
    invalid("concat_channels", "not implemented yet")
}

/// Splits along C into pieces of the given channel counts (summing to C).
pub fn split_channels(_x: &Tensor, _sizes: &[usize]) -> Result<Vec<Tensor>> {
    invalid("split_channels", "not implemented yet")
}

/// out[:, i] = x[:, perm[i]] (e.g. [2, 1, 0] turns RGB into BGR).
pub fn permute_channels(_x: &Tensor, _perm: &[usize]) -> Result<Tensor> {
    invalid("permute_channels", "not implemented yet")
}

/// out[:, c] = x[:, c] * scale[c] + shift[c], constants per channel (input normalisation).
pub fn channel_affine(_x: &Tensor, _scale: &[f32], _shift: &[f32]) -> Result<Tensor> {
    invalid("channel_affine", "not implemented yet")
}
