//! Batch norm 2d: training mode (batch statistics, running statistics updated in place by
//! momentum, PyTorch's unbiased running variance) and eval mode; forward and backward on both
//! devices. GPU: `shaders/batchnorm.wgsl` (per-channel workgroup reductions + one elementwise pass).
//!
//! Both devices save the same per-channel statistics for backward: a tensor whose first 2C
//! values are [mean | invstd] (the GPU's holds the affine coefficients after them).

use crate::engine::error::{invalid, shape_err, Result};
use crate::engine::gpu::{groups_for, to_u32, GpuBuffer, GpuContext, Kernel, OpCodes};
use crate::engine::launch::by_device;
use crate::engine::split;
use crate::engine::tape::Backward;
use crate::engine::tensor::Tensor;
use crate::engine::{cpu, host_pool};
use crate::{kernel, kernel_params};
use rayon::prelude::*;
use std::ops::Range;
use std::sync::Arc;

const BATCH_STATS: Kernel = kernel!(
    "batchnorm.wgsl",
    "bn_batch_stats",
    [Read, Read, Read, Read, Read, Read, ReadWrite]
);
const EVAL_STATS: Kernel = kernel!(
    "batchnorm.wgsl",
    "bn_eval_stats",
    [Read, Read, Read, Read, Read, Read, ReadWrite]
);
const AFFINE: Kernel = kernel!(
    "batchnorm.wgsl",
    "bn_affine",
    [Read, Read, Read, Read, Read, Read, ReadWrite, ReadWrite]
);
const GRAD_REDUCE: Kernel = kernel!(
    "batchnorm.wgsl",
    "bn_grad_reduce",
    [Read, Read, Read, Read, Read, Read, ReadWrite, ReadWrite]
);
const BATCH_STATS_SERIAL: Kernel = kernel!(
    "batchnorm.wgsl",
    "bn_batch_stats_serial",
    [Read, Read, Read, Read, Read, Read, ReadWrite]
);
const GRAD_REDUCE_SERIAL: Kernel = kernel!(
    "batchnorm.wgsl",
    "bn_grad_reduce_serial",
    [Read, Read, Read, Read, Read, Read, ReadWrite, ReadWrite]
);
const AFFINE_PLANES: Kernel = kernel!(
    "batchnorm.wgsl",
    "bn_affine_planes",
    [Read, Read, Read, Read, Read, Read, ReadWrite, ReadWrite]
);
const COMBINE_STATS: Kernel = kernel!(
    "batchnorm.wgsl",
    "bn_combine_stats",
    [Read, Read, Read, Read, Read, Read, ReadWrite]
);
const COMBINE_GRADS: Kernel = kernel!(
    "batchnorm.wgsl",
    "bn_combine_grads",
    [Read, Read, Read, Read, Read, Read, ReadWrite, ReadWrite]
);

/// Slots of C values in the GPU forward `chan` buffer and the backward reduction's output.
const FWD_SLOTS: usize = 8;
const FWD_COEF_OFF: usize = 4;
const BWD_SLOTS: usize = 6;
const BWD_COEF_OFF: usize = 2;

/// Elements of one channel each thread of the affine pass handles (as in the shader).
const AFFINE_ITEMS: usize = 16;

/// Channels of at most this many values are reduced by one invocation each (the `_serial`
/// kernels), planes of at most this many pixels get one invocation each in the affine pass
/// (every plane on CPU adapters; benches/RESULTS.md, "Figures that were code comments"): below these
/// sizes a 256-lane workgroup per channel is mostly idle lanes and barriers.
const SERIAL_CHANNEL_VALUES: usize = 2048;
const PLANE_PER_INVOCATION: usize = 64;

kernel_params! {
    pub struct BatchNormParams for ["batchnorm.wgsl"] {
        /// Batch.
        n: u32,
        /// Channels.
        c: u32,
        /// H * W.
        hw: u32,
        /// Planes one workgroup pass covers.
        planes: u32,
        /// Positions of a plane one workgroup pass covers.
        hwc: u32,
        /// A [`FORM_CODES`] entry for the affine pass, a [`MODE_CODES`] one for the reductions.
        form: u32,
        /// Offset of the a coefficients in the per-channel buffer.
        coef_off: u32,
        momentum: f32,
        eps: f32,
    }
}

