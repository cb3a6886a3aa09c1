//! BN-Inception as in Cadene's `pretrainedmodels` (`pretrainedmodels/models/bninception.py`),
//! the backbone of Proxy-Anchor's code: the same key names (`conv1_7x7_s2.weight`,
//! `conv1_7x7_s2_bn.running_mean`, `inception_3a_1x1.weight`, ...) and pooling semantics
//! (max pools with `ceil_mode=True`; 3x3/s1/p1 average pools with `count_include_pad=True` in
//! the branches; a 3x3/s1/p1 MAX pool in `inception_5b`). Convs have biases; every BN is
//! `nn.BatchNorm2d(C, affine=True)` (eps 1e-5, momentum 0.1). The classifier is dropped.

use crate::engine::error::{shape_err, Result};
use crate::engine::ops::channels::concat_channels;
use crate::engine::ops::pool::{avg_pool2d, max_pool2d, Pool2dParams};
use crate::engine::{Rng, Tensor};

use super::layers::{Activation, ConvBnAct, ConvSpec, ForwardMode, Init};
use super::params::ParamStore;

/// Channels of the final feature map.
pub const OUT_CHANNELS: usize = 1024;

/// Input normalisation: RGB in [0, 1] -> BGR (`permute_channels [2, 1, 0]`), then
/// x * 255 - (104, 117, 128) per BGR channel.
pub const BGR_PERMUTATION: [usize; 3] = [2, 1, 0];
pub const BGR_MEAN: [f32; 3] = [104.0, 117.0, 128.0];

fn pool(k: usize, s: usize, p: usize) -> Pool2dParams {
    Pool2dParams {
        kernel: (k, k),
        stride: (s, s),
        padding: (p, p),
        ceil_mode: true,
        count_include_pad: true,
    }
}

/// The pooling branch of an inception module.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PoolBranch {
    /// 3x3/s1/p1 average pool, then a 1x1 projection (`_pool_proj`).
    AvgProj(usize),
    /// 3x3/s1/p1 max pool, then a 1x1 projection (`inception_5b`).
    MaxProj(usize),
    /// 3x3/s2 max pool passed through unchanged (the stride-2 modules 3c and 4e).
    MaxStride2,
}

/// One inception module's widths, as in Cadene's constructor.
struct ModuleSpec {
    name: &'static str,
    c_in: usize,
    /// `_1x1` branch width; 0 when absent (stride-2 modules).
    c1x1: usize,
    c3x3_reduce: usize,
    c3x3: usize,
    cd3x3_reduce: usize,
    cd3x3: usize,
    pool: PoolBranch,
}

#[rustfmt::skip]
const MODULES: [ModuleSpec; 10] = [
    ModuleSpec { name: "3a", c_in: 192, c1x1: 64, c3x3_reduce: 64, c3x3: 64, cd3x3_reduce: 64, cd3x3: 96, pool: PoolBranch::AvgProj(32) },
    ModuleSpec { name: "3b", c_in: 256, c1x1: 64, c3x3_reduce: 64, c3x3: 96, cd3x3_reduce: 64, cd3x3: 96, pool: PoolBranch::AvgProj(64) },
    ModuleSpec { name: "3c", c_in: 320, c1x1: 0, c3x3_reduce: 128, c3x3: 160, cd3x3_reduce: 64, cd3x3: 96, pool: PoolBranch::MaxStride2 },
    ModuleSpec { name: "4a", c_in: 576, c1x1: 224, c3x3_reduce: 64, c3x3: 96, cd3x3_reduce: 96, cd3x3: 128, pool: PoolBranch::AvgProj(128) },
    ModuleSpec { name: "4b", c_in: 576, c1x1: 192, c3x3_reduce: 96, c3x3: 128, cd3x3_reduce: 96, cd3x3: 128, pool: PoolBranch::AvgProj(128) },
    ModuleSpec { name: "4c", c_in: 576, c1x1: 160, c3x3_reduce: 128, c3x3: 160, cd3x3_reduce: 128, cd3x3: 160, pool: PoolBranch::AvgProj(128) },
    ModuleSpec { name: "4d", c_in: 608, c1x1: 96, c3x3_reduce: 128, c3x3: 192, cd3x3_reduce: 160, cd3x3: 192, pool: PoolBranch::AvgProj(128) },
    ModuleSpec { name: "4e", c_in: 608, c1x1: 0, c3x3_reduce: 128, c3x3: 192, cd3x3_reduce: 192, cd3x3: 256, pool: PoolBranch::MaxStride2 },
    ModuleSpec { name: "5a", c_in: 1056, c1x1: 352, c3x3_reduce: 192, c3x3: 320, cd3x3_reduce: 160, cd3x3: 224, pool: PoolBranch::AvgProj(128) },
    ModuleSpec { name: "5b", c_in: 1024, c1x1: 352, c3x3_reduce: 192, c3x3: 320, cd3x3_reduce: 192, cd3x3: 224, pool: PoolBranch::MaxProj(128) },
];

