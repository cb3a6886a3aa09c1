//! How an experiment evaluates each trained run: the attack, the curves' sweeps, the subsets
//! and the optional suites. Part of the settings every cell of an experiment shares.

use serde::{Deserialize, Serialize};

use crate::config::PgdConfig;
use crate::pipeline::ranking::RankingPlan;

/// How the evaluation attacks and sweeps are run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalPlan {
    pub attack: PgdConfig,
    /// PGD steps of the steps curve (at the attack's eps).
    pub steps_sweep: Vec<usize>,
    /// eps * 255 of the eps curve (at the attack's steps).
    pub eps_sweep: Vec<f32>,
    /// Test samples used for the curves and the projection (spread evenly over the test set,
    /// which the loaders order by class; 0 = all).
    pub curve_samples: usize,
    /// Test samples evaluated at all (spread evenly; 0 = the whole test set): bounds the cost
    /// of attacking large test sets in quick runs.
    #[serde(default)]
    pub max_test_samples: usize,
    pub batch_size: usize,
    pub seed: u64,
    /// The ranking-attack suite (docs/DESIGN.md, "The ranking-attack suite and ERS") on a subset of
    /// queries; absent = not run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ranking: Option<RankingPlan>,
    /// The objectives and transfer evaluations and their subsets.
    #[serde(default)]
    pub strength: StrengthPlan,
}

impl EvalPlan {
    /// The steps curve's attack at `steps`: the evaluation attack with its step size alpha
    /// kept, so PGD-k is the first k steps of the evaluation attack's path (as in the paper's
    /// iteration sweep). Scaling alpha as 2.5 eps / k instead made PGD-1 a full-eps FGSM step,
    /// which in the clustering scenario lowered R@1 more than PGD-10 did.
    pub fn attack_with_steps(&self, steps: usize) -> PgdConfig {
        PgdConfig {
            steps,
            restarts: 1,
            kind: crate::config::AttackKind::Pgd,
            ..self.attack
        }
    }

    /// The eps curve's attack at `eps`: the evaluation attack with alpha scaled in proportion
    /// (the same alpha / eps), so every point takes the same path relative to its ball.
    pub fn attack_with_eps(&self, eps: f32) -> PgdConfig {
        let alpha = if eps == self.attack.eps {
            self.attack.alpha
        } else if self.attack.eps == 0.0 {
            PgdConfig::new(eps, self.attack.steps).alpha
        } else {
            self.attack.alpha * (eps / self.attack.eps)
        };
        PgdConfig {
            eps,
            alpha,
            restarts: 1,
            kind: crate::config::AttackKind::Pgd,
            ..self.attack
        }
    }
}

/// Which extra attack-strength evaluations an experiment runs, on how many test images each
/// (spread over the test set; 0 = not run).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StrengthPlan {
    /// The evaluation attack with every objective (`Objective::ALL`); the embedding-shift row
    /// reuses the main attack, the other two are one attack run each.
    pub objective_samples: usize,
    /// Transfer rows from the undefended model for every defended method: one attack run on
    /// the undefended model and a forward pass of the target.
    pub transfer_samples: usize,
}

impl Default for StrengthPlan {
    fn default() -> Self {
        StrengthPlan {
            objective_samples: crate::config::OBJECTIVE_SAMPLES,
            transfer_samples: crate::config::TRANSFER_SAMPLES,
        }
    }
}

impl StrengthPlan {
    /// The quick preset's: 100 images each, to stay within its time budget.
    pub fn quick() -> Self {
        StrengthPlan {
            objective_samples: 100,
            transfer_samples: 100,
        }
    }
}
