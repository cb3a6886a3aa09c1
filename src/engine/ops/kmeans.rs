//! The GPU kernels of k-means (`shaders/kmeans.wgsl`): squared norms, the nearest centre of
//! every row (from the engine's GEMM of rows and centres) and the centroid means of given
//! member lists. `dml::kmeans` drives them from its Lloyd loop, which also has the CPU code;
//! what stays on the host (seeding, convergence, member lists) is said there.

use std::sync::Arc;

use crate::engine::error::{invalid, EngineError, Result};
use crate::engine::gpu::{groups_for, to_u32, GpuBuffer, GpuContext, Kernel};
use crate::engine::ops::matmul::gemm_raw;
use crate::engine::{Device, Tensor};
use crate::{kernel, kernel_params};

/// Bindings of kmeans.wgsl, in order: data, centroids, norms, gram, assign, d2, members.
const SQNORMS: Kernel = kernel!("kmeans.wgsl", "sqnorms", [Read, ReadWrite, ReadWrite]);
const ASSIGN: Kernel = kernel!(
    "kmeans.wgsl",
    "assign_nearest",
    [Read, ReadWrite, ReadWrite, Read, ReadWrite, ReadWrite]
);
const MEANS: Kernel = kernel!(
    "kmeans.wgsl",
    "centroid_means",
    [Read, ReadWrite, ReadWrite, Read, ReadWrite, ReadWrite, Read]
);
kernel_params! {
    pub struct KmeansParams for ["kmeans.wgsl"] {
        /// Rows of the data.
        n: u32,
        /// Centres.
        k: u32,
        dim: u32,
        /// Items of this dispatch.
        count: u32,
    }
}

/// Invocations per workgroup of every kmeans.wgsl entry.
const WORKGROUP: usize = 64;
/// Row and cluster indices travel as f32, exact below 2^24.
const MAX_EXACT_INDEX: usize = 1 << 24;

/// The data of one k-means call on a GPU device, uploaded once, with its squared row norms.
pub struct KmeansPoints {
    ctx: Arc<GpuContext>,
    n: usize,
    k: usize,
    dim: usize,
    /// `[n, D]`.
    data: Tensor,
    /// `n + k` values: the rows' squared norms, then the current centres'.
    norms: GpuBuffer,
}

/// The nearest centre of every row (`assign`, [n], as exact small floats) and the squared
/// distance to it (`d2`, [n]), on the device.
pub struct Assignment {
    pub assign: Tensor,
    pub d2: Tensor,
}

impl KmeansPoints {
    /// Uploads `data` ([n, dim], row-major) for `k` centres to the GPU `device`.
    pub fn upload(device: &Device, data: &[f32], dim: usize, k: usize) -> Result<Self> {
        let Device::Gpu(ctx) = device else {
            return invalid("kmeans", "the k-means kernels run on a GPU device only");
        };
        let n = data.len().checked_div(dim).unwrap_or(0);
        if n + k >= MAX_EXACT_INDEX {
            return invalid(
                "kmeans",
                format!("{n} rows and {k} clusters: the GPU path indexes below 2^24"),
            );
        }
        ctx.check_binding("k-means data [n, dim]", n * dim)?;
        ctx.check_binding("k-means centre products [n, k]", n * k)?;
        ctx.check_binding("k-means member lists", n + 2 * k + 1)?;
        let tensor = Tensor::from_vec(data.to_vec(), &[n, dim], device)?;
        Ok(KmeansPoints {
            ctx: ctx.clone(),
            n,
            k,
            dim,
            data: tensor,
            norms: ctx.alloc(n + k)?,
        })
    }

    /// Centres.
    pub fn k(&self) -> usize {
        self.k
    }

    /// `init` ([k, dim]) as centres on the device.
    pub fn centres(&self, init: &[f32]) -> Result<Tensor> {
        Tensor::from_gpu(self.ctx.upload(init)?, &[self.k, self.dim])
    }

    fn params(&self, count: usize) -> Result<KmeansParams> {
        Ok(KmeansParams {
            n: to_u32(self.n)?,
            k: to_u32(self.k)?,
            dim: to_u32(self.dim)?,
            count: to_u32(count)?,
        })
    }

    /// Squared norms of the rows of [data; centroids] into `norms`. The rows' norms are
    /// recomputed with the centres' (n dim work, small beside the n k dim products) so that
    /// no dispatch ever needs a placeholder for the centres.
    fn sqnorms(&self, centroids: &GpuBuffer) -> Result<()> {
        let rows = self.n + self.k;
        self.ctx.dispatch(
            &SQNORMS,
            &self.params(rows)?,
            &[self.data.gpu()?, centroids, &self.norms],
            groups_for(rows, WORKGROUP)?,
        )
    }

    /// The nearest of `centroids` ([k, dim], on this device) to every row.
    pub fn assign_nearest(&self, centroids: &Tensor) -> Result<Assignment> {
        let centres = centroids.gpu()?;
        self.sqnorms(centres)?;
        let assign = self.ctx.alloc(self.n)?;
        let d2 = self.ctx.alloc(self.n)?;
        // x.c for every (row, centre); the kernel turns it into ||x||² + ||c||² - 2 x.c, and
        // settles near-ties with exact distances.
        let gram = gemm_raw(&self.data, centroids, false, true)?;
        self.ctx.dispatch(
            &ASSIGN,
            &self.params(self.n)?,
            &[
                self.data.gpu()?,
                centres,
                &self.norms,
                gram.gpu()?,
                &assign,
                &d2,
            ],
            groups_for(self.n, WORKGROUP)?,
        )?;
        Ok(Assignment {
            assign: Tensor::from_gpu(assign, &[self.n])?,
            d2: Tensor::from_gpu(d2, &[self.n])?,
        })
    }

    /// The new centres [k, dim]: the mean of each cluster's member rows, given in CSR form as
    /// exact small floats (k + 1 offsets, then the rows), after `last`, the assignment they
    /// were planned from.
    pub fn centroid_means(&self, members_csr: &[f32], last: &Assignment) -> Result<Tensor> {
        if members_csr.len() < self.k + 1 {
            return Err(EngineError::Invalid {
                op: "kmeans",
                detail: format!(
                    "{} member-list values for {} clusters (k + 1 offsets, then the rows)",
                    members_csr.len(),
                    self.k
                ),
            });
        }
        let csr = self.ctx.upload(members_csr)?;
        let next = self.ctx.alloc(self.k * self.dim)?;
        // The gram slot is unused by this entry: the member list fills it (both read-only).
        self.ctx.dispatch(
            &MEANS,
            &self.params(self.k * self.dim)?,
            &[
                self.data.gpu()?,
                &next,
                &self.norms,
                &csr,
                last.assign.gpu()?,
                last.d2.gpu()?,
                &csr,
            ],
            groups_for(self.k * self.dim, WORKGROUP)?,
        )?;
        Tensor::from_gpu(next, &[self.k, self.dim])
    }
}
