//! Adversarial robustness: PGD attacks on embeddings, the defenses, EAT ensembles and their
//! voting inference, the experiment pipeline and its report.

pub mod defense;
pub mod ensemble;
pub mod experiment;
pub mod pgd;
pub mod report;
