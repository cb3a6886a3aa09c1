//! The embedding network: input normalisation (the model's first op, so that attacks work in
//! [0, 1] RGB pixel space for every backbone), a backbone, and the embedding head
//! `L2(Linear(GAP(f) + GMP(f)))` with keys `embedding.weight`, `embedding.bias`.

use std::path::Path;
use std::sync::Arc;

use crate::engine::error::{shape_err, Result};
use crate::engine::ops::channels::{channel_affine, permute_channels};
use crate::engine::ops::elementwise::add;
use crate::engine::ops::normalize::l2_normalize;
use crate::engine::ops::pool::{global_avg_pool, global_max_pool};
use crate::engine::{Device, Rng, Tensor};

use super::bn_inception::{self, BnInception};
use super::c2f2::{self, C2f2};
use super::checkpoint::Checkpoint;
use super::error::NnResult;
use super::layers::{ForwardMode, Init, Linear};
use super::mobilenet_v2::{self, MobileNetV2};
use super::params::ParamStore;
use super::resnet::{self, ResNet, ResNetSpec};
use super::weights::{self, LoadMode, LoadReport};

/// Prefix of the embedding head's keys.
pub const HEAD_PREFIX: &str = "embedding.";
/// `F.normalize`'s default eps.
pub const L2_EPS: f32 = 1e-12;
pub const DEFAULT_EMBEDDING_DIM: usize = 512;
/// Group name of a single network in a checkpoint written by [`EmbeddingNet::save`].
pub const SINGLE_MODEL_PREFIX: &str = "model";

#[derive(Clone, Debug, PartialEq)]
pub enum Backbone {
    /// torchvision's MobileNetV2 with a width multiplier (1.0 is the standard network).
    MobileNetV2 { width: f64 },
    /// Cadene's BN-Inception.
    BnInception,
    /// The small CNN for 28x28 / 32x32 inputs; the input size fixes its flattened width.
    C2f2 { input_size: (usize, usize) },
    /// torchvision's ResNet-18 (basic blocks, 512 features).
    ResNet18,
    /// torchvision's ResNet-50 (bottleneck blocks, 2048 features).
    ResNet50,
}

impl Backbone {
    pub fn name(&self) -> String {
        match self {
            Backbone::MobileNetV2 { width } => format!("MobileNetV2 (width {width})"),
            Backbone::BnInception => "BN-Inception".to_string(),
            Backbone::C2f2 { input_size } => format!("c2f2 ({}x{})", input_size.0, input_size.1),
            Backbone::ResNet18 => "ResNet-18".to_string(),
            Backbone::ResNet50 => "ResNet-50".to_string(),
        }
    }
}

enum Body {
    MobileNetV2(MobileNetV2),
    BnInception(BnInception),
    C2f2(C2f2),
    ResNet(ResNet),
}

/// A ResNet body and the width of its features.
fn resnet_body(params: &mut ParamStore, spec: ResNetSpec, rng: &mut Rng) -> Result<(Body, usize)> {
    let net = ResNet::new(params, spec, rng)?;
    Ok((Body::ResNet(net), spec.out_channels()))
}

pub struct EmbeddingNet {
    pub backbone: Backbone,
    pub embedding_dim: usize,
    /// Width of the features entering the head.
    pub feature_dim: usize,
    params: ParamStore,
    /// Layers hold only parameter ids, so copies of the network on other devices share them.
    body: Arc<Body>,
    head: Arc<Linear>,
}

