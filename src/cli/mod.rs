//! The command line: `train`, `eval`, `embed`, `attack` and `experiment`. Defaults come from
//! `crate::config` (one place), and `--help` shows them.

use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Serialize;

use crate::config::{self, Objective, PgdConfig};
use crate::data::{self, Dataset, DatasetKind, SyntheticConfig};
use crate::dml::evaluate::{embed_set, template_metrics, EvalSet};
use crate::dml::train::{default_image_size, Arch, Run, TrainConfig, CHECKPOINT_FILE};
use crate::engine::{Device, Rng, Tensor};
use crate::error::{Error, Result};
use crate::nn::{Checkpoint, EmbeddingNet, ForwardMode, LoadMode};
use crate::robust::defense::Method;
use crate::robust::experiment::{model_metrics, run_experiment, EvalPlan, ExperimentConfig};
use crate::robust::report::{table_markdown, MethodReport};

#[derive(Parser, Debug)]
#[command(
    name = "robust-dml",
    version,
    about = "Adversarially robust deep metric learning (EAT) on a from-scratch wgpu engine.\nThe device is chosen by ROBUST_DML_DEVICE: cpu, gpu (default), or part of an adapter name."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Train a model (or an EAT ensemble) with Proxy Anchor loss and a defense.
    Train(TrainArgs),
    /// Evaluate a checkpoint on the clean test set (Recall@k, NMI, F1, MAP@R).
    Eval(EvalArgs),
    /// Evaluate a checkpoint under a PGD attack, in the clustering and template scenarios.
    Attack(AttackArgs),
    /// Embed a tensor of images with a model (safetensors in, safetensors out).
    Embed(EmbedArgs),
    /// Train every method, attack them, and write tables and an HTML report (the paper's Table 1).
    Experiment(ExperimentArgs),
}

#[derive(Args, Debug, Clone)]
pub struct DataArgs {
    /// cub200, cars196, inshop, sop, fashion-mnist, fashion-mnist-zero-shot, imagefolder, synthetic.
    #[arg(long, default_value = "synthetic")]
    pub dataset: String,
    /// Dataset root (Fashion-MNIST defaults to /usr/share/datasets/fashion-mnist).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

impl DataArgs {
    pub fn load(&self) -> Result<Dataset> {
        let kind = DatasetKind::parse(&self.dataset)?;
        Ok(data::load(&kind, self.data_dir.as_deref())?)
    }
}

#[derive(Args, Debug, Clone)]
pub struct TrainArgs {
    #[command(flatten)]
    pub data: DataArgs,
    #[arg(long, value_enum, default_value_t = Arch::C2f2)]
    pub arch: Arch,
    /// MobileNetV2 width multiplier.
    #[arg(long, default_value_t = 1.0)]
    pub width_mult: f64,
    /// ImageNet weights (safetensors; torchvision, timm or Cadene names) for the backbone.
    #[arg(long)]
    pub pretrained: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = Method::None)]
    pub method: Method,
    #[arg(long, default_value_t = 40)]
    pub epochs: usize,
    #[arg(long, default_value_t = config::BATCH_SIZE)]
    pub batch_size: usize,
    #[arg(long, default_value_t = config::LR)]
    pub lr: f32,
    #[arg(long, default_value_t = config::WEIGHT_DECAY)]
    pub weight_decay: f32,
    /// Learning-rate multiplier of the proxies.
    #[arg(long, default_value_t = config::PROXY_LR_MULT)]
    pub proxy_lr_mult: f32,
    /// Multiply the learning rate by --lr-gamma every this many epochs.
    #[arg(long, default_value_t = config::LR_STEP_EPOCHS)]
    pub lr_step: usize,
    #[arg(long, default_value_t = config::LR_GAMMA)]
    pub lr_gamma: f32,
    /// Epochs that train only the embedding head and the proxies.
    #[arg(long, default_value_t = config::WARMUP_EPOCHS)]
    pub warmup_epochs: usize,
    /// Train BatchNorm statistics too (default: frozen statistics, trainable affine).
    #[arg(long)]
    pub bn_train: bool,
    /// Global gradient-norm clip (0 = off).
    #[arg(long, default_value_t = config::GRAD_CLIP)]
    pub grad_clip: f32,
    #[arg(long, default_value_t = config::EMBEDDING_DIM)]
    pub embedding_dim: usize,
    /// Input resolution (default: 32 for c2f2, 224 otherwise).
    #[arg(long)]
    pub image_size: Option<usize>,
    #[arg(long, default_value_t = config::SEED)]
    pub seed: u64,
    /// Image decoding threads.
    #[arg(long, default_value_t = config::WORKERS)]
    pub workers: usize,
    /// Training attack eps, in 1/255 units.
    #[arg(long, default_value_t = config::TRAIN_EPS * 255.0)]
    pub train_eps: f32,
    #[arg(long, default_value_t = config::TRAIN_STEPS)]
    pub train_steps: usize,
    #[arg(long, default_value_t = config::ENSEMBLE_SIZE)]
    pub ensemble_size: usize,
    #[arg(long, default_value_t = config::EAT_BETA)]
    pub eat_beta: f32,
    #[arg(long, default_value_t = config::TRADES_LAMBDA)]
    pub trades_lambda: f32,
    #[arg(long, default_value_t = config::MIXUP_ALPHA)]
    pub mixup_alpha: f32,
    /// Stop every epoch after this many steps (0 = whole epochs).
    #[arg(long, default_value_t = 0)]
    pub max_steps: usize,
    /// Run directory (checkpoint, log).
    #[arg(long, default_value = "runs/train")]
    pub out: PathBuf,
    /// Continue from RUN_DIR/checkpoint.safetensors.
    #[arg(long)]
    pub resume: bool,
}

