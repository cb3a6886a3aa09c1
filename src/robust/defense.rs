//! The training objectives of the defenses, as the paper adapts them to DML (docs/DESIGN.md, Defenses):
//! no defense, AT, Mix-Up, IAT, TRADES, and EAT's per-member objective, and the two ablations
//! of the paper's Table 3 (a naive ensemble of AT models, EAT without the data split), and
//! robrank's EST, ACT and HM (with the triplet loss; their attacks in `super::robrank`). Each
//! takes the member being trained as a differentiable embedding function, so the same code
//! serves any backbone and device.

use std::cell::Cell;

use serde::{Deserialize, Serialize};

use crate::config::{self, PgdConfig};
use crate::dml::loss::{proxy_anchor_loss, MetricLoss};
use crate::dml::triplet::{spc2_triplet_loss, LossKind};
use crate::engine::ops::elementwise::{add, axpby, scale, square, sub};
use crate::engine::ops::reduce::sum;
use crate::engine::{EngineError, Result, Rng, Tensor};

use super::attack::{attack, EmbedFn, Goal};
use super::robrank::{act_loss, hm_loss, TripletStep};

/// The training method (`--method`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
#[value(rename_all = "kebab-case")]
pub enum Method {
    /// Proxy Anchor loss alone.
    None,
    At,
    MixUp,
    Iat,
    Trades,
    Eat,
    /// The paper's Table 3 naive ensemble: --ensemble-size members, each trained alone with AT
    /// (examples made on that member) on the whole training set with its own seed; voted and
    /// attacked as EAT's ensemble. Opt-in: not in `experiment`'s default methods.
    NaiveEnsemble,
    /// The paper's Table 3 "EAT w/o data split": EAT with every member on the whole training
    /// set (`--method eat --eat-split none`). Opt-in: not in `experiment`'s default methods.
    EatNoSplit,
    /// robrank's embedding-shifted triplet (Zhou et al., ECCV 2020): the triplet loss on
    /// embedding-shift PGD examples (AT with --loss triplet). Opt-in.
    Est,
    /// robrank's anti-collapse triplet (Zhou and Patel, T-PAMI 2024): PGD pulls each triplet's
    /// positive and negative together; the triplet loss on the clean anchor and the
    /// adversarial positive and negative. Opt-in.
    Act,
    /// robrank's hardness manipulation (Zhou and Patel, CVPR 2022): PGD moves soft-hard
    /// triplets to the hardness the gradual adversary (LGA) sets; the triplet loss on them,
    /// plus the intra-class structure term with --hm-ics. Opt-in.
    Hm,
    /// EAT whose members train on ACT's examples made on the whole ensemble
    /// (`--method eat --eat-inner act`), with the triplet loss. Opt-in.
    EatAct,
    /// EAT whose members train on HM's examples made on the whole ensemble
    /// (`--method eat --eat-inner hm`), with the triplet loss. Opt-in.
    EatHm,
}

/// The adversarial examples EAT's members train on (`--eat-inner`); each is made on the whole
/// ensemble (the sum of the members' objectives).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
#[value(rename_all = "kebab-case")]
pub enum EatInner {
    /// Algorithm 1: embedding-shift PGD; the metric loss on the adversarial batch.
    #[default]
    Pgd,
    /// ACT's anti-collapse attack on random triplets; the triplet loss of the clean anchors
    /// against the adversarial positives and negatives.
    Act,
    /// HM's hardness manipulation of soft-hard triplets towards the member's LGA target; the
    /// triplet loss on the adversarial triplets.
    Hm,
}

/// How EAT gives its members their training data (`--eat-split`).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
#[value(rename_all = "kebab-case")]
pub enum EatSplit {
    /// Algorithm 1: N equal random parts; member i trains on every part but part i.
    #[default]
    LeaveOneOut,
    /// Every member on the whole training set (the paper's Table 3, "EAT w/o data split").
    None,
}

