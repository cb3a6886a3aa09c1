//! Tensors larger than one storage binding are split, not refused (`engine::split`).
//!
//! A GPU context whose bindings are capped at a few KiB (the device is opened with that limit, so
//! wgpu itself would reject a larger binding) runs every op the models use on tensors over the
//! cap, and must agree with the CPU backend in values and gradients. The cap is shown to bind:
//! an op without a split path fails on the same tensors with `BindingTooLarge`.

use std::sync::{Arc, OnceLock};

use robust_dml::engine::gpu::GpuContext;
use robust_dml::engine::ops::attack::pgd_step;
use robust_dml::engine::ops::batchnorm::{batch_norm_eval, batch_norm_train};
use robust_dml::engine::ops::channels::{
    channel_affine, concat_channels, permute_channels, split_channels,
};
use robust_dml::engine::ops::conv::{conv2d, Conv2dParams};
use robust_dml::engine::ops::elementwise::{add, relu6};
use robust_dml::engine::ops::pool::{avg_pool2d, global_max_pool, max_pool2d, Pool2dParams};
use robust_dml::engine::ops::reduce::sum;
use robust_dml::engine::testing::{
    assert_close, assert_close_network, assert_close_network_l2, assert_parity, gpu_or_skip, randn,
    uniform,
};
use robust_dml::engine::{Device, EngineError, Rng, Tensor};
use robust_dml::nn::embedding::{Backbone, EmbeddingNet};
use robust_dml::nn::layers::ForwardMode;

/// 16 KiB: 4,096 values per binding.
const CAP: u64 = 16 << 10;
/// [20, 5, 9, 7]: 315 values per sample (odd, so that chunk starts need several samples to
/// meet the offset alignment), 6,300 in all, about 1.5x the cap.
const X: [usize; 4] = [20, 5, 9, 7];
/// A plane of 8x6 pixels sends convolutions through the im2col GEMM on CPU adapters.
const X_GEMM: [usize; 4] = [20, 5, 8, 6];

/// GPU contexts by binding cap, made once per cap.
type CappedContexts = std::sync::Mutex<Vec<(u64, Arc<GpuContext>)>>;

fn capped(test: &str, cap: u64) -> Option<Device> {
    static CTX: OnceLock<CappedContexts> = OnceLock::new();
    gpu_or_skip(test)?;
    let mut cache = CTX.get_or_init(Default::default).lock().unwrap();
    if let Some((_, ctx)) = cache.iter().find(|(c, _)| *c == cap) {
        return Some(Device::Gpu(ctx.clone()));
    }
    let ctx = GpuContext::with_binding_cap(cap).expect("a capped GPU context");
    assert!(ctx.max_binding_bytes() <= cap.max(256));
    cache.push((cap, ctx.clone()));
    Some(Device::Gpu(ctx))
}

fn over_cap(dev: &Device, t: &Tensor) {
    let Device::Gpu(ctx) = dev else {
        unreachable!()
    };
    assert!(
        t.numel() as u64 * 4 > ctx.max_binding_bytes(),
        "{:?} fits one binding of {} bytes: this case would not test splitting",
        t.shape(),
        ctx.max_binding_bytes()
    );
}

#[test]
fn the_cap_binds_for_ops_without_a_split() {
    let Some(dev) = capped("the_cap_binds_for_ops_without_a_split", CAP) else {
        return;
    };
    let x = randn(&X, 1).to_device(&dev).unwrap();
    over_cap(&dev, &x);
    // A whole-tensor reduction has no split path: it must fail clearly, not corrupt memory.
    match sum(&x) {
        Err(EngineError::BindingTooLarge { .. }) => {}
        other => panic!("expected BindingTooLarge, got {other:?}"),
    }
    // The values round-trip through a tensor over the cap (copies are not bindings).
    assert_eq!(x.to_vec().unwrap(), randn(&X, 1).to_vec().unwrap());
}

