//! The command line: `train`, `eval`, `embed`, `attack` and `experiment`. Defaults come from
//! `crate::config` (one place), and `--help` shows them.

use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use serde::Serialize;

use crate::config::{self, Objective, Optimizer, PgdConfig, RankProfile};
use crate::data::{self, Dataset, DatasetKind};
use crate::dml::loss::ProxyAnchorConfig;
use crate::engine::{Device, Rng, Tensor};
use crate::error::{Error, Result};
use crate::nn::{Checkpoint, EmbeddingNet, ForwardMode, LoadMode};
use crate::pipeline::evaluate::{embed_set, template_metrics, EvalSet};
use crate::pipeline::experiment::{claim_experiment_dir, model_metrics, run_experiment};
use crate::pipeline::presets::Preset;
use crate::pipeline::progress::Progress;
use crate::pipeline::ranking::{ranking_markdown, run_ranking_suite, RankingPlan};
use crate::pipeline::report::table_markdown;
use crate::pipeline::run_dir::{check_output_path, RunDir};
use crate::pipeline::sanity::transfer_check;
use crate::pipeline::strength::{
    attack_set, scenario_metrics, worst_of, AttackRow, AttackSource, TransferReport,
};
use crate::pipeline::tables::{eval_table, strength_table, EvalOutput, StrengthOutput};
use crate::pipeline::train::{
    default_image_size, Arch, Run, TrainConfig, CHECKPOINT_FILE, LOG_FILE,
};
use crate::robust::defense::Method;

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
    /// Continue from RUN_DIR/checkpoint.safetensors. Only --epochs (to extend the run),
    /// --workers and --max-steps may differ from the run's stored settings.
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
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub batch_size: u64,
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
    /// What the attack maximises: the embedding shift, the metric (Proxy Anchor) loss against
    /// class-centroid proxies, the retrieval loss (towards each query's nearest other-class
    /// neighbour, away from its nearest same-class one), or all three with the worst per metric.
    #[arg(long, value_enum, default_value_t = ObjectiveChoice::Shift)]
    pub objective: ObjectiveChoice,
    /// The optimiser: PGD, or APGD (momentum, step-size halving, best-point tracking; ignores
    /// --alpha).
    #[arg(long, value_enum, default_value_t = Optimizer::Pgd)]
    pub attack: Optimizer,
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
    fn objectives(self) -> Vec<Objective> {
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
    /// CA+, CA-, QA+, QA-, ES, TMA, LTM, GTM, GTT and ERS (SPEC section 11).
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
    /// for fashion-mnist, cub200 for paper).
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
    /// Override the training seed (the evaluation keeps the preset's): a second seed shows how
    /// much of a gap between methods is training noise.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Run the ranking-attack suite (SPEC section 11) on this many test images per method,
    /// spread over the test set (0 = off); profile rob28 up to 64 px, rob224 above.
    #[arg(long)]
    pub ranking_queries: Option<usize>,
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

fn device() -> Result<Device> {
    let d = Device::from_env()?;
    eprintln!("device: {}", d.name());
    Ok(d)
}

pub fn run(cli: Cli) -> Result<()> {
    crate::engine::cpu::configure_threads()?;
    let result = match cli.command {
        Command::Train(a) => train(a),
        Command::Eval(a) => eval(a),
        Command::Attack(a) => attack(a),
        Command::Embed(a) => embed(a),
        Command::Experiment(a) => experiment(a),
    };
    // ROBUST_DML_PROFILE=1: where the device time went, per kernel.
    if let Some(report) = Device::from_env().ok().and_then(|d| d.profile_report()) {
        eprintln!("{report}");
    }
    result
}

/// Gives Mesa's Vulkan loader a private runtime directory when `XDG_RUNTIME_DIR` is unset or
/// unusable (as `.ci/run` does). Call before any thread starts.
pub fn ensure_runtime_dir() {
    let usable = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .is_some_and(|d| d.is_absolute() && d.is_dir());
    if usable {
        return;
    }
    let dir = std::env::temp_dir().join(format!("robust-dml-xdg-{}", current_uid()));
    if std::fs::create_dir_all(&dir).is_ok() {
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700));
        }
        // Safe here: called first thing in main, before any other thread exists.
        std::env::set_var("XDG_RUNTIME_DIR", &dir);
    }
}