impl Method {
    pub const ALL: [Method; 6] = [
        Method::None,
        Method::At,
        Method::MixUp,
        Method::Iat,
        Method::Trades,
        Method::Eat,
    ];

    /// The ablations of the paper's Table 3, run only when `experiment --methods` names them.
    pub const TABLE3: [Method; 2] = [Method::NaiveEnsemble, Method::EatNoSplit];

    /// robrank's defenses, trained with its triplet loss; run only when `experiment --methods`
    /// names them.
    pub const ROBRANK: [Method; 3] = [Method::Est, Method::Act, Method::Hm];

    /// EAT with robrank's attacks inside (`--eat-inner`), with the triplet loss; run only when
    /// `experiment --methods` names them.
    pub const EAT_INNER: [Method; 2] = [Method::EatAct, Method::EatHm];

    /// Every method: [`Method::ALL`], [`Method::TABLE3`], [`Method::ROBRANK`], then
    /// [`Method::EAT_INNER`].
    pub const EVERY: [Method; 13] = [
        Method::None,
        Method::At,
        Method::MixUp,
        Method::Iat,
        Method::Trades,
        Method::Eat,
        Method::NaiveEnsemble,
        Method::EatNoSplit,
        Method::Est,
        Method::Act,
        Method::Hm,
        Method::EatAct,
        Method::EatHm,
    ];

    /// The row label of the paper's Table 1.
    pub fn label(self) -> &'static str {
        match self {
            Method::None => "PAL",
            Method::At => "+ AT",
            Method::MixUp => "+ Mix-Up",
            Method::Iat => "+ IAT",
            Method::Trades => "+ TRADES",
            Method::Eat => "+ EAT",
            Method::NaiveEnsemble => "+ naive ensemble",
            Method::EatNoSplit => "+ EAT w/o split",
            Method::Est => "+ EST",
            Method::Act => "+ ACT",
            Method::Hm => "+ HM",
            Method::EatAct => "+ EAT (ACT inside)",
            Method::EatHm => "+ EAT (HM inside)",
        }
    }

    /// The name used in file names and on the command line.
    pub fn key(self) -> &'static str {
        match self {
            Method::None => "none",
            Method::At => "at",
            Method::MixUp => "mix-up",
            Method::Iat => "iat",
            Method::Trades => "trades",
            Method::Eat => "eat",
            Method::NaiveEnsemble => "naive-ensemble",
            Method::EatNoSplit => "eat-no-split",
            Method::Est => "est",
            Method::Act => "act",
            Method::Hm => "hm",
            Method::EatAct => "eat-act",
            Method::EatHm => "eat-hm",
        }
    }

    /// Whether the method trains an ensemble (evaluated by the members' vote).
    pub fn is_ensemble(self) -> bool {
        matches!(
            self,
            Method::Eat
                | Method::NaiveEnsemble
                | Method::EatNoSplit
                | Method::EatAct
                | Method::EatHm
        )
    }

    /// Whether the training attack runs on the whole ensemble (EAT's eq. 10) rather than on
    /// the member being trained alone.
    pub fn attacks_ensemble(self) -> bool {
        matches!(
            self,
            Method::Eat | Method::EatNoSplit | Method::EatAct | Method::EatHm
        )
    }

    /// Whether the method is EAT's step (Algorithm 1's per-member objective), whatever its
    /// data split and inner attack.
    pub fn is_eat(self) -> bool {
        self.attacks_ensemble()
    }

    /// The `--eat-inner` a method implies: ACT's or HM's for eat-act and eat-hm, Algorithm 1's
    /// PGD otherwise (used only by EAT's methods).
    pub fn default_eat_inner(self) -> EatInner {
        match self {
            Method::EatAct => EatInner::Act,
            Method::EatHm => EatInner::Hm,
            _ => EatInner::Pgd,
        }
    }

    /// The `--eat-split` a method implies when none is given: the whole training set for the
    /// two Table 3 ablations, Algorithm 1's split otherwise (used only by `eat`).
    pub fn default_eat_split(self) -> EatSplit {
        match self {
            Method::NaiveEnsemble | Method::EatNoSplit => EatSplit::None,
            _ => EatSplit::LeaveOneOut,
        }
    }

    /// Whether the method is defined only for the triplet loss (robrank's defenses, and EAT
    /// with one of them inside).
    pub fn needs_triplet(self) -> bool {
        matches!(
            self,
            Method::Est | Method::Act | Method::Hm | Method::EatAct | Method::EatHm
        )
    }

    /// Whether the method attacks its training batches (Mix-Up and plain training do not).
    pub fn uses_attack(self) -> bool {
        !matches!(self, Method::None | Method::MixUp)
    }
}

