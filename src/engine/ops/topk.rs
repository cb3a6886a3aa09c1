//! Top-k of every row of a similarity matrix (retrieval's nearest neighbours): the device
//! kernel (`shaders/topk.wgsl`, one workgroup per row) or a host selection, as the context's
//! [`crate::engine::KernelPolicy`] says.

use crate::engine::error::Result;
use crate::engine::gpu::{to_u32, GpuContext, Kernel};
use crate::engine::launch::by_device;
use crate::engine::policy::TopkPlacement;
use crate::engine::Tensor;
use crate::{kernel, kernel_params};

const TOPK: Kernel = kernel!("topk.wgsl", "row_topk", [ReadWrite, ReadWrite, ReadWrite]);

kernel_params! {
    pub struct TopkParams for ["topk.wgsl"] {
        rows: u32,
        cols: u32,
        k: u32,
        /// Column excluded from row r: r + self_offset (the query itself), when exclude_self.
        self_offset: u32,
        exclude_self: u32,
    }
}

/// Top-k of each row of a [rows, cols] host matrix, best first, ties to the lower index;
/// `exclude(r)` names a column row r skips. The CPU code of [`row_topk`].
pub fn topk_host(
    scores: &[f32],
    rows: usize,
    cols: usize,
    k: usize,
    exclude: impl Fn(usize) -> Option<usize>,
) -> (Vec<u32>, Vec<f32>) {
    let mut idx = Vec::with_capacity(rows * k);
    let mut val = Vec::with_capacity(rows * k);
    for r in 0..rows {
        let row = &scores[r * cols..(r + 1) * cols];
        let mut order: Vec<u32> = (0..cols as u32)
            .filter(|&c| exclude(r) != Some(c as usize))
            .collect();
        let best_first =
            |a: &u32, b: &u32| row[*b as usize].total_cmp(&row[*a as usize]).then(a.cmp(b));
        // Partition out the k best (linear time), then order only those.
        if k < order.len() {
            order.select_nth_unstable_by(k, best_first);
            order.truncate(k);
        }
        order.sort_by(best_first);
        for &c in order.iter().take(k) {
            idx.push(c);
            val.push(row[c as usize]);
        }
    }
    (idx, val)
}

/// Largest k the device top-k kernel is used for. It makes one pass over the row per neighbour,
/// and MAP@R asks for R = class size - 1 neighbours (999 on Fashion-MNIST): past this the chunk
/// is read back and selected on the host in linear time instead.
const DEVICE_TOPK_MAX_K: usize = 64;

/// Whether a similarity chunk's top-k is selected by the device kernel, as the context's policy
/// says; by default on GPUs for small k. CPU adapters select on the host (their "read back" is a memory copy, and the
/// kernel's workgroup barriers cost a thread switch each there).
fn topk_on_device(ctx: &GpuContext, k: usize) -> bool {
    let policy = ctx.policy();
    k <= DEVICE_TOPK_MAX_K
        && match policy.topk {
            TopkPlacement::Auto => !policy.tuned_for_cpu_adapter(),
            TopkPlacement::Device => true,
            TopkPlacement::Host => false,
        }
}

/// Top-k of every row of a [rows, cols] similarity matrix, best first (ties to the lower
/// index): (column indices, values), [rows, k] each. With `self_offset`, column r + offset is
/// left out of row r (the query itself).
pub fn row_topk(
    sim: &Tensor,
    k: usize,
    self_offset: Option<usize>,
) -> Result<(Vec<u32>, Vec<f32>)> {
    let (rows, cols) = sim.dims2("topk")?;
    let exclude = |r| self_offset.map(|o| r + o);
    by_device(
        "topk",
        &[sim],
        || Ok(topk_host(&sim.cpu()?, rows, cols, k, exclude)),
        |ctx| {
            if !topk_on_device(ctx, k) {
                return Ok(topk_host(&sim.to_vec()?, rows, cols, k, exclude));
            }
            let idx = ctx.alloc(rows * k)?;
            let val = ctx.alloc(rows * k)?;
            let params = TopkParams {
                rows: to_u32(rows)?,
                cols: to_u32(cols)?,
                k: to_u32(k)?,
                self_offset: to_u32(self_offset.unwrap_or(0))?,
                exclude_self: self_offset.is_some() as u32,
            };
            ctx.dispatch(&TOPK, &params, &[sim.gpu()?, &idx, &val], to_u32(rows)?)?;
            let i = ctx.download(&idx)?.into_iter().map(|x| x as u32).collect();
            Ok((i, ctx.download(&val)?))
        },
    )
}