/// The forms of the affine pass (see the shader): its `FORM_*` constants.
pub const FORM_CODES: OpCodes = OpCodes {
    file: "batchnorm.wgsl",
    prefix: "FORM_",
    switch_fn: None,
    codes: &[("FORWARD", 0), ("SCALE_U", 1), ("TRAIN_DX", 2)],
};
const FORM_FORWARD: u32 = FORM_CODES.code("FORWARD");
const FORM_SCALE_U: u32 = FORM_CODES.code("SCALE_U");
const FORM_TRAIN_DX: u32 = FORM_CODES.code("TRAIN_DX");

/// The reduction modes: the shader's `MODE_*` constants. `PARTIAL` gives per-chunk partial
/// results, when x exceeds one binding (see `engine::split`).
pub const MODE_CODES: OpCodes = OpCodes {
    file: "batchnorm.wgsl",
    prefix: "MODE_",
    switch_fn: None,
    codes: &[("TRAIN", 0), ("EVAL", 1), ("PARTIAL", 2)],
};
const MODE_TRAIN: u32 = MODE_CODES.code("TRAIN");
const MODE_EVAL: u32 = MODE_CODES.code("EVAL");
const MODE_PARTIAL: u32 = MODE_CODES.code("PARTIAL");

/// Dimensions of x and the checks on the per-channel tensors.
fn check(
    op: &'static str,
    x: &Tensor,
    per_channel: &[(&str, &Tensor)],
) -> Result<(usize, usize, usize)> {
    let (n, c, h, w) = x.dims4(op)?;
    for (name, t) in per_channel {
        if t.shape() != [c] {
            return shape_err(
                op,
                format!(
                    "{name} has shape {:?}, expected [{c}] for input {:?}",
                    t.shape(),
                    x.shape()
                ),
            );
        }
    }
    Ok((n, c, h * w))
}

/// Uniform words shared by every batch-norm kernel, and how planes map onto a workgroup.
struct Layout {
    n: usize,
    c: usize,
    hw: usize,
    planes: usize,
    hwc: usize,
}

impl Layout {
    fn new(n: usize, c: usize, hw: usize) -> Layout {
        let hwc = hw.clamp(1, 256);
        Layout {
            n,
            c,
            hw,
            planes: (256 / hwc).max(1),
            hwc,
        }
    }

    /// Whether a reduction over each channel runs serially (one invocation per channel).
    fn serial(&self) -> bool {
        self.n * self.hw <= SERIAL_CHANNEL_VALUES
    }

    /// Dispatches a per-channel reduction: `kernel` (one workgroup per channel) or `serial`.
    fn reduce(
        &self,
        ctx: &GpuContext,
        kernels: (&Kernel, &Kernel),
        params: &BatchNormParams,
        b: &[&GpuBuffer],
    ) -> Result<()> {
        if self.serial() {
            ctx.dispatch(kernels.1, params, b, groups_for(self.c, 64)?)
        } else {
            ctx.dispatch(kernels.0, params, b, to_u32(self.c)?)
        }
    }

    /// Dispatches the affine pass over this layout.
    fn affine(&self, ctx: &GpuContext, params: &BatchNormParams, b: &[&GpuBuffer]) -> Result<()> {
        if self.hw <= PLANE_PER_INVOCATION || ctx.policy().tuned_for_cpu_adapter() {
            ctx.dispatch(&AFFINE_PLANES, params, b, groups_for(self.n * self.c, 64)?)
        } else {
            ctx.dispatch3(&AFFINE, params, b, self.affine_grid()?)
        }
    }

    fn params(
        &self,
        form: u32,
        coef_off: usize,
        momentum: f32,
        eps: f32,
    ) -> Result<BatchNormParams> {
        Ok(BatchNormParams {
            n: to_u32(self.n)?,
            c: to_u32(self.c)?,
            hw: to_u32(self.hw)?,
            planes: to_u32(self.planes)?,
            hwc: to_u32(self.hwc)?,
            form,
            coef_off: to_u32(coef_off * self.c)?,
            momentum,
            eps,
        })
    }