impl EmbeddingNet {
    /// A randomly initialised network (PyTorch-like init: kaiming-normal fan-out convs,
    /// BN weight 1 / bias 0, embedding kaiming-normal fan-out with zero bias as in
    /// Proxy-Anchor's code; c2f2 uses PyTorch's default init).
    pub fn new(
        backbone: Backbone,
        embedding_dim: usize,
        device: &Device,
        rng: &mut Rng,
    ) -> Result<EmbeddingNet> {
        let mut params = ParamStore::new(device);
        let (body, feature_dim) = match &backbone {
            Backbone::MobileNetV2 { width } => {
                let m = MobileNetV2::new(&mut params, *width, rng)?;
                let c = m.out_channels;
                (Body::MobileNetV2(m), c)
            }
            Backbone::BnInception => (
                Body::BnInception(BnInception::new(&mut params, rng)?),
                bn_inception::OUT_CHANNELS,
            ),
            Backbone::C2f2 { input_size } => (
                Body::C2f2(C2f2::new(&mut params, *input_size, rng)?),
                c2f2::FEATURES,
            ),
            Backbone::ResNet18 => resnet_body(&mut params, resnet::RESNET18, rng)?,
            Backbone::ResNet50 => resnet_body(&mut params, resnet::RESNET50, rng)?,
        };
        let head = Linear::new(
            &mut params,
            "embedding",
            feature_dim,
            embedding_dim,
            Init::KaimingNormalFanOut,
            rng,
        )?;
        Ok(EmbeddingNet {
            backbone,
            embedding_dim,
            feature_dim,
            params,
            body: Arc::new(body),
            head: Arc::new(head),
        })
    }

    pub fn device(&self) -> &Device {
        self.params.device()
    }

    /// Pixel space (RGB in [0, 1]) to what the backbone was trained on.
    pub fn normalize_input(&self, x: &Tensor) -> Result<Tensor> {
        match &*self.body {
            // torchvision's ImageNet models share one normalisation.
            Body::MobileNetV2(_) | Body::ResNet(_) => {
                let (scale, shift) = mobilenet_v2::imagenet_affine();
                channel_affine(x, &scale, &shift)
            }
            Body::BnInception(_) => {
                let bgr = permute_channels(x, &bn_inception::BGR_PERMUTATION)?;
                let shift = bn_inception::BGR_MEAN.map(|m| -m);
                channel_affine(&bgr, &[255.0; 3], &shift)
            }
            Body::C2f2(_) => Ok(x.clone()),
        }
    }

    /// Pooled features [N, feature_dim] entering the head (GAP + GMP summed for the ImageNet
    /// backbones; the fc output for c2f2).
    pub fn features(&self, x: &Tensor, mode: ForwardMode) -> Result<Tensor> {
        let (_, c, _, _) = x.dims4("EmbeddingNet::forward")?;
        if c != 3 {
            return shape_err(
                "EmbeddingNet::forward",
                format!("expected 3-channel RGB input, got {c} channels (replicate grayscale to 3 channels)"),
            );
        }
        let x = self.normalize_input(x)?;
        let p = &self.params;
        let fmap = match &*self.body {
            Body::MobileNetV2(m) => m.forward(p, &x, mode)?,
            Body::BnInception(b) => b.forward(p, &x, mode)?,
            Body::C2f2(c) => return c.forward(p, &x),
            Body::ResNet(r) => r.forward(p, &x, mode)?,
        };
        add(&global_avg_pool(&fmap)?, &global_max_pool(&fmap)?)
    }

    /// Embeddings [N, D], L2-normalised, for RGB input [N, 3, H, W] in [0, 1].
    pub fn forward(&self, x: &Tensor, mode: ForwardMode) -> Result<Tensor> {
        let f = self.features(x, mode)?;
        let e = self.head.forward(&self.params, &f)?;
        l2_normalize(&e, 1, L2_EPS)
    }

    /// The trainable parameters currently taking gradients, as (PyTorch key, tracked leaf).
    pub fn parameters(&self) -> Vec<(String, Tensor)> {
        self.params.trainable()
    }

    /// Trainable parameters of the embedding head (`embedding.*`); the lead gives them their own
    /// learning rate / warm-up treatment.
    pub fn is_head_param(name: &str) -> bool {
        name.starts_with(HEAD_PREFIX)
    }

