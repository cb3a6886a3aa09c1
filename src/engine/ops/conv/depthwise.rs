//! The CPU depthwise convolutions (one filter per channel, MobileNetV2's): direct loops over
//! planes, with no GEMM, forward and both gradients.
//!
//! MobileNetV2's planes are small (2 to 32 pixels a row at 64x64 inputs), so loops per tap and
//! row that skip the padding spend most of their time starting, ending and finding the border.
//! The forward and the stride-1 input gradient therefore first copy the plane they read into a
//! zero-padded one, where every tap of every pixel is a plain read; a 3x3 stride-1 kernel then
//! takes all nine taps of a pixel in one vectorised pass, and so does the forward of a 3x3
//! kernel of stride 2 once each padded row is stored as its even columns, then its odd ones
//! (the strided reads become contiguous ones). Each pixel still adds its taps in
//! the order of the per-tap loops (bias first, then tap by tap; output channel by output
//! channel for the input gradient). A tap that reads padding adds w * 0, which leaves every
//! finite sum unchanged (the sums never hold -0: they start at +0 or a bias, and x + (-0) = x),
//! so for finite weights and a bias other than -0 the results are the bits of the per-tap
//! loops (the unit test below); with an infinite weight, a pixel whose tap reads padding gets
//! NaN where the per-tap loops skip it.

use super::columns::valid_columns;
use super::geom::Geom;
use crate::engine::{cpu, host_pool};

/// For each output plane (image, output channel) of a depthwise convolution: the input plane
/// it reads. Each input channel feeds `cout / cin` consecutive output channels.
fn source_plane(g: &Geom, img: usize, co: usize) -> usize {
    img * g.cin + co / g.cout_g
}

/// A plane copied into the middle of a zero-filled buffer of `rows` x `cols`, `top` rows and
/// `left` columns from its corner; returns the buffer.
fn pad_plane<'a>(
    src: &[f32],
    (h, w): (usize, usize),
    (rows, cols): (usize, usize),
    (top, left): (usize, usize),
    buf: &'a mut Vec<f32>,
) -> &'a [f32] {
    fill_padded(src, (h, w), (rows, cols), top, buf, |src_row, dst| {
        dst[left..left + w].copy_from_slice(src_row)
    })
}

/// A zero-filled buffer of `rows` x `cols` whose rows `top..top + h` each get one row of the
/// plane through `place_row(source row, padded row)`; returns the buffer.
fn fill_padded<'a>(
    src: &[f32],
    (h, w): (usize, usize),
    (rows, cols): (usize, usize),
    top: usize,
    buf: &'a mut Vec<f32>,
    place_row: impl Fn(&[f32], &mut [f32]),
) -> &'a [f32] {
    buf.clear();
    buf.resize(rows * cols, 0.0);
    for (y, src_row) in src.chunks_exact(w).take(h).enumerate() {
        place_row(src_row, &mut buf[(top + y) * cols..(top + y + 1) * cols]);
    }
    buf
}

/// One row of a 3x3 kernel: `acc[i]` plus its nine taps in order, tap `t` (= 3 ky + kx)
/// reading `taps[t][i]`.
/// Inlined, as are the tap builders: rows are 2 to 32 pixels, so a call per row costs as much
/// as the row.
#[inline(always)]
fn fused_row_3x3(w: &[f32], taps: [&[f32]; 9], acc: &mut [f32]) {
    let n = acc.len();
    let (s0, s1, s2) = (&taps[0][..n], &taps[1][..n], &taps[2][..n]);
    let (s3, s4, s5) = (&taps[3][..n], &taps[4][..n], &taps[5][..n]);
    let (s6, s7, s8) = (&taps[6][..n], &taps[7][..n], &taps[8][..n]);
    let (w0, w1, w2, w3, w4, w5, w6, w7, w8) =
        (w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7], w[8]);
    for i in 0..n {
        let mut v = acc[i];
        v += w0 * s0[i];
        v += w1 * s1[i];
        v += w2 * s2[i];
        v += w3 * s3[i];
        v += w4 * s4[i];
        v += w5 * s5[i];
        v += w6 * s6[i];
        v += w7 * s7[i];
        v += w8 * s8[i];
        acc[i] = v;
    }
}

