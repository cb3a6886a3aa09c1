//! The im2col + GEMM route on the GPU (`shaders/im2col.wgsl` and the vec4 GEMM), which CPU
//! adapters run several times faster than the implicit-GEMM kernels.

use super::geom::Geom;
use crate::engine::error::Result;
use crate::engine::gpu::{groups_for, to_u32, GpuBuffer};
use crate::engine::gpu::{GpuContext, Kernel};
use crate::engine::ops::elementwise::{binary_raw, Binary};
use crate::engine::ops::matmul::{gemm_raw, GemmKernel};
use crate::engine::tensor::Tensor;
use crate::engine::Device;
use crate::{kernel, kernel_params};
use std::sync::Arc;

const IM2COL: Kernel = kernel!("im2col.wgsl", "im2col", [Read, ReadWrite]);
const COL2IM: Kernel = kernel!("im2col.wgsl", "col2im", [Read, ReadWrite]);
const ADD_CHANNEL_BIAS: Kernel = kernel!("im2col.wgsl", "add_channel_bias", [Read, ReadWrite]);
const RESIZE_COLS: Kernel = kernel!("im2col.wgsl", "resize_cols", [Read, ReadWrite]);
const TRANSPOSE_PAD: Kernel = kernel!("im2col.wgsl", "transpose_pad", [Read, ReadWrite]);
/// Elements per invocation of `add_channel_bias` (`BIAS_RUN` in the shader).
const BIAS_RUN: usize = 16;

/// Column matrices larger than this (in f32s; also capped by the binding limit) take the
/// implicit-GEMM kernels instead: c2f2 at batch 150 and 32x32 needs 31M.
const MAX_COLUMN_ELEMS: usize = 64 << 20;

pub use crate::engine::policy::ConvRoute;

kernel_params! {
    /// The parameter block of `im2col.wgsl`: the geometry, the unfolded weight's rows (k) and
    /// their padding to a multiple of 4 (kp), and the extra sizes of the helper entries.
    pub struct Im2colParams for ["im2col.wgsl"] {
        n: u32, cin: u32, h: u32, w: u32,
        kh: u32, kw: u32, oh: u32, ow: u32,
        sh: u32, sw: u32, ph: u32, pw: u32,
        dh: u32, dw: u32,
        k: u32, kp: u32,
        /// add_channel_bias: channels and plane size.
        channels: u32, plane: u32,
        /// resize_cols: columns in and out.
        cols_in: u32, cols_out: u32,
        total: u32,
    }
}

/// Whether a convolution runs as im2col + the vec4 GEMM. On CPU adapters that GEMM runs several
/// times faster than the implicit-GEMM kernels (every load there is a per-lane loop, and the
/// GEMM reads vec4s; benches/RESULTS.md has the figures), which outweighs writing the column
/// matrix; on discrete GPUs the implicit GEMM
/// avoids that traffic. Needs ungrouped convolutions, output planes of a multiple of 4 pixels
/// (vec4 rows) and a column matrix within one binding.
pub(super) fn use_gemm_route(ctx: &GpuContext, g: &Geom) -> bool {
    let limit = MAX_COLUMN_ELEMS.min(ctx.max_binding_bytes() as usize / 4);
    let fits = g.groups == 1 && (g.is_pointwise() || g.n * padded_k(g) * g.oh * g.ow <= limit);
    let policy = ctx.policy();
    match policy.conv_route {
        ConvRoute::ImplicitGemm => false,
        ConvRoute::Im2colGemm => fits,
        ConvRoute::Auto => {
            let vec4_rows =
                policy.gemm_kernel() == GemmKernel::Vec4 && (g.oh * g.ow).is_multiple_of(4);
            let too_long =
                policy.tuned_for_cpu_adapter() && implicit_reduction(g) > CPU_ADAPTER_MAX_REDUCTION;
            fits && (vec4_rows || too_long)
        }
    }
}