    pub fn params(&self) -> &ParamStore {
        &self.params
    }

    pub fn params_mut(&mut self) -> &mut ParamStore {
        &mut self.params
    }

    /// Excludes (or re-includes) the backbone's parameters from gradients, e.g. for the warm-up
    /// epoch that trains only the head and the proxies.
    pub fn freeze_backbone(&mut self, frozen: bool) {
        self.params.set_frozen(|n| !Self::is_head_param(n), frozen);
    }

    /// The same network on `device` (values copied; on the same device the storage is shared:
    /// use [`EmbeddingNet::deep_clone`] for an independent copy).
    pub fn to_device(&self, device: &Device) -> Result<EmbeddingNet> {
        Ok(self.with_params(self.params.to_device(device)?))
    }

    /// The network on `device` with every parameter frozen (attacks need only d/dx). On the same
    /// device it shares storage, so it always sees the latest weights.
    pub fn frozen_view(&self, device: &Device) -> Result<EmbeddingNet> {
        let mut v = self.to_device(device)?;
        v.params_mut().set_frozen(|_| true, true);
        Ok(v)
    }

    /// An independent copy (own storage) on the same device.
    pub fn deep_clone(&self) -> Result<EmbeddingNet> {
        Ok(self.with_params(self.params.deep_clone()?))
    }

    fn with_params(&self, params: ParamStore) -> EmbeddingNet {
        EmbeddingNet {
            backbone: self.backbone.clone(),
            embedding_dim: self.embedding_dim,
            feature_dim: self.feature_dim,
            params,
            body: self.body.clone(),
            head: self.head.clone(),
        }
    }

    /// Loads weights from a safetensors file (F32, F16 or BF16; torchvision, Cadene or timm key
    /// names). See [`LoadMode`].
    pub fn load_weights(&mut self, path: impl AsRef<Path>, mode: LoadMode) -> NnResult<LoadReport> {
        let name = self.backbone.name();
        weights::load_into(&mut self.params, path.as_ref(), mode, &name)
    }

    /// Writes every parameter and buffer into `ckpt` under `<prefix>/<key>`.
    pub fn save_to(&self, ckpt: &mut Checkpoint, prefix: &str) -> NnResult<()> {
        for (name, t, _) in self.params.iter() {
            ckpt.insert(&format!("{prefix}/{name}"), t)?;
        }
        Ok(())
    }

    /// Saves this network alone to a checkpoint file (keys `model/<key>`, metadata `backbone`
    /// and `embedding_dim`), atomically.
    pub fn save(&self, path: impl AsRef<Path>) -> NnResult<()> {
        let mut ck = Checkpoint::new();
        self.save_to(&mut ck, SINGLE_MODEL_PREFIX)?;
        ck.set_meta("backbone", self.backbone.name());
        ck.set_meta("embedding_dim", self.embedding_dim.to_string());
        ck.save(path)
    }

    /// Restores a network saved with [`EmbeddingNet::save`]; returns the checkpoint (metadata).
    pub fn load(&mut self, path: impl AsRef<Path>) -> NnResult<Checkpoint> {
        let ck = Checkpoint::load(path)?;
        self.load_from(&ck, SINGLE_MODEL_PREFIX)?;
        Ok(ck)
    }

    /// Restores every parameter and buffer from `ckpt` (`<prefix>/<key>`); all must be present
    /// with the right shapes. Values are copied in place, so leaves held elsewhere stay valid.
    pub fn load_from(&mut self, ckpt: &Checkpoint, prefix: &str) -> NnResult<()> {
        let names = self.params.names();
        for name in names {
            let key = format!("{prefix}/{name}");
            let want = self
                .params
                .by_name(&name)
                .map(|t| t.shape().to_vec())
                .unwrap_or_default();
            let t = ckpt.tensor_checked(&key, &want, self.params.device())?;
            self.params.assign(&name, &t)?;
        }
        Ok(())
    }
}