#[test]
fn a_sample_over_the_cap_is_a_clear_error() {
    let Some(dev) = capped("a_sample_over_the_cap_is_a_clear_error", 1024) else {
        return;
    };
    // 315 values a sample, but aligned chunks need several samples: over 1 KiB.
    let x = randn(&X, 2).to_device(&dev).unwrap();
    let err = relu6(&x).map(|_| ()).and_then(|_| {
        let w = randn(&[5, 5, 3, 3], 3).to_device(&dev)?;
        conv2d(&x, &w, None, Conv2dParams::default()).map(|_| ())
    });
    let msg = err
        .expect_err("a chunk over the cap must be refused")
        .to_string();
    assert!(msg.contains("conv2d") && msg.contains("binding"), "{msg}");
}

#[test]
fn convolutions_split_over_the_batch() {
    let Some(dev) = capped("convolutions_split_over_the_batch", CAP) else {
        return;
    };
    for shape in [X, X_GEMM] {
        let x = randn(&shape, 4);
        over_cap(&dev, &x.to_device(&dev).unwrap());
        let dense = Conv2dParams {
            padding: (1, 1),
            ..Default::default()
        };
        let depthwise = Conv2dParams {
            stride: (2, 2),
            padding: (1, 1),
            groups: 5,
            ..Default::default()
        };
        let cases = [
            ("3x3 dense + bias", vec![6, 5, 3, 3], dense, true),
            (
                "1x1 pointwise",
                vec![7, 5, 1, 1],
                Conv2dParams::default(),
                false,
            ),
            ("3x3 depthwise stride 2", vec![5, 1, 3, 3], depthwise, true),
        ];
        for (name, w_shape, p, bias) in cases {
            let mut inputs = vec![x.clone(), randn(&w_shape, 5)];
            if bias {
                inputs.push(randn(&[w_shape[0]], 6));
            }
            assert_parity(
                &format!("{name} on {shape:?}"),
                &dev,
                |t| conv2d(&t[0], &t[1], t.get(2), p),
                &inputs,
                1e-3,
                1e-3,
            );
        }
    }
}

#[test]
fn batch_norm_splits_with_whole_batch_statistics() {
    let Some(dev) = capped("batch_norm_splits_with_whole_batch_statistics", CAP) else {
        return;
    };
    // Chunk reductions by one invocation per channel and by one workgroup per channel; planes of
    // one invocation each, and over a workgroup.
    for shape in [X, [10, 3, 17, 16], [12, 1, 60, 60]] {
        batch_norm_case(&dev, shape);
    }
}

fn batch_norm_case(dev: &Device, shape: [usize; 4]) {
    let dev = dev.clone();
    let c = shape[1];
    // An offset far from zero: the chunks' statistics must be merged stably.
    let x = randn(&shape, 7).to_vec().unwrap();
    let x = Tensor::from_cpu(x.iter().map(|v| 3.0 * v + 40.0).collect(), &shape).unwrap();
    over_cap(&dev, &x.to_device(&dev).unwrap());
    let (gamma, beta) = (uniform(&[c], 0.5, 1.5, 8), randn(&[c], 9));
    let running = |dev: &Device| {
        (
            randn(&[c], 10).to_device(dev).unwrap(),
            uniform(&[c], 0.5, 2.0, 11).to_device(dev).unwrap(),
        )
    };
    let (cpu_rm, cpu_rv) = running(&Device::Cpu);
    let (gpu_rm, gpu_rv) = running(&dev);
    let inputs = [x.clone(), gamma.clone(), beta.clone()];
    let stats = |t: &[Tensor]| -> (Tensor, Tensor) {
        if t[0].is_gpu() {
            (gpu_rm.clone(), gpu_rv.clone())
        } else {
            (cpu_rm.clone(), cpu_rv.clone())
        }
    };
    assert_parity(
        "batch_norm_train",
        &dev,
        |t| {
            let (rm, rv) = stats(t);
            batch_norm_train(&t[0], &t[1], &t[2], &rm, &rv, 0.1, 1e-5)
        },
        &inputs,
        2e-3,
        2e-3,
    );
    let (a, b) = (gpu_rm.to_vec().unwrap(), cpu_rm.to_vec().unwrap());
    assert_close("running mean after a split batch", &a, &b, 1e-4, 1e-5);
    let (a, b) = (gpu_rv.to_vec().unwrap(), cpu_rv.to_vec().unwrap());
    assert_close("running var after a split batch", &a, &b, 1e-3, 1e-4);
    assert_parity(
        "batch_norm_eval",
        &dev,
        |t| {
            let (rm, rv) = stats(t);
            batch_norm_eval(&t[0], &t[1], &t[2], &rm, &rv, 1e-5)
        },
        &inputs,
        1e-3,
        1e-3,
    );
}

