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
