//! The training loop: Proxy Anchor training of one model or of an EAT ensemble, with any of
//! the defenses; AdamW with Proxy-Anchor's parameter groups, step schedule, warm-up epochs
//! (head and proxies only), BatchNorm freezing, gradient clipping; an atomic checkpoint every
//! epoch and `--resume` that continues bit for bit (all randomness is derived from the seed,
//! the epoch, the member and the step); a NaN guard; progress and a JSON-lines log.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::config;
use crate::data::loader::{BatchLoader, LoaderConfig};
use crate::data::{Dataset, Sample};
use crate::dml::loss::{init_proxies, ProxyAnchorConfig};
use crate::engine::optim::{AdamW, ParamGroup};
use crate::engine::{Device, Rng, Tensor};
use crate::error::{io_err, Error, Result};
use crate::nn::{Backbone, Checkpoint, EmbeddingNet, ForwardMode, LoadMode};
use crate::robust::defense::{eat_member_indices, step_loss, DefenseConfig, Method, StepContext};
use crate::robust::pgd::EmbedFn;

/// The backbone as named on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
#[value(rename_all = "kebab-case")]
pub enum Arch {
    /// Small CNN for 28x28 / 32x32 inputs.
    C2f2,
    MobilenetV2,
    BnInception,
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
    pub defense: DefenseConfig,
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

    fn loss(&self) -> ProxyAnchorConfig {
        ProxyAnchorConfig {
            alpha: self.pa_alpha,
            delta: self.pa_delta,
        }
    }
}

/// The input resolution each backbone is used at by default.
pub fn default_image_size(arch: Arch) -> usize {
    match arch {
        Arch::C2f2 => 32,
        _ => 224,
    }
}

/// One model of the run (the only one, or an EAT member).
pub struct Member {
    pub net: EmbeddingNet,
    pub proxies: Tensor,
    pub opt: AdamW,
    /// Indices into the training set this member trains on.
    pub train_indices: Vec<usize>,
}

impl Member {
    /// A view of the network whose parameters take no gradient (attacks need only d/dx), sharing
    /// storage with the trained network so it always sees the latest weights.
    pub fn frozen_net(&self) -> Result<EmbeddingNet> {
        Ok(self.net.frozen_view(self.net.device())?)
    }

    /// Points the optimizer at the network's current leaves (freezing creates new handles).
    fn refresh_optimizer(&mut self) {
        let trainable = self.net.params().all_trainable();
        for g in self.opt.groups.iter_mut() {
            match g.name.as_str() {
                "backbone" => {
                    g.params = trainable
                        .iter()
                        .filter(|(n, _)| !EmbeddingNet::is_head_param(n))
                        .map(|(n, t)| (format!("model/{n}"), current(&self.net, n, t)))
                        .collect()
                }
                "head" => {
                    g.params = trainable
                        .iter()
                        .filter(|(n, _)| EmbeddingNet::is_head_param(n))
                        .map(|(n, t)| (format!("model/{n}"), current(&self.net, n, t)))
                        .collect()
                }
                _ => {}
            }
        }
    }
}

fn current(net: &EmbeddingNet, name: &str, fallback: &Tensor) -> Tensor {
    net.params()
        .by_name(name)
        .cloned()
        .unwrap_or_else(|| fallback.clone())
}

/// A training run: its members and where it is.
pub struct Run {
    pub cfg: TrainConfig,
    pub members: Vec<Member>,
    pub epochs_done: usize,
    pub device: Device,
}

/// Key prefix of member `i` in checkpoints.
pub fn member_prefix(i: usize) -> String {
    format!("member{i}")
}

pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";
pub const LOG_FILE: &str = "train_log.jsonl";

