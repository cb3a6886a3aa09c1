//! L2 normalisation along a dimension and the cosine similarity matrix; forward and backward
//! on both devices. GPU: `shaders/normalize.wgsl` (+ the GEMM for the similarity matrix).

use rayon::prelude::*;

use crate::engine::error::{invalid, shape_err, Result};
use crate::engine::gpu::{to_u32, Kernel};
use crate::engine::launch::Launch;
use crate::engine::ops::matmul;
use crate::engine::ops::reduce::outer_n_inner;
use crate::engine::tape::Backward;
use crate::engine::tensor::{same_device, Tensor};
use crate::engine::{cpu, host_pool};
use crate::{kernel, kernel_params};

const FORWARD: Kernel = kernel!("normalize.wgsl", "l2n_forward", [Read, Read, ReadWrite]);
const BACKWARD: Kernel = kernel!("normalize.wgsl", "l2n_backward", [Read, Read, ReadWrite]);

kernel_params! {
    pub struct NormalizeParams for ["normalize.wgsl"] {
        outer: u32,
        n: u32,
        inner: u32,
        eps: f32,
    }
}

impl NormalizeParams {
    fn new(outer: usize, n: usize, inner: usize, eps: f32) -> Result<Self> {
        Ok(NormalizeParams {
            outer: to_u32(outer)?,
            n: to_u32(n)?,
            inner: to_u32(inner)?,
            eps,
        })
    }
}

/// PyTorch's default `eps` of `F.normalize`, used by [`cosine_similarity`].
pub const DEFAULT_EPS: f32 = 1e-12;

fn check_eps(op: &'static str, eps: f32) -> Result<()> {
    if !(eps > 0.0 && eps.is_finite()) {
        return invalid(op, format!("eps must be positive and finite, got {eps}"));
    }
    Ok(())
}

/// A `len`-element output filled slab by slab (`fill(o, slab)` writes slab `o` of `slab_len`
/// elements), slabs grouped into tasks of about `cpu::FLAT_CHUNK` elements over all cores. Each
/// element is computed by the same serial code whatever the grouping, so results do not depend on
/// the thread count; a small tensor is one task, which keeps the embedding head's [B, D]
/// normalisation as cheap as the serial loop.
fn per_slab(slab_len: usize, len: usize, fill: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    let mut out = host_pool::zeroed(len);
    if slab_len == 0 {
        return out;
    }
    let per_task = cpu::rows_per_task(slab_len);
    out.par_chunks_mut(per_task * slab_len)
        .enumerate()
        .for_each(|(task, chunk)| {
            for (j, slab) in chunk.chunks_mut(slab_len).enumerate() {
                fill(task * per_task + j, slab);
            }
        });
    out
}

/// x / max(||x||, eps) along `dim`, not recorded.
fn l2_normalize_raw(x: &Tensor, dim: usize, eps: f32) -> Result<Tensor> {
    let (outer, n, inner) = outer_n_inner(x.shape(), dim, "l2_normalize")?;
    let [y] = Launch::new("l2_normalize", &[x]).run(
        [x.shape()],
        || {
            let xv = x.cpu()?;
            let out = per_slab(n * inner, xv.len(), |o, slab| {
                for i in 0..inner {
                    let at = |k: usize| k * inner + i;
                    let x = &xv[o * n * inner..];
                    let norm = (0..n).map(|k| x[at(k)] * x[at(k)]).sum::<f32>().sqrt();
                    let denom = norm.max(eps);
                    for k in 0..n {
                        slab[at(k)] = x[at(k)] / denom;
                    }
                }
            });
            Ok([out])
        },
        |call| {
            let xb = call.input(0)?;
            let params = NormalizeParams::new(outer, n, inner, eps)?;
            let bufs = [xb, xb, &call.out[0]];
            call.ctx
                .dispatch(&FORWARD, &params, &bufs, to_u32(outer * inner)?)
        },
    )?;
    Ok(y)
}

/// The exact gradient of [`l2_normalize_raw`] at `x` for output gradient `g`: with r = ||x||,
/// (g - y (g . y)) / r where r > eps, and g / eps where the norm was clamped.
fn l2_normalize_backward_raw(x: &Tensor, g: &Tensor, dim: usize, eps: f32) -> Result<Tensor> {
    let (outer, n, inner) = outer_n_inner(x.shape(), dim, "l2_normalize backward")?;
    let [dx] = Launch::new("l2_normalize backward", &[x, g]).run(
        [x.shape()],
        || {
            let (xv, gv) = (x.cpu()?, g.cpu()?);
            let out = per_slab(n * inner, xv.len(), |o, slab| {
                let (x, g) = (&xv[o * n * inner..], &gv[o * n * inner..]);
                for i in 0..inner {
                    let at = |k: usize| k * inner + i;
                    let r = (0..n).map(|k| x[at(k)] * x[at(k)]).sum::<f32>().sqrt();
                    let g_dot_x: f32 = (0..n).map(|k| g[at(k)] * x[at(k)]).sum();
                    for k in 0..n {
                        slab[at(k)] = if r > eps {
                            (g[at(k)] - (x[at(k)] / r) * (g_dot_x / r)) / r
                        } else {
                            g[at(k)] / eps
                        };
                    }
                }
            });
            Ok([out])
        },
        |call| {
            let params = NormalizeParams::new(outer, n, inner, eps)?;
            let bufs = [call.input(0)?, call.input(1)?, &call.out[0]];
            call.ctx
                .dispatch(&BACKWARD, &params, &bufs, to_u32(outer * inner)?)
        },
    )?;
    Ok(dx)
}

struct L2NormalizeBack {
    dim: usize,
    eps: f32,
}
impl Backward for L2NormalizeBack {
    fn name(&self) -> &'static str {
        "l2_normalize"
    }
    fn backward(&self, i: &[Tensor], _o: &Tensor, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(l2_normalize_backward_raw(
            &i[0], g, self.dim, self.eps,
        )?)])
    }
}

/// x / max(||x||_2, eps) along `dim` (PyTorch's `F.normalize`).
pub fn l2_normalize(x: &Tensor, dim: usize, eps: f32) -> Result<Tensor> {
    check_eps("l2_normalize", eps)?;
    Ok(l2_normalize_raw(x, dim, eps)?.record(L2NormalizeBack { dim, eps }, &[x]))
}

/// cos(a_i, b_j) for a [N, D], b [M, D] -> [N, M]: rows normalised (eps 1e-12), then one GEMM.
/// Recorded: gradients flow to both `a` and `b`.
pub fn cosine_similarity(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (_, da) = a.dims2("cosine_similarity")?;
    let (_, db) = b.dims2("cosine_similarity")?;
    if da != db {
        return shape_err(
            "cosine_similarity",
            format!(
                "rows of different lengths: {:?} and {:?}",
                a.shape(),
                b.shape()
            ),
        );
    }
    same_device("cosine_similarity", &[a, b])?;
    let an = l2_normalize(a, 1, DEFAULT_EPS)?;
    let bn = l2_normalize(b, 1, DEFAULT_EPS)?;
    matmul::matmul_t(&an, &bn, false, true)
}
