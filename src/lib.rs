//! robust-dml: adversarially robust deep metric learning on a from-scratch wgpu engine.
//!
//! - [`engine`]: devices, tensors, autograd and the ops (WGSL kernels + CPU reference).
//! - [`data`]: datasets with their class-disjoint splits, image transforms, the batch loader.
//! - [`nn`]: layers, MobileNetV2 / BN-Inception / c2f2, the embedding head, weights and checkpoints.
//! - [`dml`]: the Proxy Anchor loss, evaluation and metrics.
//! - [`robust`]: PGD attacks, defenses and EAT ensembles.
//! - [`config`]: every hyper-parameter default.

pub mod cli;
pub mod config;
pub mod data;
pub mod dml;
pub mod engine;
pub mod error;
pub mod nn;
pub mod robust;
