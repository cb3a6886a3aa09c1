//! Every hyper-parameter default in one place. The CLI's `--help` shows these values, the
//! config structs' `Default` impls use them, and checkpoints record the resolved config.

use serde::{Deserialize, Serialize};

/// Proxy Anchor (Kim et al. 2020): scale and margin.
pub const PA_ALPHA: f32 = 32.0;
pub const PA_DELTA: f32 = 0.1;
/// robrank's triplet margin for normalised embeddings (`configs.triplet.margin_cosine`, used
/// for its metrics C and N).
pub const TRIPLET_MARGIN: f32 = 0.2;
/// robrank's weight of HM's intra-class structure term (`icslambda` in `defenses/amd.py`).
pub const HM_ICS_LAMBDA: f32 = 0.5;
/// HM's PGD stops once its objective moves by less than this between steps (robrank's
/// saturation stop in `MadryInnerMax.HardnessManipulate`).
pub const HM_FLAT: f32 = 1e-7;
/// LGA's memory before a member's first HM step (robrank's `_hm_prev_loss` initial value).
pub const LGA_INITIAL_LOSS: f32 = 2.0;
/// AdamW, Proxy-Anchor's recipe.
pub const LR: f32 = 1e-4;
pub const WEIGHT_DECAY: f32 = 1e-4;
pub const PROXY_LR_MULT: f32 = 100.0;
pub const LR_STEP_EPOCHS: usize = 10;
pub const LR_GAMMA: f32 = 0.5;
pub const WARMUP_EPOCHS: usize = 1;
pub const GRAD_CLIP: f32 = 10.0;
pub const EMBEDDING_DIM: usize = 512;
pub const BATCH_SIZE: usize = 150;
pub const SEED: u64 = 0;
pub const WORKERS: usize = 2;
/// A training epoch also writes a checkpoint when this many minutes have passed since the
/// last one, so that an interrupted long epoch resumes where it was, not from its start.
pub const CHECKPOINT_MINUTES: f64 = 10.0;
/// Training attack (the paper's): eps 16/255, 10 steps.
pub const TRAIN_EPS: f32 = 16.0 / 255.0;
pub const TRAIN_STEPS: usize = 10;
/// Evaluation attack (the paper's Table 1): eps 8/255, 10 steps.
pub const EVAL_EPS: f32 = 8.0 / 255.0;
pub const EVAL_STEPS: usize = 10;
/// Step size rule (Madry et al.): alpha = ALPHA_BUDGET * eps / steps, so the steps together can
/// travel 2.5 eps; with 10 steps that is eps / 4.
pub const ALPHA_BUDGET: f32 = 2.5;
/// EAT (Algorithm 1).
pub const ENSEMBLE_SIZE: usize = 3;
pub const EAT_BETA: f32 = 0.5;
/// Mix-Up's Beta(a, a).
pub const MIXUP_ALPHA: f32 = 1.0;
/// TRADES' weight on the embedding distance, picked by a sweep over 1, 10, 100 and 1000 on the
/// quick preset (README): the squared distance is about 0.05 where the Proxy Anchor loss is
/// about 10; 10 gave the best attacked R@1 averaged over both scenarios, 100 and 1000 traded
/// away clean and attacked accuracy alike.
pub const TRADES_LAMBDA: f32 = 10.0;
/// Start of an attack without a random start: x + 0.001 N(0, 1) (docs/DESIGN.md, Attacks).
pub const PGD_START_NOISE: f32 = 0.001;

/// The attack scenarios a command reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// Every test sample perturbed; metrics on the adversarial embeddings alone.
    Clustering,
    /// Queries perturbed, gallery clean.
    Template,
    Both,
}

impl Scenario {
    pub fn clustering(self) -> bool {
        self != Scenario::Template
    }
    pub fn template(self) -> bool {
        self != Scenario::Clustering
    }
}

/// Objective an attack maximises.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Objective {
    /// ||F(x_adv) - F(x)||^2; needs no labels.
    EmbeddingShift,
    /// The Proxy Anchor loss of the batch.
    MetricLoss,
    /// Each query pulled towards its nearest other-class neighbour and away from its nearest
    /// same-class one in the clean gallery (docs/DESIGN.md, Attacks).
    Retrieval,
}

