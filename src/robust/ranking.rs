//! The ranking-attack suite of robrank (Zhou et al.; docs/DESIGN.md, "The ranking-attack suite and
//! ERS") and its summary score, ERS: candidate attacks (CA+, CA-), query attacks (QA+, QA-),
//! embedding shift (ES), the template-matching attack (TMA), and the label-aware (LTM), guided
//! (GTM) and top-1 (GTT) attacks.
//!
//! Every attack minimises a loss of the attacked image's embedding against a database, the
//! clean embeddings of the whole test set (an attacked image keeps its clean copy there), with
//! PGD: x <- x - alpha sign(grad), projected onto the eps-ball and clipped to [0, 1], T steps,
//! no random start. The distance is Euclidean between L2-normalised embeddings (robrank's
//! "N" metric).
//!
//! Cost: the network's forward and backward run on the device, batch by batch. The losses
//! need every query-to-database distance; each step computes them with one device GEMM
//! ([B, D] x [D, N]) and the loss's gradient with respect to the embeddings with another
//! ([B, N] x [N, D]), so the host only does O(B N) work per step.
//!
//! GTM: robrank's code picks the target's index inside a masked subset and then reads the
//! embedding at that index of the whole database, an essentially arbitrary item. By default the
//! target is what the attack means: the nearest item (self excluded) whose label differs from
//! the current top-1's ([`GtmTarget::Nearest`]). [`GtmTarget::RobrankCode`] reproduces the code's
//! choice, so that a figure can be compared with robrank's published ones.

use serde::{Deserialize, Serialize};

use crate::config::{AttackChannels, GtmTarget};
use crate::engine::ops::attack::pgd_step;
use crate::engine::ops::elementwise::{add, clamp};
use crate::engine::ops::matmul::gemm_raw;
use crate::engine::tape::backward_with;
use crate::engine::{no_grad, Device, EngineError, Result, Rng, Tensor};
use crate::robust::attack::channels::{check_input, start_noise, step_direction};
use crate::robust::attack::EmbedFn;

/// One attack of the suite.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RankAttack {
    CaPlus,
    CaMinus,
    QaPlus,
    QaMinus,
    Es,
    Tma,
    Ltm,
    Gtm,
    /// GTM with robrank's coded target ([`GtmTarget::RobrankCode`]); its score is GTM's.
    GtmRobrankCode,
    Gtt,
}

impl RankAttack {
    /// The nine attacks of the suite, GTM with `gtm`'s target.
    pub fn suite(gtm: GtmTarget) -> [RankAttack; 9] {
        RankAttack::ALL.map(|a| match (a, gtm) {
            (RankAttack::Gtm, GtmTarget::RobrankCode) => RankAttack::GtmRobrankCode,
            _ => a,
        })
    }

    pub const ALL: [RankAttack; 9] = [
        RankAttack::CaPlus,
        RankAttack::CaMinus,
        RankAttack::QaPlus,
        RankAttack::QaMinus,
        RankAttack::Es,
        RankAttack::Tma,
        RankAttack::Ltm,
        RankAttack::Gtm,
        RankAttack::Gtt,
    ];

    pub fn label(self) -> &'static str {
        match self {
            RankAttack::CaPlus => "CA+",
            RankAttack::CaMinus => "CA-",
            RankAttack::QaPlus => "QA+",
            RankAttack::QaMinus => "QA-",
            RankAttack::Es => "ES",
            RankAttack::Tma => "TMA",
            RankAttack::Ltm => "LTM",
            RankAttack::Gtm => "GTM",
            RankAttack::GtmRobrankCode => "GTM (robrank's target)",
            RankAttack::Gtt => "GTT",
        }
    }
}

/// The suite's PGD: eps, step alpha and steps, in [0, 1] pixel units.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct RankPgd {
    pub eps: f32,
    pub alpha: f32,
    pub steps: usize,
    /// What the attack may change in a grey image given as three equal channels.
    #[serde(default, skip_serializing_if = "AttackChannels::is_independent")]
    pub channels: AttackChannels,
}

/// How a batch is perturbed: the attack itself, or uniform +-eps sign noise of the same size
/// (the reference an attack must beat).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Perturbation {
    Attack,
    Noise,
}

/// The clean embeddings of the whole test set, on the host and on the device.
pub struct Database {
    emb: Vec<f32>,
    labels: Vec<usize>,
    dim: usize,
    sq_norms: Vec<f32>,
    tensor: Tensor,
}

