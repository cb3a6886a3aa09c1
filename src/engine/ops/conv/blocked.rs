//! The CPU path of convolutions whose output planes are small (ResNet's and MobileNetV2's last
//! stages at 64x64 inputs have 2x2 to 7x7 pixels). There, one GEMM per image has a dimension of
//! a few pixels: the micro-kernels run mostly on padding, and the weight gradient reduces over a
//! handful of pixels per image while rewriting a weight-sized partial for every image (9.4 MB a
//! time for ResNet-18's last 3x3 convolution). Here the images go in blocks whose column
//! matrices lie side by side, [C_in * kh * kw, B * plane], so every GEMM has at least
//! [`MIN_BLOCK_COLUMNS`] columns and the weight gradient one partial per block.
//!
//! Determinism: the blocks depend on the shapes alone, each output element is reduced by one
//! GEMM (gemm never splits its K reduction over threads), and the weight gradient sums the
//! blocks' partials in block order. Tested against the reference loops by tests/ops_conv.rs.

use super::columns::{
    add_column_row, add_columns_padded, fill_column_row, fill_columns_padded, is_undilated,
    padded_len,
};
use super::geom::Geom;
use crate::engine::{cpu, host_pool};
use rayon::prelude::*;

/// Output planes below this many pixels take the blocked path.
const SMALL_PLANE: usize = 64;
/// Columns a block's GEMM aims for: enough to fill the widest micro-kernel several times.
const MIN_BLOCK_COLUMNS: usize = 256;

/// Whether `g` takes this path: an ungrouped-or-grouped (not depthwise) convolution of small
/// output planes over more than one image.
pub(super) fn takes_blocked_path(g: &Geom) -> bool {
    g.oh * g.ow < SMALL_PLANE && g.n > 1 && !g.is_depthwise()
}

/// Images per block: a function of the shapes only.
fn images_per_block(g: &Geom) -> usize {
    MIN_BLOCK_COLUMNS.div_ceil(g.oh * g.ow).clamp(1, g.n)
}

/// Rows of the column matrix (all groups), and the reduction length of one group.
fn column_rows(g: &Geom) -> (usize, usize) {
    let k = g.cin_g * g.kh * g.kw;
    (g.groups * k, k)
}

/// The column matrices of `images` images starting at `first`, side by side:
/// [C_in * kh * kw, images * plane], written whole into `scratch`.
fn block_columns<'a>(
    g: &Geom,
    x: &[f32],
    first: usize,
    images: usize,
    scratch: &'a mut Vec<f32>,
) -> &'a [f32] {
    let (plane, in_len) = (g.oh * g.ow, g.cin * g.h * g.w);
    let (rows, _) = column_rows(g);
    let ld = images * plane;
    let via_padded = is_undilated(g);
    let padded = if via_padded { padded_len(g) } else { 0 };
    scratch.resize(rows * ld + padded, 0.0);
    let (cols, padded) = scratch.split_at_mut(rows * ld);
    for b in 0..images {
        let x_img = &x[(first + b) * in_len..(first + b + 1) * in_len];
        if via_padded {
            fill_columns_padded(g, x_img, padded, &mut cols[b * plane..], ld);
            continue;
        }
        for row in 0..rows {
            let start = row * ld + b * plane;
            fill_column_row(g, x_img, row, &mut cols[start..start + plane]);
        }
    }
    &scratch[..rows * ld]
}

/// `images` planes-of-channels [images, C, plane] (NCHW) as one matrix [C, images * plane].
fn gather_channels(src: &[f32], channels: usize, plane: usize, images: usize, out: &mut Vec<f32>) {
    let ld = images * plane;
    out.resize(channels * ld, 0.0);
    for b in 0..images {
        for c in 0..channels {
            let from = (b * channels + c) * plane;
            out[c * ld + b * plane..c * ld + (b + 1) * plane]
                .copy_from_slice(&src[from..from + plane]);
        }
    }
}

/// Runs `f(first image, image count, output of those images, parallel GEMM)` for every block;
/// blocks spread over the pool when there are enough of them, else their GEMMs do.
fn for_each_block(
    g: &Geom,
    out: &mut [f32],
    per_image: usize,
    f: impl Fn(usize, usize, &mut [f32], bool) + Sync,
) {
    let per_block = images_per_block(g);
    let blocks = g.n.div_ceil(per_block);
    let chunk = per_block * per_image;
    if blocks >= cpu::threads() {
        out.par_chunks_mut(chunk).enumerate().for_each(|(i, o)| {
            f(i * per_block, o.len() / per_image, o, false);
        });
    } else {
        for (i, o) in out.chunks_mut(chunk).enumerate() {
            f(i * per_block, o.len() / per_image, o, true);
        }
    }
}

