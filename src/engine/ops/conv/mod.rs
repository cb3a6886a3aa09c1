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

use crate::engine::error::{shape_err, EngineError, Result};
use crate::engine::gpu::{fold_grid, groups_for, to_u32, GpuBuffer, GpuContext, Kernel};
use crate::engine::launch::Launch;
use crate::engine::ops::elementwise::{binary_raw, Binary};
use crate::engine::ops::matmul::{gemm_raw, GemmKernel};
use crate::engine::tape::Backward;
use crate::engine::tensor::Tensor;
use crate::engine::{cpu, Device};
use crate::{kernel, kernel_params};
use std::sync::Arc;

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

/// Every size of one convolution, validated.
#[derive(Clone, Copy, Debug)]
struct Geom {
    n: usize,
    cin: usize,
    h: usize,
    w: usize,
    cout: usize,
    kh: usize,
    kw: usize,
    oh: usize,
    ow: usize,
    sh: usize,
    sw: usize,
    ph: usize,
    pw: usize,
    dh: usize,
    dw: usize,
    groups: usize,
    cin_g: usize,
    cout_g: usize,
}

/// The sizes both parameter blocks ([`ConvParams`], [`Im2colParams`]) carry, as the kernels'
/// u32s: n, cin, h, w, cout, kh, kw, oh, ow, sh, sw, ph, pw, dh, dw.
type GeomWords = [u32; 15];

impl Geom {
    fn words(&self) -> Result<GeomWords> {
        let sizes = [
            self.n, self.cin, self.h, self.w, self.cout, self.kh, self.kw, self.oh, self.ow,
            self.sh, self.sw, self.ph, self.pw, self.dh, self.dw,
        ];
        let mut words = [0; 15];
        for (word, size) in words.iter_mut().zip(sizes) {
            *word = to_u32(size)?;
        }
        Ok(words)
    }

    fn new(x: &[usize], w: &[usize], p: Conv2dParams) -> Result<Geom> {
        let (n, cin, h, wd) = match *x {
            [a, b, c, d] => (a, b, c, d),
            _ => return shape_err(OP, format!("input must be NCHW (4-D), got {x:?}")),
        };
        let (cout, wc, kh, kw) = match *w {
            [a, b, c, d] => (a, b, c, d),
            _ => {
                return shape_err(
                    OP,
                    format!("weight must be [C_out, C_in/groups, kh, kw], got {w:?}"),
                )
            }
        };
        let g = p.groups;
        if g == 0 || p.stride.0 == 0 || p.stride.1 == 0 || p.dilation.0 == 0 || p.dilation.1 == 0 {
            return Err(EngineError::Invalid {
                op: OP,
                detail: format!("groups, stride and dilation must be positive, got {p:?}"),
            });
        }
        if cin % g != 0 || cout % g != 0 {
            return shape_err(
                OP,
                format!("groups {g} must divide C_in {cin} and C_out {cout}"),
            );
        }
        if wc != cin / g {
            return shape_err(
                OP,
                format!("weight {w:?} expects {wc} input channels per group, input {x:?} with groups {g} has {}", cin / g),
            );
        }
        if kh == 0 || kw == 0 || cout == 0 {
            return shape_err(OP, format!("empty weight {w:?}"));
        }
        let out_len = |size: usize, pad: usize, dil: usize, k: usize, s: usize| -> Result<usize> {
            let span = dil * (k - 1) + 1;
            if size + 2 * pad < span {
                return shape_err(
                    OP,
                    format!("kernel span {span} larger than the padded input {} (input {x:?}, weight {w:?}, {p:?})", size + 2 * pad),
                );
            }
            Ok((size + 2 * pad - span) / s + 1)
        };
        let oh = out_len(h, p.padding.0, p.dilation.0, kh, p.stride.0)?;
        let ow = out_len(wd, p.padding.1, p.dilation.1, kw, p.stride.1)?;
        Ok(Geom {
            n,
            cin,
            h,
            w: wd,
            cout,
            kh,
            kw,
            oh,
            ow,
            sh: p.stride.0,
            sw: p.stride.1,
            ph: p.padding.0,
            pw: p.padding.1,
            dh: p.dilation.0,
            dw: p.dilation.1,
            groups: g,
            cin_g: cin / g,
            cout_g: cout / g,
        })
    }

