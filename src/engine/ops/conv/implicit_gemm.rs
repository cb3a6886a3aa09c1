//! The GPU general path (`shaders/conv2d.wgsl`) and the depthwise kernels
//! (`shaders/depthwise.wgsl`): implicit GEMM with register blocks, never an im2col buffer.

use super::geom::Geom;
use crate::engine::error::Result;
use crate::engine::gpu::{fold_grid, to_u32, GpuBuffer, GpuContext, Kernel};
use crate::engine::tensor::Tensor;
use crate::{kernel, kernel_params};
use std::sync::Arc;

/// A kernel of conv2d.wgsl or depthwise.wgsl: every entry of both files binds the layout of
/// `shaders/include/conv_layout.wgsl` (a, b, c read; out read-write).
macro_rules! conv_kernel {
    ($file:literal, $entry:literal) => {
        kernel!($file, $entry, [Read, Read, Read, ReadWrite])
    };
}

const FORWARD: Kernel = conv_kernel!("conv2d.wgsl", "conv_forward_rb");
const INPUT_GRAD: Kernel = conv_kernel!("conv2d.wgsl", "conv_input_grad_rb");
const WEIGHT_GRAD: Kernel = conv_kernel!("conv2d.wgsl", "conv_weight_grad_rb");
const SUM_SPLITS: Kernel = conv_kernel!("conv2d.wgsl", "sum_splits");
const BIAS_GRAD: Kernel = conv_kernel!("conv2d.wgsl", "bias_grad");

const DW_FORWARD: Kernel = conv_kernel!("depthwise.wgsl", "dw_forward");
const DW_INPUT_GRAD: Kernel = conv_kernel!("depthwise.wgsl", "dw_input_grad");
const DW_WEIGHT_GRAD: Kernel = conv_kernel!("depthwise.wgsl", "dw_weight_grad");
const DW_WEIGHT_GRAD_TAPS: Kernel = conv_kernel!("depthwise.wgsl", "dw_weight_grad_taps");

/// Pixels of one row per invocation of the depthwise pixel kernels.
const DW_RUN: usize = 8;
/// Below this the shaders may divide through f32 reciprocals (exact for such dividends).
const FAST_DIV_LIMIT: usize = 1 << 22;

/// 1 / v (1 for 0), which the kernels multiply by to split an index without a division.
fn inv(v: usize) -> f32 {
    1.0 / v.max(1) as f32
}

kernel_params! {
    /// The parameter block of every entry of both direct-convolution shader files: the
    /// geometry, the launch's implicit-GEMM shape, and reciprocals for fast index splits.
    pub struct ConvParams for ["conv2d.wgsl", "depthwise.wgsl"] {
        n: u32, cin: u32, h: u32, w: u32,
        cout: u32, kh: u32, kw: u32, oh: u32,
        ow: u32, sh: u32, sw: u32, ph: u32,
        pw: u32, dh: u32, dw: u32, groups: u32,
        cin_g: u32, cout_g: u32, gm: u32, gn: u32,
        gk: u32, tiles_m: u32, tiles_n: u32, splits: u32,
        k_chunk: u32, has_bias: u32,
        /// 1 when an index may exceed FAST_DIV_LIMIT, where the reciprocals lose exactness.
        exact_div: u32,
        total_groups: u32,
        inv_kw: f32, inv_khkw: f32, inv_ow: f32, inv_ohw: f32,
        inv_w: f32, inv_hw: f32, inv_sh: f32, inv_sw: f32,
        inv_mult: f32,
    }
}

/// The grid-dependent part of a [`ConvParams`]: GEMM sizes, tiles, splits, workgroups.
#[derive(Default, Clone, Copy)]
struct Grid {
    gemm_m: usize,
    gemm_n: usize,
    gemm_k: usize,
    tiles_m: usize,
    tiles_n: usize,
    splits: usize,
    k_chunk: usize,
    has_bias: bool,
    total_groups: usize,
}

fn params(g: &Geom, l: &Grid) -> Result<ConvParams> {
    let largest = [
        g.n * g.h * g.w,
        g.n * g.oh * g.ow,
        g.cin_g * g.kh * g.kw,
        g.cout * g.kh * g.kw,
        g.h + g.ph + g.kh * g.dh,
    ]
    .into_iter()
    .max()
    .unwrap_or(0);
    let exact_div = largest >= FAST_DIV_LIMIT;
    let [n, cin, h, w, cout, kh, kw, oh, ow, sh, sw, ph, pw, dh, dw] = g.words()?;
    Ok(ConvParams {
        n,
        cin,
        h,
        w,
        cout,
        kh,
        kw,
        oh,
        ow,
        sh,
        sw,
        ph,
        pw,
        dh,
        dw,
        groups: to_u32(g.groups)?,
        cin_g: to_u32(g.cin_g)?,
        cout_g: to_u32(g.cout_g)?,
        gm: to_u32(l.gemm_m)?,
        gn: to_u32(l.gemm_n)?,
        gk: to_u32(l.gemm_k)?,
        tiles_m: to_u32(l.tiles_m)?,
        tiles_n: to_u32(l.tiles_n)?,
        splits: to_u32(l.splits)?,
        k_chunk: to_u32(l.k_chunk)?,
        has_bias: l.has_bias as u32,
        exact_div: exact_div as u32,
        total_groups: to_u32(l.total_groups)?,
        inv_kw: inv(g.kw),
        inv_khkw: inv(g.kh * g.kw),
        inv_ow: inv(g.ow),
        inv_ohw: inv(g.oh * g.ow),
        inv_w: inv(g.w),
        inv_hw: inv(g.h * g.w),
        inv_sh: inv(g.sh),
        inv_sw: inv(g.sw),
        inv_mult: inv(g.cout / g.cin.max(1)),
    })
}

