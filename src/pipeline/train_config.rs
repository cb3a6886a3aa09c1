//! What a training run depends on, stored in every checkpoint, and the checks that refuse
//! settings that cannot train (each naming its flag and what would be valid) or that need more
//! memory than the machine has. The loop itself is `train.rs`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::config::{self, check_positive, check_range};
use crate::dml::loss::{MetricLoss, ProxyAnchorConfig};
use crate::dml::triplet::LossKind;
use crate::error::{Error, Result};
use crate::files::{available_memory_bytes, human_bytes};
use crate::nn::{Backbone, ForwardMode};
use crate::robust::defense::{DefenseConfig, EatInner, EatSplit, Method};

/// The backbone as named on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
#[value(rename_all = "kebab-case")]
pub enum Arch {
    /// Small CNN for 28x28 / 32x32 inputs.
    C2f2,
    /// Also spelled mobilenet_v2 (torchvision).
    #[value(alias = "mobilenet_v2")]
    #[serde(alias = "mobilenet_v2")]
    MobilenetV2,
    /// Also spelled bn_inception / bninception (Cadene).
    #[value(aliases = ["bn_inception", "bninception"])]
    #[serde(alias = "bn_inception")]
    BnInception,
    /// torchvision's ResNet-18.
    Resnet18,
    /// torchvision's ResNet-50.
    Resnet50,
}

/// Everything a training run depends on; stored in every checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub arch: Arch,
    pub width_mult: f64,
    pub pretrained: Option<PathBuf>,
    pub embedding_dim: usize,
    pub image_size: usize,
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f32,
    pub weight_decay: f32,
    pub proxy_lr_mult: f32,
    pub lr_step_epochs: usize,
    pub lr_gamma: f32,
    pub warmup_epochs: usize,
    pub bn_freeze: bool,
    pub grad_clip: f32,
    pub seed: u64,
    pub workers: usize,
    /// Stop each epoch after this many steps (quick experiments); 0 = the whole epoch.
    pub max_steps_per_epoch: usize,
    pub pa_alpha: f32,
    pub pa_delta: f32,
    /// `--loss`; None = the method's own ([`DefenseConfig::default_loss`]), which is also what runs
    /// stored before the flag existed trained with.
    #[serde(default)]
    pub loss: Option<LossKind>,
    /// The triplet loss's margin (`--triplet-margin`).
    #[serde(default = "triplet_margin")]
    pub triplet_margin: f32,
    pub defense: DefenseConfig,
}

fn triplet_margin() -> f32 {
    config::TRIPLET_MARGIN
}

impl TrainConfig {
    pub fn new(arch: Arch, method: Method) -> Self {
        TrainConfig {
            arch,
            width_mult: 1.0,
            pretrained: None,
            embedding_dim: config::EMBEDDING_DIM,
            image_size: default_image_size(arch),
            epochs: 40,
            batch_size: config::BATCH_SIZE,
            lr: config::LR,
            weight_decay: config::WEIGHT_DECAY,
            proxy_lr_mult: config::PROXY_LR_MULT,
            lr_step_epochs: config::LR_STEP_EPOCHS,
            lr_gamma: config::LR_GAMMA,
            warmup_epochs: config::WARMUP_EPOCHS,
            bn_freeze: true,
            grad_clip: config::GRAD_CLIP,
            seed: config::SEED,
            workers: config::WORKERS,
            max_steps_per_epoch: 0,
            pa_alpha: config::PA_ALPHA,
            pa_delta: config::PA_DELTA,
            loss: None,
            triplet_margin: config::TRIPLET_MARGIN,
            defense: DefenseConfig::new(method),
        }
    }

    pub fn members(&self) -> usize {
        if self.defense.method.is_ensemble() {
            self.defense.ensemble_size
        } else {
            1
        }
    }

    pub fn backbone(&self) -> Backbone {
        match self.arch {
            Arch::C2f2 => Backbone::C2f2 {
                input_size: (self.image_size, self.image_size),
            },
            Arch::MobilenetV2 => Backbone::MobileNetV2 {
                width: self.width_mult,
            },
            Arch::BnInception => Backbone::BnInception,
            Arch::Resnet18 => Backbone::ResNet18,
            Arch::Resnet50 => Backbone::ResNet50,
        }
    }

