//! Reductions: sum and mean (whole tensor and along a dimension), log-sum-exp along a
//! dimension; forward and backward on both devices. GPU: `shaders/reduce.wgsl`.
//!
//! A reduction along `dim` views the tensor as [outer, n, inner] (n = the size of `dim`), so
//! one implementation serves every rank and dimension.

use crate::engine::error::{invalid, shape_err, Result};
use crate::engine::gpu::{groups_for, to_u32, GpuBuffer, Kernel, OpCodes};
use crate::engine::launch::Launch;
use crate::engine::tape::Backward;
use crate::engine::tensor::Tensor;
use crate::engine::{cpu, host_pool};
use crate::{kernel, kernel_params};
use rayon::prelude::*;

const REDUCE_DIM: Kernel = kernel!("reduce.wgsl", "reduce_dim", [Read, Read, Read, ReadWrite]);
const SUM_PARTIAL: Kernel = kernel!("reduce.wgsl", "sum_partial", [Read, Read, Read, ReadWrite]);
const EXPAND_DIM: Kernel = kernel!("reduce.wgsl", "expand_dim", [Read, Read, Read, ReadWrite]);

/// Values summed by one workgroup in one pass of a whole-tensor sum (`CHUNK` in the shader).
const CHUNK: usize = 2048;

kernel_params! {
    pub struct ReduceParams for ["reduce.wgsl"] {
        outer: u32,
        n: u32,
        inner: u32,
        /// A [`DIM_CODES`] or, in `sum_partial`, a [`SUM_CODES`] entry.
        op: u32,
        scale: f32,
    }
}

impl ReduceParams {
    fn new(outer: usize, n: usize, inner: usize, op: u32, scale: f32) -> Result<Self> {
        Ok(ReduceParams {
            outer: to_u32(outer)?,
            n: to_u32(n)?,
            inner: to_u32(inner)?,
            op,
            scale,
        })
    }
}

/// What `reduce_dim` and `expand_dim` compute: the shader's `REDUCE_*` constants.
pub const DIM_CODES: OpCodes = OpCodes {
    file: "reduce.wgsl",
    prefix: "REDUCE_",
    switch_fn: None,
    codes: &[("SCALED_SUM", 0), ("LOGSUMEXP", 1)],
};
const SCALED_SUM: u32 = DIM_CODES.code("SCALED_SUM");
const LOGSUMEXP: u32 = DIM_CODES.code("LOGSUMEXP");

/// What the first pass of `sum_partial` adds up: the shader's `SUM_OF_*` constants.
pub const SUM_CODES: OpCodes = OpCodes {
    file: "reduce.wgsl",
    prefix: "SUM_OF_",
    switch_fn: None,
    codes: &[("VALUES", 0), ("SQUARES", 1)],
};
const OF_VALUES: u32 = SUM_CODES.code("VALUES");
const OF_SQUARES: u32 = SUM_CODES.code("SQUARES");

/// What a reduction along a dimension computes.
#[derive(Clone, Copy, Debug, PartialEq)]
enum DimOp {
    /// Sum times a constant (1 for sum, 1/n for mean).
    ScaledSum(f32),
    LogSumExp,
}

/// (outer, n, inner) of `shape` around `dim`.
pub(crate) fn outer_n_inner(
    shape: &[usize],
    dim: usize,
    op: &'static str,
) -> Result<(usize, usize, usize)> {
    if dim >= shape.len() {
        return shape_err(
            op,
            format!("dimension {dim} of a tensor of shape {shape:?}"),
        );
    }
    let outer = shape[..dim].iter().product();
    let inner = shape[dim + 1..].iter().product();
    Ok((outer, shape[dim], inner))
}

/// `shape` without `dim`; a vector reduces to shape [1] rather than a rank-0 tensor.
fn reduced_shape(shape: &[usize], dim: usize) -> Vec<usize> {
    let mut s: Vec<usize> = shape.to_vec();
    s.remove(dim);
    if s.is_empty() {
        s.push(1);
    }
    s
}