fn run(ctx: &GpuContext, k: &Kernel, g: &Geom, l: &Grid, bufs: [&GpuBuffer; 4]) -> Result<()> {
    let grid = fold_grid(to_u32(l.total_groups)?);
    ctx.dispatch3(k, &params(g, l)?, &bufs, grid)
}

/// A one-element placeholder for bindings an entry does not read.
fn unused_binding(ctx: &Arc<GpuContext>) -> Result<GpuBuffer> {
    ctx.zeros(1)
}

pub(super) fn forward(
    ctx: &Arc<GpuContext>,
    g: &Geom,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    let out_len = g.n * g.cout * g.oh * g.ow;
    let out = ctx.alloc(out_len)?;
    let placeholder;
    let bias_buf = match bias {
        Some(b) => b.gpu()?,
        None => {
            placeholder = unused_binding(ctx)?;
            &placeholder
        }
    };
    if g.is_depthwise() {
        let tiles = (g.n * g.cout * g.oh * g.ow.div_ceil(DW_RUN)).div_ceil(RB_WORKGROUP);
        let l = Grid {
            has_bias: bias.is_some(),
            total_groups: tiles,
            ..Default::default()
        };
        run(
            ctx,
            &DW_FORWARD,
            g,
            &l,
            [x.gpu()?, w.gpu()?, bias_buf, &out],
        )?;
    } else {
        let l = register_blocked(
            g.cout_g,
            g.n * g.oh * g.ow.div_ceil(FORWARD_PIXELS),
            g.groups,
            bias.is_some(),
        );
        run(ctx, &FORWARD, g, &l, [x.gpu()?, w.gpu()?, bias_buf, &out])?;
    }
    Tensor::from_gpu(out, &g.out_shape())
}

pub(super) fn input_grad(
    ctx: &Arc<GpuContext>,
    g: &Geom,
    dy: &Tensor,
    w: &Tensor,
) -> Result<Tensor> {
    let out = ctx.alloc(g.n * g.cin * g.h * g.w)?;
    let unused = unused_binding(ctx)?;
    if g.is_depthwise() {
        let tiles = (g.n * g.cin * g.h * g.w.div_ceil(DW_RUN)).div_ceil(RB_WORKGROUP);
        let l = Grid {
            total_groups: tiles,
            ..Default::default()
        };
        run(
            ctx,
            &DW_INPUT_GRAD,
            g,
            &l,
            [dy.gpu()?, w.gpu()?, &unused, &out],
        )?;
    } else {
        let l = register_blocked(
            g.cin_g,
            g.n * g.h * g.w.div_ceil(PIXELS_PER_INVOCATION),
            g.groups,
            false,
        );
        run(
            ctx,
            &INPUT_GRAD,
            g,
            &l,
            [dy.gpu()?, w.gpu()?, &unused, &out],
        )?;
    }
    Tensor::from_gpu(out, &[g.n, g.cin, g.h, g.w])
}

/// Channels and pixels per invocation of the register-blocked kernels.
const ROWS_PER_INVOCATION: usize = 16;
const PIXELS_PER_INVOCATION: usize = 8;
/// Pixels per invocation of the forward kernel (`FB` in the shader).
const FORWARD_PIXELS: usize = 16;
const RB_WORKGROUP: usize = 64;

/// A launch of a register-blocked kernel: one invocation per (group, block of channels,
/// pixel group), 64 invocations per workgroup.
fn register_blocked(channels: usize, pixel_groups: usize, groups: usize, has_bias: bool) -> Grid {
    let blocks = channels.div_ceil(ROWS_PER_INVOCATION);
    Grid {
        tiles_m: blocks,
        tiles_n: pixel_groups,
        has_bias,
        total_groups: (blocks * pixel_groups * groups).div_ceil(RB_WORKGROUP),
        ..Default::default()
    }
}

