//! Pooling with PyTorch semantics: max and average pool 2d (`ceil_mode`, `count_include_pad`),
//! global average and global max pool; forward and backward on both devices.
//! GPU: `shaders/pool.wgsl`.
//!
//! Max pool saves the argmax of every output (index within its plane, f32-encoded, first
//! maximum on ties) so that backward routes each gradient without recomputing the windows.
//! Both backward passes gather per input element, so the GPU needs no atomics.

use crate::engine::error::{invalid, Result};
use crate::engine::gpu::{groups_for, to_u32, Kernel};
use crate::engine::launch::Launch;
use crate::engine::tape::{self, Backward};
use crate::engine::tensor::{numel, Tensor};
use crate::engine::{cpu, host_pool};
use crate::{kernel, kernel_params};
use rayon::prelude::*;

const MAX_FWD: Kernel = kernel!("pool.wgsl", "max_pool_fwd", [Read, ReadWrite, ReadWrite]);
const AVG_FWD: Kernel = kernel!("pool.wgsl", "avg_pool_fwd", [Read, ReadWrite]);
const MAX_BWD: Kernel = kernel!("pool.wgsl", "max_pool_bwd", [Read, ReadWrite, ReadWrite]);
const AVG_BWD: Kernel = kernel!("pool.wgsl", "avg_pool_bwd", [Read, ReadWrite]);

kernel_params! {
    pub struct PoolParams for ["pool.wgsl"] {
        /// Threads wanted: outputs (forward) or inputs (backward).
        total: u32,
        h: u32,
        w: u32,
        oh: u32,
        ow: u32,
        kh: u32,
        kw: u32,
        sh: u32,
        sw: u32,
        ph: u32,
        pw: u32,
        /// Average pool: 1 to divide by the window clipped to the padded input.
        include_pad: u32,
    }
}

/// PyTorch's `MaxPool2d` / `AvgPool2d` hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pool2dParams {
    pub kernel: (usize, usize),
    pub stride: (usize, usize),
    pub padding: (usize, usize),
    pub ceil_mode: bool,
    /// Average pool only: divide by the full window including padding (PyTorch's default).
    pub count_include_pad: bool,
}

impl Pool2dParams {
    /// A square window with the given stride and padding, floor mode, counting padding.
    pub fn square(kernel: usize, stride: usize, padding: usize) -> Pool2dParams {
        Pool2dParams {
            kernel: (kernel, kernel),
            stride: (stride, stride),
            padding: (padding, padding),
            ceil_mode: false,
            count_include_pad: true,
        }
    }
}

/// PyTorch's `pooling_output_shape` (dilation 1): floor or ceil division, and in ceil mode the
/// last window must start inside the input or its left padding.
pub fn pool_output_size(
    input: usize,
    kernel: usize,
    stride: usize,
    pad: usize,
    ceil_mode: bool,
) -> Option<usize> {
    if kernel == 0 || stride == 0 {
        return None;
    }
    let span = (input + 2 * pad) as i64 - kernel as i64;
    let rounding = if ceil_mode { stride as i64 - 1 } else { 0 };
    let mut out = (span + rounding).div_euclid(stride as i64) + 1;
    if ceil_mode && out >= 1 && (out - 1) * stride as i64 >= (input + pad) as i64 {
        out -= 1;
    }
    (out >= 1).then_some(out as usize)
}

/// Everything a pooling kernel needs to know about one call.
#[derive(Clone, Copy, Debug)]
struct Geometry {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
    p: Pool2dParams,
}

/// One axis of an output's window as PyTorch computes it: the clipped [start, end) and the
/// length of the window clipped to the padded input (avg pool's count_include_pad divisor).
fn window(o: usize, stride: usize, pad: usize, k: usize, len: usize) -> (usize, usize, usize) {
    let start = (o * stride) as i64 - pad as i64;
    let end_padded = (start + k as i64).min((len + pad) as i64);
    let padded_len = (end_padded - start) as usize;
    (
        start.max(0) as usize,
        end_padded.min(len as i64) as usize,
        padded_len,
    )
}

