//! The Proxy Anchor loss from a cosine matrix (docs/DESIGN.md, Proxy Anchor loss): per proxy,
//! a log-sum-exp over its positive rows and one over its negative rows, then their weighted
//! sum; forward and backward on both devices (`shaders/proxy_anchor.wgsl`). `dml::loss` builds
//! the cosines from embeddings and proxies and calls [`proxy_anchor_from_cosines`].

use crate::engine::error::{invalid, shape_err, Result};
use crate::engine::gpu::{groups_for, to_u32, Kernel};
use crate::engine::host_pool;
use crate::engine::launch::Launch;
use crate::engine::tape::Backward;
use crate::engine::tensor::Tensor;
use crate::{kernel, kernel_params};
use rayon::prelude::*;

kernel_params! {
    pub struct ProxyAnchorParams for ["proxy_anchor.wgsl"] {
        b: u32,
        c: u32,
        alpha: f32,
        delta: f32,
        /// 1 / |P+| (proxies with a positive in the batch).
        inv_pos: f32,
        /// 1 / C (all proxies).
        inv_c: f32,
    }
}

const FORWARD: Kernel = kernel!(
    "proxy_anchor.wgsl",
    "pa_forward",
    [Read, Read, Read, Read, ReadWrite]
);
const TOTAL: Kernel = kernel!(
    "proxy_anchor.wgsl",
    "pa_total",
    [Read, Read, Read, Read, ReadWrite]
);
const BACKWARD: Kernel = kernel!(
    "proxy_anchor.wgsl",
    "pa_backward",
    [Read, Read, Read, Read, ReadWrite]
);

/// The loss's scalars: the scale alpha, the margin delta, and the weights of its two terms.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ProxyAnchorTerms {
    pub alpha: f32,
    pub delta: f32,
    /// 1 / |P+| (proxies with a positive in the batch).
    pub inv_pos: f32,
    /// 1 / C (all proxies).
    pub inv_c: f32,
}

impl ProxyAnchorTerms {
    /// The kernels' parameters for a [b, c] cosine matrix.
    fn params(&self, b: usize, c: usize) -> Result<ProxyAnchorParams> {
        Ok(ProxyAnchorParams {
            b: to_u32(b)?,
            c: to_u32(c)?,
            alpha: self.alpha,
            delta: self.delta,
            inv_pos: self.inv_pos,
            inv_c: self.inv_c,
        })
    }
}

/// Stable log(1 + sum e^z): a log-sum-exp over {0, z...}.
fn log1p_sum_exp(z: &[f32]) -> f32 {
    let m = z.iter().fold(0.0f32, |m, &v| m.max(v));
    m + ((-m).exp() + z.iter().map(|&v| (v - m).exp()).sum::<f32>()).ln()
}

/// The exponent of one cosine: -alpha (s - delta) for a positive pair, alpha (s + delta) else.
fn exponent(s: f32, positive: bool, t: &ProxyAnchorTerms) -> f32 {
    if positive {
        -t.alpha * (s - t.delta)
    } else {
        t.alpha * (s + t.delta)
    }
}

/// The per-proxy log-sum-exps [2C] (positive terms, then negative terms) and the loss [1].
fn forward_raw(
    cos: &Tensor,
    labels: &Tensor,
    label_idx: &[usize],
    t: &ProxyAnchorTerms,
) -> Result<(Tensor, Tensor)> {
    let (b, c) = cos.dims2("proxy_anchor_loss")?;
    let [lse, loss] = Launch::new("proxy_anchor_loss", &[cos, labels]).run(
        [&[2 * c], &[1]],
        || {
            let cv = cos.cpu()?;
            // One proxy per task, its rows in order.
            let per_proxy: Vec<(f32, f32)> = (0..c)
                .into_par_iter()
                .map(|p| {
                    let (mut pos, mut neg) = (Vec::new(), Vec::new());
                    for x in 0..b {
                        let positive = label_idx[x] == p;
                        let z = exponent(cv[x * c + p], positive, t);
                        if positive {
                            pos.push(z)
                        } else {
                            neg.push(z)
                        }
                    }
                    (log1p_sum_exp(&pos), log1p_sum_exp(&neg))
                })
                .collect();
            let lse: Vec<f32> = per_proxy
                .iter()
                .map(|l| l.0)
                .chain(per_proxy.iter().map(|l| l.1))
                .collect();
            // Proxies without positives contribute log(1) = 0 to the positive sum.
            let loss =
                lse[..c].iter().sum::<f32>() * t.inv_pos + lse[c..].iter().sum::<f32>() * t.inv_c;
            Ok([lse, vec![loss]])
        },
        |call| {
            let params = t.params(b, c)?;
            let (cb, lb) = (call.input(0)?, call.input(1)?);
            let [lse, loss] = call.out;
            call.ctx
                .dispatch(&FORWARD, &params, &[cb, lb, cb, cb, lse], to_u32(c)?)?;
            call.ctx
                .dispatch(&TOTAL, &params, &[lse, lb, lse, lse, loss], 1)
        },
    )?;
    Ok((lse, loss))
}

