//! Weight loading from safetensors files (F32, F16, BF16) into a [`ParamStore`].
//!
//! Accepted key names: torchvision's MobileNetV2 (`features.*`) and ResNets (`conv1`, `bn1`,
//! `layer1.0.conv1`, ...; timm's ResNets are named alike), Cadene's BN-Inception
//! (`conv1_7x7_s2.*`, `inception_*`), timm's MobileNetV2 (`conv_stem`, `bn1`, `blocks.i.j.*`,
//! `conv_head`, `bn2`; renamed to torchvision's), optionally under a `module.` (DataParallel) or
//! `model.` (Proxy-Anchor's wrapper) prefix. `num_batches_tracked` and the ImageNet classifier
//! (`classifier.*`, `last_linear.*`, `fc.*`) are ignored.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};

use crate::engine::Tensor;

use super::embedding::HEAD_PREFIX;
use super::error::{NnError, NnResult};
use super::mobilenet_v2::INVERTED_RESIDUAL_SETTING;
use super::params::ParamStore;

/// Which keys a weight file must provide.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoadMode {
    /// Every parameter and buffer of the model, embedding head included; no extra keys.
    Strict,
    /// Every backbone parameter and buffer (e.g. ImageNet weights). The embedding head keeps its
    /// fresh initialisation; head keys present in the file are ignored and reported.
    BackboneOnly,
}

/// What a load did, for the user to read.
#[derive(Clone, Debug, Default)]
pub struct LoadReport {
    pub file: PathBuf,
    /// Keys loaded, under the model's names.
    pub loaded: Vec<String>,
    /// File keys skipped on purpose (classifier, `num_batches_tracked`, head in backbone mode).
    pub ignored: Vec<String>,
    /// Model keys left at their fresh initialisation.
    pub fresh: Vec<String>,
    /// Whether timm names were translated.
    pub timm_names: bool,
    /// Dtypes found in the file.
    pub dtypes: BTreeSet<String>,
}

impl LoadReport {
    pub fn summary(&self) -> String {
        let mut s = format!(
            "loaded {} tensors from {} ({}{})",
            self.loaded.len(),
            self.file.display(),
            self.dtypes.iter().cloned().collect::<Vec<_>>().join("/"),
            if self.timm_names {
                ", timm names mapped to torchvision's"
            } else {
                ""
            }
        );
        if !self.ignored.is_empty() {
            s += &format!("; ignored {} keys", self.ignored.len());
            let classifier: Vec<&str> = self
                .ignored
                .iter()
                .map(String::as_str)
                .filter(|k| is_classifier_key(k))
                .collect();
            if !classifier.is_empty() {
                s += &format!(
                    " (among them the ImageNet classifier, which an embedding model does not use: {})",
                    classifier.join(", ")
                );
            }
        }
        if !self.fresh.is_empty() {
            s += &format!(
                "; freshly initialised (not in the file): {}",
                self.fresh.join(", ")
            );
        }
        s
    }
}

/// A tensor read from a file, converted to f32.
#[derive(Clone, Debug, PartialEq)]
pub struct FileTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
    pub dtype: String,
}

/// Reads the whole file (its raw bytes); FIFOs, devices and files over the available memory are
/// refused.
pub(crate) fn read_bytes(path: &Path) -> NnResult<Vec<u8>> {
    crate::files::read_regular(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => NnError::MissingFile {
            path: path.to_path_buf(),
        },
        _ => NnError::Io {
            path: path.to_path_buf(),
            source: e,
        },
    })
}

pub(crate) fn parse<'a>(path: &Path, bytes: &'a [u8]) -> NnResult<SafeTensors<'a>> {
    SafeTensors::deserialize(bytes).map_err(|e| NnError::NotSafetensors {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// Little-endian F32 / F16 / BF16 bytes to f32 values.
pub fn decode(path: &Path, key: &str, dtype: Dtype, bytes: &[u8]) -> NnResult<Vec<f32>> {
    let two = |b: &[u8]| [b[0], b[1]];
    Ok(match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes(two(b)).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes(two(b)).to_f32())
            .collect(),
        other => {
            return Err(NnError::UnsupportedDtype {
                path: path.to_path_buf(),
                key: key.to_string(),
                dtype: format!("{other:?}"),
            })
        }
    })
}

/// Every tensor of a safetensors file, as f32, by key.
pub fn read_safetensors(path: &Path) -> NnResult<BTreeMap<String, FileTensor>> {
    let bytes = read_bytes(path)?;
    let st = parse(path, &bytes)?;
    let mut out = BTreeMap::new();
    for (key, view) in st.iter() {
        let data = decode(path, key, view.dtype(), view.data())?;
        out.insert(
            key.to_string(),
            FileTensor {
                shape: view.shape().to_vec(),
                data,
                dtype: format!("{:?}", view.dtype()),
            },
        );
    }
    Ok(out)
}

