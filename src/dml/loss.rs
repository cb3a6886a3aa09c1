//! Proxy Anchor loss (Kim et al. 2020), as in the official code (docs/DESIGN.md, Proxy Anchor loss):
//!
//! ```text
//! L = 1/|P+| sum_{p in P+} log(1 + sum_{x in X_p+} exp(-alpha (s(x,p) - delta)))
//!   + 1/|P|  sum_{p in P}  log(1 + sum_{x in X_p-} exp( alpha (s(x,p) + delta)))
//! ```
//!
//! s is the cosine of the L2-normalised embedding and proxy. The cosine matrix comes from the
//! engine's normalisation and GEMM (so their backward passes carry the gradient on to the
//! embeddings and proxies); the loss from the cosines is the engine op
//! `engine::ops::proxy_anchor` (`shaders/proxy_anchor.wgsl`).

use crate::engine::error::{invalid, shape_err, Result};
use crate::engine::ops::normalize::cosine_similarity;
use crate::engine::ops::proxy_anchor::{proxy_anchor_from_cosines, ProxyAnchorTerms};
use crate::engine::tensor::{same_device, Tensor};
use crate::engine::{Device, Rng};

/// The loss's hyper-parameters (the official defaults: alpha 32, margin delta 0.1).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ProxyAnchorConfig {
    pub alpha: f32,
    pub delta: f32,
}

impl Default for ProxyAnchorConfig {
    fn default() -> Self {
        ProxyAnchorConfig {
            alpha: crate::config::PA_ALPHA,
            delta: crate::config::PA_DELTA,
        }
    }
}

/// The metric loss of a training step, with its hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MetricLoss {
    ProxyAnchor(ProxyAnchorConfig),
    /// robrank's triplet loss on SPC-2 batches (`crate::dml::triplet`).
    Triplet {
        margin: f32,
    },
}

/// Proxies [classes, dim] drawn Kaiming-normal in fan_out mode, as the official code's
/// `torch.nn.init.kaiming_normal_(proxies, mode='fan_out')`: for a [C, D] tensor fan_out = C,
/// so std = sqrt(2) / sqrt(C). Returned as a tracked leaf (a trainable parameter).
pub fn init_proxies(classes: usize, dim: usize, rng: &mut Rng, device: &Device) -> Result<Tensor> {
    if classes == 0 || dim == 0 {
        return invalid(
            "init_proxies",
            format!("{classes} classes of dimension {dim}"),
        );
    }
    let std = (2.0 / classes as f32).sqrt();
    Ok(Tensor::randn(&[classes, dim], std, rng, device)?.var())
}

/// The Proxy Anchor loss of `embeddings` [B, D] (not necessarily normalised) against
/// `proxies` [C, D] with class `labels` (one per row, each < C), shape [1]. Recorded:
/// gradients flow to both the embeddings and the proxies.
pub fn proxy_anchor_loss(
    embeddings: &Tensor,
    proxies: &Tensor,
    labels: &[usize],
    alpha: f32,
    delta: f32,
) -> Result<Tensor> {
    let (b, _) = embeddings.dims2("proxy_anchor_loss")?;
    let (c, _) = proxies.dims2("proxy_anchor_loss")?;
    if b == 0 || c == 0 {
        return shape_err(
            "proxy_anchor_loss",
            format!("{b} embeddings and {c} proxies"),
        );
    }
    if labels.len() != b {
        return shape_err(
            "proxy_anchor_loss",
            format!("{} labels for {b} embeddings", labels.len()),
        );
    }
    if let Some(&bad) = labels.iter().find(|&&l| l >= c) {
        return invalid(
            "proxy_anchor_loss",
            format!("label {bad} with only {c} proxies"),
        );
    }
    if !alpha.is_finite() || !delta.is_finite() {
        return invalid("proxy_anchor_loss", format!("alpha {alpha}, delta {delta}"));
    }
    same_device("proxy_anchor_loss", &[embeddings, proxies])?;
    let mut has_positive = vec![false; c];
    for &l in labels {
        has_positive[l] = true;
    }
    let num_pos = has_positive.iter().filter(|&&h| h).count();
    let terms = ProxyAnchorTerms {
        alpha,
        delta,
        inv_pos: 1.0 / num_pos as f32,
        inv_c: 1.0 / c as f32,
    };
    let cos = cosine_similarity(embeddings, proxies)?;
    proxy_anchor_from_cosines(&cos, labels, terms)
}
