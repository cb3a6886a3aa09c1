//! The parameter store: every tensor of a model under its PyTorch key name, in registration
//! order. Trainable parameters are tracked leaves (`Tensor::var`), so the gradients of a
//! backward pass are found by passing them to `Gradients::get`; BatchNorm running statistics are
//! plain buffers that `batch_norm_train` updates in place.
//!
//! Layers keep [`ParamId`]s, not tensors, and look their tensors up at every forward pass, so a
//! tensor replaced with [`ParamStore::set`] (after an optimizer step, a weight load, a device
//! move) is seen by the next forward pass.

use std::collections::HashMap;

use crate::engine::error::{invalid, shape_err, Result};
use crate::engine::{Device, Tensor};

/// Whether a tensor is learned by gradient descent or is state such as running statistics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamKind {
    Trainable,
    Buffer,
}

/// The position of a tensor in its store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ParamId(pub(crate) usize);

struct Entry {
    name: String,
    tensor: Tensor,
    kind: ParamKind,
    /// A trainable parameter excluded from gradients for now (e.g. the backbone during the
    /// warm-up epoch): stored as a plain tensor instead of a tracked leaf.
    frozen: bool,
}

pub struct ParamStore {
    entries: Vec<Entry>,
    index: HashMap<String, usize>,
    device: Device,
}

impl ParamStore {
    pub fn new(device: &Device) -> ParamStore {
        ParamStore {
            entries: Vec::new(),
            index: HashMap::new(),
            device: device.clone(),
        }
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Registers a tensor under a new name; it is moved to the store's device and, when
    /// trainable, made a tracked leaf.
    pub fn add(&mut self, name: &str, tensor: Tensor, kind: ParamKind) -> Result<ParamId> {
        if self.index.contains_key(name) {
            return invalid(
                "ParamStore::add",
                format!("duplicate parameter name '{name}'"),
            );
        }
        let tensor = Self::detached_leaf(tensor.to_device(&self.device)?, kind, false);
        let id = self.entries.len();
        self.entries.push(Entry {
            name: name.to_string(),
            tensor,
            kind,
            frozen: false,
        });
        self.index.insert(name.to_string(), id);
        Ok(ParamId(id))
    }

    /// `tensor` cut from any graph, and a gradient leaf if it trains (trainable, not frozen).
    fn detached_leaf(tensor: Tensor, kind: ParamKind, frozen: bool) -> Tensor {
        match kind {
            ParamKind::Trainable if !frozen => tensor.detach().var(),
            _ => tensor.detach(),
        }
    }

    /// The tensor of a registered parameter.
    pub fn get(&self, id: ParamId) -> &Tensor {
        &self.entries[id.0].tensor
    }

    pub fn id(&self, name: &str) -> Option<ParamId> {
        self.index.get(name).map(|&i| ParamId(i))
    }

    pub fn by_name(&self, name: &str) -> Option<&Tensor> {
        self.index.get(name).map(|&i| &self.entries[i].tensor)
    }

    pub fn name(&self, id: ParamId) -> &str {
        &self.entries[id.0].name
    }

    pub fn kind(&self, name: &str) -> Option<ParamKind> {
        self.index.get(name).map(|&i| self.entries[i].kind)
    }

    /// All names, in registration order.
    pub fn names(&self) -> Vec<String> {
        self.entries.iter().map(|e| e.name.clone()).collect()
    }

    /// (name, tensor, kind) for every entry, in registration order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor, ParamKind)> {
        self.entries
            .iter()
            .map(|e| (e.name.as_str(), &e.tensor, e.kind))
    }

    /// The trainable parameters that currently take gradients (tracked leaves), in order.
    pub fn trainable(&self) -> Vec<(String, Tensor)> {
        self.entries
            .iter()
            .filter(|e| e.kind == ParamKind::Trainable && !e.frozen)
            .map(|e| (e.name.clone(), e.tensor.clone()))
            .collect()
    }

    /// Every trainable parameter, frozen or not.
    pub fn all_trainable(&self) -> Vec<(String, Tensor)> {
        self.entries
            .iter()
            .filter(|e| e.kind == ParamKind::Trainable)
            .map(|e| (e.name.clone(), e.tensor.clone()))
            .collect()
    }

