//! robust-dml: adversarially robust deep metric learning on a from-scratch wgpu engine.
//!
//! - [`engine`]: devices, tensors, autograd and the ops (WGSL kernels + CPU reference).
//! - [`data`]: datasets with their class-disjoint splits, image transforms, the batch loader.
//! - [`nn`]: layers, MobileNetV2 / BN-Inception / c2f2, the embedding head, weights and checkpoints.
//! - [`dml`]: the Proxy Anchor loss, retrieval and clustering metrics, k-means.
//! - [`robust`]: PGD attacks, defenses and EAT ensembles.
//! - [`pipeline`]: training, evaluation, the experiment and its report (above `dml` and
//!   `robust`).
//! - [`cli`]: argument parsing, calling the pipeline.
//! - [`config`]: every hyper-parameter default.
//! - [`files`]: reading user-named files (regular files only, within available memory).

pub mod cli;
pub mod config;
pub mod data;
pub mod dml;
pub mod engine;
pub mod error;
pub mod files;
pub mod nn;
pub mod pipeline;
pub mod robust;
