//! Matrix products: batched matmul with transposes, linear layers and row-bias addition.
//! GPU: `shaders/matmul.wgsl` (tiled GEMM in workgroup memory).

use crate::engine::error::{shape_err, Result};
use crate::engine::gpu::{u, Kernel};
use crate::engine::tape::Backward;
use crate::engine::tensor::{same_device, Tensor};
use crate::engine::Device;
use crate::kernel;

const GEMM: Kernel = kernel!("matmul.wgsl", "matmul", [Read, Read, ReadWrite]);
const TILE: usize = 64;

/// Batch, rows and columns of a 2-D or 3-D operand as stored.
fn batch_rows_cols(t: &Tensor, op: &'static str) -> Result<(usize, usize, usize)> {
    match t.shape() {
        &[r, c] => Ok((1, r, c)),
        &[b, r, c] => Ok((b, r, c)),
        s => shape_err(op, format!("expected a 2-D or 3-D operand, got {s:?}")),
    }
}

/// How one operand is read: batch stride and the strides of its logical rows and columns.
#[derive(Clone, Copy)]
struct View {
    rows: usize,
    cols: usize,
    s_b: usize,
    s_r: usize,
    s_c: usize,
}

fn view(t: &Tensor, transpose: bool, batch: usize) -> Result<View> {
    let (b, r, c) = batch_rows_cols(t, "matmul")?;
    let s_b = if b == 1 && batch > 1 { 0 } else { r * c };
    Ok(if transpose {
        View { rows: c, cols: r, s_b, s_r: 1, s_c: c }
    } else {
        View { rows: r, cols: c, s_b, s_r: c, s_c: 1 }
    })
}

/// op(a) * op(b) where op transposes the last two dimensions when asked. Operands are 2-D or
/// 3-D; a 2-D operand is shared by every batch entry of a 3-D one. Not recorded.
pub fn gemm_raw(a: &Tensor, b: &Tensor, ta: bool, tb: bool) -> Result<Tensor> {
    let (ba, _, _) = batch_rows_cols(a, "matmul")?;
    let (bb, _, _) = batch_rows_cols(b, "matmul")?;
    if ba != bb && ba != 1 && bb != 1 {
        return shape_err("matmul", format!("batch sizes {ba} and {bb}"));
    }
    let batch = ba.max(bb);
    let (va, vb) = (view(a, ta, batch)?, view(b, tb, batch)?);
    let (m, k, n) = (va.rows, va.cols, vb.cols);
    if vb.rows != k {
        return shape_err(
            "matmul",
            format!("{:?}{} x {:?}{}: inner dimensions {k} and {}", a.shape(),
                if ta { "^T" } else { "" }, b.shape(), if tb { "^T" } else { "" }, vb.rows),
        );
    }
    let out_shape: Vec<usize> = if a.rank() == 3 || b.rank() == 3 {
        vec![batch, m, n]
    } else {
        vec![m, n]
    };
    match same_device("matmul", &[a, b])? {
        Device::Cpu => {
            let (av, bv) = (a.cpu()?, b.cpu()?);
            let mut out = vec![0.0f32; batch * m * n];
            for bi in 0..batch {
                for i in 0..m {
                    for kk in 0..k {
                        let x = av[bi * va.s_b + i * va.s_r + kk * va.s_c];
                        let row = &mut out[(bi * m + i) * n..(bi * m + i + 1) * n];
                        for (j, o) in row.iter_mut().enumerate() {
                            *o += x * bv[bi * vb.s_b + kk * vb.s_r + j * vb.s_c];
                        }
                    }
                }
            }
            Tensor::from_cpu(out, &out_shape)
        }
        Device::Gpu(ctx) => {
            let out = ctx.alloc(batch * m * n)?;
            let params = [
                u(m), u(n), u(k), u(batch),
                u(va.s_b), u(va.s_r), u(va.s_c),
                u(vb.s_b), u(vb.s_r), u(vb.s_c),
                0,
            ];
            let grid = [n.div_ceil(TILE) as u32, m.div_ceil(TILE) as u32, batch as u32];
            ctx.dispatch3(&GEMM, &params, &[a.gpu()?, b.gpu()?, &out], grid)?;
            Tensor::from_gpu(out, &out_shape)
        }
    }
}