/// Hyper-parameters of the defenses.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct DefenseConfig {
    pub method: Method,
    pub attack: PgdConfig,
    pub eat_beta: f32,
    pub trades_lambda: f32,
    pub mixup_alpha: f32,
    pub ensemble_size: usize,
    /// How EAT's members get their data; configurations stored before the flag existed were
    /// all Algorithm 1's split.
    #[serde(default)]
    pub eat_split: EatSplit,
    /// HM's intra-class structure term (`--hm-ics`); stored runs from before it had none.
    #[serde(default)]
    pub hm_ics: bool,
    /// The examples EAT's members train on (`--eat-inner`); stored runs from before it were
    /// all Algorithm 1's PGD.
    #[serde(default)]
    pub eat_inner: EatInner,
}

impl DefenseConfig {
    pub fn new(method: Method) -> Self {
        DefenseConfig {
            method,
            attack: PgdConfig::train_default(),
            eat_beta: config::EAT_BETA,
            trades_lambda: config::TRADES_LAMBDA,
            mixup_alpha: config::MIXUP_ALPHA,
            ensemble_size: config::ENSEMBLE_SIZE,
            eat_split: method.default_eat_split(),
            hm_ics: false,
            eat_inner: method.default_eat_inner(),
        }
    }

    /// This configuration for another method (an experiment's per-method run): the two Table 3
    /// ablations take the whole training set; every other setting is kept.
    pub fn with_method(&self, method: Method) -> Self {
        let mut d = *self;
        d.method = method;
        if method.default_eat_split() == EatSplit::None {
            d.eat_split = EatSplit::None;
        }
        if method.default_eat_inner() != EatInner::Pgd {
            d.eat_inner = method.default_eat_inner();
        }
        d
    }

    /// Whether training needs the triplet loss: robrank's defenses, or EAT with ACT or HM
    /// inside.
    pub fn needs_triplet(&self) -> bool {
        self.method.needs_triplet() || (self.method.is_eat() && self.eat_inner != EatInner::Pgd)
    }

    /// Whether each member keeps LGA's memory (HM, or EAT with HM inside).
    pub fn uses_lga(&self) -> bool {
        self.method == Method::Hm || (self.method.is_eat() && self.eat_inner == EatInner::Hm)
    }

    /// The loss the run trains with when `--loss` is not given.
    pub fn default_loss(&self) -> LossKind {
        if self.needs_triplet() {
            LossKind::Triplet
        } else {
            LossKind::ProxyAnchor
        }
    }

    /// Whether the members train on Algorithm 1's leave-one-part-out sets; otherwise each
    /// member trains on the whole training set.
    pub fn splits_data(&self) -> bool {
        self.method.is_eat() && self.eat_split == EatSplit::LeaveOneOut
    }
}

/// Mean over the batch of the squared L2 distance between rows of `a` and `b`.
pub fn mean_sq_distance(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let n = a.shape()[0].max(1);
    scale(&sum(&square(&sub(a, b)?)?)?, 1.0 / n as f32)
}

/// A Mix-Up pairing: every row i is mixed with row `partner[i]` by weight `lambda`.
pub struct MixPlan {
    pub lambda: f32,
    pub partner: Vec<usize>,
}

impl MixPlan {
    pub fn draw(batch: usize, alpha: f32, rng: &mut Rng) -> MixPlan {
        let mut partner: Vec<usize> = (0..batch).collect();
        rng.shuffle(&mut partner);
        MixPlan {
            lambda: rng.beta(alpha, alpha),
            partner,
        }
    }