/// On llvmpipe the implicit-GEMM kernels return wrong values, silently, once an invocation's
/// reduction is long: right at 2,700 (C_in x taps), wrong from about 3,000 (ResNet-50's 3x3
/// convs on 512 channels, on 2x3 planes), most likely Mesa's loop limiter, which ends a shader
/// invocation's loops after 65,535 iterations in all. Longer reductions than this take the
/// GEMM route on CPU adapters (tests/resnet.rs::deep_convolutions_gpu_match_cpu).
const CPU_ADAPTER_MAX_REDUCTION: usize = 2048;

/// The longest reduction one implicit-GEMM invocation loops over: the forward's (input
/// channels x taps) or the input gradient's (output channels x taps).
fn implicit_reduction(g: &Geom) -> usize {
    g.cin_g.max(g.cout_g) * g.kh * g.kw
}

/// Rows of the unfolded weight, padded to a multiple of 4 for vec4 reads.
pub(super) fn padded_k(g: &Geom) -> usize {
    (g.cin * g.kh * g.kw).next_multiple_of(4)
}

fn im2col_params(g: &Geom, total: usize, extra: [usize; 4]) -> Result<Im2colParams> {
    let [channels, plane, cols_in, cols_out] = extra;
    let [n, cin, h, w, _cout, kh, kw, oh, ow, sh, sw, ph, pw, dh, dw] = g.words()?;
    Ok(Im2colParams {
        n,
        cin,
        h,
        w,
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
        k: to_u32(g.cin * g.kh * g.kw)?,
        kp: to_u32(padded_k(g))?,
        channels: to_u32(channels)?,
        plane: to_u32(plane)?,
        cols_in: to_u32(cols_in)?,
        cols_out: to_u32(cols_out)?,
        total: to_u32(total)?,
    })
}

fn run_im2col(
    ctx: &GpuContext,
    k: &Kernel,
    params: &Im2colParams,
    total: usize,
    src: &GpuBuffer,
    dst: &GpuBuffer,
) -> Result<()> {
    ctx.dispatch(k, params, &[src, dst], groups_for(total, 64)?)
}

/// The input as columns [N, K', H_out * W_out]: the input itself for a pointwise convolution.
fn columns(ctx: &Arc<GpuContext>, g: &Geom, x: &Tensor) -> Result<Tensor> {
    let (kp, plane) = (padded_k(g), g.oh * g.ow);
    if g.is_pointwise() {
        return x.reshape_raw(&[g.n, g.cin, plane]);
    }
    let col = ctx.alloc(g.n * kp * plane)?;
    let rows = g.n * kp * g.oh;
    run_im2col(
        ctx,
        &IM2COL,
        &im2col_params(g, rows, [0; 4])?,
        rows,
        x.gpu()?,
        &col,
    )?;
    Tensor::from_gpu(col, &[g.n, kp, plane])
}

/// A [rows, cols_in] matrix as [rows, cols_out], zero-filled or cut; the matrix itself when
/// the widths agree.
fn resize_cols(
    ctx: &Arc<GpuContext>,
    g: &Geom,
    m: &Tensor,
    rows: usize,
    cols_in: usize,
    cols_out: usize,
) -> Result<Tensor> {
    if cols_in == cols_out {
        return m.reshape_raw(&[rows, cols_out]);
    }
    let out = ctx.alloc(rows * cols_out)?;
    let total = rows * cols_out;
    let params = im2col_params(g, total, [0, 0, cols_in, cols_out])?;
    run_im2col(ctx, &RESIZE_COLS, &params, total, m.gpu()?, &out)?;
    Tensor::from_gpu(out, &[rows, cols_out])
}

/// The weight as the GEMM's [C_out, K'] operand.
fn weight_matrix(ctx: &Arc<GpuContext>, g: &Geom, w: &Tensor) -> Result<Tensor> {
    let k = g.cin * g.kh * g.kw;
    resize_cols(ctx, g, w, g.cout, k, padded_k(g))
}

