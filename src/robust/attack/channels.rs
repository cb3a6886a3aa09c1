//! Attacks on a grey image that the network sees as three equal channels (docs/DESIGN.md,
//! "Attacks"). With [`AttackChannels::Tied`] the attack moves the grey image itself: its step
//! direction is, per pixel, the sum of the three channels' gradients (the chain rule through the
//! copy) on every channel, and its start noise is one channel's noise copied. Every later op
//! treats the three channels alike, so the adversarial image stays grey, bit for bit.

use crate::config::AttackChannels;
use crate::engine::ops::channels::{concat_channels, split_channels};
use crate::engine::ops::elementwise::add;
use crate::engine::{no_grad, EngineError, Result, Tensor};

const OP: &str = "tied-channel attack";

/// Refuses tied channels where there is no grey image to move: inputs without exactly three
/// channels, or whose channels differ at some pixel (colour images).
pub fn check_input(x: &Tensor, channels: AttackChannels) -> Result<()> {
    if channels.is_independent() {
        return Ok(());
    }
    let (n, c, h, w) = x.dims4(OP)?;
    if c != 3 {
        return Err(refusal(format!("the input has {c} channels, not 3")));
    }
    let plane = h * w;
    let v = x.to_vec()?;
    for (i, image) in v.chunks_exact(3 * plane).enumerate().take(n) {
        let (r, gb) = image.split_at(plane);
        let (g, b) = gb.split_at(plane);
        if r != g || r != b {
            return Err(refusal(format!("image {i} of the batch has colour")));
        }
    }
    Ok(())
}

fn refusal(what: String) -> EngineError {
    EngineError::Invalid {
        op: OP,
        detail: format!(
            "{what}; tied channels need grey images given as three equal channels \
             (use --attack-channels independent for colour images)"
        ),
    }
}

/// The direction an attack steps along: the input gradient `g` itself, or (tied) per pixel the
/// sum of its three channels on every channel: the gradient with respect to the grey image.
pub fn step_direction(g: &Tensor, channels: AttackChannels) -> Result<Tensor> {
    match channels {
        AttackChannels::Independent => Ok(g.clone()),
        AttackChannels::Tied => no_grad(|| {
            let parts = split_channels(g, &[1, 1, 1])?;
            let sum = add(&add(&parts[0], &parts[1])?, &parts[2])?;
            concat_channels(&[&sum, &sum, &sum])
        }),
    }
}

/// Noise drawn for the input's shape: itself, or (tied) its first channel on every channel.
pub fn start_noise(noise: Tensor, channels: AttackChannels) -> Result<Tensor> {
    match channels {
        AttackChannels::Independent => Ok(noise),
        AttackChannels::Tied => no_grad(|| {
            let parts = split_channels(&noise, &[1, 1, 1])?;
            concat_channels(&[&parts[0], &parts[0], &parts[0]])
        }),
    }
}
