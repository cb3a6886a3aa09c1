//! Matrix products: batched matmul with transposes, linear layers and row-bias addition.
//! GPU: `shaders/matmul.wgsl` and `shaders/matmul_vec4.wgsl`, the GEMM kernel chosen by
//! adapter type (see [`GemmKernel`]).

use crate::engine::error::{shape_err, Result};
use crate::engine::gpu::{groups_for, to_u32, GpuBuffer, GpuContext, Kernel};
use crate::engine::launch::Launch;
use crate::engine::tape::Backward;
use crate::engine::tensor::Tensor;
use crate::engine::{cpu, host_pool};
use crate::{kernel, kernel_params};

const GEMM_TILED: Kernel = kernel!("matmul.wgsl", "matmul", [Read, Read, ReadWrite]);
const GEMM_SCALAR: Kernel = kernel!(
    "matmul.wgsl",
    "matmul_scalar_blocks",
    [Read, Read, ReadWrite]
);
/// Indexed by (A is k-contiguous, B is k-contiguous).
const GEMM_VEC4: [[Kernel; 2]; 2] = [
    [
        kernel!("matmul_vec4.wgsl", "mm4_mn", [Read, Read, ReadWrite]),
        kernel!("matmul_vec4.wgsl", "mm4_mk", [Read, Read, ReadWrite]),
    ],
    [
        kernel!("matmul_vec4.wgsl", "mm4_kn", [Read, Read, ReadWrite]),
        kernel!("matmul_vec4.wgsl", "mm4_kk", [Read, Read, ReadWrite]),
    ],
];

/// Workgroup size of matmul_vec4.wgsl.
const VEC4_WORKGROUP: usize = 8;

pub use crate::engine::policy::GemmKernel;

kernel_params! {
    /// out[b] (+)= A[b] B[b] with A [m, k] and B [k, n] read through (batch, row, column)
    /// strides `sa_*` and `sb_*`.
    pub struct MatmulParams for ["matmul.wgsl", "matmul_vec4.wgsl"] {
        m: u32,
        n: u32,
        k: u32,
        batch: u32,
        sa_b: u32,
        sa_m: u32,
        sa_k: u32,
        sb_b: u32,
        sb_k: u32,
        sb_n: u32,
        /// 1 to add to the output rather than overwrite it.
        accumulate: u32,
    }
}

/// A GEMM's shapes, operand views and the kernel layout it allows.
struct GemmParams {
    m: usize,
    n: usize,
    k: usize,
    batch: usize,
    a: View,
    b: View,
    accumulate: bool,
    /// Whether each operand is stored with k contiguous; `None` when an operand's stored rows
    /// are not a multiple of 4 long (no aligned vec4 reads).
    vec4_layout: Option<(bool, bool)>,
}

/// out (+)= op(a) op(b) on the GPU with the given kernel.
fn dispatch_gemm(
    ctx: &GpuContext,
    kernel: GemmKernel,
    p: &GemmParams,
    buffers: [&GpuBuffer; 3],
) -> Result<()> {
    let params = MatmulParams {
        m: to_u32(p.m)?,
        n: to_u32(p.n)?,
        k: to_u32(p.k)?,
        batch: to_u32(p.batch)?,
        sa_b: to_u32(p.a.s_b)?,
        sa_m: to_u32(p.a.s_r)?,
        sa_k: to_u32(p.a.s_c)?,
        sb_b: to_u32(p.b.s_b)?,
        sb_k: to_u32(p.b.s_r)?,
        sb_n: to_u32(p.b.s_c)?,
        accumulate: p.accumulate as u32,
    };
    // One workgroup per (rows x cols) output tile and batch entry.
    let per_tile = |kernel: &Kernel, rows: usize, cols: usize| {
        let grid = [
            to_u32(p.n.div_ceil(cols))?,
            to_u32(p.m.div_ceil(rows))?,
            to_u32(p.batch)?,
        ];
        ctx.dispatch3(kernel, &params, &buffers, grid)
    };
    match (kernel, p.vec4_layout) {
        (GemmKernel::Tiled, _) => per_tile(&GEMM_TILED, 64, 64),
        (GemmKernel::Vec4, Some((a_k, b_k))) => {
            // One invocation per 16 x 8 output block, on a 1-D grid.
            let blocks = p.m.div_ceil(16) * p.n.div_ceil(8) * p.batch;
            let groups = groups_for(blocks, VEC4_WORKGROUP)?;
            let kernel = &GEMM_VEC4[a_k as usize][b_k as usize];
            ctx.dispatch(kernel, &params, &buffers, groups)
        }
        (GemmKernel::Scalar | GemmKernel::Vec4, _) => per_tile(&GEMM_SCALAR, 16, 32),
    }
}

