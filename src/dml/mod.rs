//! Deep metric learning on top of the engine: losses (and, later, miners and metrics).

pub mod loss;
