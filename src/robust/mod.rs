//! Adversarial robustness: PGD and APGD attacks on embeddings (embedding-shift, metric-loss
//! and retrieval objectives), the defenses, EAT ensembles and their
//! voting inference. Built on `dml`; training and evaluation live above, in `pipeline`.

pub mod apgd;
pub mod defense;
pub mod ensemble;
pub mod objectives;
pub mod pgd;
pub mod ranking;
pub mod restarts;
