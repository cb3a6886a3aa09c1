//! The training loop: Proxy Anchor training of one model or of an ensemble (EAT or a Table 3
//! ablation), with any of the defenses; AdamW with Proxy-Anchor's parameter groups, step schedule, warm-up epochs
//! (head and proxies only), BatchNorm freezing, gradient clipping; an atomic checkpoint every
//! epoch, and inside an epoch every few minutes, and `--resume` that continues bit for bit from
//! either (all randomness is derived from the seed, the epoch, the member and the step); a NaN
//! guard; progress and a JSON-lines log.

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::config::AttackChannels;
use crate::data::loader::{BatchLoader, LoaderConfig};
use crate::data::{Dataset, Sample};
use crate::dml::loss::init_proxies;
/// The loss a run trains with (`--loss`), named through here for the same reason.
pub use crate::dml::triplet::LossKind;
use crate::engine::optim::{AdamW, ParamGroup};
use crate::engine::{Device, Rng, Tensor};
use crate::error::{io_err, Error, Result};
use crate::nn::{Checkpoint, EmbeddingNet, ForwardMode, LoadMode};
use crate::pipeline::interrupt;
use crate::pipeline::progress::Progress;
use crate::pipeline::run_dir;
pub use crate::pipeline::train_config::{
    default_image_size, min_image_size, serde_name, Arch, TrainConfig,
};
use crate::robust::attack::{BoxedEmbedFn, EmbedFn};
use crate::robust::defense::{eat_member_indices, step_loss, StepContext};
/// The defense a run trains with, part of its [`TrainConfig`]; the CLI's `--method` names it
/// through here, so the command line imports nothing from `robust`.
pub use crate::robust::defense::{EatInner, EatSplit, Method};

/// One model of the run (the only one, or an ensemble member).
pub struct Member {
    pub net: EmbeddingNet,
    pub proxies: Tensor,
    pub opt: AdamW,
    /// Indices into the training set this member trains on.
    pub train_indices: Vec<usize>,
    /// HM's gradual adversary (LGA) remembers the member's last adversarial triplet loss;
    /// saved with the checkpoint so that a resumed run continues bit for bit.
    pub lga_loss: f32,
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
    /// One entry per finished epoch; saved in the checkpoint, so `train_log.jsonl` can always
    /// be rewritten to agree with it.
    pub log: Vec<EpochStats>,
    /// The dataset the run trains on (`Dataset::name`) and its `--data-dir`, recorded so that
    /// `--resume` and `eval` can name it.
    pub dataset_name: String,
    pub data_dir: Option<PathBuf>,
    /// The unfinished epoch `epochs_done` when the run was saved part-way through it.
    pub progress: Option<EpochProgress>,
    /// When epochs write checkpoints of their own.
    pub saves: MidEpochSaves,
}

/// Where an unfinished epoch stood when its checkpoint was written: the member training and
/// the steps it had taken, with what the epoch's log line needs. Every random draw of the rest
/// of the epoch derives from (seed, epoch, member, step), so with the weights and optimizer
/// moments this is the whole state.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EpochProgress {
    pub epoch: usize,
    pub member: usize,
    /// Steps member `member` has taken in this epoch.
    pub step: usize,
    /// Every finished step's loss this epoch, as f64 bits, so that the epoch's mean loss is the
    /// same to the bit as an uninterrupted epoch's.
    pub loss_bits: Vec<u64>,
    pub images: usize,
    /// Training time spent on this epoch before the checkpoint.
    pub seconds: f64,
}

/// When an epoch writes checkpoints of its own. A setting of the process, not of the run: it
/// is not stored, and any value resumes the same run to the same bits.
#[derive(Clone, Debug)]
pub struct MidEpochSaves {
    /// Write a checkpoint once this long has passed since the last (None: at epoch ends only).
    pub every: Option<Duration>,
    /// Save and stop after this many steps of this call (None: train to the last epoch); tests
    /// use it to interrupt a run at an exact step.
    pub stop_after_steps: Option<usize>,
}