    /// Grid of the affine pass: chunks of a plane, channels, groups of planes; each thread
    /// handles AFFINE_ITEMS elements along x (one plane) or z (several planes).
    fn affine_grid(&self) -> Result<[u32; 3]> {
        Ok(if self.planes == 1 {
            [
                to_u32(self.hw.div_ceil(256 * AFFINE_ITEMS))?,
                to_u32(self.c)?,
                to_u32(self.n)?,
            ]
        } else {
            [
                1,
                to_u32(self.c)?,
                to_u32(self.n.div_ceil(self.planes * AFFINE_ITEMS))?,
            ]
        })
    }
}

/// Batch chunks when an [N, C, HW] tensor exceeds one binding (see `engine::split`).
fn batch_chunks(ctx: &GpuContext, lay: &Layout) -> Result<Option<Vec<Range<usize>>>> {
    split::batch_ranges(ctx, "batch_norm", lay.n, &[lay.c * lay.hw])
}

/// out = affine(u, v) per channel with the coefficients in `chan` (see the shader's forms),
/// over batch chunks when the operands exceed one binding.
fn gpu_affine(
    ctx: &Arc<GpuContext>,
    lay: &Layout,
    form: u32,
    coef_off: usize,
    u_op: &GpuBuffer,
    v_op: &GpuBuffer,
    chan: &GpuBuffer,
) -> Result<GpuBuffer> {
    let out = ctx.alloc(lay.n * lay.c * lay.hw)?;
    let Some(ranges) = batch_chunks(ctx, lay)? else {
        let params = lay.params(form, coef_off, 0.0, 0.0)?;
        lay.affine(
            ctx,
            &params,
            &[u_op, v_op, u_op, u_op, u_op, u_op, chan, &out],
        )?;
        return Ok(out);
    };
    let per = lay.c * lay.hw;
    for r in ranges {
        let part = Layout::new(r.len(), lay.c, lay.hw);
        let (start, len) = (r.start * per, r.len() * per);
        let (u, v) = (
            split::read_range(u_op, start, len)?,
            split::read_range(v_op, start, len)?,
        );
        // An unaligned chunk is written to its own buffer, then copied into place.
        let direct = split::is_aligned(&out, start);
        let o = if direct {
            out.view(start, len)?
        } else {
            ctx.alloc(len)?
        };
        let params = part.params(form, coef_off, 0.0, 0.0)?;
        part.affine(ctx, &params, &[&u, &v, &u, &u, &u, &u, chan, &o])?;
        if !direct {
            ctx.copy(&o, 0, &out, start, len);
        }
    }
    Ok(out)
}

/// The forward per-channel buffer of training mode (batch statistics, new running statistics,
/// affine coefficients). When x exceeds one binding, each batch chunk's (count, mean, M2) is
/// reduced separately and the triples merged.
#[allow(clippy::too_many_arguments)]
fn gpu_batch_stats(
    ctx: &Arc<GpuContext>,
    lay: &Layout,
    x: &GpuBuffer,
    gamma: &GpuBuffer,
    beta: &GpuBuffer,
    rm: &GpuBuffer,
    rv: &GpuBuffer,
    momentum: f32,
    eps: f32,
) -> Result<GpuBuffer> {
    let c = lay.c;
    let chan = ctx.alloc(FWD_SLOTS * c)?;
    let Some(ranges) = batch_chunks(ctx, lay)? else {
        let b = [x, x, gamma, beta, rm, rv, &chan];
        let params = lay.params(MODE_TRAIN, 0, momentum, eps)?;
        lay.reduce(ctx, (&BATCH_STATS, &BATCH_STATS_SERIAL), &params, &b)?;
        return Ok(chan);
    };
    let partial = ctx.alloc(3 * c * ranges.len())?;
    let per = c * lay.hw;
    for (j, r) in ranges.iter().enumerate() {
        let part = Layout::new(r.len(), c, lay.hw);
        let xc = split::read_range(x, r.start * per, r.len() * per)?;
        let params = part.params(MODE_PARTIAL, 3 * j, momentum, eps)?;
        let b = [&xc, &xc, gamma, beta, rm, rv, &partial];
        part.reduce(ctx, (&BATCH_STATS, &BATCH_STATS_SERIAL), &params, &b)?;
    }
    let merge = Layout::new(ranges.len(), c, lay.hw);
    let b = [&partial, &partial, gamma, beta, rm, rv, &chan];
    let params = merge.params(MODE_TRAIN, 0, momentum, eps)?;
    ctx.dispatch(&COMBINE_STATS, &params, &b, groups_for(c, 64)?)?;
    Ok(chan)
}