impl TrainArgs {
    pub fn config(&self) -> TrainConfig {
        let mut c = TrainConfig::new(self.arch, self.method);
        c.width_mult = self.width_mult;
        c.pretrained = self.pretrained.clone();
        c.epochs = self.epochs;
        c.batch_size = self.batch_size;
        c.lr = self.lr;
        c.weight_decay = self.weight_decay;
        c.proxy_lr_mult = self.proxy_lr_mult;
        c.lr_step_epochs = self.lr_step;
        c.lr_gamma = self.lr_gamma;
        c.warmup_epochs = self.warmup_epochs;
        c.bn_freeze = !self.bn_train;
        c.grad_clip = self.grad_clip;
        c.embedding_dim = self.embedding_dim;
        c.image_size = self.image_size.unwrap_or(default_image_size(self.arch));
        c.seed = self.seed;
        c.workers = self.workers;
        c.max_steps_per_epoch = self.max_steps;
        c.defense.attack = PgdConfig::new(self.train_eps / 255.0, self.train_steps);
        c.defense.ensemble_size = self.ensemble_size;
        c.defense.eat_beta = self.eat_beta;
        c.defense.trades_lambda = self.trades_lambda;
        c.defense.mixup_alpha = self.mixup_alpha;
        c
    }
}

#[derive(Args, Debug, Clone)]
pub struct EvalArgs {
    /// A checkpoint written by `train` or `experiment` (RUN_DIR/checkpoint.safetensors).
    #[arg(long)]
    pub checkpoint: PathBuf,
    #[command(flatten)]
    pub data: DataArgs,
    /// Print the metrics as JSON.
    #[arg(long)]
    pub json: bool,
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// Every test sample perturbed; metrics on the adversarial embeddings alone.
    Clustering,
    /// Queries perturbed, gallery clean.
    Template,
    Both,
}

#[derive(Args, Debug, Clone)]
pub struct AttackArgs {
    #[command(flatten)]
    pub eval: EvalArgs,
    /// eps in 1/255 units.
    #[arg(long, default_value_t = config::EVAL_EPS * 255.0)]
    pub eps: f32,
    /// Step size in 1/255 units (default: 2.5 eps / steps).
    #[arg(long)]
    pub alpha: Option<f32>,
    #[arg(long, default_value_t = config::EVAL_STEPS)]
    pub steps: usize,
    #[arg(long)]
    pub random_start: bool,
    #[arg(long, value_enum, default_value_t = Scenario::Both)]
    pub scenario: Scenario,
}

