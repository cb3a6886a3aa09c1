//! Deep metric learning on top of the engine: the Proxy Anchor loss, device evaluation and metrics.

pub mod eval;
pub mod loss;