/// The backward reduction [dgamma | dbeta | a | b | m | d] (see the shader), chunk by chunk
/// when x and g exceed one binding.
fn gpu_grad_reduce(
    ctx: &Arc<GpuContext>,
    lay: &Layout,
    mode: u32,
    x: &GpuBuffer,
    g: &GpuBuffer,
    gamma: &GpuBuffer,
    chan: &GpuBuffer,
) -> Result<GpuBuffer> {
    let c = lay.c;
    let red = ctx.alloc(BWD_SLOTS * c)?;
    let Some(ranges) = batch_chunks(ctx, lay)? else {
        let b = [x, g, gamma, gamma, gamma, gamma, chan, &red];
        let params = lay.params(mode, 0, 0.0, 0.0)?;
        lay.reduce(ctx, (&GRAD_REDUCE, &GRAD_REDUCE_SERIAL), &params, &b)?;
        return Ok(red);
    };
    let partial = ctx.alloc(2 * c * ranges.len())?;
    let per = c * lay.hw;
    for (j, r) in ranges.iter().enumerate() {
        let part = Layout::new(r.len(), c, lay.hw);
        let (start, len) = (r.start * per, r.len() * per);
        let (xc, gc) = (
            split::read_range(x, start, len)?,
            split::read_range(g, start, len)?,
        );
        let b = [&xc, &gc, gamma, gamma, gamma, gamma, chan, &partial];
        let params = part.params(MODE_PARTIAL, 2 * j, 0.0, 0.0)?;
        part.reduce(ctx, (&GRAD_REDUCE, &GRAD_REDUCE_SERIAL), &params, &b)?;
    }
    // The merge reads the element count per channel from the hw word.
    let merge = Layout::new(ranges.len(), c, lay.n * lay.hw);
    let b = [&partial, &partial, gamma, gamma, gamma, gamma, chan, &red];
    let params = merge.params(mode, 0, 0.0, 0.0)?;
    ctx.dispatch(&COMBINE_GRADS, &params, &b, groups_for(c, 64)?)?;
    Ok(red)
}

// ------------------------------------------------------------------ CPU reference

/// The planes (one per image) of channel `c` of an [N, C, HW] array, each contiguous.
fn channel_planes(x: &[f32], lay: (usize, usize, usize), c: usize) -> impl Iterator<Item = &[f32]> {
    let (n, ch, hw) = lay;
    (0..n).map(move |b| &x[(b * ch + c) * hw..(b * ch + c + 1) * hw])
}

/// Mean and biased variance of each channel (f64 accumulation, two passes).
fn cpu_batch_stats(x: &[f32], lay: (usize, usize, usize)) -> Vec<(f64, f64)> {
    let count = (lay.0 * lay.2) as f64;
    // One channel per task, its planes in image order: a fixed summation order.
    (0..lay.1)
        .into_par_iter()
        .map(|c| {
            let mean = channel_planes(x, lay, c)
                .map(|p| cpu::lane_sum_f64(p, |v| v as f64))
                .sum::<f64>()
                / count;
            let var = channel_planes(x, lay, c)
                .map(|p| cpu::lane_sum_f64(p, |v| (v as f64 - mean).powi(2)))
                .sum::<f64>()
                / count;
            (mean, var)
        })
        .collect()
}

/// y = gamma * (x - mean) * invstd + beta with per-channel mean and invstd.
fn cpu_normalize(
    x: &[f32],
    lay: (usize, usize, usize),
    mean: &[f32],
    invstd: &[f32],
    gamma: &[f32],
    beta: &[f32],
) -> Vec<f32> {
    let mut y = host_pool::for_overwrite(x.len());
    // One (image, channel) plane per task.
    y.par_chunks_mut(lay.2.max(1))
        .zip(x.par_chunks(lay.2.max(1)))
        .enumerate()
        .with_min_len(cpu::rows_per_task(lay.2))
        .for_each(|(plane, (y, x))| {
            let c = plane % lay.1;
            let (m, s, g, b) = (mean[c], invstd[c], gamma[c], beta[c]);
            for (y, &x) in y.iter_mut().zip(x) {
                *y = g * ((x - m) * s) + b;
            }
        });
    y
}

