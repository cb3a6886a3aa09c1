//! The whole-program part of `benches/gpu-check.sh`: the adapter, its driver and limits, one
//! timed training epoch of MobileNetV2 (Proxy Anchor, no defense) at 224x224 and batch 64 on
//! synthetic images, and a PGD-10 evaluation (8/255, embedding shift) of 1,000 test images.
//!
//! `cargo bench --bench gpu_check [-- --small]`: `--small` shrinks every size (32x32, the
//! smallest MobileNetV2 input; batch 8; two dozen images) so that the same path can be dry-run
//! on a software adapter.

use std::time::Instant;

use robust_dml::config::{Objective, PgdConfig};
use robust_dml::data::{self, DatasetKind, SyntheticConfig};
use robust_dml::engine::Device;
use robust_dml::pipeline::experiment::{evaluate_run, EvalPlan, StrengthPlan};
use robust_dml::pipeline::train::{Arch, Run, TrainConfig};
use robust_dml::robust::defense::Method;

/// Sizes of one check.
struct Sizes {
    image_size: usize,
    batch: usize,
    /// Synthetic classes per split (the dataset has twice as many: half train, half test).
    classes: usize,
    train_per_class: usize,
    test_per_class: usize,
}

const FULL: Sizes = Sizes {
    image_size: 224,
    batch: 64,
    classes: 10,
    train_per_class: 128, // 1,280 training images: 20 steps
    test_per_class: 100,  // 1,000 attacked test images
};

const SMALL: Sizes = Sizes {
    image_size: 32,
    batch: 8,
    classes: 2,
    train_per_class: 8, // 16 training images: 2 steps
    test_per_class: 4,  // 8 attacked test images: one batch
};

fn print_adapter(device: &Device) {
    println!("device: {}", device.name());
    if let Device::Gpu(ctx) = device {
        println!("adapter info: {:?}", ctx.info);
        println!("features: {:?}", ctx.features);
        println!("limits: {:?}", ctx.limits);
    }
}

fn main() -> robust_dml::error::Result<()> {
    let small = std::env::args().any(|a| a == "--small");
    let s = if small { SMALL } else { FULL };
    let device = Device::from_env()?;
    print_adapter(&device);
    if !device.is_gpu() && !small {
        return Err(robust_dml::error::Error::Config(
            "no GPU adapter was found, and the full-size check would take hours on the CPU \
             backend: install the GPU's Vulkan driver, or pass --small"
                .into(),
        ));
    }

    let dataset = data::load(
        &DatasetKind::Synthetic(SyntheticConfig {
            num_classes: 2 * s.classes,
            train_per_class: s.train_per_class,
            test_per_class: s.test_per_class,
            image_size: s.image_size,
            seed: 0,
        }),
        None,
    )?;
    let mut cfg = TrainConfig::new(Arch::MobilenetV2, Method::None);
    cfg.image_size = s.image_size;
    cfg.batch_size = s.batch;
    cfg.epochs = 1;
    cfg.warmup_epochs = 0;
    let name = format!("mnv2_{}", s.image_size);

    let started = Instant::now();
    let mut run = Run::new(cfg, &dataset, &device)?;
    let stats = run.train_epoch(&dataset, 0, true)?;
    device.sync()?;
    println!(
        "bench {name}_train_epoch images={} batch={} seconds={:.2} images_per_s={:.2} loss={:.4} (model setup included: {:.2} s)",
        dataset.train.len(),
        s.batch,
        stats.seconds,
        stats.images_per_second,
        stats.loss,
        started.elapsed().as_secs_f64()
    );

    let mut attack = PgdConfig::new(8.0 / 255.0, 10);
    attack.objective = Objective::EmbeddingShift;
    let plan = EvalPlan {
        attack,
        steps_sweep: vec![],
        eps_sweep: vec![],
        curve_samples: 100,
        max_test_samples: 0,
        batch_size: s.batch,
        seed: 0,
        ranking: None,
        // The timed figure is the PGD-10 evaluation alone.
        strength: StrengthPlan {
            objective_samples: 0,
            transfer_samples: 0,
        },
    };
    let started = Instant::now();
    let report = evaluate_run(&run, &dataset, &plan, &device)?;
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "bench {name}_pgd10_eval images={} batch={} seconds={seconds:.2} images_per_s={:.2} recall1_clean={:.1}% recall1_pgd={:.1}%",
        dataset.test.len(),
        s.batch,
        dataset.test.len() as f64 / seconds,
        report.clean.recall[0],
        report.pgd.recall[0]
    );
    if let Device::Gpu(ctx) = &device {
        println!(
            "note: peak live tensors {:.2} GiB over the check",
            ctx.peak_live_bytes() as f64 / (1u64 << 30) as f64
        );
    }
    Ok(())
}