/// What to do with a key of a weight file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyAction {
    /// Load into the model parameter of this name.
    Load(String),
    /// Skip (classifier, counters).
    Ignore,
}

const TIMM_ROOTS: [&str; 5] = ["conv_stem.", "bn1.", "blocks.", "conv_head.", "bn2."];
const CLASSIFIER_ROOTS: [&str; 3] = ["classifier.", "last_linear.", "fc."];

/// The model name for a key of a weight file, after dropping wrapper prefixes and translating
/// timm's MobileNetV2 names.
pub fn map_key(key: &str) -> KeyAction {
    let k = strip_wrappers(key);
    if k.ends_with("num_batches_tracked") || is_classifier_key(k) {
        return KeyAction::Ignore;
    }
    if TIMM_ROOTS.iter().any(|r| k.starts_with(r)) {
        if let Some(tv) = timm_to_torchvision(k) {
            return KeyAction::Load(tv);
        }
    }
    KeyAction::Load(k.to_string())
}

/// Whether a file key belongs to an ImageNet classifier (`fc.*`, `classifier.*`, ...).
fn is_classifier_key(key: &str) -> bool {
    let k = strip_wrappers(key);
    CLASSIFIER_ROOTS.iter().any(|r| k.starts_with(r))
}

/// The key without `module.` / `model.` wrapper prefixes.
fn strip_wrappers(key: &str) -> &str {
    let mut k = key;
    while let Some(rest) = k
        .strip_prefix("module.")
        .or_else(|| k.strip_prefix("model."))
    {
        k = rest;
    }
    k
}

/// [`map_key`] for a particular model: a name the model itself has is taken literally, because
/// timm's MobileNetV2 names overlap with other models' own (ResNet's stem BN is `bn1` too).
fn resolve_key(key: &str, store: &ParamStore) -> KeyAction {
    let literal = strip_wrappers(key);
    match map_key(key) {
        KeyAction::Load(_) if store.by_name(literal).is_some() => {
            KeyAction::Load(literal.to_string())
        }
        action => action,
    }
}

/// Index in torchvision's `features` of timm's `blocks.<stage>.<block>`.
fn feature_index(stage: usize, block: usize) -> Option<usize> {
    let setting = INVERTED_RESIDUAL_SETTING.get(stage)?;
    if block >= setting.2 {
        return None;
    }
    let before: usize = INVERTED_RESIDUAL_SETTING[..stage].iter().map(|s| s.2).sum();
    Some(1 + before + block)
}

/// Translates one timm MobileNetV2 key (`timm.create_model('mobilenetv2_100')`) to
/// torchvision's name, or `None` if it is not one.
///
/// timm                              torchvision
/// conv_stem / bn1                   features.0.0 / features.0.1
/// blocks.0.0.{conv_dw,bn1,conv_pw,bn2}  features.1.conv.{0.0, 0.1, 1, 2}   (no expansion)
/// blocks.s.b.{conv_pw,bn1,conv_dw,bn2,conv_pwl,bn3}
///                                   features.k.conv.{0.0, 0.1, 1.0, 1.1, 2, 3}
/// conv_head / bn2                   features.18.0 / features.18.1
pub fn timm_to_torchvision(key: &str) -> Option<String> {
    let last_feature = 1 + INVERTED_RESIDUAL_SETTING.iter().map(|s| s.2).sum::<usize>();
    let (module, leaf) = key.rsplit_once('.')?;
    let mapped = match module {
        "conv_stem" => "features.0.0".to_string(),
        "bn1" => "features.0.1".to_string(),
        "conv_head" => format!("features.{last_feature}.0"),
        "bn2" => format!("features.{last_feature}.1"),
        _ => {
            let mut parts = module.split('.');
            if parts.next()? != "blocks" {
                return None;
            }
            let stage: usize = parts.next()?.parse().ok()?;
            let block: usize = parts.next()?.parse().ok()?;
            let layer = parts.next()?;
            if parts.next().is_some() {
                return None;
            }
            let k = feature_index(stage, block)?;
            let expands = INVERTED_RESIDUAL_SETTING[stage].0 != 1;
            let sub = match (expands, layer) {
                (false, "conv_dw") => "0.0",
                (false, "bn1") => "0.1",
                (false, "conv_pw") => "1",
                (false, "bn2") => "2",
                (true, "conv_pw") => "0.0",
                (true, "bn1") => "0.1",
                (true, "conv_dw") => "1.0",
                (true, "bn2") => "1.1",
                (true, "conv_pwl") => "2",
                (true, "bn3") => "3",
                _ => return None,
            };
            format!("features.{k}.conv.{sub}")
        }
    };
    Some(format!("{mapped}.{leaf}"))
}