/// The taps of a 3x3 stride-1 kernel for one output row: tap (ky, kx) starts `offsets[kx]`
/// into `rows[ky]`.
#[inline(always)]
fn stride1_taps<'a>(rows: [&'a [f32]; 3], offsets: [usize; 3]) -> [&'a [f32]; 9] {
    let [o0, o1, o2] = offsets;
    let tap3 = |row: &'a [f32]| [&row[o0..], &row[o1..], &row[o2..]];
    let ([t0, t1, t2], [t3, t4, t5], [t6, t7, t8]) = (tap3(rows[0]), tap3(rows[1]), tap3(rows[2]));
    [t0, t1, t2, t3, t4, t5, t6, t7, t8]
}

/// The taps of a 3x3 kernel of column stride 2 (no column dilation) for one output row, each
/// row of the plane stored as its even columns, then its odd ones (`pad_split_plane`): pixel i
/// reads columns 2i, 2i + 1 and 2i + 2, i.e. even[i], odd[i] and even[i + 1].
#[inline(always)]
fn stride2_taps<'a>(rows: [&'a [f32]; 3]) -> [&'a [f32]; 9] {
    let tap3 = |row: &'a [f32]| {
        let (even, odd) = row.split_at(row.len().div_ceil(2));
        [even, odd, &even[1..]]
    };
    let ([t0, t1, t2], [t3, t4, t5], [t6, t7, t8]) = (tap3(rows[0]), tap3(rows[1]), tap3(rows[2]));
    [t0, t1, t2, t3, t4, t5, t6, t7, t8]
}

/// As [`pad_plane`], with every row of the padded plane stored as its even columns, then its
/// odd ones (the layout [`stride2_taps`] reads), written in one pass.
fn pad_split_plane<'a>(
    src: &[f32],
    (h, w): (usize, usize),
    (rows, cols): (usize, usize),
    (top, left): (usize, usize),
    buf: &'a mut Vec<f32>,
) -> &'a [f32] {
    let even_len = cols.div_ceil(2);
    fill_padded(src, (h, w), (rows, cols), top, buf, |src_row, dst| {
        // Source column x lands in padded column left + x: even ones first, then odd ones.
        let first_even = left % 2;
        let evens = src_row[first_even..].iter().step_by(2);
        for (d, &v) in dst[(left + first_even) / 2..].iter_mut().zip(evens) {
            *d = v;
        }
        let first_odd = 1 - first_even;
        let odds = src_row.get(first_odd..).unwrap_or(&[]).iter().step_by(2);
        for (d, &v) in dst[even_len + (left + first_odd) / 2..]
            .iter_mut()
            .zip(odds)
        {
            *d = v;
        }
    })
}

/// One output row, tap by tap: `acc[i] += w[t] * row_t[i * stride + kx * dw]`.
fn tap_by_tap_row(g: &Geom, w: &[f32], padded: &[f32], wp: usize, oy: usize, acc: &mut [f32]) {
    for (t, &wv) in w.iter().enumerate() {
        let (ky, kx) = (t / g.kw, t % g.kw);
        let src = &padded[(oy * g.sh + ky * g.dh) * wp + kx * g.dw..];
        if g.sw == 1 {
            let n = acc.len();
            for (a, &v) in acc.iter_mut().zip(&src[..n]) {
                *a += wv * v;
            }
        } else {
            for (i, a) in acc.iter_mut().enumerate() {
                *a += wv * src[i * g.sw];
            }
        }
    }
}

