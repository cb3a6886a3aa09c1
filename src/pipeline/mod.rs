//! The pipeline: training runs, evaluation (clean and attacked), the experiment and its report,
//! and the run directory they write. It sits above `dml` and `robust` and uses both; neither
//! imports it.

pub mod cells;
pub mod commands;
pub mod embed;
pub mod eval_plan;
pub mod evaluate;
pub mod experiment;
pub mod interrupt;
pub mod plots;
pub mod presets;
pub mod progress;
pub mod ranking;
pub mod report;
pub mod results;
pub mod run_dir;
pub mod sanity;
pub mod spread;
pub mod strength;
pub mod tables;
pub mod train;
pub mod train_config;
