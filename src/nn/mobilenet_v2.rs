//! torchvision's MobileNetV2 feature extractor (`torchvision.models.mobilenet_v2`, classifier
//! dropped), with its key names (`features.0.0.weight`, `features.1.conv.0.0.weight`, ...,
//! `features.18.1.running_var`) and width multiplier.

use crate::engine::error::Result;
use crate::engine::ops::elementwise::add;
use crate::engine::{Rng, Tensor};

use super::layers::{Activation, ConvBnAct, ConvSpec, ForwardMode, Init};
use super::params::ParamStore;

/// (expansion t, channels c, repeats n, first stride s), torchvision's
/// `inverted_residual_setting`.
pub const INVERTED_RESIDUAL_SETTING: [(usize, usize, usize, usize); 7] = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
];

/// torchvision's `_make_divisible(v, divisor)`: round to the nearest multiple of `divisor`, at
/// least `divisor`, and never more than 10% below `v`.
pub fn make_divisible(v: f64, divisor: usize) -> usize {
    let d = divisor as f64;
    let mut new_v = (((v + d / 2.0) as usize) / divisor * divisor).max(divisor);
    if (new_v as f64) < 0.9 * v {
        new_v += divisor;
    }
    new_v
}

/// Channel counts of the stem and the head for a width multiplier.
pub fn stem_and_head_channels(width: f64) -> (usize, usize) {
    (
        make_divisible(32.0 * width, 8),
        make_divisible(1280.0 * width.max(1.0), 8),
    )
}

struct InvertedResidual {
    layers: Vec<ConvBnAct>,
    use_residual: bool,
}

impl InvertedResidual {
    fn new(
        store: &mut ParamStore,
        index: usize,
        inp: usize,
        oup: usize,
        stride: usize,
        t: usize,
        rng: &mut Rng,
    ) -> Result<Self> {
        let hidden = inp * t;
        let p = format!("features.{index}.conv");
        let init = Init::KaimingNormalFanOut;
        let mut layers = Vec::new();
        // Sub-module indices inside `conv`: the expand and depthwise units are nested
        // Conv2dNormActivation blocks (`.k.0` conv, `.k.1` BN); the projection is a bare conv
        // and BN at `.k` and `.k+1`.
        let mut k = 0;
        if t != 1 {
            let spec = ConvSpec::new(inp, hidden, 1, 1, 0);
            layers.push(ConvBnAct::new(
                store,
                &format!("{p}.{k}.0"),
                &format!("{p}.{k}.1"),
                spec,
                Activation::Relu6,
                init,
                rng,
            )?);
            k += 1;
        }
        let dw = ConvSpec::new(hidden, hidden, 3, stride, 1).groups(hidden);
        layers.push(ConvBnAct::new(
            store,
            &format!("{p}.{k}.0"),
            &format!("{p}.{k}.1"),
            dw,
            Activation::Relu6,
            init,
            rng,
        )?);
        k += 1;
        let pw = ConvSpec::new(hidden, oup, 1, 1, 0);
        layers.push(ConvBnAct::new(
            store,
            &format!("{p}.{k}"),
            &format!("{p}.{}", k + 1),
            pw,
            Activation::None,
            init,
            rng,
        )?);
        Ok(InvertedResidual {
            layers,
            use_residual: stride == 1 && inp == oup,
        })
    }

    fn forward(&self, store: &ParamStore, x: &Tensor, mode: ForwardMode) -> Result<Tensor> {
        let mut y = x.clone();
        for l in &self.layers {
            y = l.forward(store, &y, mode)?;
        }
        if self.use_residual {
            add(x, &y)
        } else {
            Ok(y)
        }
    }
}

pub struct MobileNetV2 {
    stem: ConvBnAct,
    blocks: Vec<InvertedResidual>,
    head: ConvBnAct,
    pub width: f64,
    /// Channels of the final feature map (1280 for width <= 1).
    pub out_channels: usize,
}

impl MobileNetV2 {
    pub fn new(store: &mut ParamStore, width: f64, rng: &mut Rng) -> Result<MobileNetV2> {
        let init = Init::KaimingNormalFanOut;
        let (mut c_in, last) = stem_and_head_channels(width);
        let stem = ConvBnAct::new(
            store,
            "features.0.0",
            "features.0.1",
            ConvSpec::new(3, c_in, 3, 2, 1),
            Activation::Relu6,
            init,
            rng,
        )?;
        let mut blocks = Vec::new();
        let mut index = 1;
        for &(t, c, n, s) in &INVERTED_RESIDUAL_SETTING {
            let c_out = make_divisible(c as f64 * width, 8);
            for i in 0..n {
                let stride = if i == 0 { s } else { 1 };
                blocks.push(InvertedResidual::new(
                    store, index, c_in, c_out, stride, t, rng,
                )?);
                c_in = c_out;
                index += 1;
            }
        }
        let head_prefix = format!("features.{index}");
        let head = ConvBnAct::new(
            store,
            &format!("{head_prefix}.0"),
            &format!("{head_prefix}.1"),
            ConvSpec::new(c_in, last, 1, 1, 0),
            Activation::Relu6,
            init,
            rng,
        )?;
        Ok(MobileNetV2 {
            stem,
            blocks,
            head,
            width,
            out_channels: last,
        })
    }

    /// Normalised input [N, 3, H, W] -> feature map [N, out_channels, H/32, W/32].
    pub fn forward(&self, store: &ParamStore, x: &Tensor, mode: ForwardMode) -> Result<Tensor> {
        let mut y = self.stem.forward(store, x, mode)?;
        for b in &self.blocks {
            y = b.forward(store, &y, mode)?;
        }
        self.head.forward(store, &y, mode)
    }
}

/// ImageNet mean and std on RGB in [0, 1], as `channel_affine` scale and shift:
/// (x - mean) / std = x / std - mean / std.
pub fn imagenet_affine() -> ([f32; 3], [f32; 3]) {
    let mean = [0.485f32, 0.456, 0.406];
    let std = [0.229f32, 0.224, 0.225];
    let scale = [1.0 / std[0], 1.0 / std[1], 1.0 / std[2]];
    let shift = [-mean[0] / std[0], -mean[1] / std[1], -mean[2] / std[2]];
    (scale, shift)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn make_divisible_matches_torchvision() {
        assert_eq!(make_divisible(32.0, 8), 32);
        assert_eq!(make_divisible(16.0, 8), 16);
        assert_eq!(make_divisible(32.0 * 0.5, 8), 16);
        assert_eq!(make_divisible(16.0 * 0.5, 8), 8);
        assert_eq!(make_divisible(24.0 * 0.5, 8), 16); // 12 -> 16
        assert_eq!(make_divisible(96.0 * 0.75, 8), 72);
        assert_eq!(make_divisible(160.0 * 0.35, 8), 56);
        assert_eq!(make_divisible(24.0 * 0.35, 8), 8);
        assert_eq!(stem_and_head_channels(1.4), (48, 1792));
    }
}
