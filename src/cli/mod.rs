//! The command line: `train`, `eval`, `embed`, `attack`, `experiment` and `report`. Defaults come from
//! `crate::config` (one place), and `--help` shows them. It only parses and validates the
//! flags, turns them into the pipeline's requests, calls the pipeline and prints the result.

mod args;
mod resume;

pub use args::*;
use resume::{apply_resume_flags, resume_data_args};

use std::path::PathBuf;

use crate::config::{self, AttackKind, GtmTarget, Objective, PgdConfig, RankProfile, Scenario};
use crate::data::{self, DatasetKind};
use crate::engine::Device;
use crate::error::{Error, Result};
use crate::nn::Checkpoint;
use crate::pipeline::cells::Merged;
use crate::pipeline::commands::{
    attack_strength, evaluate_checkpoint, rank_checkpoint, test_metrics, EvalRequest,
    RankingRequest, StrengthRequest,
};
use crate::pipeline::embed::{embed as embed_images, EmbedRequest};
use crate::pipeline::experiment::{claim_experiment_dir, report_experiment, run_experiment};
use crate::pipeline::ranking::RankingPlan;
use crate::pipeline::run_dir::RunDir;
use crate::pipeline::tables::{
    eval_table, ranking_markdown, strength_table, table_markdown, threats_markdown,
};
use crate::pipeline::train::{
    claim_run_dir, default_image_size, Arch, MidEpochSaves, Run, CHECKPOINT_FILE,
};

fn device() -> Result<Device> {
    let d = Device::from_env()?;
    eprintln!("device: {}", d.name());
    Ok(d)
}

pub fn run(cli: Cli) -> Result<()> {
    crate::engine::cpu::configure_threads()?;
    crate::pipeline::interrupt::enable();
    crate::engine::cpu::in_pool(|| run_command(cli))
}

fn run_command(cli: Cli) -> Result<()> {
    let result = match cli.command {
        Command::Train(a) => train(a),
        Command::Eval(a) => eval(a),
        Command::Attack(a) => attack(a),
        Command::Embed(a) => embed(a),
        Command::Experiment(a) => experiment(a),
        // Reads the cells' reports only: no device is opened.
        Command::Report(a) => return report(a),
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

fn train(a: TrainArgs) -> Result<()> {
    // Flags and the device first: a bad value or a missing adapter is found before the run
    // directory is touched.
    let saves = MidEpochSaves::every_minutes(a.checkpoint_minutes)?;
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
        eprintln!("resuming from {}: {}", ckpt.display(), run.position());
        (run, dataset)
    } else {
        claim_run_dir(&a.out, a.overwrite)?;
        let dataset = a.data.load()?;
        let mut run = Run::new(a.config(), &dataset, &device)?;
        run.data_dir = a.data.data_dir.clone();
        (run, dataset)
    };
    run.saves = saves;
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
    cfg.channels = a.attack_channels;
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
            gtm: a.gtm_target,
            channels: a.attack_channels,
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
    cfg.seeds = a.seeds.clone();
    if let Some(channels) = a.attack_channels {
        cfg.set_attack_channels(channels);
    }
    if let Some(q) = a.ranking_queries {
        cfg.eval.ranking = (q > 0).then(|| RankingPlan {
            profile: RankProfile::for_image_size(cfg.train.image_size),
            queries: q,
            gtm: GtmTarget::Nearest,
            channels: cfg.eval.attack.channels,
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
    claim_experiment_dir(&cfg, &dataset, &out, a.overwrite)?;
    let merged = run_experiment(&cfg, &dataset, &device, &out)?;
    print_merged(
        &merged,
        &out,
        &cfg.dataset,
        &cfg.train.arch,
        &cfg.eval.attack,
    );
    Ok(())
}

fn report(a: ReportArgs) -> Result<()> {
    let (s, merged) = report_experiment(&a.dir)?;
    print_merged(&merged, &a.dir, &s.dataset, &s.train.arch, &s.eval.attack);
    Ok(())
}

/// The merged table on stdout, then the cells it lacks and where the report is.
fn print_merged(
    merged: &Merged,
    out: &std::path::Path,
    dataset: &str,
    arch: &Arch,
    attack: &PgdConfig,
) {
    println!(
        "{}",
        table_markdown(
            &merged.reports,
            &format!(
                "{dataset} / {arch:?}: clean and PGD-{} at eps {:.1}/255",
                attack.steps,
                attack.eps * 255.0
            )
        )
    );
    print!("{}", threats_markdown(&merged.reports));
    for line in merged.missing_lines() {
        println!("{line}");
    }
    println!("report: {}", out.join("report.html").display());
}
