//! `c2f2`, the small CNN for 28x28 / 32x32 inputs (Fashion-MNIST, CIFAR-like data): two 5x5
//! conv + ReLU + 2x2 max-pool stages and a 1024-wide fully connected layer with ReLU. Keys
//! `c2f2.conv1.*`, `c2f2.conv2.*`, `c2f2.fc.*`; PyTorch's default init. Takes 3 channels
//! (grayscale images are replicated upstream) in [0, 1], without normalisation.

use crate::engine::error::{shape_err, Result};
use crate::engine::ops::elementwise::relu;
use crate::engine::ops::pool::{max_pool2d, Pool2dParams};
use crate::engine::{Rng, Tensor};

use super::layers::{Conv2d, ConvSpec, Init, Linear};
use super::params::ParamStore;

pub const FEATURES: usize = 1024;

pub struct C2f2 {
    conv1: Conv2d,
    conv2: Conv2d,
    fc: Linear,
    pub input_size: (usize, usize),
}

fn pool2() -> Pool2dParams {
    Pool2dParams {
        kernel: (2, 2),
        stride: (2, 2),
        padding: (0, 0),
        ceil_mode: false,
        count_include_pad: true,
    }
}

impl C2f2 {
    /// `input_size` (H, W) fixes the width of the flattened features: 64 * (H/4) * (W/4).
    pub fn new(store: &mut ParamStore, input_size: (usize, usize), rng: &mut Rng) -> Result<C2f2> {
        let (h, w) = input_size;
        if h < 4 || w < 4 {
            return shape_err("c2f2", format!("input size {h}x{w} is below 4x4"));
        }
        let init = Init::PytorchDefault;
        let conv1 = Conv2d::new(
            store,
            "c2f2.conv1",
            ConvSpec::new(3, 32, 5, 1, 2).with_bias(true),
            init,
            rng,
        )?;
        let conv2 = Conv2d::new(
            store,
            "c2f2.conv2",
            ConvSpec::new(32, 64, 5, 1, 2).with_bias(true),
            init,
            rng,
        )?;
        let flat = 64 * (h / 4) * (w / 4);
        let fc = Linear::new(store, "c2f2.fc", flat, FEATURES, init, rng)?;
        Ok(C2f2 {
            conv1,
            conv2,
            fc,
            input_size,
        })
    }

    /// [N, 3, H, W] -> [N, 1024] (after the ReLU).
    pub fn forward(&self, store: &ParamStore, x: &Tensor) -> Result<Tensor> {
        let (n, _, h, w) = x.dims4("c2f2")?;
        if (h, w) != self.input_size {
            return shape_err(
                "c2f2",
                format!("built for {:?} inputs, got {h}x{w}", self.input_size),
            );
        }
        // Pool, then ReLU: ReLU is monotone, so max(relu(a), relu(b)) = relu(max(a, b)) and the
        // gradient reaches the same input (none where the window's maximum is <= 0). Both values
        // and gradients equal PyTorch's conv-ReLU-pool for finite inputs, with the ReLU on a
        // quarter of the elements (tests/models.rs checks the two orders bit for bit).
        let y = relu(&max_pool2d(&self.conv1.forward(store, x)?, pool2())?)?;
        let y = relu(&max_pool2d(&self.conv2.forward(store, &y)?, pool2())?)?;
        let flat = y.reshape(&[n, y.numel() / n])?;
        relu(&self.fc.forward(store, &flat)?)
    }
}