impl Objective {
    pub const ALL: [Objective; 3] = [
        Objective::EmbeddingShift,
        Objective::MetricLoss,
        Objective::Retrieval,
    ];
    /// The short name the tables and `--objective` use.
    pub fn key(self) -> &'static str {
        match self {
            Objective::EmbeddingShift => "shift",
            Objective::MetricLoss => "metric",
            Objective::Retrieval => "retrieval",
        }
    }
    /// Whether the objective needs the evaluation set's labels.
    pub fn needs_labels(self) -> bool {
        self != Objective::EmbeddingShift
    }
}

/// How an attack climbs its objective.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum AttackKind {
    /// Fixed-size sign-gradient steps (Madry et al.).
    #[default]
    Pgd,
    /// APGD (Croce and Hein 2020): momentum, step-size halving at checkpoints, restarts from
    /// the best point, best-point tracking.
    Apgd,
}

impl AttackKind {
    pub fn key(self) -> &'static str {
        match self {
            AttackKind::Pgd => "PGD",
            AttackKind::Apgd => "APGD",
        }
    }
}

/// APGD (Croce and Hein 2020, section 3): the momentum weight alpha, the fraction rho of
/// increasing steps a checkpoint interval needs to keep its step size, the initial step size
/// as a multiple of eps, and the checkpoint schedule p_0 = 0, p_1 = 0.22,
/// p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06).
pub const APGD_MOMENTUM: f32 = 0.75;
pub const APGD_RHO: f64 = 0.75;
pub const APGD_INITIAL_STEP: f32 = 2.0;
pub const APGD_P1: f64 = 0.22;
pub const APGD_P_DECAY: f64 = 0.03;
pub const APGD_P_MIN_GAP: f64 = 0.06;

/// PGD hyper-parameters, named as attack libraries name them.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct PgdConfig {
    pub eps: f32,
    pub alpha: f32,
    pub steps: usize,
    pub random_start: bool,
    pub objective: Objective,
    /// Runs from uniform random starts, keeping per image the one with the largest objective
    /// (1 = a single run from the configured start).
    #[serde(default = "one")]
    pub restarts: usize,
    /// PGD or APGD (APGD ignores `alpha`: it starts at 2 eps and halves). Stored under its
    /// first name, `optimizer`, so that reports already written still read.
    #[serde(default, rename = "optimizer")]
    pub kind: AttackKind,
    /// What the attack may change in a grey image given as three equal channels.
    #[serde(default, skip_serializing_if = "AttackChannels::is_independent")]
    pub channels: AttackChannels,
}

/// What an attack may change in a grey image that the network sees as three equal channels
/// (docs/DESIGN.md, "Attacks").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum AttackChannels {
    /// Each channel moves on its own: the adversarial image may have colour (the Fashion-MNIST
    /// protocol, as its PyTorch reference attacks).
    #[default]
    Independent,
    /// The three channels move together: the attack perturbs the grey image itself, as robrank
    /// attacks its one-channel network. Refused on images whose channels differ.
    Tied,
}

impl AttackChannels {
    pub fn is_independent(&self) -> bool {
        *self == AttackChannels::Independent
    }
}

fn one() -> usize {
    1
}

impl PgdConfig {
    pub fn new(eps: f32, steps: usize) -> Self {
        PgdConfig {
            eps,
            alpha: ALPHA_BUDGET * eps / steps.max(1) as f32,
            steps,
            random_start: false,
            objective: Objective::EmbeddingShift,
            restarts: 1,
            kind: AttackKind::Pgd,
            channels: AttackChannels::Independent,
        }
    }
    pub fn train_default() -> Self {
        Self::new(TRAIN_EPS, TRAIN_STEPS)
    }
    pub fn eval_default() -> Self {
        Self::new(EVAL_EPS, EVAL_STEPS)
    }
}

/// Most PGD steps an attack may take (the paper uses 10; beyond this a run only burns time).
pub const MAX_PGD_STEPS: usize = 1000;
/// Most PGD restarts an attack may run.
pub const MAX_RESTARTS: usize = 100;
/// Most image-decoding threads.
pub const MAX_WORKERS: usize = 256;
/// Most EAT ensemble members.
pub const MAX_ENSEMBLE_SIZE: usize = 64;

/// Refuses a flag value that is NaN, infinite or outside `[min, max]`, naming the flag and
/// what it means.
pub fn check_range(
    flag: &str,
    value: f64,
    min: f64,
    max: f64,
    meaning: &str,
) -> Result<(), String> {
    if value.is_finite() && value >= min && value <= max {
        return Ok(());
    }
    let bounds = match (min, max) {
        (lo, hi) if hi == f64::MAX => format!("at least {lo}"),
        (lo, hi) => format!("between {lo} and {hi}"),
    };
    Err(format!(
        "{flag} {} is not valid: {meaning} must be {bounds}",
        shortest(value)
    ))
}

