//! The rows of an im2col matrix: gathering one row from an image, and adding a row's gradient
//! back onto the image. Shared by the per-image and the blocks-of-images CPU routes.

use super::geom::Geom;

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

/// The output columns `lo..hi` whose tap `kx` reads inside the image row.
pub(super) fn valid_columns(g: &Geom, kx: usize) -> (usize, usize) {
    let offset = kx * g.dw; // ix = ox * sw + offset - pw
    let lo = g.pw.saturating_sub(offset).div_ceil(g.sw);
    let hi = if g.w + g.pw > offset {
        ((g.w + g.pw - offset - 1) / g.sw + 1).min(g.ow)
    } else {
        0
    };
    (lo.min(hi), hi)
}

/// Dilation 1: every column row is a window of the zero-padded image read at the strides, so
/// [`fill_columns_padded`] and [`add_columns_padded`] copy whole output rows (straight copies at
/// stride 1) without the per-row edge handling of [`fill_column_row`] (most of whose time went
/// to library calls for runs of 0-2 padding values and 14-28 pixels).
pub(super) fn is_undilated(g: &Geom) -> bool {
    g.dh == 1 && g.dw == 1 && g.h * g.w > 0 && g.oh * g.ow > 0
}

/// Height and width of an image plane zero-padded by (ph, pw) on every side.
fn padded_dims(g: &Geom) -> (usize, usize) {
    (g.h + 2 * g.ph, g.w + 2 * g.pw)
}

/// Values in one zero-padded image.
pub(super) fn padded_len(g: &Geom) -> usize {
    let (hp, wp) = padded_dims(g);
    g.cin * hp * wp
}

/// Where image row `y` lies inside its zero-padded plane.
fn interior_row(g: &Geom, y: usize) -> std::ops::Range<usize> {
    let start = (y + g.ph) * padded_dims(g).1 + g.pw;
    start..start + g.w
}

/// One image's whole im2col matrix [C_in * kh * kw, H_out * W_out] into `cols`, row `r` at
/// `cols[r * ld..]` (`ld` is the plane for one image's matrix, more when images lie side by
/// side), for a convolution with [`is_undilated`]; `padded` ([`padded_len`] long) is scratch.
/// Equal to [`fill_column_row`] over every row.
pub(super) fn fill_columns_padded(
    g: &Geom,
    x_img: &[f32],
    padded: &mut [f32],
    cols: &mut [f32],
    ld: usize,
) {
    let (hp, wp) = padded_dims(g);
    padded.fill(0.0);
    for (x_plane, p_plane) in x_img
        .chunks_exact(g.h * g.w)
        .zip(padded.chunks_exact_mut(hp * wp))
    {
        for (y, x_row) in x_plane.chunks_exact(g.w).enumerate() {
            p_plane[interior_row(g, y)].copy_from_slice(x_row);
        }
    }
    let plane = g.oh * g.ow;
    for row in 0..g.cin * g.kh * g.kw {
        let col_row = &mut cols[row * ld..row * ld + plane];
        let window = &padded[window_start(g, row)..];
        for (oy, out) in col_row.chunks_exact_mut(g.ow).enumerate() {
            let src = &window[oy * g.sh * wp..];
            if g.sw == 1 {
                out.copy_from_slice(&src[..g.ow]);
            } else {
                for (ox, o) in out.iter_mut().enumerate() {
                    *o = src[ox * g.sw];
                }
            }
        }
    }
}

/// The transpose of [`fill_columns_padded`]: `dx_img` (overwritten) gets the column-matrix
/// gradient `dcol` (row `r` at `dcol[r * ld..]`) added up in the padded image, with the
/// additions in [`add_column_row`]'s order, so each pixel's sum has the same bits as col2im
/// onto zeros.
pub(super) fn add_columns_padded(
    g: &Geom,
    dcol: &[f32],
    ld: usize,
    padded: &mut [f32],
    dx_img: &mut [f32],
) {
    let (hp, wp) = padded_dims(g);
    padded.fill(0.0);
    let plane = g.oh * g.ow;
    for row in 0..g.cin * g.kh * g.kw {
        let d_plane = &dcol[row * ld..row * ld + plane];
        let window = &mut padded[window_start(g, row)..];
        for (oy, d_row) in d_plane.chunks_exact(g.ow).enumerate() {
            let dst = &mut window[oy * g.sh * wp..];
            if g.sw == 1 {
                for (acc, &v) in dst[..g.ow].iter_mut().zip(d_row) {
                    *acc += v;
                }
            } else {
                for (ox, &v) in d_row.iter().enumerate() {
                    dst[ox * g.sw] += v;
                }
            }
        }
    }
    for (dx_plane, p_plane) in dx_img
        .chunks_exact_mut(g.h * g.w)
        .zip(padded.chunks_exact(hp * wp))
    {
        for (y, dx_row) in dx_plane.chunks_exact_mut(g.w).enumerate() {
            dx_row.copy_from_slice(&p_plane[interior_row(g, y)]);
        }
    }
}

/// Where column row `row` (input channel, ky, kx) starts reading in the padded image.
fn window_start(g: &Geom, row: usize) -> usize {
    let (ci, ky, kx) = (row / (g.kh * g.kw), (row / g.kw) % g.kh, row % g.kw);
    let (hp, wp) = padded_dims(g);
    ci * hp * wp + ky * wp + kx
}