    /// lambda * t + (1 - lambda) * t[partner], recorded (gradients flow to t).
    pub fn mix(&self, t: &Tensor) -> Result<Tensor> {
        let permuted = gather_rows(t, &self.partner)?;
        axpby(self.lambda, t, 1.0 - self.lambda, &permuted)
    }
}

/// t[partner] as one recorded op: a permutation matrix product keeps it differentiable on both
/// devices without a dedicated gather kernel.
fn gather_rows(t: &Tensor, partner: &[usize]) -> Result<Tensor> {
    let n = partner.len();
    let mut p = vec![0.0f32; n * n];
    for (i, &j) in partner.iter().enumerate() {
        p[i * n + j] = 1.0;
    }
    let perm = Tensor::from_vec(p, &[n, n], &t.device())?;
    let flat = t.reshape(&[n, t.numel() / n.max(1)])?;
    crate::engine::ops::matmul::matmul(&perm, &flat)?.reshape(t.shape())
}

/// Everything one member's training step needs.
pub struct StepContext<'a> {
    /// The member being trained (in its training BatchNorm mode).
    pub member: EmbedFn<'a>,
    /// Models the training attack runs against: the member itself, or the whole ensemble (EAT).
    pub attack_on: &'a [EmbedFn<'a>],
    pub proxies: &'a Tensor,
    pub loss: MetricLoss,
    pub defense: &'a DefenseConfig,
    /// LGA's memory for HM: the member's adversarial triplet loss at its previous step
    /// (`config::LGA_INITIAL_LOSS` before the first); HM reads and updates it.
    pub lga_loss: &'a Cell<f32>,
}

impl StepContext<'_> {
    fn metric(&self, emb: &Tensor, labels: &[usize], rng: &mut Rng) -> Result<Tensor> {
        match self.loss {
            MetricLoss::ProxyAnchor(c) => {
                proxy_anchor_loss(emb, self.proxies, labels, c.alpha, c.delta)
            }
            MetricLoss::Triplet { margin } => spc2_triplet_loss(emb, labels, margin, rng),
        }
    }

    /// What ACT and HM need: the member, the models their attack runs on (the member alone,
    /// or with `ensemble` every member, as EAT), the attack and the margin; refused for another
    /// loss, or for an ensemble where the method attacks the member alone.
    fn triplet_step(&self, ensemble: bool) -> Result<TripletStep<'_>> {
        let method = self.defense.method;
        let MetricLoss::Triplet { margin } = self.loss else {
            return Err(EngineError::Invalid {
                op: "robrank defense",
                detail: format!("{method:?} is defined for the triplet loss only"),
            });
        };
        if !ensemble && self.attack_on.len() != 1 {
            return Err(EngineError::Invalid {
                op: "robrank defense",
                detail: format!("{method:?} attacks the member being trained alone"),
            });
        }
        Ok(TripletStep {
            member: self.member,
            attacked: self.attack_on,
            attack: &self.defense.attack,
            margin,
        })
    }

    fn adversarial(&self, x: &Tensor, rng: &mut Rng) -> Result<Tensor> {
        attack(
            self.attack_on,
            x,
            &self.defense.attack,
            &Goal::EmbeddingShift,
            rng,
        )
    }

    /// Mix-Up's consistency term: distance of F(mix(x)) to mix(F(x)).
    fn mix_term(&self, x: &Tensor, emb: &Tensor, plan: &MixPlan) -> Result<Tensor> {
        let mixed_emb = (self.member)(&plan.mix(x)?)?;
        mean_sq_distance(&mixed_emb, &plan.mix(emb)?)
    }
}