// ------------------------------------------------------------------ training mode

/// Training-mode batch norm over x [N, C, H, W] with affine gamma, beta [C]. Updates
/// running_mean and running_var [C] in place: r = (1 - momentum) * r + momentum * batch_stat.
/// Recorded (gradients for x, gamma, beta).
pub fn batch_norm_train(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    momentum: f32,
    eps: f32,
) -> Result<Tensor> {
    const OP: &str = "batch_norm_train";
    let (n, c, hw) = check(
        OP,
        x,
        &[
            ("gamma", gamma),
            ("beta", beta),
            ("running_mean", running_mean),
            ("running_var", running_var),
        ],
    )?;
    let inputs = [x, gamma, beta, running_mean, running_var];
    if n * hw <= 1 {
        return invalid(
            OP,
            format!(
                "expected more than 1 value per channel when training, got input {:?}",
                x.shape()
            ),
        );
    }
    let lay = (n, c, hw);
    // Batch norm splits itself (whole-batch statistics): the helper only picks the device.
    let (y, saved) = by_device(
        OP,
        &inputs,
        || {
            let xv = x.cpu()?;
            let stats = cpu_batch_stats(&xv, lay);
            let count = (n * hw) as f64;
            let mean: Vec<f32> = stats.iter().map(|s| s.0 as f32).collect();
            let invstd: Vec<f32> = stats
                .iter()
                .map(|s| (1.0 / (s.1 + eps as f64).sqrt()) as f32)
                .collect();
            let y = cpu_normalize(&xv, lay, &mean, &invstd, &gamma.cpu()?, &beta.cpu()?);
            {
                let mut rm = running_mean.cpu_mut()?;
                let mut rv = running_var.cpu_mut()?;
                for (ch, &(m, v)) in stats.iter().enumerate() {
                    let unbiased = (v * count / (count - 1.0)) as f32;
                    rm[ch] = (1.0 - momentum) * rm[ch] + momentum * m as f32;
                    rv[ch] = (1.0 - momentum) * rv[ch] + momentum * unbiased;
                }
            }
            let saved = Tensor::from_cpu([mean, invstd].concat(), &[2 * c])?;
            Ok((Tensor::from_cpu(y, x.shape())?, saved))
        },
        |ctx| {
            let l = Layout::new(n, c, hw);
            let xb = x.gpu()?;
            let (rm, rv) = (running_mean.gpu()?, running_var.gpu()?);
            let (g, b) = (gamma.gpu()?, beta.gpu()?);
            let chan = gpu_batch_stats(ctx, &l, xb, g, b, rm, rv, momentum, eps)?;
            // In-order copies after the statistics kernel: the in-place running-stat update,
            // outside autograd.
            ctx.copy(&chan, 2 * c, rm, 0, c);
            ctx.copy(&chan, 3 * c, rv, 0, c);
            let y = gpu_affine(ctx, &l, FORM_FORWARD, FWD_COEF_OFF, xb, xb, &chan)?;
            Ok((
                Tensor::from_gpu(y, x.shape())?,
                Tensor::from_gpu(chan, &[FWD_SLOTS * c])?,
            ))
        },
    )?;
    Ok(y.record(BatchNormBack { saved, train: true }, &[x, gamma, beta]))
}

// ------------------------------------------------------------------ eval mode

