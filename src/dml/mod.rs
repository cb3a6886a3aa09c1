//! Deep metric learning on top of the engine: the Proxy Anchor loss, evaluation and metrics.

pub mod eval;
pub mod loss;
pub mod metrics;
pub mod train;