/// A flag value as the user typed it: f32 flags print without f64 noise (0.1, not
/// 0.10000000149011612).
fn shortest(value: f64) -> String {
    let magnitude = value.abs();
    if value.is_finite() && value != 0.0 && !(1e-4..1e6).contains(&magnitude) {
        // 1e30, not thirty-one digits.
        format!("{:e}", value as f32)
    } else if (value as f32) as f64 == value || value.is_nan() {
        format!("{}", value as f32)
    } else {
        format!("{value}")
    }
}

/// Like [`check_range`], for a value that must be strictly positive.
pub fn check_positive(flag: &str, value: f64, meaning: &str) -> Result<(), String> {
    if value.is_finite() && value > 0.0 {
        return Ok(());
    }
    Err(format!(
        "{flag} {} is not valid: {meaning} must be a positive, finite number",
        shortest(value)
    ))
}

impl PgdConfig {
    /// Checks that this is an attack at all: eps and the step size positive and finite, at
    /// least one step. `eps_flag` and `steps_flag` are the flags that set them.
    pub fn validate(&self, eps_flag: &str, steps_flag: &str) -> Result<(), String> {
        check_positive(
            eps_flag,
            (self.eps * 255.0) as f64,
            "the attack's eps (in 1/255)",
        )?;
        check_range(
            eps_flag,
            (self.eps * 255.0) as f64,
            0.0,
            255.0,
            "eps (in 1/255)",
        )?;
        if self.steps == 0 {
            return Err(format!(
                "{steps_flag} 0 runs no attack; PGD needs at least 1 step (clean metrics need no \
                 attack at all)"
            ));
        }
        if self.steps > MAX_PGD_STEPS {
            return Err(format!(
                "{steps_flag} {} is more than {MAX_PGD_STEPS} PGD steps; the paper uses 10",
                self.steps
            ));
        }
        check_positive(
            "--alpha",
            (self.alpha * 255.0) as f64,
            "the step size (in 1/255)",
        )
    }
}

/// Which item GTM pulls each query towards.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum GtmTarget {
    /// The nearest item (self excluded) whose label differs from the current top-1's: the
    /// attack as its paper states it.
    #[default]
    Nearest,
    /// robrank's code: the position, within the items whose label differs from the top-1's,
    /// of the nearest of them, read as an index into the whole database.
    RobrankCode,
}

/// The ranking-attack suite's PGD profiles (docs/DESIGN.md, "The ranking-attack suite and ERS";
/// robrank's): 28 px images (Fashion-MNIST) and 224 px images. No random start; alpha and steps as
/// robrank's code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum RankProfile {
    /// eps 77/255, alpha 3/255, 32 steps.
    Rob28,
    /// eps 8/255, alpha 3/255, 32 steps.
    Rob224,
}

impl RankProfile {
    /// (eps, alpha, steps) in [0, 1] pixel units.
    pub fn params(self) -> (f32, f32, usize) {
        match self {
            RankProfile::Rob28 => (77.0 / 255.0, 3.0 / 255.0, 32),
            RankProfile::Rob224 => (8.0 / 255.0, 3.0 / 255.0, 32),
        }
    }
    /// rob28 for small images (up to 64 px), rob224 for ImageNet-sized ones.
    pub fn for_image_size(size: usize) -> RankProfile {
        if size <= 64 {
            RankProfile::Rob28
        } else {
            RankProfile::Rob224
        }
    }
    pub fn key(self) -> &'static str {
        match self {
            RankProfile::Rob28 => "rob28",
            RankProfile::Rob224 => "rob224",
        }
    }
}

/// Queries (test images attacked) of the ranking suite in an experiment: the suite runs 9
/// attacks of 32 steps each, so it attacks a spread subset while the database stays the whole
/// test set.
pub const RANK_SUITE_QUERIES: usize = 500;

/// Test images (spread over the test set) on which an experiment attacks each model with every
/// objective (`Objective::ALL`) and reports the worst per metric: two more PGD runs a model.
pub const OBJECTIVE_SAMPLES: usize = 500;
/// Test images (spread over the test set) of an experiment's transfer rows: adversarial
/// examples made on the undefended model, evaluated on each defended one.
pub const TRANSFER_SAMPLES: usize = 500;