    /// BatchNorm mode while training (frozen statistics by default, as Proxy-Anchor's code).
    pub fn train_mode(&self) -> ForwardMode {
        if self.bn_freeze {
            ForwardMode::FrozenBn
        } else {
            ForwardMode::Train
        }
    }

    pub(crate) fn loss(&self) -> ProxyAnchorConfig {
        ProxyAnchorConfig {
            alpha: self.pa_alpha,
            delta: self.pa_delta,
        }
    }

    /// The loss the run trains with: `--loss`, or the method's own.
    pub fn loss_kind(&self) -> LossKind {
        self.loss.unwrap_or_else(|| self.defense.default_loss())
    }

    /// The run's row label: the method's, with the undefended model named after its loss (the
    /// paper's "PAL" is the Proxy Anchor loss).
    pub fn label(&self) -> &'static str {
        match (self.defense.method, self.loss_kind()) {
            (Method::None, LossKind::Triplet) => "Triplet",
            (method, _) => method.label(),
        }
    }

    /// The loss with its hyper-parameters, as a training step takes it.
    pub fn metric_loss(&self) -> MetricLoss {
        match self.loss_kind() {
            LossKind::ProxyAnchor => MetricLoss::ProxyAnchor(self.loss()),
            LossKind::Triplet => MetricLoss::Triplet {
                margin: self.triplet_margin,
            },
        }
    }
}

impl TrainConfig {
    /// Refuses settings that cannot train, naming the flag and what would be valid.
    pub fn validate(&self) -> Result<()> {
        self.check_flags().map_err(Error::Config)
    }

    fn check_flags(&self) -> std::result::Result<(), String> {
        self.check_schedule()?;
        self.check_model()?;
        self.check_loss()?;
        self.check_defense()
    }

    /// The loss: the triplet margin, SPC-2's even batches, robrank's defenses on the triplet
    /// loss only.
    fn check_loss(&self) -> std::result::Result<(), String> {
        check_range(
            "--triplet-margin",
            self.triplet_margin as f64,
            0.0,
            f64::MAX,
            "the triplet loss's margin",
        )?;
        let method = self.defense.method;
        if !method.needs_triplet()
            && self.defense.needs_triplet()
            && self.loss_kind() != LossKind::Triplet
        {
            return Err(format!(
                "--loss {} contradicts --eat-inner {}: ACT's and HM's attacks are defined for \
                 the triplet loss; drop --loss (EAT with them inside uses --loss triplet)",
                self.loss_kind().key(),
                serde_name(&self.defense.eat_inner)
            ));
        }
        if method.needs_triplet() && self.loss_kind() != LossKind::Triplet {
            return Err(format!(
                "--loss {} contradicts --method {}: robrank's defenses (est, act, hm) and EAT \
                 with ACT or HM inside (eat-act, eat-hm) are defined for the triplet loss; drop \
                 --loss (they use --loss triplet), or use --method {} for adversarial training \
                 with Proxy Anchor",
                self.loss_kind().key(),
                serde_name(&method),
                if method.is_eat() { "eat" } else { "at" }
            ));
        }
        if self.defense.hm_ics && method != Method::Hm {
            return Err(format!(
                "--hm-ics adds HM's intra-class structure term and needs --method hm, not \
                 --method {}",
                serde_name(&method)
            ));
        }
        if self.loss_kind() == LossKind::Triplet && !self.batch_size.is_multiple_of(2) {
            return Err(format!(
                "--batch-size {} is odd: the triplet loss trains on SPC-2 batches of image \
                 pairs (each image with one of its class); pass an even size such as {}",
                self.batch_size,
                self.batch_size + 1
            ));
        }
        Ok(())
    }