/// Sums a 3-D gradient over its batch when the operand it belongs to was a shared 2-D one.
fn reduce_to(g: Tensor, like: &Tensor) -> Result<Tensor> {
    if g.rank() == 3 && like.rank() == 2 {
        let (b, r, c) = batch_rows_cols(&g, "matmul")?;
        let ones = Tensor::full(1.0, &[1, b], &g.device())?;
        return gemm_raw(&ones, &g.reshape(&[b, r * c])?, false, false)?.reshape(&[r, c]);
    }
    Ok(g)
}

struct MatmulBack {
    ta: bool,
    tb: bool,
}

impl Backward for MatmulBack {
    fn name(&self) -> &'static str {
        "matmul"
    }
    fn backward(&self, i: &[Tensor], _o: &Tensor, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let (a, b) = (&i[0], &i[1]);
        let (ta, tb) = (self.ta, self.tb);
        let ga = if i[0].requires_grad() {
            let ga = if ta { gemm_raw(b, g, tb, true)? } else { gemm_raw(g, b, false, !tb)? };
            Some(reduce_to(ga, a)?)
        } else {
            None
        };
        let gb = if i[1].requires_grad() {
            let gb = if tb { gemm_raw(g, a, true, ta)? } else { gemm_raw(a, g, !ta, false)? };
            Some(reduce_to(gb, b)?)
        } else {
            None
        };
        Ok(vec![ga, gb])
    }
}

/// op(a) * op(b), recorded; see [`gemm_raw`] for the shapes accepted.
pub fn matmul_t(a: &Tensor, b: &Tensor, ta: bool, tb: bool) -> Result<Tensor> {
    Ok(gemm_raw(a, b, ta, tb)?.record(MatmulBack { ta, tb }, &[a, b]))
}

/// a * b.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    matmul_t(a, b, false, false)
}

/// mat[r, c] + bias[c], not recorded. GPU: a rank-1 GEMM update (ones * bias) accumulated.
pub fn add_row_bias_raw(mat: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let (rows, cols) = mat.dims2("add_row_bias")?;
    if bias.shape() != [cols] {
        return shape_err("add_row_bias", format!("bias {:?} for {:?}", bias.shape(), mat.shape()));
    }
    match same_device("add_row_bias", &[mat, bias])? {
        Device::Cpu => {
            let (mv, bv) = (mat.cpu()?, bias.cpu()?);
            let out = mv.iter().enumerate().map(|(i, &v)| v + bv[i % cols]).collect();
            Tensor::from_cpu(out, mat.shape())
        }
        Device::Gpu(ctx) => {
            let out = ctx.alloc(rows * cols)?;
            ctx.copy(mat.gpu()?, 0, &out, 0, rows * cols);
            let ones = Tensor::full(1.0, &[rows], &mat.device())?;
            let params = [u(rows), u(cols), 1, 1, 0, 1, 1, 0, 1, 1, 1];
            let grid = [cols.div_ceil(TILE) as u32, rows.div_ceil(TILE) as u32, 1];
            ctx.dispatch3(&GEMM, &params, &[ones.gpu()?, bias.gpu()?, &out], grid)?;
            Tensor::from_gpu(out, mat.shape())
        }
    }
}

/// Column sums of a [rows, cols] matrix, as a [cols] vector (not recorded).
pub fn sum_rows_raw(mat: &Tensor) -> Result<Tensor> {
    let (rows, cols) = mat.dims2("sum_rows")?;
    let ones = Tensor::full(1.0, &[1, rows], &mat.device())?;
    gemm_raw(&ones, mat, false, false)?.reshape(&[cols])
}

struct RowBiasBack;
impl Backward for RowBiasBack {
    fn name(&self) -> &'static str {
        "add_row_bias"
    }
    fn backward(&self, _i: &[Tensor], _o: &Tensor, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(g.clone()), Some(sum_rows_raw(g)?)])
    }
}

/// mat[r, c] + bias[c], recorded.
pub fn add_row_bias(mat: &Tensor, bias: &Tensor) -> Result<Tensor> {
    Ok(add_row_bias_raw(mat, bias)?.record(RowBiasBack, &[mat, bias]))
}

/// x W^T + b for x [N, in], W [out, in], b [out] (PyTorch's `nn.Linear` layout).
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let y = matmul_t(x, w, false, true)?;
    match b {
        Some(b) => add_row_bias(&y, b),
        None => Ok(y),
    }
}