impl Geometry {
    fn new(op: &'static str, x: &Tensor, p: Pool2dParams) -> Result<Geometry> {
        let (n, c, h, w) = x.dims4(op)?;
        let (kh, kw) = p.kernel;
        let (ph, pw) = p.padding;
        if kh == 0 || kw == 0 || p.stride.0 == 0 || p.stride.1 == 0 {
            return invalid(op, format!("kernel and stride must be positive, got {p:?}"));
        }
        if ph > kh / 2 || pw > kw / 2 {
            return invalid(
                op,
                format!("padding should be at most half of the kernel size, got {p:?}"),
            );
        }
        let oh = pool_output_size(h, kh, p.stride.0, ph, p.ceil_mode);
        let ow = pool_output_size(w, kw, p.stride.1, pw, p.ceil_mode);
        let (Some(oh), Some(ow)) = (oh, ow) else {
            return invalid(op, format!("input {:?} is too small for {p:?}", x.shape()));
        };
        // Argmax indices are stored as f32 and must be exact.
        if h * w >= 1 << 24 {
            return invalid(
                op,
                format!("planes of {h}x{w} are too large to index in f32"),
            );
        }
        Ok(Geometry {
            n,
            c,
            h,
            w,
            oh,
            ow,
            p,
        })
    }

    fn out_shape(&self) -> [usize; 4] {
        [self.n, self.c, self.oh, self.ow]
    }

    fn in_shape(&self) -> [usize; 4] {
        [self.n, self.c, self.h, self.w]
    }

    /// The same pooling over a chunk of `n` samples.
    fn with_batch(&self, n: usize) -> Geometry {
        Geometry { n, ..*self }
    }

    /// A 2x2 window at stride 2 whose every window lies inside the plane (no padding and,
    /// with ceil mode, no window hanging over the edge): [`max_plane_2x2`]'s case.
    fn is_plain_2x2(&self) -> bool {
        let p = &self.p;
        p.kernel == (2, 2)
            && p.stride == (2, 2)
            && p.padding == (0, 0)
            && 2 * self.oh <= self.h
            && 2 * self.ow <= self.w
    }

    fn planes(&self) -> usize {
        self.n * self.c
    }

    fn window_y(&self, oy: usize) -> (usize, usize, usize) {
        window(
            oy,
            self.p.stride.0,
            self.p.padding.0,
            self.p.kernel.0,
            self.h,
        )
    }

    fn window_x(&self, ox: usize) -> (usize, usize, usize) {
        window(
            ox,
            self.p.stride.1,
            self.p.padding.1,
            self.p.kernel.1,
            self.w,
        )
    }

    fn avg_divisor(&self, wy: (usize, usize, usize), wx: (usize, usize, usize)) -> f32 {
        if self.p.count_include_pad {
            (wy.2 * wx.2) as f32
        } else {
            ((wy.1 - wy.0) * (wx.1 - wx.0)) as f32
        }
    }

    /// The parameters of `shaders/pool.wgsl`, for `total` threads.
    fn params(&self, total: usize) -> Result<PoolParams> {
        let p = &self.p;
        Ok(PoolParams {
            total: to_u32(total)?,
            h: to_u32(self.h)?,
            w: to_u32(self.w)?,
            oh: to_u32(self.oh)?,
            ow: to_u32(self.ow)?,
            kh: to_u32(p.kernel.0)?,
            kw: to_u32(p.kernel.1)?,
            sh: to_u32(p.stride.0)?,
            sw: to_u32(p.stride.1)?,
            ph: to_u32(p.padding.0)?,
            pw: to_u32(p.padding.1)?,
            include_pad: p.count_include_pad as u32,
        })
    }

    /// Calls `f(oy, ox, window_y, window_x)` for every output of one plane, in raster order.
    fn for_each_plane_output(
        &self,
        mut f: impl FnMut(usize, usize, (usize, usize, usize), (usize, usize, usize)),
    ) {
        for oy in 0..self.oh {
            let wy = self.window_y(oy);
            for ox in 0..self.ow {
                f(oy, ox, wy, self.window_x(ox));
            }
        }
    }
}

// ------------------------------------------------------------------ max pool