    fn out_shape(&self) -> [usize; 4] {
        [self.n, self.cout, self.oh, self.ow]
    }

    /// Depthwise (each input channel convolved by its own `cout / cin` filters).
    fn is_depthwise(&self) -> bool {
        self.groups > 1 && self.groups == self.cin
    }

    /// A 1x1 convolution with stride 1 and no padding over a multiple-of-4 channel count: its
    /// input is already the GEMM's column matrix.
    fn is_pointwise(&self) -> bool {
        self.kh == 1
            && self.kw == 1
            && self.sh == 1
            && self.sw == 1
            && self.ph == 0
            && self.pw == 0
            && self.groups == 1
            && self.cin.is_multiple_of(4)
    }
}

// ------------------------------------------------------------------ CPU fast path
// Tested against the plain loops of `engine::reference` by tests/ops_conv.rs.

/// The fast CPU forward: depthwise convolutions by direct loops, the others as one GEMM per
/// image and group over an im2col matrix (the input itself for pointwise convolutions).
fn fast_forward(g: &Geom, x: &[f32], w: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
    if g.is_depthwise() {
        return depthwise_forward(g, x, w, bias);
    }
    let (in_len, out_len, plane) = (g.cin * g.h * g.w, g.cout * g.oh * g.ow, g.oh * g.ow);
    let mut y = vec![0.0; g.n * out_len];
    for_each_image(&mut y, out_len, g.n, |img, y_img, parallel_gemm, cols| {
        let x_img = &x[img * in_len..(img + 1) * in_len];
        let cols = image_columns(g, x_img, cols);
        for (co, row) in y_img.chunks_mut(plane).enumerate() {
            row.fill(bias.map_or(0.0, |b| b[co]));
        }
        let (m, k) = (g.cout_g, g.cin_g * g.kh * g.kw);
        for group in 0..g.groups {
            cpu::sgemm(
                (m, plane, k),
                &w[group * m * k..],
                cpu::Strides::rows(k),
                &cols[group * k * plane..],
                cpu::Strides::rows(plane),
                &mut y_img[group * m * plane..],
                plane,
                true,
                parallel_gemm,
            );
        }
    });
    y
}

/// Runs `f(image, its output slice, whether GEMMs should split over threads, scratch)` for
/// every image: images spread over the pool when there are enough of them to fill it, else
/// one at a time with multi-threaded GEMMs. Each image's slice is written by one task only.
fn for_each_image(
    out: &mut [f32],
    per_image: usize,
    n: usize,
    f: impl Fn(usize, &mut [f32], bool, &mut Vec<f32>) + Sync,
) {
    use rayon::prelude::*;
    if per_image == 0 {
        return;
    }
    if n >= cpu::threads() {
        out.par_chunks_mut(per_image)
            .enumerate()
            .for_each_init(Vec::new, |scratch, (img, o)| f(img, o, false, scratch));
    } else {
        let mut scratch = Vec::new();
        for (img, o) in out.chunks_mut(per_image).enumerate() {
            f(img, o, true, &mut scratch);
        }
    }
}

/// One image's im2col matrix [C_in * kh * kw, H_out * W_out] built in `scratch`, or the image
/// itself for a pointwise convolution (whose input already has that layout).
fn image_columns<'a>(g: &Geom, x_img: &'a [f32], scratch: &'a mut Vec<f32>) -> &'a [f32] {
    if is_plain_pointwise(g) {
        return x_img;
    }
    let (plane, rows) = (g.oh * g.ow, g.cin * g.kh * g.kw);
    // Every element is written below (padding included), so old contents need no clearing.
    scratch.resize(rows * plane, 0.0);
    for (row, col_row) in scratch[..rows * plane].chunks_mut(plane).enumerate() {
        let (ci, ky, kx) = (row / (g.kh * g.kw), (row / g.kw) % g.kh, row % g.kw);
        let x_plane = &x_img[ci * g.h * g.w..(ci + 1) * g.h * g.w];
        let (lo, hi) = valid_columns(g, kx);
        for (oy, out_row) in col_row.chunks_mut(g.ow).enumerate() {
            let Some(iy) = (oy * g.sh + ky * g.dh)
                .checked_sub(g.ph)
                .filter(|&iy| iy < g.h)
            else {
                out_row.fill(0.0); // the tap reads padding
                continue;
            };
            let x_row = &x_plane[iy * g.w..(iy + 1) * g.w];
            out_row[..lo].fill(0.0);
            out_row[hi..].fill(0.0);
            if g.sw == 1 && lo < hi {
                let start = lo + kx * g.dw - g.pw;
                out_row[lo..hi].copy_from_slice(&x_row[start..start + hi - lo]);
            } else {
                for ox in lo..hi {
                    out_row[ox] = x_row[ox * g.sw + kx * g.dw - g.pw];
                }
            }
        }
    }
    &scratch[..rows * plane]
}

