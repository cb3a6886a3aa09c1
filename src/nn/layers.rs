//! Layers with PyTorch's semantics and key names: `Conv2d`, `BatchNorm2d`, `Linear`, and the
//! conv + BN + activation unit the backbones are built of. Each layer registers its tensors in a
//! [`ParamStore`] under `<prefix>.weight`, `<prefix>.bias`, ... and reads them back from it.

use crate::engine::error::Result;
use crate::engine::ops::batchnorm::{batch_norm_eval, batch_norm_train};
use crate::engine::ops::conv::{conv2d, Conv2dParams};
use crate::engine::ops::elementwise::{relu, relu6};
use crate::engine::ops::matmul::linear;
use crate::engine::{Device, Rng, Tensor};

use super::params::{ParamId, ParamKind, ParamStore};

/// How a forward pass treats BatchNorm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ForwardMode {
    /// Batch statistics; running statistics updated in place (momentum 0.1).
    Train,
    /// Running statistics (inference, evaluation, attacks on a trained model).
    Eval,
    /// Running statistics with trainable affine parameters: Proxy-Anchor's default while
    /// training (`bn_freeze`). Forward values equal `Eval`'s; the name says the intent.
    FrozenBn,
}

/// How a weight tensor is initialised when no weights are loaded.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// N(0, 2 / fan_out), fan_out = shape[0] * receptive field: torchvision's conv init and
    /// Proxy-Anchor's embedding init (`kaiming_normal_(mode='fan_out')`).
    KaimingNormalFanOut,
    /// PyTorch's default for Conv2d and Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (kaiming
    /// uniform with a = sqrt(5)); biases use the same bound.
    PytorchDefault,
    /// N(0, std).
    Normal(f32),
    Constant(f32),
}

fn fans(shape: &[usize]) -> (usize, usize) {
    let receptive: usize = shape.iter().skip(2).product();
    let fan_in = shape.get(1).copied().unwrap_or(1) * receptive;
    let fan_out = shape[0] * receptive;
    (fan_in.max(1), fan_out.max(1))
}

/// A tensor of `shape` drawn from `init` (host-side draws, so both devices get the same values).
pub fn init_tensor(shape: &[usize], init: Init, rng: &mut Rng, device: &Device) -> Result<Tensor> {
    let (fan_in, fan_out) = fans(shape);
    match init {
        Init::KaimingNormalFanOut => {
            Tensor::randn(shape, (2.0 / fan_out as f32).sqrt(), rng, device)
        }
        Init::PytorchDefault => {
            let bound = 1.0 / (fan_in as f32).sqrt();
            Tensor::rand_uniform(shape, -bound, bound, rng, device)
        }
        Init::Normal(std) => Tensor::randn(shape, std, rng, device),
        Init::Constant(v) => Tensor::full(v, shape, device),
    }
}

/// PyTorch's default bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) of the layer's weight.
fn default_bias(n: usize, fan_in: usize, rng: &mut Rng, device: &Device) -> Result<Tensor> {
    let bound = 1.0 / (fan_in.max(1) as f32).sqrt();
    Tensor::rand_uniform(&[n], -bound, bound, rng, device)
}

/// Shape description of a convolution.
#[derive(Clone, Copy, Debug)]
pub struct ConvSpec {
    pub c_in: usize,
    pub c_out: usize,
    pub kernel: (usize, usize),
    pub params: Conv2dParams,
    pub bias: bool,
}

impl ConvSpec {
    /// A square kernel with PyTorch's usual arguments.
    pub fn new(c_in: usize, c_out: usize, k: usize, stride: usize, padding: usize) -> ConvSpec {
        ConvSpec {
            c_in,
            c_out,
            kernel: (k, k),
            params: Conv2dParams {
                stride: (stride, stride),
                padding: (padding, padding),
                ..Conv2dParams::default()
            },
            bias: false,
        }
    }
    pub fn groups(mut self, g: usize) -> ConvSpec {
        self.params.groups = g;
        self
    }
    pub fn with_bias(mut self, bias: bool) -> ConvSpec {
        self.bias = bias;
        self
    }
}

pub struct Conv2d {
    pub weight: ParamId,
    pub bias: Option<ParamId>,
    pub spec: ConvSpec,
}

impl Conv2d {
    pub fn new(
        store: &mut ParamStore,
        prefix: &str,
        spec: ConvSpec,
        init: Init,
        rng: &mut Rng,
    ) -> Result<Conv2d> {
        let dev = store.device().clone();
        let shape = [
            spec.c_out,
            spec.c_in / spec.params.groups.max(1),
            spec.kernel.0,
            spec.kernel.1,
        ];
        let w = init_tensor(&shape, init, rng, &dev)?;
        let weight = store.add(&format!("{prefix}.weight"), w, ParamKind::Trainable)?;
        let bias = if spec.bias {
            let b = match init {
                Init::PytorchDefault => default_bias(spec.c_out, fans(&shape).0, rng, &dev)?,
                _ => Tensor::zeros(&[spec.c_out], &dev)?,
            };
            Some(store.add(&format!("{prefix}.bias"), b, ParamKind::Trainable)?)
        } else {
            None
        };
        Ok(Conv2d { weight, bias, spec })
    }

