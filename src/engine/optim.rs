//! The AdamW optimizer: parameter groups with their own learning rates (the proxies train at
//! 100x the backbone's), moments kept on the parameters' device, gradient clipping, and a
//! state that checkpoints can save and restore exactly. Each update is one `adamw.wgsl`
//! dispatch per parameter tensor.

use std::collections::BTreeMap;

use super::error::{EngineError, Result};
use super::ops::optim::{adamw_step, clip_grad_norm, AdamWStep};
use super::tape::Gradients;
use super::Tensor;

/// Parameters sharing a learning rate and weight decay.
#[derive(Clone)]
pub struct ParamGroup {
    pub name: String,
    /// (unique name, tracked leaf) pairs.
    pub params: Vec<(String, Tensor)>,
    pub lr: f32,
    pub weight_decay: f32,
    /// Frozen groups are skipped (e.g. the backbone during warm-up epochs).
    pub frozen: bool,
}

pub struct AdamW {
    pub groups: Vec<ParamGroup>,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// Multiplies every group's lr (the step schedule).
    pub lr_scale: f32,
    /// Updates made so far (bias correction uses step + 1 for the next one).
    pub step: u32,
    /// Moments by parameter name, created on first use.
    moments: BTreeMap<String, (Tensor, Tensor)>,
}

impl AdamW {
    pub fn new(groups: Vec<ParamGroup>) -> AdamW {
        AdamW {
            groups,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            lr_scale: 1.0,
            step: 0,
            moments: BTreeMap::new(),
        }
    }

    pub fn set_frozen(&mut self, group: &str, frozen: bool) {
        for g in self.groups.iter_mut().filter(|g| g.name == group) {
            g.frozen = frozen;
        }
    }

    /// Clips the global gradient norm of the trainable parameters to `max_norm` (if given),
    /// then updates every parameter that has a gradient. Returns the norm before clipping.
    pub fn step(&mut self, grads: &Gradients, max_norm: Option<f32>) -> Result<f32> {
        let mut targets: Vec<(String, Tensor, Tensor, f32, f32)> = Vec::new();
        for g in self.groups.iter().filter(|g| !g.frozen) {
            for (name, p) in &g.params {
                if let Some(grad) = grads.get(p) {
                    targets.push((name.clone(), p.clone(), grad.clone(), g.lr, g.weight_decay));
                }
            }
        }
        if targets.is_empty() {
            return Err(EngineError::Autograd(
                "optimizer step with no gradient for any trainable parameter".into(),
            ));
        }
        let raw: Vec<Tensor> = targets.iter().map(|t| t.2.clone()).collect();
        let (clipped, norm) = match max_norm {
            Some(m) => clip_grad_norm(&raw, m)?,
            None => (raw, f32::NAN),
        };
        self.step += 1;
        for ((name, p, _, lr, wd), grad) in targets.into_iter().zip(clipped) {
            let (m, v) = match self.moments.get(&name) {
                Some(mv) => mv.clone(),
                None => {
                    let mv = (
                        Tensor::zeros(p.shape(), &p.device())?,
                        Tensor::zeros(p.shape(), &p.device())?,
                    );
                    self.moments.insert(name.clone(), mv.clone());
                    mv
                }
            };
            let h = AdamWStep {
                lr: lr * self.lr_scale,
                beta1: self.beta1,
                beta2: self.beta2,
                eps: self.eps,
                weight_decay: wd,
                step: self.step,
            };
            adamw_step(&p, &grad, &m, &v, h)?;
        }
        Ok(norm)
    }

    /// The moments as named tensors (`adam_m/<param>`, `adam_v/<param>`), for checkpoints.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (name, (m, v)) in &self.moments {
            out.push((format!("adam_m/{name}"), m.clone()));
            out.push((format!("adam_v/{name}"), v.clone()));
        }
        out
    }

    /// Restores moments saved by [`Self::state`] (placed on each parameter's device).
    pub fn load_state(&mut self, tensors: &BTreeMap<String, Tensor>, step: u32) -> Result<()> {
        self.step = step;
        self.moments.clear();
        for g in &self.groups {
            for (name, p) in &g.params {
                let m = tensors.get(&format!("adam_m/{name}"));
                let v = tensors.get(&format!("adam_v/{name}"));
                if let (Some(m), Some(v)) = (m, v) {
                    self.moments.insert(
                        name.clone(),
                        (m.to_device(&p.device())?, v.to_device(&p.device())?),
                    );
                }
            }
        }
        Ok(())
    }
}