    /// Epochs, batches and the optimizer: AdamW's rates, decay, step schedule and clip.
    fn check_schedule(&self) -> std::result::Result<(), String> {
        if self.epochs == 0 {
            return Err("--epochs 0 trains nothing; pass at least 1".into());
        }
        if self.batch_size == 0 {
            return Err("--batch-size 0 is not valid: a batch needs at least 1 image".into());
        }
        check_positive("--lr", self.lr as f64, "the learning rate")?;
        check_range(
            "--weight-decay",
            self.weight_decay as f64,
            0.0,
            f64::MAX,
            "the weight decay",
        )?;
        check_positive(
            "--proxy-lr-mult",
            self.proxy_lr_mult as f64,
            "the proxies' learning-rate multiplier",
        )?;
        if !(self.lr * self.proxy_lr_mult).is_finite() {
            return Err(format!(
                "--lr {} x --proxy-lr-mult {} overflows: the proxies' learning rate must be a \
                 finite number; use a usual --lr (1e-5 to 1e-2)",
                self.lr, self.proxy_lr_mult
            ));
        }
        if self.lr_step_epochs == 0 {
            return Err(
                "--lr-step 0 is not valid: the learning rate steps every N epochs, N at least 1"
                    .into(),
            );
        }
        check_positive(
            "--lr-gamma",
            self.lr_gamma as f64,
            "the learning-rate decay factor",
        )?;
        check_range(
            "--grad-clip",
            self.grad_clip as f64,
            0.0,
            f64::MAX,
            "the gradient-norm clip (0 = off)",
        )
    }

    /// The network: embedding width, MobileNetV2's width, the input size, the loader threads.
    fn check_model(&self) -> std::result::Result<(), String> {
        if self.embedding_dim < 2 {
            return Err(format!(
                "--embedding-dim {} is not valid: embeddings need at least 2 dimensions (an \
                 L2-normalised 1-d embedding is only +1 or -1)",
                self.embedding_dim
            ));
        }
        if self.arch == Arch::MobilenetV2 {
            check_range(
                "--width-mult",
                self.width_mult,
                0.01,
                100.0,
                "MobileNetV2's width multiplier",
            )?;
        }
        let min = min_image_size(self.arch);
        if self.image_size < min {
            return Err(format!(
                "--image-size {} is too small for {}: its smallest input is {min}x{min}",
                self.image_size,
                serde_name(&self.arch)
            ));
        }
        if self.workers > config::MAX_WORKERS {
            return Err(format!(
                "--workers {} is more than {} threads",
                self.workers,
                config::MAX_WORKERS
            ));
        }
        Ok(())
    }

    /// The defense: its hyper-parameters, EAT's ensemble size and the training attack.
    fn check_defense(&self) -> std::result::Result<(), String> {
        check_range(
            "--eat-beta",
            self.defense.eat_beta as f64,
            0.0,
            1.0,
            "EAT's beta",
        )?;
        check_range(
            "--trades-lambda",
            self.defense.trades_lambda as f64,
            0.0,
            f64::MAX,
            "TRADES' lambda",
        )?;
        check_positive(
            "--mixup-alpha",
            self.defense.mixup_alpha as f64,
            "Mix-Up's Beta(alpha, alpha) parameter",
        )?;
        let ensemble = self.defense.ensemble_size;
        if self.defense.method.is_ensemble() && !(2..=config::MAX_ENSEMBLE_SIZE).contains(&ensemble)
        {
            return Err(format!(
                "--ensemble-size {ensemble} is not valid: an ensemble ({}) has 2 to {} members",
                serde_name(&self.defense.method),
                config::MAX_ENSEMBLE_SIZE
            ));
        }
        let method = self.defense.method;
        let inner = self.defense.eat_inner;
        if !method.is_eat() && inner != EatInner::Pgd {
            return Err(format!(
                "--eat-inner {} is EAT's inner attack and needs --method eat (or eat-no-split), \
                 not --method {}",
                serde_name(&inner),
                serde_name(&method)
            ));
        }
        if method.default_eat_inner() != EatInner::Pgd && inner != method.default_eat_inner() {
            return Err(format!(
                "--eat-inner {} contradicts --method {}, which is EAT with {} inside; drop \
                 --eat-inner, or use --method eat --eat-inner {}",
                serde_name(&inner),
                serde_name(&method),
                serde_name(&method.default_eat_inner()),
                serde_name(&inner)
            ));
        }
        if method.default_eat_split() == EatSplit::None && self.defense.eat_split != EatSplit::None
        {
            return Err(format!(
                "--eat-split {} contradicts --method {}, whose members all train on the whole \
                 training set; drop --eat-split, or use --method eat for Algorithm 1's split",
                serde_name(&self.defense.eat_split),
                serde_name(&method)
            ));
        }
        if self.defense.method.uses_attack() {
            self.defense
                .attack
                .validate("--train-eps", "--train-steps")?;
        } else {
            check_range(
                "--train-eps",
                self.defense.attack.eps as f64 * 255.0,
                0.0,
                255.0,
                "eps (in 1/255)",
            )?;
        }
        Ok(())
    }

