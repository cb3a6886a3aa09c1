//! The CPU depthwise convolutions (one filter per channel, MobileNetV2's): direct loops over
//! planes, with no GEMM, forward and both gradients.

use super::columns::valid_columns;
use super::geom::Geom;
use crate::engine::{cpu, host_pool};

/// For each output plane (image, output channel) of a depthwise convolution: the input plane
/// it reads. Each input channel feeds `cout / cin` consecutive output channels.
fn source_plane(g: &Geom, img: usize, co: usize) -> usize {
    img * g.cin + co / g.cout_g
}

/// Adds tap (ky, kx) of weight `wv` times input plane `x_plane` onto output plane `y_plane`.
fn tap(g: &Geom, ky: usize, kx: usize, wv: f32, x_plane: &[f32], y_plane: &mut [f32]) {
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
pub(super) fn forward(g: &Geom, x: &[f32], w: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
    use rayon::prelude::*;
    let (plane, in_plane, taps) = (g.oh * g.ow, g.h * g.w, g.kh * g.kw);
    let mut y = host_pool::zeroed(g.n * g.cout * plane);
    y.par_chunks_mut(plane.max(1))
        .enumerate()
        .for_each(|(p, y_plane)| {
            let (img, co) = (p / g.cout, p % g.cout);
            y_plane.fill(bias.map_or(0.0, |b| b[co]));
            let src = source_plane(g, img, co);
            let x_plane = &x[src * in_plane..(src + 1) * in_plane];
            for t in 0..taps {
                tap(g, t / g.kw, t % g.kw, w[co * taps + t], x_plane, y_plane);
            }
        });
    y
}

/// Depthwise input gradient: one task per input plane, gathering from its output planes.
pub(super) fn input_grad(g: &Geom, dy: &[f32], w: &[f32]) -> Vec<f32> {
    use rayon::prelude::*;
    let (plane, in_plane, taps) = (g.oh * g.ow, g.h * g.w, g.kh * g.kw);
    let mut dx = host_pool::zeroed(g.n * g.cin * in_plane);
    dx.par_chunks_mut(in_plane.max(1))
        .enumerate()
        .for_each(|(p, dx_plane)| {
            let (img, ci) = (p / g.cin, p % g.cin);
            for co in ci * g.cout_g..(ci + 1) * g.cout_g {
                let dy_plane = &dy[(img * g.cout + co) * plane..][..plane];
                for t in 0..taps {
                    tap_transposed(g, t / g.kw, t % g.kw, w[co * taps + t], dy_plane, dx_plane);
                }
            }
        });
    dx
}

/// The transpose of [`tap`]: scatters `wv` times an output plane onto its input plane.
fn tap_transposed(g: &Geom, ky: usize, kx: usize, wv: f32, dy_plane: &[f32], dx_plane: &mut [f32]) {
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
pub(super) fn weight_grad(g: &Geom, dy: &[f32], x: &[f32]) -> Vec<f32> {
    use rayon::prelude::*;
    let (plane, in_plane, taps) = (g.oh * g.ow, g.h * g.w, g.kh * g.kw);
    let mut dw = vec![0.0; g.cout * taps];
    dw.par_chunks_mut(taps).enumerate().for_each(|(co, dw_co)| {
        for img in 0..g.n {
            let src = source_plane(g, img, co);
            let x_plane = &x[src * in_plane..(src + 1) * in_plane];
            let dy_plane = &dy[(img * g.cout + co) * plane..][..plane];
            for (t, d) in dw_co.iter_mut().enumerate() {
                *d += tap_dot(g, t / g.kw, t % g.kw, x_plane, dy_plane);
            }
        }
    });
    dw
}

/// sum over output pixels of dy * the input pixel that tap (ky, kx) reads.
fn tap_dot(g: &Geom, ky: usize, kx: usize, x_plane: &[f32], dy_plane: &[f32]) -> f32 {
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