/// The loss of one training step of `ctx.defense.method` on the batch (x, labels).
pub fn step_loss(ctx: &StepContext, x: &Tensor, labels: &[usize], rng: &mut Rng) -> Result<Tensor> {
    let d = ctx.defense;
    match d.method {
        Method::None => ctx.metric(&(ctx.member)(x)?, labels, rng),
        Method::At | Method::NaiveEnsemble | Method::Est => {
            if d.method == Method::NaiveEnsemble && ctx.attack_on.len() != 1 {
                return Err(EngineError::Invalid {
                    op: "naive ensemble",
                    detail: "each member is attacked alone (AT), not with the ensemble".into(),
                });
            }
            if d.method == Method::Est && !matches!(ctx.loss, MetricLoss::Triplet { .. }) {
                ctx.triplet_step(false)?;
            }
            let adv = ctx.adversarial(x, rng)?;
            ctx.metric(&(ctx.member)(&adv)?, labels, rng)
        }
        Method::MixUp => {
            let emb = (ctx.member)(x)?;
            let plan = MixPlan::draw(labels.len(), d.mixup_alpha, rng);
            add(
                &ctx.metric(&emb, labels, rng)?,
                &ctx.mix_term(x, &emb, &plan)?,
            )
        }
        Method::Iat => {
            let emb = (ctx.member)(x)?;
            let plan = MixPlan::draw(labels.len(), d.mixup_alpha, rng);
            let adv = ctx.adversarial(x, rng)?;
            let adv_emb = (ctx.member)(&adv)?;
            let clean = add(
                &ctx.metric(&emb, labels, rng)?,
                &ctx.mix_term(x, &emb, &plan)?,
            )?;
            add(&clean, &ctx.mix_term(&adv, &adv_emb, &plan)?)
        }
        Method::Trades => {
            let emb = (ctx.member)(x)?;
            let adv = ctx.adversarial(x, rng)?;
            let shift = mean_sq_distance(&(ctx.member)(&adv)?, &emb)?;
            axpby(
                1.0,
                &ctx.metric(&emb, labels, rng)?,
                d.trades_lambda,
                &shift,
            )
        }
        Method::Eat | Method::EatNoSplit | Method::EatAct | Method::EatHm => {
            if ctx.attack_on.len() < 2 {
                return Err(EngineError::Invalid {
                    op: "EAT",
                    detail: "an ensemble of at least 2 members is needed".into(),
                });
            }
            let clean = ctx.metric(&(ctx.member)(x)?, labels, rng)?;
            let robust = match d.eat_inner {
                EatInner::Pgd => {
                    let adv = ctx.adversarial(x, rng)?;
                    ctx.metric(&(ctx.member)(&adv)?, labels, rng)?
                }
                EatInner::Act => act_loss(&ctx.triplet_step(true)?, x, labels, rng)?,
                EatInner::Hm => {
                    let step = ctx.triplet_step(true)?;
                    hm_loss(&step, x, labels, false, ctx.lga_loss, rng)?
                }
            };
            axpby(d.eat_beta, &clean, 1.0 - d.eat_beta, &robust)
        }
        Method::Act => act_loss(&ctx.triplet_step(false)?, x, labels, rng),
        Method::Hm => hm_loss(
            &ctx.triplet_step(false)?,
            x,
            labels,
            d.hm_ics,
            ctx.lga_loss,
            rng,
        ),
    }
}

/// EAT's data split (Algorithm 1, lines 2 and 5): shuffle the training indices, cut them into
/// `n` equal parts, and give member i every part but part i.
pub fn eat_member_indices(train_len: usize, n: usize, rng: &mut Rng) -> Vec<Vec<usize>> {
    let mut idx: Vec<usize> = (0..train_len).collect();
    rng.shuffle(&mut idx);
    let part = train_len / n.max(1);
    let part_of = |k: usize| {
        if k == n - 1 {
            &idx[k * part..]
        } else {
            &idx[k * part..(k + 1) * part]
        }
    };
    (0..n)
        .map(|i| {
            let mut mine: Vec<usize> = (0..n)
                .filter(|&k| k != i)
                .flat_map(|k| part_of(k).to_vec())
                .collect();
            mine.sort_unstable();
            mine
        })
        .collect()
}