fn current_uid() -> u32 {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if let Ok(m) = std::fs::metadata("/proc/self") {
            return m.uid();
        }
    }
    0
}

/// The train flags that may differ from the stored run on `--resume`.
const CHANGEABLE_ON_RESUME: &[&str] = &["epochs", "workers", "max_steps"];
/// Flags that say where the run is, not how it trains.
const RUN_LOCATION_FLAGS: &[&str] = &["dataset", "data_dir", "out", "resume", "overwrite"];

/// A train flag's value in a configuration, as the command line spells it.
fn flag_value(c: &TrainConfig, flag: &str) -> Option<String> {
    Some(match flag {
        "arch" => serde_name(&c.arch),
        "method" => serde_name(&c.defense.method),
        "width_mult" => c.width_mult.to_string(),
        "pretrained" => c
            .pretrained
            .as_ref()
            .map_or("none".into(), |p| p.display().to_string()),
        "epochs" => c.epochs.to_string(),
        "batch_size" => c.batch_size.to_string(),
        "lr" => c.lr.to_string(),
        "weight_decay" => c.weight_decay.to_string(),
        "proxy_lr_mult" => c.proxy_lr_mult.to_string(),
        "lr_step" => c.lr_step_epochs.to_string(),
        "lr_gamma" => c.lr_gamma.to_string(),
        "warmup_epochs" => c.warmup_epochs.to_string(),
        "bn_train" => (!c.bn_freeze).to_string(),
        "grad_clip" => c.grad_clip.to_string(),
        "embedding_dim" => c.embedding_dim.to_string(),
        "image_size" => c.image_size.to_string(),
        "seed" => c.seed.to_string(),
        "workers" => c.workers.to_string(),
        "train_eps" => (c.defense.attack.eps * 255.0).to_string(),
        "train_steps" => c.defense.attack.steps.to_string(),
        "ensemble_size" => c.defense.ensemble_size.to_string(),
        "eat_beta" => c.defense.eat_beta.to_string(),
        "trades_lambda" => c.defense.trades_lambda.to_string(),
        "mixup_alpha" => c.defense.mixup_alpha.to_string(),
        "max_steps" => c.max_steps_per_epoch.to_string(),
        _ => return None,
    })
}

/// A value's serde name (`c2f2`, `mobilenet-v2`, `eat`).
fn serde_name<T: Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

fn flag_name(id: &str) -> String {
    format!("--{}", id.replace('_', "-"))
}

