//! Models against PyTorch: golden fixtures from tests/fixtures/make_model_fixtures.py
//! (torchvision MobileNetV2, Cadene's BN-Inception, c2f2) on the CPU and the GPU; weight loading
//! (dtypes, errors, partial loads, timm names); checkpoints; the parameter store; a whole
//! MobileNetV2 whose activations exceed one storage binding.

mod common;

use std::collections::BTreeMap;

use common::binding_cap::capped;
use common::{check_fixture, fixture, read_float_tensors, scratch, synthetic_uniform, D};
use robust_dml::engine::testing::{
    assert_close, assert_close_network, assert_close_network_l2, gpu_or_skip, randn, uniform,
};
use robust_dml::engine::{Device, Rng, Tensor};
use robust_dml::nn::weights::{
    map_key, timm_to_torchvision, write_safetensors, FileTensor, KeyAction,
};
use robust_dml::nn::{
    Backbone, Checkpoint, EmbeddingNet, ForwardMode, LoadMode, NnError, ParamKind,
};
use safetensors::Dtype;

#[test]
fn synthetic_generator_matches_python() {
    // Printed by the Python generator for synthetic_uniform('a.weight', (2, 3)).
    let want = [
        0.482_336_8,
        -0.766_024_5,
        1.140_800_4,
        1.349_950_6,
        -1.292_551_6,
        -0.768_291_7,
    ];
    let got = synthetic_uniform("a.weight", &[2, 3]);
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() < 1e-6, "{got:?} vs {want:?}");
    }
}

fn mobilenet() -> Backbone {
    Backbone::MobileNetV2 { width: 0.5 }
}

#[test]
fn mobilenet_v2_matches_torchvision_cpu() {
    check_fixture(
        "mobilenet_v2_w050",
        mobilenet(),
        Some("features.0.1"),
        &Device::Cpu,
        "mnv2-cpu",
    );
}

#[test]
fn bn_inception_matches_cadene_cpu() {
    check_fixture(
        "bn_inception",
        Backbone::BnInception,
        Some("conv1_7x7_s2_bn"),
        &Device::Cpu,
        "bni-cpu",
    );
}

#[test]
fn c2f2_matches_pytorch_cpu() {
    check_fixture(
        "c2f2",
        Backbone::C2f2 {
            input_size: (28, 28),
        },
        None,
        &Device::Cpu,
        "c2f2-cpu",
    );
}

#[test]
fn mobilenet_v2_matches_torchvision_gpu() {
    let Some(gpu) = gpu_or_skip("mobilenet_v2_matches_torchvision_gpu") else {
        return;
    };
    check_fixture(
        "mobilenet_v2_w050",
        mobilenet(),
        Some("features.0.1"),
        &gpu,
        "mnv2-gpu",
    );
}

#[test]
fn bn_inception_matches_cadene_gpu() {
    let Some(gpu) = gpu_or_skip("bn_inception_matches_cadene_gpu") else {
        return;
    };
    check_fixture(
        "bn_inception",
        Backbone::BnInception,
        Some("conv1_7x7_s2_bn"),
        &gpu,
        "bni-gpu",
    );
}

#[test]
fn c2f2_matches_pytorch_gpu() {
    let Some(gpu) = gpu_or_skip("c2f2_matches_pytorch_gpu") else {
        return;
    };
    check_fixture(
        "c2f2",
        Backbone::C2f2 {
            input_size: (28, 28),
        },
        None,
        &gpu,
        "c2f2-gpu",
    );
}

// ------------------------------------------------------------------ loading: dtypes and errors

fn mnv2_model() -> EmbeddingNet {
    EmbeddingNet::new(mobilenet(), D, &Device::Cpu, &mut Rng::new(1)).unwrap()
}

fn mnv2_weights() -> BTreeMap<String, FileTensor> {
    read_float_tensors(&fixture("mobilenet_v2_w050.weights.safetensors")).0
}

