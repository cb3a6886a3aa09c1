//! An experiment directory as cells that many processes can fill at once.
//!
//! - `config.json` holds the settings every process must share (everything but which methods
//!   and seeds it runs). The first process creates it, atomically and only once; every later
//!   one reads it and refuses to run with other settings.
//! - Each (method, seed) is a cell in `<method>/seed<N>/`, locked on its own (`run.lock`) while
//!   a process trains or evaluates it. `cell.json` says which experiment the cell belongs to;
//!   `report.json` is written last, so a cell with one is finished and is never redone.
//! - The tables and `report.html` merge every finished cell, under `report.lock`, so the last
//!   process to finish writes them whole; cells not finished are named, never counted.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{io_err, Error, Result};
use crate::pipeline::eval_plan::EvalPlan;
use crate::pipeline::results::MethodReport;
use crate::pipeline::run_dir::{self, RunDir};
use crate::pipeline::train::{TrainConfig, CHECKPOINT_FILE, LOG_FILE};
use crate::robust::defense::Method;

pub const SETTINGS_FILE: &str = "config.json";
pub const CELL_FILE: &str = "cell.json";
pub const REPORT_FILE: &str = "report.json";
/// Held while the merged tables and report are written.
const MERGE_LOCK: &str = "report.lock";
/// The merged outputs at the experiment's top level.
pub const MERGED_FILES: &[&str] = &["table.md", "metrics.json", "report.html"];

/// The data an experiment ran on, as counts (part of the settings: a cell trained on other data
/// is not the same experiment's).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DataSummary {
    pub name: String,
    pub train_images: usize,
    pub train_classes: usize,
    pub test_images: usize,
    pub test_classes: usize,
}

/// What every process of one experiment must agree on. `train.seed` and
/// `train.defense.method` are the preset's: each cell replaces them with its own.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    pub dataset: String,
    pub data: DataSummary,
    pub train: TrainConfig,
    pub eval: EvalPlan,
}

impl Settings {
    /// The training configuration of `cell`.
    pub fn cell_train(&self, cell: Cell) -> TrainConfig {
        let mut t = self.train.clone();
        t.seed = cell.seed;
        t.defense = t.defense.with_method(cell.method);
        t
    }
}

/// One method trained with one seed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cell {
    pub method: Method,
    pub seed: u64,
}

impl Cell {
    pub fn dir(&self, out: &Path) -> PathBuf {
        out.join(self.method.key())
            .join(format!("seed{}", self.seed))
    }

    /// "at, seed 1": how messages name it.
    pub fn name(&self) -> String {
        format!("{}, seed {}", self.method.key(), self.seed)
    }

    /// The flags that run only this cell.
    pub fn flags(&self) -> String {
        format!("--methods {} --seeds {}", self.method.key(), self.seed)
    }
}

/// What `cell.json` records: the cell and the settings of the experiment it belongs to.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct CellRecord {
    method: Method,
    seed: u64,
    settings: Settings,
}

fn json<T: Serialize>(v: &T) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}

fn write(path: &Path, text: &str) -> Result<()> {
    run_dir::write_atomic(path, text.as_bytes())
}

/// The settings stored in `out`, if any: an unreadable or half-written file is an error that
/// names it, never taken for "no settings".
pub fn read_settings(out: &Path) -> Result<Option<Settings>> {
    let path = out.join(SETTINGS_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(&path)(e)),
    };
    serde_json::from_str(&text).map(Some).map_err(|e| {
        Error::Config(format!(
            "{} is not a complete experiment settings file ({e}); it may be half-written or \
             from an older version. Remove it (and the cells under {}) or pass --overwrite",
            path.display(),
            out.display()
        ))
    })
}