    /// The buffers (running statistics), in order.
    pub fn buffers(&self) -> Vec<(String, Tensor)> {
        self.entries
            .iter()
            .filter(|e| e.kind == ParamKind::Buffer)
            .map(|e| (e.name.clone(), e.tensor.clone()))
            .collect()
    }

    /// Total number of values of the trainable parameters.
    pub fn num_trainable_values(&self) -> usize {
        self.all_trainable().iter().map(|(_, t)| t.numel()).sum()
    }

    fn entry_index(&self, op: &'static str, name: &str) -> Result<usize> {
        match self.index.get(name) {
            Some(&i) => Ok(i),
            None => invalid(op, format!("no parameter named '{name}'")),
        }
    }

    /// Replaces a tensor by a new one of the same shape (moved to the store's device; made a
    /// tracked leaf again when trainable). Gradients of earlier forward passes refer to the old
    /// leaf; later passes use the new one.
    pub fn set(&mut self, name: &str, tensor: Tensor) -> Result<()> {
        let i = self.entry_index("ParamStore::set", name)?;
        let e = &mut self.entries[i];
        if tensor.shape() != e.tensor.shape() {
            return shape_err(
                "ParamStore::set",
                format!(
                    "'{name}' has shape {:?}, got {:?}",
                    e.tensor.shape(),
                    tensor.shape()
                ),
            );
        }
        e.tensor = Self::detached_leaf(tensor.to_device(&self.device)?, e.kind, e.frozen);
        Ok(())
    }

    /// Copies `src`'s values into the stored tensor in place, keeping its identity (so leaves
    /// held by an optimizer stay valid). `src` may live on another device.
    pub fn assign(&self, name: &str, src: &Tensor) -> Result<()> {
        let i = self.entry_index("ParamStore::assign", name)?;
        let dst = &self.entries[i].tensor;
        if src.shape() != dst.shape() {
            return shape_err(
                "ParamStore::assign",
                format!(
                    "'{name}' has shape {:?}, got {:?}",
                    dst.shape(),
                    src.shape()
                ),
            );
        }
        dst.assign(&src.to_device(&self.device)?)
    }

    /// Freezes (no gradients) or unfreezes the trainable parameters whose name satisfies `pred`.
    pub fn set_frozen(&mut self, pred: impl Fn(&str) -> bool, frozen: bool) {
        for e in self.entries.iter_mut() {
            if e.kind == ParamKind::Trainable && pred(&e.name) && e.frozen != frozen {
                e.frozen = frozen;
                e.tensor = Self::detached_leaf(e.tensor.clone(), e.kind, frozen);
            }
        }
    }

    pub fn is_frozen(&self, name: &str) -> bool {
        self.index
            .get(name)
            .is_some_and(|&i| self.entries[i].frozen)
    }

    /// The whole store on `device`, with fresh leaves (values copied across devices; shared
    /// storage when `device` is the store's own: see [`ParamStore::deep_clone`]).
    pub fn to_device(&self, device: &Device) -> Result<ParamStore> {
        let mut out = ParamStore::new(device);
        for e in &self.entries {
            out.add(&e.name, e.tensor.to_device(device)?, e.kind)?;
        }
        out.copy_frozen_flags(self);
        Ok(out)
    }

    fn copy_frozen_flags(&mut self, from: &ParamStore) {
        for (dst, src) in self.entries.iter_mut().zip(&from.entries) {
            dst.frozen = src.frozen;
            dst.tensor = Self::detached_leaf(dst.tensor.clone(), dst.kind, src.frozen);
        }
    }

    /// A deep copy on the same device (fresh storage, so in-place updates are not shared).
    pub fn deep_clone(&self) -> Result<ParamStore> {
        let mut out = ParamStore::new(&self.device);
        for e in &self.entries {
            let copy = Tensor::from_vec(e.tensor.to_vec()?, e.tensor.shape(), &self.device)?;
            out.add(&e.name, copy, e.kind)?;
        }
        out.copy_frozen_flags(self);
        Ok(out)
    }
}
