//! The simple loops: the numerical oracle every fast CPU kernel is tested against
//! (in each op family's test file, `tests/ops_*.rs` and `tests/optim.rs`). Serial, written for obviousness rather than speed, on plain
//! slices with explicit shapes, and independent of the fast kernels' code (their own window,
//! index and formula logic), so that a slip in a fast kernel cannot hide in a shared helper.
//! Nothing in the engine calls them.
//!
//! Layouts are the engine's: row-major, NCHW for images, [C_out, C_in / groups, kh, kw] for
//! convolution weights. Sums accumulate in f32 in index order unless a comment says otherwise.

use crate::engine::ops::conv::Conv2dParams;
use crate::engine::ops::optim::AdamWStep;
use crate::engine::ops::pool::Pool2dParams;

// ------------------------------------------------------------------ elementwise

/// sign with sign(0) = 0.
pub fn sign(v: f32) -> f32 {
    if v > 0.0 {
        1.0
    } else if v < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// out[i] = f(x[i]).
pub fn map(x: &[f32], f: impl Fn(f32) -> f32) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    for &v in x {
        out.push(f(v));
    }
    out
}

/// out[i] = f(x[i], y[i]).
pub fn zip_map(x: &[f32], y: &[f32], f: impl Fn(f32, f32) -> f32) -> Vec<f32> {
    assert_eq!(x.len(), y.len());
    let mut out = Vec::with_capacity(x.len());
    for i in 0..x.len() {
        out.push(f(x[i], y[i]));
    }
    out
}

// ------------------------------------------------------------------ matrix products

/// (batch, rows, cols) of a 2-D or 3-D operand as stored.
fn batch_rows_cols(shape: &[usize]) -> (usize, usize, usize) {
    match *shape {
        [r, c] => (1, r, c),
        [b, r, c] => (b, r, c),
        _ => panic!("reference matmul: operand of shape {shape:?}"),
    }
}

/// op(a) op(b), op transposing the last two dimensions when asked; a 2-D operand (or a batch
/// of one) is shared by every entry of the other's batch. Output [batch, m, n], or [m, n] when
/// both operands are 2-D.
pub fn matmul(
    a: &[f32],
    a_shape: &[usize],
    ta: bool,
    b: &[f32],
    b_shape: &[usize],
    tb: bool,
) -> (Vec<f32>, Vec<usize>) {
    let (ba, ra, ca) = batch_rows_cols(a_shape);
    let (bb, rb, cb) = batch_rows_cols(b_shape);
    let (m, k) = if ta { (ca, ra) } else { (ra, ca) };
    let n = if tb { rb } else { cb };
    let batch = ba.max(bb);
    let a_at = |e: usize, i: usize, kk: usize| {
        let base = if ba == 1 { 0 } else { e * ra * ca };
        if ta {
            a[base + kk * ca + i]
        } else {
            a[base + i * ca + kk]
        }
    };
    let b_at = |e: usize, kk: usize, j: usize| {
        let base = if bb == 1 { 0 } else { e * rb * cb };
        if tb {
            b[base + j * cb + kk]
        } else {
            b[base + kk * cb + j]
        }
    };
    let mut out = vec![0.0f32; batch * m * n];
    for e in 0..batch {
        for i in 0..m {
            for j in 0..n {
                let mut s = 0.0f32;
                for kk in 0..k {
                    s += a_at(e, i, kk) * b_at(e, kk, j);
                }
                out[(e * m + i) * n + j] = s;
            }
        }
    }
    let shape = if a_shape.len() == 3 || b_shape.len() == 3 {
        vec![batch, m, n]
    } else {
        vec![m, n]
    };
    (out, shape)
}

/// mat[r, c] + bias[c].
pub fn add_row_bias(mat: &[f32], cols: usize, bias: &[f32]) -> Vec<f32> {
    let mut out = mat.to_vec();
    for (i, o) in out.iter_mut().enumerate() {
        *o += bias[i % cols];
    }
    out
}

