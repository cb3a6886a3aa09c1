//! The CPU fast path: depthwise convolutions by direct loops, the others as one GEMM per image
//! and group over an im2col matrix (the input itself for pointwise convolutions), or, for small
//! output planes, per block of images ([`super::blocked`]). Tested against the plain loops of
//! `engine::reference` by tests/ops_conv.rs, which covers every [`CpuConvRoute`].

use super::blocked;
use super::columns::{
    add_column_row, add_columns_padded, fill_column_row, fill_columns_padded, is_undilated,
    padded_len,
};
use super::depthwise;
use super::geom::Geom;
use crate::engine::{cpu, host_pool};

/// Which fast CPU code runs a convolution (the same for its forward and both gradients).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CpuConvRoute {
    /// Direct loops per plane.
    Depthwise,
    /// One GEMM per image (and group) over its im2col matrix.
    PerImage,
    /// One GEMM per block of images, their column matrices side by side.
    ImageBlocks,
}

pub(super) fn route(g: &Geom) -> CpuConvRoute {
    if g.is_depthwise() {
        CpuConvRoute::Depthwise
    } else if blocked::takes_blocked_path(g) {
        CpuConvRoute::ImageBlocks
    } else {
        CpuConvRoute::PerImage
    }
}

/// The fast CPU forward: depthwise convolutions by direct loops, the others as one GEMM per
/// image and group over an im2col matrix (the input itself for pointwise convolutions).
pub(super) fn fast_forward(g: &Geom, x: &[f32], w: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
    if g.is_depthwise() {
        return depthwise::forward(g, x, w, bias);
    }
    if blocked::takes_blocked_path(g) {
        return blocked::forward(g, x, w, bias);
    }
    let (in_len, out_len, plane) = (g.cin * g.h * g.w, g.cout * g.oh * g.ow, g.oh * g.ow);
    // Every output plane starts as its bias, written below.
    let mut y = host_pool::for_overwrite(g.n * out_len);
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
            .for_each_init(host_pool::Scratch::take, |scratch, (img, o)| {
                f(img, o, false, scratch)
            });
    } else {
        let mut scratch = host_pool::Scratch::take();
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
    let len = rows * plane;
    if is_undilated(g) {
        scratch.resize(len + padded_len(g), 0.0);
        let (cols, padded) = scratch.split_at_mut(len);
        fill_columns_padded(g, x_img, padded, cols, plane);
        return &scratch[..len];
    }
    // Every element is written below (padding included), so old contents need no clearing.
    scratch.resize(len, 0.0);
    for (row, col_row) in scratch[..len].chunks_mut(plane).enumerate() {
        fill_column_row(g, x_img, row, col_row);
    }
    &scratch[..len]
}

/// 1x1, stride 1, no padding, one group: the input is the column matrix (any channel count).
fn is_plain_pointwise(g: &Geom) -> bool {
    g.kh == 1 && g.kw == 1 && g.sh == 1 && g.sw == 1 && g.ph == 0 && g.pw == 0 && g.groups == 1
}

/// The fast CPU input gradient: per image, dcol = W^T dy by GEMM, then col2im.
pub(super) fn fast_input_grad(g: &Geom, dy: &[f32], w: &[f32]) -> Vec<f32> {
    if g.is_depthwise() {
        return depthwise::input_grad(g, dy, w);
    }
    if blocked::takes_blocked_path(g) {
        return blocked::input_grad(g, dy, w);
    }
    let (in_len, out_len, plane) = (g.cin * g.h * g.w, g.cout * g.oh * g.ow, g.oh * g.ow);
    let (m, k) = (g.cout_g, g.cin_g * g.kh * g.kw);
    let pointwise = is_plain_pointwise(g);
    let via_padded = !pointwise && is_undilated(g);
    // The pointwise GEMMs and the padded-image col2im write every pixel; the general col2im adds.
    let mut dx = if pointwise || via_padded {
        host_pool::for_overwrite(g.n * in_len)
    } else {
        host_pool::zeroed(g.n * in_len)
    };
    for_each_image(&mut dx, in_len, g.n, |img, dx_img, parallel_gemm, dcol| {
        let dy_img = &dy[img * out_len..(img + 1) * out_len];
        let dcol_len = g.cin * g.kh * g.kw * plane;
        if !pointwise {
            // Fully written by the GEMMs (no accumulation), so old contents need no clearing;
            // the padded-image col2im adds up in a padded image after it.
            let padded = if via_padded { padded_len(g) } else { 0 };
            dcol.resize(dcol_len + padded, 0.0);
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
        if via_padded {
            let (dcol, padded) = dcol.split_at_mut(dcol_len);
            add_columns_padded(g, dcol, plane, padded, dx_img);
        } else if !pointwise {
            col2im(g, &dcol[..dcol_len], dx_img);
        }
    });
    dx
}

/// Adds a column-matrix gradient back onto the image it was gathered from (dx_img starts zero).
fn col2im(g: &Geom, dcol: &[f32], dx_img: &mut [f32]) {
    for (row, col_row) in dcol.chunks(g.oh * g.ow).enumerate() {
        add_column_row(g, col_row, row, dx_img);
    }
}

/// The fast CPU weight gradient: dW = sum over images of dy_img cols_img^T, the images cut into
/// a shape-determined number of blocks (one partial each, summed in block order).
pub(super) fn fast_weight_grad(g: &Geom, dy: &[f32], x: &[f32]) -> Vec<f32> {
    use rayon::prelude::*;
    if g.is_depthwise() {
        return depthwise::weight_grad(g, dy, x);
    }
    if blocked::takes_blocked_path(g) {
        return blocked::weight_grad(g, dy, x);
    }
    let (in_len, out_len, plane) = (g.cin * g.h * g.w, g.cout * g.oh * g.ow, g.oh * g.ow);
    let (m, k) = (g.cout_g, g.cin_g * g.kh * g.kw);
    let dw_len = g.cout * k;
    let blocks = cpu::block_ranges(g.n, cpu::reduction_blocks(g.n));
    let parallel_gemm = blocks.len() < cpu::threads();
    let partials: Vec<Vec<f32>> = blocks
        .par_iter()
        .map(|images| {
            let (mut dw, mut scratch) = (vec![0.0; dw_len], host_pool::Scratch::take());
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
pub(super) fn fast_bias_grad(g: &Geom, dy: &[f32]) -> Vec<f32> {
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