/// Stable log(sum(exp(v))): shifted by the maximum (no shift when every value is -inf).
pub fn logsumexp_slice(v: impl Iterator<Item = f32> + Clone) -> f32 {
    let m = v.clone().fold(f32::NEG_INFINITY, f32::max);
    let shift = if m.is_finite() { m } else { 0.0 };
    shift + v.map(|x| (x - shift).exp()).sum::<f32>().ln()
}

/// Output columns one task of a strided reduction (inner > 1) takes.
const COLUMNS_PER_TASK: usize = 1024;

/// The CPU reduction of x [outer, n, inner] along n, into [outer, inner]. Each output is
/// reduced by one task in index order (k = 0, 1, ...): the same bits for any thread count.
fn cpu_reduce_dim(x: &[f32], (outer, n, inner): (usize, usize, usize), op: DimOp) -> Vec<f32> {
    let mut out = host_pool::zeroed(outer * inner);
    if out.is_empty() {
        return out;
    }
    if inner == 1 {
        // Each output reduces one contiguous row; rows in tasks of about FLAT_CHUNK elements.
        out.par_iter_mut()
            .enumerate()
            .with_min_len(cpu::rows_per_task(n))
            .for_each(|(o, out)| {
                let row = &x[o * n..(o + 1) * n];
                *out = match op {
                    DimOp::ScaledSum(s) => row.iter().sum::<f32>() * s,
                    DimOp::LogSumExp => logsumexp_slice(row.iter().copied()),
                };
            });
        return out;
    }
    // Strided: a task owns a block of columns of one output row and accumulates the n input
    // rows into it, contiguous and vectorisable.
    let rows = out.par_chunks_mut(inner).enumerate();
    rows.with_min_len(cpu::rows_per_task(n * inner))
        .for_each(|(o, out_row)| {
            out_row
                .par_chunks_mut(COLUMNS_PER_TASK)
                .enumerate()
                .for_each(|(block, cols)| {
                    let (first, len) = (block * COLUMNS_PER_TASK, cols.len());
                    let input_row = |k: usize| &x[(o * n + k) * inner + first..][..len];
                    match op {
                        DimOp::ScaledSum(s) => {
                            for k in 0..n {
                                for (c, &v) in cols.iter_mut().zip(input_row(k)) {
                                    *c += v;
                                }
                            }
                            for c in cols.iter_mut() {
                                *c *= s;
                            }
                        }
                        DimOp::LogSumExp => logsumexp_columns(n, input_row, cols),
                    }
                });
        });
    out
}

/// Column-wise [`logsumexp_slice`] of n rows given by `row(k)`, into `out`.
fn logsumexp_columns<'a>(n: usize, row: impl Fn(usize) -> &'a [f32], out: &mut [f32]) {
    let mut shift = vec![f32::NEG_INFINITY; out.len()];
    for k in 0..n {
        for (m, &v) in shift.iter_mut().zip(row(k)) {
            *m = m.max(v);
        }
    }
    for m in shift.iter_mut() {
        if !m.is_finite() {
            *m = 0.0;
        }
    }
    out.fill(0.0);
    for k in 0..n {
        for ((s, &v), &m) in out.iter_mut().zip(row(k)).zip(&shift) {
            *s += (v - m).exp();
        }
    }
    for (s, &m) in out.iter_mut().zip(&shift) {
        *s = m + s.ln();
    }
}

/// Reduces along `dim` without recording.
fn reduce_dim_raw(x: &Tensor, dim: usize, op: DimOp, name: &'static str) -> Result<Tensor> {
    let (outer, n, inner) = outer_n_inner(x.shape(), dim, name)?;
    if op == DimOp::LogSumExp && n == 0 {
        return shape_err(
            name,
            format!("logsumexp over an empty dimension of {:?}", x.shape()),
        );
    }
    let out_shape = reduced_shape(x.shape(), dim);
    let [y] = Launch::new(name, &[x]).run(
        [&out_shape],
        || Ok([cpu_reduce_dim(&x.cpu()?, (outer, n, inner), op)]),
        |call| {
            let (code, scale) = match op {
                DimOp::ScaledSum(s) => (SCALED_SUM, s),
                DimOp::LogSumExp => (LOGSUMEXP, 1.0),
            };
            let xb = call.input(0)?;
            let params = ReduceParams::new(outer, n, inner, code, scale)?;
            let bufs = [xb, xb, xb, &call.out[0]];
            call.ctx
                .dispatch(&REDUCE_DIM, &params, &bufs, to_u32(outer * inner)?)
        },
    )?;
    Ok(y)
}