/// Max pool values and the argmax (index within the plane) of every output. Not recorded.
fn max_pool_raw(x: &Tensor, g: &Geometry) -> Result<(Tensor, Tensor)> {
    let shape = g.out_shape();
    let total = g.planes() * g.oh * g.ow;
    let launch = Launch::per_sample("max_pool2d", &[x]);
    let [out, arg] = launch.run(
        [&shape, &shape],
        || {
            let xv = x.cpu()?;
            // Every output and argmax is written below.
            let (mut out, mut arg) = (
                host_pool::for_overwrite(total),
                host_pool::for_overwrite(total),
            );
            // One plane per task.
            let per_plane = (g.oh * g.ow).max(1);
            let plain_2x2 = g.is_plain_2x2();
            out.par_chunks_mut(per_plane)
                .zip(arg.par_chunks_mut(per_plane))
                .enumerate()
                .with_min_len(cpu::rows_per_task(g.h * g.w))
                .for_each(|(plane, (out, arg))| {
                    let x_plane = &xv[plane * g.h * g.w..(plane + 1) * g.h * g.w];
                    if plain_2x2 {
                        return max_plane_2x2(g, x_plane, out, arg);
                    }
                    let mut o = 0;
                    g.for_each_plane_output(|_, _, wy, wx| {
                        let (mut best, mut best_at) = (f32::NEG_INFINITY, wy.0 * g.w + wx.0);
                        for y in wy.0..wy.1 {
                            for x in wx.0..wx.1 {
                                let v = x_plane[y * g.w + x];
                                // Strictly greater keeps the first maximum; NaN wins (PyTorch).
                                if v > best || v.is_nan() {
                                    best = v;
                                    best_at = y * g.w + x;
                                }
                            }
                        }
                        out[o] = best;
                        arg[o] = best_at as f32;
                        o += 1;
                    });
                });
            Ok([out, arg])
        },
        |call| {
            let g = g.with_batch(call.batch());
            let total = call.out[0].len();
            let b = [call.input(0)?, &call.out[0], &call.out[1]];
            call.ctx
                .dispatch(&MAX_FWD, &g.params(total)?, &b, groups_for(total, 256)?)
        },
    )?;
    Ok((out, arg))
}

/// [`max_pool_raw`]'s plane for a 2x2 window at stride 2 with every window inside the plane,
/// as straight-line selects without window clipping or integer-to-float conversions in the
/// loop: the window is reduced as a tree, (top pair, bottom pair), whose result equals the
/// general loop's (first maximum kept, the last NaN taken), and the argmax is built in f32
/// (exact below 2^24, far above any plane). About twice as fast as the sequential loop.
fn max_plane_2x2(g: &Geometry, x_plane: &[f32], out: &mut [f32], arg: &mut [f32]) {
    let (w, ow) = (g.w, g.ow);
    let below = w as f32;
    for oy in 0..g.oh {
        let top = 2 * oy * w;
        let (row0, row1) = (
            &x_plane[top..top + 2 * ow],
            &x_plane[top + w..top + w + 2 * ow],
        );
        let out = &mut out[oy * ow..(oy + 1) * ow];
        let arg = &mut arg[oy * ow..(oy + 1) * ow];
        let windows = row0.chunks_exact(2).zip(row1.chunks_exact(2));
        for (ox, ((o, a), (r0, r1))) in out.iter_mut().zip(arg.iter_mut()).zip(windows).enumerate()
        {
            let upper = later_wins(r0[0], 0.0, r0[1], 1.0);
            let lower = later_wins(r1[0], below, r1[1], below + 1.0);
            let (v, at) = later_wins(upper.0, upper.1, lower.0, lower.1);
            *o = v;
            *a = (top + 2 * ox) as i32 as f32 + at;
        }
    }
}

/// Of two (value, position) candidates in visiting order, the later wins when it is strictly
/// greater or NaN: the rule that keeps the first maximum and takes the last NaN.
#[inline(always)]
fn later_wins(v0: f32, at0: f32, v1: f32, at1: f32) -> (f32, f32) {
    let take = (v1 > v0) | v1.is_nan();
    (if take { v1 } else { v0 }, if take { at1 } else { at0 })
}

struct MaxPoolBack {
    argmax: Tensor,
    geom: Geometry,
}

impl Backward for MaxPoolBack {
    fn name(&self) -> &'static str {
        "max_pool2d"
    }
    fn backward(&self, _i: &[Tensor], _o: &Tensor, grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(max_pool_bwd_raw(
            grad,
            &self.argmax,
            &self.geom,
        )?)])
    }
}

