//! torchvision's ResNet feature extractor (`torchvision.models.resnet18` / `resnet50`, `avgpool`
//! and `fc` dropped), with its key names (`conv1.weight`, `bn1.running_mean`,
//! `layer1.0.conv1.weight`, `layer2.0.downsample.0.weight`, `layer2.0.downsample.1.bias`, ...).
//! timm's ResNets use the same names. ResNet-50 is torchvision's "v1.5": the stride of a
//! bottleneck sits on its 3x3 conv.

use crate::engine::error::Result;
use crate::engine::ops::elementwise::{add, relu};
use crate::engine::ops::pool::{max_pool2d, Pool2dParams};
use crate::engine::{Rng, Tensor};

use super::layers::{Activation, ConvBnAct, ConvSpec, ForwardMode, Init};
use super::params::ParamStore;

/// The two residual block types of torchvision's ResNets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Block {
    /// Two 3x3 convs (ResNet-18/34); expansion 1.
    Basic,
    /// 1x1 reduce, 3x3 (strided), 1x1 expand (ResNet-50/101/152); expansion 4.
    Bottleneck,
}

impl Block {
    /// Output channels of a block over its `planes`.
    pub fn expansion(self) -> usize {
        match self {
            Block::Basic => 1,
            Block::Bottleneck => 4,
        }
    }
}

/// Block type and blocks per stage (`layer1` .. `layer4`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResNetSpec {
    pub block: Block,
    pub layers: [usize; 4],
}

pub const RESNET18: ResNetSpec = ResNetSpec {
    block: Block::Basic,
    layers: [2, 2, 2, 2],
};
pub const RESNET50: ResNetSpec = ResNetSpec {
    block: Block::Bottleneck,
    layers: [3, 4, 6, 3],
};

/// `planes` of the four stages; the first keeps the resolution, the others halve it.
const STAGE_PLANES: [usize; 4] = [64, 128, 256, 512];
const STEM_CHANNELS: usize = 64;

impl ResNetSpec {
    /// Channels of the final feature map (512 for ResNet-18, 2048 for ResNet-50).
    pub fn out_channels(&self) -> usize {
        STAGE_PLANES[3] * self.block.expansion()
    }
}

/// One residual block: its conv + BN (+ ReLU) units in order (the last without ReLU), the
/// optional projection shortcut, and the ReLU after the sum.
struct ResidualBlock {
    units: Vec<ConvBnAct>,
    downsample: Option<ConvBnAct>,
}

impl ResidualBlock {
    fn new(
        store: &mut ParamStore,
        prefix: &str,
        block: Block,
        c_in: usize,
        planes: usize,
        stride: usize,
        rng: &mut Rng,
    ) -> Result<ResidualBlock> {
        let c_out = planes * block.expansion();
        // (name, spec, activation) of each unit; torchvision names the BN after its conv index.
        let plan: Vec<(usize, ConvSpec, Activation)> = match block {
            Block::Basic => vec![
                (
                    1,
                    ConvSpec::new(c_in, planes, 3, stride, 1),
                    Activation::Relu,
                ),
                (2, ConvSpec::new(planes, planes, 3, 1, 1), Activation::None),
            ],
            Block::Bottleneck => vec![
                (1, ConvSpec::new(c_in, planes, 1, 1, 0), Activation::Relu),
                (
                    2,
                    ConvSpec::new(planes, planes, 3, stride, 1),
                    Activation::Relu,
                ),
                (3, ConvSpec::new(planes, c_out, 1, 1, 0), Activation::None),
            ],
        };
        let init = Init::KaimingNormalFanOut;
        let units = plan
            .into_iter()
            .map(|(i, spec, act)| {
                let (conv, bn) = (format!("{prefix}.conv{i}"), format!("{prefix}.bn{i}"));
                ConvBnAct::new(store, &conv, &bn, spec, act, init, rng)
            })
            .collect::<Result<Vec<_>>>()?;
        // A 1x1 strided projection whenever the shortcut's shape changes.
        let downsample = if stride != 1 || c_in != c_out {
            let (conv, bn) = (
                format!("{prefix}.downsample.0"),
                format!("{prefix}.downsample.1"),
            );
            let spec = ConvSpec::new(c_in, c_out, 1, stride, 0);
            Some(ConvBnAct::new(
                store,
                &conv,
                &bn,
                spec,
                Activation::None,
                init,
                rng,
            )?)
        } else {
            None
        };
        Ok(ResidualBlock { units, downsample })
    }

    fn forward(&self, store: &ParamStore, x: &Tensor, mode: ForwardMode) -> Result<Tensor> {
        let mut y = x.clone();
        for unit in &self.units {
            y = unit.forward(store, &y, mode)?;
        }
        let shortcut = match &self.downsample {
            Some(d) => d.forward(store, x, mode)?,
            None => x.clone(),
        };
        relu(&add(&y, &shortcut)?)
    }
}

pub struct ResNet {
    stem: ConvBnAct,
    blocks: Vec<ResidualBlock>,
    pub spec: ResNetSpec,
}

/// torchvision's stem pool: 3x3, stride 2, padding 1 (padding never wins a max).
fn stem_pool() -> Pool2dParams {
    Pool2dParams::square(3, 2, 1)
}

impl ResNet {
    /// torchvision's initialisation: kaiming-normal fan-out convs, BN weight 1 and bias 0.
    pub fn new(store: &mut ParamStore, spec: ResNetSpec, rng: &mut Rng) -> Result<ResNet> {
        let stem = ConvBnAct::new(
            store,
            "conv1",
            "bn1",
            ConvSpec::new(3, STEM_CHANNELS, 7, 2, 3),
            Activation::Relu,
            Init::KaimingNormalFanOut,
            rng,
        )?;
        let mut blocks = Vec::new();
        let mut c_in = STEM_CHANNELS;
        for (stage, (&planes, &count)) in STAGE_PLANES.iter().zip(&spec.layers).enumerate() {
            let first_stride = if stage == 0 { 1 } else { 2 };
            for i in 0..count {
                let prefix = format!("layer{}.{i}", stage + 1);
                let stride = if i == 0 { first_stride } else { 1 };
                blocks.push(ResidualBlock::new(
                    store, &prefix, spec.block, c_in, planes, stride, rng,
                )?);
                c_in = planes * spec.block.expansion();
            }
        }
        Ok(ResNet { stem, blocks, spec })
    }

    /// Normalised input [N, 3, H, W] -> feature map [N, out_channels, ~H/32, ~W/32].
    pub fn forward(&self, store: &ParamStore, x: &Tensor, mode: ForwardMode) -> Result<Tensor> {
        let y = self.stem.forward(store, x, mode)?;
        let mut y = max_pool2d(&y, stem_pool())?;
        for b in &self.blocks {
            y = b.forward(store, &y, mode)?;
        }
        Ok(y)
    }
}