/// Makes `out` an experiment with `settings`: creates the settings file if there is none (of
/// several processes starting at once, one writes it and the others check it), resumes when
/// the stored settings are the same, and refuses other settings unless `overwrite` is set,
/// which first removes every cell (each taken under its lock) and the merged outputs.
pub fn claim_settings(out: &Path, settings: &Settings, overwrite: bool) -> Result<()> {
    run_dir::create_run_dir(out)?;
    let path = out.join(SETTINGS_FILE);
    run_dir::check_writable(&path)?;
    let stored = match read_settings(out) {
        Err(e) if overwrite => {
            eprintln!("note: replacing an unreadable settings file ({e})");
            None
        }
        r => r?,
    };
    match stored {
        Some(old) if old == *settings => return Ok(()),
        Some(_) if !overwrite => {
            return Err(Error::Config(format!(
                "{} holds an experiment with other settings ({}); rerun it with the same flags \
                 to resume it or add cells, pass --overwrite to replace it, or choose another \
                 --out",
                out.display(),
                path.display()
            )))
        }
        _ if path.exists() => {
            remove_cells(out)?;
            write(&path, &json(settings))?;
            return Ok(());
        }
        _ => {}
    }
    let created =
        crate::files::create_once(&path, json(settings).as_bytes()).map_err(|e| Error::Io {
            path: e.path,
            source: e.source,
        })?;
    if created {
        Ok(())
    } else {
        // Another process created it first: its settings must be these.
        claim_settings(out, settings, false)
    }
}

/// Removes every cell's files (each under its own lock: a cell in use stops the removal) and
/// the merged outputs.
fn remove_cells(out: &Path) -> Result<()> {
    for (_, dir) in cells_on_disk(out) {
        let _lock = RunDir::lock(&dir)?;
        for name in [CHECKPOINT_FILE, LOG_FILE, REPORT_FILE, CELL_FILE] {
            remove_if_file(&dir.join(name))?;
        }
    }
    for name in MERGED_FILES {
        remove_if_file(&out.join(name))?;
    }
    Ok(())
}

fn remove_if_file(path: &Path) -> Result<()> {
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.is_file()) {
        std::fs::remove_file(path).map_err(io_err(path))?;
    }
    Ok(())
}

/// A cell this process will run: locked, its `cell.json` checked or written.
pub struct ClaimedCell {
    pub cell: Cell,
    pub lock: RunDir,
}

/// The cells in `cells` that are not finished, each locked for this process. Fails before any
/// work when one is locked by another process (naming it) or belongs to another experiment.
pub fn claim_cells(out: &Path, settings: &Settings, cells: &[Cell]) -> Result<Vec<ClaimedCell>> {
    let mut claimed = Vec::new();
    for &cell in cells {
        let dir = cell.dir(out);
        if finished_report(&dir).is_some() {
            check_record(out, settings, cell)?;
            continue;
        }
        let lock = RunDir::lock(&dir)?;
        if dir.join(CELL_FILE).exists() {
            check_record(out, settings, cell)?;
        } else {
            let record = CellRecord {
                method: cell.method,
                seed: cell.seed,
                settings: settings.clone(),
            };
            write(&dir.join(CELL_FILE), &json(&record))?;
        }
        claimed.push(ClaimedCell { cell, lock });
    }
    Ok(claimed)
}

/// Errors unless `cell`'s `cell.json` names this cell of an experiment with `settings`.
fn check_record(out: &Path, settings: &Settings, cell: Cell) -> Result<()> {
    match record_mismatch(out, settings, cell) {
        None => Ok(()),
        Some(why) => Err(Error::Config(format!(
            "cell {} ({}) {why}; remove that directory to run the cell again, or choose \
             another --out",
            cell.name(),
            cell.dir(out).display()
        ))),
    }
}

/// Why `cell.json` of `cell` does not belong to this experiment, if it does not.
fn record_mismatch(out: &Path, settings: &Settings, cell: Cell) -> Option<String> {
    let path = cell.dir(out).join(CELL_FILE);
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Some(format!("has no readable {CELL_FILE}"));
    };
    let Ok(record) = serde_json::from_str::<CellRecord>(&text) else {
        return Some(format!("has a {CELL_FILE} that is not a cell record"));
    };
    if (record.method, record.seed) != (cell.method, cell.seed) {
        return Some(format!(
            "holds the cell {}, seed {} (moved or copied?)",
            record.method.key(),
            record.seed
        ));
    }
    (record.settings != *settings).then(|| {
        format!(
            "belongs to an experiment with other settings (its {CELL_FILE} differs from {})",
            out.join(SETTINGS_FILE).display()
        )
    })
}

