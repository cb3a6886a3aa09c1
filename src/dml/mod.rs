//! Deep metric learning on top of the engine: the Proxy Anchor loss, evaluation and metrics.

pub mod eval;
pub mod evaluate;
pub mod kmeans;
pub mod loss;
pub mod metrics;
pub mod run_dir;
pub mod train;
