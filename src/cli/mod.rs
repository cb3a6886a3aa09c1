//! The command line: `train`, `eval`, `embed`, `attack` and `experiment`. Defaults come from
//! `crate::config` (one place), and `--help` shows them. It only parses and validates the
//! flags, turns them into the pipeline's requests, calls the pipeline and prints the result.

use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};

use crate::config::{self, AttackKind, Objective, PgdConfig, RankProfile, Scenario};
use crate::data::{self, Dataset, DatasetKind};
use crate::engine::Device;
use crate::error::{Error, Result};
use crate::nn::Checkpoint;
use crate::pipeline::commands::{
    attack_strength, evaluate_checkpoint, rank_checkpoint, test_metrics, EvalRequest,
    RankingRequest, StrengthRequest,
};
use crate::pipeline::embed::{embed as embed_images, EmbedRequest};
use crate::pipeline::experiment::{claim_experiment_dir, run_experiment};
use crate::pipeline::presets::Preset;
use crate::pipeline::ranking::RankingPlan;
use crate::pipeline::run_dir::RunDir;
use crate::pipeline::tables::{eval_table, ranking_markdown, strength_table, table_markdown};
use crate::pipeline::train::{
    claim_run_dir, default_image_size, serde_name, Arch, Method, Run, TrainConfig, CHECKPOINT_FILE,
};

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
    /// Run the ranking-attack suite (docs/DESIGN.md, "The ranking-attack suite and ERS") on this
    /// many test images per method, spread over the test set (0 = off); profile rob28 up to 64 px,
    /// rob224 above.
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
    let m = test_metrics(&run, &dataset, &device)?;
    println!(
        "test: R@1 {:.2}  R@2 {:.2}  R@4 {:.2}  R@8 {:.2}  NMI {:.2}  F1 {:.2}  MAP@R {:.2}",
        m.recall[0], m.recall[1], m.recall[2], m.recall[3], m.nmi, m.f1, m.map_r
    );
    println!("checkpoint: {}", ckpt.display());
    Ok(())
}

/// `eval`, or `attack` with one PGD embedding-shift attack: the table or the JSON.
fn evaluate(e: &EvalArgs, attack: Option<(PgdConfig, Scenario)>) -> Result<()> {
    let device = device()?;
    let dataset = e.data.load()?;
    let req = EvalRequest {
        checkpoint: &e.checkpoint,
        batch_size: e.batch_size as usize,
        attack,
    };
    let measured = evaluate_checkpoint(&req, &dataset, &device)?;
    if e.json {
        println!("{}", to_json(&measured.output)?);
    } else {
        println!("{}", eval_table(&measured.output, measured.method.label()));
    }
    Ok(())
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<String> {
    serde_json::to_string_pretty(value).map_err(|err| Error::Config(err.to_string()))
}

fn eval(a: EvalArgs) -> Result<()> {
    evaluate(&a, None)
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
        && a.attack == AttackKind::Pgd
        && a.transfer_from.is_none();
    if !plain {
        cfg.kind = a.attack;
        cfg.restarts = a.restarts;
        return strength(&a, cfg);
    }
    evaluate(&a.eval, Some((cfg, a.scenario)))?;
    if a.restarts > 1 {
        cfg.restarts = a.restarts;
        evaluate(&a.eval, Some((cfg, a.scenario)))?;
    }
    Ok(())
}

/// `attack` with --objective other than shift, --attack apgd or --transfer-from: the
/// strength table (or JSON), then a line on stderr per failed transfer check.
fn strength(a: &AttackArgs, attack: PgdConfig) -> Result<()> {
    let e = &a.eval;
    let device = device()?;
    let dataset = e.data.load()?;
    let req = StrengthRequest {
        checkpoint: &e.checkpoint,
        transfer_from: a.transfer_from.as_deref(),
        objectives: a.objective.objectives(),
        attack,
        scenario: a.scenario,
        batch_size: e.batch_size as usize,
    };
    let measured = attack_strength(&req, &dataset, &device)?;
    let out = &measured.output;
    if e.json {
        println!("{}", to_json(out)?);
    } else {
        println!("{}", strength_table(out, measured.method.label()));
    }
    for c in out.checks.iter().filter(|c| !c.passed) {
        eprintln!("SANITY FAIL {}: {}", c.name, c.detail);
    }
    Ok(())
}

/// `attack --suite ranking`: the ranking attacks' table or JSON.
fn ranking_suite(a: &AttackArgs) -> Result<()> {
    let e = &a.eval;
    let device = device()?;
    let dataset = e.data.load()?;
    let req = RankingRequest {
        checkpoint: &e.checkpoint,
        batch_size: e.batch_size as usize,
        plan: RankingPlan {
            profile: a.profile,
            queries: a.queries,
        },
    };
    let measured = rank_checkpoint(&req, &dataset, &device)?;
    if e.json {
        println!("{}", to_json(&measured.output)?);
    } else {
        let label = format!(
            "{} ({} on {})",
            measured.method.label(),
            e.checkpoint.display(),
            dataset.name
        );
        println!("{}", ranking_markdown(&label, &measured.output));
    }
    Ok(())
}

fn embed(a: EmbedArgs) -> Result<()> {
    let given = |id: &str| a.explicit.iter().any(|e| e == id);
    let req = EmbedRequest {
        arch: a.arch,
        embedding_dim_given: given("embedding_dim"),
        width_mult_given: given("width_mult"),
        weights: a.weights,
        input: a.input,
        output: a.output,
        embedding_dim: a.embedding_dim,
        width_mult: a.width_mult,
        batch_size: usize::try_from(a.batch_size).unwrap_or(usize::MAX),
        overwrite: a.overwrite,
    };
    // The output first: a refused one is reported before the device is opened.
    req.check_output()?;
    let device = device()?;
    let shape = embed_images(&req, &device)?;
    eprintln!("wrote embedding {shape:?} to {}", req.output.display());
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
