//! Models for deep metric learning: a parameter store and layers built on the engine ops,
//! MobileNetV2 and ResNet-18/50 (torchvision), BN-Inception (Cadene's `pretrainedmodels`), a
//! small `c2f2` CNN, the embedding head, safetensors weight loading and atomic checkpoints.

pub mod bn_inception;
pub mod c2f2;
pub mod checkpoint;
pub mod embedding;
pub mod error;
pub mod layers;
pub mod mobilenet_v2;
pub mod params;
pub mod resnet;
pub mod weights;

pub use checkpoint::{Checkpoint, HostTensor};
pub use embedding::{Backbone, EmbeddingNet};
pub use error::NnError;
pub use layers::ForwardMode;
pub use params::{ParamId, ParamKind, ParamStore};
pub use weights::{LoadMode, LoadReport};