impl Database {
    /// `emb` is [N, dim] row-major, one label per row.
    pub fn new(emb: Vec<f32>, labels: Vec<usize>, dim: usize, device: &Device) -> Result<Self> {
        if dim == 0 || emb.len() != labels.len() * dim || labels.len() < 2 {
            return Err(EngineError::Invalid {
                op: "ranking database",
                detail: format!(
                    "{} values for {} labels of dimension {dim}: the database needs at least 2 \
                     items and one [dim] row per label",
                    emb.len(),
                    labels.len()
                ),
            });
        }
        let sq_norms = emb
            .chunks(dim)
            .map(|r| r.iter().map(|v| v * v).sum())
            .collect();
        let tensor = Tensor::from_vec(emb.clone(), &[labels.len(), dim], device)?;
        Ok(Database {
            emb,
            labels,
            dim,
            sq_norms,
            tensor,
        })
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    pub fn labels(&self) -> &[usize] {
        &self.labels
    }

    fn row(&self, j: usize) -> &[f32] {
        &self.emb[j * self.dim..(j + 1) * self.dim]
    }

    /// Euclidean distances of the rows of `rows` ([B, D], on the device; `host` is the same
    /// matrix on the host) to every item: [B, N] row-major, from one device GEMM.
    fn distances(&self, rows: &Tensor, host: &[f32]) -> Result<Vec<f32>> {
        let dots = gemm_raw(rows, &self.tensor, false, true)?.to_vec()?;
        let n = self.len();
        let mut out = dots;
        for (i, row) in host.chunks(self.dim).enumerate() {
            let sq: f32 = row.iter().map(|v| v * v).sum();
            for (j, d) in out[i * n..(i + 1) * n].iter_mut().enumerate() {
                *d = (sq + self.sq_norms[j] - 2.0 * *d).max(0.0).sqrt();
            }
        }
        Ok(out)
    }

    /// Distances of database items `items` to every item: [items.len(), N].
    fn item_distances(&self, items: &[usize]) -> Result<Vec<f32>> {
        let host: Vec<f32> = items.iter().flat_map(|&j| self.row(j).to_vec()).collect();
        let t = Tensor::from_vec(
            host.clone(),
            &[items.len(), self.dim],
            &self.tensor.device(),
        )?;
        self.distances(&t, &host)
    }
}

/// The suite's scores (docs/DESIGN.md, "The ranking-attack suite and ERS"), each averaged per batch
/// and then over batches.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RankScores {
    /// 100 prank of the attacked candidate for its query (CA+: lower = stronger attack).
    pub ca_plus: f64,
    pub ca_minus: f64,
    /// 100 prank of the chosen candidate for the attacked query.
    pub qa_plus: f64,
    pub qa_minus: f64,
    /// Mean embedding shift d(f(x_adv), f(x)).
    pub es_d: f64,
    /// Recall@1 (%) of the ES-attacked queries, self masked.
    pub es_r: f64,
    /// Mean cosine of the attacked embedding to its random target.
    pub tma: f64,
    /// Recall@1 (%) under LTM.
    pub ltm: f64,
    /// Recall@1 (%) under GTM.
    pub gtm: f64,
    /// Retain@4 (%) of the nearest item under GTT.
    pub gtt: f64,
}

impl RankScores {
    /// ERS: the mean of the ten terms, each meant to be in 0-100 (higher = more robust),
    /// nothing clipped.
    pub fn ers(&self) -> f64 {
        self.ers_terms().iter().sum::<f64>() / 10.0
    }

    /// The ten ERS terms in the order of docs/DESIGN.md, "The ranking-attack suite and ERS".
    pub fn ers_terms(&self) -> [f64; 10] {
        [
            2.0 * self.ca_plus,
            100.0 - self.ca_minus,
            2.0 * self.qa_plus,
            100.0 - self.qa_minus,
            100.0 * (1.0 - self.tma),
            100.0 * (2.0 - self.es_d) / 2.0,
            self.es_r,
            self.ltm,
            self.gtm,
            self.gtt,
        ]
    }