impl Run {
    /// Fresh members (random or pretrained backbones, new heads and proxies).
    pub fn new(cfg: TrainConfig, dataset: &Dataset, device: &Device) -> Result<Run> {
        let n = cfg.members();
        let classes = dataset.num_train_classes();
        let mut rng = Rng::new(cfg.seed);
        let splits = if n > 1 {
            eat_member_indices(dataset.train.len(), n, &mut Rng::new(cfg.seed ^ 0xEA7))
        } else {
            vec![(0..dataset.train.len()).collect()]
        };
        let mut members = Vec::with_capacity(n);
        for (i, train_indices) in splits.into_iter().enumerate() {
            let mut mrng = rng.fork(i as u64);
            let mut net = EmbeddingNet::new(cfg.backbone(), cfg.embedding_dim, device, &mut mrng)?;
            match &cfg.pretrained {
                Some(path) => {
                    let report = net.load_weights(path, LoadMode::BackboneOnly)?;
                    if i == 0 {
                        eprintln!("{}", report.summary());
                    }
                }
                None if i == 0 && cfg.arch != Arch::C2f2 => {
                    eprintln!("note: no --pretrained weights given; training {} from random initialisation", cfg.backbone().name());
                }
                None => {}
            }
            let proxies = init_proxies(classes, cfg.embedding_dim, &mut mrng, device)?;
            let opt = AdamW::new(vec![
                ParamGroup {
                    name: "backbone".into(),
                    params: vec![],
                    lr: cfg.lr,
                    weight_decay: cfg.weight_decay,
                    frozen: false,
                },
                ParamGroup {
                    name: "head".into(),
                    params: vec![],
                    lr: cfg.lr,
                    weight_decay: cfg.weight_decay,
                    frozen: false,
                },
                ParamGroup {
                    name: "proxies".into(),
                    params: vec![("proxies".into(), proxies.clone())],
                    lr: cfg.lr * cfg.proxy_lr_mult,
                    weight_decay: cfg.weight_decay,
                    frozen: false,
                },
            ]);
            let mut m = Member {
                net,
                proxies,
                opt,
                train_indices,
            };
            m.refresh_optimizer();
            members.push(m);
        }
        Ok(Run {
            cfg,
            members,
            epochs_done: 0,
            device: device.clone(),
        })
    }