#[derive(Args, Debug, Clone)]
pub struct EmbedArgs {
    #[arg(long, value_enum)]
    pub arch: Arch,
    /// Model weights (safetensors): a full model with `embedding.*`, or a backbone (fresh head).
    #[arg(long)]
    pub weights: PathBuf,
    /// safetensors file holding `input` [N, 3, H, W], RGB in [0, 1].
    #[arg(long)]
    pub input: PathBuf,
    /// Where to write `embedding` [N, D].
    #[arg(long)]
    pub output: PathBuf,
    #[arg(long, default_value_t = config::EMBEDDING_DIM)]
    pub embedding_dim: usize,
    #[arg(long, default_value_t = 1.0)]
    pub width_mult: f64,
    /// Images per forward pass (eval mode, so the embeddings do not depend on it); the input
    /// stays on the host and moves to the device a batch at a time.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..))]
    pub batch_size: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Preset {
    /// Built-in synthetic data, c2f2, short training: minutes on a 2-core CPU.
    Quick,
    /// The paper's settings: MobileNetV2, 200 epochs, lr 1e-4, train PGD 16/255 x10, test 8/255 x10.
    Paper,
}

#[derive(Args, Debug, Clone)]
pub struct ExperimentArgs {
    #[arg(long, value_enum, default_value_t = Preset::Quick)]
    pub preset: Preset,
    /// Dataset (default: synthetic for quick, cub200 for paper).
    #[arg(long)]
    pub dataset: Option<String>,
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    #[arg(long, value_enum)]
    pub arch: Option<Arch>,
    #[arg(long)]
    pub pretrained: Option<PathBuf>,
    /// Comma-separated methods (default: all six).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub methods: Vec<Method>,
    /// Override the preset's epochs.
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Override TRADES' lambda (weight of the embedding-distance term).
    #[arg(long)]
    pub trades_lambda: Option<f32>,
    /// Override the preset's cap on training steps per epoch (0 = whole epochs).
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Override the preset's cap on evaluated test samples, spread evenly (0 = all).
    #[arg(long)]
    pub test_samples: Option<usize>,
    /// Run directory (default: runs/experiment-<preset>-<dataset>).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// The quick preset: sized to finish in minutes on a 2-core machine without a GPU.
pub fn quick_preset() -> (ExperimentConfig, SyntheticConfig) {
    let synth = SyntheticConfig {
        num_classes: 40,
        train_per_class: 20,
        test_per_class: 10,
        // 24x24 rather than the dataset's default 32x32: c2f2 costs 0.56x as much, which is
        // what brings all six methods under 10 minutes on two cores without a GPU.
        image_size: 24,
        seed: 0,
    };
    let mut t = TrainConfig::new(Arch::C2f2, Method::None);
    t.image_size = 24;
    t.embedding_dim = 64;
    t.epochs = 4;
    t.batch_size = 40;
    t.lr = 1e-3;
    t.lr_step_epochs = 4;
    t.warmup_epochs = 0;
    t.workers = 0;
    // Bounds only large datasets (the synthetic set has 10 steps an epoch).
    t.max_steps_per_epoch = 50;
    t.defense.attack = PgdConfig::new(16.0 / 255.0, 2);
    let eval = EvalPlan {
        attack: PgdConfig::new(8.0 / 255.0, 10),
        steps_sweep: vec![1, 2, 5, 10, 20],
        eps_sweep: vec![8.0, 16.0, 32.0],
        curve_samples: 40,
        // Bounds only large datasets (Fashion-MNIST's 10,000 test images): 100 per class there.
        max_test_samples: 1000,
        batch_size: 100,
        seed: 1,
    };
    (
        ExperimentConfig {
            dataset: "synthetic".into(),
            methods: Method::ALL.to_vec(),
            train: t,
            eval,
        },
        synth,
    )
}

/// The paper's preset (Table 1): MobileNetV2, PAL, 200 epochs, lr 1e-4, PGD 16/255 x10 in
/// training, 8/255 x10 in evaluation.
pub fn paper_preset() -> ExperimentConfig {
    let mut t = TrainConfig::new(Arch::MobilenetV2, Method::None);
    t.epochs = 200;
    t.batch_size = 150;
    t.lr = 1e-4;
    t.defense.attack = PgdConfig::new(16.0 / 255.0, 10);
    let eval = EvalPlan {
        attack: PgdConfig::new(8.0 / 255.0, 10),
        steps_sweep: vec![1, 2, 5, 10, 20],
        eps_sweep: vec![8.0, 16.0, 24.0, 32.0],
        curve_samples: 1000,
        max_test_samples: 0,
        batch_size: 100,
        seed: 1,
    };
    ExperimentConfig {
        dataset: "cub200".into(),
        methods: Method::ALL.to_vec(),
        train: t,
        eval,
    }
}

fn device() -> Result<Device> {
    let d = Device::from_env()?;
    eprintln!("device: {}", d.name());
    Ok(d)
}

pub fn run(cli: Cli) -> Result<()> {
    let result = match cli.command {
        Command::Train(a) => train(a),
        Command::Eval(a) => eval(a),
        Command::Attack(a) => attack(a),
        Command::Embed(a) => embed(a),
        Command::Experiment(a) => experiment(a),
    };
    // ROBUST_DML_PROFILE=1: where the device time went, per kernel.
    if let Ok(Device::Gpu(ctx)) = Device::from_env() {
        if let Some(report) = ctx.profile_report() {
            eprintln!("{report}");
        }
    }
    result
}

fn train(a: TrainArgs) -> Result<()> {
    let device = device()?;
    let dataset = a.data.load()?;
    let ckpt = a.out.join(CHECKPOINT_FILE);
    let mut run = if a.resume {
        if !ckpt.exists() {
            return Err(Error::Config(format!(
                "--resume: no checkpoint at {}",
                ckpt.display()
            )));
        }
        let run = Run::load(&ckpt, &dataset, &device)?;
        eprintln!(
            "resuming from {} after epoch {}",
            ckpt.display(),
            run.epochs_done
        );
        run
    } else {
        Run::new(a.config(), &dataset, &device)?
    };
    run.train(&dataset, &a.out, false)?;
    let set = EvalSet::of(&dataset);
    let nets: Vec<&EmbeddingNet> = run.members.iter().map(|m| &m.net).collect();
    let emb = embed_set(
        &nets,
        &set,
        run.cfg.image_size,
        64,
        run.cfg.workers,
        &device,
        None,
    )?;
    let m = model_metrics(&emb.clean, &set, emb.dim, &device, 0)?;
    println!(
        "test: R@1 {:.2}  R@2 {:.2}  R@4 {:.2}  R@8 {:.2}  NMI {:.2}  F1 {:.2}  MAP@R {:.2}",
        m.recall[0], m.recall[1], m.recall[2], m.recall[3], m.nmi, m.f1, m.map_r
    );
    println!("checkpoint: {}", ckpt.display());
    Ok(())
}

fn load_run(path: &Path, dataset: &Dataset, device: &Device) -> Result<Run> {
    if !path.exists() {
        return Err(Error::Config(format!(
            "checkpoint {} not found",
            path.display()
        )));
    }
    Run::load(path, dataset, device)
}

#[derive(Serialize)]
struct EvalOutput {
    checkpoint: String,
    dataset: String,
    clean: crate::robust::report::Metrics,
    #[serde(skip_serializing_if = "Option::is_none")]
    pgd_clustering: Option<crate::robust::report::Metrics>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pgd_template: Option<crate::robust::report::Metrics>,
}

fn evaluate_checkpoint(e: &EvalArgs, attack: Option<(PgdConfig, Scenario)>) -> Result<()> {
    let device = device()?;
    let dataset = e.data.load()?;
    let run = load_run(&e.checkpoint, &dataset, &device)?;
    let set = EvalSet::of(&dataset);
    let nets: Vec<&EmbeddingNet> = run.members.iter().map(|m| &m.net).collect();
    let all: Vec<usize> = (0..nets.len()).collect();
    let emb = embed_set(
        &nets,
        &set,
        run.cfg.image_size,
        e.batch_size,
        run.cfg.workers,
        &device,
        attack.as_ref().map(|(c, _)| (c, all.as_slice(), 1)),
    )?;
    let metrics = |embs: &[Vec<f32>]| model_metrics(embs, &set, emb.dim, &device, 0);
    let mut out = EvalOutput {
        checkpoint: e.checkpoint.display().to_string(),
        dataset: dataset.name.clone(),
        clean: metrics(&emb.clean)?,
        pgd_clustering: None,
        pgd_template: None,
    };
    if let (Some((_, scenario)), Some(adv)) = (attack, emb.attacked.as_ref()) {
        if scenario != Scenario::Template {
            out.pgd_clustering = Some(metrics(adv)?);
        }
        if scenario != Scenario::Clustering {
            let (a, c) = if adv.len() == 1 {
                (adv[0].clone(), emb.clean[0].clone())
            } else {
                (
                    crate::robust::ensemble::mean_embedding(adv, emb.dim),
                    crate::robust::ensemble::mean_embedding(&emb.clean, emb.dim),
                )
            };
            out.pgd_template = Some(template_metrics(&a, &c, &set, emb.dim, &device)?);
        }
    }
    if e.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&out).map_err(|err| Error::Config(err.to_string()))?
        );
    } else {
        let mut r = MethodReport {
            label: run.cfg.defense.method.label().into(),
            clean: out.clean.clone(),
            ..Default::default()
        };
        r.pgd = out.pgd_clustering.clone().unwrap_or_default();
        r.pgd_template = out.pgd_template.clone().unwrap_or_default();
        println!(
            "{}",
            table_markdown(
                &[r],
                &format!("{} on {}", e.checkpoint.display(), dataset.name)
            )
        );
    }
    Ok(())
}