    /// The score(s) that `attack` produces: `(field, value)` pairs.
    pub fn of(&self, attack: RankAttack) -> Vec<(&'static str, f64)> {
        match attack {
            RankAttack::CaPlus => vec![("CA+", self.ca_plus)],
            RankAttack::CaMinus => vec![("CA-", self.ca_minus)],
            RankAttack::QaPlus => vec![("QA+", self.qa_plus)],
            RankAttack::QaMinus => vec![("QA-", self.qa_minus)],
            RankAttack::Es => vec![("ES:D", self.es_d), ("ES:R", self.es_r)],
            RankAttack::Tma => vec![("TMA", self.tma)],
            RankAttack::Ltm => vec![("LTM", self.ltm)],
            RankAttack::Gtm => vec![("GTM", self.gtm)],
            RankAttack::GtmRobrankCode => vec![("GTM (robrank's target)", self.gtm)],
            RankAttack::Gtt => vec![("GTT", self.gtt)],
        }
    }

    /// Stores `attack`'s batch-averaged values (in the order of [`RankScores::of`]).
    pub fn set(&mut self, attack: RankAttack, values: &[f64]) {
        let v = |k: usize| values.get(k).copied().unwrap_or(f64::NAN);
        match attack {
            RankAttack::CaPlus => self.ca_plus = v(0),
            RankAttack::CaMinus => self.ca_minus = v(0),
            RankAttack::QaPlus => self.qa_plus = v(0),
            RankAttack::QaMinus => self.qa_minus = v(0),
            RankAttack::Es => {
                self.es_d = v(0);
                self.es_r = v(1);
            }
            RankAttack::Tma => self.tma = v(0),
            RankAttack::Ltm => self.ltm = v(0),
            RankAttack::Gtm | RankAttack::GtmRobrankCode => self.gtm = v(0),
            RankAttack::Gtt => self.gtt = v(0),
        }
    }
}

/// A batch of attacked images: the inputs and the database rows of their clean copies.
pub struct RankBatch<'a> {
    pub x: &'a Tensor,
    pub items: &'a [usize],
}

/// Runs `attack` (or noise of the same size) on one batch and returns its batch-mean scores
/// (one value, two for ES: see [`RankScores::of`]) and the mean loss at the end.
pub fn attack_batch(
    model: EmbedFn,
    batch: &RankBatch,
    db: &Database,
    attack: RankAttack,
    pgd: &RankPgd,
    perturbation: Perturbation,
    rng: &mut Rng,
) -> Result<(Vec<f64>, f64)> {
    let b = batch.items.len();
    if batch.x.shape().first() != Some(&b) || batch.items.iter().any(|&j| j >= db.len()) {
        return Err(EngineError::Invalid {
            op: "ranking attack",
            detail: format!(
                "a batch of shape {:?} with {b} database rows (database of {})",
                batch.x.shape(),
                db.len()
            ),
        });
    }
    let clean_dist = db.item_distances(batch.items)?;
    let targets = choose_targets(attack, batch.items, &clean_dist, db, rng);
    let target_dist = match attack {
        RankAttack::CaPlus | RankAttack::CaMinus => db.item_distances(&targets)?,
        _ => Vec::new(),
    };
    let plan = Plan {
        attack,
        items: batch.items,
        targets: &targets,
        target_dist: &target_dist,
        db,
    };
    let x = batch.x.detach();
    check_input(&x, pgd.channels)?;
    let x_adv = match perturbation {
        Perturbation::Noise => sign_noise(&x, pgd.eps, pgd.channels, rng)?,
        Perturbation::Attack => descend(model, &x, pgd, &plan, rng)?,
    };
    let e = no_grad(|| model(&x_adv))?;
    let host = e.to_vec()?;
    let dist = db.distances(&e, &host)?;
    let loss = plan.loss_and_grad(&host, &dist, None).0;
    Ok((plan.scores(&host, &dist), loss))
}

/// x + eps * (uniform sign), clipped to [0, 1]; grey noise with tied channels.
fn sign_noise(x: &Tensor, eps: f32, channels: AttackChannels, rng: &mut Rng) -> Result<Tensor> {
    let noise: Vec<f32> = (0..x.numel())
        .map(|_| if rng.uniform() < 0.5 { -eps } else { eps })
        .collect();
    let noise = start_noise(Tensor::from_vec(noise, x.shape(), &x.device())?, channels)?;
    no_grad(|| clamp(&add(x, &noise)?, 0.0, 1.0))
}