/// scale * sum of all values (of their squares when `squares`), shape [1], without recording.
/// GPU: passes of CHUNK-to-one partial sums until one value is left.
fn sum_all_raw(x: &Tensor, scale: f32, squares: bool) -> Result<Tensor> {
    // Several passes, each making the next one's input: the GPU code allocates them itself.
    let [y] = Launch::new("sum", &[x]).run_tensors(
        [&[1]],
        || {
            let xv = x.cpu()?;
            // f64 accumulation keeps large sums accurate. The blocks depend on the length
            // alone and their partials are added in order: the same bits for any thread count.
            let partials: Vec<f64> = xv
                .par_chunks(cpu::FLAT_CHUNK)
                .map(|block| {
                    if squares {
                        cpu::lane_sum_f64(block, |v| v as f64 * v as f64)
                    } else {
                        cpu::lane_sum_f64(block, |v| v as f64)
                    }
                })
                .collect();
            let s: f64 = partials.iter().sum();
            Ok([vec![(s * scale as f64) as f32]])
        },
        |ctx, inputs| {
            let mut n = x.numel();
            if n == 0 {
                return Ok([Tensor::zeros(&[1], &x.device())?]);
            }
            let mut first = true;
            let mut current: Option<GpuBuffer> = None;
            loop {
                let parts = n.div_ceil(CHUNK);
                let last = parts == 1;
                let out = ctx.alloc(parts)?;
                let src = current.as_ref().map_or_else(|| inputs[0].gpu(), Ok)?;
                let code = if first && squares {
                    OF_SQUARES
                } else {
                    OF_VALUES
                };
                let pass_scale = if last { scale } else { 1.0 };
                // sum_partial reads only n, op and scale.
                let params = ReduceParams::new(1, n, 1, code, pass_scale)?;
                ctx.dispatch(
                    &SUM_PARTIAL,
                    &params,
                    &[src, src, src, &out],
                    to_u32(parts)?,
                )?;
                if last {
                    return Ok([Tensor::from_gpu(out, &[1])?]);
                }
                current = Some(out);
                n = parts;
                first = false;
            }
        },
    )?;
    Ok(y)
}

/// Sum of the squares of all values, shape [1], not recorded (gradient norms).
pub fn sum_squares_raw(x: &Tensor) -> Result<Tensor> {
    sum_all_raw(x, 1.0, true)
}

/// Broadcasts `g` (shape of the reduction's output) back over `dim` of `like`'s shape:
/// g * scale for sums, g * exp(x - y) for logsumexp (x = `like`, y = the forward output).
fn expand_raw(
    g: &Tensor,
    like: &Tensor,
    y: Option<&Tensor>,
    dim: usize,
    scale: f32,
) -> Result<Tensor> {
    let (outer, n, inner) = outer_n_inner(like.shape(), dim, "reduce backward")?;
    let mut inputs = vec![g, like];
    inputs.extend(y);
    let [gx] = Launch::new("reduce backward", &inputs).run(
        [like.shape()],
        || {
            let gv = g.cpu()?;
            let mut out = host_pool::zeroed(outer * n * inner);
            let xy = match y {
                Some(y) => Some((like.cpu()?, y.cpu()?)),
                None => None,
            };
            let xy = xy.as_ref().map(|(x, y)| (&x[..], &y[..]));
            // Row r of the [outer * n, inner] view gets row r / n of g; rows in tasks of
            // about FLAT_CHUNK elements.
            out.par_chunks_mut(inner.max(1))
                .enumerate()
                .with_min_len(cpu::rows_per_task(inner))
                .for_each(|(r, out_row)| {
                    let col = (r / n.max(1)) * inner;
                    let g_row = &gv[col..col + inner];
                    match xy {
                        Some((xv, yv)) => {
                            let (x_row, y_row) =
                                (&xv[r * inner..(r + 1) * inner], &yv[col..col + inner]);
                            for i in 0..inner {
                                out_row[i] = g_row[i] * (x_row[i] - y_row[i]).exp();
                            }
                        }
                        None => {
                            for (o, &g) in out_row.iter_mut().zip(g_row) {
                                *o = g * scale;
                            }
                        }
                    }
                });
            Ok([out])
        },
        |call| {
            let total = call.out[0].len();
            let gb = call.input(0)?;
            let (code, xb, yb) = match y {
                Some(_) => (LOGSUMEXP, call.input(1)?, call.input(2)?),
                None => (SCALED_SUM, gb, gb),
            };
            let params = ReduceParams::new(outer, n, inner, code, scale)?;
            let bufs = [xb, yb, gb, &call.out[0]];
            call.ctx
                .dispatch(&EXPAND_DIM, &params, &bufs, groups_for(total, 256)?)
        },
    )?;
    Ok(gx)
}

