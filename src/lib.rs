pub mod dml;
pub mod engine;
pub mod config;