#[test]
fn elementwise_pooling_and_channel_ops_split() {
    let Some(dev) = capped("elementwise_pooling_and_channel_ops_split", CAP) else {
        return;
    };
    let x = randn(&X, 12);
    let y = randn(&X, 13);
    over_cap(&dev, &x.to_device(&dev).unwrap());
    // Spread over the ReLU6 knees.
    let x6 = Tensor::from_cpu(
        x.to_vec().unwrap().iter().map(|v| 4.0 * v + 2.0).collect(),
        &X,
    )
    .unwrap();
    assert_parity("relu6", &dev, |t| relu6(&t[0]), &[x6], 1e-5, 1e-5);
    assert_parity(
        "add",
        &dev,
        |t| add(&t[0], &t[1]),
        &[x.clone(), y.clone()],
        1e-5,
        1e-5,
    );
    let pool = Pool2dParams {
        kernel: (3, 3),
        stride: (2, 2),
        padding: (1, 1),
        ceil_mode: true,
        count_include_pad: false,
    };
    let one = [x.clone()];
    assert_parity(
        "max_pool2d",
        &dev,
        |t| max_pool2d(&t[0], pool),
        &one,
        1e-5,
        1e-5,
    );
    assert_parity(
        "avg_pool2d",
        &dev,
        |t| avg_pool2d(&t[0], pool),
        &one,
        1e-5,
        1e-5,
    );
    assert_parity(
        "global_max_pool",
        &dev,
        |t| global_max_pool(&t[0]),
        &one,
        1e-5,
        1e-5,
    );
    assert_parity(
        "concat_channels",
        &dev,
        |t| concat_channels(&[&t[0], &t[1]]),
        &[x.clone(), randn(&[20, 2, 9, 7], 18)],
        1e-6,
        1e-6,
    );
    assert_parity(
        "split_channels",
        &dev,
        |t| {
            let parts = split_channels(&t[0], &[2, 3])?;
            concat_channels(&[&parts[1], &parts[0]])
        },
        &one,
        1e-5,
        1e-5,
    );
    assert_parity(
        "permute_channels",
        &dev,
        |t| permute_channels(&t[0], &[4, 2, 0, 1, 3]),
        &one,
        1e-6,
        1e-6,
    );
    let (scale, shift) = ([0.5, -1.0, 2.0, 1.5, 0.25], [0.1, 0.2, -0.3, 0.0, 1.0]);
    assert_parity(
        "channel_affine",
        &dev,
        |t| channel_affine(&t[0], &scale, &shift),
        &one,
        1e-5,
        1e-5,
    );
    // The PGD step runs over flat ranges.
    let (adv, grad, orig) = (
        uniform(&X, 0.0, 1.0, 15),
        randn(&X, 16),
        uniform(&X, 0.0, 1.0, 17),
    );
    let step = |d: &Device| {
        let on = |t: &Tensor| t.to_device(d).unwrap();
        pgd_step(&on(&adv), &on(&grad), &on(&orig), 0.01, 0.03)
            .unwrap()
            .to_vec()
            .unwrap()
    };
    assert_close("pgd_step", &step(&dev), &step(&Device::Cpu), 1e-6, 0.0);
}