/// Batch, rows and columns of a 2-D or 3-D operand as stored.
fn batch_rows_cols(t: &Tensor, op: &'static str) -> Result<(usize, usize, usize)> {
    match t.shape() {
        &[r, c] => Ok((1, r, c)),
        &[b, r, c] => Ok((b, r, c)),
        s => shape_err(op, format!("expected a 2-D or 3-D operand, got {s:?}")),
    }
}

/// Length of the rows an operand is stored in (its last dimension).
fn stored_row_len(t: &Tensor) -> usize {
    t.shape().last().copied().unwrap_or(1)
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
        View {
            rows: c,
            cols: r,
            s_b,
            s_r: 1,
            s_c: c,
        }
    } else {
        View {
            rows: r,
            cols: c,
            s_b,
            s_r: c,
            s_c: 1,
        }
    })
}

/// op(a) * op(b) where op transposes the last two dimensions when asked. Operands are 2-D or
/// 3-D; a 2-D operand is shared by every batch entry of a 3-D one. Not recorded.
pub fn gemm_raw(a: &Tensor, b: &Tensor, ta: bool, tb: bool) -> Result<Tensor> {
    gemm_raw_using(None, a, b, ta, tb)
}

/// [`gemm_raw`] with a chosen GPU kernel (`None`: the context's [`crate::engine::KernelPolicy`]);
/// for timing each kernel on one context.
pub fn gemm_raw_using(
    kernel: Option<GemmKernel>,
    a: &Tensor,
    b: &Tensor,
    ta: bool,
    tb: bool,
) -> Result<Tensor> {
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
            format!(
                "{:?}{} x {:?}{}: inner dimensions {k} and {}",
                a.shape(),
                if ta { "^T" } else { "" },
                b.shape(),
                if tb { "^T" } else { "" },
                vb.rows
            ),
        );
    }
    let out_shape: Vec<usize> = if a.rank() == 3 || b.rank() == 3 {
        vec![batch, m, n]
    } else {
        vec![m, n]
    };
    let [y] = Launch::new("matmul", &[a, b]).run(
        [&out_shape],
        || {
            let shape = CpuGemm {
                m,
                n,
                k,
                batch,
                a: va,
                b: vb,
            };
            Ok([cpu_gemm(&shape, &a.cpu()?, &b.cpu()?)])
        },
        |call| {
            let kernel = kernel.unwrap_or(call.ctx.policy().gemm_kernel());
            let params = GemmParams {
                m,
                n,
                k,
                batch,
                a: va,
                b: vb,
                accumulate: false,
                vec4_layout: (stored_row_len(a).is_multiple_of(4)
                    && stored_row_len(b).is_multiple_of(4))
                .then_some((!ta, tb)),
            };
            let bufs = [call.input(0)?, call.input(1)?, &call.out[0]];
            dispatch_gemm(call.ctx, kernel, &params, bufs)
        },
    )?;
    Ok(y)
}

/// The sizes and operand views of one batched CPU product.
struct CpuGemm {
    m: usize,
    n: usize,
    k: usize,
    batch: usize,
    a: View,
    b: View,
}

