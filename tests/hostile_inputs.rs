//! The hostile-input catalogue (issue 11): bad flag values, bad files, concurrent writers and
//! kills, run against the binary as a user runs it. For every refusal: exit code 1, a message
//! naming the problem, no panic, and no file outside the run directory changed. The kill -9
//! loop checks after every kill that the checkpoint loads, the log agrees with it and the run
//! resumes.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use robust_dml::nn::{Checkpoint, HostTensor};
use robust_dml::pipeline::train::Run;

const BIN: &str = env!("CARGO_BIN_EXE_robust-dml");

/// A fresh working directory; commands run inside it on the CPU backend.
struct Sandbox {
    dir: PathBuf,
}

impl Sandbox {
    fn new(name: &str) -> Sandbox {
        let dir =
            std::env::temp_dir().join(format!("robust-dml-hostile-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Sandbox { dir }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.current_dir(&self.dir)
            .env("ROBUST_DML_DEVICE", "cpu")
            .args(args);
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    fn spawn(&self, args: &[&str]) -> Child {
        self.command(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// Every file under the sandbox except those under `except`, with its contents.
    fn snapshot(&self, except: Option<&str>) -> BTreeMap<PathBuf, Vec<u8>> {
        let skip = except.map(|e| self.path(e));
        let mut out = BTreeMap::new();
        let mut stack = vec![self.dir.clone()];
        while let Some(d) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&d) else {
                continue;
            };
            for e in entries.flatten() {
                let p = e.path();
                if skip.as_ref().is_some_and(|s| p.starts_with(s)) {
                    continue;
                }
                let meta = std::fs::symlink_metadata(&p).unwrap();
                if meta.is_dir() {
                    stack.push(p);
                } else if meta.is_file() {
                    out.insert(p.clone(), std::fs::read(&p).unwrap_or_default());
                } else {
                    out.insert(p, Vec::new());
                }
            }
        }
        out
    }

    /// Runs `args`, expecting a refusal: exit code 1 (2 for usage errors), `fragment` in the
    /// message, no panic,
    /// and nothing outside `run_dir` created, changed or deleted.
    fn refuses(&self, args: &[&str], fragment: &str, run_dir: Option<&str>) -> String {
        let before = self.snapshot(run_dir);
        let out = self.run(args);
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        // 1: refused by the program; 2: refused by the argument parser (a usage error).
        assert!(
            matches!(out.status.code(), Some(1 | 2)),
            "{args:?}: exit code {:?}; stderr:\n{err}",
            out.status.code()
        );
        assert!(!err.contains("panicked"), "{args:?} panicked:\n{err}");
        assert!(
            err.to_lowercase().contains(&fragment.to_lowercase()),
            "{args:?}: message lacks {fragment:?}:\n{err}"
        );
        let after = self.snapshot(run_dir);
        assert_eq!(
            before.keys().collect::<Vec<_>>(),
            after.keys().collect::<Vec<_>>(),
            "{args:?}: files outside the run directory appeared or vanished"
        );
        let changed: Vec<_> = before
            .iter()
            .filter(|(path, bytes)| after.get(*path) != Some(*bytes))
            .map(|(path, _)| path)
            .collect();
        assert!(
            changed.is_empty(),
            "{args:?}: files outside the run directory changed: {changed:?}"
        );
        err
    }

    fn succeeds(&self, args: &[&str]) -> String {
        let out = self.run(args);
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "{args:?} failed:\n{err}");
        err + &String::from_utf8_lossy(&out.stdout)
    }
}

/// One tiny trained run shared by the tests that only need a checkpoint (training is the slow
/// part on a CPU).
fn shared_run() -> &'static Path {
    static RUN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    RUN.get_or_init(|| {
        remove_shared_runs_of_finished_processes();
        let dir =
            std::env::temp_dir().join(format!("robust-dml-hostile-{}-shared", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let out = Command::new(BIN)
            .current_dir(&dir)
            .env("ROBUST_DML_DEVICE", "cpu")
            .args(tiny_train("run", &[]))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        dir.join("run")
    })
}

/// The shared run lives as long as the test process (a static has no destructor), so each
/// process removes those that earlier, finished test processes left behind.
fn remove_shared_runs_of_finished_processes() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let pid = name
            .strip_prefix("robust-dml-hostile-")
            .and_then(|rest| rest.strip_suffix("-shared"));
        if let Some(pid) = pid {
            if !Path::new("/proc").join(pid).exists() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

impl Sandbox {
    /// Copies the shared run's checkpoint and log into `<sandbox>/run`.
    fn with_trained_run(name: &str) -> Sandbox {
        let sb = Sandbox::new(name);
        std::fs::create_dir_all(sb.path("run")).unwrap();
        for f in ["checkpoint.safetensors", "train_log.jsonl"] {
            std::fs::copy(shared_run().join(f), sb.path("run").join(f)).unwrap();
        }
        sb
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A train command on the built-in synthetic data, as small as it gets; a flag in `extra`
/// replaces the default of the same name.
fn tiny_train<'a>(out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let defaults: [(&str, &str); 8] = [
        ("--epochs", "1"),
        ("--max-steps", "1"),
        ("--batch-size", "8"),
        ("--embedding-dim", "8"),
        ("--image-size", "16"),
        ("--warmup-epochs", "0"),
        ("--workers", "0"),
        ("--out", out),
    ];
    let mut v = vec!["train"];
    for (flag, value) in defaults {
        if !extra.contains(&flag) {
            v.extend([flag, value]);
        }
    }
    v.extend_from_slice(extra);
    v
}

fn write_tensor_file(path: &Path, name: &str, shape: &[usize], data: Vec<f32>) {
    let mut ck = Checkpoint::new();
    ck.insert_host(
        name,
        HostTensor {
            shape: shape.to_vec(),
            data,
        },
    );
    ck.save(path).unwrap();
}

/// IDX bytes: magic, big-endian dimensions, then `data`.
fn idx(dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut b = vec![0, 0, 8, dims.len() as u8];
    for d in dims {
        b.extend_from_slice(&d.to_be_bytes());
    }
    b.extend_from_slice(data);
    b
}

fn write_file(path: &Path, bytes: &[u8]) {
    std::fs::File::create(path)
        .unwrap()
        .write_all(bytes)
        .unwrap();
}

// ---------------------------------------------------------------- bad flag values

/// Every float flag refuses NaN, infinity and out-of-range values, naming the flag; sizes of
/// 0, models too small or too large for memory, and attacks that are no attacks are refused
/// before any work.
#[test]
fn bad_training_flags_are_named_before_any_work() {
    let sb = Sandbox::new("flags");
    let cases: &[(&[&str], &str)] = &[
        (&["--epochs", "0"], "--epochs 0"),
        (&["--batch-size", "0"], "--batch-size 0"),
        (&["--lr", "nan"], "--lr"),
        (&["--lr", "inf"], "--lr"),
        (&["--lr", "-1"], "--lr"),
        (&["--lr", "3e38"], "proxies' learning rate"),
        (&["--weight-decay", "nan"], "--weight-decay"),
        (&["--weight-decay", "-1"], "--weight-decay"),
        (&["--lr-gamma", "nan"], "--lr-gamma"),
        (&["--lr-gamma", "0"], "--lr-gamma"),
        (&["--lr-step", "0"], "--lr-step 0"),
        (&["--proxy-lr-mult", "nan"], "--proxy-lr-mult"),
        (&["--grad-clip", "nan"], "--grad-clip"),
        (&["--grad-clip", "-1"], "--grad-clip"),
        (&["--embedding-dim", "0"], "--embedding-dim 0"),
        (&["--embedding-dim", "1"], "at least 2 dimensions"),
        (&["--embedding-dim", "100000000000"], "needs an estimated"),
        (&["--image-size", "2"], "smallest input is 4x4"),
        (&["--image-size", "100000"], "needs an estimated"),
        (&["--batch-size", "100000000000"], "--batch-size"),
        (
            &["--method", "mix-up", "--mixup-alpha", "nan"],
            "--mixup-alpha",
        ),
        (
            &["--method", "mix-up", "--mixup-alpha", "inf"],
            "--mixup-alpha",
        ),
        (
            &["--method", "mix-up", "--mixup-alpha", "0"],
            "--mixup-alpha",
        ),
        (
            &["--method", "mix-up", "--mixup-alpha", "-1"],
            "--mixup-alpha",
        ),
        (
            &["--method", "at", "--train-steps", "0"],
            "--train-steps 0 runs no attack",
        ),
        (
            &["--method", "at", "--train-steps", "100000"],
            "--train-steps",
        ),
        (&["--method", "at", "--train-eps", "0"], "--train-eps"),
        (&["--method", "at", "--train-eps", "nan"], "--train-eps"),
        (&["--method", "at", "--train-eps", "-8"], "--train-eps"),
        (
            &["--method", "trades", "--trades-lambda", "nan"],
            "--trades-lambda",
        ),
        (&["--method", "eat", "--eat-beta", "nan"], "--eat-beta"),
        (&["--method", "eat", "--eat-beta", "2"], "--eat-beta"),
        (
            &["--method", "eat", "--ensemble-size", "0"],
            "--ensemble-size",
        ),
        (
            &["--method", "eat", "--ensemble-size", "1"],
            "--ensemble-size",
        ),
        (&["--workers", "100000"], "--workers"),
        (
            &["--arch", "mobilenet-v2", "--width-mult", "nan"],
            "--width-mult",
        ),
        (
            &["--arch", "mobilenet-v2", "--width-mult", "0"],
            "--width-mult",
        ),
        (
            &["--arch", "mobilenet-v2", "--width-mult", "1e9"],
            "--width-mult",
        ),
        (
            &["--arch", "mobilenet-v2", "--image-size", "1"],
            "smallest input is 32x32",
        ),
        (
            &["--arch", "bn-inception", "--image-size", "16"],
            "smallest input is 32x32",
        ),
        (&["--dataset", "nonsense"], "unknown dataset"),
        (&["--dataset", "cub200"], "--data-dir"),
        (&["--out", ""], "--out"),
        (&["--checkpoint-minutes", "nan"], "--checkpoint-minutes"),
        (&["--checkpoint-minutes", "-1"], "--checkpoint-minutes"),
        (&["--checkpoint-minutes", "inf"], "--checkpoint-minutes"),
        (&["--attack-channels", "bogus"], "--attack-channels"),
        // The synthetic data has colour: there is no grey image to tie the channels of.
        (
            &["--method", "at", "--attack-channels", "tied"],
            "has colour; use --attack-channels independent",
        ),
    ];
    for (extra, fragment) in cases {
        sb.refuses(&tiny_train("run", extra), fragment, Some("run"));
        assert!(
            !sb.path("run/checkpoint.safetensors").exists(),
            "{extra:?} wrote a checkpoint"
        );
    }
}

#[test]
fn bad_attack_and_eval_flags_are_named() {
    let sb = Sandbox::with_trained_run("attack-flags");
    let ck = "run/checkpoint.safetensors";
    let attack = |extra: &[&'static str]| {
        let mut v = vec!["attack", "--checkpoint", ck];
        v.extend_from_slice(extra);
        v
    };
    for (extra, fragment) in [
        (&["--steps", "0"][..], "--steps 0 runs no attack"),
        (&["--steps", "100000"][..], "--steps 100000"),
        (&["--eps", "0"][..], "--eps"),
        (&["--eps", "nan"][..], "--eps"),
        (&["--eps", "-8"][..], "--eps"),
        (&["--eps=-8"][..], "--eps"),
        (&["--eps", "inf"][..], "--eps"),
        (&["--eps", "1000"][..], "--eps"),
        // The value as typed, not f32 noise or thirty-one digits.
        (&["--eps", "-1"][..], "--eps -1 is not valid"),
        (&["--eps", "1e30"][..], "--eps 1e30 is not valid"),
        (&["--alpha", "nan"][..], "--alpha"),
        (&["--alpha", "0"][..], "--alpha"),
        (&["--batch-size", "0"][..], "--batch-size"),
        (&["--attack-channels", "bogus"][..], "--attack-channels"),
        // The trained run's synthetic images have colour: no grey image to tie.
        (&["--attack-channels", "tied"][..], "has colour"),
        (
            &[
                "--suite",
                "ranking",
                "--queries",
                "2",
                "--attack-channels",
                "tied",
            ][..],
            "has colour",
        ),
    ] {
        sb.refuses(&attack(extra), fragment, None);
    }
    sb.refuses(
        &["eval", "--checkpoint", ck, "--batch-size", "0"],
        "--batch-size",
        None,
    );
    sb.refuses(&["eval", "--checkpoint", "run"], "run", None);
    sb.refuses(
        &["eval", "--checkpoint", "missing.safetensors"],
        "not found",
        None,
    );
}

/// A transfer source trained at another input size is refused, naming both checkpoints and
/// sizes in one sentence (the message once carried runs of 18 spaces from lost line breaks).
#[test]
fn a_transfer_source_of_another_input_size_is_refused() {
    let sb = Sandbox::with_trained_run("transfer-size");
    sb.succeeds(&tiny_train("source", &["--image-size", "20"]));
    let err = sb.refuses(
        &[
            "attack",
            "--checkpoint",
            "run/checkpoint.safetensors",
            "--steps",
            "1",
            "--objective",
            "metric",
            "--transfer-from",
            "source/checkpoint.safetensors",
        ],
        "--transfer-from source/checkpoint.safetensors takes 20 px images and embeds in 8 \
         dimensions, the target run/checkpoint.safetensors takes 16 px and embeds in 8: transfer \
         needs the same input size (pass a source trained at 16 px)",
        None,
    );
    // Refused before anything ran: no embedding or attack pass reported its summary line.
    assert!(
        !err.contains(" img in "),
        "the source was checked only after embedding or attacking:\n{err}"
    );
}

// ---------------------------------------------------------------- non-finite state

/// The NaN guard checks the state before every save: a diverging run stops naming the flag,
/// and the last good checkpoint (epoch 1) stays.
#[test]
fn a_diverged_state_is_never_saved() {
    let sb = Sandbox::new("nan-state");
    let err = sb.refuses(
        &tiny_train(
            "run",
            &[
                "--epochs",
                "3",
                "--batch-size",
                "20",
                "--lr",
                "1e6",
                "--image-size",
                "32",
            ],
        ),
        "--lr 1000000",
        Some("run"),
    );
    assert!(err.contains("last good checkpoint is kept"), "{err}");
    let ck = Checkpoint::load(sb.path("run/checkpoint.safetensors")).unwrap();
    assert!(ck.first_non_finite().is_none());
    Run::check_finite(&ck).unwrap();
    let log = std::fs::read_to_string(sb.path("run/train_log.jsonl")).unwrap();
    let epochs: usize = ck.meta("epochs_done").unwrap().parse().unwrap();
    assert_eq!(
        log.lines().count(),
        epochs,
        "log and checkpoint disagree:\n{log}"
    );
}

/// eval, attack, --resume and embed refuse a checkpoint or weights with NaN values, and embed
/// refuses NaN images.
#[test]
fn non_finite_checkpoints_and_inputs_are_refused() {
    let sb = Sandbox::with_trained_run("nan-ckpt");
    let path = sb.path("run/checkpoint.safetensors");
    let mut ck = Checkpoint::load(&path).unwrap();
    let key = ck
        .tensors
        .keys()
        .find(|k| k.starts_with("member0/model/") && k.contains("fc.weight"))
        .unwrap()
        .clone();
    ck.tensors.get_mut(&key).unwrap().data[0] = f32::NAN;
    ck.save(sb.path("poisoned.safetensors")).unwrap();
    ck.save(&path).unwrap();
    sb.refuses(
        &["eval", "--checkpoint", "poisoned.safetensors"],
        "cannot be evaluated or resumed",
        None,
    );
    sb.refuses(
        &["attack", "--checkpoint", "poisoned.safetensors"],
        "NaN",
        None,
    );
    sb.refuses(&["train", "--resume", "--out", "run"], "NaN", Some("run"));
    // embed: NaN weights (a training checkpoint) and NaN images.
    write_tensor_file(
        &sb.path("x.safetensors"),
        "input",
        &[2, 3, 16, 16],
        vec![0.5; 2 * 3 * 256],
    );
    sb.refuses(
        &[
            "embed",
            "--arch",
            "c2f2",
            "--embedding-dim",
            "8",
            "--weights",
            "poisoned.safetensors",
            "--input",
            "x.safetensors",
            "--output",
            "e.safetensors",
        ],
        "NaN",
        None,
    );
    let mut nan_images = vec![0.5; 2 * 3 * 256];
    nan_images[7] = f32::NAN;
    write_tensor_file(
        &sb.path("xnan.safetensors"),
        "input",
        &[2, 3, 16, 16],
        nan_images,
    );
    sb.refuses(
        &[
            "embed",
            "--arch",
            "c2f2",
            "--embedding-dim",
            "8",
            "--weights",
            "run/checkpoint.safetensors",
            "--input",
            "xnan.safetensors",
            "--output",
            "e.safetensors",
        ],
        "NaN at index 7",
        None,
    );
}

// ---------------------------------------------------------------- run directories

#[test]
fn an_existing_run_is_never_replaced_without_overwrite() {
    let sb = Sandbox::with_trained_run("overwrite");
    let before = sb.snapshot(Some("run/run.lock"));
    let err = sb.refuses(
        &tiny_train("run", &[]),
        "already holds a run",
        Some("run/run.lock"),
    );
    assert!(
        err.contains("--overwrite") && err.contains("--resume"),
        "{err}"
    );
    assert!(before == sb.snapshot(Some("run/run.lock")));
    sb.succeeds(&tiny_train("run", &["--overwrite", "--seed", "3"]));
    let log = std::fs::read_to_string(sb.path("run/train_log.jsonl")).unwrap();
    assert_eq!(
        log.lines().count(),
        1,
        "the old log was not replaced:\n{log}"
    );
    sb.refuses(
        &tiny_train("run", &["--overwrite", "--resume"]),
        "cannot be used with",
        None,
    );
}

#[test]
fn unwritable_outputs_are_found_before_training() {
    let sb = Sandbox::new("unwritable");
    std::fs::create_dir_all(sb.path("run/checkpoint.safetensors")).unwrap();
    sb.refuses(&tiny_train("run", &[]), "is a directory", Some("run"));
    write_file(&sb.path("afile"), b"x");
    sb.refuses(&tiny_train("afile", &[]), "not a directory", None);
    sb.refuses(&tiny_train("afile/run", &[]), "cannot write", None);
}

/// `--resume` applies --epochs (to extend) and refuses flags that would change the run,
/// naming the stored values.
#[test]
fn resume_applies_changeable_flags_and_refuses_the_others() {
    let sb = Sandbox::with_trained_run("resume-flags");
    let err = sb.refuses(
        &[
            "train",
            "--resume",
            "--out",
            "run",
            "--lr",
            "0.5",
            "--arch",
            "mobilenet-v2",
        ],
        "cannot change",
        Some("run"),
    );
    assert!(err.contains("--lr 0.5 (the run has 0.0001)"), "{err}");
    assert!(
        err.contains("--arch mobilenet-v2 (the run has c2f2)"),
        "{err}"
    );
    sb.refuses(
        &["train", "--resume", "--out", "run", "--embedding-dim", "32"],
        "--embedding-dim 32 (the run has 8)",
        Some("run"),
    );
    sb.refuses(
        &[
            "train",
            "--resume",
            "--out",
            "run",
            "--dataset",
            "fashion-mnist",
        ],
        "differs from the run's dataset synthetic",
        Some("run"),
    );
    sb.refuses(
        &["train", "--resume", "--out", "nothing"],
        "no checkpoint",
        Some("nothing"),
    );
    // Repeating the stored value is fine; --epochs extends.
    sb.succeeds(&[
        "train",
        "--resume",
        "--out",
        "run",
        "--epochs",
        "2",
        "--embedding-dim",
        "8",
    ]);
    let ck = Checkpoint::load(sb.path("run/checkpoint.safetensors")).unwrap();
    assert_eq!(ck.meta("epochs_done"), Some("2"));
    let log = std::fs::read_to_string(sb.path("run/train_log.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 2, "{log}");
    sb.refuses(
        &["train", "--resume", "--out", "run", "--epochs", "1"],
        "already trained 2 epochs",
        Some("run"),
    );
}

/// A second writer on the same run directory fails at once naming the holder's pid; after
/// the holder is killed, its lock is taken over.
#[test]
fn a_second_writer_is_refused_and_a_stale_lock_taken_over() {
    let sb = Sandbox::new("lock");
    let mut holder = sb.spawn(&tiny_train("run", &["--epochs", "1000"]));
    let lock = sb.path("run/run.lock");
    let pid = holder.id().to_string();
    let start = Instant::now();
    while std::fs::read_to_string(&lock).unwrap_or_default().trim() != pid {
        assert!(start.elapsed() < Duration::from_secs(60), "no lock written");
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = sb.run(&tiny_train("run", &["--epochs", "1000"]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(&format!("in use by process {pid}")), "{err}");
    let resume = sb.run(&["train", "--resume", "--out", "run"]);
    assert!(String::from_utf8_lossy(&resume.stderr).contains("in use by process"));
    holder.kill().unwrap();
    holder.wait().unwrap();
    // The killed holder's lock is taken over, with or without a checkpoint to resume.
    let err = match Checkpoint::load(sb.path("run/checkpoint.safetensors")) {
        Ok(ck) => {
            let done = ck.meta("epochs_done").unwrap().to_string();
            sb.succeeds(&["train", "--resume", "--out", "run", "--epochs", &done])
        }
        Err(_) => sb.succeeds(&tiny_train("run", &["--overwrite"])),
    };
    assert!(err.contains("taking it over"), "{err}");
}

/// kill -9 at varied moments of checkpoint writes (a moment after `checkpoint.safetensors.tmp`
/// appears): after every kill the checkpoint loads and is finite, the log never runs ahead of
/// it, and the run resumes; at the end it has every epoch, in order, and no `.tmp` is left.
/// About 13 s on 2 idle cores, with the binary on its default device (the CPU backend where
/// the only adapter is llvmpipe).
#[test]
fn kill_9_during_checkpoint_writes_never_loses_the_run() {
    let sb = Sandbox::new("kill9");
    // A 2048-d head makes the checkpoint ~25 MB, so that a write takes a while.
    let fresh = tiny_train("run", &["--epochs", "8", "--embedding-dim", "2048"]);
    let resume = ["train", "--resume", "--out", "run"];
    let ckpt = sb.path("run/checkpoint.safetensors");
    let tmp = sb.path("run/checkpoint.safetensors.tmp");
    let log = sb.path("run/train_log.jsonl");
    let mut done = 0;
    for (round, offset_ms) in [0u64, 1, 3, 8, 20, 50].into_iter().enumerate() {
        let mut child = sb.spawn(if ckpt.exists() {
            &resume[..]
        } else {
            &fresh[..]
        });
        let start = Instant::now();
        while !tmp.exists() && child.try_wait().unwrap().is_none() {
            assert!(
                start.elapsed() < Duration::from_secs(300),
                "no write started"
            );
            std::thread::sleep(Duration::from_micros(500));
        }
        std::thread::sleep(Duration::from_millis(offset_ms));
        child.kill().ok();
        child.wait().unwrap();
        if !ckpt.exists() {
            continue;
        }
        let ck = Checkpoint::load(&ckpt).unwrap_or_else(|e| panic!("round {round}: {e}"));
        Run::check_finite(&ck).unwrap();
        let epochs: usize = ck.meta("epochs_done").unwrap().parse().unwrap();
        assert!(epochs >= done, "round {round}: the checkpoint went back");
        done = epochs;
        let lines: Vec<serde_json::Value> = std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("a log line is whole JSON"))
            .collect();
        assert!(lines.len() <= epochs, "round {round}: the log runs ahead");
        for (k, l) in lines.iter().enumerate() {
            assert_eq!(l["epoch"], k + 1, "round {round}: log epochs out of order");
        }
    }
    sb.succeeds(if ckpt.exists() {
        &resume[..]
    } else {
        &fresh[..]
    });
    let ck = Checkpoint::load(&ckpt).unwrap();
    assert_eq!(ck.meta("epochs_done"), Some("8"));
    let text = std::fs::read_to_string(&log).unwrap();
    let epochs: Vec<u64> = text
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["epoch"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(epochs, (1..=8).collect::<Vec<_>>());
    let leftovers: Vec<_> = std::fs::read_dir(sb.path("run"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// kill -9 at varied moments of a run that also checkpoints inside its epochs
/// (`--checkpoint-minutes 0.0002`: after about every step): at least one kill lands between
/// such checkpoints, each restart goes on from the step saved, and the finished run holds the
/// same tensors, to the bit, as a run never interrupted.
#[test]
fn kill_9_between_mid_epoch_checkpoints_resumes_to_the_same_bits() {
    let sb = Sandbox::new("kill9-mid-epoch");
    let flags = [
        "--epochs",
        "2",
        "--max-steps",
        "12",
        "--image-size",
        "32",
        "--checkpoint-minutes",
        "0.0002",
    ];
    sb.succeeds(&tiny_train("straight", &flags));
    let fresh = tiny_train("run", &flags);
    let resume = [
        "train",
        "--resume",
        "--out",
        "run",
        "--checkpoint-minutes",
        "0.0002",
    ];
    let ckpt = sb.path("run/checkpoint.safetensors");
    let mut part_way = 0;
    for round in 0..12u64 {
        let before = modified(&ckpt);
        let mut child = sb.spawn(if ckpt.exists() {
            &resume[..]
        } else {
            &fresh[..]
        });
        // Kill soon after the next checkpoint lands (or the run ends).
        wait_for_write(&ckpt, before, &mut child);
        std::thread::sleep(Duration::from_millis(round % 4 * 7));
        child.kill().ok();
        child.wait().unwrap();
        let Ok(ck) = Checkpoint::load(&ckpt) else {
            continue;
        };
        if ck.meta("epoch_progress").is_some() {
            part_way += 1;
        }
        if ck.meta("epochs_done") == Some("2") {
            break;
        }
    }
    assert!(
        part_way > 0,
        "no kill left a checkpoint taken inside an epoch"
    );
    sb.succeeds(&resume);
    let got = Checkpoint::load(&ckpt).unwrap();
    let want = Checkpoint::load(sb.path("straight/checkpoint.safetensors")).unwrap();
    assert_eq!(got.meta("epochs_done"), Some("2"));
    common::assert_same_tensors(&got, &want, "after the kills");
}

/// SIGTERM, then SIGINT (SIGTERM again where this process ignores SIGINT), during training:
/// each time the step under way ends, its checkpoint is written, the message says how to go
/// on, and the exit code is 128 + the signal's number; the resumed run ends with the same
/// tensors, to the bit, as a run never interrupted.
#[cfg(unix)]
#[test]
fn sigterm_and_sigint_save_the_step_and_resume_to_the_same_bits() {
    let sb = Sandbox::new("signals");
    let flags = ["--epochs", "3", "--max-steps", "12", "--image-size", "32"];
    sb.succeeds(&tiny_train("straight", &flags));
    let ckpt = sb.path("run/checkpoint.safetensors");
    let fresh = tiny_train("run", &flags);
    let resume = ["train", "--resume", "--out", "run"];
    // Each signal goes right after an epoch's checkpoint lands, so it reaches the next epoch,
    // where only the signal writes a checkpoint (no --checkpoint-minutes inside these epochs).
    // A process started ignoring SIGINT (a background job of a script) keeps ignoring it, and
    // so do its children: there the second signal is SIGTERM again.
    let second = match sigint_ignored() {
        true => ("TERM", 143),
        false => ("INT", 130),
    };
    for (round, (signal, code)) in [("TERM", 143), second].into_iter().enumerate() {
        let args = if round == 0 { &fresh[..] } else { &resume[..] };
        let before = modified(&ckpt);
        let mut child = sb.spawn(args);
        wait_for_write(&ckpt, before, &mut child);
        // The shell's built-in kill: no procps needed.
        let sent = std::process::Command::new("sh")
            .args(["-c", &format!("kill -{signal} {}", child.id())])
            .status()
            .unwrap();
        assert!(sent.success());
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "SIG{signal}: {err}");
        assert!(err.contains(&format!("SIG{signal} at epoch")), "{err}");
        assert!(err.contains("--resume"), "{err}");
        let ck = Checkpoint::load(&ckpt).unwrap();
        assert!(
            ck.meta("epoch_progress").is_some(),
            "SIG{signal}: not saved part-way"
        );
    }
    sb.succeeds(&resume);
    let got = Checkpoint::load(&ckpt).unwrap();
    let want = Checkpoint::load(sb.path("straight/checkpoint.safetensors")).unwrap();
    assert_eq!(got.meta("epochs_done"), Some("3"));
    common::assert_same_tensors(&got, &want, "after SIGTERM and SIGINT");
}

/// A file's modification time; None while it does not exist.
fn modified(path: &Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Waits until `path` is written anew (its modification time is no longer `before`) or
/// `child` ends.
fn wait_for_write(path: &Path, before: Option<std::time::SystemTime>, child: &mut Child) {
    let start = Instant::now();
    while modified(path) == before && child.try_wait().unwrap().is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "no checkpoint written"
        );
        std::thread::sleep(Duration::from_micros(300));
    }
}

/// Whether this process ignores SIGINT (Linux: bit 2 of `SigIgn` in /proc/self/status).
#[cfg(unix)]
fn sigint_ignored() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigIgn:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .is_some_and(|mask| mask & (1 << (2 - 1)) != 0)
}

/// A run killed part-way through its second epoch cannot be resumed with `--epochs 1`: that
/// epoch has begun, so the message names it and the smallest count that continues it, and the
/// run directory is left as it was. `--epochs 2` then finishes the run.
#[test]
fn resume_with_fewer_epochs_than_the_one_under_way_is_refused() {
    let sb = Sandbox::new("resume-fewer-epochs");
    // Enough steps that the poll below sees a save inside epoch 2 before the epoch ends.
    let flags = ["--max-steps", "40", "--image-size", "32"];
    sb.succeeds(&tiny_train("run", &flags));
    let ckpt = sb.path("run/checkpoint.safetensors");
    let part_way = |ck: &Checkpoint| ck.meta("epoch_progress").is_some();
    // Saves after every step of epoch 2; kill once one of them has landed.
    let resume = [
        "train",
        "--resume",
        "--out",
        "run",
        "--epochs",
        "2",
        "--checkpoint-minutes",
        "0.0002",
    ];
    let mut child = sb.spawn(&resume);
    let start = Instant::now();
    while !Checkpoint::load(&ckpt).is_ok_and(|ck| part_way(&ck)) {
        assert!(
            child.try_wait().unwrap().is_none(),
            "epoch 2 ended before a checkpoint inside it was seen"
        );
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "no checkpoint written"
        );
        std::thread::sleep(Duration::from_micros(300));
    }
    child.kill().ok();
    child.wait().unwrap();
    let ck = Checkpoint::load(&ckpt).unwrap();
    assert!(part_way(&ck), "the kill left a checkpoint inside epoch 2");
    assert_eq!(ck.meta("epochs_done"), Some("1"));
    // The refusal may take the run's lock (run.lock records its holder); the rest must not move.
    let run_files = || {
        let mut files = sb.snapshot(None);
        files.retain(|path, _| !path.ends_with("run.lock"));
        files
    };
    let before = run_files();
    let err = sb.refuses(
        &["train", "--resume", "--out", "run", "--epochs", "1"],
        "part-way through epoch 2",
        Some("run"),
    );
    assert!(err.contains("--epochs 2 or more"), "{err}");
    assert!(
        before == run_files(),
        "the refusal changed the run directory"
    );
    sb.succeeds(&["train", "--resume", "--out", "run", "--epochs", "2"]);
    let done = Checkpoint::load(&ckpt).unwrap();
    assert_eq!(done.meta("epochs_done"), Some("2"));
    assert!(!part_way(&done));
}

/// A `.tmp` left by a killed write is removed when the next run starts, and the log is
/// rebuilt from the checkpoint (here: a log that lost its last line).
#[test]
fn stale_tmp_is_removed_and_the_log_rebuilt_on_resume() {
    let sb = Sandbox::new("stale-tmp");
    sb.succeeds(&tiny_train("run", &["--epochs", "2"]));
    write_file(&sb.path("run/checkpoint.safetensors.tmp"), &[0u8; 4096]);
    let log = sb.path("run/train_log.jsonl");
    let text = std::fs::read_to_string(&log).unwrap();
    write_file(&log, text.lines().next().unwrap().as_bytes());
    let err = sb.succeeds(&["train", "--resume", "--out", "run", "--epochs", "3"]);
    assert!(err.contains("removing"), "{err}");
    assert!(!sb.path("run/checkpoint.safetensors.tmp").exists());
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(text.lines().count(), 3, "{text}");
}

/// A checkpoint that cannot be written (the disk full: a file-size limit, with SIGXFSZ ignored,
/// makes the write fail as ENOSPC would) leaves no partial `.tmp` behind, and the message says
/// which checkpoint is kept. The run then resumes from that checkpoint once there is room.
#[test]
fn a_failed_save_removes_its_tmp_and_names_the_checkpoint_kept() {
    let sb = Sandbox::new("full-disk");
    sb.succeeds(&tiny_train("run", &[]));
    let ckpt = sb.path("run/checkpoint.safetensors");
    let before = std::fs::read(&ckpt).unwrap();
    // bash's `ulimit -f` counts 1024-byte blocks; half the checkpoint fits, the log easily.
    let limit_blocks = (before.len() / 1024 / 2).max(1);
    let out = Command::new("bash")
        .current_dir(&sb.dir)
        .env("ROBUST_DML_DEVICE", "cpu")
        .arg("-c")
        .arg(format!(
            "trap '' XFSZ; ulimit -f {limit_blocks}; exec \"$0\" \"$@\""
        ))
        .arg(BIN)
        .args(["train", "--resume", "--out", "run", "--epochs", "2"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("could not save the checkpoint of epoch 2"),
        "{err}"
    );
    assert!(
        err.contains("the checkpoint of epoch 1 is kept") && err.contains("--resume"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert!(!sb.path("run/checkpoint.safetensors.tmp").exists());
    assert_eq!(
        std::fs::read(&ckpt).unwrap(),
        before,
        "the old checkpoint is whole"
    );
    sb.succeeds(&["train", "--resume", "--out", "run", "--epochs", "2"]);
    let log = std::fs::read_to_string(sb.path("run/train_log.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 2, "{log}");
}

// ---------------------------------------------------------------- outputs of embed

#[test]
fn embed_writes_only_to_new_paths_or_regular_files_with_overwrite() {
    let sb = Sandbox::with_trained_run("embed-out");
    write_tensor_file(
        &sb.path("x.safetensors"),
        "input",
        &[2, 3, 16, 16],
        vec![0.5; 2 * 3 * 256],
    );
    let embed = |output: &'static str, extra: &[&'static str]| {
        let mut v = vec![
            "embed",
            "--arch",
            "c2f2",
            "--weights",
            "run/checkpoint.safetensors",
            "--input",
            "x.safetensors",
            "--output",
            output,
        ];
        v.extend_from_slice(extra);
        v
    };
    sb.refuses(&embed("/dev/null", &[]), "a device", None);
    sb.refuses(
        &embed("run/checkpoint.safetensors", &["--overwrite"]),
        "also an input",
        None,
    );
    sb.refuses(
        &embed("x.safetensors", &["--overwrite"]),
        "also an input",
        None,
    );
    sb.refuses(&embed("run", &[]), "a directory", None);
    sb.refuses(&embed("nodir/e.safetensors", &[]), "does not exist", None);
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(sb.path("target"), sb.path("link")).unwrap();
        sb.refuses(&embed("link", &[]), "symbolic link", None);
    }
    // A training checkpoint is used as stored: its settings decide, conflicting flags are named.
    sb.refuses(
        &embed("e.safetensors", &["--embedding-dim", "4"]),
        "--embedding-dim 4 (it has 8)",
        None,
    );
    sb.refuses(
        &[
            "embed",
            "--arch",
            "mobilenet-v2",
            "--weights",
            "run/checkpoint.safetensors",
            "--input",
            "x.safetensors",
            "--output",
            "e.safetensors",
        ],
        "training checkpoint",
        None,
    );
    sb.succeeds(&embed("e.safetensors", &[]));
    sb.refuses(&embed("e.safetensors", &[]), "--overwrite", None);
    sb.succeeds(&embed("e.safetensors", &["--overwrite"]));
    write_tensor_file(
        &sb.path("empty.safetensors"),
        "input",
        &[0, 3, 16, 16],
        vec![],
    );
    sb.refuses(
        &[
            "embed",
            "--arch",
            "c2f2",
            "--weights",
            "run/checkpoint.safetensors",
            "--input",
            "empty.safetensors",
            "--output",
            "e2.safetensors",
        ],
        "at least 1",
        None,
    );
}

// ---------------------------------------------------------------- bad data files

fn fashion_dir(sb: &Sandbox, images: &[u8], labels: &[u8]) {
    let d = sb.path("fm");
    std::fs::create_dir_all(&d).unwrap();
    for split in ["train", "t10k"] {
        write_file(&d.join(format!("{split}-images-idx3-ubyte")), images);
        write_file(&d.join(format!("{split}-labels-idx1-ubyte")), labels);
    }
}

#[test]
fn hostile_idx_files_are_refused_without_panicking() {
    let sb = Sandbox::new("idx");
    let fm = ["--dataset", "fashion-mnist", "--data-dir", "fm"];
    // Dimensions whose product overflows.
    fashion_dir(
        &sb,
        &idx(&[1 << 22, 1 << 21, 1 << 21], &[]),
        &idx(&[1], &[0]),
    );
    sb.refuses(&tiny_train("run", &fm), "too large", Some("run"));
    // 0x0 images.
    fashion_dir(&sb, &idx(&[2, 0, 0], &[]), &idx(&[2], &[0, 1]));
    sb.refuses(&tiny_train("run", &fm), "0x0", Some("run"));
    // Truncated data.
    fashion_dir(&sb, &idx(&[2, 28, 28], &[0; 100]), &idx(&[2], &[0, 1]));
    sb.refuses(&tiny_train("run", &fm), "need", Some("run"));
    // Not IDX at all.
    fashion_dir(&sb, b"hello", b"world");
    sb.refuses(&tiny_train("run", &fm), "not an IDX file", Some("run"));
}

/// Aliases: torchvision's and Cadene's spellings of the architectures.
#[test]
fn arch_aliases_are_accepted() {
    let sb = Sandbox::new("alias");
    for alias in ["mobilenet_v2", "bn_inception"] {
        // Accepted by the parser: the refusal comes from the (deliberately bad) image size.
        sb.refuses(
            &tiny_train("run", &["--arch", alias, "--image-size", "8"]),
            "smallest input is 32x32",
            Some("run"),
        );
    }
}

/// eval without an attack prints no PGD row; the template scenario's JSON has no NMI or F1.
#[test]
fn eval_prints_only_what_it_measured() {
    let sb = Sandbox::with_trained_run("eval-out");
    let out = sb.succeeds(&["eval", "--checkpoint", "run/checkpoint.safetensors"]);
    assert!(!out.contains("PGD"), "{out}");
    let out = sb.run(&[
        "attack",
        "--checkpoint",
        "run/checkpoint.safetensors",
        "--steps",
        "1",
        "--json",
        "--scenario",
        "template",
    ]);
    assert!(out.status.success());
    // stdout is the JSON alone; progress went to stderr as one line per phase (no bar redraws
    // when stderr is not a terminal).
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("PGD-1 at eps") && err.contains(" img in "),
        "{err}"
    );
    assert!(
        !err.contains('\r'),
        "a progress bar was drawn into a non-terminal: {err}"
    );
    let t = &v["pgd_template"];
    assert!(t["recall"].is_array(), "{v}");
    assert!(t.get("nmi").is_none_or(|n| n.is_null()), "{v}");
    assert!(t.get("f1").is_none_or(|n| n.is_null()), "{v}");
    // Another dataset: both are named.
    sb.refuses(
        &[
            "eval",
            "--checkpoint",
            "run/checkpoint.safetensors",
            "--dataset",
            "fashion-mnist",
            "--data-dir",
            "nowhere",
        ],
        "fashion",
        None,
    );
}

/// `attack --suite ranking --gtm-target robrank-code` runs GTM with robrank's coded target and
/// says so in the JSON; an unknown target is refused with the values it may take.
#[test]
fn ranking_suite_takes_robranks_gtm_target() {
    let sb = Sandbox::with_trained_run("gtm-target");
    let base = [
        "attack",
        "--checkpoint",
        "run/checkpoint.safetensors",
        "--suite",
        "ranking",
        "--queries",
        "3",
        "--json",
    ];
    let out = sb.run(&[&base[..], &["--gtm-target", "robrank-code"]].concat());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let r = &v;
    assert_eq!(r["gtm_target"], "robrank-code", "{v}");
    let labels: Vec<&str> = r["attacks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["attack"].as_str().unwrap())
        .collect();
    assert!(labels.contains(&"GTM (robrank's target)"), "{labels:?}");
    assert!(r["attacked"]["gtm"].as_f64().unwrap().is_finite(), "{v}");
    // The suite reports its progress on stderr (one line when stderr is not a terminal), and
    // stdout stays the JSON alone.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("ranking suite rob28 (9 attacks): 3 queries in"),
        "{stderr}"
    );
    let err = sb.refuses(
        &[&base[..], &["--gtm-target", "random"]].concat(),
        "robrank-code",
        None,
    );
    assert!(err.contains("nearest"), "{err}");
}

/// The experiment command's run directory follows the same rules.
#[test]
fn experiment_refuses_bad_settings_and_foreign_run_directories() {
    let sb = Sandbox::new("experiment");
    sb.refuses(
        &["experiment", "--epochs", "0", "--out", "exp"],
        "--epochs 0",
        Some("exp"),
    );
    sb.refuses(
        &["experiment", "--trades-lambda", "nan", "--out", "exp"],
        "--trades-lambda",
        Some("exp"),
    );
    sb.refuses(
        &["experiment", "--methods", "none,at,none", "--out", "exp"],
        "lists none twice",
        Some("exp"),
    );
    write_file(&sb.path("afile"), b"x");
    sb.refuses(&["experiment", "--out", "afile"], "not a directory", None);
    std::fs::create_dir_all(sb.path("exp")).unwrap();
    // A half-written settings file is named, never taken for "no settings".
    write_file(&sb.path("exp/config.json"), b"{\"dataset\": \"oth");
    sb.refuses(
        &["experiment", "--out", "exp", "--max-steps", "1"],
        "not a complete experiment settings file",
        None,
    );
    write_file(&sb.path("exp/config.json"), b"{\"dataset\": \"other\"}");
    sb.refuses(
        &["experiment", "--out", "exp", "--max-steps", "1"],
        "not a complete experiment settings file",
        None,
    );
    // --overwrite replaces the run's own files and leaves the user's.
    write_file(&sb.path("exp/notes.txt"), b"mine");
    sb.succeeds(&[
        "experiment",
        "--dataset",
        "synthetic",
        "--out",
        "exp",
        "--overwrite",
        "--methods",
        "none",
        "--epochs",
        "1",
        "--max-steps",
        "1",
        "--test-samples",
        "40",
    ]);
    let config = std::fs::read_to_string(sb.path("exp/config.json")).unwrap();
    assert!(config.contains("\"synthetic\""), "{config}");
    assert_eq!(std::fs::read(sb.path("exp/notes.txt")).unwrap(), b"mine");
    // Both curves start at the clean point (0 steps, eps 0), on the same images.
    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(sb.path("exp/none/seed0/report.json")).unwrap(),
    )
    .unwrap();
    let (steps, eps) = (&report["steps_curve"], &report["eps_curve"]);
    assert_eq!(steps[0]["x"], 0.0, "{report}");
    assert_eq!(eps[0]["x"], 0.0, "{report}");
    assert_eq!(steps[0]["recall1"], eps[0]["recall1"], "{report}");
    assert_eq!(report["test_samples"], 40, "{report}");
}

/// Degenerate data is accepted but never silently: empty classes, single-image classes and
/// too few classes are named.
#[test]
fn degenerate_datasets_are_warned_about() {
    use robust_dml::data::{Dataset, ImageSource, MemImage, Sample, SkipSummary};
    let sample = |label| Sample {
        source: ImageSource::Memory(MemImage::new(1, 1, 1, vec![0]).unwrap()),
        label,
    };
    let ds = Dataset {
        name: "imagefolder".into(),
        train: vec![sample(0), sample(0)],
        test: vec![sample(0), sample(1), sample(1)],
        query_count: None,
        train_classes: vec!["cat".into(), "empty_class".into()],
        test_classes: vec!["dog".into(), "cow".into()],
        skipped: SkipSummary::default(),
    };
    let w = ds.warnings().join("\n");
    assert!(w.contains("no images") && w.contains("empty_class"), "{w}");
    assert!(w.contains("single image"), "{w}");
    assert!(w.contains("only 2 test classes"), "{w}");
    let fine = Dataset {
        train: (0..10).map(|i| sample(i % 5)).collect(),
        test: (0..10).map(|i| sample(i % 5)).collect(),
        train_classes: (0..5).map(|i| i.to_string()).collect(),
        test_classes: (0..5).map(|i| i.to_string()).collect(),
        ..ds
    };
    assert!(fine.warnings().is_empty(), "{:?}", fine.warnings());
}

/// A checkpoint evaluated on a dataset with another number of classes names both datasets.
#[test]
fn a_checkpoint_on_another_dataset_names_both() {
    let sb = Sandbox::with_trained_run("other-dataset");
    let mut ck = Checkpoint::load(sb.path("run/checkpoint.safetensors")).unwrap();
    let proxies = ck.tensors.get_mut("member0/proxies").unwrap();
    proxies.shape = vec![5, 8];
    proxies.data.truncate(40);
    ck.set_meta("dataset", "cub200");
    ck.save(sb.path("cub.safetensors")).unwrap();
    let err = sb.refuses(
        &["eval", "--checkpoint", "cub.safetensors"],
        "was trained on cub200 (5 training classes)",
        None,
    );
    assert!(err.contains("--dataset synthetic has 20"), "{err}");
}

/// Mesa's "XDG_RUNTIME_DIR is invalid or not set" does not appear when it is unset: the
/// program gives the loader a private directory first.
#[test]
fn no_mesa_runtime_dir_warning() {
    let sb = Sandbox::new("xdg");
    let out = Command::new(BIN)
        .current_dir(&sb.dir)
        .env_remove("XDG_RUNTIME_DIR")
        .env_remove("ROBUST_DML_DEVICE")
        .args(["eval", "--checkpoint", "missing.safetensors"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(!err.contains("XDG_RUNTIME_DIR"), "{err}");
}

// ---------------------------------------------------------------- special files and the environment

/// Inputs that are not regular files are refused before they are read: `/dev/zero` would never
/// end and a FIFO would block forever.
#[cfg(unix)]
#[test]
fn devices_and_fifos_are_refused_not_read() {
    let sb = Sandbox::with_trained_run("special");
    let fifo = sb.path("pipe.safetensors");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    sb.refuses(&["eval", "--checkpoint", "/dev/zero"], "a device", None);
    sb.refuses(
        &["eval", "--checkpoint", "pipe.safetensors"],
        "a FIFO",
        None,
    );
    sb.refuses(
        &tiny_train("run2", &["--pretrained", "/dev/zero"]),
        "a device",
        Some("run2"),
    );
}

/// An image folder with a FIFO named like an image and a link back to a folder already read:
/// the FIFO is skipped with a warning (as a corrupt image is), the loop is refused naming both
/// folders.
#[cfg(unix)]
#[test]
fn image_folders_with_fifos_and_link_loops() {
    let sb = Sandbox::new("folder-links");
    for class in ["a", "b", "c", "d"] {
        let dir = sb.path(&format!("imgs/{class}"));
        std::fs::create_dir_all(&dir).unwrap();
        for i in 0..3u8 {
            image::RgbImage::from_pixel(8, 8, image::Rgb([i * 80, 0, 0]))
                .save(dir.join(format!("{i}.png")))
                .unwrap();
        }
    }
    let made = Command::new("mkfifo")
        .arg(sb.path("imgs/a/pipe.png"))
        .status()
        .unwrap();
    assert!(made.success());
    let folder = [
        "--dataset",
        "imagefolder",
        "--data-dir",
        "imgs",
        "--batch-size",
        "4",
    ];
    let out = sb.succeeds(&tiny_train("run", &folder));
    assert!(out.contains("pipe.png") && out.contains("FIFO"), "{out}");
    std::os::unix::fs::symlink("../b", sb.path("imgs/b/again")).unwrap();
    sb.refuses(
        &tiny_train("run3", &folder),
        "is the folder imgs/b again",
        Some("run3"),
    );
}

/// The environment is input too: a thread count rayon would ignore or try to honour, and an
/// adapter name that matches nothing (said once, with the adapters there are).
#[test]
fn bad_environment_values_are_named() {
    let sb = Sandbox::new("env");
    for (value, fragment) in [
        ("abc", "not a whole number"),
        ("100000", "too many threads"),
    ] {
        let out = sb
            .command(&tiny_train("run", &[]))
            .env("RAYON_NUM_THREADS", value)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(
            err.contains("RAYON_NUM_THREADS") && err.contains(fragment),
            "{err}"
        );
    }
    let out = sb
        .command(&tiny_train("run", &[]))
        .env("ROBUST_DML_DEVICE", "no-such-adapter")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("no adapter name contains 'no-such-adapter'"),
        "{err}"
    );
    assert_eq!(err.matches("no GPU adapter found").count(), 1, "{err}");
    assert!(!sb.path("run").exists());
}

/// `--eat-split`: an unknown value and a contradiction with the Table 3 methods are refused
/// before any work, and `--resume` refuses a change of it.
#[test]
fn eat_split_is_checked_and_kept_on_resume() {
    let sb = Sandbox::with_trained_run("eat-split");
    sb.refuses(
        &tiny_train("fresh", &["--method", "eat", "--eat-split", "halves"]),
        "--eat-split",
        Some("fresh"),
    );
    sb.refuses(
        &tiny_train(
            "fresh",
            &["--method", "eat-no-split", "--eat-split", "leave-one-out"],
        ),
        "--eat-split leave-one-out contradicts --method eat-no-split",
        Some("fresh"),
    );
    sb.refuses(
        &["train", "--resume", "--out", "run", "--eat-split", "none"],
        "--eat-split none (the run has leave-one-out)",
        Some("run"),
    );
}

/// An experiment's flags for one tiny cell set on the synthetic data: every call with the same
/// `out` shares the settings, whatever its methods and seeds.
fn tiny_cells<'a>(out: &'a str, methods: &'a str, seeds: &'a str) -> Vec<&'a str> {
    vec![
        "experiment",
        "--dataset",
        "synthetic",
        "--out",
        out,
        "--methods",
        methods,
        "--seeds",
        seeds,
        "--epochs",
        "1",
        "--max-steps",
        "1",
        "--test-samples",
        "40",
        "--objective-samples",
        "0",
        "--transfer-samples",
        "0",
    ]
}

/// Locks a cell's `run.lock` from this process, as a running experiment would.
fn hold_cell_lock(path: &Path) -> std::fs::File {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .unwrap();
    f.try_lock().unwrap();
    write!(f, "{}", std::process::id()).unwrap();
    f
}

/// Two processes fill different cells of one experiment at once; each merges what is finished,
/// `report` says which cells of the grid are missing, a cell in use is refused at once naming
/// its holder, and a cell left unfinished is resumed by rerunning its command.
#[test]
fn experiment_cells_run_in_parallel_and_merge() {
    let sb = Sandbox::new("cells");
    let mut a = sb.spawn(&tiny_cells("exp", "none", "0,1"));
    let mut b = sb.spawn(&tiny_cells("exp", "at", "0"));
    for child in [&mut a, &mut b] {
        let status = child.wait().unwrap();
        let mut err = String::new();
        std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
        assert!(status.success(), "{err}");
    }
    for cell in ["none/seed0", "none/seed1", "at/seed0"] {
        assert!(
            sb.path(&format!("exp/{cell}/report.json")).is_file(),
            "{cell}"
        );
    }
    // The last merge holds every finished cell; the grid's hole is named.
    let out = sb.succeeds(&["report", "exp"]);
    assert!(
        out.contains("cell at, seed 1 is not in the tables: not started"),
        "{out}"
    );
    assert!(out.contains("--methods at --seeds 1"), "{out}");
    let table = std::fs::read_to_string(sb.path("exp/table.md")).unwrap();
    assert!(table.contains("| seeds |"), "{table}");
    assert!(table.contains("| PAL | 0, 1 | clean |"), "{table}");
    assert!(table.contains(" ± "), "{table}");
    assert!(table.contains("#### Sanity: PAL, seed 1"), "{table}");
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(sb.path("exp/metrics.json")).unwrap())
            .unwrap();
    let seeds: Vec<(String, u64)> = metrics
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["method"].as_str().unwrap().into(),
                r["seed"].as_u64().unwrap(),
            )
        })
        .collect();
    let want = [("none", 0), ("none", 1), ("at", 0)].map(|(m, s)| (m.to_string(), s));
    assert_eq!(seeds, want, "every seed's row, once");
    let html = std::fs::read_to_string(sb.path("exp/report.html")).unwrap();
    assert!(html.contains("<th>seeds</th>") && html.contains("standard deviation"));

    // A cell in use by another process: refused at once, naming it; `report` lists it.
    let lock = hold_cell_lock(&sb.path("exp/at/seed1/run.lock"));
    let me = std::process::id();
    let refused = sb.run(&tiny_cells("exp", "at", "1"));
    let err = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{err}");
    assert!(err.contains(&format!("in use by process {me}")), "{err}");
    let out = sb.succeeds(&["report", "exp"]);
    assert!(
        out.contains("cell at, seed 1 is not in the tables: started and not finished"),
        "{out}"
    );
    drop(lock);
    // Released (as when its holder is killed): the cell's own command runs it.
    let out = sb.succeeds(&tiny_cells("exp", "at", "1"));
    assert!(out.contains("| + AT | 0, 1 | PGD |"), "{out}");
    assert!(!out.contains("not in the tables"), "{out}");
    // Every cell is done: a rerun of the first command redoes nothing.
    let out = sb.succeeds(&tiny_cells("exp", "none", "0,1"));
    assert!(out.contains("already done"), "{out}");
}

/// The new flags and files, as a careless or hostile user meets them.
#[test]
fn experiment_cells_refuse_duplicate_seeds_and_foreign_cells() {
    let sb = Sandbox::new("cells-hostile");
    sb.refuses(
        &tiny_cells("exp", "none", "1,1"),
        "lists 1 twice",
        Some("exp"),
    );
    sb.refuses(&tiny_cells("exp", "none", "-1"), "--seeds", Some("exp"));
    sb.refuses(&["report", "nowhere"], "no config.json", Some("nowhere"));
    sb.succeeds(&tiny_cells("one", "none", "0"));
    // A cell of another experiment (other settings) copied into this one's grid is refused by
    // name before any work, and left out of the merge.
    let mut other = tiny_cells("two", "none", "0");
    other.extend(["--trades-lambda", "3"]);
    let dir = sb.path("two/none/seed0");
    std::fs::create_dir_all(&dir).unwrap();
    for name in ["cell.json", "report.json"] {
        std::fs::copy(sb.path("one/none/seed0").join(name), dir.join(name)).unwrap();
    }
    sb.refuses(
        &other,
        "belongs to an experiment with other settings",
        Some("two"),
    );
    let out = sb.succeeds(&["report", "two"]);
    assert!(
        out.contains("cell none, seed 0 is not in the tables: left out"),
        "{out}"
    );
}

/// kill -9 of a cell after its first checkpoint: `report` lists it as not finished, and its own
/// command resumes it from the checkpoint instead of starting over.
#[test]
fn a_killed_cell_is_listed_and_resumed() {
    let sb = Sandbox::new("cell-kill");
    let mut args = tiny_cells("exp", "none", "0");
    let epochs = args.iter().position(|a| *a == "--epochs").unwrap();
    args[epochs + 1] = "2";
    let mut child = sb.spawn(&args);
    let ckpt = sb.path("exp/none/seed0/checkpoint.safetensors");
    let start = Instant::now();
    while !ckpt.exists() {
        assert!(start.elapsed() < Duration::from_secs(120), "no checkpoint");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        !sb.path("exp/none/seed0/report.json").exists(),
        "killed before its evaluation ended"
    );
    let out = sb.succeeds(&["report", "exp"]);
    assert!(
        out.contains("cell none, seed 0 is not in the tables: started and not finished"),
        "{out}"
    );
    let out = sb.succeeds(&args);
    assert!(out.contains("resuming none, seed 0"), "{out}");
    assert!(out.contains("| PAL | PGD |"), "{out}");
}