/// One output plane: its bias, then every tap, read from the zero-padded input plane.
fn forward_plane(
    g: &Geom,
    w: &[f32],
    bias: f32,
    x_plane: &[f32],
    y_plane: &mut [f32],
    buf: &mut Vec<f32>,
) {
    let (hp, wp) = (g.h + 2 * g.ph, g.w + 2 * g.pw);
    let is_3x3 = g.kh == 3 && g.kw == 3;
    // Stride 2 reads every other column: with the rows split into even and odd columns, each
    // tap reads a contiguous run, and the nine taps fuse as at stride 1.
    let split = is_3x3 && g.sw == 2 && g.dw == 1;
    let pad = if split { pad_split_plane } else { pad_plane };
    let padded = pad(x_plane, (g.h, g.w), (hp, wp), (g.ph, g.pw), buf);
    for (oy, acc) in y_plane.chunks_exact_mut(g.ow).enumerate() {
        acc.fill(bias);
        let row = |ky: usize| &padded[(oy * g.sh + ky * g.dh) * wp..][..wp];
        if is_3x3 && g.sw == 1 {
            let offsets = [0, g.dw, 2 * g.dw];
            fused_row_3x3(w, stride1_taps([row(0), row(1), row(2)], offsets), acc);
        } else if split {
            fused_row_3x3(w, stride2_taps([row(0), row(1), row(2)]), acc);
        } else {
            tap_by_tap_row(g, w, padded, wp, oy, acc);
        }
    }
}

/// Depthwise forward: one task per output plane.
pub(super) fn forward(g: &Geom, x: &[f32], w: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
    use rayon::prelude::*;
    let (plane, in_plane, taps) = (g.oh * g.ow, g.h * g.w, g.kh * g.kw);
    let mut y = host_pool::for_overwrite(g.n * g.cout * plane);
    if plane == 0 {
        return y;
    }
    y.par_chunks_mut(plane)
        .enumerate()
        .for_each_init(Vec::new, |buf, (p, y_plane)| {
            let (img, co) = (p / g.cout, p % g.cout);
            let src = source_plane(g, img, co);
            let x_plane = &x[src * in_plane..(src + 1) * in_plane];
            let b = bias.map_or(0.0, |b| b[co]);
            forward_plane(g, &w[co * taps..(co + 1) * taps], b, x_plane, y_plane, buf);
        });
    y
}

/// Depthwise input gradient: one task per input plane, gathering from its output planes.
pub(super) fn input_grad(g: &Geom, dy: &[f32], w: &[f32]) -> Vec<f32> {
    use rayon::prelude::*;
    let (plane, in_plane, taps) = (g.oh * g.ow, g.h * g.w, g.kh * g.kw);
    let mut dx = host_pool::zeroed(g.n * g.cin * in_plane);
    if in_plane == 0 {
        return dx;
    }
    let gather = g.sh == 1 && g.sw == 1;
    dx.par_chunks_mut(in_plane)
        .enumerate()
        .for_each_init(Vec::new, |buf, (p, dx_plane)| {
            let (img, ci) = (p / g.cin, p % g.cin);
            for co in ci * g.cout_g..(ci + 1) * g.cout_g {
                let dy_plane = &dy[(img * g.cout + co) * plane..][..plane];
                let w_co = &w[co * taps..(co + 1) * taps];
                if gather {
                    gather_plane(g, w_co, dy_plane, dx_plane, buf);
                } else {
                    for (t, &wv) in w_co.iter().enumerate() {
                        tap_transposed(g, t / g.kw, t % g.kw, wv, dy_plane, dx_plane);
                    }
                }
            }
        });
    dx
}