/// Max pool's input gradient: each output's gradient routed to its saved argmax.
fn max_pool_bwd_raw(grad: &Tensor, argmax: &Tensor, g: &Geometry) -> Result<Tensor> {
    let launch = Launch::per_sample("max_pool2d backward", &[grad, argmax]);
    let [dx] = launch.run(
        [&g.in_shape()],
        || {
            let (gv, arg) = (grad.cpu()?, argmax.cpu()?);
            let per_out = g.oh * g.ow;
            let plain_2x2 = g.is_plain_2x2();
            // The 2x2 route writes every pixel its windows cover; the scatter adds.
            let covered = plain_2x2 && 2 * g.oh == g.h && 2 * g.ow == g.w;
            let mut dx = if covered {
                host_pool::for_overwrite(numel(&g.in_shape()))
            } else {
                host_pool::zeroed(numel(&g.in_shape()))
            };
            // One plane per task; within it the outputs in order, as serially.
            dx.par_chunks_mut((g.h * g.w).max(1))
                .enumerate()
                .with_min_len(cpu::rows_per_task(g.h * g.w))
                .for_each(|(plane, dx)| {
                    let outputs = plane * per_out..(plane + 1) * per_out;
                    let (gv, arg) = (&gv[outputs.clone()], &arg[outputs]);
                    if plain_2x2 {
                        return route_plane_2x2(g, gv, arg, dx);
                    }
                    for (&gval, &at) in gv.iter().zip(arg) {
                        dx[at as usize] += gval;
                    }
                });
            Ok([dx])
        },
        |call| {
            let g = g.with_batch(call.batch());
            let b = [call.input(0)?, &call.out[0], call.input(1)?];
            // One thread per input row.
            let rows = call.out[0].len() / g.w.max(1);
            call.ctx
                .dispatch(&MAX_BWD, &g.params(rows)?, &b, groups_for(rows, 256)?)
        },
    )?;
    Ok(dx)
}

/// [`max_pool_bwd_raw`]'s plane for [`max_plane_2x2`]'s case: the windows do not overlap, so
/// each window's four inputs are written directly (the gradient at the argmax, 0 elsewhere)
/// instead of scattered through a data-dependent index. `0.0 + g` keeps the scatter's bits (a
/// gradient of -0 lands as +0). Rows and columns no window covers keep their zeros.
fn route_plane_2x2(g: &Geometry, grad: &[f32], arg: &[f32], dx: &mut [f32]) {
    let (w, ow) = (g.w, g.ow);
    let below = w as f32;
    for oy in 0..g.oh {
        let top = 2 * oy * w;
        let (upper, lower) = dx[top..top + 2 * w].split_at_mut(w);
        let windows = upper[..2 * ow]
            .chunks_exact_mut(2)
            .zip(lower[..2 * ow].chunks_exact_mut(2));
        let outputs = grad[oy * ow..(oy + 1) * ow]
            .iter()
            .zip(&arg[oy * ow..(oy + 1) * ow]);
        for (ox, ((&gval, &at), (d0, d1))) in outputs.zip(windows).enumerate() {
            let pos = at - (top + 2 * ox) as i32 as f32;
            let routed = 0.0 + gval;
            d0[0] = if pos == 0.0 { routed } else { 0.0 };
            d0[1] = if pos == 1.0 { routed } else { 0.0 };
            d1[0] = if pos == below { routed } else { 0.0 };
            d1[1] = if pos == below + 1.0 { routed } else { 0.0 };
        }
    }
}

/// PyTorch's `max_pool2d` (dilation 1). Recorded.
pub fn max_pool2d(x: &Tensor, p: Pool2dParams) -> Result<Tensor> {
    let geom = Geometry::new("max_pool2d", x, p)?;
    let (out, argmax) = max_pool_raw(x, &geom)?;
    if !(tape::is_grad_enabled() && x.requires_grad()) {
        return Ok(out);
    }
    Ok(out.record(MaxPoolBack { argmax, geom }, &[x]))
}

// ------------------------------------------------------------------ average pool

fn avg_pool_raw(x: &Tensor, g: &Geometry) -> Result<Tensor> {
    let shape = g.out_shape();
    let total = g.planes() * g.oh * g.ow;
    let [y] = Launch::per_sample("avg_pool2d", &[x]).run(
        [&shape],
        || {
            let xv = x.cpu()?;
            let mut out = host_pool::zeroed(total);
            let (in_plane, out_plane) = (g.h * g.w, g.oh * g.ow);
            // One plane per task (several when planes are small); each window summed row by
            // row in raster order, as the reference does.
            out.par_chunks_mut(out_plane.max(1))
                .enumerate()
                .with_min_len(cpu::rows_per_task(in_plane))
                .for_each(|(plane, out)| {
                    let x_plane = &xv[plane * in_plane..(plane + 1) * in_plane];
                    let mut o = 0;
                    g.for_each_plane_output(|_, _, wy, wx| {
                        // An empty window (all padding) gives 0, not 0 / 0.
                        if wy.0 < wy.1 && wx.0 < wx.1 {
                            let mut s = 0.0f32;
                            for y in wy.0..wy.1 {
                                for &v in &x_plane[y * g.w + wx.0..y * g.w + wx.1] {
                                    s += v;
                                }
                            }
                            out[o] = s / g.avg_divisor(wy, wx);
                        }
                        o += 1;
                    });
                });
            Ok([out])
        },
        |call| {
            let g = g.with_batch(call.batch());
            let total = call.out[0].len();
            let b = [call.input(0)?, &call.out[0]];
            call.ctx
                .dispatch(&AVG_FWD, &g.params(total)?, &b, groups_for(total, 256)?)
        },
    )?;
    Ok(y)
}