/// The weight as [K', C_out]: transposed, rows past K zero.
fn transposed_weight(ctx: &Arc<GpuContext>, g: &Geom, w: &Tensor) -> Result<Tensor> {
    let (k, kp) = (g.cin * g.kh * g.kw, padded_k(g));
    let out = ctx.alloc(kp * g.cout)?;
    let total = kp * g.cout;
    let params = im2col_params(g, total, [g.cout, 0, k, 0])?;
    run_im2col(ctx, &TRANSPOSE_PAD, &params, total, w.gpu()?, &out)?;
    Tensor::from_gpu(out, &[kp, g.cout])
}

pub(super) fn gemm_forward(
    ctx: &Arc<GpuContext>,
    g: &Geom,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    let y = gemm_raw(
        &weight_matrix(ctx, g, w)?,
        &columns(ctx, g, x)?,
        false,
        false,
    )?;
    if let Some(b) = bias {
        // In place: `y` is fresh and owned here.
        let plane = g.oh * g.ow;
        let total = g.n * g.cout * plane.div_ceil(BIAS_RUN);
        let params = im2col_params(g, total, [g.cout, plane, 0, 0])?;
        run_im2col(ctx, &ADD_CHANNEL_BIAS, &params, total, b.gpu()?, y.gpu()?)?;
    }
    y.reshape_raw(&g.out_shape())
}

pub(super) fn gemm_input_grad(
    ctx: &Arc<GpuContext>,
    g: &Geom,
    dy: &Tensor,
    w: &Tensor,
) -> Result<Tensor> {
    let plane = g.oh * g.ow;
    let dy3 = dy.reshape_raw(&[g.n, g.cout, plane])?;
    // W^T made explicit when its rows can be read as vec4s: the GEMM with a k-contiguous left
    // operand runs faster on llvmpipe than the one reading it transposed (benches/RESULTS.md).
    let dcol = if g.cout.is_multiple_of(4) {
        gemm_raw(&transposed_weight(ctx, g, w)?, &dy3, false, false)?
    } else {
        gemm_raw(&weight_matrix(ctx, g, w)?, &dy3, true, false)?
    };
    if g.is_pointwise() {
        return dcol.reshape_raw(&[g.n, g.cin, g.h, g.w]);
    }
    let dx = ctx.alloc(g.n * g.cin * g.h * g.w)?;
    let rows = g.n * g.cin * g.h;
    run_im2col(
        ctx,
        &COL2IM,
        &im2col_params(g, rows, [0; 4])?,
        rows,
        dcol.gpu()?,
        &dx,
    )?;
    Tensor::from_gpu(dx, &[g.n, g.cin, g.h, g.w])
}

/// The sum of the rows of `per_image` [N, L]: a ones-vector GEMM when the vec4 kernel can read
/// it (N a multiple of 4), else N - 1 elementwise adds, because the scalar GEMM would put L / 32
/// workgroups on one grid axis, past the 65,535 limit for a layer of 512 x 4608 weights.
fn sum_images(ctx: &Arc<GpuContext>, per_image: &Tensor) -> Result<Tensor> {
    let n = per_image.shape()[0];
    if n.is_multiple_of(4) {
        let ones = Tensor::full(1.0, &[1, n], &Device::Gpu(ctx.clone()))?;
        return gemm_raw(&ones, per_image, false, false);
    }
    let mut total = per_image.rows(0, 1)?;
    for i in 1..n {
        total = binary_raw(&total, &per_image.rows(i, 1)?, Binary::Axpby(1.0, 1.0))?;
    }
    Ok(total)
}

pub(super) fn gemm_weight_grad(
    ctx: &Arc<GpuContext>,
    g: &Geom,
    dy: &Tensor,
    x: &Tensor,
) -> Result<Tensor> {
    let (kp, plane) = (padded_k(g), g.oh * g.ow);
    let dy3 = dy.reshape_raw(&[g.n, g.cout, plane])?;
    // Per image [C_out, K'], then summed over images.
    let per_image = gemm_raw(&dy3, &columns(ctx, g, x)?, false, true)?;
    let summed = sum_images(ctx, &per_image.reshape_raw(&[g.n, g.cout * kp])?)?;
    let dw = resize_cols(ctx, g, &summed, g.cout, kp, g.cin * g.kh * g.kw)?;
    dw.reshape_raw(&[g.cout, g.cin, g.kh, g.kw])
}
