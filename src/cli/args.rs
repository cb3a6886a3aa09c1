//! The flags of every command, as clap declares them (defaults from `crate::config`), and
//! the parse that records which `train` and `embed` flags were given explicitly.

use std::path::PathBuf;

use clap::parser::ValueSource;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};

use crate::config::{
    self, AttackChannels, AttackKind, GtmTarget, Objective, PgdConfig, RankProfile, Scenario,
};
use crate::data::{self, Dataset, DatasetKind};
use crate::error::Result;
use crate::pipeline::presets::Preset;
use crate::pipeline::train::{default_image_size, Arch, Method, TrainConfig};

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
    /// Merge every finished cell of an experiment directory into its tables and report.html,
    /// and list the cells that are missing (running, interrupted or not started).
    Report(ReportArgs),
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
    /// What the training attack may change in a grey image given as three equal channels: each
    /// channel on its own (independent) or the grey image (tied, as robrank attacks). Refused on
    /// colour images.
    #[arg(long, value_enum, default_value_t = AttackChannels::Independent)]
    pub attack_channels: AttackChannels,
    #[arg(long, default_value_t = config::ENSEMBLE_SIZE)]
    pub ensemble_size: usize,
    #[arg(long, default_value_t = config::EAT_BETA)]
    pub eat_beta: f32,
    /// EAT's data per member: leave-one-out (Algorithm 1: N parts, member i trains on all but
    /// part i) or none (every member on the whole set, the paper's Table 3). Default:
    /// leave-one-out for eat; eat-no-split and naive-ensemble always take none.
    #[arg(long, value_enum)]
    pub eat_split: Option<crate::pipeline::train::EatSplit>,
    /// The examples EAT's members train on, each made on the whole ensemble: pgd (Algorithm
    /// 1's embedding shift), act (ACT's anti-collapse attack) or hm (HM's hardness
    /// manipulation); act and hm train with the triplet loss. Default: pgd for eat; eat-act and
    /// eat-hm imply act and hm.
    #[arg(long, value_enum)]
    pub eat_inner: Option<crate::pipeline::train::EatInner>,
    #[arg(long, default_value_t = config::TRADES_LAMBDA)]
    pub trades_lambda: f32,
    #[arg(long, default_value_t = config::MIXUP_ALPHA)]
    pub mixup_alpha: f32,
    /// The metric loss: proxy-anchor (the paper's) or triplet (robrank's triplet loss on SPC-2
    /// batches: --batch-size images as --batch-size / 2 pairs of one class). Default: triplet
    /// for est, act and hm (which accept no other), proxy-anchor otherwise.
    #[arg(long, value_enum)]
    pub loss: Option<crate::pipeline::train::LossKind>,
    /// The triplet loss's margin (robrank's 0.2 for normalised embeddings).
    #[arg(long, default_value_t = config::TRIPLET_MARGIN)]
    pub triplet_margin: f32,
    /// With --method hm: add robrank's intra-class structure term (ICS, weight 0.5).
    #[arg(long)]
    pub hm_ics: bool,
    /// Stop every epoch after this many steps (0 = whole epochs).
    #[arg(long, default_value_t = 0)]
    pub max_steps: usize,
    /// Inside an epoch, also write the checkpoint every this many minutes (0: at epoch ends
    /// only), so that an interrupted long epoch resumes from where it was, not its start.
    #[arg(long, default_value_t = crate::config::CHECKPOINT_MINUTES)]
    pub checkpoint_minutes: f64,
    /// Run directory (checkpoint, log).
    #[arg(long, default_value = "runs/train")]
    pub out: PathBuf,
    /// Continue from RUN_DIR/checkpoint.safetensors, from the epoch or the step inside one it
    /// was saved at. Only --epochs (to extend the run), --workers, --max-steps and
    /// --checkpoint-minutes may differ from the run's stored settings.
    #[arg(long)]
    pub resume: bool,
    /// Replace a run that already exists in --out (its checkpoint and log are deleted).
    #[arg(long, conflicts_with = "resume")]
    pub overwrite: bool,
    /// The flags given on the command line (filled by [`parse`]), for --resume's rules.
    #[arg(skip)]
    pub explicit: Vec<String>,
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
        c.defense.attack.channels = self.attack_channels;
        c.defense.ensemble_size = self.ensemble_size;
        c.defense.eat_beta = self.eat_beta;
        if let Some(split) = self.eat_split {
            c.defense.eat_split = split;
        }
        if let Some(inner) = self.eat_inner {
            c.defense.eat_inner = inner;
        }
        c.defense.trades_lambda = self.trades_lambda;
        c.defense.mixup_alpha = self.mixup_alpha;
        c.loss = self.loss;
        c.triplet_margin = self.triplet_margin;
        c.defense.hm_ics = self.hm_ics;
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
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub batch_size: u64,
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
    /// What the attacks may change in a grey image given as three equal channels: each channel
    /// on its own (independent) or the grey image (tied, as robrank attacks). Refused on colour
    /// images.
    #[arg(long, value_enum, default_value_t = AttackChannels::Independent)]
    pub attack_channels: AttackChannels,
    /// PGD runs from uniform random starts, keeping per image the one with the largest
    /// objective; the single-run figures are reported beside them.
    #[arg(long, default_value_t = 1)]
    pub restarts: usize,
    #[arg(long, value_enum, default_value_t = Scenario::Both)]
    pub scenario: Scenario,
    /// Run an attack suite instead of PGD: `ranking` is robrank's ranking attacks and ERS.
    #[arg(long, value_enum)]
    pub suite: Option<Suite>,
    /// The ranking suite's PGD profile (rob28: eps 77/255 for 28 px images; rob224: 8/255).
    #[arg(long, value_enum, default_value_t = RankProfile::Rob28)]
    pub profile: RankProfile,
    /// Test images the ranking suite attacks, spread over the test set (0 = all); the
    /// database is always the whole test set.
    #[arg(long, default_value_t = 0)]
    pub queries: usize,
    /// GTM's target: `nearest`, the nearest item whose label differs from the top-1's (the
    /// attack as stated), or `robrank-code`, the item robrank's code picks (an index into a
    /// masked subset read from the whole database), to compare with robrank's published tables.
    #[arg(long, value_enum, default_value_t = GtmTarget::Nearest)]
    pub gtm_target: GtmTarget,
    /// What the attack maximises: the embedding shift, the metric (Proxy Anchor) loss against
    /// class-centroid proxies, the retrieval loss (towards each query's nearest other-class
    /// neighbour, away from its nearest same-class one), or all three with the worst per metric.
    #[arg(long, value_enum, default_value_t = ObjectiveChoice::Shift)]
    pub objective: ObjectiveChoice,
    /// The optimiser: PGD, or APGD (momentum, step-size halving, best-point tracking; ignores
    /// --alpha).
    #[arg(long, value_enum, default_value_t = AttackKind::Pgd)]
    pub attack: AttackKind,
    /// Make the adversarial examples on this checkpoint (the source model) and evaluate them
    /// on --checkpoint (the target): a transfer (black-box) attack, printed beside the
    /// target's white-box figures and the check that white-box is at least as strong.
    #[arg(long)]
    pub transfer_from: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ObjectiveChoice {
    Shift,
    Metric,
    Retrieval,
    All,
}

