//! Ops, one file per op family; each holds its forward and backward for both devices.

pub mod attack;
pub mod batchnorm;
pub mod channels;
pub mod conv;
pub mod elementwise;
pub mod kmeans;
pub mod matmul;
pub mod normalize;
pub mod optim;
pub mod pool;
pub mod proxy_anchor;
pub mod reduce;
pub mod topk;