/// Forward: per block, Y[C_out, B * plane] = W x columns, then scattered to NCHW with the bias.
pub(super) fn forward(g: &Geom, x: &[f32], w: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
    let (plane, out_len) = (g.oh * g.ow, g.cout * g.oh * g.ow);
    let (_, k) = column_rows(g);
    let m = g.cout_g;
    let mut y = host_pool::zeroed(g.n * out_len);
    for_each_block(g, &mut y, out_len, |first, images, y_blk, parallel| {
        let (mut cols, mut prod) = (Vec::new(), vec![0.0; g.cout * images * plane]);
        let cols = block_columns(g, x, first, images, &mut cols);
        let ld = images * plane;
        for group in 0..g.groups {
            cpu::sgemm(
                (m, ld, k),
                &w[group * m * k..],
                cpu::Strides::rows(k),
                &cols[group * k * ld..],
                cpu::Strides::rows(ld),
                &mut prod[group * m * ld..],
                ld,
                false,
                parallel,
            );
        }
        for b in 0..images {
            for co in 0..g.cout {
                let add = bias.map_or(0.0, |bias| bias[co]);
                let dst = &mut y_blk[(b * g.cout + co) * plane..(b * g.cout + co + 1) * plane];
                let src = &prod[co * ld + b * plane..co * ld + (b + 1) * plane];
                for (d, &s) in dst.iter_mut().zip(src) {
                    *d = s + add;
                }
            }
        }
    });
    y
}

/// Input gradient: per block, dcol[K, B * plane] = W^T dY, then added back onto each image.
pub(super) fn input_grad(g: &Geom, dy: &[f32], w: &[f32]) -> Vec<f32> {
    let (plane, in_len, out_len) = (g.oh * g.ow, g.cin * g.h * g.w, g.cout * g.oh * g.ow);
    let (rows, k) = column_rows(g);
    let m = g.cout_g;
    let mut dx = host_pool::zeroed(g.n * in_len);
    for_each_block(g, &mut dx, in_len, |first, images, dx_blk, parallel| {
        let ld = images * plane;
        let mut dy_blk = Vec::new();
        let dy_src = &dy[first * out_len..(first + images) * out_len];
        gather_channels(dy_src, g.cout, plane, images, &mut dy_blk);
        let mut dcol = vec![0.0; rows * ld];
        for group in 0..g.groups {
            cpu::sgemm(
                (k, ld, m),
                &w[group * m * k..],
                cpu::Strides::transposed(k),
                &dy_blk[group * m * ld..],
                cpu::Strides::rows(ld),
                &mut dcol[group * k * ld..],
                ld,
                false,
                parallel,
            );
        }
        let mut padded = vec![0.0; if is_undilated(g) { padded_len(g) } else { 0 }];
        for (b, dx_img) in dx_blk.chunks_mut(in_len).enumerate() {
            if is_undilated(g) {
                add_columns_padded(g, &dcol[b * plane..], ld, &mut padded, dx_img);
                continue;
            }
            for row in 0..rows {
                let start = row * ld + b * plane;
                add_column_row(g, &dcol[start..start + plane], row, dx_img);
            }
        }
    });
    dx
}

/// Weight gradient: dW = sum over blocks of dY_blk columns_blk^T, one partial per block,
/// summed in block order.
pub(super) fn weight_grad(g: &Geom, dy: &[f32], x: &[f32]) -> Vec<f32> {
    let (plane, out_len) = (g.oh * g.ow, g.cout * g.oh * g.ow);
    let (_, k) = column_rows(g);
    let m = g.cout_g;
    let dw_len = g.cout * k;
    let per_block = images_per_block(g);
    let starts: Vec<usize> = (0..g.n).step_by(per_block).collect();
    let parallel = starts.len() < cpu::threads();
    let partials: Vec<Vec<f32>> = starts
        .par_iter()
        .map(|&first| {
            let images = per_block.min(g.n - first);
            let ld = images * plane;
            let (mut cols, mut dy_blk) = (Vec::new(), Vec::new());
            let cols = block_columns(g, x, first, images, &mut cols);
            let dy_src = &dy[first * out_len..(first + images) * out_len];
            gather_channels(dy_src, g.cout, plane, images, &mut dy_blk);
            let mut dw = vec![0.0; dw_len];
            for group in 0..g.groups {
                cpu::sgemm(
                    (m, k, ld),
                    &dy_blk[group * m * ld..],
                    cpu::Strides::rows(ld),
                    &cols[group * k * ld..],
                    cpu::Strides::transposed(ld),
                    &mut dw[group * m * k..],
                    k,
                    false,
                    parallel,
                );
            }
            dw
        })
        .collect();
    if partials.len() == 1 {
        return partials.into_iter().next().unwrap_or_default();
    }
    cpu::sum_partials(&partials, dw_len)
}