/// Applies the flags that may change on `--resume` and refuses those that may not, naming
/// each with the run's stored value.
fn apply_resume_flags(run: &mut Run, a: &TrainArgs, out: &Path) -> Result<()> {
    let requested = a.config();
    let mut refused = Vec::new();
    for id in &a.explicit {
        if CHANGEABLE_ON_RESUME.contains(&id.as_str()) || RUN_LOCATION_FLAGS.contains(&id.as_str())
        {
            continue;
        }
        let (Some(stored), Some(wanted)) = (flag_value(&run.cfg, id), flag_value(&requested, id))
        else {
            continue;
        };
        if stored != wanted {
            refused.push(format!("{} {wanted} (the run has {stored})", flag_name(id)));
        }
    }
    if !refused.is_empty() {
        return Err(Error::Config(format!(
            "--resume continues the run in {} with its stored settings; these flags differ and \
             cannot change: {}. Drop them, or start a new run with another --out (or \
             --overwrite). Only {} may change on resume",
            out.display(),
            refused.join(", "),
            CHANGEABLE_ON_RESUME
                .iter()
                .map(|f| flag_name(f))
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let given = |id: &str| a.explicit.iter().any(|e| e == id);
    if given("epochs") {
        if a.epochs < run.epochs_done {
            return Err(Error::Config(format!(
                "--epochs {}: the run in {} has already trained {} epochs; pass --epochs {} or more",
                a.epochs,
                out.display(),
                run.epochs_done,
                run.epochs_done
            )));
        }
        run.cfg.epochs = a.epochs;
    }
    if given("workers") {
        run.cfg.workers = a.workers;
    }
    if given("max_steps") {
        run.cfg.max_steps_per_epoch = a.max_steps;
    }
    if run.epochs_done >= run.cfg.epochs {
        eprintln!(
            "note: the run already finished its {} epochs; pass --epochs N (N > {}) to train further",
            run.cfg.epochs, run.cfg.epochs
        );
    }
    Ok(())
}

/// The dataset of a resumed run: the stored one unless --dataset names it (another is refused).
fn resume_data_args(a: &TrainArgs, ck: &Checkpoint) -> Result<DataArgs> {
    let stored = ck.meta("dataset").map(str::to_string);
    let given = |id: &str| a.explicit.iter().any(|e| e == id);
    let mut data = a.data.clone();
    if let Some(stored) = stored {
        if given("dataset") {
            let wanted = DatasetKind::parse(&a.data.dataset)?.to_string();
            if wanted != stored {
                return Err(Error::Config(format!(
                    "--resume: --dataset {} differs from the run's dataset {stored}; a run \
                     continues on the data it started on",
                    a.data.dataset
                )));
            }
        } else {
            data.dataset = stored;
        }
        if !given("data_dir") {
            data.data_dir = ck.meta("data_dir").map(PathBuf::from).or(data.data_dir);
        }
    }
    Ok(data)
}

/// Refuses to replace a run that exists in `out` unless --overwrite is given; with it, the
/// old checkpoint and log are deleted.
fn claim_run_dir(out: &Path, overwrite: bool) -> Result<()> {
    let files = [out.join(CHECKPOINT_FILE), out.join(LOG_FILE)];
    for f in &files {
        crate::pipeline::run_dir::check_writable(f)?;
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
            std::fs::remove_file(f).map_err(crate::error::io_err(f))?;
        }
    }
    Ok(())
}

fn train(a: TrainArgs) -> Result<()> {
    // The device first: a missing adapter is found before the run directory is touched.
    let device = device()?;
    let run_dir = RunDir::lock(&a.out)?;
    let ckpt = a.out.join(CHECKPOINT_FILE);
    let (mut run, dataset) = if a.resume {
        if !ckpt.is_file() {
            return Err(Error::Config(format!(
                "--resume: no checkpoint at {}; start the run without --resume",
                ckpt.display()
            )));
        }
        let ck = Checkpoint::load(&ckpt)?;
        let data = resume_data_args(&a, &ck)?;
        let dataset = data.load()?;
        let mut run = Run::from_checkpoint(&ck, &dataset, &device)?;
        run.data_dir = data.data_dir.clone();
        apply_resume_flags(&mut run, &a, &a.out)?;
        eprintln!(
            "resuming from {} after epoch {}",
            ckpt.display(),
            run.epochs_done
        );
        (run, dataset)
    } else {
        claim_run_dir(&a.out, a.overwrite)?;
        let dataset = a.data.load()?;
        let mut run = Run::new(a.config(), &dataset, &device)?;
        run.data_dir = a.data.data_dir.clone();
        (run, dataset)
    };
    run.train(&dataset, run_dir.path(), false)?;
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
    if path.is_dir() {
        return Err(Error::Config(format!(
            "--checkpoint {} is a directory; pass the checkpoint file inside it ({})",
            path.display(),
            path.join(CHECKPOINT_FILE).display()
        )));
    }
    if !path.exists() {
        return Err(Error::Config(format!(
            "checkpoint {} not found",
            path.display()
        )));
    }
    Run::load(path, dataset, device)
}

fn evaluate_checkpoint(e: &EvalArgs, attack: Option<(PgdConfig, Scenario)>) -> Result<()> {
    let device = device()?;
    let dataset = e.data.load()?;
    let run = load_run(&e.checkpoint, &dataset, &device)?;
    let set = EvalSet::of(&dataset);
    let nets: Vec<&EmbeddingNet> = run.members.iter().map(|m| &m.net).collect();
    let all: Vec<usize> = (0..nets.len()).collect();
    let start = std::time::Instant::now();
    let emb = embed_set(
        &nets,
        &set,
        run.cfg.image_size,
        e.batch_size as usize,
        run.cfg.workers,
        &device,
        attack.as_ref().map(|(c, _)| (c, all.as_slice(), 1)),
    )?;
    let seconds = start.elapsed().as_secs_f64();
    let metrics = |embs: &[Vec<f32>]| model_metrics(embs, &set, emb.dim, &device, 0);
    let mut out = EvalOutput {
        checkpoint: e.checkpoint.display().to_string(),
        dataset: dataset.name.clone(),
        clean: metrics(&emb.clean)?,
        pgd_clustering: None,
        pgd_template: None,
        attack: attack.map(|(c, _)| c),
        seconds,
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
            out.pgd_template = Some((&template_metrics(&a, &c, &set, emb.dim, &device)?).into());
        }
    }
    if e.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&out).map_err(|err| Error::Config(err.to_string()))?
        );
    } else {
        println!("{}", eval_table(&out, run.cfg.defense.method.label()));
    }
    Ok(())
}

