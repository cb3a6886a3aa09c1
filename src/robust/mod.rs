//! Adversarial robustness: PGD attacks on embeddings, the defenses and EAT ensembles.

pub mod defense;
pub mod ensemble;
pub mod pgd;
pub mod report;