/// The stride-1 input gradient of one (input plane, output plane) pair as a gather: input
/// pixel (iy, ix) adds, tap by tap in order, w[t] * dy[iy + ph - ky dh][ix + pw - kx dw],
/// read from dy zero-padded so that every such index is inside.
fn gather_plane(g: &Geom, w: &[f32], dy_plane: &[f32], dx_plane: &mut [f32], buf: &mut Vec<f32>) {
    let (top, left) = ((g.kh - 1) * g.dh, (g.kw - 1) * g.dw);
    // Row iy reads padded rows iy + ph + (kh - 1 - ky) dh, at most h - 1 + ph + top.
    let rows = (g.h + g.ph + top).max(top + g.oh);
    let cols = (g.w + g.pw + left).max(left + g.ow);
    let padded = pad_plane(dy_plane, (g.oh, g.ow), (rows, cols), (top, left), buf);
    let fused = g.kh == 3 && g.kw == 3;
    for (iy, acc) in dx_plane.chunks_exact_mut(g.w).enumerate() {
        // Tap (ky, kx) reads padded row iy + ph + top - ky dh at column ix + pw + left - kx dw;
        // row(ky) starts at column pw, so the tap's offset in it is left - kx dw.
        let row = |ky: usize| &padded[(iy + g.ph + top - ky * g.dh) * cols + g.pw..][..cols - g.pw];
        if fused {
            let offsets = [2 * g.dw, g.dw, 0];
            fused_row_3x3(w, stride1_taps([row(0), row(1), row(2)], offsets), acc);
        } else {
            for (t, &wv) in w.iter().enumerate() {
                let (ky, kx) = (t / g.kw, t % g.kw);
                let src = &row(ky)[left - kx * g.dw..][..acc.len()];
                for (a, &v) in acc.iter_mut().zip(src) {
                    *a += wv * v;
                }
            }
        }
    }
}

