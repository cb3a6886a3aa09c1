//! The work of `embed`: a tensor of images in, their embeddings out (safetensors both), with a
//! model built from a weights file or from member 1 of a training checkpoint.

use std::path::{Path, PathBuf};

use crate::engine::{no_grad, Device, Rng, Tensor};
use crate::error::{Error, Result};
use crate::nn::{Backbone, Checkpoint, EmbeddingNet, ForwardMode, LoadMode};
use crate::pipeline::progress::Progress;
use crate::pipeline::run_dir::check_output_path;
use crate::pipeline::train::{member_prefix, serde_name, Arch, Run, TrainConfig};
use crate::robust::defense::Method;

/// What `embed` is asked to do.
pub struct EmbedRequest {
    pub arch: Arch,
    /// A model weights file, or a training checkpoint.
    pub weights: PathBuf,
    /// safetensors holding `input` [N, 3, H, W], RGB in [0, 1].
    pub input: PathBuf,
    /// Where `embedding` [N, D] goes.
    pub output: PathBuf,
    pub embedding_dim: usize,
    pub width_mult: f64,
    /// Images per forward pass.
    pub batch_size: usize,
    /// Replace `output` if it is an existing regular file.
    pub overwrite: bool,
    /// Whether the embedding dimension and the width were asked for explicitly: a training
    /// checkpoint refuses only those that were and differ from its own.
    pub embedding_dim_given: bool,
    pub width_mult_given: bool,
}

impl EmbedRequest {
    /// Refuses an output that is a link, a device, one of the inputs, or an existing file
    /// without `overwrite`; checked before anything is read.
    pub fn check_output(&self) -> Result<()> {
        check_output_path(&self.output, &[&self.weights, &self.input], self.overwrite)
    }
}

/// Embeds the request's input and writes the embeddings atomically; returns their shape.
/// Nothing is written when an embedding is not finite.
pub fn embed(req: &EmbedRequest, device: &Device) -> Result<Vec<usize>> {
    let x = embed_input(&req.input)?;
    let net = embed_net(req, (x.shape()[2], x.shape()[3]), device)?;
    let n = x.shape()[0];
    let batch = req.batch_size.min(n);
    let (mut values, mut dim) = (Vec::new(), req.embedding_dim);
    let bar = Progress::new("embed", n as u64, "img", false);
    for start in (0..n).step_by(batch) {
        let count = batch.min(n - start);
        let rows = x.rows(start, count)?.to_device(device)?;
        let e = no_grad(|| net.forward(&rows, ForwardMode::Eval))?;
        dim = e.shape()[1];
        values.extend(e.to_vec()?);
        bar.inc(count as u64);
    }
    bar.finish("");
    if values.iter().any(|v| !v.is_finite()) {
        return Err(Error::Config(format!(
            "the embeddings of {} are not finite; nothing was written to {}",
            req.input.display(),
            req.output.display()
        )));
    }
    let emb = Tensor::from_cpu(values, &[n, dim])?;
    let mut out = Checkpoint::new();
    out.insert("embedding", &emb)?;
    out.save(&req.output)?;
    Ok(emb.shape().to_vec())
}

/// The `input` tensor of `embed`: [N, 3, H, W] with N, H, W > 0 and finite values.
fn embed_input(path: &Path) -> Result<Tensor> {
    let input = Checkpoint::load(path)?;
    let x = input.get("input").ok_or_else(|| {
        Error::Config(format!(
            "{}: no tensor named 'input' (expected [N, 3, H, W], RGB in [0, 1])",
            path.display()
        ))
    })?;
    let s = &x.shape;
    if s.len() != 4 || s[1] != 3 || s[0] == 0 || s[2] == 0 || s[3] == 0 {
        return Err(Error::Config(format!(
            "{}: 'input' has shape {s:?}; expected [N, 3, H, W] with N, H and W at least 1",
            path.display()
        )));
    }
    if let Some(i) = x.data.iter().position(|v| !v.is_finite()) {
        return Err(Error::Config(format!(
            "{}: 'input' holds {} at index {i}; images must be finite RGB values in [0, 1]",
            path.display(),
            x.data[i]
        )));
    }
    if x.data.iter().any(|v| !(0.0..=1.0).contains(v)) {
        eprintln!(
            "warning: {}: 'input' has values outside [0, 1]; the models expect RGB in [0, 1]",
            path.display()
        );
    }
    Ok(x.to_tensor(&Device::Cpu)?)
}

