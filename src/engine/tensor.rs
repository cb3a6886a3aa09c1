//! The tensor: an immutable f32 NCHW array on one device, plus the autograd node that made it.
//!
//! Tensors are cheap to clone (an `Arc`). Ops never mutate their inputs; the only in-place
//! writes are the optimizer's and BatchNorm's running statistics, through [`Tensor::assign`].

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::device::Device;
use super::error::{shape_err, EngineError, Result};
use super::gpu::GpuBuffer;
use super::host_pool;
use super::rng::Rng;
use super::tape::{self, Backward, Node};

pub enum Storage {
    Cpu(RwLock<Vec<f32>>),
    Gpu(GpuBuffer),
}

/// Freed CPU storage goes to the buffer pool for the next op's output.
impl Drop for Storage {
    fn drop(&mut self) {
        if let Storage::Cpu(values) = self {
            let values = values
                .get_mut()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            host_pool::give_back(std::mem::take(values));
        }
    }
}

pub struct Inner {
    pub(crate) id: usize,
    pub(crate) shape: Vec<usize>,
    pub(crate) storage: Arc<Storage>,
    pub(crate) node: Option<Node>,
    pub(crate) requires_grad: bool,
}

#[derive(Clone)]
pub struct Tensor(pub(crate) Arc<Inner>);

static NEXT_ID: AtomicUsize = AtomicUsize::new(1);

fn next_id() -> usize {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Tensor(#{} {:?} on {}{})",
            self.id(),
            self.shape(),
            if self.is_gpu() { "gpu" } else { "cpu" },
            if self.requires_grad() { ", grad" } else { "" }
        )
    }
}

pub fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

impl Tensor {
    // ------------------------------------------------------------ creation

    fn from_storage(storage: Arc<Storage>, shape: &[usize]) -> Tensor {
        Tensor(Arc::new(Inner {
            id: next_id(),
            shape: shape.to_vec(),
            storage,
            node: None,
            requires_grad: false,
        }))
    }

    /// Wraps host data; the length must match the shape.
    pub fn from_cpu(data: Vec<f32>, shape: &[usize]) -> Result<Tensor> {
        if data.len() != numel(shape) {
            return shape_err(
                "from_cpu",
                format!("{} values for shape {shape:?}", data.len()),
            );
        }
        host_pool::note_storage();
        Ok(Self::from_storage(
            Arc::new(Storage::Cpu(RwLock::new(data))),
            shape,
        ))
    }

    /// Wraps a GPU buffer holding exactly `numel(shape)` values.
    pub fn from_gpu(buf: GpuBuffer, shape: &[usize]) -> Result<Tensor> {
        if buf.len() != numel(shape) {
            return shape_err(
                "from_gpu",
                format!("{} values for shape {shape:?}", buf.len()),
            );
        }
        Ok(Self::from_storage(Arc::new(Storage::Gpu(buf)), shape))
    }

    /// Host data placed on `device`.
    pub fn from_vec(data: Vec<f32>, shape: &[usize], device: &Device) -> Result<Tensor> {
        match device {
            Device::Cpu => Self::from_cpu(data, shape),
            Device::Gpu(ctx) => {
                if data.len() != numel(shape) {
                    return shape_err(
                        "from_vec",
                        format!("{} values for shape {shape:?}", data.len()),
                    );
                }
                Self::from_gpu(ctx.upload(&data)?, shape)
            }
        }
    }

    pub fn zeros(shape: &[usize], device: &Device) -> Result<Tensor> {
        match device {
            Device::Cpu => Self::from_cpu(host_pool::zeroed(numel(shape)), shape),
            Device::Gpu(ctx) => Self::from_gpu(ctx.zeros(numel(shape))?, shape),
        }
    }

    pub fn full(value: f32, shape: &[usize], device: &Device) -> Result<Tensor> {
        let mut values = host_pool::for_overwrite(numel(shape));
        values.fill(value);
        Self::from_vec(values, shape, device)
    }

    pub fn scalar(value: f32, device: &Device) -> Result<Tensor> {
        Self::from_vec(vec![value], &[1], device)
    }

    /// Normal(0, std) values drawn on the host (so both devices see the same numbers).
    pub fn randn(shape: &[usize], std: f32, rng: &mut Rng, device: &Device) -> Result<Tensor> {
        let data = (0..numel(shape)).map(|_| rng.normal() * std).collect();
        Self::from_vec(data, shape, device)
    }

    /// Uniform [lo, hi) values drawn on the host.
    pub fn rand_uniform(
        shape: &[usize],
        lo: f32,
        hi: f32,
        rng: &mut Rng,
        device: &Device,
    ) -> Result<Tensor> {
        let data = (0..numel(shape))
            .map(|_| rng.uniform_range(lo, hi))
            .collect();
        Self::from_vec(data, shape, device)
    }

