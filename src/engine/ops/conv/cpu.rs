//! The CPU fast path: depthwise convolutions by direct loops, the others as one GEMM per image
//! and group over an im2col matrix (the input itself for pointwise convolutions), or, for small
//! output planes, per block of images ([`super::blocked`]). Tested against the plain loops of
//! `engine::reference` by tests/ops_conv.rs, which covers every [`CpuConvRoute`].

use super::blocked;
use super::geom::Geom;
use crate::engine::cpu;

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
        return depthwise_forward(g, x, w, bias);
    }
    if blocked::takes_blocked_path(g) {
        return blocked::forward(g, x, w, bias);
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
        fill_column_row(g, x_img, row, col_row);
    }
    &scratch[..rows * plane]
}

/// Row `row` (input channel, ky, kx) of one image's im2col matrix: the input pixel each output
/// pixel's tap reads, 0 where it reads padding. `out` is one output plane long.
pub(super) fn fill_column_row(g: &Geom, x_img: &[f32], row: usize, out: &mut [f32]) {
    let (ci, ky, kx) = (row / (g.kh * g.kw), (row / g.kw) % g.kh, row % g.kw);
    let x_plane = &x_img[ci * g.h * g.w..(ci + 1) * g.h * g.w];
    let (lo, hi) = valid_columns(g, kx);
    for (oy, out_row) in out.chunks_mut(g.ow).enumerate() {
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
pub(super) fn fast_input_grad(g: &Geom, dy: &[f32], w: &[f32]) -> Vec<f32> {
    if g.is_depthwise() {
        return depthwise_input_grad(g, dy, w);
    }
    if blocked::takes_blocked_path(g) {
        return blocked::input_grad(g, dy, w);
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
    for (row, col_row) in dcol.chunks(g.oh * g.ow).enumerate() {
        add_column_row(g, col_row, row, dx_img);
    }
}

/// The transpose of [`fill_column_row`]: adds row `row` of a column-matrix gradient onto the
/// input pixels that row was gathered from.
pub(super) fn add_column_row(g: &Geom, d_row_plane: &[f32], row: usize, dx_img: &mut [f32]) {
    let (ci, ky, kx) = (row / (g.kh * g.kw), (row / g.kw) % g.kh, row % g.kw);
    let dx_plane = &mut dx_img[ci * g.h * g.w..(ci + 1) * g.h * g.w];
    let (lo, hi) = valid_columns(g, kx);
    for (oy, d_row) in d_row_plane.chunks(g.ow).enumerate() {
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

/// The fast CPU weight gradient: dW = sum over images of dy_img cols_img^T, the images cut into
/// a shape-determined number of blocks (one partial each, summed in block order).
pub(super) fn fast_weight_grad(g: &Geom, dy: &[f32], x: &[f32]) -> Vec<f32> {
    use rayon::prelude::*;
    if g.is_depthwise() {
        return depthwise_weight_grad(g, dy, x);
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