// ------------------------------------------------------------------ recorded ops

/// Backward of a whole-tensor sum times `scale`: every input element gets g * scale.
struct SumAllBack(f32);
impl Backward for SumAllBack {
    fn name(&self) -> &'static str {
        "sum"
    }
    fn backward(&self, i: &[Tensor], _o: &Tensor, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let flat = i[0].detach().reshape(&[i[0].numel()])?;
        let gx = expand_raw(g, &flat, None, 0, self.0)?;
        Ok(vec![Some(gx.reshape(i[0].shape())?)])
    }
}

/// Sum of all elements, shape [1].
pub fn sum(x: &Tensor) -> Result<Tensor> {
    Ok(sum_all_raw(x, 1.0, false)?.record(SumAllBack(1.0), &[x]))
}

/// Mean of all elements, shape [1].
pub fn mean(x: &Tensor) -> Result<Tensor> {
    if x.numel() == 0 {
        return invalid("mean", "mean of an empty tensor");
    }
    let s = 1.0 / x.numel() as f32;
    Ok(sum_all_raw(x, s, false)?.record(SumAllBack(s), &[x]))
}

struct DimBack {
    dim: usize,
    op: DimOp,
}
impl Backward for DimBack {
    fn name(&self) -> &'static str {
        match self.op {
            DimOp::ScaledSum(_) => "sum_dim",
            DimOp::LogSumExp => "logsumexp_dim",
        }
    }
    fn backward(&self, i: &[Tensor], out: &Tensor, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let gx = match self.op {
            DimOp::ScaledSum(s) => expand_raw(g, &i[0], None, self.dim, s)?,
            // d/dx logsumexp = softmax = exp(x - lse).
            DimOp::LogSumExp => expand_raw(g, &i[0], Some(out), self.dim, 1.0)?,
        };
        Ok(vec![Some(gx)])
    }
}

fn reduce_dim(x: &Tensor, dim: usize, op: DimOp, name: &'static str) -> Result<Tensor> {
    Ok(reduce_dim_raw(x, dim, op, name)?.record(DimBack { dim, op }, &[x]))
}

/// Sum along `dim` (removed from the shape; a 1-D input gives shape [1]).
pub fn sum_dim(x: &Tensor, dim: usize) -> Result<Tensor> {
    reduce_dim(x, dim, DimOp::ScaledSum(1.0), "sum_dim")
}

/// Mean along `dim` (removed from the shape; a 1-D input gives shape [1]).
pub fn mean_dim(x: &Tensor, dim: usize) -> Result<Tensor> {
    let (_, n, _) = outer_n_inner(x.shape(), dim, "mean_dim")?;
    if n == 0 {
        return invalid(
            "mean_dim",
            format!("mean over an empty dimension of {:?}", x.shape()),
        );
    }
    reduce_dim(x, dim, DimOp::ScaledSum(1.0 / n as f32), "mean_dim")
}

/// log(sum(exp(x))) along `dim` (removed from the shape), computed stably.
pub fn logsumexp_dim(x: &Tensor, dim: usize) -> Result<Tensor> {
    reduce_dim(x, dim, DimOp::LogSumExp, "logsumexp_dim")
}