#[test]
fn f16_and_bf16_weights_load_exactly_rounded() {
    let dir = scratch("dtypes");
    let weights = mnv2_weights();
    for (dtype, round) in [
        (
            Dtype::F16,
            (|v: f32| half::f16::from_f32(v).to_f32()) as fn(f32) -> f32,
        ),
        (Dtype::BF16, |v: f32| half::bf16::from_f32(v).to_f32()),
    ] {
        let path = dir.join(format!("{dtype:?}.safetensors"));
        write_safetensors(&path, &weights, dtype).unwrap();
        let mut model = mnv2_model();
        let report = model.load_weights(&path, LoadMode::Strict).unwrap();
        assert!(
            report.dtypes.contains(&format!("{dtype:?}")),
            "{}",
            report.summary()
        );
        for key in [
            "features.0.0.weight",
            "features.5.conv.1.1.running_var",
            "embedding.weight",
        ] {
            let got = model.params().by_name(key).unwrap().to_vec().unwrap();
            let want: Vec<f32> = weights[key].data.iter().map(|&v| round(v)).collect();
            assert_eq!(got, want, "{dtype:?} {key}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn missing_file_is_reported() {
    let mut model = mnv2_model();
    let err = model
        .load_weights("/nonexistent/w.safetensors", LoadMode::Strict)
        .unwrap_err();
    assert!(matches!(err, NnError::MissingFile { .. }), "{err}");
    assert!(
        err.to_string().contains("/nonexistent/w.safetensors"),
        "{err}"
    );
}

#[test]
fn truncated_file_is_reported() {
    let dir = scratch("truncated");
    let bytes = std::fs::read(fixture("mobilenet_v2_w050.weights.safetensors")).unwrap();
    let path = dir.join("cut.safetensors");
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = mnv2_model()
        .load_weights(&path, LoadMode::Strict)
        .unwrap_err();
    assert!(matches!(err, NnError::NotSafetensors { .. }), "{err}");
    assert!(err.to_string().contains("cut.safetensors"), "{err}");
    std::fs::write(&path, b"not a weights file").unwrap();
    let err = mnv2_model()
        .load_weights(&path, LoadMode::Strict)
        .unwrap_err();
    assert!(matches!(err, NnError::NotSafetensors { .. }), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn wrong_shape_is_reported() {
    let dir = scratch("shape");
    let mut weights = mnv2_weights();
    weights.insert(
        "embedding.weight".into(),
        FileTensor {
            shape: vec![32, 1280],
            data: vec![0.0; 32 * 1280],
            dtype: "F32".into(),
        },
    );
    let path = dir.join("w.safetensors");
    write_safetensors(&path, &weights, Dtype::F32).unwrap();
    let mut model = mnv2_model();
    let before = model
        .params()
        .by_name("features.0.0.weight")
        .unwrap()
        .to_vec()
        .unwrap();
    let err = model.load_weights(&path, LoadMode::Strict).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, NnError::ShapeMismatch { .. }), "{msg}");
    assert!(
        msg.contains("embedding.weight")
            && msg.contains("[64, 1280]")
            && msg.contains("[32, 1280]"),
        "{msg}"
    );
    // Nothing is written by a failed load.
    assert_eq!(
        model
            .params()
            .by_name("features.0.0.weight")
            .unwrap()
            .to_vec()
            .unwrap(),
        before
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn missing_and_unexpected_keys_are_reported() {
    let dir = scratch("keys");
    let mut weights = mnv2_weights();
    weights.remove("features.3.conv.1.1.running_var");
    let path = dir.join("missing.safetensors");
    write_safetensors(&path, &weights, Dtype::F32).unwrap();
    let err = mnv2_model()
        .load_weights(&path, LoadMode::Strict)
        .unwrap_err();
    assert!(matches!(err, NnError::MissingKey { .. }), "{err}");
    assert!(
        err.to_string().contains("features.3.conv.1.1.running_var"),
        "{err}"
    );

    let mut weights = mnv2_weights();
    weights.insert(
        "features.99.weight".into(),
        FileTensor {
            shape: vec![2],
            data: vec![0.0; 2],
            dtype: "F32".into(),
        },
    );
    let path = dir.join("extra.safetensors");
    write_safetensors(&path, &weights, Dtype::F32).unwrap();
    let err = mnv2_model()
        .load_weights(&path, LoadMode::Strict)
        .unwrap_err();
    assert!(matches!(err, NnError::UnexpectedKey { .. }), "{err}");
    assert!(err.to_string().contains("features.99.weight"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn unsupported_dtype_is_reported() {
    let dir = scratch("dtype-err");
    let path = dir.join("f64.safetensors");
    let data: Vec<u8> = (0..64).flat_map(|i| (i as f64).to_le_bytes()).collect();
    let view = safetensors::tensor::TensorView::new(Dtype::F64, vec![64], &data).unwrap();
    std::fs::write(
        &path,
        safetensors::serialize([("embedding.bias", view)], None).unwrap(),
    )
    .unwrap();
    let err = mnv2_model()
        .load_weights(&path, LoadMode::BackboneOnly)
        .unwrap_err();
    // Backbone-only mode ignores head keys, so the f64 head bias is fine there...
    assert!(matches!(err, NnError::MissingKey { .. }), "{err}");
    let err = mnv2_model()
        .load_weights(&path, LoadMode::Strict)
        .unwrap_err();
    assert!(matches!(err, NnError::UnsupportedDtype { .. }), "{err}");
    assert!(
        err.to_string().contains("embedding.bias") && err.to_string().contains("F64"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn backbone_only_keeps_a_fresh_head_and_says_so() {
    let dir = scratch("backbone-only");
    let mut weights = mnv2_weights();
    weights.retain(|k, _| !k.starts_with("embedding."));
    let path = dir.join("imagenet.safetensors");
    write_safetensors(&path, &weights, Dtype::F32).unwrap();
    let mut model = mnv2_model();
    let head_before = model
        .params()
        .by_name("embedding.weight")
        .unwrap()
        .to_vec()
        .unwrap();
    let report = model.load_weights(&path, LoadMode::BackboneOnly).unwrap();
    assert_eq!(
        report.fresh,
        vec!["embedding.weight".to_string(), "embedding.bias".to_string()]
    );
    assert!(
        report.summary().contains("freshly initialised"),
        "{}",
        report.summary()
    );
    assert!(
        report.ignored.iter().any(|k| k == "classifier.1.bias"),
        "{:?}",
        report.ignored
    );
    assert_eq!(
        model
            .params()
            .by_name("embedding.weight")
            .unwrap()
            .to_vec()
            .unwrap(),
        head_before
    );
    assert_eq!(
        model
            .params()
            .by_name("features.0.0.weight")
            .unwrap()
            .to_vec()
            .unwrap(),
        weights["features.0.0.weight"].data
    );
    let err = mnv2_model()
        .load_weights(&path, LoadMode::Strict)
        .unwrap_err();
    assert!(err.to_string().contains("embedding.weight"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn key_mapping_rules() {
    assert_eq!(
        map_key("features.0.0.weight"),
        KeyAction::Load("features.0.0.weight".into())
    );
    assert_eq!(
        map_key("module.model.conv1_7x7_s2.weight"),
        KeyAction::Load("conv1_7x7_s2.weight".into())
    );
    assert_eq!(
        map_key("features.0.1.num_batches_tracked"),
        KeyAction::Ignore
    );
    assert_eq!(map_key("last_linear.weight"), KeyAction::Ignore);
    assert_eq!(map_key("classifier.1.weight"), KeyAction::Ignore);
    assert_eq!(map_key("fc.bias"), KeyAction::Ignore);
    assert_eq!(
        map_key("c2f2.fc.bias"),
        KeyAction::Load("c2f2.fc.bias".into())
    );
    assert_eq!(
        timm_to_torchvision("conv_stem.weight").as_deref(),
        Some("features.0.0.weight")
    );
    assert_eq!(
        timm_to_torchvision("bn2.running_var").as_deref(),
        Some("features.18.1.running_var")
    );
    assert_eq!(
        timm_to_torchvision("blocks.0.0.conv_pw.weight").as_deref(),
        Some("features.1.conv.1.weight")
    );
    assert_eq!(
        timm_to_torchvision("blocks.0.0.bn2.bias").as_deref(),
        Some("features.1.conv.2.bias")
    );
    assert_eq!(
        timm_to_torchvision("blocks.3.2.conv_dw.weight").as_deref(),
        Some("features.9.conv.1.0.weight")
    );
    assert_eq!(
        timm_to_torchvision("blocks.6.0.bn3.weight").as_deref(),
        Some("features.17.conv.3.weight")
    );
    assert_eq!(timm_to_torchvision("blocks.6.1.bn3.weight"), None);
}

/// A synthetic state dict with timm's exact keys and shapes (tests/fixtures/
/// timm_mobilenetv2_100_keys.txt) lands, value for value, on torchvision's names.
#[test]
fn timm_state_dict_maps_onto_torchvision_mobilenet_v2() {
    let dir = scratch("timm");
    let listing = std::fs::read_to_string(fixture("timm_mobilenetv2_100_keys.txt")).unwrap();
    let mut tensors = BTreeMap::new();
    for line in listing
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let (key, dims) = line.split_once(' ').unwrap_or((line, ""));
        if key.ends_with("num_batches_tracked") {
            continue; // a scalar int64 in timm's dict; ignored by the loader anyway
        }
        let shape: Vec<usize> = dims
            .split(',')
            .filter(|d| !d.is_empty())
            .map(|d| d.parse().unwrap())
            .collect();
        let data = synthetic_uniform(key, &shape);
        tensors.insert(
            key.to_string(),
            FileTensor {
                shape,
                data,
                dtype: "F32".into(),
            },
        );
    }
    let path = dir.join("timm.safetensors");
    write_safetensors(&path, &tensors, Dtype::F32).unwrap();
    let mut model = EmbeddingNet::new(
        Backbone::MobileNetV2 { width: 1.0 },
        D,
        &Device::Cpu,
        &mut Rng::new(2),
    )
    .unwrap();
    let report = model.load_weights(&path, LoadMode::BackboneOnly).unwrap();
    assert!(report.timm_names, "{}", report.summary());
    assert_eq!(report.fresh.len(), 2, "{}", report.summary());
    let mut checked = 0;
    for (key, t) in &tensors {
        if let KeyAction::Load(name) = map_key(key) {
            let got = model
                .params()
                .by_name(&name)
                .unwrap_or_else(|| panic!("{key} -> {name} not in model"));
            assert_eq!(got.to_vec().unwrap(), t.data, "{key} -> {name}");
            checked += 1;
        }
    }
    assert_eq!(
        checked,
        model.params().len() - 2,
        "every backbone tensor is covered"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

// ------------------------------------------------------------------ checkpoints

#[test]
fn checkpoint_round_trip() {
    let dir = scratch("ckpt");
    let model = EmbeddingNet::new(
        Backbone::C2f2 {
            input_size: (12, 8),
        },
        16,
        &Device::Cpu,
        &mut Rng::new(3),
    )
    .unwrap();
    let mut rng = Rng::new(9);
    let proxies = Tensor::randn(&[5, 16], 1.0, &mut rng, &Device::Cpu).unwrap();
    let mut ck = Checkpoint::new();
    model.save_to(&mut ck, "member0").unwrap();
    ck.insert("member0/proxies", &proxies).unwrap();
    let moments: Vec<(String, Tensor)> = model
        .parameters()
        .iter()
        .map(|(n, t)| {
            (
                n.clone(),
                Tensor::full(0.25, t.shape(), &Device::Cpu).unwrap(),
            )
        })
        .collect();
    ck.insert_group("member0/adam_m", &moments).unwrap();
    ck.set_meta("epoch", "7");
    ck.set_meta("rng", format!("{:?}", rng.state()));
    ck.set_meta("config", r#"{"backbone":"c2f2","lr":1e-4}"#);
    let path = dir.join("sub/ckpt.safetensors");
    ck.save(&path).unwrap();
    assert!(
        !dir.join("sub/ckpt.safetensors.tmp").exists(),
        "temporary file left behind"
    );

    let back = Checkpoint::load(&path).unwrap();
    assert_eq!(back.tensors, ck.tensors);
    assert_eq!(back.metadata, ck.metadata);
    assert_eq!(back.meta_required("epoch").unwrap(), "7");
    assert_eq!(back.group("member0/adam_m").len(), model.parameters().len());
    let err = back.meta_required("nope").unwrap_err();
    assert!(
        err.to_string().contains("ckpt.safetensors") && err.to_string().contains("nope"),
        "{err}"
    );
    let err = back.tensor("member1/proxies", &Device::Cpu).unwrap_err();
    assert!(
        matches!(err, NnError::MissingEntry { .. }) && err.to_string().contains("member1/proxies"),
        "{err}"
    );

    // A fresh model restored from the checkpoint matches the original value for value.
    let mut other = EmbeddingNet::new(
        Backbone::C2f2 {
            input_size: (12, 8),
        },
        16,
        &Device::Cpu,
        &mut Rng::new(4),
    )
    .unwrap();
    other.load_from(&back, "member0").unwrap();
    for (name, t, _) in model.params().iter() {
        assert_eq!(
            other.params().by_name(name).unwrap().to_vec().unwrap(),
            t.to_vec().unwrap(),
            "{name}"
        );
    }
    // The single-network helpers.
    let single = dir.join("single.safetensors");
    model.save(&single).unwrap();
    let mut third = EmbeddingNet::new(
        Backbone::C2f2 {
            input_size: (12, 8),
        },
        16,
        &Device::Cpu,
        &mut Rng::new(5),
    )
    .unwrap();
    let meta = third.load(&single).unwrap();
    assert_eq!(meta.meta("embedding_dim"), Some("16"));
    for (name, t, _) in model.params().iter() {
        assert_eq!(
            third.params().by_name(name).unwrap().to_vec().unwrap(),
            t.to_vec().unwrap(),
            "{name}"
        );
    }
    // Wrong prefix and truncated files give typed errors naming the file.
    let err = other.load_from(&back, "member3").unwrap_err();
    assert!(matches!(err, NnError::MissingEntry { .. }), "{err}");
    let bytes = std::fs::read(&path).unwrap();
    let cut = dir.join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() - 10]).unwrap();
    let err = Checkpoint::load(&cut).unwrap_err();
    assert!(
        matches!(err, NnError::NotSafetensors { .. })
            && err.to_string().contains("cut.safetensors"),
        "{err}"
    );
    assert!(matches!(
        Checkpoint::load(dir.join("none")).unwrap_err(),
        NnError::MissingFile { .. }
    ));
    let _ = std::fs::remove_dir_all(&dir);
}

// ------------------------------------------------------------------ parameter store and training

#[test]
fn parameter_store_kinds_and_freezing() {
    let mut model = mnv2_model();
    let store = model.params();
    let names = store.names();
    assert_eq!(names[0], "features.0.0.weight");
    assert_eq!(names[names.len() - 1], "embedding.bias");
    assert!(names.contains(&"features.18.1.running_var".to_string()));
    assert!(names.contains(&"features.1.conv.1.weight".to_string()));
    assert!(names.contains(&"features.2.conv.2.weight".to_string()));
    assert_eq!(
        store.kind("features.0.1.running_mean"),
        Some(ParamKind::Buffer)
    );
    assert!(store.trainable().iter().all(|(_, t)| t.requires_grad()));
    assert!(store.buffers().iter().all(|(_, t)| !t.requires_grad()));
    // torchvision's mobilenet_v2(width_mult=0.5) without the classifier: 52 convs + 52 BNs.
    assert_eq!(store.trainable().len(), 52 + 52 * 2 + 2);
    assert_eq!(store.buffers().len(), 52 * 2);
    model.freeze_backbone(true);
    let t = model.parameters();
    assert_eq!(
        t.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        ["embedding.weight", "embedding.bias"]
    );
    model.freeze_backbone(false);
    assert_eq!(model.parameters().len(), 52 * 3 + 2);
    // Replace after an optimizer step: the next forward sees the new tensor.
    let w = model.params().by_name("embedding.bias").unwrap().clone();
    model
        .params_mut()
        .set(
            "embedding.bias",
            Tensor::full(1.0, w.shape(), &Device::Cpu).unwrap(),
        )
        .unwrap();
    let nb = model.params().by_name("embedding.bias").unwrap();
    assert!(nb.requires_grad() && nb.to_vec().unwrap().iter().all(|&v| v == 1.0));
    assert!(model
        .params_mut()
        .set("embedding.bias", Tensor::zeros(&[3], &Device::Cpu).unwrap())
        .is_err());
}

#[test]
fn bn_inception_parameter_count_matches_cadene() {
    let model =
        EmbeddingNet::new(Backbone::BnInception, 512, &Device::Cpu, &mut Rng::new(0)).unwrap();
    let (stored, meta) = read_float_tensors(&fixture("bn_inception.weights.safetensors"));
    let synthetic: Vec<&str> = meta["synthetic_keys"].split(',').collect();
    assert!(stored
        .keys()
        .map(|k| k.as_str())
        .chain(synthetic.iter().copied())
        .all(|k| model.params().by_name(k).is_some()));
    assert_eq!(model.params().len(), stored.len() + synthetic.len());
    // Cadene's features hold 10,290,272 values (conv weights and biases, BN affine and
    // running statistics); the 1024 -> 512 head adds 524,800.
    let values: usize = model.params().iter().map(|(_, t, _)| t.numel()).sum();
    assert_eq!(values, 10_290_272 + 524_800);
}

#[test]
fn gradients_reach_every_trainable_parameter() {
    for (backbone, hw, mode) in [
        (
            Backbone::C2f2 { input_size: (8, 8) },
            (8, 8),
            ForwardMode::Train,
        ),
        (
            Backbone::MobileNetV2 { width: 0.5 },
            (32, 32),
            ForwardMode::FrozenBn,
        ),
    ] {
        let model = EmbeddingNet::new(backbone.clone(), 8, &Device::Cpu, &mut Rng::new(6)).unwrap();
        let x = Tensor::rand_uniform(
            &[2, 3, hw.0, hw.1],
            0.0,
            1.0,
            &mut Rng::new(7),
            &Device::Cpu,
        )
        .unwrap()
        .var();
        let e = model.forward(&x, mode).unwrap();
        let w = Tensor::randn(e.shape(), 1.0, &mut Rng::new(8), &Device::Cpu).unwrap();
        // The gradient of sum(e * w): a random projection, so every output matters.
        let grads = robust_dml::engine::tape::backward_with(e, w).unwrap();
        for (name, p) in model.parameters() {
            let g = grads
                .get(&p)
                .unwrap_or_else(|| panic!("{}: no gradient for {name}", backbone.name()));
            assert!(g.to_vec().unwrap().iter().all(|v| v.is_finite()), "{name}");
        }
        assert!(
            grads.get(&x).is_some(),
            "input gradient (needed by the attacks)"
        );
        for (name, b) in model.params().buffers() {
            assert!(grads.get(&b).is_none(), "{name} is a buffer");
        }
    }
}

#[test]
fn deep_clone_is_independent() {
    let model = EmbeddingNet::new(
        Backbone::C2f2 { input_size: (8, 8) },
        4,
        &Device::Cpu,
        &mut Rng::new(1),
    )
    .unwrap();
    let copy = model.deep_clone().unwrap();
    let w = model.params().by_name("embedding.bias").unwrap().clone();
    copy.params()
        .assign(
            "embedding.bias",
            &Tensor::full(3.0, w.shape(), &Device::Cpu).unwrap(),
        )
        .unwrap();
    assert!(
        w.to_vec().unwrap().iter().all(|&v| v == 0.0),
        "the original moved with its copy"
    );
    assert!(copy
        .params()
        .by_name("embedding.bias")
        .unwrap()
        .to_vec()
        .unwrap()
        .iter()
        .all(|&v| v == 3.0));
    // A leaf held elsewhere (e.g. by an optimizer) sees in-place assignments to its store.
    model
        .params()
        .assign(
            "embedding.bias",
            &Tensor::full(2.0, w.shape(), &Device::Cpu).unwrap(),
        )
        .unwrap();
    assert!(w.to_vec().unwrap().iter().all(|&v| v == 2.0));
}

#[test]
fn to_device_gives_the_same_embeddings_gpu() {
    let Some(gpu) = gpu_or_skip("to_device_gives_the_same_embeddings_gpu") else {
        return;
    };
    let model = EmbeddingNet::new(
        Backbone::C2f2 {
            input_size: (12, 8),
        },
        16,
        &Device::Cpu,
        &mut Rng::new(1),
    )
    .unwrap();
    let x = Tensor::rand_uniform(&[3, 3, 12, 8], 0.0, 1.0, &mut Rng::new(2), &Device::Cpu).unwrap();
    let want = model
        .forward(&x, ForwardMode::Eval)
        .unwrap()
        .to_vec()
        .unwrap();
    let on_gpu = model.to_device(&gpu).unwrap();
    assert!(on_gpu
        .parameters()
        .iter()
        .all(|(_, t)| t.is_gpu() && t.requires_grad()));
    let got = on_gpu
        .forward(&x.to_device(&gpu).unwrap(), ForwardMode::Eval)
        .unwrap()
        .to_vec()
        .unwrap();
    robust_dml::engine::testing::assert_close("c2f2 on gpu vs cpu", &got, &want, 1e-4, 1e-3);
}

/// Parameter and input gradients of a whole network agree between the GPU and the CPU, in
/// both BN modes used for training.
#[test]
fn model_gradients_gpu_match_cpu() {
    let Some(gpu) = gpu_or_skip("model_gradients_gpu_match_cpu") else {
        return;
    };
    for mode in [ForwardMode::FrozenBn, ForwardMode::Train] {
        let cpu_model = EmbeddingNet::new(
            Backbone::MobileNetV2 { width: 0.5 },
            8,
            &Device::Cpu,
            &mut Rng::new(11),
        )
        .unwrap();
        let gpu_model = cpu_model.to_device(&gpu).unwrap();
        let x = Tensor::rand_uniform(&[2, 3, 64, 48], 0.0, 1.0, &mut Rng::new(12), &Device::Cpu)
            .unwrap();
        let w = Tensor::randn(&[2, 8], 1.0, &mut Rng::new(13), &Device::Cpu).unwrap();
        let want = embedding_and_gradients(&cpu_model, &x, &w, mode, &Device::Cpu);
        let got = embedding_and_gradients(&gpu_model, &x, &w, mode, &gpu);
        assert_close_network(
            &format!("{mode:?} gradient of"),
            &got[1..],
            &want[1..],
            2e-3,
            1e-2,
        );
    }
}

/// `model`'s embedding of `x` on `dev`, then the gradients of sum(w * embedding) with respect
/// to the input and every parameter: ("embedding", ...), ("input", ...), then by parameter name.
fn embedding_and_gradients(
    model: &EmbeddingNet,
    x: &Tensor,
    w: &Tensor,
    mode: ForwardMode,
    dev: &Device,
) -> Vec<(String, Vec<f32>)> {
    let xv = x.to_device(dev).unwrap().var();
    let e = model.forward(&xv, mode).unwrap();
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
}

// ------------------------------------------------------------------ activations over the binding cap

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
    let frozen_bn = ForwardMode::FrozenBn;
    let want = embedding_and_gradients(&cpu_model, &x, &w, frozen_bn, &Device::Cpu);
    let Device::Gpu(ctx) = &gpu else {
        unreachable!()
    };
    let splits_before = ctx.split_ops();
    let got = embedding_and_gradients(&gpu_model, &x, &w, frozen_bn, &gpu);
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

/// c2f2 pools before its ReLU (src/nn/c2f2.rs): on inputs full of ties, zeros and negative
/// windows, pool-then-ReLU gives PyTorch's ReLU-then-pool values and input gradient bit for bit,
/// on the CPU and the GPU. A swap that is not exact (say ReLU's gradient passed where the
/// window's maximum is 0) fails here.
#[test]
fn pool_then_relu_equals_relu_then_pool() {
    use robust_dml::engine::ops::elementwise::{mul, relu};
    use robust_dml::engine::ops::pool::{max_pool2d, Pool2dParams};
    use robust_dml::engine::ops::reduce::sum;
    let mut devices = vec![Device::Cpu];
    devices.extend(gpu_or_skip("pool_then_relu_equals_relu_then_pool"));
    let shape = [3, 5, 7, 10];
    let n: usize = shape.iter().product();
    let mut rng = Rng::new(21);
    // Five levels, so most windows hold ties and many hold nothing above 0.
    let levels: Vec<f32> = (0..n)
        .map(|_| [-1.0, -0.5, 0.0, 0.5, 1.0][rng.below(5)])
        .collect();
    let upstream: Vec<f32> = (0..n / 4).map(|_| rng.normal()).collect();
    let pool = Pool2dParams::square(2, 2, 0);
    for dev in &devices {
        let x = Tensor::from_vec(levels.clone(), &shape, dev).unwrap().var();
        let run = |pool_first: bool| {
            let y = if pool_first {
                relu(&max_pool2d(&x, pool).unwrap()).unwrap()
            } else {
                max_pool2d(&relu(&x).unwrap(), pool).unwrap()
            };
            let r = Tensor::from_vec(upstream[..y.numel()].to_vec(), y.shape(), dev).unwrap();
            let grads = sum(&mul(&y, &r).unwrap()).unwrap().backward().unwrap();
            let dx = grads.get(&x).unwrap().to_vec().unwrap();
            (y.to_vec().unwrap(), dx)
        };
        let (swapped, pytorch) = (run(true), run(false));
        assert!(pytorch.1.contains(&0.0) && pytorch.1.iter().any(|&g| g != 0.0));
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&swapped.0), bits(&pytorch.0), "values on {dev:?}");
        assert_eq!(
            bits(&swapped.1),
            bits(&pytorch.1),
            "input gradient on {dev:?}"
        );
    }
}