fn eval(a: EvalArgs) -> Result<()> {
    evaluate_checkpoint(&a, None)
}

fn attack(a: AttackArgs) -> Result<()> {
    if a.suite == Some(Suite::Ranking) {
        return ranking_suite(&a);
    }
    let mut cfg = PgdConfig::new(a.eps / 255.0, a.steps);
    if let Some(alpha) = a.alpha {
        cfg.alpha = alpha / 255.0;
    }
    cfg.random_start = a.random_start;
    cfg.objective = Objective::EmbeddingShift;
    cfg.validate("--eps", "--steps").map_err(Error::Config)?;
    if !(1..=config::MAX_RESTARTS).contains(&a.restarts) {
        return Err(Error::Config(format!(
            "--restarts {} is not valid: between 1 and {} PGD runs",
            a.restarts,
            config::MAX_RESTARTS
        )));
    }
    let plain = a.objective == ObjectiveChoice::Shift
        && a.attack == Optimizer::Pgd
        && a.transfer_from.is_none();
    if !plain {
        cfg.optimizer = a.attack;
        cfg.restarts = a.restarts;
        return attack_strength(&a, &cfg);
    }
    evaluate_checkpoint(&a.eval, Some((cfg, a.scenario)))?;
    if a.restarts > 1 {
        cfg.restarts = a.restarts;
        evaluate_checkpoint(&a.eval, Some((cfg, a.scenario)))?;
    }
    Ok(())
}