impl ObjectiveChoice {
    pub(super) fn objectives(self) -> Vec<Objective> {
        match self {
            ObjectiveChoice::Shift => vec![Objective::EmbeddingShift],
            ObjectiveChoice::Metric => vec![Objective::MetricLoss],
            ObjectiveChoice::Retrieval => vec![Objective::Retrieval],
            ObjectiveChoice::All => Objective::ALL.to_vec(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Suite {
    /// CA+, CA-, QA+, QA-, ES, TMA, LTM, GTM, GTT and ERS (docs/DESIGN.md, "The ranking-attack
    /// suite and ERS").
    Ranking,
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
    /// Replace --output if it is an existing regular file (never a link, device or an input).
    #[arg(long)]
    pub overwrite: bool,
    /// The flags given on the command line (filled by [`parse`]).
    #[arg(skip)]
    pub explicit: Vec<String>,
}

#[derive(Args, Debug, Clone)]
pub struct ExperimentArgs {
    #[arg(long, value_enum, default_value_t = Preset::Quick)]
    pub preset: Preset,
    /// Dataset (default: the preset's: fashion-mnist-embedded for quick, fashion-mnist-zero-shot
    /// for fashion-mnist, cub200 for paper, fashion-mnist (the standard split) for
    /// robrank-fashion).
    #[arg(long)]
    pub dataset: Option<String>,
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    #[arg(long, value_enum)]
    pub arch: Option<Arch>,
    #[arg(long)]
    pub pretrained: Option<PathBuf>,
    /// Comma-separated methods (default: the preset's: the six of the paper's Table 1; none, est
    /// and act for robrank-fashion).
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
    /// Training seeds, comma-separated (default: the preset's): each method is trained and
    /// evaluated once per seed, and the tables give each figure as mean ± standard deviation
    /// over them (the evaluation keeps the preset's seed). Each (method, seed) is a cell of
    /// its own: `--methods at --seeds 1` runs only that cell, and several processes may run
    /// different cells of one --out at once.
    #[arg(long, alias = "seed", value_delimiter = ',')]
    pub seeds: Vec<u64>,
    /// Run the ranking-attack suite (docs/DESIGN.md, "The ranking-attack suite and ERS") on this
    /// many test images per method, spread over the test set (0 = off); profile rob28 up to 64 px,
    /// rob224 above. robrank-fashion runs it on every test image unless this is given.
    #[arg(long)]
    pub ranking_queries: Option<usize>,
    /// What every attack (training, evaluation, ranking) may change in a grey image given as
    /// three equal channels: each channel on its own (independent) or the grey image (tied, as
    /// robrank attacks). Refused on colour images. Default: the preset's (tied for
    /// robrank-fashion).
    #[arg(long, value_enum)]
    pub attack_channels: Option<AttackChannels>,
    /// Test images (spread) attacked with every objective, worst per metric reported (0 = off;
    /// default: the preset's).
    #[arg(long)]
    pub objective_samples: Option<usize>,
    /// Test images (spread) of each defended method's transfer row from the undefended model
    /// (0 = off; default: the preset's).
    #[arg(long)]
    pub transfer_samples: Option<usize>,
    /// Run directory (default: runs/experiment-<preset>-<dataset>). Rerunning the same
    /// command resumes it.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Replace an experiment with other settings that already exists in --out.
    #[arg(long)]
    pub overwrite: bool,
}

#[derive(Args, Debug, Clone)]
pub struct ReportArgs {
    /// The experiment directory (an `experiment --out`).
    pub dir: PathBuf,
}

/// Parses the command line, recording which `train` flags were given explicitly (the rules of
/// `--resume` depend on it).
pub fn parse() -> Cli {
    // `--lr -1` should reach the validation (which names the flag), not read as a flag.
    let command = Cli::command().mut_subcommands(|sub| {
        sub.mut_args(|arg| {
            if arg.get_action().takes_values() {
                arg.allow_negative_numbers(true)
            } else {
                arg
            }
        })
    });
    let matches = command.get_matches();
    let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let Some((_, m)) = matches.subcommand() else {
        return cli;
    };
    let explicit: Vec<String> = m
        .ids()
        .filter(|id| m.value_source(id.as_str()) == Some(ValueSource::CommandLine))
        .map(|id| id.to_string())
        .collect();
    match &mut cli.command {
        Command::Train(a) => a.explicit = explicit,
        Command::Embed(a) => a.explicit = explicit,
        _ => {}
    }
    cli
}
