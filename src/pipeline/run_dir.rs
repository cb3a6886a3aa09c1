//! A run directory (`train --out`, `experiment --out`) and the rules that keep its files safe:
//! - one writer at a time: `run.lock` is locked by the OS (released when the process dies, so
//!   a lock left by a killed run is simply taken over) and holds the writer's pid, which the
//!   refusal names;
//! - the directory is checked to be writable before any training starts;
//! - leftovers of a write that was killed (`*.tmp`) are removed when the next writer starts;
//! - outputs are written only to regular files or new paths (see [`check_output_path`]).

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::error::{Error, Result};

pub const LOCK_FILE: &str = "run.lock";

/// A locked run directory; the lock is released when this is dropped (or the process dies).
#[derive(Debug)]
pub struct RunDir {
    dir: PathBuf,
    lock: File,
}

impl RunDir {
    /// Creates `dir` if need be and takes its lock. Fails at once, naming the holder's pid,
    /// when another live process holds it.
    pub fn lock(dir: &Path) -> Result<RunDir> {
        create_run_dir(dir)?;
        let path = dir.join(LOCK_FILE);
        let mut lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| unwritable(dir, e))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let holder = read_pid(&mut lock);
                return Err(Error::RunLocked {
                    dir: dir.to_path_buf(),
                    holder,
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(unwritable(&path, e)),
        }
        // A pid left in the file means its writer died without releasing the run cleanly.
        if let Some(pid) = read_pid(&mut lock) {
            eprintln!(
                "note: {} was left by process {pid}, which stopped without finishing; taking it over",
                path.display()
            );
        }
        let mine = std::process::id().to_string();
        lock.set_len(0)
            .and_then(|_| lock.rewind())
            .and_then(|_| lock.write_all(mine.as_bytes()))
            .and_then(|_| lock.sync_all())
            .map_err(|e| unwritable(dir, e))?;
        Ok(RunDir {
            dir: dir.to_path_buf(),
            lock,
        })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for RunDir {
    /// Empties the lock file so that the next writer knows this one finished; the OS lock goes
    /// with the file handle.
    fn drop(&mut self) {
        let _ = self.lock.set_len(0);
    }
}

fn read_pid(lock: &mut File) -> Option<u32> {
    let mut text = String::new();
    lock.rewind().ok()?;
    lock.read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

/// Creates `dir` if need be, refusing an empty name, a path that is not a directory and one
/// that cannot be created.
pub fn create_run_dir(dir: &Path) -> Result<()> {
    if dir.as_os_str().is_empty() {
        return Err(Error::Config(
            "--out is empty; name a run directory (e.g. runs/my-run)".into(),
        ));
    }
    if dir.exists() && !dir.is_dir() {
        return Err(Error::Config(format!(
            "run directory {} exists and is not a directory; choose another --out",
            dir.display()
        )));
    }
    std::fs::create_dir_all(dir).map_err(|e| unwritable(dir, e))
}

fn unwritable(path: &Path, e: std::io::Error) -> Error {
    Error::Config(format!(
        "cannot write to {}: {e}; choose another --out or fix its permissions",
        path.display()
    ))
}

pub use crate::files::tmp_path;

/// Removes `<file>.tmp` leftovers of killed writes of the given files (only regular files: a
/// directory or link of that name is not ours to delete).
pub fn remove_stale_tmp(files: &[PathBuf]) {
    for f in files {
        let tmp = tmp_path(f);
        if std::fs::symlink_metadata(&tmp).is_ok_and(|m| m.is_file()) {
            eprintln!(
                "note: removing {}, left by an interrupted write",
                tmp.display()
            );
            let _ = std::fs::remove_file(&tmp);
        }
    }
}

/// Checks before any work that `path` can be (re)written atomically: it is absent or a regular
/// file, and a file can be created next to it. The probe file is named after this process and
/// call, so processes starting on one directory at once never remove each other's probe.
pub fn check_writable(path: &Path) -> Result<()> {
    if let Ok(m) = std::fs::symlink_metadata(path) {
        if !m.is_file() {
            return Err(Error::Config(format!(
                "{} is {}, not a regular file; remove it or choose another --out",
                path.display(),
                kind_of(&m)
            )));
        }
    }
    static PROBES: AtomicUsize = AtomicUsize::new(0);
    let mut probe = path.as_os_str().to_owned();
    let call = PROBES.fetch_add(1, Ordering::Relaxed);
    probe.push(format!(".{}-{call}.probe", std::process::id()));
    let probe = PathBuf::from(probe);
    File::create(&probe).map_err(|e| unwritable(&probe, e))?;
    std::fs::remove_file(&probe).map_err(|e| unwritable(&probe, e))?;
    Ok(())
}

fn kind_of(m: &std::fs::Metadata) -> &'static str {
    let t = m.file_type();
    if t.is_dir() {
        "a directory"
    } else if t.is_symlink() {
        "a symbolic link"
    } else {
        "a device, socket or pipe"
    }
}

/// The rule for every file a command writes: only a new path or (with `--overwrite`) an
/// existing regular file, never a link, directory or device, and never one of the command's
/// own inputs.
pub fn check_output_path(output: &Path, inputs: &[&Path], overwrite: bool) -> Result<()> {
    let tmp = tmp_path(output);
    if std::fs::symlink_metadata(&tmp).is_ok() {
        return Err(Error::Config(format!(
            "{} exists (left by an interrupted write, or someone else's file); the output is \
             written through it, so remove or rename it first",
            tmp.display()
        )));
    }
    let meta = match std::fs::symlink_metadata(output) {
        Ok(m) => m,
        Err(_) => return check_parent(output),
    };
    if !meta.is_file() {
        return Err(Error::Config(format!(
            "--output {} is {}; outputs are written only to regular files or new paths",
            output.display(),
            kind_of(&meta)
        )));
    }
    for input in inputs {
        if same_file(output, input) {
            return Err(Error::Config(format!(
                "--output {} is also an input of this command ({}); write to another path",
                output.display(),
                input.display()
            )));
        }
    }
    if !overwrite {
        return Err(Error::Config(format!(
            "--output {} already exists; pass --overwrite to replace it, or choose a new path",
            output.display()
        )));
    }
    check_writable(output)
}

fn check_parent(output: &Path) -> Result<()> {
    let parent = output.parent().filter(|p| !p.as_os_str().is_empty());
    if let Some(p) = parent {
        if !p.is_dir() {
            return Err(Error::Config(format!(
                "--output {}: the directory {} does not exist",
                output.display(),
                p.display()
            )));
        }
    }
    check_writable(output)
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

/// Writes `bytes` to `path` atomically ([`crate::files::write_atomic`]).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    crate::files::write_atomic(path, bytes).map_err(|e| Error::Io {
        path: e.path,
        source: e.source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Several processes starting on one experiment check its settings file at once (threads
    /// stand in for them here). With one shared probe name, one removed another's probe and
    /// that one failed with "No such file or directory".
    #[test]
    fn concurrent_checks_of_one_path_do_not_collide() {
        let dir = std::env::temp_dir().join(format!("robust-dml-probe-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("config.json");
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..200 {
                        check_writable(&path).unwrap();
                    }
                });
            }
        });
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert!(left.is_empty(), "probes left behind: {left:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