/// How many slices the weight-gradient reduction over N*H_out*W_out is cut into: enough
/// workgroups to fill a GPU, each slice still long, partial sums bounded in memory.
fn weight_grad_splits(g: &Geom, out_len: usize, base_groups: usize, limit: usize) -> usize {
    const WANT_INVOCATIONS: usize = 8192;
    const MIN_SLICE: usize = 64;
    const MAX_PARTIAL_ELEMS: usize = 8 << 20;
    let k = g.n * g.oh * g.ow;
    let by_groups = WANT_INVOCATIONS.div_ceil(base_groups.max(1));
    let by_length = (k / MIN_SLICE).max(1);
    let by_memory = (MAX_PARTIAL_ELEMS.min(limit) / out_len.max(1)).max(1);
    by_groups.min(by_length).min(by_memory).max(1)
}

/// Output planes up to this many pixels (any size on CPU adapters) take the depthwise weight
/// gradient one invocation per tap, with no workgroup reduction; larger ones one workgroup per
/// channel.
const DW_TAPS_MAX_PLANE: usize = 256;
/// Invocations the per-tap kernel aims for, splitting the batch when channels x taps are fewer.
const DW_TAPS_INVOCATIONS: usize = 4096;

/// Cuts `len` items into about `wanted` slices of equal length: (slices, items per slice),
/// with no empty slice.
fn slices(len: usize, wanted: usize) -> (usize, usize) {
    let per = len.div_ceil(wanted.clamp(1, len.max(1))).max(1);
    (len.div_ceil(per).max(1), per)
}

pub(super) fn weight_grad(
    ctx: &Arc<GpuContext>,
    g: &Geom,
    dy: &Tensor,
    x: &Tensor,
) -> Result<Tensor> {
    let out_len = g.cout * g.cin_g * g.kh * g.kw;
    let shape = [g.cout, g.cin_g, g.kh, g.kw];
    let unused = unused_binding(ctx)?;
    let per_tap = g.oh * g.ow <= DW_TAPS_MAX_PLANE || ctx.policy().tuned_for_cpu_adapter();
    let (kernel, l) = if g.is_depthwise() && per_tap {
        // One invocation per (image slice, channel, tap).
        let per_split = g.cout * g.kh * g.kw;
        let (splits, k_chunk) = slices(g.n, DW_TAPS_INVOCATIONS.div_ceil(per_split));
        let l = Grid {
            gemm_m: per_split * splits,
            splits,
            k_chunk,
            total_groups: (per_split * splits).div_ceil(64),
            ..Default::default()
        };
        (&DW_WEIGHT_GRAD_TAPS, l)
    } else if g.is_depthwise() {
        // One workgroup per (channel, slice of images).
        let (splits, k_chunk) = slices(g.n, 256usize.div_ceil(g.cout));
        let l = Grid {
            splits,
            k_chunk,
            total_groups: g.cout * splits,
            ..Default::default()
        };
        (&DW_WEIGHT_GRAD, l)
    } else {
        let (m, n, k) = (g.cout_g, g.cin_g * g.kh * g.kw, g.n * g.oh * g.ow);
        let (row_blocks, col_blocks) = (
            m.div_ceil(ROWS_PER_INVOCATION),
            n.div_ceil(PIXELS_PER_INVOCATION),
        );
        let base = row_blocks * col_blocks * g.groups;
        let (splits, k_chunk) = slices(
            k,
            weight_grad_splits(g, out_len, base, ctx.max_binding_elems()),
        );
        let l = Grid {
            gemm_k: k,
            tiles_m: row_blocks,
            tiles_n: col_blocks,
            splits,
            k_chunk,
            total_groups: (base * splits).div_ceil(RB_WORKGROUP),
            ..Default::default()
        };
        (&WEIGHT_GRAD, l)
    };
    let out = ctx.alloc(out_len)?;
    if l.splits == 1 {
        run(ctx, kernel, g, &l, [dy.gpu()?, x.gpu()?, &unused, &out])?;
    } else {
        ctx.check_binding("conv2d weight-gradient partial sums", out_len * l.splits)?;
        let partial = ctx.alloc(out_len * l.splits)?;
        run(ctx, kernel, g, &l, [dy.gpu()?, x.gpu()?, &unused, &partial])?;
        let sum = Grid {
            splits: l.splits,
            gemm_n: out_len,
            total_groups: out_len.div_ceil(256),
            ..Default::default()
        };
        run(
            ctx,
            &SUM_SPLITS,
            g,
            &sum,
            [&partial, &unused, &unused, &out],
        )?;
    }
    Tensor::from_gpu(out, &shape)
}

pub(super) fn bias_grad(ctx: &Arc<GpuContext>, g: &Geom, dy: &Tensor) -> Result<Tensor> {
    let out = ctx.alloc(g.cout)?;
    let unused = unused_binding(ctx)?;
    let l = Grid {
        total_groups: g.cout,
        ..Default::default()
    };
    run(ctx, &BIAS_GRAD, g, &l, [dy.gpu()?, &unused, &unused, &out])?;
    Tensor::from_gpu(out, &[g.cout])
}
