//! L2 normalisation along a dimension and the cosine similarity matrix; forward and backward
//! on both devices. GPU: `shaders/normalize.wgsl` (+ the GEMM for the similarity matrix).

use crate::engine::error::{invalid, shape_err, Result};
use crate::engine::gpu::{f, u, Kernel};
use crate::engine::ops::matmul;
use crate::engine::ops::reduce::outer_n_inner;
use crate::engine::tape::Backward;
use crate::engine::tensor::{same_device, Tensor};
use crate::engine::{cpu, Device};
use crate::kernel;
use rayon::prelude::*;

const FORWARD: Kernel = kernel!("normalize.wgsl", "l2n_forward", [Read, Read, ReadWrite]);
const BACKWARD: Kernel = kernel!("normalize.wgsl", "l2n_backward", [Read, Read, ReadWrite]);

/// PyTorch's default `eps` of `F.normalize`, used by [`cosine_similarity`].
pub const DEFAULT_EPS: f32 = 1e-12;

fn check_eps(op: &'static str, eps: f32) -> Result<()> {
    if !(eps > 0.0 && eps.is_finite()) {
        return invalid(op, format!("eps must be positive and finite, got {eps}"));
    }
    Ok(())
}

/// Runs `f(out_slab, x_slab, g_slab)` for every slab [n, inner] (one index of the outer
/// dimensions) over all cores, several small slabs per task. Each slab is one task's, so every
/// sum in it has a fixed order.
fn for_each_slab(
    out: &mut [f32],
    x: &[f32],
    g: Option<&[f32]>,
    (n, inner): (usize, usize),
    f: impl Fn(&mut [f32], &[f32], Option<&[f32]>) + Sync,
) {
    let slab = (n * inner).max(1);
    out.par_chunks_mut(slab)
        .enumerate()
        .with_min_len(cpu::rows_per_task(slab))
        .for_each(|(o, out)| {
            let range = o * slab..o * slab + out.len();
            f(out, &x[range.clone()], g.map(|g| &g[range]));
        });
}

/// Per column i of two [n, inner] slabs: the sum over rows k = 0, 1, ... (in that order) of
/// a[k, i] * b[k, i].
fn column_dots(a: &[f32], b: &[f32], inner: usize) -> Vec<f32> {
    let mut sums = vec![0.0f32; inner];
    for (a_row, b_row) in a.chunks_exact(inner).zip(b.chunks_exact(inner)) {
        for ((s, &u), &v) in sums.iter_mut().zip(a_row).zip(b_row) {
            *s += u * v;
        }
    }
    sums
}

/// x / max(||x||, eps) along `dim`, not recorded.
fn l2_normalize_raw(x: &Tensor, dim: usize, eps: f32) -> Result<Tensor> {
    let (outer, n, inner) = outer_n_inner(x.shape(), dim, "l2_normalize")?;
    match x.device() {
        Device::Cpu => {
            let xv = x.cpu()?;
            let mut out = vec![0.0f32; xv.len()];
            for_each_slab(&mut out, &xv, None, (n, inner), |o, x, _| {
                let denom: Vec<f32> = column_dots(x, x, inner)
                    .iter()
                    .map(|sq| sq.sqrt().max(eps))
                    .collect();
                if let [d] = denom[..] {
                    // One column (normalising rows): a contiguous loop.
                    for (o, &x) in o.iter_mut().zip(x) {
                        *o = x / d;
                    }
                    return;
                }
                for (o_row, x_row) in o.chunks_exact_mut(inner).zip(x.chunks_exact(inner)) {
                    for ((o, &x), &d) in o_row.iter_mut().zip(x_row).zip(&denom) {
                        *o = x / d;
                    }
                }
            });
            Tensor::from_cpu(out, x.shape())
        }
        Device::Gpu(ctx) => {
            let out = ctx.alloc(x.numel())?;
            let xb = x.gpu()?;
            let params = [u(outer), u(n), u(inner), f(eps)];
            ctx.dispatch(&FORWARD, &params, &[xb, xb, &out], (outer * inner) as u32)?;
            Tensor::from_gpu(out, x.shape())
        }
    }
}

/// The exact gradient of [`l2_normalize_raw`] at `x` for output gradient `g`: with r = ||x||,
/// (g - y (g . y)) / r where r > eps, and g / eps where the norm was clamped.
fn l2_normalize_backward_raw(x: &Tensor, g: &Tensor, dim: usize, eps: f32) -> Result<Tensor> {
    let (outer, n, inner) = outer_n_inner(x.shape(), dim, "l2_normalize backward")?;
    match same_device("l2_normalize backward", &[x, g])? {
        Device::Cpu => {
            let (xv, gv) = (x.cpu()?, g.cpu()?);
            let mut out = vec![0.0f32; xv.len()];
            for_each_slab(&mut out, &xv, Some(&gv), (n, inner), |o, x, g| {
                let g = g.expect("the gradient slab");
                let (sq, gx) = (column_dots(x, x, inner), column_dots(g, x, inner));
                let rows = o.chunks_exact_mut(inner).zip(x.chunks_exact(inner));
                for ((o_row, x_row), g_row) in rows.zip(g.chunks_exact(inner)) {
                    for i in 0..inner {
                        let r = sq[i].sqrt();
                        o_row[i] = if r > eps {
                            (g_row[i] - (x_row[i] / r) * (gx[i] / r)) / r
                        } else {
                            g_row[i] / eps
                        };
                    }
                }
            });
            Tensor::from_cpu(out, x.shape())
        }
        Device::Gpu(ctx) => {
            let out = ctx.alloc(x.numel())?;
            let params = [u(outer), u(n), u(inner), f(eps)];
            let bufs = [x.gpu()?, g.gpu()?, &out];
            ctx.dispatch(&BACKWARD, &params, &bufs, (outer * inner) as u32)?;
            Tensor::from_gpu(out, x.shape())
        }
    }
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