/// The cell's report, when it is finished.
pub fn finished_report(dir: &Path) -> Option<MethodReport> {
    let text = std::fs::read_to_string(dir.join(REPORT_FILE)).ok()?;
    serde_json::from_str(&text).ok()
}

/// Every cell directory under `out` (`<method>/seed<N>`), in method then seed order.
fn cells_on_disk(out: &Path) -> Vec<(Cell, PathBuf)> {
    let mut found = Vec::new();
    for method in Method::EVERY {
        let Ok(entries) = std::fs::read_dir(out.join(method.key())) else {
            continue;
        };
        let mut seeds: Vec<u64> = entries
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_dir())
            .filter_map(|e| e.file_name().to_str()?.strip_prefix("seed")?.parse().ok())
            .collect();
        seeds.sort_unstable();
        for seed in seeds {
            let cell = Cell { method, seed };
            found.push((cell, cell.dir(out)));
        }
    }
    found
}

/// What the experiment directory holds: the finished cells' reports and the cells that are not
/// (to run, with why).
pub struct Merged {
    pub reports: Vec<MethodReport>,
    pub missing: Vec<(Cell, String)>,
}

impl Merged {
    /// One line per cell not in the tables, with the command that runs it.
    pub fn missing_lines(&self) -> Vec<String> {
        self.missing
            .iter()
            .map(|(cell, why)| {
                format!(
                    "cell {} is not in the tables: {why} (run it with {})",
                    cell.name(),
                    cell.flags()
                )
            })
            .collect()
    }
}

/// Every finished cell of the experiment in `out`, and the cells missing from its grid of
/// methods x seeds (both as seen on disk): started and not finished, not started, or of
/// another experiment (left out of the tables).
pub fn merge_cells(out: &Path, settings: &Settings) -> Merged {
    let on_disk = cells_on_disk(out);
    let mut merged = Merged {
        reports: Vec::new(),
        missing: Vec::new(),
    };
    let unfinished = "started and not finished (running now, or interrupted: rerunning resumes it)";
    for &(cell, ref dir) in &on_disk {
        // A process writes cell.json right after taking the cell's lock.
        if !dir.join(CELL_FILE).exists() {
            merged.missing.push((cell, unfinished.into()));
            continue;
        }
        if let Some(why) = record_mismatch(out, settings, cell) {
            merged.missing.push((cell, format!("left out: it {why}")));
            continue;
        }
        match finished_report(dir) {
            Some(mut r) => {
                r.seed = cell.seed;
                merged.reports.push(r);
            }
            None => merged.missing.push((cell, unfinished.into())),
        }
    }
    let mut methods: Vec<Method> = on_disk.iter().map(|(c, _)| c.method).collect();
    let mut seeds: Vec<u64> = on_disk.iter().map(|(c, _)| c.seed).collect();
    methods.dedup();
    seeds.sort_unstable();
    seeds.dedup();
    for &method in &methods {
        for &seed in &seeds {
            let cell = Cell { method, seed };
            if !on_disk.iter().any(|(c, _)| *c == cell) {
                merged.missing.push((cell, "not started".into()));
            }
        }
    }
    merged
}

/// Holds `out/report.lock` (waiting for it) while `write` runs: merges never interleave.
pub fn with_merge_lock<T>(out: &Path, write: impl FnOnce() -> Result<T>) -> Result<T> {
    let path = out.join(MERGE_LOCK);
    let file: File = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io_err(&path))?;
    file.lock().map_err(io_err(&path))?;
    let result = write();
    let _ = file.unlock();
    result
}