struct AvgPoolBack {
    geom: Geometry,
}

impl Backward for AvgPoolBack {
    fn name(&self) -> &'static str {
        "avg_pool2d"
    }
    fn backward(&self, _i: &[Tensor], _o: &Tensor, grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(avg_pool_bwd_raw(grad, &self.geom)?)])
    }
}

/// Average pool's input gradient: each output's gradient shared over its window.
fn avg_pool_bwd_raw(grad: &Tensor, g: &Geometry) -> Result<Tensor> {
    let [dx] = Launch::per_sample("avg_pool2d backward", &[grad]).run(
        [&g.in_shape()],
        || {
            let gv = grad.cpu()?;
            let mut dx = host_pool::zeroed(numel(&g.in_shape()));
            let (in_plane, out_plane) = (g.h * g.w, g.oh * g.ow);
            // One plane per task (several when planes are small); within it the outputs
            // in raster order, so every sum has a fixed order.
            dx.par_chunks_mut(in_plane.max(1))
                .enumerate()
                .with_min_len(cpu::rows_per_task(in_plane))
                .for_each(|(plane, dx)| {
                    let g_plane = &gv[plane * out_plane..(plane + 1) * out_plane];
                    let mut o = 0;
                    g.for_each_plane_output(|_, _, wy, wx| {
                        let share = g_plane[o] / g.avg_divisor(wy, wx);
                        o += 1;
                        if wx.0 >= wx.1 {
                            return;
                        }
                        for y in wy.0..wy.1 {
                            for d in &mut dx[y * g.w + wx.0..y * g.w + wx.1] {
                                *d += share;
                            }
                        }
                    });
                });
            Ok([dx])
        },
        |call| {
            let g = g.with_batch(call.batch());
            let total = call.out[0].len();
            let b = [call.input(0)?, &call.out[0]];
            call.ctx
                .dispatch(&AVG_BWD, &g.params(total)?, &b, groups_for(total, 256)?)
        },
    )?;
    Ok(dx)
}

/// PyTorch's `avg_pool2d` (no divisor override). Recorded.
pub fn avg_pool2d(x: &Tensor, p: Pool2dParams) -> Result<Tensor> {
    let geom = Geometry::new("avg_pool2d", x, p)?;
    Ok(avg_pool_raw(x, &geom)?.record(AvgPoolBack { geom }, &[x]))
}

// ------------------------------------------------------------------ global pools

/// A window covering the whole plane.
fn whole_plane(x: &Tensor, op: &'static str) -> Result<(Pool2dParams, [usize; 2])> {
    let (n, c, h, w) = x.dims4(op)?;
    if h == 0 || w == 0 {
        return invalid(op, format!("empty planes in input {:?}", x.shape()));
    }
    let p = Pool2dParams {
        kernel: (h, w),
        stride: (h, w),
        padding: (0, 0),
        ceil_mode: false,
        count_include_pad: true,
    };
    Ok((p, [n, c]))
}

/// [N, C, H, W] -> [N, C], mean over H and W.
pub fn global_avg_pool(x: &Tensor) -> Result<Tensor> {
    let (p, shape) = whole_plane(x, "global_avg_pool")?;
    avg_pool2d(x, p)?.reshape(&shape)
}

/// [N, C, H, W] -> [N, C], max over H and W (the gradient goes to the first maximum, as
/// PyTorch's `adaptive_max_pool2d(x, 1)`).
pub fn global_max_pool(x: &Tensor) -> Result<Tensor> {
    let (p, shape) = whole_plane(x, "global_max_pool")?;
    max_pool2d(x, p)?.reshape(&shape)
}