impl Default for MidEpochSaves {
    fn default() -> Self {
        MidEpochSaves {
            every: Some(Duration::from_secs_f64(
                crate::config::CHECKPOINT_MINUTES * 60.0,
            )),
            stop_after_steps: None,
        }
    }
}

impl MidEpochSaves {
    /// A checkpoint every `minutes` inside an epoch (`--checkpoint-minutes`; 0: at epoch ends
    /// only).
    pub fn every_minutes(minutes: f64) -> Result<Self> {
        if !(minutes.is_finite() && minutes >= 0.0) {
            return Err(Error::Config(format!(
                "--checkpoint-minutes {minutes} is not a number of minutes; pass 0 or more (0: \
                 checkpoints at epoch ends only)"
            )));
        }
        // Past ~10^13 minutes a Duration overflows; that long is never.
        let every = (minutes > 0.0)
            .then(|| Duration::try_from_secs_f64(minutes * 60.0).ok())
            .flatten();
        Ok(MidEpochSaves {
            every,
            stop_after_steps: None,
        })
    }
}

/// How a call to [`Run::train`] ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trained {
    /// Every epoch of the configuration is done.
    AllEpochs,
    /// Stopped part-way by [`MidEpochSaves::stop_after_steps`], after writing its checkpoint.
    Stopped,
}

/// Key prefix of member `i` in checkpoints.
pub fn member_prefix(i: usize) -> String {
    format!("member{i}")
}

pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";
pub const LOG_FILE: &str = "train_log.jsonl";