/// `attack` with --objective other than shift, --attack apgd or --transfer-from: every
/// requested objective white-box, the worst per metric, and the transfer rows with their
/// check. Table rows give each attack's parameters and wall time.
fn attack_strength(a: &AttackArgs, cfg: &PgdConfig) -> Result<()> {
    let e = &a.eval;
    let device = device()?;
    let dataset = e.data.load()?;
    let run = load_run(&e.checkpoint, &dataset, &device)?;
    let set = EvalSet::of(&dataset);
    let nets: Vec<&EmbeddingNet> = run.members.iter().map(|m| &m.net).collect();
    let batch = e.batch_size as usize;
    let size = run.cfg.image_size;
    let embed = |nets: &[&EmbeddingNet], workers: usize| {
        embed_set(nets, &set, size, batch, workers, &device, None).map(|e| e.clean)
    };
    let clean = embed(&nets, run.cfg.workers)?;
    let dim = run.cfg.embedding_dim;
    let loss_of = |r: &Run| ProxyAnchorConfig {
        alpha: r.cfg.pa_alpha,
        delta: r.cfg.pa_delta,
    };
    let rows_through = |source: &AttackSource| -> Result<Vec<AttackRow>> {
        a.objective
            .objectives()
            .into_iter()
            .map(|objective| {
                let c = PgdConfig { objective, ..*cfg };
                let r = attack_set(
                    &nets,
                    source,
                    &set,
                    size,
                    batch,
                    run.cfg.workers,
                    &device,
                    &c,
                    1,
                )?;
                let (clustering, template) =
                    scenario_metrics(&clean, &r.attacked, &set, dim, &device, 0)?;
                Ok(AttackRow {
                    objective: Some(objective),
                    attack: Some(c),
                    clustering,
                    template,
                    seconds: r.seconds,
                })
            })
            .collect()
    };
    let white_box = rows_through(&AttackSource {
        nets: &nets,
        clean: &clean,
        loss: loss_of(&run),
    })?;
    let mut out = StrengthOutput {
        checkpoint: e.checkpoint.display().to_string(),
        dataset: dataset.name.clone(),
        clean: model_metrics(&clean, &set, dim, &device, 0)?,
        worst: if white_box.len() > 1 {
            worst_of(&white_box)
        } else {
            Vec::new()
        },
        white_box,
        transfer_from: None,
        transfer: Vec::new(),
        checks: Vec::new(),
    };
    if let Some(path) = &a.transfer_from {
        let source = load_run(path, &dataset, &device)?;
        if source.cfg.image_size != size || source.cfg.embedding_dim != dim {
            return Err(Error::Config(format!(
                "--transfer-from {} takes {} px images and embeds in {} dimensions, the target \
                 {} takes {size} px and embeds in {dim}: transfer needs the same input size \
                 (pass a source trained at {size} px)",
                path.display(),
                source.cfg.image_size,
                source.cfg.embedding_dim,
                e.checkpoint.display()
            )));
        }
        let source_nets: Vec<&EmbeddingNet> = source.members.iter().map(|m| &m.net).collect();
        let source_clean = embed(&source_nets, source.cfg.workers)?;
        out.transfer = rows_through(&AttackSource {
            nets: &source_nets,
            clean: &source_clean,
            loss: loss_of(&source),
        })?;
        out.transfer_from = Some(path.display().to_string());
        for (t, w) in out.transfer.iter().zip(&out.white_box) {
            let mut check = transfer_check(&TransferReport {
                source: path.display().to_string(),
                samples: set.samples.len(),
                transfer: t.clone(),
                white_box: w.clone(),
            });
            check.name += &format!(" ({})", t.objective.map_or("", |o| o.key()));
            out.checks.push(check);
        }
    }
    if e.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&out).map_err(|err| Error::Config(err.to_string()))?
        );
    } else {
        println!("{}", strength_table(&out, run.cfg.defense.method.label()));
    }
    for c in out.checks.iter().filter(|c| !c.passed) {
        eprintln!("SANITY FAIL {}: {}", c.name, c.detail);
    }
    Ok(())
}

/// `attack --suite ranking`: the ranking attacks on the checkpoint's model (an ensemble
/// through its mean embedding), as a table or JSON.
fn ranking_suite(a: &AttackArgs) -> Result<()> {
    let e = &a.eval;
    let device = device()?;
    let dataset = e.data.load()?;
    let run = load_run(&e.checkpoint, &dataset, &device)?;
    let set = EvalSet::of(&dataset);
    let nets: Vec<&EmbeddingNet> = run.members.iter().map(|m| &m.net).collect();
    let plan = RankingPlan {
        profile: a.profile,
        queries: a.queries,
    };
    let report = run_ranking_suite(
        &nets,
        &set,
        run.cfg.image_size,
        e.batch_size as usize,
        run.cfg.workers,
        &device,
        &plan,
        1,
    )?;
    if e.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).map_err(|err| Error::Config(err.to_string()))?
        );
    } else {
        let label = format!(
            "{} ({} on {})",
            run.cfg.defense.method.label(),
            e.checkpoint.display(),
            dataset.name
        );
        println!("{}", ranking_markdown(&label, &report));
    }
    Ok(())
}