    /// Saves every member's parameters, buffers, proxies and optimizer moments, the epoch and
    /// the configuration, atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut ck = Checkpoint::new();
        for (i, m) in self.members.iter().enumerate() {
            let p = member_prefix(i);
            m.net.save_to(&mut ck, &format!("{p}/model"))?;
            ck.insert(&format!("{p}/proxies"), &m.proxies)?;
            ck.insert_group(&p, &m.opt.state())?;
            ck.set_meta(&format!("{p}/adam_step"), m.opt.step.to_string());
        }
        ck.set_meta("epochs_done", self.epochs_done.to_string());
        ck.set_meta("rng_state", self.rng_state());
        ck.set_meta("members", self.members.len().to_string());
        ck.set_meta(
            "config",
            serde_json::to_string(&self.cfg).map_err(|e| Error::Config(e.to_string()))?,
        );
        ck.save(path)?;
        Ok(())
    }

    /// The RNG state of the run, as checkpoint metadata. Every random stream is counter-based:
    /// a fresh generator seeded from (seed, epoch, member, step) or (seed, epoch, sample), so
    /// the seed and the next epoch are the whole state; resuming draws exactly what an
    /// uninterrupted run would have drawn.
    fn rng_state(&self) -> String {
        format!(
            "{{\"kind\":\"counter\",\"seed\":{},\"next_epoch\":{}}}",
            self.cfg.seed, self.epochs_done
        )
    }

    /// The configuration stored in a checkpoint.
    pub fn config_of(ck: &Checkpoint) -> Result<TrainConfig> {
        let text = ck.meta_required("config")?;
        serde_json::from_str(text)
            .map_err(|e| Error::Config(format!("checkpoint configuration unreadable: {e}")))
    }

    /// Restores a run from a checkpoint written by [`Run::save`].
    pub fn load(path: &Path, dataset: &Dataset, device: &Device) -> Result<Run> {
        let ck = Checkpoint::load(path)?;
        let cfg = Self::config_of(&ck)?;
        let mut run = Run::new(
            TrainConfig {
                pretrained: None,
                ..cfg.clone()
            },
            dataset,
            device,
        )?;
        run.cfg = cfg;
        for (i, m) in run.members.iter_mut().enumerate() {
            let p = member_prefix(i);
            m.net.load_from(&ck, &format!("{p}/model"))?;
            let proxies = ck.tensor_checked(&format!("{p}/proxies"), m.proxies.shape(), device)?;
            m.proxies.assign(&proxies)?;
            let mut state = std::collections::BTreeMap::new();
            for (name, t) in ck.group(&p) {
                if name.starts_with("adam_") {
                    state.insert(name, t.to_tensor(device)?);
                }
            }
            let step = ck
                .meta_required(&format!("{p}/adam_step"))?
                .parse()
                .map_err(|_| Error::Config("bad adam_step in checkpoint".into()))?;
            m.refresh_optimizer();
            m.opt.load_state(&state, step)?;
        }
        run.epochs_done = ck
            .meta_required("epochs_done")?
            .parse()
            .map_err(|_| Error::Config("bad epochs_done in checkpoint".into()))?;
        // Checkpoints from before the key was written carry the same state implicitly.
        if let Some(state) = ck.meta("rng_state") {
            if state != run.rng_state() {
                return Err(Error::Config(format!(
                    "checkpoint RNG state {state} disagrees with its seed {} and epoch {}; \
                     the file was edited or is corrupt",
                    run.cfg.seed, run.epochs_done
                )));
            }
        }
        Ok(run)
    }

    /// Trains until `cfg.epochs`, checkpointing into `out_dir` after every epoch.
    pub fn train(&mut self, dataset: &Dataset, out_dir: &Path, quiet: bool) -> Result<()> {
        std::fs::create_dir_all(out_dir).map_err(io_err(out_dir))?;
        let ckpt = out_dir.join(CHECKPOINT_FILE);
        let log_path = out_dir.join(LOG_FILE);
        while self.epochs_done < self.cfg.epochs {
            let epoch = self.epochs_done;
            let stats = self.train_epoch(dataset, epoch, quiet)?;
            self.epochs_done += 1;
            self.save(&ckpt)?;
            let mut log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log_path)
                .map_err(io_err(&log_path))?;
            writeln!(log, "{}", serde_json::to_string(&stats).unwrap_or_default())
                .map_err(io_err(&log_path))?;
        }
        Ok(())
    }

    fn set_warmup(&mut self, warm: bool) {
        for m in self.members.iter_mut() {
            m.net.freeze_backbone(warm);
            m.opt.set_frozen("backbone", warm);
            m.refresh_optimizer();
        }
    }

    /// One epoch of every member (Algorithm 1's inner loop for EAT).
    pub fn train_epoch(
        &mut self,
        dataset: &Dataset,
        epoch: usize,
        quiet: bool,
    ) -> Result<EpochStats> {
        let cfg = self.cfg.clone();
        self.set_warmup(epoch < cfg.warmup_epochs);
        let lr_scale = cfg
            .lr_gamma
            .powi((epoch / cfg.lr_step_epochs.max(1)) as i32);
        let start = Instant::now();
        let mut losses = Vec::new();
        let mut images = 0usize;
        for i in 0..self.members.len() {
            self.members[i].opt.lr_scale = lr_scale;
            let samples: Vec<Sample> = self.members[i]
                .train_indices
                .iter()
                .map(|&k| dataset.train[k].clone())
                .collect();
            let mut lc = LoaderConfig::train(
                cfg.batch_size.min(samples.len()),
                cfg.image_size,
                cfg.seed ^ (i as u64) << 32,
            )
            .for_samples(&samples);
            lc.workers = cfg.workers;
            let loader = BatchLoader::new(samples, lc)?;
            let total = match cfg.max_steps_per_epoch {
                0 => loader.batches_per_epoch(),
                s => s.min(loader.batches_per_epoch()),
            };
            let mut bar = Progress::new(
                format!(
                    "epoch {}/{} member {}/{}",
                    epoch + 1,
                    cfg.epochs,
                    i + 1,
                    self.members.len()
                ),
                total,
                quiet,
            );
            for (step, batch) in loader.epoch(epoch as u64).take(total).enumerate() {
                let model = format!("{:?} at {s}x{s}", cfg.arch, s = cfg.image_size);
                let memory = |e: Error| e.in_step(&model, batch.labels.len());
                let x = batch
                    .images_tensor(&self.device)
                    .map_err(|e| memory(e.into()))?;
                let mut rng =
                    Rng::new(cfg.seed ^ ((epoch as u64) << 40) ^ ((i as u64) << 32) ^ step as u64);
                let loss = self
                    .member_step(i, &x, &batch.labels, &mut rng)
                    .map_err(memory)?;
                if !loss.is_finite() {
                    return Err(Error::NonFiniteLoss {
                        epoch,
                        member: i,
                        step,
                        value: loss,
                    });
                }
                losses.push(loss as f64);
                images += batch.len();
                bar.tick(loss, batch.len());
            }
            bar.finish();
        }
        let seconds = start.elapsed().as_secs_f64();
        Ok(EpochStats {
            epoch: epoch + 1,
            loss: losses.iter().sum::<f64>() / losses.len().max(1) as f64,
            lr: (cfg.lr * lr_scale) as f64,
            seconds,
            images_per_second: images as f64 / seconds.max(1e-9),
            warmup: epoch < cfg.warmup_epochs,
        })
    }

    /// One optimizer step of member `i`; returns the loss value.
    fn member_step(
        &mut self,
        i: usize,
        x: &Tensor,
        labels: &[usize],
        rng: &mut Rng,
    ) -> Result<f32> {
        let cfg = &self.cfg;
        let mode = cfg.train_mode();
        let needs_attack =
            cfg.defense.method != Method::None && cfg.defense.method != Method::MixUp;
        // Attacks run on frozen views (no parameter gradients) in the training BN mode.
        let views: Vec<EmbeddingNet> = if !needs_attack {
            Vec::new()
        } else if cfg.defense.method.is_ensemble() {
            self.members
                .iter()
                .map(|m| m.frozen_net())
                .collect::<Result<_>>()?
        } else {
            vec![self.members[i].frozen_net()?]
        };
        let attack_mode = if cfg.bn_freeze {
            ForwardMode::FrozenBn
        } else {
            ForwardMode::Eval
        };
        let view_fns: Vec<Box<dyn Fn(&Tensor) -> crate::engine::Result<Tensor> + '_>> = views
            .iter()
            .map(|v| {
                Box::new(move |x: &Tensor| v.forward(x, attack_mode)) as Box<dyn Fn(&Tensor) -> _>
            })
            .collect();
        let attack_on: Vec<EmbedFn> = view_fns.iter().map(|f| f.as_ref() as EmbedFn).collect();
        let m = &self.members[i];
        let member = |x: &Tensor| m.net.forward(x, mode);
        let ctx = StepContext {
            member: &member,
            attack_on: &attack_on,
            proxies: &m.proxies,
            loss: cfg.loss(),
            defense: &cfg.defense,
        };
        let loss = step_loss(&ctx, x, labels, rng)?;
        let value = loss.item()?;
        if !value.is_finite() {
            return Ok(value);
        }
        let grads = loss.backward()?;
        let clip = (cfg.grad_clip > 0.0).then_some(cfg.grad_clip);
        drop(attack_on);
        drop(view_fns);
        self.members[i].opt.step(&grads, clip)?;
        Ok(value)
    }
}