/// Eval-mode batch norm with the running statistics. Recorded (gradients for x, gamma, beta).
pub fn batch_norm_eval(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    eps: f32,
) -> Result<Tensor> {
    const OP: &str = "batch_norm_eval";
    let (n, c, hw) = check(
        OP,
        x,
        &[
            ("gamma", gamma),
            ("beta", beta),
            ("running_mean", running_mean),
            ("running_var", running_var),
        ],
    )?;
    let inputs = [x, gamma, beta, running_mean, running_var];
    // The affine pass splits itself (see `gpu_affine`): the helper only picks the device.
    let (y, saved) = by_device(
        OP,
        &inputs,
        || {
            let mean = running_mean.cpu()?.clone();
            let invstd: Vec<f32> = running_var
                .cpu()?
                .iter()
                .map(|&v| 1.0 / (v + eps).sqrt())
                .collect();
            let y = cpu_normalize(
                &x.cpu()?,
                (n, c, hw),
                &mean,
                &invstd,
                &gamma.cpu()?,
                &beta.cpu()?,
            );
            let saved = Tensor::from_cpu([mean, invstd].concat(), &[2 * c])?;
            Ok((Tensor::from_cpu(y, x.shape())?, saved))
        },
        |ctx| {
            let l = Layout::new(n, c, hw);
            let xb = x.gpu()?;
            let chan = ctx.alloc(FWD_SLOTS * c)?;
            let g = gamma.gpu()?;
            let b = [
                g,
                g,
                g,
                beta.gpu()?,
                running_mean.gpu()?,
                running_var.gpu()?,
                &chan,
            ];
            let params = l.params(MODE_EVAL, 0, 0.0, eps)?;
            ctx.dispatch(&EVAL_STATS, &params, &b, groups_for(c, 64)?)?;
            let y = gpu_affine(ctx, &l, FORM_FORWARD, FWD_COEF_OFF, xb, xb, &chan)?;
            Ok((
                Tensor::from_gpu(y, x.shape())?,
                Tensor::from_gpu(chan, &[FWD_SLOTS * c])?,
            ))
        },
    )?;
    Ok(y.record(
        BatchNormBack {
            saved,
            train: false,
        },
        &[x, gamma, beta],
    ))
}

// ------------------------------------------------------------------ backward

/// Backward of both modes. `saved` starts with [mean | invstd] per channel (batch statistics in
/// training mode, running ones in eval mode).
struct BatchNormBack {
    saved: Tensor,
    train: bool,
}

impl Backward for BatchNormBack {
    fn name(&self) -> &'static str {
        if self.train {
            "batch_norm_train"
        } else {
            "batch_norm_eval"
        }
    }

    fn backward(&self, i: &[Tensor], _o: &Tensor, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let (x, gamma) = (&i[0], &i[1]);
        let (n, c, h, w) = x.dims4("batch_norm backward")?;
        let want_dx = x.requires_grad();
        let want_affine = i[1].requires_grad() || i[2].requires_grad();
        // The GPU passes split themselves (`gpu_affine`, `gpu_grad_reduce`).
        let (dx, dgamma, dbeta) = by_device(
            "batch_norm backward",
            &[x, g, &self.saved],
            || self.cpu_backward(x, gamma, g, (n, c, h * w), want_dx, want_affine),
            |ctx| {
                let lay = Layout::new(n, c, h * w);
                self.gpu_backward(ctx, x, gamma, g, lay, want_dx, want_affine)
            },
        )?;
        Ok(vec![
            dx,
            dgamma.filter(|_| i[1].requires_grad()),
            dbeta.filter(|_| i[2].requires_grad()),
        ])
    }
}

type Grads = (Option<Tensor>, Option<Tensor>, Option<Tensor>);