/// Refuses to replace a run that exists in `out` unless `overwrite`; with it, the old
/// checkpoint and log are deleted.
pub fn claim_run_dir(out: &Path, overwrite: bool) -> Result<()> {
    let files = [out.join(CHECKPOINT_FILE), out.join(LOG_FILE)];
    for f in &files {
        run_dir::check_writable(f)?;
    }
    // An empty log is what a run killed before its first checkpoint leaves: nothing to lose.
    let existing: Vec<&PathBuf> = files
        .iter()
        .filter(|f| std::fs::symlink_metadata(f).is_ok_and(|m| m.len() > 0))
        .collect();
    if existing.is_empty() {
        return Ok(());
    }
    if !overwrite {
        return Err(Error::Config(format!(
            "{} already holds a run ({}); pass --resume to continue it, --overwrite to replace \
             it, or choose another --out",
            out.display(),
            existing
                .iter()
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    for f in existing {
        if std::fs::symlink_metadata(f).is_ok_and(|m| m.is_file()) {
            std::fs::remove_file(f).map_err(io_err(f))?;
        }
    }
    Ok(())
}

/// Refuses tied attack channels (`tied`: some attack of the run ties them) on a dataset with
/// colour images, before any work: there is no grey image to move.
pub fn refuse_tied_on_colour(tied: bool, dataset: &Dataset) -> Result<()> {
    // The scan reads every in-memory image of a grey dataset, so only a tied run pays for it.
    if !tied {
        return Ok(());
    }
    match dataset.first_colour_image() {
        Some(image) => Err(Error::Config(format!(
            "--attack-channels tied moves a grey image, but {image} of {} has colour; use \
             --attack-channels independent",
            dataset.name
        ))),
        None => Ok(()),
    }
}

impl Run {
    /// Fresh members (random or pretrained backbones, new heads and proxies).
    pub fn new(cfg: TrainConfig, dataset: &Dataset, device: &Device) -> Result<Run> {
        cfg.validate()?;
        let n = cfg.members();
        let classes = dataset.num_train_classes();
        if cfg.batch_size > dataset.train.len() {
            return Err(Error::Config(format!(
                "--batch-size {} is larger than the training set of {} ({} images); pass at most {}",
                cfg.batch_size,
                dataset.name,
                dataset.train.len(),
                dataset.train.len()
            )));
        }
        cfg.check_memory(classes, dataset.train.len())?;
        refuse_tied_on_colour(cfg.defense.attack.channels == AttackChannels::Tied, dataset)?;
        let mut rng = Rng::new(cfg.seed);
        // Algorithm 1's split for EAT; the whole set for one model and for the Table 3
        // ablations (members then differ only by their seeds).
        let splits = if n > 1 && cfg.defense.splits_data() {
            eat_member_indices(dataset.train.len(), n, &mut Rng::new(cfg.seed ^ 0xEA7))
        } else {
            vec![(0..dataset.train.len()).collect(); n]
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
                lga_loss: crate::config::LGA_INITIAL_LOSS,
            };
            m.refresh_optimizer();
            members.push(m);
        }
        Ok(Run {
            cfg,
            members,
            epochs_done: 0,
            device: device.clone(),
            log: Vec::new(),
            dataset_name: dataset.name.clone(),
            data_dir: None,
            progress: None,
            saves: MidEpochSaves::default(),
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
            if self.cfg.defense.uses_lga() {
                ck.set_meta(&format!("{p}/lga_loss"), m.lga_loss.to_bits().to_string());
            }
        }
        ck.set_meta("epochs_done", self.epochs_done.to_string());
        if let Some(p) = &self.progress {
            ck.set_meta(
                PROGRESS_KEY,
                serde_json::to_string(p).map_err(|e| Error::Config(e.to_string()))?,
            );
        }
        ck.set_meta("rng_state", self.rng_state());
        ck.set_meta("members", self.members.len().to_string());
        ck.set_meta(
            "config",
            serde_json::to_string(&self.cfg).map_err(|e| Error::Config(e.to_string()))?,
        );
        ck.set_meta("train_log", log_lines(&self.log));
        ck.set_meta("dataset", self.dataset_name.clone());
        if let Some(dir) = &self.data_dir {
            ck.set_meta("data_dir", dir.display().to_string());
        }
        // Never replace the last good checkpoint with a poisoned state.
        if let Some((tensor, value)) = ck.first_non_finite() {
            return Err(Error::NonFiniteState {
                what: self.position(),
                tensor,
                value,
                when: String::new(),
                consequence: format!(
                    "training stopped and {} was not written, so the last good checkpoint is kept",
                    path.display()
                ),
                cause: likely_cause(&self.cfg),
            });
        }
        ck.save(path)?;
        Ok(())
    }

    /// Where the run stands, in words: "the model after epoch 3", or part-way through one.
    pub fn position(&self) -> String {
        match &self.progress {
            Some(p) if self.members.len() > 1 => format!(
                "the model part-way through epoch {} (member {}/{}, step {})",
                p.epoch + 1,
                p.member + 1,
                self.members.len(),
                p.step
            ),
            Some(p) => format!(
                "the model part-way through epoch {} (step {})",
                p.epoch + 1,
                p.step
            ),
            None => format!("the model after epoch {}", self.epochs_done),
        }
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
        Self::from_checkpoint(&ck, dataset, device)
    }

    /// Refuses a checkpoint holding NaN or infinite values: evaluating or resuming it would
    /// give meaningless numbers with a success exit.
    pub fn check_finite(ck: &Checkpoint) -> Result<()> {
        match ck.first_non_finite() {
            None => Ok(()),
            Some((tensor, value)) => Err(Error::NonFiniteState {
                what: format!("checkpoint {}", ck_origin(ck)),
                tensor,
                value,
                when: String::new(),
                consequence: "it cannot be evaluated or resumed".into(),
                cause: "the file was damaged or written by an older version without the \
                        non-finite check; retrain from an earlier checkpoint or from scratch"
                    .into(),
            }),
        }
    }

    /// Checks that the checkpoint's proxies fit `dataset` (the same number of training
    /// classes), naming both datasets otherwise.
    fn check_dataset(ck: &Checkpoint, cfg: &TrainConfig, dataset: &Dataset) -> Result<()> {
        let stored = ck.get(&format!("{}/proxies", member_prefix(0)));
        let classes = dataset.num_train_classes();
        match stored {
            Some(p) if p.shape != [classes, cfg.embedding_dim] => Err(Error::Config(format!(
                "checkpoint {} was trained on {} ({} training classes); --dataset {} has {} \
                 training classes. Pass the run's dataset (--dataset {})",
                ck_origin(ck),
                ck.meta("dataset").unwrap_or("another dataset"),
                p.shape.first().copied().unwrap_or(0),
                dataset.name,
                classes,
                ck.meta("dataset").unwrap_or("...")
            ))),
            _ => Ok(()),
        }
    }

    /// Restores a run from a loaded checkpoint.
    pub fn from_checkpoint(ck: &Checkpoint, dataset: &Dataset, device: &Device) -> Result<Run> {
        let cfg = Self::config_of(ck)?;
        Self::check_finite(ck)?;
        Self::check_dataset(ck, &cfg, dataset)?;
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
            m.net.load_from(ck, &format!("{p}/model"))?;
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
            if let Some(bits) = ck.meta(&format!("{p}/lga_loss")) {
                let bits = bits
                    .parse()
                    .map_err(|_| Error::Config("bad lga_loss in checkpoint".into()))?;
                m.lga_loss = f32::from_bits(bits);
            }
        }
        run.epochs_done = ck
            .meta_required("epochs_done")?
            .parse()
            .map_err(|_| Error::Config("bad epochs_done in checkpoint".into()))?;
        run.log = parse_log(ck.meta("train_log").unwrap_or(""));
        if let Some(name) = ck.meta("dataset") {
            run.dataset_name = name.to_string();
        }
        run.data_dir = ck.meta("data_dir").map(PathBuf::from);
        run.progress = Self::progress_of(ck, &run)?;
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

    /// The unfinished epoch a checkpoint was saved in, checked against the run it belongs to.
    fn progress_of(ck: &Checkpoint, run: &Run) -> Result<Option<EpochProgress>> {
        let Some(text) = ck.meta(PROGRESS_KEY) else {
            return Ok(None);
        };
        let corrupt = |why: String| {
            Error::Config(format!(
                "checkpoint {}: its record of the unfinished epoch {why}; the file was edited or \
                 is corrupt",
                ck_origin(ck)
            ))
        };
        let p: EpochProgress =
            serde_json::from_str(text).map_err(|e| corrupt(format!("is unreadable ({e})")))?;
        if p.epoch != run.epochs_done {
            return Err(corrupt(format!(
                "names epoch {} but the checkpoint is after epoch {}",
                p.epoch + 1,
                run.epochs_done
            )));
        }
        if p.member >= run.members.len() {
            return Err(corrupt(format!(
                "names member {} of a run of {}",
                p.member + 1,
                run.members.len()
            )));
        }
        if p.step > p.loss_bits.len() || !p.seconds.is_finite() || p.seconds < 0.0 {
            return Err(corrupt("is inconsistent".into()));
        }
        Ok(Some(p))
    }

    /// Trains until `cfg.epochs`, checkpointing into `out_dir` after every epoch and, as
    /// [`Run::saves`] says, inside epochs; a run saved part-way through an epoch goes on from
    /// the step it had reached.
    ///
    /// Before the first epoch: leftovers of killed writes are removed, both files are checked
    /// to be writable, and the log is rewritten from the run's own record so that it agrees
    /// with the checkpoint whatever moment an earlier run was killed at.
    pub fn train(&mut self, dataset: &Dataset, out_dir: &Path, quiet: bool) -> Result<Trained> {
        std::fs::create_dir_all(out_dir).map_err(io_err(out_dir))?;
        let ckpt = out_dir.join(CHECKPOINT_FILE);
        let log_path = out_dir.join(LOG_FILE);
        run_dir::remove_stale_tmp(&[ckpt.clone(), log_path.clone()]);
        run_dir::check_writable(&ckpt)?;
        run_dir::check_writable(&log_path)?;
        if self.log.is_empty() && self.epochs_done > 0 {
            // A checkpoint from before the log was stored in it: keep the file's lines.
            self.log = read_log_file(&log_path, self.epochs_done);
        }
        self.write_log(&log_path)?;
        // SIGTERM / SIGINT from here on: the step in progress ends and is saved (run_epoch).
        let _deferred = interrupt::Deferred::begin();
        while self.epochs_done < self.cfg.epochs {
            let epoch = self.epochs_done;
            let Some(stats) = self.run_epoch(dataset, epoch, quiet, Some(&ckpt))? else {
                return Ok(Trained::Stopped);
            };
            self.epochs_done += 1;
            self.log.push(stats);
            if let Err(e) = self.save(&ckpt) {
                self.epochs_done -= 1;
                self.log.pop();
                return Err(self.not_saved(e, &ckpt));
            }
            self.write_log(&log_path)?;
        }
        Ok(Trained::AllEpochs)
    }

    /// A failed save, saying what is kept on disk; a refused non-finite state already does.
    fn not_saved(&self, e: Error, ckpt: &Path) -> Error {
        if matches!(e, Error::NonFiniteState { .. }) {
            return e;
        }
        let kept = match self.epochs_done {
            0 => "no checkpoint had been written yet".to_string(),
            n => format!("the checkpoint of epoch {n} is kept, whole"),
        };
        Error::CheckpointNotSaved {
            path: ckpt.to_path_buf(),
            epoch: self.epochs_done + 1,
            kept,
            source: Box::new(e),
        }
    }

    /// Rewrites the JSON-lines log atomically from [`Run::log`].
    fn write_log(&self, path: &Path) -> Result<()> {
        run_dir::write_atomic(path, log_lines(&self.log).as_bytes())
    }

    fn set_warmup(&mut self, warm: bool) {
        for m in self.members.iter_mut() {
            m.net.freeze_backbone(warm);
            m.opt.set_frozen("backbone", warm);
            m.refresh_optimizer();
        }
    }

    /// One whole epoch of every member (Algorithm 1's inner loop for EAT), writing no
    /// checkpoint.
    pub fn train_epoch(
        &mut self,
        dataset: &Dataset,
        epoch: usize,
        quiet: bool,
    ) -> Result<EpochStats> {
        self.progress = None;
        let stats = self.run_epoch(dataset, epoch, quiet, None)?;
        stats.ok_or_else(|| Error::Config("an epoch without checkpoints cannot stop".into()))
    }

    /// Epoch `epoch` from where [`Run::progress`] says it stood (from its start when it holds
    /// another epoch or nothing). With `ckpt`, writes a checkpoint there as [`Run::saves`]
    /// says, and returns None if told to stop part-way.
    fn run_epoch(
        &mut self,
        dataset: &Dataset,
        epoch: usize,
        quiet: bool,
        ckpt: Option<&Path>,
    ) -> Result<Option<EpochStats>> {
        let cfg = self.cfg.clone();
        self.set_warmup(epoch < cfg.warmup_epochs);
        let lr_scale = cfg
            .lr_gamma
            .powi((epoch / cfg.lr_step_epochs.max(1)) as i32);
        let start = Instant::now();
        let mut last_save = start;
        let mut steps_this_call = 0usize;
        let mut at = match self.progress.take() {
            Some(p) if p.epoch == epoch => p,
            _ => EpochProgress {
                epoch,
                ..EpochProgress::default()
            },
        };
        let seconds_before = at.seconds;
        for i in at.member..self.members.len() {
            self.members[i].opt.lr_scale = lr_scale;
            let samples: Vec<Sample> = self.members[i]
                .train_indices
                .iter()
                .map(|&k| dataset.train[k].clone())
                .collect();
            // SPC-2 batches (the triplet loss) take half their images as anchors.
            let spc2 = cfg.loss_kind() == LossKind::Triplet;
            let batch = match spc2 {
                true => cfg.batch_size.min(2 * samples.len()),
                false => cfg.batch_size.min(samples.len()),
            };
            let mut lc = LoaderConfig::train(batch, cfg.image_size, cfg.seed ^ (i as u64) << 32)
                .for_samples(&samples);
            if spc2 {
                lc = lc.spc2();
            }
            lc.workers = cfg.workers;
            let loader = BatchLoader::new(samples, lc)?;
            let total = match cfg.max_steps_per_epoch {
                0 => loader.batches_per_epoch(),
                s => s.min(loader.batches_per_epoch()),
            };
            let label = match self.members.len() {
                1 => format!("epoch {}/{}", epoch + 1, cfg.epochs),
                n => format!("epoch {}/{} member {}/{n}", epoch + 1, cfg.epochs, i + 1),
            };
            let bar = Progress::new(label, (total * batch) as u64, "img", quiet);
            let first_step = at.step.min(total);
            bar.skip((first_step * batch) as u64);
            let first_loss = at.loss_bits.len() - at.step;
            let batches = loader.epoch_from(epoch as u64, first_step);
            for (step, batch) in (first_step..total).zip(batches) {
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
                        cause: likely_cause(&cfg),
                    });
                }
                at.loss_bits.push((loss as f64).to_bits());
                at.images += batch.len();
                at.step = step + 1;
                bar.inc(batch.len() as u64);
                bar.set_message(format!("loss {loss:.4}"));
                steps_this_call += 1;
                let signal = interrupt::take();
                let interrupted = |saved: String| Error::Interrupted {
                    signal: signal.unwrap_or_default(),
                    epoch: epoch + 1,
                    step: step + 1,
                    saved,
                };
                let Some(ckpt) = ckpt else {
                    if signal.is_some() {
                        return Err(interrupted("stopped; this run has no checkpoint".into()));
                    }
                    continue;
                };
                let stop = (self.saves.stop_after_steps).is_some_and(|n| steps_this_call >= n);
                let due = (self.saves.every).is_some_and(|every| last_save.elapsed() >= every);
                if stop || due || signal.is_some() {
                    at.seconds = seconds_before + start.elapsed().as_secs_f64();
                    self.save_progress(&at, ckpt)?;
                    last_save = Instant::now();
                }
                if signal.is_some() {
                    bar.finish(&format!("interrupted at step {}; saved", step + 1));
                    return Err(interrupted(format!(
                        "that step's checkpoint is saved, {}. To go on from it, rerun `train` \
                         with --resume, or rerun the same `experiment` command",
                        ckpt.display()
                    )));
                }
                if stop {
                    bar.finish(&format!("stopped at step {}; saved", step + 1));
                    return Ok(None);
                }
            }
            let mean = mean_of(&at.loss_bits[first_loss..]);
            bar.finish(&format!("mean loss {mean:.4}"));
            at.member = i + 1;
            at.step = 0;
        }
        let seconds = seconds_before + start.elapsed().as_secs_f64();
        Ok(Some(EpochStats {
            epoch: epoch + 1,
            loss: mean_of(&at.loss_bits),
            lr: (cfg.lr * lr_scale) as f64,
            seconds,
            images_per_second: at.images as f64 / seconds.max(1e-9),
            warmup: epoch < cfg.warmup_epochs,
        }))
    }

    /// Writes the checkpoint of a run part-way through an epoch; the run stays as it was.
    fn save_progress(&mut self, at: &EpochProgress, ckpt: &Path) -> Result<()> {
        self.progress = Some(at.clone());
        let saved = self.save(ckpt);
        self.progress = None;
        saved.map_err(|e| self.not_saved(e, ckpt))
    }

    /// The members whose sum of objectives member `i`'s training attack climbs: all of them
    /// for EAT (eq. 10), member `i` alone for AT and the naive ensemble, none for methods
    /// that do not attack.
    pub fn attacked_members(&self, i: usize) -> Vec<usize> {
        let method = self.cfg.defense.method;
        if !method.uses_attack() {
            Vec::new()
        } else if method.attacks_ensemble() {
            (0..self.members.len()).collect()
        } else {
            vec![i]
        }
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
        // Attacks run on frozen views (no parameter gradients) in the training BN mode.
        let views: Vec<EmbeddingNet> = self
            .attacked_members(i)
            .into_iter()
            .map(|k| self.members[k].frozen_net())
            .collect::<Result<_>>()?;
        let attack_mode = if cfg.bn_freeze {
            ForwardMode::FrozenBn
        } else {
            ForwardMode::Eval
        };
        let view_fns: Vec<BoxedEmbedFn<'_>> = views
            .iter()
            .map(|v| {
                Box::new(move |x: &Tensor| v.forward(x, attack_mode)) as Box<dyn Fn(&Tensor) -> _>
            })
            .collect();
        let attack_on: Vec<EmbedFn> = view_fns.iter().map(|f| f.as_ref() as EmbedFn).collect();
        let m = &self.members[i];
        let member = |x: &Tensor| m.net.forward(x, mode);
        let lga_loss = Cell::new(m.lga_loss);
        let ctx = StepContext {
            member: &member,
            attack_on: &attack_on,
            proxies: &m.proxies,
            loss: cfg.metric_loss(),
            defense: &cfg.defense,
            lga_loss: &lga_loss,
        };
        let loss = step_loss(&ctx, x, labels, rng)?;
        let lga_loss = lga_loss.get();
        let value = loss.item()?;
        if !value.is_finite() {
            return Ok(value);
        }
        let grads = loss.backward()?;
        let clip = (cfg.grad_clip > 0.0).then_some(cfg.grad_clip);
        drop(attack_on);
        drop(view_fns);
        self.members[i].lga_loss = lga_loss;
        self.members[i].opt.step(&grads, clip)?;
        Ok(value)
    }
}

/// Checkpoint metadata key of [`EpochProgress`].
const PROGRESS_KEY: &str = "epoch_progress";

/// The mean of losses stored as f64 bits, summed in order (0 for none).
fn mean_of(loss_bits: &[u64]) -> f64 {
    let sum: f64 = loss_bits.iter().map(|&b| f64::from_bits(b)).sum();
    sum / loss_bits.len().max(1) as f64
}

/// The log as JSON lines, one epoch a line.
fn log_lines(log: &[EpochStats]) -> String {
    log.iter()
        .filter_map(|s| serde_json::to_string(s).ok())
        .map(|l| l + "\n")
        .collect()
}

fn parse_log(text: &str) -> Vec<EpochStats> {
    text.lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The entries of an existing log file for epochs up to `epochs_done` (the last of each epoch
/// wins: an interrupted run may have logged an epoch twice).
fn read_log_file(path: &Path, epochs_done: usize) -> Vec<EpochStats> {
    let text = crate::files::read_regular_to_string(path).unwrap_or_default();
    let mut by_epoch = std::collections::BTreeMap::new();
    for s in parse_log(&text) {
        if s.epoch >= 1 && s.epoch <= epochs_done {
            by_epoch.insert(s.epoch, s);
        }
    }
    by_epoch.into_values().collect()
}

fn ck_origin(ck: &Checkpoint) -> String {
    ck.source
        .as_ref()
        .map_or("<in memory>".into(), |p| p.display().to_string())
}

/// The flags most likely to have made the state non-finite, for the error message.
pub fn likely_cause(cfg: &TrainConfig) -> String {
    let mut causes = Vec::new();
    if cfg.lr > 1.0 {
        causes.push(format!(
            "--lr {} is far above the usual 1e-5 to 1e-2",
            cfg.lr
        ));
    }
    if cfg.lr * cfg.proxy_lr_mult > 100.0 && cfg.lr <= 1.0 {
        causes.push(format!(
            "--lr {} x --proxy-lr-mult {} gives the proxies a learning rate of {}",
            cfg.lr,
            cfg.proxy_lr_mult,
            cfg.lr * cfg.proxy_lr_mult
        ));
    }
    if cfg.weight_decay > 1.0 {
        causes.push(format!(
            "--weight-decay {} is far above the usual 1e-4",
            cfg.weight_decay
        ));
    }
    if cfg.lr_gamma > 1.0 {
        causes.push(format!(
            "--lr-gamma {} makes the learning rate grow",
            cfg.lr_gamma
        ));
    }
    if cfg.grad_clip == 0.0 {
        causes.push("gradient clipping is off (--grad-clip 0)".into());
    }
    if causes.is_empty() {
        "a learning rate too high for this model and data; try a lower --lr or --grad-clip".into()
    } else {
        causes.join("; ")
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