/// The fast CPU product: one SGEMM per batch entry, batch entries spread over the pool (each
/// GEMM then single-threaded), or one multi-threaded SGEMM when there is one entry.
fn cpu_gemm(p: &CpuGemm, av: &[f32], bv: &[f32]) -> Vec<f32> {
    use rayon::prelude::*;
    // Written whole by the GEMMs (which do not read it).
    let mut out = host_pool::for_overwrite(p.batch * p.m * p.n);
    let entry = |bi: usize, c: &mut [f32], parallel: bool| {
        let a = &av[bi * p.a.s_b..];
        let b = &bv[bi * p.b.s_b..];
        let sa = cpu::Strides {
            row: p.a.s_r,
            col: p.a.s_c,
        };
        let sb = cpu::Strides {
            row: p.b.s_r,
            col: p.b.s_c,
        };
        cpu::sgemm((p.m, p.n, p.k), a, sa, b, sb, c, p.n, false, parallel);
    };
    let per_entry = (p.m * p.n).max(1);
    if p.batch == 1 {
        entry(0, &mut out, true);
    } else {
        out.par_chunks_mut(per_entry)
            .enumerate()
            .for_each(|(bi, c)| entry(bi, c, false));
    }
    out
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
            let ga = if ta {
                gemm_raw(b, g, tb, true)?
            } else {
                gemm_raw(g, b, false, !tb)?
            };
            Some(reduce_to(ga, a)?)
        } else {
            None
        };
        let gb = if i[1].requires_grad() {
            let gb = if tb {
                gemm_raw(g, a, true, ta)?
            } else {
                gemm_raw(a, g, !ta, false)?
            };
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
    add_row_bias_raw_using(None, mat, bias)
}

/// [`add_row_bias_raw`] with a chosen GPU kernel (`None`: the adapter's default); for tests.
pub fn add_row_bias_raw_using(
    kernel: Option<GemmKernel>,
    mat: &Tensor,
    bias: &Tensor,
) -> Result<Tensor> {
    let (rows, cols) = mat.dims2("add_row_bias")?;
    if bias.shape() != [cols] {
        return shape_err(
            "add_row_bias",
            format!("bias {:?} for {:?}", bias.shape(), mat.shape()),
        );
    }
    let [y] = Launch::new("add_row_bias", &[mat, bias]).run(
        [mat.shape()],
        || {
            use rayon::prelude::*;
            let (mv, bv) = (mat.cpu()?, bias.cpu()?);
            let mut out = host_pool::for_overwrite(mv.len());
            // Rows in tasks of about FLAT_CHUNK elements.
            out.par_chunks_mut(cols.max(1))
                .zip(mv.par_chunks(cols.max(1)))
                .with_min_len(cpu::rows_per_task(cols))
                .for_each(|(o, m)| {
                    for ((o, &m), &b) in o.iter_mut().zip(m).zip(bv.iter()) {
                        *o = m + b;
                    }
                });
            Ok([out])
        },
        |call| {
            let out = &call.out[0];
            call.ctx.copy(call.input(0)?, 0, out, 0, rows * cols);
            // out += ones[rows, 1] * bias[1, cols]
            let ones = Tensor::full(1.0, &[rows], &mat.device())?;
            let column = |len| View {
                rows: len,
                cols: 1,
                s_b: 0,
                s_r: 1,
                s_c: 1,
            };
            let params = GemmParams {
                m: rows,
                n: cols,
                k: 1,
                batch: 1,
                a: column(rows),
                b: View {
                    rows: 1,
                    cols,
                    s_b: 0,
                    s_r: cols,
                    s_c: 1,
                },
                accumulate: true,
                vec4_layout: None,
            };
            let kernel = kernel.unwrap_or(call.ctx.policy().gemm_kernel());
            dispatch_gemm(
                call.ctx,
                kernel,
                &params,
                [ones.gpu()?, call.input(1)?, out],
            )
        },
    )?;
    Ok(y)
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
    fn backward(&self, i: &[Tensor], _o: &Tensor, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        // A frozen bias (an attack's view) needs no column sums.
        let bias = i[1].requires_grad().then(|| sum_rows_raw(g)).transpose()?;
        Ok(vec![Some(g.clone()), bias])
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