/// A Cadene unit: conv `<name>` (with bias), BN `<name>_bn`, ReLU.
fn unit(store: &mut ParamStore, name: &str, spec: ConvSpec, rng: &mut Rng) -> Result<ConvBnAct> {
    let spec = spec.with_bias(true);
    ConvBnAct::new(
        store,
        name,
        &format!("{name}_bn"),
        spec,
        Activation::Relu,
        Init::KaimingNormalFanOut,
        rng,
    )
}

struct InceptionModule {
    branch_1x1: Option<ConvBnAct>,
    branch_3x3: [ConvBnAct; 2],
    branch_double: [ConvBnAct; 3],
    pool: PoolBranch,
    pool_proj: Option<ConvBnAct>,
}

impl InceptionModule {
    fn new(store: &mut ParamStore, m: &ModuleSpec, rng: &mut Rng) -> Result<Self> {
        let p = format!("inception_{}", m.name);
        let s = if m.pool == PoolBranch::MaxStride2 {
            2
        } else {
            1
        };
        let branch_1x1 = if m.c1x1 > 0 {
            Some(unit(
                store,
                &format!("{p}_1x1"),
                ConvSpec::new(m.c_in, m.c1x1, 1, 1, 0),
                rng,
            )?)
        } else {
            None
        };
        let branch_3x3 = [
            unit(
                store,
                &format!("{p}_3x3_reduce"),
                ConvSpec::new(m.c_in, m.c3x3_reduce, 1, 1, 0),
                rng,
            )?,
            unit(
                store,
                &format!("{p}_3x3"),
                ConvSpec::new(m.c3x3_reduce, m.c3x3, 3, s, 1),
                rng,
            )?,
        ];
        let branch_double = [
            unit(
                store,
                &format!("{p}_double_3x3_reduce"),
                ConvSpec::new(m.c_in, m.cd3x3_reduce, 1, 1, 0),
                rng,
            )?,
            unit(
                store,
                &format!("{p}_double_3x3_1"),
                ConvSpec::new(m.cd3x3_reduce, m.cd3x3, 3, 1, 1),
                rng,
            )?,
            unit(
                store,
                &format!("{p}_double_3x3_2"),
                ConvSpec::new(m.cd3x3, m.cd3x3, 3, s, 1),
                rng,
            )?,
        ];
        let pool_proj = match m.pool {
            PoolBranch::AvgProj(c) | PoolBranch::MaxProj(c) => Some(unit(
                store,
                &format!("{p}_pool_proj"),
                ConvSpec::new(m.c_in, c, 1, 1, 0),
                rng,
            )?),
            PoolBranch::MaxStride2 => None,
        };
        Ok(InceptionModule {
            branch_1x1,
            branch_3x3,
            branch_double,
            pool: m.pool,
            pool_proj,
        })
    }