/// T steps of signed gradient descent on the attack's loss, from x itself.
fn descend(
    model: EmbedFn,
    x: &Tensor,
    pgd: &RankPgd,
    plan: &Plan,
    rng: &mut Rng,
) -> Result<Tensor> {
    let mut x_adv = x.clone();
    let b = plan.items.len();
    for step in 0..pgd.steps {
        let var = x_adv.var();
        let e = model(&var)?;
        let host = e.to_vec()?;
        let dist = db_distances(plan.db, &e, &host)?;
        // ES's gradient is zero at x itself: its first step aims at a target moved by 1e-7
        // (robrank's code).
        let es_noise = (step == 0 && plan.attack == RankAttack::Es).then(|| {
            (0..host.len())
                .map(|_| 1e-7 * (rng.below(3) as f32 - 1.0))
                .collect::<Vec<f32>>()
        });
        let (_, grad) = plan.loss_and_grad(&host, &dist, es_noise.as_deref());
        let grad = plan.embedding_grad(grad, b)?;
        // pgd_step ascends; the suite minimises, so the seed is the negative gradient.
        let seed: Vec<f32> = grad.iter().map(|g| -g).collect();
        let seed = Tensor::from_vec(seed, e.shape(), &e.device())?;
        let grads = backward_with(e, seed)?;
        let g = grads.get(&var).ok_or_else(|| {
            EngineError::Autograd("the ranking attack's loss does not depend on the input".into())
        })?;
        let g = step_direction(g, pgd.channels)?;
        x_adv = pgd_step(&x_adv, &g, x, pgd.alpha, pgd.eps)?;
    }
    Ok(x_adv)
}

fn db_distances(db: &Database, e: &Tensor, host: &[f32]) -> Result<Vec<f32>> {
    no_grad(|| db.distances(&e.detach(), host))
}

/// The target database item of each attacked row (unused for LTM).
fn choose_targets(
    attack: RankAttack,
    items: &[usize],
    clean_dist: &[f32],
    db: &Database,
    rng: &mut Rng,
) -> Vec<usize> {
    let n = db.len();
    // robrank: the nearest 1% (at least one item), self excluded.
    let top = (n / 100).max(1);
    items
        .iter()
        .enumerate()
        .map(|(i, &me)| {
            let row = &clean_dist[i * n..(i + 1) * n];
            match attack {
                RankAttack::CaPlus | RankAttack::QaPlus | RankAttack::Tma => rng.below(n),
                RankAttack::CaMinus | RankAttack::QaMinus => {
                    let near = nearest(row, me, top, |_| true);
                    near[rng.below(near.len())]
                }
                RankAttack::Es | RankAttack::Ltm => me,
                RankAttack::Gtt => nearest(row, me, 1, |_| true)[0],
                RankAttack::Gtm => {
                    let top1 = top1_label(row, me, &db.labels);
                    nearest(row, me, 1, |j| db.labels[j] != top1)
                        .first()
                        .copied()
                        .unwrap_or(me)
                }
                RankAttack::GtmRobrankCode => robrank_gtm_target(row, me, db.labels()),
            }
        })
        .collect()
}

/// robrank's GTM target (`_sel_gtm` in its `advrank_qcselector.py`): among the items whose label
/// differs from the top-1's, in database order, the position of the nearest one (self
/// excluded), taken as an index of the whole database.
pub fn robrank_gtm_target(row: &[f32], me: usize, labels: &[usize]) -> usize {
    let top1 = top1_label(row, me, labels);
    labels
        .iter()
        .enumerate()
        .filter(|&(_, &y)| y != top1)
        .enumerate()
        .filter(|&(_, (j, _))| j != me)
        .min_by(|(pa, (a, _)), (pb, (b, _))| row[*a].total_cmp(&row[*b]).then(pa.cmp(pb)))
        .map_or(me, |(position, _)| position)
}

/// The label of the item nearest in `row`, `me` excluded (GTM's reference label).
fn top1_label(row: &[f32], me: usize, labels: &[usize]) -> usize {
    labels[nearest(row, me, 1, |_| true)[0]]
}

