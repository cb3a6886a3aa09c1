//! End-to-end training on the built-in synthetic dataset: training beats a random model by a
//! wide margin, and a run resumed from its checkpoint continues bit for bit.

mod common;

use robust_dml::data::{self, DatasetKind, SyntheticConfig};
use robust_dml::engine::Device;
use robust_dml::nn::checkpoint::Checkpoint;
use robust_dml::pipeline::evaluate::{embed_set, full_metrics, EvalContext, EvalSet};
use robust_dml::pipeline::train::{Arch, Run, TrainConfig, Trained, CHECKPOINT_FILE};
use robust_dml::robust::defense::Method;

fn device() -> Device {
    // Training runs on the GPU when there is one (llvmpipe in CI), else on the CPU reference.
    Device::gpu().unwrap_or(Device::Cpu)
}

fn small_config() -> TrainConfig {
    let mut c = TrainConfig::new(Arch::C2f2, Method::None);
    c.image_size = 32;
    c.embedding_dim = 32;
    c.epochs = 6;
    c.batch_size = 30;
    c.lr = 1e-3;
    c.warmup_epochs = 1;
    c.workers = 0;
    c
}

fn dataset() -> data::Dataset {
    let synth = SyntheticConfig {
        num_classes: 12,
        train_per_class: 20,
        test_per_class: 10,
        image_size: 32,
        seed: 3,
    };
    data::load(&DatasetKind::Synthetic(synth), None).unwrap()
}

fn recall1(run: &Run, ds: &data::Dataset, d: &Device) -> f64 {
    let set = EvalSet::of(ds);
    let ctx = EvalContext {
        nets: &[&run.members[0].net],
        set: &set,
        image_size: run.cfg.image_size,
        batch_size: 60,
        workers: 0,
        device: d,
    };
    let e = embed_set(&ctx, None).unwrap();
    full_metrics(&e.clean[0], &set, e.dim, d, 0).unwrap().recall[0]
}