/// 1x1, stride 1, no padding, one group: the input is the column matrix (any channel count).
fn is_plain_pointwise(g: &Geom) -> bool {
    g.kh == 1 && g.kw == 1 && g.sh == 1 && g.sw == 1 && g.ph == 0 && g.pw == 0 && g.groups == 1
}

/// The output columns `lo..hi` whose tap `kx` reads inside the image row.
fn valid_columns(g: &Geom, kx: usize) -> (usize, usize) {
    let offset = kx * g.dw; // ix = ox * sw + offset - pw
    let lo = g.pw.saturating_sub(offset).div_ceil(g.sw);
    let hi = if g.w + g.pw > offset {
        ((g.w + g.pw - offset - 1) / g.sw + 1).min(g.ow)
    } else {
        0
    };
    (lo.min(hi), hi)
}

/// The fast CPU input gradient: per image, dcol = W^T dy by GEMM, then col2im.
fn fast_input_grad(g: &Geom, dy: &[f32], w: &[f32]) -> Vec<f32> {
    if g.is_depthwise() {
        return depthwise_input_grad(g, dy, w);
    }
    let (in_len, out_len, plane) = (g.cin * g.h * g.w, g.cout * g.oh * g.ow, g.oh * g.ow);
    let (m, k) = (g.cout_g, g.cin_g * g.kh * g.kw);
    let mut dx = vec![0.0; g.n * in_len];
    for_each_image(&mut dx, in_len, g.n, |img, dx_img, parallel_gemm, dcol| {
        let dy_img = &dy[img * out_len..(img + 1) * out_len];
        let pointwise = is_plain_pointwise(g);
        let dcol_len = g.cin * g.kh * g.kw * plane;
        if !pointwise {
            // Fully written by the GEMMs (no accumulation), so old contents need no clearing.
            dcol.resize(dcol_len, 0.0);
        }
        let target: &mut [f32] = if pointwise {
            dx_img
        } else {
            &mut dcol[..dcol_len]
        };
        for group in 0..g.groups {
            cpu::sgemm(
                (k, plane, m),
                &w[group * m * k..],
                cpu::Strides::transposed(k),
                &dy_img[group * m * plane..],
                cpu::Strides::rows(plane),
                &mut target[group * k * plane..],
                plane,
                false,
                parallel_gemm,
            );
        }
        if !pointwise {
            col2im(g, dcol, dx_img);
        }
    });
    dx
}

/// Adds a column-matrix gradient back onto the image it was gathered from (dx_img starts zero).
fn col2im(g: &Geom, dcol: &[f32], dx_img: &mut [f32]) {
    let plane = g.oh * g.ow;
    for (row, col_row) in dcol.chunks(plane).enumerate() {
        let (ci, ky, kx) = (row / (g.kh * g.kw), (row / g.kw) % g.kh, row % g.kw);
        let dx_plane = &mut dx_img[ci * g.h * g.w..(ci + 1) * g.h * g.w];
        let (lo, hi) = valid_columns(g, kx);
        for (oy, d_row) in col_row.chunks(g.ow).enumerate() {
            let Some(iy) = (oy * g.sh + ky * g.dh)
                .checked_sub(g.ph)
                .filter(|&iy| iy < g.h)
            else {
                continue;
            };
            let dx_row = &mut dx_plane[iy * g.w..(iy + 1) * g.w];
            if g.sw == 1 && lo < hi {
                let start = lo + kx * g.dw - g.pw;
                for (d, &v) in dx_row[start..start + hi - lo]
                    .iter_mut()
                    .zip(&d_row[lo..hi])
                {
                    *d += v;
                }
            } else {
                for ox in lo..hi {
                    dx_row[ox * g.sw + kx * g.dw - g.pw] += d_row[ox];
                }
            }
        }
    }
}