/// d loss / d cos [B, C] for the loss gradient `g` [1].
fn backward_raw(
    cos: &Tensor,
    labels: &Tensor,
    label_idx: &[usize],
    lse: &Tensor,
    g: &Tensor,
    t: &ProxyAnchorTerms,
) -> Result<Tensor> {
    let (b, c) = cos.dims2("proxy_anchor_loss backward")?;
    let launch = Launch::new("proxy_anchor_loss backward", &[cos, labels, lse, g]);
    let [d] = launch.run(
        [&[b, c]],
        || {
            let (cv, lv, gv) = (cos.cpu()?, lse.cpu()?, g.cpu()?);
            let mut out = host_pool::for_overwrite(b * c);
            // One row per task.
            out.par_chunks_mut(c.max(1))
                .enumerate()
                .for_each(|(x, row)| {
                    for (p, o) in row.iter_mut().enumerate() {
                        let positive = label_idx[x] == p;
                        let z = exponent(cv[x * c + p], positive, t);
                        // The softmax weight of z within its log-sum-exp, times dz/ds and 1/|P+| or 1/C.
                        *o = gv[0]
                            * if positive {
                                -t.alpha * t.inv_pos * (z - lv[p]).exp()
                            } else {
                                t.alpha * t.inv_c * (z - lv[c + p]).exp()
                            };
                    }
                });
            Ok([out])
        },
        |call| {
            let params = t.params(b, c)?;
            let out = &call.out[0];
            let bufs = [
                call.input(0)?,
                call.input(1)?,
                call.input(2)?,
                call.input(3)?,
                out,
            ];
            call.ctx
                .dispatch(&BACKWARD, &params, &bufs, groups_for(b * c, 256)?)
        },
    )?;
    Ok(d)
}

struct ProxyAnchorBack {
    labels: Tensor,
    label_idx: Vec<usize>,
    lse: Tensor,
    terms: ProxyAnchorTerms,
}
impl Backward for ProxyAnchorBack {
    fn name(&self) -> &'static str {
        "proxy_anchor_loss"
    }
    fn backward(&self, i: &[Tensor], _o: &Tensor, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let d = backward_raw(
            &i[0],
            &self.labels,
            &self.label_idx,
            &self.lse,
            g,
            &self.terms,
        )?;
        Ok(vec![Some(d)])
    }
}

/// The Proxy Anchor loss [1] from the cosine matrix `cos` [B, C] and the class of each row
/// (each < C). Recorded: the gradient flows to `cos`.
pub fn proxy_anchor_from_cosines(
    cos: &Tensor,
    labels: &[usize],
    terms: ProxyAnchorTerms,
) -> Result<Tensor> {
    let (b, c) = cos.dims2("proxy_anchor_loss")?;
    if labels.len() != b {
        return shape_err(
            "proxy_anchor_loss",
            format!("{} labels for {b} rows of cosines", labels.len()),
        );
    }
    if let Some(&bad) = labels.iter().find(|&&l| l >= c) {
        return invalid(
            "proxy_anchor_loss",
            format!("label {bad} with only {c} proxies"),
        );
    }
    // Class indices travel as f32, exact below 2^24 classes.
    let label_values: Vec<f32> = labels.iter().map(|&l| l as f32).collect();
    let label_tensor = Tensor::from_vec(label_values, &[b], &cos.device())?;
    let (lse, loss) = forward_raw(cos, &label_tensor, labels, &terms)?;
    let back = ProxyAnchorBack {
        labels: label_tensor,
        label_idx: labels.to_vec(),
        lse,
        terms,
    };
    Ok(loss.record(back, &[cos]))
}