#[test]
fn training_beats_a_random_model() {
    let d = device();
    let ds = dataset();
    let mut run = Run::new(small_config(), &ds, &d).unwrap();
    let before = recall1(&run, &ds, &d);
    let dir = tempdir("train-beats-random");
    run.train(&ds, &dir, true).unwrap();
    let after = recall1(&run, &ds, &d);
    eprintln!("Recall@1: random model {before:.1}%, trained {after:.1}%");
    assert!(
        after > before + 10.0,
        "training did not help: {before:.1}% -> {after:.1}%"
    );
    let log = std::fs::read_to_string(dir.join("train_log.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 6, "one JSON line per epoch");
}

#[test]
fn resume_continues_bit_for_bit() {
    resume_continues_bit_for_bit_on(device());
}

/// The fast CPU kernels reduce in a fixed order, so the CPU backend resumes bit for bit too.
#[test]
fn resume_continues_bit_for_bit_on_the_cpu_backend() {
    resume_continues_bit_for_bit_on(Device::Cpu);
}

fn resume_continues_bit_for_bit_on(d: Device) {
    let ds = dataset();
    let mut cfg = small_config();
    cfg.epochs = 3;
    cfg.defense = robust_dml::robust::defense::DefenseConfig::new(Method::At);
    cfg.defense.attack = robust_dml::config::PgdConfig::new(8.0 / 255.0, 1);
    // Straight through.
    let straight_dir = tempdir("resume-straight");
    let mut straight = Run::new(cfg.clone(), &ds, &d).unwrap();
    straight.train(&ds, &straight_dir, true).unwrap();
    // Interrupted after epoch 2, then resumed from the checkpoint in a fresh run.
    let dir = tempdir("resume-split");
    let mut first = Run::new(
        TrainConfig {
            epochs: 2,
            ..cfg.clone()
        },
        &ds,
        &d,
    )
    .unwrap();
    first.train(&ds, &dir, true).unwrap();
    // The RNG state is explicit metadata, checked against the seed and epoch on load.
    let mut ck = robust_dml::nn::checkpoint::Checkpoint::load(dir.join(CHECKPOINT_FILE)).unwrap();
    let state = ck.meta("rng_state").unwrap().to_string();
    assert!(state.contains("\"next_epoch\":2"), "{state}");
    ck.set_meta(
        "rng_state",
        state.replace("\"next_epoch\":2", "\"next_epoch\":1"),
    );
    let tampered = dir.join("tampered.safetensors");
    ck.save(&tampered).unwrap();
    let err = Run::load(&tampered, &ds, &d)
        .err()
        .expect("a tampered RNG state is refused");
    assert!(err.to_string().contains("RNG state"), "{err}");
    let mut resumed = Run::load(&dir.join(CHECKPOINT_FILE), &ds, &d).unwrap();
    assert_eq!(resumed.epochs_done, 2);
    resumed.cfg.epochs = 3;
    resumed.train(&ds, &dir, true).unwrap();
    for ((name, a), (_, b)) in straight.members[0]
        .net
        .params()
        .all_trainable()
        .iter()
        .zip(resumed.members[0].net.params().all_trainable())
    {
        assert_eq!(
            a.to_vec().unwrap(),
            b.to_vec().unwrap(),
            "{name} differs after resume"
        );
    }
    assert_eq!(
        straight.members[0].proxies.to_vec().unwrap(),
        resumed.members[0].proxies.to_vec().unwrap()
    );
}

/// A run stopped after any step, inside a member's epoch, at a member's last step or at an
/// epoch's end, and resumed from the checkpoint written there, ends with the same weights, BN
/// statistics, proxies, optimizer moments and logged losses as a run that never stopped.
#[test]
fn a_run_saved_part_way_through_an_epoch_resumes_bit_for_bit() {
    let d = Device::Cpu;
    let ds = dataset();
    let mut cfg = small_config();
    cfg.epochs = 2;
    cfg.max_steps_per_epoch = 3;
    cfg.defense = robust_dml::robust::defense::DefenseConfig::new(Method::Eat);
    cfg.defense.attack = robust_dml::config::PgdConfig::new(8.0 / 255.0, 1);
    let straight_dir = tempdir("mid-epoch-straight");
    let mut straight = Run::new(cfg.clone(), &ds, &d).unwrap();
    assert_eq!(straight.members.len(), 3, "EAT trains an ensemble");
    straight.saves.every = None;
    assert_eq!(
        straight.train(&ds, &straight_dir, true).unwrap(),
        Trained::AllEpochs
    );
    let want = Checkpoint::load(straight_dir.join(CHECKPOINT_FILE)).unwrap();
    // 2 epochs x 3 members x 2 steps (each member trains on a third of the 240 images, in
    // batches of 30): stopping after every step lands inside members, on their last steps
    // and on the epochs' ends; every 5 steps, at other places in each epoch.
    for stride in [1, 5] {
        let dir = tempdir("mid-epoch-split");
        let mut calls = 0;
        loop {
            let mut run = match calls {
                0 => Run::new(cfg.clone(), &ds, &d).unwrap(),
                _ => Run::load(&dir.join(CHECKPOINT_FILE), &ds, &d).unwrap(),
            };
            if calls == 1 && stride == 5 {
                let p = run.progress.clone().expect("stopped inside epoch 1");
                assert_eq!((p.epoch, p.member, p.step), (0, 2, 1), "{p:?}");
                assert_eq!(p.loss_bits.len(), 5);
            }
            run.saves.every = None;
            run.saves.stop_after_steps = Some(stride);
            calls += 1;
            if run.train(&ds, &dir, true).unwrap() == Trained::AllEpochs {
                break;
            }
            assert!(calls <= 12, "the run does not advance");
        }
        assert!(calls >= 3, "stride {stride}: only {calls} calls");
        let got = Checkpoint::load(dir.join(CHECKPOINT_FILE)).unwrap();
        common::assert_same_tensors(&got, &want, &format!("stride {stride}"));
        assert_eq!(got.meta("epochs_done"), Some("2"));
        assert_eq!(
            got.meta("epoch_progress"),
            None,
            "a finished run has no progress"
        );
        let losses = |ck: &Checkpoint| -> Vec<f64> {
            let lines = ck.meta("train_log").unwrap().lines();
            lines
                .map(|l| {
                    serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                        .as_f64()
                        .unwrap()
                })
                .collect()
        };
        assert_eq!(
            losses(&got),
            losses(&want),
            "stride {stride}: logged losses"
        );
    }
}

/// A checkpoint whose record of the unfinished epoch disagrees with the run is refused,
/// naming the problem, instead of resuming at a wrong place.
#[test]
fn a_tampered_epoch_progress_is_refused() {
    let d = Device::Cpu;
    let ds = dataset();
    let mut cfg = small_config();
    cfg.epochs = 2;
    cfg.max_steps_per_epoch = 3;
    let dir = tempdir("mid-epoch-tamper");
    let mut run = Run::new(cfg, &ds, &d).unwrap();
    run.saves.stop_after_steps = Some(2);
    assert_eq!(run.train(&ds, &dir, true).unwrap(), Trained::Stopped);
    let ck = Checkpoint::load(dir.join(CHECKPOINT_FILE)).unwrap();
    let progress = ck.meta("epoch_progress").unwrap().to_string();
    assert!(progress.contains("\"step\":2"), "{progress}");
    let tampered = dir.join("tampered.safetensors");
    for (bad, says) in [
        (
            progress.replace("\"epoch\":0", "\"epoch\":1"),
            "names epoch 2",
        ),
        (
            progress.replace("\"member\":0", "\"member\":5"),
            "names member 6",
        ),
        ("{not json".to_string(), "unreadable"),
    ] {
        let mut ck = ck.clone();
        ck.set_meta("epoch_progress", bad);
        ck.save(&tampered).unwrap();
        let err = Run::load(&tampered, &ds, &d).err().expect("refused");
        assert!(err.to_string().contains(says), "{err}");
    }
}

/// A fresh scratch directory, removed when the test ends (pass or fail): each run of this file
/// writes about 100 MB of checkpoints, and leftovers filled a CI machine's disk.
struct TempDir(std::path::PathBuf);

impl std::ops::Deref for TempDir {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl AsRef<std::path::Path> for TempDir {
    fn as_ref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Unique per call: the resume test runs on both devices at once in this process.
fn tempdir(name: &str) -> TempDir {
    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let d = std::env::temp_dir().join(format!("robust-dml-test-{name}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    TempDir(d)
}

#[test]
fn a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint() {
    let d = device();
    let ds = dataset();
    let mut cfg = small_config();
    cfg.epochs = 1;
    cfg.warmup_epochs = 0;
    cfg.max_steps_per_epoch = 2;
    let dir = tempdir("nan-guard");
    let mut run = Run::new(cfg, &ds, &d).unwrap();
    run.train(&ds, &dir, true).unwrap();
    // Diverged weights (as after a too-large step) make the next loss NaN.
    let p = &run.members[0].proxies;
    let nan = robust_dml::engine::Tensor::full(f32::NAN, p.shape(), &p.device()).unwrap();
    p.assign(&nan).unwrap();
    run.cfg.epochs = 2;
    let err = run.train(&ds, &dir, true).unwrap_err();
    assert!(
        matches!(
            err,
            robust_dml::error::Error::NonFiniteLoss { epoch: 1, .. }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("last good checkpoint"), "{err}");
    let kept = Run::load(&dir.join(CHECKPOINT_FILE), &ds, &d).unwrap();
    assert_eq!(
        kept.epochs_done, 1,
        "the checkpoint moved past the failed epoch"
    );
}
