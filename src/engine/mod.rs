//! The compute engine: devices, tensors, the autograd tape and the ops.

pub mod cpu;
pub mod device;
pub mod error;
pub mod gpu;
pub mod host_pool;
pub(crate) mod launch;
pub mod ops;
pub mod optim;
pub mod policy;
pub mod reference;
pub mod rng;
pub(crate) mod split;
pub mod tape;
pub mod tensor;
pub mod testing;

pub use device::Device;
pub use error::{EngineError, Result};
pub use policy::KernelPolicy;
pub use rng::Rng;
pub use tape::{no_grad, Gradients};
pub use tensor::Tensor;
