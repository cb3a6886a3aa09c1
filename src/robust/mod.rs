//! Adversarial robustness: PGD attacks on embeddings, the defenses, EAT ensembles and their
//! voting inference. Built on `dml`; training and evaluation live above, in `pipeline`.

pub mod defense;
pub mod ensemble;
pub mod pgd;
pub mod ranking;
pub mod restarts;