    pub fn forward(&self, store: &ParamStore, x: &Tensor) -> Result<Tensor> {
        let bias = self.bias.map(|b| store.get(b));
        conv2d(x, store.get(self.weight), bias, self.spec.params)
    }
}

/// PyTorch's BatchNorm2d defaults, which torchvision's MobileNetV2 and Cadene's BN-Inception
/// both use (`nn.BatchNorm2d(C, affine=True)`).
pub const BN_EPS: f32 = 1e-5;
pub const BN_MOMENTUM: f32 = 0.1;

pub struct BatchNorm2d {
    pub weight: ParamId,
    pub bias: ParamId,
    pub running_mean: ParamId,
    pub running_var: ParamId,
    pub eps: f32,
    pub momentum: f32,
}

impl BatchNorm2d {
    /// Weight 1, bias 0, running mean 0, running variance 1 (PyTorch's reset).
    pub fn new(store: &mut ParamStore, prefix: &str, channels: usize) -> Result<BatchNorm2d> {
        let dev = store.device().clone();
        let c = [channels];
        let mut add = |suffix: &str, v: f32, kind| {
            store.add(
                &format!("{prefix}.{suffix}"),
                Tensor::full(v, &c, &dev)?,
                kind,
            )
        };
        Ok(BatchNorm2d {
            weight: add("weight", 1.0, ParamKind::Trainable)?,
            bias: add("bias", 0.0, ParamKind::Trainable)?,
            running_mean: add("running_mean", 0.0, ParamKind::Buffer)?,
            running_var: add("running_var", 1.0, ParamKind::Buffer)?,
            eps: BN_EPS,
            momentum: BN_MOMENTUM,
        })
    }

    pub fn forward(&self, store: &ParamStore, x: &Tensor, mode: ForwardMode) -> Result<Tensor> {
        let (g, b) = (store.get(self.weight), store.get(self.bias));
        let (rm, rv) = (store.get(self.running_mean), store.get(self.running_var));
        match mode {
            ForwardMode::Train => batch_norm_train(x, g, b, rm, rv, self.momentum, self.eps),
            ForwardMode::Eval | ForwardMode::FrozenBn => batch_norm_eval(x, g, b, rm, rv, self.eps),
        }
    }
}

pub struct Linear {
    pub weight: ParamId,
    pub bias: Option<ParamId>,
    pub in_features: usize,
    pub out_features: usize,
}

impl Linear {
    /// Weight [out, in] from `init`; bias zero, or PyTorch's default bias under
    /// `Init::PytorchDefault`.
    pub fn new(
        store: &mut ParamStore,
        prefix: &str,
        in_features: usize,
        out_features: usize,
        init: Init,
        rng: &mut Rng,
    ) -> Result<Linear> {
        let dev = store.device().clone();
        let w = init_tensor(&[out_features, in_features], init, rng, &dev)?;
        let weight = store.add(&format!("{prefix}.weight"), w, ParamKind::Trainable)?;
        let b = match init {
            Init::PytorchDefault => default_bias(out_features, in_features, rng, &dev)?,
            _ => Tensor::zeros(&[out_features], &dev)?,
        };
        let bias = Some(store.add(&format!("{prefix}.bias"), b, ParamKind::Trainable)?);
        Ok(Linear {
            weight,
            bias,
            in_features,
            out_features,
        })
    }

    pub fn forward(&self, store: &ParamStore, x: &Tensor) -> Result<Tensor> {
        linear(x, store.get(self.weight), self.bias.map(|b| store.get(b)))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    None,
    Relu,
    Relu6,
}

impl Activation {
    pub fn apply(self, x: Tensor) -> Result<Tensor> {
        match self {
            Activation::None => Ok(x),
            Activation::Relu => relu(&x),
            Activation::Relu6 => relu6(&x),
        }
    }
}

/// Conv -> BatchNorm -> activation, the unit of both ImageNet backbones. The conv and BN keys
/// are given separately because the two backbones name them differently.
pub struct ConvBnAct {
    pub conv: Conv2d,
    pub bn: BatchNorm2d,
    pub act: Activation,
}

impl ConvBnAct {
    pub fn new(
        store: &mut ParamStore,
        conv_prefix: &str,
        bn_prefix: &str,
        spec: ConvSpec,
        act: Activation,
        init: Init,
        rng: &mut Rng,
    ) -> Result<ConvBnAct> {
        let conv = Conv2d::new(store, conv_prefix, spec, init, rng)?;
        let bn = BatchNorm2d::new(store, bn_prefix, spec.c_out)?;
        Ok(ConvBnAct { conv, bn, act })
    }

    pub fn forward(&self, store: &ParamStore, x: &Tensor, mode: ForwardMode) -> Result<Tensor> {
        let y = self.conv.forward(store, x)?;
        let y = self.bn.forward(store, &y, mode)?;
        self.act.apply(y)
    }
}
