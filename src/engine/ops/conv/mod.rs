//! Convolutions: general conv2d (stride, padding, dilation, groups, bias) as implicit GEMM,
//! and dedicated depthwise kernels; forward and backward on both devices.
//! GPU: `shaders/conv2d.wgsl`, `shaders/depthwise.wgsl`.
//!
//! The GPU general path never builds an im2col buffer: it is an implicit GEMM in which every
//! invocation owns a register block (16 channels x 8 or 16 pixels of one row) and gathers its
//! operands straight from the NCHW tensors. Forward is W[co, (ci,ky,kx)] x X[(ci,ky,kx), (n,oy,ox)];
//! the input gradient is the transposed convolution, gathered per input pixel (so every dX
//! element is written by exactly one invocation: no float atomics); the weight gradient is a
//! GEMM over (n,oy,ox), split along that long reduction so small weight tensors still fill the
//! GPU. Register blocks rather than workgroup-memory tiles: on llvmpipe (the CI adapter) every
//! non-constant load, workgroup or storage, costs a per-lane scalar loop, so the kernels are
//! built to maximise multiply-adds per value loaded; on discrete GPUs the weight loads are
//! uniform across a subgroup and the pixel loads coalesce.

//!
//! Files: `geom.rs` (the validated sizes), `cpu.rs` (the CPU fast path), `implicit_gemm.rs`
//! (the GPU kernels above), `im2col.rs` (the GPU's im2col + GEMM route, faster on CPU
//! adapters); this file is the API, the autograd op and the choice of GPU route.

use crate::engine::error::{shape_err, Result};
use crate::engine::gpu::GpuContext;
use crate::engine::launch::Launch;
use crate::engine::tape::Backward;
use crate::engine::tensor::Tensor;
use std::sync::Arc;

mod blocked;
mod columns;
mod cpu;
mod depthwise;
mod geom;
mod im2col;
mod implicit_gemm;

use geom::Geom;
pub use im2col::{ConvRoute, Im2colParams};
pub use implicit_gemm::ConvParams;

pub use cpu::CpuConvRoute;
use cpu::{fast_bias_grad, fast_forward, fast_input_grad, fast_weight_grad};
use im2col::{padded_k, use_gemm_route};

/// PyTorch's `nn.Conv2d` hyper-parameters. Weight layout: [C_out, C_in / groups, kh, kw].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2dParams {
    pub stride: (usize, usize),
    pub padding: (usize, usize),
    pub dilation: (usize, usize),
    pub groups: usize,
}

impl Default for Conv2dParams {
    fn default() -> Self {
        Conv2dParams {
            stride: (1, 1),
            padding: (0, 0),
            dilation: (1, 1),
            groups: 1,
        }
    }
}

const OP: &str = "conv2d";

// ------------------------------------------------------------------ raw ops (both devices)

/// The convolution's values, not recorded.
pub fn conv2d_raw(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    p: Conv2dParams,
) -> Result<Tensor> {
    let g = Geom::new(x.shape(), w.shape(), p)?;
    if let Some(b) = bias {
        if b.shape() != [g.cout] {
            return shape_err(
                OP,
                format!("bias {:?} for {} output channels", b.shape(), g.cout),
            );
        }
    }
    let launch = Launch::per_sample(OP, &[x])
        .with_whole(&[w])
        .with_whole(bias.as_slice());
    let [y] = launch.run_tensors(
        [&g.out_shape()],
        || {
            let bias_vals = bias.map(|b| b.cpu()).transpose()?;
            let bias_vals = bias_vals.as_deref().map(|v| v.as_slice());
            Ok([fast_forward(&g, &x.cpu()?, &w.cpu()?, bias_vals)])
        },
        |ctx, inputs| {
            let g = Geom::new(inputs[0].shape(), w.shape(), p)?;
            Ok([gpu_forward(ctx, &g, &inputs[0], w, bias)?])
        },
    )?;
    Ok(y)
}

fn check_grad_shape(g: &Geom, dy: &Tensor) -> Result<()> {
    if dy.shape() != g.out_shape() {
        return shape_err(
            OP,
            format!(
                "output gradient {:?}, expected {:?}",
                dy.shape(),
                g.out_shape()
            ),
        );
    }
    Ok(())
}

/// d loss / d x of the convolution, given the output gradient `dy` (not recorded).
pub fn conv2d_input_grad(
    dy: &Tensor,
    w: &Tensor,
    x_shape: &[usize],
    p: Conv2dParams,
) -> Result<Tensor> {
    let g = Geom::new(x_shape, w.shape(), p)?;
    check_grad_shape(&g, dy)?;
    let launch = Launch::per_sample(OP, &[dy]).with_whole(&[w]);
    let [dx] = launch.run_tensors(
        [x_shape],
        || Ok([fast_input_grad(&g, &dy.cpu()?, &w.cpu()?)]),
        |ctx, inputs| {
            let mut chunk_shape = x_shape.to_vec();
            chunk_shape[0] = inputs[0].shape()[0];
            let g = Geom::new(&chunk_shape, w.shape(), p)?;
            Ok([gpu_input_grad(ctx, &g, &inputs[0], w)?])
        },
    )?;
    Ok(dx)
}