/// The fast CPU weight gradient: dW = sum over images of dy_img cols_img^T, the images cut into
/// a shape-determined number of blocks (one partial each, summed in block order).
fn fast_weight_grad(g: &Geom, dy: &[f32], x: &[f32]) -> Vec<f32> {
    use rayon::prelude::*;
    if g.is_depthwise() {
        return depthwise_weight_grad(g, dy, x);
    }
    let (in_len, out_len, plane) = (g.cin * g.h * g.w, g.cout * g.oh * g.ow, g.oh * g.ow);
    let (m, k) = (g.cout_g, g.cin_g * g.kh * g.kw);
    let dw_len = g.cout * k;
    let blocks = cpu::block_ranges(g.n, cpu::reduction_blocks(g.n));
    let parallel_gemm = blocks.len() < cpu::threads();
    let partials: Vec<Vec<f32>> = blocks
        .par_iter()
        .map(|images| {
            let (mut dw, mut scratch) = (vec![0.0; dw_len], Vec::new());
            for img in images.clone() {
                let cols = image_columns(g, &x[img * in_len..(img + 1) * in_len], &mut scratch);
                let dy_img = &dy[img * out_len..(img + 1) * out_len];
                for group in 0..g.groups {
                    cpu::sgemm(
                        (m, k, plane),
                        &dy_img[group * m * plane..],
                        cpu::Strides::rows(plane),
                        &cols[group * k * plane..],
                        cpu::Strides::transposed(plane),
                        &mut dw[group * m * k..],
                        k,
                        true,
                        parallel_gemm,
                    );
                }
            }
            dw
        })
        .collect();
    cpu::sum_partials(&partials, dw_len)
}

/// Per-channel sums of dy, each channel summed by one task, images in order.
fn fast_bias_grad(g: &Geom, dy: &[f32]) -> Vec<f32> {
    use rayon::prelude::*;
    let plane = g.oh * g.ow;
    (0..g.cout)
        .into_par_iter()
        .map(|c| {
            (0..g.n)
                .map(|img| {
                    let start = (img * g.cout + c) * plane;
                    dy[start..start + plane].iter().sum::<f32>()
                })
                .sum()
        })
        .collect()
}

/// For each output plane (image, output channel) of a depthwise convolution: the input plane
/// it reads. Each input channel feeds `cout / cin` consecutive output channels.
fn depthwise_source(g: &Geom, img: usize, co: usize) -> usize {
    img * g.cin + co / g.cout_g
}

/// Adds tap (ky, kx) of weight `wv` times input plane `x_plane` onto output plane `y_plane`.
fn depthwise_tap(g: &Geom, ky: usize, kx: usize, wv: f32, x_plane: &[f32], y_plane: &mut [f32]) {
    let (lo, hi) = valid_columns(g, kx);
    if lo == hi {
        return;
    }
    for (oy, y_row) in y_plane.chunks_mut(g.ow).enumerate() {
        let Some(iy) = (oy * g.sh + ky * g.dh)
            .checked_sub(g.ph)
            .filter(|&iy| iy < g.h)
        else {
            continue;
        };
        let x_row = &x_plane[iy * g.w..(iy + 1) * g.w];
        if g.sw == 1 {
            let start = lo + kx * g.dw - g.pw;
            for (y, &xv) in y_row[lo..hi].iter_mut().zip(&x_row[start..start + hi - lo]) {
                *y += wv * xv;
            }
        } else {
            for ox in lo..hi {
                y_row[ox] += wv * x_row[ox * g.sw + kx * g.dw - g.pw];
            }
        }
    }
}