    // ------------------------------------------------------------ metadata

    pub fn id(&self) -> usize {
        self.0.id
    }
    pub fn shape(&self) -> &[usize] {
        &self.0.shape
    }
    pub fn rank(&self) -> usize {
        self.0.shape.len()
    }
    pub fn numel(&self) -> usize {
        numel(&self.0.shape)
    }
    pub fn dim(&self, i: usize) -> usize {
        self.0.shape[i]
    }
    pub fn is_gpu(&self) -> bool {
        matches!(*self.0.storage, Storage::Gpu(_))
    }
    pub fn requires_grad(&self) -> bool {
        self.0.requires_grad
    }
    pub fn storage(&self) -> &Storage {
        &self.0.storage
    }
    /// The shared handle, for tests that watch when a tensor is freed.
    #[doc(hidden)]
    pub fn inner_for_tests(&self) -> std::sync::Arc<Inner> {
        self.0.clone()
    }
    pub(crate) fn node(&self) -> Option<&Node> {
        self.0.node.as_ref()
    }

    pub fn device(&self) -> Device {
        match &*self.0.storage {
            Storage::Cpu(_) => Device::Cpu,
            Storage::Gpu(b) => Device::Gpu(b.ctx().clone()),
        }
    }

    /// The four dimensions of an NCHW tensor.
    pub fn dims4(&self, op: &'static str) -> Result<(usize, usize, usize, usize)> {
        match self.shape() {
            &[n, c, h, w] => Ok((n, c, h, w)),
            s => shape_err(op, format!("expected a 4-D NCHW tensor, got {s:?}")),
        }
    }

    /// The two dimensions of a matrix.
    pub fn dims2(&self, op: &'static str) -> Result<(usize, usize)> {
        match self.shape() {
            &[r, c] => Ok((r, c)),
            s => shape_err(op, format!("expected a 2-D tensor, got {s:?}")),
        }
    }

    // ------------------------------------------------------------ data access