/// d loss / d w of the convolution, given the output gradient `dy` (not recorded).
pub fn conv2d_weight_grad(
    dy: &Tensor,
    x: &Tensor,
    w_shape: &[usize],
    p: Conv2dParams,
) -> Result<Tensor> {
    let g = Geom::new(x.shape(), w_shape, p)?;
    check_grad_shape(&g, dy)?;
    // The GEMM route holds a [C_out, K'] product per image before summing them.
    let per_image = |ctx: &GpuContext| match use_gemm_route(ctx, &g) {
        true => vec![g.cout * padded_k(&g)],
        false => Vec::new(),
    };
    let [dw] = Launch::batch_sum(OP, &[dy, x], per_image).run_tensors(
        [w_shape],
        || Ok([fast_weight_grad(&g, &dy.cpu()?, &x.cpu()?)]),
        |ctx, inputs| {
            let g = Geom::new(inputs[1].shape(), w_shape, p)?;
            Ok([gpu_weight_grad(ctx, &g, &inputs[0], &inputs[1])?])
        },
    )?;
    Ok(dw)
}

/// Per-channel sums of an NCHW gradient: d loss / d bias (not recorded).
pub fn conv2d_bias_grad(dy: &Tensor) -> Result<Tensor> {
    let g = bias_grad_geom(dy)?;
    let [db] = Launch::batch_sum(OP, &[dy], |_| Vec::new()).run_tensors(
        [&[g.cout]],
        || Ok([fast_bias_grad(&g, &dy.cpu()?)]),
        |ctx, inputs| {
            Ok([implicit_gemm::bias_grad(
                ctx,
                &bias_grad_geom(&inputs[0])?,
                &inputs[0],
            )?])
        },
    )?;
    Ok(db)
}

/// A 1x1 geometry whose output is `dy`'s shape, so both devices read the sizes they need.
fn bias_grad_geom(dy: &Tensor) -> Result<Geom> {
    let (n, c, h, w) = dy.dims4(OP)?;
    Geom::new(
        &[n, c, h, w],
        &[c, 1, 1, 1],
        Conv2dParams {
            groups: c.max(1),
            ..Default::default()
        },
    )
}

// ------------------------------------------------------------------ recorded op

struct Conv2dBack {
    p: Conv2dParams,
}

impl Backward for Conv2dBack {
    fn name(&self) -> &'static str {
        "conv2d"
    }
    fn backward(
        &self,
        inputs: &[Tensor],
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<Vec<Option<Tensor>>> {
        let (x, w) = (&inputs[0], &inputs[1]);
        // Only what is needed: PGD wants dx alone, frozen layers want no dw.
        let dx = if x.requires_grad() {
            Some(conv2d_input_grad(grad, w, x.shape(), self.p)?)
        } else {
            None
        };
        let dw = if w.requires_grad() {
            Some(conv2d_weight_grad(grad, x, w.shape(), self.p)?)
        } else {
            None
        };
        let mut grads = vec![dx, dw];
        if let Some(b) = inputs.get(2) {
            grads.push(if b.requires_grad() {
                Some(conv2d_bias_grad(grad)?)
            } else {
                None
            });
        }
        Ok(grads)
    }
}

/// The fast CPU code that runs a convolution of these shapes (tests check that each is covered).
pub fn cpu_route(x_shape: &[usize], w_shape: &[usize], p: Conv2dParams) -> Result<CpuConvRoute> {
    Ok(cpu::route(&Geom::new(x_shape, w_shape, p)?))
}

/// y = conv2d(x, w) + bias, x [N, C_in, H, W] -> y [N, C_out, H_out, W_out]. Recorded.
pub fn conv2d(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, p: Conv2dParams) -> Result<Tensor> {
    let y = conv2d_raw(x, w, bias, p)?;
    let back = Conv2dBack { p };
    Ok(match bias {
        Some(b) => y.record(back, &[x, w, b]),
        None => y.record(back, &[x, w]),
    })
}

// ------------------------------------------------------------------ GPU route

/// The forward on the GPU by the route [`use_gemm_route`] picks for this geometry.
fn gpu_forward(
    ctx: &Arc<GpuContext>,
    g: &Geom,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    match use_gemm_route(ctx, g) {
        true => im2col::gemm_forward(ctx, g, x, w, bias),
        false => implicit_gemm::forward(ctx, g, x, w, bias),
    }
}

fn gpu_input_grad(ctx: &Arc<GpuContext>, g: &Geom, dy: &Tensor, w: &Tensor) -> Result<Tensor> {
    match use_gemm_route(ctx, g) {
        true => im2col::gemm_input_grad(ctx, g, dy, w),
        false => implicit_gemm::input_grad(ctx, g, dy, w),
    }
}

fn gpu_weight_grad(ctx: &Arc<GpuContext>, g: &Geom, dy: &Tensor, x: &Tensor) -> Result<Tensor> {
    match use_gemm_route(ctx, g) {
        true => im2col::gemm_weight_grad(ctx, g, dy, x),
        false => implicit_gemm::weight_grad(ctx, g, dy, x),
    }
}