/// A whole MobileNetV2 whose largest activations exceed the cap agrees with the CPU: in
/// frozen-BN mode (Proxy Anchor's training mode) the embeddings and the gradients of the input
/// and of every parameter; in train mode the embeddings and the updated running statistics.
/// (Train-mode gradients of a whole random network are not compared: nearly constant channels
/// ahead of batch norms on 2x2 planes make them ill-conditioned. A 1e-6 relative change of the
/// input moves some by 10% on the CPU alone. `batch_norm_splits_with_whole_batch_statistics`
/// checks that backward op by op.)
#[test]
fn mobilenet_v2_runs_with_activations_over_the_cap() {
    // 1 MiB: over the largest weight (the last 1x1 conv, 800 KiB), under block 1's 48-channel
    // 32x32 expansion at batch 8 (1.5 MiB), which must split, as [64, 96, 112, 112] must on
    // an adapter with 128 MiB bindings at batch 64 and 224x224.
    let Some(gpu) = capped("mobilenet_v2_runs_with_activations_over_the_cap", 1 << 20) else {
        return;
    };
    let cpu_model = EmbeddingNet::new(
        Backbone::MobileNetV2 { width: 0.5 },
        8,
        &Device::Cpu,
        &mut Rng::new(21),
    )
    .unwrap();
    let gpu_model = cpu_model.to_device(&gpu).unwrap();
    let x = uniform(&[8, 3, 64, 64], 0.0, 1.0, 22);
    let w = randn(&[8, 8], 23);
    let run = |model: &EmbeddingNet, dev: &Device| {
        let xv = x.to_device(dev).unwrap().var();
        let e = model.forward(&xv, ForwardMode::FrozenBn).unwrap();
        let emb = e.to_vec().unwrap();
        let grads = robust_dml::engine::tape::backward_with(e, w.to_device(dev).unwrap()).unwrap();
        let mut out = vec![
            ("embedding".to_string(), emb),
            (
                "input".to_string(),
                grads.get(&xv).unwrap().to_vec().unwrap(),
            ),
        ];
        for (name, p) in model.parameters() {
            out.push((name, grads.get(&p).unwrap().to_vec().unwrap()));
        }
        out
    };
    let want = run(&cpu_model, &Device::Cpu);
    let Device::Gpu(ctx) = &gpu else {
        unreachable!()
    };
    let splits_before = ctx.split_ops();
    let got = run(&gpu_model, &gpu);
    // The expansion's conv, batch norm and ReLU6, forward and backward, at least.
    assert!(
        ctx.split_ops() - splits_before >= 6,
        "{} split ops",
        ctx.split_ops() - splits_before
    );
    // The embedding is a continuous function of the rounding; the gradients are not (see
    // assert_close_network_l2), so they are compared by norm, per tensor.
    assert_close_network("frozen-BN", &got[..1], &want[..1], 2e-3, 1e-2);
    assert_close_network_l2("frozen-BN", &got[1..], &want[1..], 0.1);
    let train = |model: &EmbeddingNet, dev: &Device| {
        let xd = x.to_device(dev).unwrap();
        let e = robust_dml::engine::no_grad(|| model.forward(&xd, ForwardMode::Train)).unwrap();
        let mut out = vec![("embedding".to_string(), e.to_vec().unwrap())];
        for (name, t) in model.params().buffers() {
            out.push((name, t.to_vec().unwrap()));
        }
        out
    };
    let want = train(&cpu_model, &Device::Cpu);
    let got = train(&gpu_model, &gpu);
    assert!(want.len() > 50, "running statistics are compared");
    for ((name, g), (_, c)) in got.iter().zip(&want) {
        assert_close(&format!("train-mode {name}"), g, c, 1e-4, 1e-3);
    }
}
