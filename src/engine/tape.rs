//! Reverse-mode autograd. Every op's output carries a [`Node`]: the op's backward and its
//! inputs. Together the nodes form the tape of the forward pass; [`backward`] walks it in
//! reverse topological order, accumulating gradients where a tensor fed several ops, and drops
//! each node as soon as its gradient has been passed on, so memory is freed during the walk.

use std::cell::Cell;
use std::collections::{HashMap, HashSet};

use super::error::{EngineError, Result};
use super::tensor::Tensor;

/// The backward of one op: given the gradient of its output, the gradients of its inputs
/// (`None` for an input that needs none). Runs with grad mode off.
pub trait Backward: Send + Sync {
    fn name(&self) -> &'static str;
    fn backward(
        &self,
        inputs: &[Tensor],
        output: &Tensor,
        grad: &Tensor,
    ) -> Result<Vec<Option<Tensor>>>;
}

pub(crate) struct Node {
    pub(crate) op: Box<dyn Backward>,
    pub(crate) inputs: Vec<Tensor>,
}

thread_local! {
    static GRAD_ENABLED: Cell<bool> = const { Cell::new(true) };
}

pub fn is_grad_enabled() -> bool {
    GRAD_ENABLED.with(|g| g.get())
}

/// Restores the previous grad mode when dropped.
pub struct GradModeGuard(bool);

impl Drop for GradModeGuard {
    fn drop(&mut self) {
        GRAD_ENABLED.with(|g| g.set(self.0));
    }
}

/// Turns recording off until the guard is dropped.
pub fn no_grad_guard() -> GradModeGuard {
    GradModeGuard(GRAD_ENABLED.with(|g| g.replace(false)))
}

/// Runs `f` without recording (inference, attacks' bookkeeping, optimizer steps).
pub fn no_grad<T>(f: impl FnOnce() -> T) -> T {
    let _g = no_grad_guard();
    f()
}

/// Gradients of the tracked leaves, by tensor id.
#[derive(Default)]
pub struct Gradients {
    map: HashMap<usize, Tensor>,
}

impl Gradients {
    pub fn get(&self, t: &Tensor) -> Option<&Tensor> {
        self.map.get(&t.id())
    }
    pub fn remove(&mut self, t: &Tensor) -> Option<Tensor> {
        self.map.remove(&t.id())
    }
    pub fn insert(&mut self, t: &Tensor, g: Tensor) {
        self.map.insert(t.id(), g);
    }
    pub fn len(&self) -> usize {
        self.map.len()
    }
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// Nodes reachable from `root` through tensors that require grad, in topological order
/// (inputs before the ops that use them).
fn topo_order(root: &Tensor) -> Vec<Tensor> {
    let mut order = Vec::new();
    let mut seen = HashSet::new();
    // Iterative DFS: deep networks would overflow the stack with recursion.
    let mut stack: Vec<(Tensor, bool)> = vec![(root.clone(), false)];
    while let Some((t, expanded)) = stack.pop() {
        if expanded {
            order.push(t);
            continue;
        }
        if !seen.insert(t.id()) {
            continue;
        }
        stack.push((t.clone(), true));
        if let Some(node) = t.node() {
            for inp in &node.inputs {
                if inp.requires_grad() && !seen.contains(&inp.id()) {
                    stack.push((inp.clone(), false));
                }
            }
        }
    }
    order
}

pub(crate) fn backward(root: Tensor) -> Result<Gradients> {
    let seed = {
        let _guard = no_grad_guard();
        super::ops::elementwise::ones_like(&root)?
    };
    backward_with(root, seed)
}

/// Backpropagates `seed` (the gradient of some scalar with respect to `root`) from `root`.
pub fn backward_with(root: Tensor, seed: Tensor) -> Result<Gradients> {
    if seed.shape() != root.shape() {
        return Err(EngineError::Autograd(format!(
            "seed of shape {:?} for a root of shape {:?}",
            seed.shape(),
            root.shape()
        )));
    }
    if !root.requires_grad() {
        return Err(EngineError::Autograd(
            "backward on a tensor that does not depend on any tracked leaf (make parameters or \
             inputs with .var(), and do not run the forward pass under no_grad)"
                .into(),
        ));
    }
    let _guard = no_grad_guard();
    let mut order: Vec<Option<Tensor>> = topo_order(&root).into_iter().map(Some).collect();
    drop(root);
    let mut pending: HashMap<usize, Tensor> = HashMap::new();
    let last = order.len() - 1;
    pending.insert(order[last].as_ref().unwrap().id(), seed);
    let mut leaves = Gradients::default();
    for slot in order.iter_mut().rev() {
        let t = slot.take().unwrap();
        let Some(grad) = pending.remove(&t.id()) else {
            continue;
        };
        let Some(node) = t.node() else {
            leaves.map.insert(t.id(), grad);
            continue;
        };
        let grads = node.op.backward(&node.inputs, &t, &grad)?;
        if grads.len() != node.inputs.len() {
            return Err(EngineError::Autograd(format!(
                "backward of {} returned {} gradients for {} inputs",
                node.op.name(),
                grads.len(),
                node.inputs.len()
            )));
        }
        for (inp, g) in node.inputs.iter().zip(grads) {
            let Some(g) = g else { continue };
            if !inp.requires_grad() {
                continue;
            }
            if g.shape() != inp.shape() {
                return Err(EngineError::Autograd(format!(
                    "backward of {} gave a gradient of shape {:?} for an input of shape {:?}",
                    node.op.name(),
                    g.shape(),
                    inp.shape()
                )));
            }
            let acc = match pending.remove(&inp.id()) {
                Some(prev) => super::ops::elementwise::add(&prev, &g)?,
                None => g,
            };
            pending.insert(inp.id(), acc);
        }
        // `t` (and with it this node's saved inputs) is dropped here.
    }
    Ok(leaves)
}
