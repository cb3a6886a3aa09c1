pub mod data;
pub mod dml;
pub mod engine;