/// The network `embed` runs: from a model weights file, or from member 0 of a training
/// checkpoint (whose stored settings then decide the architecture).
fn embed_net(req: &EmbedRequest, hw: (usize, usize), device: &Device) -> Result<EmbeddingNet> {
    // Model weights files may hold tensors a checkpoint does not (torchvision's I64
    // `num_batches_tracked`); only a file that reads as a checkpoint can be a training one.
    let member0 = format!("{}/model", member_prefix(0));
    let net = match Checkpoint::load(&req.weights) {
        Ok(ck) if ck.meta("config").is_some() && !ck.group(&member0).is_empty() => {
            checkpoint_net(req, &ck, &member0, hw, device)?
        }
        _ => weights_net(req, hw, device)?,
    };
    check_net_finite(&net, &req.weights)?;
    Ok(net)
}

/// Refuses weights holding NaN or infinite values: their embeddings would be meaningless.
fn check_net_finite(net: &EmbeddingNet, path: &Path) -> Result<()> {
    for (name, t, _) in net.params().iter() {
        if let Some(&value) = t.to_vec()?.iter().find(|v| !v.is_finite()) {
            return Err(Error::NonFiniteState {
                what: format!("weights file {}", path.display()),
                tensor: name.to_string(),
                value,
                when: String::new(),
                consequence: "its embeddings would be meaningless, so nothing was computed".into(),
                cause: "the file was written from a diverged model or is damaged".into(),
            });
        }
    }
    Ok(())
}

fn weights_net(req: &EmbedRequest, hw: (usize, usize), device: &Device) -> Result<EmbeddingNet> {
    // The same checks as training's: flag values, the model's smallest input, memory.
    let mut c = TrainConfig::new(req.arch, Method::None);
    c.embedding_dim = req.embedding_dim;
    c.width_mult = req.width_mult;
    c.batch_size = req.batch_size;
    c.image_size = hw.0.min(hw.1);
    c.validate()
        .map_err(|e| Error::Config(e.to_string().replace("--image-size", "an input of size")))?;
    c.image_size = hw.0.max(hw.1);
    c.check_memory(0, c.batch_size)?;
    let backbone = match req.arch {
        Arch::C2f2 => Backbone::C2f2 { input_size: hw },
        Arch::MobilenetV2 => Backbone::MobileNetV2 {
            width: req.width_mult,
        },
        Arch::BnInception => Backbone::BnInception,
        Arch::Resnet18 => Backbone::ResNet18,
        Arch::Resnet50 => Backbone::ResNet50,
    };
    let mut net = EmbeddingNet::new(backbone, req.embedding_dim, device, &mut Rng::new(0))?;
    let report = net.load_weights(&req.weights, LoadMode::Strict)?;
    eprintln!("{}", report.summary());
    Ok(net)
}

/// Member 0 of a training checkpoint, refusing requests that contradict its stored settings.
fn checkpoint_net(
    req: &EmbedRequest,
    ck: &Checkpoint,
    prefix: &str,
    hw: (usize, usize),
    device: &Device,
) -> Result<EmbeddingNet> {
    let cfg = Run::config_of(ck)?;
    let path = req.weights.display();
    let mut conflicts = Vec::new();
    if req.arch != cfg.arch {
        conflicts.push(format!(
            "--arch {} (it has {})",
            serde_name(&req.arch),
            serde_name(&cfg.arch)
        ));
    }
    if req.embedding_dim_given && req.embedding_dim != cfg.embedding_dim {
        conflicts.push(format!(
            "--embedding-dim {} (it has {})",
            req.embedding_dim, cfg.embedding_dim
        ));
    }
    if req.width_mult_given && req.width_mult != cfg.width_mult {
        conflicts.push(format!(
            "--width-mult {} (it has {})",
            req.width_mult, cfg.width_mult
        ));
    }
    if cfg.arch == Arch::C2f2 && hw != (cfg.image_size, cfg.image_size) {
        conflicts.push(format!(
            "an input of {}x{} (its c2f2 takes {}x{} images)",
            hw.0, hw.1, cfg.image_size, cfg.image_size
        ));
    }
    if !conflicts.is_empty() {
        return Err(Error::Config(format!(
            "{path} is a training checkpoint (written by `train`); its model is used as stored, \
             and these differ from it: {}",
            conflicts.join(", ")
        )));
    }
    let backbone = match cfg.arch {
        Arch::C2f2 => Backbone::C2f2 { input_size: hw },
        _ => cfg.backbone(),
    };
    let mut net = EmbeddingNet::new(backbone, cfg.embedding_dim, device, &mut Rng::new(0))?;
    net.load_from(ck, prefix)?;
    eprintln!(
        "{path} is a training checkpoint: embedding with its model{}",
        if cfg.members() > 1 {
            format!(" (member 1 of the {}-model ensemble)", cfg.members())
        } else {
            String::new()
        }
    );
    Ok(net)
}