/// Depthwise forward: one task per output plane.
fn depthwise_forward(g: &Geom, x: &[f32], w: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
    use rayon::prelude::*;
    let (plane, in_plane, taps) = (g.oh * g.ow, g.h * g.w, g.kh * g.kw);
    let mut y = vec![0.0; g.n * g.cout * plane];
    y.par_chunks_mut(plane.max(1))
        .enumerate()
        .for_each(|(p, y_plane)| {
            let (img, co) = (p / g.cout, p % g.cout);
            y_plane.fill(bias.map_or(0.0, |b| b[co]));
            let src = depthwise_source(g, img, co);
            let x_plane = &x[src * in_plane..(src + 1) * in_plane];
            for t in 0..taps {
                depthwise_tap(g, t / g.kw, t % g.kw, w[co * taps + t], x_plane, y_plane);
            }
        });
    y
}

/// Depthwise input gradient: one task per input plane, gathering from its output planes.
fn depthwise_input_grad(g: &Geom, dy: &[f32], w: &[f32]) -> Vec<f32> {
    use rayon::prelude::*;
    let (plane, in_plane, taps) = (g.oh * g.ow, g.h * g.w, g.kh * g.kw);
    let mut dx = vec![0.0; g.n * g.cin * in_plane];
    dx.par_chunks_mut(in_plane.max(1))
        .enumerate()
        .for_each(|(p, dx_plane)| {
            let (img, ci) = (p / g.cin, p % g.cin);
            for co in ci * g.cout_g..(ci + 1) * g.cout_g {
                let dy_plane = &dy[(img * g.cout + co) * plane..][..plane];
                for t in 0..taps {
                    depthwise_tap_transposed(
                        g,
                        t / g.kw,
                        t % g.kw,
                        w[co * taps + t],
                        dy_plane,
                        dx_plane,
                    );
                }
            }
        });
    dx
}

/// The transpose of [`depthwise_tap`]: scatters `wv` times an output plane onto its input plane.
fn depthwise_tap_transposed(
    g: &Geom,
    ky: usize,
    kx: usize,
    wv: f32,
    dy_plane: &[f32],
    dx_plane: &mut [f32],
) {
    let (lo, hi) = valid_columns(g, kx);
    if lo == hi {
        return;
    }
    for (oy, dy_row) in dy_plane.chunks(g.ow).enumerate() {
        let Some(iy) = (oy * g.sh + ky * g.dh)
            .checked_sub(g.ph)
            .filter(|&iy| iy < g.h)
        else {
            continue;
        };
        let dx_row = &mut dx_plane[iy * g.w..(iy + 1) * g.w];
        if g.sw == 1 {
            let start = lo + kx * g.dw - g.pw;
            for (d, &v) in dx_row[start..start + hi - lo]
                .iter_mut()
                .zip(&dy_row[lo..hi])
            {
                *d += wv * v;
            }
        } else {
            for ox in lo..hi {
                dx_row[ox * g.sw + kx * g.dw - g.pw] += wv * dy_row[ox];
            }
        }
    }
}

/// Depthwise weight gradient: one task per output channel, images and pixels in order.
fn depthwise_weight_grad(g: &Geom, dy: &[f32], x: &[f32]) -> Vec<f32> {
    use rayon::prelude::*;
    let (plane, in_plane, taps) = (g.oh * g.ow, g.h * g.w, g.kh * g.kw);
    let mut dw = vec![0.0; g.cout * taps];
    dw.par_chunks_mut(taps).enumerate().for_each(|(co, dw_co)| {
        for img in 0..g.n {
            let src = depthwise_source(g, img, co);
            let x_plane = &x[src * in_plane..(src + 1) * in_plane];
            let dy_plane = &dy[(img * g.cout + co) * plane..][..plane];
            for (t, d) in dw_co.iter_mut().enumerate() {
                *d += depthwise_tap_dot(g, t / g.kw, t % g.kw, x_plane, dy_plane);
            }
        }
    });
    dw
}

