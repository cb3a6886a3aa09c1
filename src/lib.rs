pub mod dml;
pub mod engine;