fn eval(a: EvalArgs) -> Result<()> {
    evaluate_checkpoint(&a, None)
}

fn attack(a: AttackArgs) -> Result<()> {
    let mut cfg = PgdConfig::new(a.eps / 255.0, a.steps);
    if let Some(alpha) = a.alpha {
        cfg.alpha = alpha / 255.0;
    }
    cfg.random_start = a.random_start;
    cfg.objective = Objective::EmbeddingShift;
    evaluate_checkpoint(&a.eval, Some((cfg, a.scenario)))
}

fn embed(a: EmbedArgs) -> Result<()> {
    let device = device()?;
    let input = Checkpoint::load(&a.input)?;
    let x = input.get("input").ok_or_else(|| {
        Error::Config(format!(
            "{}: no tensor named 'input' (expected [N, 3, H, W], RGB in [0, 1])",
            a.input.display()
        ))
    })?;
    let x: Tensor = x.to_tensor(&Device::Cpu)?;
    if x.rank() != 4 || x.shape()[1] != 3 {
        return Err(Error::Config(format!(
            "{}: 'input' has shape {:?}; expected [N, 3, H, W]",
            a.input.display(),
            x.shape()
        )));
    }
    let backbone = match a.arch {
        Arch::C2f2 => crate::nn::Backbone::C2f2 {
            input_size: (x.shape()[2], x.shape()[3]),
        },
        Arch::MobilenetV2 => crate::nn::Backbone::MobileNetV2 {
            width: a.width_mult,
        },
        Arch::BnInception => crate::nn::Backbone::BnInception,
        Arch::Resnet18 => crate::nn::Backbone::ResNet18,
        Arch::Resnet50 => crate::nn::Backbone::ResNet50,
    };
    let mut net = EmbeddingNet::new(backbone, a.embedding_dim, &device, &mut Rng::new(0))?;
    let report = net.load_weights(&a.weights, LoadMode::Strict)?;
    eprintln!("{}", report.summary());
    let n = x.shape()[0];
    let batch = a.batch_size as usize;
    let (mut values, mut dim) = (Vec::with_capacity(n * a.embedding_dim), a.embedding_dim);
    for start in (0..n).step_by(batch) {
        let rows = x.rows(start, batch.min(n - start))?.to_device(&device)?;
        let e = crate::engine::no_grad(|| net.forward(&rows, ForwardMode::Eval))?;
        dim = e.shape()[1];
        values.extend(e.to_vec()?);
    }
    let emb = Tensor::from_cpu(values, &[n, dim])?;
    let mut out = Checkpoint::new();
    out.insert("embedding", &emb)?;
    out.save(&a.output)?;
    eprintln!(
        "wrote embedding {:?} to {}",
        emb.shape(),
        a.output.display()
    );
    Ok(())
}