/// sum over output pixels of dy * the input pixel that tap (ky, kx) reads.
fn depthwise_tap_dot(g: &Geom, ky: usize, kx: usize, x_plane: &[f32], dy_plane: &[f32]) -> f32 {
    let (lo, hi) = valid_columns(g, kx);
    let mut total = 0.0;
    for (oy, dy_row) in dy_plane.chunks(g.ow).enumerate() {
        let Some(iy) = (oy * g.sh + ky * g.dh)
            .checked_sub(g.ph)
            .filter(|&iy| iy < g.h)
        else {
            continue;
        };
        let x_row = &x_plane[iy * g.w..(iy + 1) * g.w];
        total += if g.sw == 1 && lo < hi {
            let start = lo + kx * g.dw - g.pw;
            cpu::lane_dot(&dy_row[lo..hi], &x_row[start..start + hi - lo])
        } else {
            (lo..hi)
                .map(|ox| dy_row[ox] * x_row[ox * g.sw + kx * g.dw - g.pw])
                .sum()
        };
    }
    total
}

// ------------------------------------------------------------------ GPU launches

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

fn gpu_forward(
    ctx: &Arc<GpuContext>,
    g: &Geom,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    if use_gemm_route(ctx, g) {
        return gemm_forward(ctx, g, x, w, bias);
    }
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

fn gpu_input_grad(ctx: &Arc<GpuContext>, g: &Geom, dy: &Tensor, w: &Tensor) -> Result<Tensor> {
    if use_gemm_route(ctx, g) {
        return gemm_input_grad(ctx, g, dy, w);
    }
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

fn gpu_weight_grad(ctx: &Arc<GpuContext>, g: &Geom, dy: &Tensor, x: &Tensor) -> Result<Tensor> {
    if use_gemm_route(ctx, g) {
        return gemm_weight_grad(ctx, g, dy, x);
    }
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

fn gpu_bias_grad(ctx: &Arc<GpuContext>, g: &Geom, dy: &Tensor) -> Result<Tensor> {
    let out = ctx.alloc(g.cout)?;
    let unused = unused_binding(ctx)?;
    let l = Grid {
        total_groups: g.cout,
        ..Default::default()
    };
    run(ctx, &BIAS_GRAD, g, &l, [dy.gpu()?, &unused, &unused, &out])?;
    Tensor::from_gpu(out, &[g.cout])
}

// ------------------------------------------------------------------ im2col + GEMM route

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

/// Whether a convolution runs as im2col + the vec4 GEMM. On CPU adapters that GEMM runs several
/// times faster than the implicit-GEMM kernels (every load there is a per-lane loop, and the
/// GEMM reads vec4s; benches/RESULTS.md has the figures), which outweighs writing the column
/// matrix; on discrete GPUs the implicit GEMM
/// avoids that traffic. Needs ungrouped convolutions, output planes of a multiple of 4 pixels
/// (vec4 rows) and a column matrix within one binding.
fn use_gemm_route(ctx: &GpuContext, g: &Geom) -> bool {
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
fn padded_k(g: &Geom) -> usize {
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

fn gemm_forward(
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

fn gemm_input_grad(ctx: &Arc<GpuContext>, g: &Geom, dy: &Tensor, w: &Tensor) -> Result<Tensor> {
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

fn gemm_weight_grad(ctx: &Arc<GpuContext>, g: &Geom, dy: &Tensor, x: &Tensor) -> Result<Tensor> {
    let (kp, plane) = (padded_k(g), g.oh * g.ow);
    let dy3 = dy.reshape_raw(&[g.n, g.cout, plane])?;
    // Per image [C_out, K'], then summed over images.
    let per_image = gemm_raw(&dy3, &columns(ctx, g, x)?, false, true)?;
    let summed = sum_images(ctx, &per_image.reshape_raw(&[g.n, g.cout * kp])?)?;
    let dw = resize_cols(ctx, g, &summed, g.cout, kp, g.cin * g.kh * g.kw)?;
    dw.reshape_raw(&[g.cout, g.cin, g.kh, g.kw])
}

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
            Ok([gpu_bias_grad(
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

/// y = conv2d(x, w) + bias, x [N, C_in, H, W] -> y [N, C_out, H_out, W_out]. Recorded.
pub fn conv2d(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, p: Conv2dParams) -> Result<Tensor> {
    let y = conv2d_raw(x, w, bias, p)?;
    let back = Conv2dBack { p };
    Ok(match bias {
        Some(b) => y.record(back, &[x, w, b]),
        None => y.record(back, &[x, w]),
    })
}
