//! The rules of `train --resume`: which flags may change, which must match the stored run,
//! and the dataset the run was trained on.

use std::path::{Path, PathBuf};

use crate::data::DatasetKind;
use crate::error::{Error, Result};
use crate::nn::Checkpoint;
use crate::pipeline::train::{serde_name, Run, TrainConfig};

use super::args::{DataArgs, TrainArgs};

/// The train flags that may differ from the stored run on `--resume`.
const CHANGEABLE_ON_RESUME: &[&str] = &["epochs", "workers", "max_steps", "checkpoint_minutes"];
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
        "eat_split" => serde_name(&c.defense.eat_split),
        "eat_inner" => serde_name(&c.defense.eat_inner),
        "trades_lambda" => c.defense.trades_lambda.to_string(),
        "mixup_alpha" => c.defense.mixup_alpha.to_string(),
        "loss" => c.loss_kind().key().to_string(),
        "triplet_margin" => c.triplet_margin.to_string(),
        "hm_ics" => c.defense.hm_ics.to_string(),
        "max_steps" => c.max_steps_per_epoch.to_string(),
        _ => return None,
    })
}

fn flag_name(id: &str) -> String {
    format!("--{}", id.replace('_', "-"))
}

/// Applies the flags that may change on `--resume` and refuses those that may not, naming
/// each with the run's stored value.
pub(super) fn apply_resume_flags(run: &mut Run, a: &TrainArgs, out: &Path) -> Result<()> {
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
        if let Some(p) = run
            .progress
            .as_ref()
            .filter(|_| a.epochs <= run.epochs_done)
        {
            return Err(Error::Config(format!(
                "--epochs {}: the run in {} is part-way through epoch {}; pass --epochs {} or \
                 more",
                a.epochs,
                out.display(),
                p.epoch + 1,
                p.epoch + 1
            )));
        }
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
pub(super) fn resume_data_args(a: &TrainArgs, ck: &Checkpoint) -> Result<DataArgs> {
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