    fn forward(&self, store: &ParamStore, x: &Tensor, mode: ForwardMode) -> Result<Tensor> {
        let chain = |units: &[ConvBnAct]| -> Result<Tensor> {
            let mut y = x.clone();
            for u in units {
                y = u.forward(store, &y, mode)?;
            }
            Ok(y)
        };
        let mut outs = Vec::with_capacity(4);
        if let Some(b) = &self.branch_1x1 {
            outs.push(b.forward(store, x, mode)?);
        }
        outs.push(chain(&self.branch_3x3)?);
        outs.push(chain(&self.branch_double)?);
        let pooled = match self.pool {
            PoolBranch::AvgProj(_) => avg_pool2d(x, pool(3, 1, 1))?,
            PoolBranch::MaxProj(_) => max_pool2d(x, pool(3, 1, 1))?,
            PoolBranch::MaxStride2 => max_pool2d(x, pool(3, 2, 0))?,
        };
        outs.push(match &self.pool_proj {
            Some(proj) => proj.forward(store, &pooled, mode)?,
            None => pooled,
        });
        // A stride-2 module's conv branches (pad 1) and ceil-mode pool branch disagree in size
        // when the input side is odd: say which input sizes work instead of a concat error.
        let hw = |t: &Tensor| (t.shape()[2], t.shape()[3]);
        if outs.iter().any(|o| hw(o) != hw(&outs[0])) {
            let sizes: Vec<_> = outs.iter().map(hw).collect();
            return shape_err(
                "bn_inception",
                format!(
                    "branch outputs of a stride-2 module have different sizes {sizes:?} for an input of {:?}; \
                     BN-Inception needs the feature maps entering inception_3c and inception_4e to have even sides \
                     (e.g. inputs of 224, 96 or 64 pixels)",
                    hw(x)
                ),
            );
        }
        let refs: Vec<&Tensor> = outs.iter().collect();
        concat_channels(&refs)
    }
}

pub struct BnInception {
    stem: [ConvBnAct; 3],
    modules: Vec<InceptionModule>,
}

impl BnInception {
    pub fn new(store: &mut ParamStore, rng: &mut Rng) -> Result<BnInception> {
        let stem = [
            unit(store, "conv1_7x7_s2", ConvSpec::new(3, 64, 7, 2, 3), rng)?,
            unit(
                store,
                "conv2_3x3_reduce",
                ConvSpec::new(64, 64, 1, 1, 0),
                rng,
            )?,
            unit(store, "conv2_3x3", ConvSpec::new(64, 192, 3, 1, 1), rng)?,
        ];
        let modules = MODULES
            .iter()
            .map(|m| InceptionModule::new(store, m, rng))
            .collect::<Result<_>>()?;
        Ok(BnInception { stem, modules })
    }

    /// Normalised BGR input [N, 3, H, W] -> features [N, 1024, ~H/32, ~W/32].
    pub fn forward(&self, store: &ParamStore, x: &Tensor, mode: ForwardMode) -> Result<Tensor> {
        let y = self.stem[0].forward(store, x, mode)?;
        let y = max_pool2d(&y, pool(3, 2, 0))?; // pool1_3x3_s2
        let y = self.stem[1].forward(store, &y, mode)?;
        let y = self.stem[2].forward(store, &y, mode)?;
        let mut y = max_pool2d(&y, pool(3, 2, 0))?; // pool2_3x3_s2
        for m in &self.modules {
            y = m.forward(store, &y, mode)?;
        }
        Ok(y)
    }
}

/// Side length after the stem and the stride-2 modules, or `None` when a stride-2 module would
/// get an odd side (which Cadene's network cannot concatenate).
pub fn feature_side(input: usize) -> Option<usize> {
    let conv_s2 = |s: usize| (s + 2 - 3) / 2 + 1;
    let pool_s2 = |s: usize| (s.saturating_sub(3)).div_ceil(2) + 1;
    let s = (input + 6 - 7) / 2 + 1; // conv1_7x7_s2
    let s = pool_s2(pool_s2(s));
    let mut s = s;
    for _ in 0..2 {
        if s % 2 == 1 || s < 3 || conv_s2(s) != pool_s2(s) {
            return None;
        }
        s = conv_s2(s);
    }
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn feature_sides() {
        assert_eq!(feature_side(224), Some(7));
        assert_eq!(feature_side(96), Some(3));
        assert_eq!(feature_side(64), Some(2));
        assert_eq!(feature_side(80), None);
        assert_eq!(feature_side(48), None);
    }
}
