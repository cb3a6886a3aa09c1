//! Deep-metric-learning pieces: evaluation metrics (and, elsewhere, the losses).

pub mod metrics;