/// The transpose of the forward's taps over a whole plane (strided input gradients): scatters `wv` times an output plane onto its input plane.
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::ops::conv::Conv2dParams;

    /// The plain per-tap loops the padded paths replace: every tap over the whole plane,
    /// skipping the taps that read padding.
    fn per_tap_forward(g: &Geom, x: &[f32], w: &[f32], bias: &[f32]) -> Vec<f32> {
        let (plane, in_plane, taps) = (g.oh * g.ow, g.h * g.w, g.kh * g.kw);
        let mut y = vec![0.0; g.n * g.cout * plane];
        for (p, y_plane) in y.chunks_mut(plane).enumerate() {
            let (img, co) = (p / g.cout, p % g.cout);
            let src = source_plane(g, img, co);
            y_plane.fill(bias[co]);
            let x_plane = &x[src * in_plane..(src + 1) * in_plane];
            for t in 0..taps {
                let (ky, kx) = (t / g.kw, t % g.kw);
                for (i, y) in y_plane.iter_mut().enumerate() {
                    let (oy, ox) = (i / g.ow, i % g.ow);
                    let iy = (oy * g.sh + ky * g.dh).checked_sub(g.ph);
                    let ix = (ox * g.sw + kx * g.dw).checked_sub(g.pw);
                    if let (Some(iy), Some(ix)) = (iy.filter(|&v| v < g.h), ix.filter(|&v| v < g.w))
                    {
                        *y += w[co * taps + t] * x_plane[iy * g.w + ix];
                    }
                }
            }
        }
        y
    }

    fn per_tap_input_grad(g: &Geom, dy: &[f32], w: &[f32]) -> Vec<f32> {
        let (plane, in_plane, taps) = (g.oh * g.ow, g.h * g.w, g.kh * g.kw);
        let mut dx = vec![0.0; g.n * g.cin * in_plane];
        for (p, dx_plane) in dx.chunks_mut(in_plane).enumerate() {
            let (img, ci) = (p / g.cin, p % g.cin);
            for co in ci * g.cout_g..(ci + 1) * g.cout_g {
                let dy_plane = &dy[(img * g.cout + co) * plane..][..plane];
                for t in 0..taps {
                    let wv = w[co * taps + t];
                    tap_transposed(g, t / g.kw, t % g.kw, wv, dy_plane, dx_plane);
                }
            }
        }
        dx
    }

    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut rng = crate::engine::Rng::new(seed);
        (0..len).map(|_| rng.normal()).collect()
    }

    /// The padded and fused 3x3 paths give the per-tap loops' bits, on planes with and without interior
    /// pixels, at every stride, padding and dilation MobileNetV2 uses and some it does not.
    #[test]
    fn padded_paths_equal_the_per_tap_loops_to_the_bit() {
        // x shape, kernel, multiplier, stride, padding, dilation
        type Case = (
            [usize; 4],
            (usize, usize),
            usize,
            (usize, usize),
            (usize, usize),
            (usize, usize),
        );
        let cases: &[Case] = &[
            ([2, 3, 9, 11], (3, 3), 1, (1, 1), (1, 1), (1, 1)),
            ([1, 2, 16, 16], (3, 3), 1, (2, 2), (1, 1), (1, 1)),
            ([1, 2, 15, 13], (3, 3), 1, (2, 2), (1, 1), (1, 1)),
            ([2, 3, 8, 7], (3, 3), 2, (1, 1), (0, 0), (1, 1)),
            ([1, 2, 9, 10], (3, 3), 1, (1, 1), (2, 1), (2, 2)),
            ([2, 3, 7, 9], (3, 3), 1, (1, 2), (1, 1), (1, 1)),
            ([1, 2, 3, 3], (3, 3), 1, (1, 1), (1, 1), (1, 1)),
            ([1, 2, 2, 2], (3, 3), 1, (1, 1), (1, 1), (1, 1)),
            ([1, 2, 1, 1], (3, 3), 1, (1, 1), (1, 1), (1, 1)),
            ([1, 2, 6, 5], (3, 3), 1, (3, 3), (2, 2), (1, 1)),
            ([1, 1, 12, 4], (3, 3), 3, (1, 1), (2, 0), (1, 1)),
            ([1, 4, 7, 6], (5, 5), 1, (1, 1), (1, 3), (1, 2)),
            ([2, 2, 8, 9], (3, 1), 2, (1, 1), (1, 0), (1, 1)),
            ([1, 3, 10, 10], (5, 3), 1, (2, 1), (2, 1), (1, 1)),
            // Stride 2 through even and odd columns: odd and even widths, no padding, planes
            // of 4, 2 and 1 pixels a side, a row stride of 1, and dilation (not split).
            ([2, 3, 9, 13], (3, 3), 1, (2, 2), (0, 0), (1, 1)),
            ([1, 2, 4, 4], (3, 3), 2, (2, 2), (1, 1), (1, 1)),
            ([1, 2, 2, 2], (3, 3), 1, (2, 2), (1, 1), (1, 1)),
            ([1, 2, 1, 1], (3, 3), 1, (2, 2), (1, 1), (1, 1)),
            ([1, 2, 7, 12], (3, 3), 1, (1, 2), (1, 2), (1, 1)),
            ([1, 2, 11, 11], (3, 3), 1, (2, 2), (2, 2), (2, 2)),
        ];
        for (k, &(xs, (kh, kw), mult, stride, padding, dilation)) in cases.iter().enumerate() {
            let (n, c) = (xs[0], xs[1]);
            let p = Conv2dParams {
                stride,
                padding,
                dilation,
                groups: c,
            };
            let ws = [c * mult, 1, kh, kw];
            let g = Geom::new(&xs, &ws, p).unwrap();
            let seed = 100 * k as u64;
            let x = values(xs.iter().product(), seed);
            let w = values(ws.iter().product(), seed + 1);
            let b = values(ws[0], seed + 2);
            let y = forward(&g, &x, &w, Some(&b));
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            let want = per_tap_forward(&g, &x, &w, &b);
            assert_eq!(bits(&y), bits(&want), "forward, case {k}");
            let dy = values(n * g.cout * g.oh * g.ow, seed + 3);
            let dx = input_grad(&g, &dy, &w);
            let want = per_tap_input_grad(&g, &dy, &w);
            assert_eq!(bits(&dx), bits(&want), "input gradient, case {k}");
        }
    }
}
