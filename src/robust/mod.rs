//! Adversarial robustness: PGD and APGD attacks on embeddings (embedding-shift, metric-loss
//! and retrieval objectives), the defenses, EAT ensembles and their
//! voting inference. Built on `dml`; training and evaluation live above, in `pipeline`.

pub mod attack;
pub mod defense;
pub mod ensemble;
pub mod objectives;
pub mod ranking;
pub mod robrank;
