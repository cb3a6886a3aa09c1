//! robust-dml: adversarially robust deep metric learning on a from-scratch wgpu engine.
//!
//! - [`engine`]: devices, tensors, autograd and the ops (WGSL kernels + CPU reference).
//! - [`dml`]: the Proxy Anchor loss, device evaluation and metrics.
//! - [`nn`]: models (MobileNetV2, BN-Inception, c2f2), weight loading and checkpoints.
//! - [`robust`]: PGD attacks, defenses and EAT ensembles.
//! - [`config`]: every hyper-parameter default.

pub mod config;
pub mod dml;
pub mod engine;
pub mod nn;
pub mod robust;