    /// Host values, read-locked. Fails for a GPU tensor.
    pub fn cpu(&self) -> Result<RwLockReadGuard<'_, Vec<f32>>> {
        match &*self.0.storage {
            Storage::Cpu(v) => Ok(v.read().unwrap()),
            Storage::Gpu(_) => Err(EngineError::Invalid {
                op: "cpu",
                detail: "tensor lives on the GPU".into(),
            }),
        }
    }

    /// The GPU buffer. Fails for a CPU tensor.
    pub fn gpu(&self) -> Result<&GpuBuffer> {
        match &*self.0.storage {
            Storage::Gpu(b) => Ok(b),
            Storage::Cpu(_) => Err(EngineError::Invalid {
                op: "gpu",
                detail: "tensor lives on the CPU".into(),
            }),
        }
    }

    /// Copies the values to the host (waits for the GPU).
    pub fn to_vec(&self) -> Result<Vec<f32>> {
        match &*self.0.storage {
            Storage::Cpu(v) => Ok(v.read().unwrap().clone()),
            Storage::Gpu(b) => b.ctx().download(b),
        }
    }

    /// The single value of a one-element tensor.
    pub fn item(&self) -> Result<f32> {
        if self.numel() != 1 {
            return shape_err("item", format!("tensor of shape {:?}", self.shape()));
        }
        Ok(self.to_vec()?[0])
    }

    /// An explicit copy onto `device` (not recorded by autograd).
    pub fn to_device(&self, device: &Device) -> Result<Tensor> {
        if self.device().is_same_device(device) {
            return Ok(self.detach());
        }
        Tensor::from_vec(self.to_vec()?, self.shape(), device)
    }

    // ------------------------------------------------------------ autograd

    /// The same values, cut from the graph.
    pub fn detach(&self) -> Tensor {
        Self::from_storage(self.0.storage.clone(), self.shape())
    }

    /// A leaf that autograd tracks: parameters, and inputs whose gradient PGD needs.
    pub fn var(&self) -> Tensor {
        Tensor(Arc::new(Inner {
            id: next_id(),
            shape: self.shape().to_vec(),
            storage: self.0.storage.clone(),
            node: None,
            requires_grad: true,
        }))
    }

    /// Attaches the backward of the op that produced `self` from `inputs`, when grad mode is on
    /// and some input needs a gradient. Op implementations call this on their fresh output.
    pub fn record(self, op: impl Backward + 'static, inputs: &[&Tensor]) -> Tensor {
        if !tape::is_grad_enabled() || !inputs.iter().any(|t| t.requires_grad()) {
            return self;
        }
        let inner = Arc::try_unwrap(self.0).unwrap_or_else(|a| Inner {
            id: next_id(),
            shape: a.shape.clone(),
            storage: a.storage.clone(),
            node: None,
            requires_grad: false,
        });
        Tensor(Arc::new(Inner {
            node: Some(Node {
                op: Box::new(op),
                inputs: inputs.iter().map(|t| (*t).clone()).collect(),
            }),
            requires_grad: true,
            ..inner
        }))
    }

    /// Backpropagates from this tensor (seeded with ones) and returns the gradients of every
    /// tracked leaf. Consumes the handle so intermediates are freed as soon as they are used.
    pub fn backward(self) -> Result<tape::Gradients> {
        tape::backward(self)
    }

    // ------------------------------------------------------------ in place

    /// Overwrites this tensor's values in place with `src`'s (same shape and device). For
    /// optimizer updates and running statistics only: every tensor sharing the storage sees it.
    pub fn assign(&self, src: &Tensor) -> Result<()> {
        if src.shape() != self.shape() {
            return shape_err(
                "assign",
                format!("{:?} into {:?}", src.shape(), self.shape()),
            );
        }
        match (&*self.0.storage, &*src.0.storage) {
            (Storage::Cpu(dst), Storage::Cpu(s)) => {
                let s = s.read().unwrap().clone();
                *dst.write().unwrap() = s;
                Ok(())
            }
            (Storage::Gpu(dst), Storage::Gpu(s)) => {
                dst.ctx().copy(s, 0, dst, 0, dst.len());
                Ok(())
            }
            _ => Err(EngineError::DeviceMismatch {
                op: "assign",
                a: self.device().name(),
                b: src.device().name(),
            }),
        }
    }

    /// Host values, write-locked (CPU in-place kernels such as AdamW).
    pub fn cpu_mut(&self) -> Result<RwLockWriteGuard<'_, Vec<f32>>> {
        match &*self.0.storage {
            Storage::Cpu(v) => Ok(v.write().unwrap()),
            Storage::Gpu(_) => Err(EngineError::Invalid {
                op: "cpu_mut",
                detail: "tensor lives on the GPU".into(),
            }),
        }
    }

    /// Whether two tensors share the same storage.
    pub fn shares_storage(&self, other: &Tensor) -> bool {
        Arc::ptr_eq(&self.0.storage, &other.0.storage)
    }

    /// Rows `start..start + len` along the first dimension, copied (not recorded: for
    /// evaluation and batching, not for training graphs).
    pub fn rows(&self, start: usize, len: usize) -> Result<Tensor> {
        let n = self.shape().first().copied().unwrap_or(0);
        if start + len > n {
            return shape_err(
                "rows",
                format!("rows {start}..{} of {:?}", start + len, self.shape()),
            );
        }
        let row = self.numel() / n.max(1);
        let mut shape = self.shape().to_vec();
        shape[0] = len;
        match &*self.0.storage {
            Storage::Cpu(v) => {
                let v = v.read().unwrap();
                Tensor::from_cpu(v[start * row..(start + len) * row].to_vec(), &shape)
            }
            Storage::Gpu(b) => {
                let ctx = b.ctx();
                let out = ctx.alloc(len * row)?;
                ctx.copy(b, start * row, &out, 0, len * row);
                Tensor::from_gpu(out, &shape)
            }
        }
    }

    /// Same storage under another shape of equal size, not recorded: for op implementations
    /// that work on raw values.
    pub(crate) fn reshape_raw(&self, shape: &[usize]) -> Result<Tensor> {
        if numel(shape) != self.numel() {
            return shape_err("reshape", format!("{:?} to {shape:?}", self.shape()));
        }
        Ok(Self::from_storage(self.0.storage.clone(), shape))
    }

    /// Same storage under another shape of equal size. Recorded by autograd.
    pub fn reshape(&self, shape: &[usize]) -> Result<Tensor> {
        if numel(shape) != self.numel() {
            return shape_err("reshape", format!("{:?} to {shape:?}", self.shape()));
        }
        let out = Self::from_storage(self.0.storage.clone(), shape);
        Ok(out.record(ReshapeBack, &[self]))
    }
}

struct ReshapeBack;
impl Backward for ReshapeBack {
    fn name(&self) -> &'static str {
        "reshape"
    }
    fn backward(
        &self,
        inputs: &[Tensor],
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(grad.reshape(inputs[0].shape())?)])
    }
}

/// The device shared by all `tensors`, or an error naming the op.
pub fn same_device(op: &'static str, tensors: &[&Tensor]) -> Result<Device> {
    let d = tensors[0].device();
    for t in &tensors[1..] {
        let e = t.device();
        if !d.is_same_device(&e) {
            return Err(EngineError::DeviceMismatch {
                op,
                a: d.name(),
                b: e.name(),
            });
        }
    }
    Ok(d)
}
