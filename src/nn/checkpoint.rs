//! Checkpoints: named tensor groups (`member0/features.0.0.weight`, `member0/proxies`,
//! `member0/adam_m/...`) and string metadata (epoch, RNG state, JSON config) in one safetensors
//! file, written atomically: to `<path>.tmp`, fsync'd, then renamed over `<path>`, so a crash
//! mid-write never leaves a truncated checkpoint behind.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use safetensors::tensor::TensorView;
use safetensors::Dtype;

use crate::engine::{Device, Tensor};

use super::error::{NnError, NnResult};
use super::weights::{decode, encode, parse, read_bytes};

/// A tensor's values on the host.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl HostTensor {
    pub fn from_tensor(t: &Tensor) -> NnResult<HostTensor> {
        Ok(HostTensor {
            shape: t.shape().to_vec(),
            data: t.to_vec()?,
        })
    }

    pub fn to_tensor(&self, device: &Device) -> NnResult<Tensor> {
        Ok(Tensor::from_vec(self.data.clone(), &self.shape, device)?)
    }
}

#[derive(Clone, Debug, Default)]
pub struct Checkpoint {
    pub tensors: BTreeMap<String, HostTensor>,
    pub metadata: BTreeMap<String, String>,
    /// The file it was loaded from, for error messages.
    pub source: Option<PathBuf>,
}

impl Checkpoint {
    pub fn new() -> Checkpoint {
        Checkpoint::default()
    }

    fn origin(&self) -> PathBuf {
        self.source
            .clone()
            .unwrap_or_else(|| PathBuf::from("<in-memory checkpoint>"))
    }

    /// Stores a copy of `t`'s values (downloaded from the GPU if need be).
    pub fn insert(&mut self, name: &str, t: &Tensor) -> NnResult<()> {
        self.tensors
            .insert(name.to_string(), HostTensor::from_tensor(t)?);
        Ok(())
    }

    pub fn insert_host(&mut self, name: &str, t: HostTensor) {
        self.tensors.insert(name.to_string(), t);
    }

    /// Stores each (name, tensor) as `<prefix>/<name>`.
    pub fn insert_group(&mut self, prefix: &str, tensors: &[(String, Tensor)]) -> NnResult<()> {
        for (name, t) in tensors {
            self.insert(&format!("{prefix}/{name}"), t)?;
        }
        Ok(())
    }

    pub fn get(&self, name: &str) -> Option<&HostTensor> {
        self.tensors.get(name)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The entries under `<prefix>/`, as (name without the prefix, tensor), sorted by name.
    pub fn group(&self, prefix: &str) -> Vec<(String, &HostTensor)> {
        let p = format!("{prefix}/");
        self.tensors
            .iter()
            .filter_map(|(k, v)| k.strip_prefix(&p).map(|rest| (rest.to_string(), v)))
            .collect()
    }

    /// The named tensor on `device`, or an error naming the checkpoint file.
    pub fn tensor(&self, name: &str, device: &Device) -> NnResult<Tensor> {
        match self.tensors.get(name) {
            Some(t) => t.to_tensor(device),
            None => Err(NnError::MissingEntry {
                path: self.origin(),
                key: name.to_string(),
            }),
        }
    }

    /// Like [`Checkpoint::tensor`], also checking the shape.
    pub fn tensor_checked(&self, name: &str, shape: &[usize], device: &Device) -> NnResult<Tensor> {
        let t = self.tensor(name, device)?;
        if t.shape() != shape {
            return Err(NnError::ShapeMismatch {
                path: self.origin(),
                key: name.to_string(),
                expected: shape.to_vec(),
                found: t.shape().to_vec(),
            });
        }
        Ok(t)
    }

    pub fn set_meta(&mut self, key: &str, value: impl Into<String>) {
        self.metadata.insert(key.to_string(), value.into());
    }

    pub fn meta(&self, key: &str) -> Option<&str> {
        self.metadata.get(key).map(|s| s.as_str())
    }

    /// A metadata entry that must be present.
    pub fn meta_required(&self, key: &str) -> NnResult<&str> {
        self.meta(key).ok_or_else(|| NnError::MissingMetadata {
            path: self.origin(),
            key: key.to_string(),
        })
    }

    /// The first tensor (by name) holding a NaN or infinite value, with that value.
    pub fn first_non_finite(&self) -> Option<(String, f32)> {
        self.tensors.iter().find_map(|(name, t)| {
            t.data
                .iter()
                .find(|v| !v.is_finite())
                .map(|&v| (name.clone(), v))
        })
    }

    /// Serialises to safetensors bytes (all tensors F32).
    pub fn to_bytes(&self) -> NnResult<Vec<u8>> {
        let encoded: Vec<(&String, Vec<u8>, &Vec<usize>)> = self
            .tensors
            .iter()
            .map(|(k, t)| Ok((k, encode(&t.data, Dtype::F32)?, &t.shape)))
            .collect::<NnResult<_>>()?;
        let views = encoded
            .iter()
            .map(|(k, bytes, shape)| {
                TensorView::new(Dtype::F32, (*shape).clone(), bytes).map(|v| (k.as_str(), v))
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| NnError::Config(format!("checkpoint tensor view: {e}")))?;
        let meta: HashMap<String, String> = self.metadata.clone().into_iter().collect();
        safetensors::serialize(views, Some(meta))
            .map_err(|e| NnError::Config(format!("checkpoint serialise: {e}")))
    }

    /// Writes the checkpoint atomically ([`crate::files::write_atomic`]): a failed write leaves
    /// the previous file as it was and no `.tmp` behind.
    pub fn save(&self, path: impl AsRef<Path>) -> NnResult<()> {
        let bytes = self.to_bytes()?;
        crate::files::write_atomic(path.as_ref(), &bytes).map_err(|e| NnError::Io {
            path: e.path,
            source: e.source,
        })
    }

    /// Reads a checkpoint written by [`Checkpoint::save`] (F16/BF16 tensors are accepted too).
    pub fn load(path: impl AsRef<Path>) -> NnResult<Checkpoint> {
        let path = path.as_ref();
        let bytes = read_bytes(path)?;
        let st = parse(path, &bytes)?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| {
            NnError::NotSafetensors {
                path: path.to_path_buf(),
                reason: e.to_string(),
            }
        })?;
        let mut ck = Checkpoint {
            source: Some(path.to_path_buf()),
            ..Checkpoint::default()
        };
        if let Some(meta) = header.metadata() {
            ck.metadata = meta.clone().into_iter().collect();
        }
        for (key, view) in st.iter() {
            let data = decode(path, key, view.dtype(), view.data())?;
            ck.insert_host(
                key,
                HostTensor {
                    shape: view.shape().to_vec(),
                    data,
                },
            );
        }
        Ok(ck)
    }
}
