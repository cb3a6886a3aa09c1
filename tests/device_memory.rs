//! Out of device memory is an error, not a crash: a training step whose tensors exceed the
//! adapter's `max_buffer_size` fails with `Error::DeviceMemory`, which names the model, the
//! batch, the estimated need and a batch size that fits; that batch then trains.

use robust_dml::data::{self, DatasetKind, SyntheticConfig};
use robust_dml::engine::gpu::GpuContext;
use robust_dml::engine::testing::gpu_or_skip;
use robust_dml::engine::{Device, EngineError};
use robust_dml::error::Error;
use robust_dml::pipeline::train::{Arch, Run, TrainConfig};
use robust_dml::robust::defense::Method;

/// 1 MiB buffers: c2f2's largest weight at 8x8 input (the 256 x 1024 layer) just fits, and its
/// first activation, [batch, 32, 8, 8], fits up to batch 128.
const BUFFER_CAP: u64 = 1 << 20;
const TOO_LARGE_BATCH: usize = 256;

fn dataset() -> data::Dataset {
    data::load(
        &DatasetKind::Synthetic(SyntheticConfig {
            num_classes: 4,
            train_per_class: 128,
            test_per_class: 2,
            image_size: 8,
            seed: 0,
        }),
        None,
    )
    .expect("synthetic dataset")
}

fn one_step(
    batch: usize,
    device: &Device,
    dataset: &data::Dataset,
) -> robust_dml::error::Result<()> {
    let mut cfg = TrainConfig::new(Arch::C2f2, Method::None);
    cfg.image_size = 8;
    cfg.batch_size = batch;
    cfg.epochs = 1;
    cfg.warmup_epochs = 0;
    cfg.max_steps_per_epoch = 1;
    cfg.embedding_dim = 16;
    let mut run = Run::new(cfg, dataset, device)?;
    run.train_epoch(dataset, 0, true).map(|_| ())
}

#[test]
fn a_batch_over_max_buffer_size_is_a_typed_error_with_a_batch_that_fits() {
    if gpu_or_skip("a_batch_over_max_buffer_size_is_a_typed_error_with_a_batch_that_fits").is_none()
    {
        return;
    }
    let device = Device::Gpu(GpuContext::with_buffer_cap(BUFFER_CAP).expect("capped device"));
    let dataset = dataset();
    let err = one_step(TOO_LARGE_BATCH, &device, &dataset)
        .expect_err("a batch whose activations exceed max_buffer_size must fail");
    let msg = err.to_string();
    let Error::DeviceMemory {
        model,
        batch,
        need_bytes,
        limit_bytes,
        fitting_batch,
        ..
    } = err
    else {
        panic!("expected Error::DeviceMemory, got: {msg}");
    };
    assert!(model.contains("C2f2"), "{msg}");
    assert_eq!(batch, TOO_LARGE_BATCH, "{msg}");
    assert_eq!(limit_bytes, BUFFER_CAP, "{msg}");
    assert!(need_bytes > limit_bytes, "{msg}");
    assert!(
        fitting_batch > 0 && fitting_batch < TOO_LARGE_BATCH,
        "{msg}"
    );
    assert!(
        msg.contains(&format!("--batch-size {fitting_batch}")),
        "{msg}"
    );
    println!("{msg}");
    one_step(fitting_batch, &device, &dataset)
        .unwrap_or_else(|e| panic!("the suggested batch {fitting_batch} must train: {e}"));
}

#[test]
fn memory_errors_scale_the_batch_and_others_pass_through() {
    let too_large = Error::from(EngineError::BufferTooLarge {
        bytes: 3 << 20,
        limit: 1 << 20,
    })
    .in_step("m", 60);
    assert!(
        matches!(too_large, Error::DeviceMemory { fitting_batch: 20, need_bytes, .. } if need_bytes == 3 << 20),
        "{too_large:?}"
    );
    let refused = Error::from(EngineError::OutOfDeviceMemory {
        bytes: 100,
        live_bytes: 300,
    })
    .in_step("m", 8);
    assert!(
        matches!(
            refused,
            Error::DeviceMemory {
                fitting_batch: 6,
                need_bytes: 400,
                limit_bytes: 300,
                ..
            }
        ),
        "{refused:?}"
    );
    let not_even_one = Error::from(EngineError::BufferTooLarge {
        bytes: 10 << 20,
        limit: 1 << 20,
    })
    .in_step("m", 4);
    assert!(
        not_even_one.to_string().contains("smaller --image-size"),
        "{not_even_one}"
    );
    let other = Error::from(EngineError::Gpu("x".into())).in_step("m", 4);
    assert!(
        matches!(other, Error::Engine(EngineError::Gpu(_))),
        "{other:?}"
    );
}

#[test]
fn every_request_up_to_max_buffer_size_is_served() {
    if gpu_or_skip("every_request_up_to_max_buffer_size_is_served").is_none() {
        return;
    }
    // 1.2 MB: the pool's size bucket for 1.1 MB (1.5 MiB) is over it, the request is not.
    let cap = 1_200_000;
    let ctx = GpuContext::with_buffer_cap(cap).expect("capped device");
    ctx.alloc(1_100_000 / 4)
        .expect("a request under max_buffer_size must be served even where its bucket is over");
    ctx.alloc(cap as usize / 4)
        .expect("a request of exactly max_buffer_size");
    match ctx.alloc(cap as usize / 4 + 1) {
        Err(EngineError::BufferTooLarge { bytes, limit }) => {
            assert_eq!((bytes, limit), (cap + 4, cap))
        }
        other => panic!("expected BufferTooLarge, got {:?}", other.map(|b| b.len())),
    }
}