/// The `input` tensor of `embed`: [N, 3, H, W] with N, H, W > 0 and finite values.
fn embed_input(path: &Path) -> Result<Tensor> {
    let input = Checkpoint::load(path)?;
    let x = input.get("input").ok_or_else(|| {
        Error::Config(format!(
            "{}: no tensor named 'input' (expected [N, 3, H, W], RGB in [0, 1])",
            path.display()
        ))
    })?;
    let s = &x.shape;
    if s.len() != 4 || s[1] != 3 || s[0] == 0 || s[2] == 0 || s[3] == 0 {
        return Err(Error::Config(format!(
            "{}: 'input' has shape {s:?}; expected [N, 3, H, W] with N, H and W at least 1",
            path.display()
        )));
    }
    if let Some(i) = x.data.iter().position(|v| !v.is_finite()) {
        return Err(Error::Config(format!(
            "{}: 'input' holds {} at index {i}; images must be finite RGB values in [0, 1]",
            path.display(),
            x.data[i]
        )));
    }
    if x.data.iter().any(|v| !(0.0..=1.0).contains(v)) {
        eprintln!(
            "warning: {}: 'input' has values outside [0, 1]; the models expect RGB in [0, 1]",
            path.display()
        );
    }
    Ok(x.to_tensor(&Device::Cpu)?)
}

/// The network `embed` runs: from a model weights file, or from member 0 of a training
/// checkpoint (whose stored settings then decide the architecture).
fn embed_net(a: &EmbedArgs, hw: (usize, usize), device: &Device) -> Result<EmbeddingNet> {
    // Model weights files may hold tensors a checkpoint does not (torchvision's I64
    // `num_batches_tracked`); only a file that reads as a checkpoint can be a training one.
    let member0 = format!("{}/model", crate::pipeline::train::member_prefix(0));
    let net = match Checkpoint::load(&a.weights) {
        Ok(ck) if ck.meta("config").is_some() && !ck.group(&member0).is_empty() => {
            checkpoint_net(a, &ck, &member0, hw, device)?
        }
        _ => weights_net(a, hw, device)?,
    };
    check_net_finite(&net, &a.weights)?;
    Ok(net)
}

/// Refuses weights holding NaN or infinite values: their embeddings would be meaningless.
fn check_net_finite(net: &EmbeddingNet, path: &Path) -> Result<()> {
    for (name, t, _) in net.params().iter() {
        if let Some(&value) = t.to_vec()?.iter().find(|v| !v.is_finite()) {
            return Err(Error::NonFiniteState {
                what: format!("weights file {}", path.display()),
                tensor: name.to_string(),
                value,
                when: String::new(),
                consequence: "its embeddings would be meaningless, so nothing was computed".into(),
                cause: "the file was written from a diverged model or is damaged".into(),
            });
        }
    }
    Ok(())
}

fn weights_net(a: &EmbedArgs, hw: (usize, usize), device: &Device) -> Result<EmbeddingNet> {
    // The same checks as training's: flag values, the model's smallest input, memory.
    let mut c = TrainConfig::new(a.arch, Method::None);
    c.embedding_dim = a.embedding_dim;
    c.width_mult = a.width_mult;
    c.batch_size = a.batch_size as usize;
    c.image_size = hw.0.min(hw.1);
    c.validate()
        .map_err(|e| Error::Config(e.to_string().replace("--image-size", "an input of size")))?;
    c.image_size = hw.0.max(hw.1);
    c.check_memory(0, c.batch_size)?;
    let backbone = match a.arch {
        Arch::C2f2 => crate::nn::Backbone::C2f2 { input_size: hw },
        Arch::MobilenetV2 => crate::nn::Backbone::MobileNetV2 {
            width: a.width_mult,
        },
        Arch::BnInception => crate::nn::Backbone::BnInception,
        Arch::Resnet18 => crate::nn::Backbone::ResNet18,
        Arch::Resnet50 => crate::nn::Backbone::ResNet50,
    };
    let mut net = EmbeddingNet::new(backbone, a.embedding_dim, device, &mut Rng::new(0))?;
    let report = net.load_weights(&a.weights, LoadMode::Strict)?;
    eprintln!("{}", report.summary());
    Ok(net)
}