/// One line of the JSON-lines training log.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EpochStats {
    pub epoch: usize,
    pub loss: f64,
    pub lr: f64,
    pub seconds: f64,
    pub images_per_second: f64,
    pub warmup: bool,
}

/// A one-line progress bar on stderr (redrawn on a terminal, a line every 10% otherwise) with
/// the loss, throughput and ETA.
struct Progress {
    label: String,
    total: usize,
    done: usize,
    images: usize,
    loss: f32,
    start: Instant,
    tty: bool,
    quiet: bool,
    last_decile: usize,
}

impl Progress {
    fn new(label: String, total: usize, quiet: bool) -> Progress {
        Progress {
            label,
            total,
            done: 0,
            images: 0,
            loss: 0.0,
            start: Instant::now(),
            tty: std::io::stderr().is_terminal(),
            quiet,
            last_decile: 0,
        }
    }

    fn tick(&mut self, loss: f32, images: usize) {
        self.done += 1;
        self.images += images;
        self.loss = loss;
        if self.quiet {
            return;
        }
        let decile = self.done * 10 / self.total.max(1);
        if self.tty || decile > self.last_decile {
            self.last_decile = decile;
            self.draw();
        }
    }

    fn draw(&self) {
        let el = self.start.elapsed().as_secs_f64();
        let rate = self.images as f64 / el.max(1e-9);
        let eta = el / self.done.max(1) as f64 * (self.total - self.done) as f64;
        let width = 24;
        let filled = width * self.done / self.total.max(1);
        let bar: String = (0..width)
            .map(|k| if k < filled { '=' } else { ' ' })
            .collect();
        let line = format!(
            "{} [{bar}] {}/{} loss {:.4} {:.1} img/s ETA {:.0}s",
            self.label, self.done, self.total, self.loss, rate, eta
        );
        if self.tty {
            eprint!("\r{line}\x1b[K");
        } else {
            eprintln!("{line}");
        }
    }

    fn finish(&self) {
        if self.tty && !self.quiet {
            eprintln!();
        }
    }
}