    /// Bytes the run needs at the least: parameters with their gradients and AdamW moments,
    /// proxies, and the first layer's activations of one batch (the real need is larger).
    pub fn memory_lower_bound(&self, classes: usize, train_images: usize) -> f64 {
        let s = self.image_size as f64;
        let dim = self.embedding_dim as f64;
        let w = self.width_mult;
        let (backbone, features, first_layer_per_image) = match self.arch {
            Arch::C2f2 => {
                let flat = 64.0 * (s / 4.0).floor().powi(2);
                (flat * 1024.0, 1024.0, 32.0 * s * s)
            }
            Arch::MobilenetV2 => (3.4e6 * w * w, 1280.0 * w.max(1.0), 32.0 * w * s * s / 4.0),
            Arch::BnInception => (10.2e6, 1024.0, 64.0 * s * s / 4.0),
            Arch::Resnet18 => (11.2e6, 512.0, 64.0 * s * s / 4.0),
            Arch::Resnet50 => (23.5e6, 2048.0, 64.0 * s * s / 4.0),
        };
        let params = backbone + features * dim + classes as f64 * dim;
        let batch = self.batch_size.min(train_images.max(1)) as f64;
        // Per parameter: the weight, its gradient, two AdamW moments, and the host copies a
        // checkpoint save makes of the weight and the moments.
        let per_member = 4.0 * (7.0 * params + batch * 3.0 * s * s + batch * first_layer_per_image);
        per_member * self.members() as f64
    }

    /// Refuses a run whose lower-bound memory need exceeds what the machine has.
    pub fn check_memory(&self, classes: usize, train_images: usize) -> Result<()> {
        let need = self.memory_lower_bound(classes, train_images);
        let have = available_memory_bytes();
        let limit = have.map_or(f64::from(u32::MAX) * 1024.0, |h| h as f64);
        if need <= limit {
            return Ok(());
        }
        Err(Error::Config(format!(
            "this model needs an estimated {} or more (--arch {}, --width-mult {}, --embedding-dim {}, \
             --image-size {}, --batch-size {}), but the machine has {}; choose smaller values",
            human_bytes(need),
            serde_name(&self.arch),
            self.width_mult,
            self.embedding_dim,
            self.image_size,
            self.batch_size,
            have.map_or("no more than 4 TiB addressable here".into(), |h| format!(
                "{} available",
                human_bytes(h as f64)
            ))
        )))
    }
}

/// A value's command-line spelling (`c2f2`, `mobilenet-v2`, `eat`).
pub fn serde_name<T: Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// The smallest input each backbone accepts: c2f2's two 2x2 pools need 4 pixels, MobileNetV2
/// downsamples 32x, and BN-Inception's ceil-mode pools need 32 to keep a pixel to the end.
/// ResNet's strided convolutions and stem pool all pad, so every stage keeps at least a pixel.
pub fn min_image_size(arch: Arch) -> usize {
    match arch {
        Arch::C2f2 => 4,
        Arch::MobilenetV2 => 32,
        Arch::BnInception => 32,
        Arch::Resnet18 | Arch::Resnet50 => 1,
    }
}

/// The input resolution each backbone is used at by default.
pub fn default_image_size(arch: Arch) -> usize {
    match arch {
        Arch::C2f2 => 32,
        _ => 224,
    }
}