impl BatchNormBack {
    fn cpu_backward(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        g: &Tensor,
        lay: (usize, usize, usize),
        want_dx: bool,
        want_affine: bool,
    ) -> Result<Grads> {
        let (xv, gv, gam, saved) = (x.cpu()?, g.cpu()?, gamma.cpu()?, self.saved.cpu()?);
        let c = lay.1;
        let (mean, invstd) = saved.split_at(c);
        let count = (lay.0 * lay.2) as f64;
        // Per channel: sum g and sum g * xhat (f64 accumulation). Eval-mode dx needs neither,
        // so an attack's input gradient (frozen affine) skips them.
        let need_sums = self.train || want_affine;
        let sums: Vec<(f64, f64)> = (0..if need_sums { c } else { 0 })
            .into_par_iter()
            .map(|ch| {
                let (m, s) = (mean[ch], invstd[ch]);
                let planes = channel_planes(&xv, lay, ch).zip(channel_planes(&gv, lay, ch));
                planes.fold((0.0, 0.0), |(sg, sgx), (xp, gp)| {
                    (
                        sg + cpu::lane_sum_f64(gp, |g| g as f64),
                        sgx + cpu::lane_sum2_f64(xp, gp, |x, g| g as f64 * ((x - m) * s) as f64),
                    )
                })
            })
            .collect();
        let dx = if want_dx {
            // Every element is written below.
            let mut dx = host_pool::for_overwrite(xv.len());
            let hw = lay.2.max(1);
            // One (image, channel) plane per task (several when planes are small).
            dx.par_chunks_mut(hw)
                .enumerate()
                .with_min_len(cpu::rows_per_task(hw))
                .for_each(|(plane, dx)| {
                    let ch = plane % c;
                    let (m, s) = (mean[ch], invstd[ch]);
                    let scale = gam[ch] * s;
                    let start = plane * hw;
                    let (xp, gp) = (&xv[start..start + dx.len()], &gv[start..start + dx.len()]);
                    if self.train {
                        let (mean_g, mean_gx) =
                            ((sums[ch].0 / count) as f32, (sums[ch].1 / count) as f32);
                        for ((d, &x), &g) in dx.iter_mut().zip(xp).zip(gp) {
                            *d = scale * (g - mean_g - ((x - m) * s) * mean_gx);
                        }
                    } else {
                        for (d, &g) in dx.iter_mut().zip(gp) {
                            *d = scale * g;
                        }
                    }
                });
            Some(Tensor::from_cpu(dx, x.shape())?)
        } else {
            None
        };
        let (dgamma, dbeta) = if want_affine {
            let dgamma = sums.iter().map(|s| s.1 as f32).collect();
            let dbeta = sums.iter().map(|s| s.0 as f32).collect();
            (
                Some(Tensor::from_cpu(dgamma, &[c])?),
                Some(Tensor::from_cpu(dbeta, &[c])?),
            )
        } else {
            (None, None)
        };
        Ok((dx, dgamma, dbeta))
    }

    #[allow(clippy::too_many_arguments)]
    fn gpu_backward(
        &self,
        ctx: &Arc<GpuContext>,
        x: &Tensor,
        gamma: &Tensor,
        g: &Tensor,
        lay: Layout,
        want_dx: bool,
        want_affine: bool,
    ) -> Result<Grads> {
        let (xb, gb, chan) = (x.gpu()?, g.gpu()?, self.saved.gpu()?);
        let c = lay.c;
        // Eval-mode dx needs no reduction: it is the forward's per-channel scale times g.
        if !self.train && !want_affine {
            let dx = gpu_affine(ctx, &lay, FORM_SCALE_U, FWD_COEF_OFF, gb, gb, chan)?;
            return Ok((Some(Tensor::from_gpu(dx, x.shape())?), None, None));
        }
        let mode = if self.train { MODE_TRAIN } else { MODE_EVAL };
        let red = gpu_grad_reduce(ctx, &lay, mode, xb, gb, gamma.gpu()?, chan)?;
        let dx = match (want_dx, self.train) {
            (false, _) => None,
            (true, true) => Some(gpu_affine(
                ctx,
                &lay,
                FORM_TRAIN_DX,
                BWD_COEF_OFF,
                gb,
                xb,
                &red,
            )?),
            (true, false) => Some(gpu_affine(
                ctx,
                &lay,
                FORM_SCALE_U,
                FWD_COEF_OFF,
                gb,
                gb,
                chan,
            )?),
        };
        let dx = dx.map(|d| Tensor::from_gpu(d, x.shape())).transpose()?;
        let (dgamma, dbeta) = if want_affine {
            let (dgamma, dbeta) = (ctx.alloc(c)?, ctx.alloc(c)?);
            ctx.copy(&red, 0, &dgamma, 0, c);
            ctx.copy(&red, c, &dbeta, 0, c);
            (
                Some(Tensor::from_gpu(dgamma, &[c])?),
                Some(Tensor::from_gpu(dbeta, &[c])?),
            )
        } else {
            (None, None)
        };
        Ok((dx, dgamma, dbeta))
    }
}