// ------------------------------------------------------------------ convolution

/// The sizes of one convolution.
struct ConvShape {
    n: usize,
    cin: usize,
    h: usize,
    w: usize,
    cout: usize,
    cin_g: usize,
    kh: usize,
    kw: usize,
    oh: usize,
    ow: usize,
    p: Conv2dParams,
}

impl ConvShape {
    fn new(x: [usize; 4], w: [usize; 4], p: Conv2dParams) -> ConvShape {
        let out = |size: usize, pad: usize, dil: usize, k: usize, s: usize| {
            (size + 2 * pad - dil * (k - 1) - 1) / s + 1
        };
        ConvShape {
            n: x[0],
            cin: x[1],
            h: x[2],
            w: x[3],
            cout: w[0],
            cin_g: w[1],
            kh: w[2],
            kw: w[3],
            oh: out(x[2], p.padding.0, p.dilation.0, w[2], p.stride.0),
            ow: out(x[3], p.padding.1, p.dilation.1, w[3], p.stride.1),
            p,
        }
    }

    /// Calls `visit(x_index, w_index, y_index)` for every multiply of the convolution.
    fn for_each_tap(&self, mut visit: impl FnMut(usize, usize, usize)) {
        let cout_g = self.cout / self.p.groups;
        for img in 0..self.n {
            for co in 0..self.cout {
                for oy in 0..self.oh {
                    for ox in 0..self.ow {
                        let yi = ((img * self.cout + co) * self.oh + oy) * self.ow + ox;
                        for cig in 0..self.cin_g {
                            let ci = (co / cout_g) * self.cin_g + cig;
                            for ky in 0..self.kh {
                                for kx in 0..self.kw {
                                    let iy = (oy * self.p.stride.0 + ky * self.p.dilation.0) as i64
                                        - self.p.padding.0 as i64;
                                    let ix = (ox * self.p.stride.1 + kx * self.p.dilation.1) as i64
                                        - self.p.padding.1 as i64;
                                    if iy < 0
                                        || ix < 0
                                        || iy >= self.h as i64
                                        || ix >= self.w as i64
                                    {
                                        continue;
                                    }
                                    let xi = ((img * self.cin + ci) * self.h + iy as usize)
                                        * self.w
                                        + ix as usize;
                                    let wi =
                                        ((co * self.cin_g + cig) * self.kh + ky) * self.kw + kx;
                                    visit(xi, wi, yi);
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// conv2d(x, w) + bias: the output and its shape.
pub fn conv2d_forward(
    x: &[f32],
    x_shape: [usize; 4],
    w: &[f32],
    w_shape: [usize; 4],
    bias: Option<&[f32]>,
    p: Conv2dParams,
) -> (Vec<f32>, [usize; 4]) {
    let s = ConvShape::new(x_shape, w_shape, p);
    let plane = s.oh * s.ow;
    let mut y = vec![0.0f32; s.n * s.cout * plane];
    for (i, v) in y.iter_mut().enumerate() {
        *v = bias.map_or(0.0, |b| b[(i / plane) % s.cout]);
    }
    s.for_each_tap(|xi, wi, yi| y[yi] += x[xi] * w[wi]);
    (y, [s.n, s.cout, s.oh, s.ow])
}

/// The gradients of conv2d with respect to x, w and the bias, for output gradient `dy`.
pub fn conv2d_backward(
    x: &[f32],
    x_shape: [usize; 4],
    w: &[f32],
    w_shape: [usize; 4],
    p: Conv2dParams,
    dy: &[f32],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let s = ConvShape::new(x_shape, w_shape, p);
    let mut dx = vec![0.0f32; x.len()];
    let mut dw = vec![0.0f32; w.len()];
    s.for_each_tap(|xi, wi, yi| {
        dx[xi] += dy[yi] * w[wi];
        dw[wi] += dy[yi] * x[xi];
    });
    let plane = s.oh * s.ow;
    let mut db = vec![0.0f32; s.cout];
    for (i, v) in dy.iter().enumerate() {
        db[(i / plane) % s.cout] += v;
    }
    (dx, dw, db)
}

// ------------------------------------------------------------------ pooling

/// Output size of one pooled axis (PyTorch's rule, dilation 1).
fn pooled(len: usize, k: usize, s: usize, pad: usize, ceil: bool) -> usize {
    let span = len + 2 * pad - k;
    let mut out = if ceil { span.div_ceil(s) } else { span / s } + 1;
    if ceil && (out - 1) * s >= len + pad {
        out -= 1;
    }
    out
}

/// Every output of a pooling over [N, C, H, W]: calls `visit(plane, out_index, cells,
/// padded_count)` with the in-image cells (plane-relative indices, raster order) of its window
/// and the window's size clipped to the padded input.
fn for_each_window(
    shape: [usize; 4],
    p: Pool2dParams,
    mut visit: impl FnMut(usize, usize, &[usize], usize),
) -> [usize; 4] {
    let [n, c, h, w] = shape;
    let oh = pooled(h, p.kernel.0, p.stride.0, p.padding.0, p.ceil_mode);
    let ow = pooled(w, p.kernel.1, p.stride.1, p.padding.1, p.ceil_mode);
    let mut cells = Vec::new();
    for plane in 0..n * c {
        for oy in 0..oh {
            for ox in 0..ow {
                cells.clear();
                let mut padded = 0;
                for ky in 0..p.kernel.0 {
                    for kx in 0..p.kernel.1 {
                        let y = (oy * p.stride.0 + ky) as i64 - p.padding.0 as i64;
                        let x = (ox * p.stride.1 + kx) as i64 - p.padding.1 as i64;
                        // Inside the input or its padding (the ceil-mode overhang is neither).
                        if y < (h + p.padding.0) as i64 && x < (w + p.padding.1) as i64 {
                            padded += 1;
                        }
                        if y >= 0 && x >= 0 && y < h as i64 && x < w as i64 {
                            cells.push(y as usize * w + x as usize);
                        }
                    }
                }
                visit(plane, (plane * oh + oy) * ow + ox, &cells, padded);
            }
        }
    }
    [n, c, oh, ow]
}

/// Max pool: the maxima, the argmax of each (plane-relative: the first maximum, but every NaN
/// taken, so the last NaN of a window, as PyTorch's CPU kernel) and the output shape.
pub fn max_pool2d(
    x: &[f32],
    shape: [usize; 4],
    p: Pool2dParams,
) -> (Vec<f32>, Vec<usize>, [usize; 4]) {
    let (mut out, mut arg) = (Vec::new(), Vec::new());
    let plane_len = shape[2] * shape[3];
    let out_shape = for_each_window(shape, p, |plane, _, cells, _| {
        let mut best = cells[0];
        for &cell in cells {
            let v = x[plane * plane_len + cell];
            let b = x[plane * plane_len + best];
            if v > b || v.is_nan() {
                best = cell;
            }
        }
        out.push(x[plane * plane_len + best]);
        arg.push(best);
    });
    (out, arg, out_shape)
}

/// Max pool's input gradient: each output gradient added onto its window's first maximum.
pub fn max_pool2d_backward(x: &[f32], shape: [usize; 4], p: Pool2dParams, g: &[f32]) -> Vec<f32> {
    let (_, arg, _) = max_pool2d(x, shape, p);
    let plane_len = shape[2] * shape[3];
    let per_plane = g.len() / (shape[0] * shape[1]).max(1);
    let mut dx = vec![0.0f32; x.len()];
    for (o, &at) in arg.iter().enumerate() {
        dx[(o / per_plane) * plane_len + at] += g[o];
    }
    dx
}

/// The divisor of an average window.
fn avg_divisor(p: Pool2dParams, cells: &[usize], padded: usize) -> f32 {
    if p.count_include_pad {
        padded as f32
    } else {
        cells.len() as f32
    }
}

/// Average pool and its output shape (an all-padding window gives 0).
pub fn avg_pool2d(x: &[f32], shape: [usize; 4], p: Pool2dParams) -> (Vec<f32>, [usize; 4]) {
    let mut out = Vec::new();
    let plane_len = shape[2] * shape[3];
    let out_shape = for_each_window(shape, p, |plane, _, cells, padded| {
        if cells.is_empty() {
            out.push(0.0);
            return;
        }
        let mut s = 0.0f32;
        for &cell in cells {
            s += x[plane * plane_len + cell];
        }
        out.push(s / avg_divisor(p, cells, padded));
    });
    (out, out_shape)
}

/// Average pool's input gradient: each output gradient spread evenly over its window.
pub fn avg_pool2d_backward(shape: [usize; 4], p: Pool2dParams, g: &[f32]) -> Vec<f32> {
    let plane_len = shape[2] * shape[3];
    let mut dx = vec![0.0f32; shape.iter().product()];
    for_each_window(shape, p, |plane, o, cells, padded| {
        for &cell in cells {
            dx[plane * plane_len + cell] += g[o] / avg_divisor(p, cells, padded);
        }
    });
    dx
}

// ------------------------------------------------------------------ batch norm

/// Training-mode batch norm over [N, C, HW]: y, the batch mean and biased variance per
/// channel (f64 sums, two passes).
pub fn batch_norm_train(
    x: &[f32],
    (n, c, hw): (usize, usize, usize),
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
) -> (Vec<f32>, Vec<f64>, Vec<f64>) {
    let count = (n * hw) as f64;
    let (mut mean, mut var) = (vec![0.0f64; c], vec![0.0f64; c]);
    for ch in 0..c {
        for img in 0..n {
            for i in 0..hw {
                mean[ch] += x[(img * c + ch) * hw + i] as f64;
            }
        }
        mean[ch] /= count;
        for img in 0..n {
            for i in 0..hw {
                var[ch] += (x[(img * c + ch) * hw + i] as f64 - mean[ch]).powi(2);
            }
        }
        var[ch] /= count;
    }
    let m32: Vec<f32> = mean.iter().map(|&m| m as f32).collect();
    let invstd: Vec<f32> = var
        .iter()
        .map(|&v| (1.0 / (v + eps as f64).sqrt()) as f32)
        .collect();
    let y = batch_norm_apply(x, (n, c, hw), &m32, &invstd, gamma, beta);
    (y, mean, var)
}

/// gamma * (x - mean) * invstd + beta per channel (eval mode with the running statistics).
pub fn batch_norm_apply(
    x: &[f32],
    (_, c, hw): (usize, usize, usize),
    mean: &[f32],
    invstd: &[f32],
    gamma: &[f32],
    beta: &[f32],
) -> Vec<f32> {
    let mut y = vec![0.0f32; x.len()];
    for (i, v) in y.iter_mut().enumerate() {
        let ch = (i / hw.max(1)) % c;
        *v = gamma[ch] * ((x[i] - mean[ch]) * invstd[ch]) + beta[ch];
    }
    y
}

/// Batch norm's gradients (dx, dgamma, dbeta) for output gradient `g`, given the mean and
/// invstd the forward used; `train` adds the terms through the batch statistics.
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_backward(
    x: &[f32],
    (n, c, hw): (usize, usize, usize),
    mean: &[f32],
    invstd: &[f32],
    gamma: &[f32],
    g: &[f32],
    train: bool,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let count = (n * hw) as f64;
    let (mut sg, mut sgx) = (vec![0.0f64; c], vec![0.0f64; c]);
    for img in 0..n {
        for ch in 0..c {
            for i in 0..hw {
                let at = (img * c + ch) * hw + i;
                let xhat = (x[at] - mean[ch]) * invstd[ch];
                sg[ch] += g[at] as f64;
                sgx[ch] += g[at] as f64 * xhat as f64;
            }
        }
    }
    let mut dx = vec![0.0f32; x.len()];
    for (at, d) in dx.iter_mut().enumerate() {
        let ch = (at / hw.max(1)) % c;
        let scale = gamma[ch] * invstd[ch];
        *d = if train {
            let xhat = (x[at] - mean[ch]) * invstd[ch];
            scale * (g[at] - (sg[ch] / count) as f32 - xhat * (sgx[ch] / count) as f32)
        } else {
            scale * g[at]
        };
    }
    let dgamma = sgx.iter().map(|&v| v as f32).collect();
    let dbeta = sg.iter().map(|&v| v as f32).collect();
    (dx, dgamma, dbeta)
}

// ------------------------------------------------------------------ channel ops

/// Concatenation of [N, C_i, HW] tensors along C.
pub fn concat_channels(xs: &[(&[f32], usize)], n: usize, hw: usize) -> Vec<f32> {
    let mut out = Vec::new();
    for img in 0..n {
        for &(x, c) in xs {
            out.extend_from_slice(&x[img * c * hw..(img + 1) * c * hw]);
        }
    }
    out
}

/// out[:, i] = x[:, index[i]] for x [N, C, HW].
pub fn gather_channels(x: &[f32], (n, c, hw): (usize, usize, usize), index: &[usize]) -> Vec<f32> {
    let mut out = Vec::new();
    for img in 0..n {
        for &from in index {
            for i in 0..hw {
                out.push(x[(img * c + from) * hw + i]);
            }
        }
    }
    out
}

/// out[:, ch] = x[:, ch] * scale[ch] + shift[ch] for x [N, C, HW].
pub fn channel_affine(
    x: &[f32],
    (_, c, hw): (usize, usize, usize),
    scale: &[f32],
    shift: &[f32],
) -> Vec<f32> {
    let mut out = vec![0.0f32; x.len()];
    for (i, o) in out.iter_mut().enumerate() {
        let ch = (i / hw.max(1)) % c;
        *o = x[i] * scale[ch] + shift[ch];
    }
    out
}

// ------------------------------------------------------------------ reductions

/// Sum of all values (f64 accumulation).
pub fn sum_all(x: &[f32]) -> f32 {
    let mut s = 0.0f64;
    for &v in x {
        s += v as f64;
    }
    s as f32
}

/// Sum of the squares of all values (f64 accumulation).
pub fn sum_squares(x: &[f32]) -> f32 {
    let mut s = 0.0f64;
    for &v in x {
        s += v as f64 * v as f64;
    }
    s as f32
}

/// (outer, n, inner) of `shape` around `dim`.
pub fn outer_n_inner(shape: &[usize], dim: usize) -> (usize, usize, usize) {
    (
        shape[..dim].iter().product(),
        shape[dim],
        shape[dim + 1..].iter().product(),
    )
}

/// Sum along `dim`, over a tensor viewed as [outer, n, inner]: shape [outer, inner].
pub fn sum_dim(x: &[f32], (outer, n, inner): (usize, usize, usize)) -> Vec<f32> {
    let mut out = vec![0.0f32; outer * inner];
    for o in 0..outer {
        for i in 0..inner {
            for k in 0..n {
                out[o * inner + i] += x[(o * n + k) * inner + i];
            }
        }
    }
    out
}

/// log(sum(exp(x))) along `dim`, shifted by the column's maximum.
pub fn logsumexp_dim(x: &[f32], (outer, n, inner): (usize, usize, usize)) -> Vec<f32> {
    let mut out = vec![0.0f32; outer * inner];
    for o in 0..outer {
        for i in 0..inner {
            let at = |k: usize| x[(o * n + k) * inner + i];
            let mut m = f32::NEG_INFINITY;
            for k in 0..n {
                m = m.max(at(k));
            }
            let shift = if m.is_finite() { m } else { 0.0 };
            let mut s = 0.0f32;
            for k in 0..n {
                s += (at(k) - shift).exp();
            }
            out[o * inner + i] = shift + s.ln();
        }
    }
    out
}

/// The gradient of a reduction along `dim`: g[o, i] * scale broadcast over the dimension, or
/// (logsumexp, `lse` given) g[o, i] * exp(x - lse[o, i]).
pub fn reduce_backward(
    g: &[f32],
    (outer, n, inner): (usize, usize, usize),
    scale: f32,
    x_and_lse: Option<(&[f32], &[f32])>,
) -> Vec<f32> {
    let mut dx = vec![0.0f32; outer * n * inner];
    for o in 0..outer {
        for k in 0..n {
            for i in 0..inner {
                let at = (o * n + k) * inner + i;
                let col = o * inner + i;
                dx[at] = match x_and_lse {
                    Some((x, lse)) => g[col] * (x[at] - lse[col]).exp(),
                    None => g[col] * scale,
                };
            }
        }
    }
    dx
}

// ------------------------------------------------------------------ L2 normalisation

/// x / max(||x||, eps) along the middle axis of [outer, n, inner].
pub fn l2_normalize(x: &[f32], (outer, n, inner): (usize, usize, usize), eps: f32) -> Vec<f32> {
    let mut out = vec![0.0f32; x.len()];
    for o in 0..outer {
        for i in 0..inner {
            let at = |k: usize| (o * n + k) * inner + i;
            let mut sq = 0.0f32;
            for k in 0..n {
                sq += x[at(k)] * x[at(k)];
            }
            let denom = sq.sqrt().max(eps);
            for k in 0..n {
                out[at(k)] = x[at(k)] / denom;
            }
        }
    }
    out
}

/// The gradient of [`l2_normalize`] for output gradient `g`: with r = ||x||,
/// (g - y (g . y)) / r where r > eps, else g / eps.
pub fn l2_normalize_backward(
    x: &[f32],
    g: &[f32],
    (outer, n, inner): (usize, usize, usize),
    eps: f32,
) -> Vec<f32> {
    let mut dx = vec![0.0f32; x.len()];
    for o in 0..outer {
        for i in 0..inner {
            let at = |k: usize| (o * n + k) * inner + i;
            let (mut sq, mut gx) = (0.0f32, 0.0f32);
            for k in 0..n {
                sq += x[at(k)] * x[at(k)];
                gx += g[at(k)] * x[at(k)];
            }
            let r = sq.sqrt();
            for k in 0..n {
                dx[at(k)] = if r > eps {
                    (g[at(k)] - (x[at(k)] / r) * (gx / r)) / r
                } else {
                    g[at(k)] / eps
                };
            }
        }
    }
    dx
}

// ------------------------------------------------------------------ attack and optimiser

/// clamp(clamp(x_adv + alpha * sign(grad), x_orig - eps, x_orig + eps), 0, 1).
pub fn pgd_step(x_adv: &[f32], grad: &[f32], x_orig: &[f32], alpha: f32, eps: f32) -> Vec<f32> {
    let mut out = vec![0.0f32; x_adv.len()];
    for i in 0..out.len() {
        let stepped = x_adv[i] + alpha * sign(grad[i]);
        out[i] = stepped
            .max(x_orig[i] - eps)
            .min(x_orig[i] + eps)
            .clamp(0.0, 1.0);
    }
    out
}

/// One AdamW step (PyTorch's formula, bias corrections in f64) on plain vectors.
pub fn adamw_step(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], h: AdamWStep) {
    let bc1 = 1.0 - (h.beta1 as f64).powi(h.step as i32);
    let bc2 = 1.0 - (h.beta2 as f64).powi(h.step as i32);
    let step_size = (h.lr as f64 / bc1) as f32;
    let bc2_sqrt = bc2.sqrt() as f32;
    for i in 0..p.len() {
        p[i] *= 1.0 - h.lr * h.weight_decay;
        m[i] = h.beta1 * m[i] + (1.0 - h.beta1) * g[i];
        v[i] = h.beta2 * v[i] + (1.0 - h.beta2) * g[i] * g[i];
        p[i] -= step_size * (m[i] / (v[i].sqrt() / bc2_sqrt + h.eps));
    }
}