fn experiment(a: ExperimentArgs) -> Result<()> {
    let device = device()?;
    let (mut cfg, synth) = match a.preset {
        Preset::Quick => quick_preset(),
        Preset::Paper => (paper_preset(), SyntheticConfig::default()),
    };
    if let Some(d) = &a.dataset {
        cfg.dataset = d.clone();
    }
    if let Some(arch) = a.arch {
        cfg.train.arch = arch;
        cfg.train.image_size = default_image_size(arch);
    }
    if cfg.dataset.starts_with("fashion") && cfg.train.arch == Arch::C2f2 {
        cfg.train.image_size = 28;
    }
    cfg.train.pretrained = a.pretrained.clone();
    if let Some(e) = a.epochs {
        cfg.train.epochs = e;
    }
    if let Some(l) = a.trades_lambda {
        cfg.train.defense.trades_lambda = l;
    }
    if let Some(s) = a.max_steps {
        cfg.train.max_steps_per_epoch = s;
    }
    if let Some(t) = a.test_samples {
        cfg.eval.max_test_samples = t;
    }
    if !a.methods.is_empty() {
        cfg.methods = a.methods.clone();
    }
    let kind = match DatasetKind::parse(&cfg.dataset)? {
        DatasetKind::Synthetic(_) => DatasetKind::Synthetic(synth),
        k => k,
    };
    let dataset = data::load(&kind, a.data_dir.as_deref())?;
    let out = a.out.clone().unwrap_or_else(|| {
        PathBuf::from(format!("runs/experiment-{:?}-{}", a.preset, cfg.dataset).to_lowercase())
    });
    let reports = run_experiment(&cfg, &dataset, &device, &out)?;
    println!(
        "{}",
        table_markdown(
            &reports,
            &format!(
                "{} / {:?}: clean and PGD-{} at eps {:.0}/255",
                cfg.dataset,
                cfg.train.arch,
                cfg.eval.attack.steps,
                cfg.eval.attack.eps * 255.0
            )
        )
    );
    println!("report: {}", out.join("report.html").display());
    Ok(())
}