/// The `k` items nearest in `row` that pass `keep`, `me` excluded (fewer when fewer pass).
fn nearest(row: &[f32], me: usize, k: usize, keep: impl Fn(usize) -> bool) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..row.len()).filter(|&j| j != me && keep(j)).collect();
    idx.sort_by(|&a, &b| row[a].total_cmp(&row[b]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

/// What one attack needs on every step: its rows, targets and the database.
struct Plan<'a> {
    attack: RankAttack,
    items: &'a [usize],
    targets: &'a [usize],
    /// CA: distances of each target query to every database item, [B, N].
    target_dist: &'a [f32],
    db: &'a Database,
}

/// d loss / d e for every row as `coef` over database rows plus a `direct` term:
/// grad_i = sum_j coef[i, j] x_j + direct[i].
struct EmbGrad {
    coef: Option<Vec<f32>>,
    direct: Vec<f32>,
}

impl EmbGrad {
    /// Adds w * d d(e_i, x_t) / d e_i = w (e_i - x_t) / d(e_i, x_t) (zero at d = 0).
    fn add_distance(&mut self, i: usize, t: usize, w: f32, e_i: &[f32], d: f32, n: usize) {
        if d <= f32::EPSILON || w == 0.0 {
            return;
        }
        let dim = e_i.len();
        let coef = self.coef.get_or_insert_with(Vec::new);
        if coef.is_empty() {
            coef.resize(self.direct.len() / dim * n, 0.0);
        }
        coef[i * n + t] -= w / d;
        for (g, &v) in self.direct[i * dim..(i + 1) * dim].iter_mut().zip(e_i) {
            *g += w / d * v;
        }
    }
}

impl Plan<'_> {
    /// The batch-mean loss at embeddings `e` (with their database distances `dist`) and its
    /// gradient; `es_noise` moves ES's targets (its first step).
    fn loss_and_grad(&self, e: &[f32], dist: &[f32], es_noise: Option<&[f32]>) -> (f64, EmbGrad) {
        let (n, dim) = (self.db.len(), self.db.dim);
        let b = self.items.len();
        let mut grad = EmbGrad {
            coef: None,
            direct: vec![0.0; b * dim],
        };
        let mut total = 0.0f64;
        for i in 0..b {
            let e_i = &e[i * dim..(i + 1) * dim];
            let d = &dist[i * n..(i + 1) * n];
            let (me, t) = (self.items[i], self.targets[i]);
            let nf = n as f32;
            total += match self.attack {
                RankAttack::CaPlus | RankAttack::CaMinus => {
                    let plus = self.attack == RankAttack::CaPlus;
                    let a = d[t];
                    let from_q = &self.target_dist[i * n..(i + 1) * n];
                    let (loss, count) = hinge(from_q, a, plus);
                    let sign = if plus { 1.0 } else { -1.0 };
                    grad.add_distance(i, t, sign * count as f32 / nf, e_i, a, n);
                    loss / n as f64
                }
                RankAttack::QaPlus | RankAttack::QaMinus | RankAttack::Gtt => {
                    let plus = self.attack == RankAttack::QaPlus;
                    let a = d[t];
                    let (loss, count) = hinge(d, a, plus);
                    let sign = if plus { 1.0 } else { -1.0 };
                    grad.add_distance(i, t, sign * count as f32 / nf, e_i, a, n);
                    for (j, &dj) in d.iter().enumerate() {
                        if (plus && dj < a) || (!plus && dj > a) {
                            grad.add_distance(i, j, -sign / nf, e_i, dj, n);
                        }
                    }
                    loss / n as f64
                }
                RankAttack::Es => {
                    let x0 = self.db.row(me);
                    let diff: Vec<f32> = e_i
                        .iter()
                        .zip(x0)
                        .enumerate()
                        .map(|(k, (a, b))| a - b - es_noise.map_or(0.0, |z| z[i * dim + k]))
                        .collect();
                    let len = diff.iter().map(|v| v * v).sum::<f32>().sqrt();
                    if len > 0.0 {
                        for (g, v) in grad.direct[i * dim..(i + 1) * dim].iter_mut().zip(&diff) {
                            *g -= v / len;
                        }
                    }
                    -(len as f64)
                }
                RankAttack::Tma => {
                    let x_t = self.db.row(t);
                    let (ne, nt) = (norm(e_i), norm(x_t));
                    let cos = dot(e_i, x_t) / (ne * nt).max(f32::MIN_POSITIVE);
                    if ne > 0.0 && nt > 0.0 {
                        // d(1 - cos)/de = -(x_t / (|e||x_t|) - cos e / |e|^2)
                        let coef = grad.coef.get_or_insert_with(|| vec![0.0; b * n]);
                        coef[i * n + t] -= 1.0 / (ne * nt);
                        for (g, &v) in grad.direct[i * dim..(i + 1) * dim].iter_mut().zip(e_i) {
                            *g += cos / (ne * ne) * v;
                        }
                    }
                    1.0 - cos as f64
                }
                RankAttack::Ltm => {
                    let y = self.db.labels[me];
                    let far = (0..n)
                        .filter(|&j| j != me && self.db.labels[j] != y)
                        .max_by(|&a, &b| d[a].total_cmp(&d[b]));
                    let near = (0..n)
                        .filter(|&j| j != me && self.db.labels[j] == y)
                        .min_by(|&a, &b| d[a].total_cmp(&d[b]));
                    match (far, near) {
                        (Some(f), Some(p)) if d[f] > d[p] => {
                            grad.add_distance(i, f, 1.0, e_i, d[f], n);
                            grad.add_distance(i, p, -1.0, e_i, d[p], n);
                            (d[f] - d[p]) as f64
                        }
                        _ => 0.0,
                    }
                }
                RankAttack::Gtm | RankAttack::GtmRobrankCode => {
                    grad.add_distance(i, t, 1.0, e_i, d[t], n);
                    d[t] as f64
                }
            };
        }
        (total / b.max(1) as f64, grad)
    }

    /// The [B, D] gradient on the host: coef x database (one device GEMM) + direct.
    fn embedding_grad(&self, grad: EmbGrad, b: usize) -> Result<Vec<f32>> {
        let Some(coef) = grad.coef else {
            return Ok(grad.direct);
        };
        let n = self.db.len();
        let c = Tensor::from_vec(coef, &[b, n], &self.db.tensor.device())?;
        let mixed = gemm_raw(&c, &self.db.tensor, false, false)?.to_vec()?;
        Ok(mixed.iter().zip(&grad.direct).map(|(a, b)| a + b).collect())
    }

    /// The batch means of the attack's reported scores at embeddings `e`.
    fn scores(&self, e: &[f32], dist: &[f32]) -> Vec<f64> {
        let (n, dim) = (self.db.len(), self.db.dim);
        let b = self.items.len();
        let mean = |f: &dyn Fn(usize) -> f64| (0..b).map(f).sum::<f64>() / b.max(1) as f64;
        let row = |i: usize| &dist[i * n..(i + 1) * n];
        let closer = |r: &[f32], than: f32| r.iter().filter(|&&v| v < than).count() as f64;
        let recall1 = |i: usize| {
            let me = self.items[i];
            let top = nearest(row(i), me, 1, |_| true)[0];
            100.0 * f64::from(u8::from(self.db.labels[top] == self.db.labels[me]))
        };
        match self.attack {
            RankAttack::CaPlus | RankAttack::CaMinus => vec![mean(&|i| {
                let from_q = &self.target_dist[i * n..(i + 1) * n];
                100.0 * closer(from_q, row(i)[self.targets[i]]) / n as f64
            })],
            RankAttack::QaPlus | RankAttack::QaMinus => vec![mean(&|i| {
                100.0 * closer(row(i), row(i)[self.targets[i]]) / n as f64
            })],
            RankAttack::Es => vec![
                mean(&|i| {
                    let x0 = self.db.row(self.items[i]);
                    let e_i = &e[i * dim..(i + 1) * dim];
                    e_i.iter()
                        .zip(x0)
                        .map(|(a, b)| (a - b) * (a - b))
                        .sum::<f32>()
                        .sqrt() as f64
                }),
                mean(&recall1),
            ],
            RankAttack::Tma => vec![mean(&|i| {
                let (e_i, x_t) = (&e[i * dim..(i + 1) * dim], self.db.row(self.targets[i]));
                (dot(e_i, x_t) / (norm(e_i) * norm(x_t)).max(f32::MIN_POSITIVE)) as f64
            })],
            RankAttack::Ltm | RankAttack::Gtm | RankAttack::GtmRobrankCode => {
                vec![mean(&recall1)]
            }
            RankAttack::Gtt => vec![mean(&|i| {
                let (me, t) = (self.items[i], self.targets[i]);
                let r = row(i);
                let ahead = (0..n).filter(|&j| j != me && j != t && r[j] < r[t]).count();
                100.0 * f64::from(u8::from(ahead < 4))
            })],
        }
    }
}

/// sum_j relu(a - d_j) (`plus`) or sum_j relu(d_j - a), and how many terms are positive.
fn hinge(d: &[f32], a: f32, plus: bool) -> (f64, usize) {
    d.iter().fold((0.0, 0), |(s, c), &dj| {
        let v = if plus { a - dj } else { dj - a };
        if v > 0.0 {
            (s + v as f64, c + 1)
        } else {
            (s, c)
        }
    })
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn norm(a: &[f32]) -> f32 {
    dot(a, a).sqrt()
}