/// Loads a weight file into `store` (values copied in place; see [`LoadMode`]). Nothing is
/// written unless the whole file checks out.
pub fn load_into(
    store: &mut ParamStore,
    path: &Path,
    mode: LoadMode,
    model: &str,
) -> NnResult<LoadReport> {
    let bytes = read_bytes(path)?;
    let st = parse(path, &bytes)?;
    let mut report = LoadReport {
        file: path.to_path_buf(),
        ..LoadReport::default()
    };
    let is_head = |name: &str| name.starts_with(HEAD_PREFIX);
    let mut staged: Vec<(String, Tensor)> = Vec::new();
    let mut keys: Vec<&str> = st.names().into_iter().collect();
    keys.sort();
    for key in keys {
        let name = match resolve_key(key, store) {
            KeyAction::Ignore => {
                report.ignored.push(key.to_string());
                continue;
            }
            KeyAction::Load(name) => name,
        };
        if mode == LoadMode::BackboneOnly && is_head(&name) {
            report.ignored.push(key.to_string());
            continue;
        }
        report.timm_names |= name != strip_wrappers(key);
        let Some(expected) = store.by_name(&name).map(|t| t.shape().to_vec()) else {
            return Err(NnError::UnexpectedKey {
                path: path.to_path_buf(),
                key: key.to_string(),
                model: model.to_string(),
            });
        };
        let view = st.tensor(key).map_err(|e| NnError::NotSafetensors {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        // PyTorch stores 1x1 conv weights and vectors with their full shapes; compare exactly.
        if view.shape() != expected.as_slice() {
            return Err(NnError::ShapeMismatch {
                path: path.to_path_buf(),
                key: key.to_string(),
                expected,
                found: view.shape().to_vec(),
            });
        }
        report.dtypes.insert(format!("{:?}", view.dtype()));
        let data = decode(path, key, view.dtype(), view.data())?;
        staged.push((name, Tensor::from_cpu(data, &expected)?));
    }
    let present: BTreeSet<&str> = staged.iter().map(|(n, _)| n.as_str()).collect();
    let names = store.names();
    let missing: Vec<&String> = names
        .iter()
        .filter(|n| !present.contains(n.as_str()))
        .filter(|n| !(mode == LoadMode::BackboneOnly && is_head(n)))
        .collect();
    if let Some(first) = missing.first() {
        return Err(NnError::MissingKey {
            path: path.to_path_buf(),
            key: first.to_string(),
            model: model.to_string(),
            total_missing: missing.len(),
        });
    }
    for (name, t) in &staged {
        store.assign(name, t)?;
        report.loaded.push(name.clone());
    }
    report.fresh = names
        .into_iter()
        .filter(|n| !present.contains(n.as_str()))
        .collect();
    Ok(report)
}

/// Writes named f32 tensors to a safetensors file (for tests, fixtures and conversions).
pub fn write_safetensors(
    path: &Path,
    tensors: &BTreeMap<String, FileTensor>,
    dtype: Dtype,
) -> NnResult<()> {
    let encoded: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
        .iter()
        .map(|(k, t)| Ok((k.clone(), encode(&t.data, dtype)?, t.shape.clone())))
        .collect::<NnResult<_>>()?;
    let views = encoded
        .iter()
        .map(|(k, bytes, shape)| {
            safetensors::tensor::TensorView::new(dtype, shape.clone(), bytes)
                .map(|v| (k.clone(), v))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| NnError::Config(format!("safetensors view: {e}")))?;
    let bytes = safetensors::serialize(views, None)
        .map_err(|e| NnError::Config(format!("safetensors serialise: {e}")))?;
    std::fs::write(path, bytes).map_err(|e| NnError::Io {
        path: path.to_path_buf(),
        source: e,
    })
}

/// f32 values as little-endian bytes of `dtype` (F32, F16 or BF16).
pub fn encode(data: &[f32], dtype: Dtype) -> NnResult<Vec<u8>> {
    Ok(match dtype {
        Dtype::F32 => data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        Dtype::F16 => data
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect(),
        Dtype::BF16 => data
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
            .collect(),
        other => return Err(NnError::Config(format!("cannot encode dtype {other:?}"))),
    })
}
