//! Deep metric learning on top of the engine: the Proxy Anchor loss, robrank's triplet loss,
//! retrieval and clustering metrics, k-means.

pub mod eval;
pub mod kmeans;
pub mod loss;
pub mod metrics;
pub mod triplet;