/// Member 0 of a training checkpoint, refusing flags that contradict its stored settings.
fn checkpoint_net(
    a: &EmbedArgs,
    ck: &Checkpoint,
    prefix: &str,
    hw: (usize, usize),
    device: &Device,
) -> Result<EmbeddingNet> {
    let cfg = Run::config_of(ck)?;
    let given = |id: &str| a.explicit.iter().any(|e| e == id);
    let path = a.weights.display();
    let mut conflicts = Vec::new();
    if a.arch != cfg.arch {
        conflicts.push(format!(
            "--arch {} (it has {})",
            serde_name(&a.arch),
            serde_name(&cfg.arch)
        ));
    }
    if given("embedding_dim") && a.embedding_dim != cfg.embedding_dim {
        conflicts.push(format!(
            "--embedding-dim {} (it has {})",
            a.embedding_dim, cfg.embedding_dim
        ));
    }
    if given("width_mult") && a.width_mult != cfg.width_mult {
        conflicts.push(format!(
            "--width-mult {} (it has {})",
            a.width_mult, cfg.width_mult
        ));
    }
    if cfg.arch == Arch::C2f2 && hw != (cfg.image_size, cfg.image_size) {
        conflicts.push(format!(
            "an input of {}x{} (its c2f2 takes {}x{} images)",
            hw.0, hw.1, cfg.image_size, cfg.image_size
        ));
    }
    if !conflicts.is_empty() {
        return Err(Error::Config(format!(
            "{path} is a training checkpoint (written by `train`); its model is used as stored, \
             and these differ from it: {}",
            conflicts.join(", ")
        )));
    }
    let backbone = match cfg.arch {
        Arch::C2f2 => crate::nn::Backbone::C2f2 { input_size: hw },
        _ => cfg.backbone(),
    };
    let mut net = EmbeddingNet::new(backbone, cfg.embedding_dim, device, &mut Rng::new(0))?;
    net.load_from(ck, prefix)?;
    eprintln!(
        "{path} is a training checkpoint: embedding with its model{}",
        if cfg.members() > 1 {
            format!(" (member 1 of the {}-model ensemble)", cfg.members())
        } else {
            String::new()
        }
    );
    Ok(net)
}

fn embed(a: EmbedArgs) -> Result<()> {
    check_output_path(&a.output, &[&a.weights, &a.input], a.overwrite)?;
    let device = device()?;
    let x = embed_input(&a.input)?;
    let net = embed_net(&a, (x.shape()[2], x.shape()[3]), &device)?;
    let n = x.shape()[0];
    let batch = a.batch_size.min(n as u64) as usize;
    let (mut values, mut dim) = (Vec::new(), a.embedding_dim);
    let bar = Progress::new("embed", n as u64, "img", false);
    for start in (0..n).step_by(batch) {
        let count = batch.min(n - start);
        let rows = x.rows(start, count)?.to_device(&device)?;
        let e = crate::engine::no_grad(|| net.forward(&rows, ForwardMode::Eval))?;
        dim = e.shape()[1];
        values.extend(e.to_vec()?);
        bar.inc(count as u64);
    }
    bar.finish("");
    if values.iter().any(|v| !v.is_finite()) {
        return Err(Error::Config(format!(
            "the embeddings of {} are not finite; nothing was written to {}",
            a.input.display(),
            a.output.display()
        )));
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
    let (mut cfg, synth) = a.preset.config();
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
    if let Some(seed) = a.seed {
        cfg.train.seed = seed;
    }
    if let Some(q) = a.ranking_queries {
        cfg.eval.ranking = (q > 0).then(|| RankingPlan {
            profile: RankProfile::for_image_size(cfg.train.image_size),
            queries: q,
        });
    }
    if let Some(n) = a.objective_samples {
        cfg.eval.strength.objective_samples = n;
    }
    if let Some(n) = a.transfer_samples {
        cfg.eval.strength.transfer_samples = n;
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
        PathBuf::from(format!("runs/experiment-{}-{}", a.preset.key(), cfg.dataset).to_lowercase())
    });
    cfg.validate()?;
    let _lock = RunDir::lock(&out)?;
    claim_experiment_dir(&cfg, &out, a.overwrite)?;
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
