pub mod engine;
pub mod nn;
