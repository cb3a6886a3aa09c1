//! Channel ops on NCHW tensors: concat and split along channels, channel permutation (RGB to
//! BGR), per-channel affine (input normalisation); forward and backward on both devices.
//! GPU: `shaders/channels.wgsl`.
//!
//! Every op accepts any tensor of rank >= 2 read as [N, C, spatial...]; the spatial
//! dimensions are flattened into one (HW).

use crate::engine::error::{invalid, shape_err, Result};
use crate::engine::gpu::{groups_for, to_u32, GpuContext, Kernel};
use crate::engine::launch::Launch;
use crate::engine::tape::Backward;
use crate::engine::tensor::Tensor;
use crate::engine::{cpu, host_pool};
use crate::{kernel, kernel_params};
use rayon::prelude::*;

const COPY: Kernel = kernel!(
    "channels.wgsl",
    "copy_channels",
    [Read, Read, Read, ReadWrite]
);
const GATHER: Kernel = kernel!(
    "channels.wgsl",
    "gather_channels",
    [Read, Read, Read, ReadWrite]
);
const AFFINE: Kernel = kernel!(
    "channels.wgsl",
    "channel_affine",
    [Read, Read, Read, ReadWrite]
);

kernel_params! {
    /// Every channel kernel reads its input as [batch, src_c, hw] and writes [batch, dst_c, hw];
    /// the copy moves `count` channels from `src_off` to `dst_off`.
    pub struct ChannelsParams for ["channels.wgsl"] {
        batch: u32,
        hw: u32,
        src_c: u32,
        src_off: u32,
        dst_c: u32,
        dst_off: u32,
        count: u32,
    }
}

impl ChannelsParams {
    /// The parameters of a gather or affine over [batch, src_c, hw] into [batch, dst_c, hw].
    fn whole(batch: usize, hw: usize, src_c: usize, dst_c: usize) -> Result<Self> {
        Ok(ChannelsParams {
            batch: to_u32(batch)?,
            hw: to_u32(hw)?,
            src_c: to_u32(src_c)?,
            dst_c: to_u32(dst_c)?,
            ..Default::default()
        })
    }
}

/// (N, C, HW) of a tensor read as [N, C, spatial...].
fn n_c_hw(t: &Tensor, op: &'static str) -> Result<(usize, usize, usize)> {
    match t.shape() {
        [n, c, rest @ ..] => Ok((*n, *c, rest.iter().product())),
        s => shape_err(op, format!("expected an [N, C, ...] tensor, got {s:?}")),
    }
}

/// `shape` with its channel count replaced.
fn with_channels(shape: &[usize], c: usize) -> Vec<usize> {
    let mut s = shape.to_vec();
    s[1] = c;
    s
}

/// Where a channel-slice copy reads from and writes to.
#[derive(Clone, Copy)]
struct Slice {
    batch: usize,
    hw: usize,
    src_c: usize,
    src_off: usize,
    dst_c: usize,
    dst_off: usize,
    count: usize,
}

impl Slice {
    /// The same copy over a chunk of `batch` images.
    fn with_batch(self, batch: usize) -> Slice {
        Slice { batch, ..self }
    }

    /// out[n, dst_off + c, s] = src[n, src_off + c, s] on the host, one image per task.
    fn copy_cpu(&self, src: &[f32], out: &mut [f32]) {
        let per_image = (self.dst_c * self.hw).max(1);
        out.par_chunks_mut(per_image)
            .enumerate()
            .for_each(|(img, out_img)| self.copy_image(img, src, out_img));
    }

    /// The copy for image `img`, into that image's part of the output. The channels copied are
    /// consecutive in both tensors, so it is one contiguous block.
    fn copy_image(&self, img: usize, src: &[f32], out_img: &mut [f32]) {
        let len = self.count * self.hw;
        let from = (img * self.src_c + self.src_off) * self.hw;
        out_img[self.dst_off * self.hw..][..len].copy_from_slice(&src[from..from + len]);
    }

    /// The same copy recorded as one dispatch.
    fn copy_gpu(
        &self,
        ctx: &GpuContext,
        src: &Tensor,
        out: &crate::engine::gpu::GpuBuffer,
    ) -> Result<()> {
        let sb = src.gpu()?;
        let params = ChannelsParams {
            batch: to_u32(self.batch)?,
            hw: to_u32(self.hw)?,
            src_c: to_u32(self.src_c)?,
            src_off: to_u32(self.src_off)?,
            dst_c: to_u32(self.dst_c)?,
            dst_off: to_u32(self.dst_off)?,
            count: to_u32(self.count)?,
        };
        let total = self.batch * self.count * self.hw;
        ctx.dispatch(&COPY, &params, &[sb, sb, sb, out], groups_for(total, 256)?)
    }
}

/// Concatenation along C, not recorded.
fn concat_raw(xs: &[&Tensor]) -> Result<Tensor> {
    let Some(first) = xs.first() else {
        return invalid("concat_channels", "no tensors to concatenate");
    };
    let (batch, _, hw) = n_c_hw(first, "concat_channels")?;
    let mut total_c = 0;
    for x in xs {
        n_c_hw(x, "concat_channels")?;
        if x.shape()[0] != batch || x.shape()[2..] != first.shape()[2..] {
            return shape_err(
                "concat_channels",
                format!(
                    "{:?} and {:?} differ outside the channel dimension",
                    first.shape(),
                    x.shape()
                ),
            );
        }
        total_c += x.shape()[1];
    }
    let out_shape = with_channels(first.shape(), total_c);
    let slices: Vec<Slice> = xs
        .iter()
        .scan(0, |off, x| {
            let count = x.shape()[1];
            let s = Slice {
                batch,
                hw,
                src_c: count,
                src_off: 0,
                dst_c: total_c,
                dst_off: *off,
                count,
            };
            *off += count;
            Some(s)
        })
        .collect();
    let [y] = Launch::per_sample("concat_channels", xs).run(
        [&out_shape],
        || {
            let guards = xs.iter().map(|x| x.cpu()).collect::<Result<Vec<_>>>()?;
            let mut out = host_pool::zeroed(batch * total_c * hw);
            // One image per task, every input's slice of it in turn.
            out.par_chunks_mut((total_c * hw).max(1))
                .enumerate()
                .for_each(|(img, out_img)| {
                    for (x, s) in guards.iter().zip(&slices) {
                        s.copy_image(img, x, out_img);
                    }
                });
            Ok([out])
        },
        |call| {
            // The slices are disjoint and cover the output, so every element gets written.
            for (x, s) in call.inputs.iter().zip(&slices) {
                s.with_batch(call.batch())
                    .copy_gpu(call.ctx, x, &call.out[0])?;
            }
            Ok(())
        },
    )?;
    Ok(y)
}

/// Channels [off, off + count) of `x`, not recorded.
fn slice_raw(x: &Tensor, off: usize, count: usize) -> Result<Tensor> {
    let (batch, c, hw) = n_c_hw(x, "split_channels")?;
    let s = Slice {
        batch,
        hw,
        src_c: c,
        src_off: off,
        dst_c: count,
        dst_off: 0,
        count,
    };
    // The slice fills every output channel, so no zeroing.
    copy_slice(x, s, Launch::per_sample("split_channels", &[x]))
}

/// `g` placed at channels [off, off + g's C) of a zero tensor with `total_c` channels.
fn pad_raw(g: &Tensor, off: usize, total_c: usize) -> Result<Tensor> {
    let (batch, count, hw) = n_c_hw(g, "split_channels backward")?;
    let s = Slice {
        batch,
        hw,
        src_c: count,
        src_off: 0,
        dst_c: total_c,
        dst_off: off,
        count,
    };
    // The copy writes only the piece's channels: the rest of the output starts zeroed.
    copy_slice(
        g,
        s,
        Launch::per_sample("split_channels backward", &[g]).zeroed(),
    )
}

/// Runs the channel copy `s` of `x` into a fresh [N, s.dst_c, H, W] output through `launch`.
fn copy_slice(x: &Tensor, s: Slice, launch: Launch) -> Result<Tensor> {
    let shape = with_channels(x.shape(), s.dst_c);
    let [y] = launch.run(
        [&shape],
        || {
            let mut out = host_pool::zeroed(s.batch * s.dst_c * s.hw);
            s.copy_cpu(&x.cpu()?, &mut out);
            Ok([out])
        },
        |call| {
            let s = s.with_batch(call.batch());
            s.copy_gpu(call.ctx, &call.inputs[0], &call.out[0])
        },
    )?;
    Ok(y)
}

/// out[:, i] = x[:, index[i]], not recorded.
fn gather_raw(x: &Tensor, index: &[usize]) -> Result<Tensor> {
    let (batch, c, hw) = n_c_hw(x, "permute_channels")?;
    let out_c = index.len();
    let shape = with_channels(x.shape(), out_c);
    let [y] = Launch::per_sample("permute_channels", &[x]).run(
        [&shape],
        || {
            let xv = x.cpu()?;
            let mut out = host_pool::for_overwrite(batch * out_c * hw);
            // One output plane per task (several when planes are small).
            out.par_chunks_mut(hw.max(1))
                .enumerate()
                .with_min_len(cpu::rows_per_task(hw))
                .for_each(|(plane, out_plane)| {
                    let from = (plane / out_c) * c + index[plane % out_c];
                    out_plane.copy_from_slice(&xv[from * hw..(from + 1) * hw]);
                });
            Ok([out])
        },
        |call| {
            // Channel indices travel as f32, exact far beyond any channel count.
            let idx = call
                .ctx
                .upload(&index.iter().map(|&i| i as f32).collect::<Vec<_>>())?;
            let params = ChannelsParams::whole(call.batch(), hw, c, out_c)?;
            let (xb, out) = (call.input(0)?, &call.out[0]);
            let groups = groups_for(out.len(), 256)?;
            call.ctx
                .dispatch(&GATHER, &params, &[xb, &idx, &idx, out], groups)
        },
    )?;
    Ok(y)
}

/// out[:, c] = x[:, c] * scale[c] + shift[c], not recorded.
fn affine_raw(x: &Tensor, scale: &[f32], shift: &[f32]) -> Result<Tensor> {
    let (_, c, hw) = n_c_hw(x, "channel_affine")?;
    if scale.len() != c || shift.len() != c {
        return shape_err(
            "channel_affine",
            format!(
                "{} scales and {} shifts for {c} channels",
                scale.len(),
                shift.len()
            ),
        );
    }
    let [y] = Launch::per_sample("channel_affine", &[x]).run(
        [x.shape()],
        || {
            let xv = x.cpu()?;
            let mut out = host_pool::for_overwrite(xv.len());
            // One plane per task (several when planes are small); constants per plane.
            out.par_chunks_mut(hw.max(1))
                .zip(xv.par_chunks(hw.max(1)))
                .enumerate()
                .with_min_len(cpu::rows_per_task(hw))
                .for_each(|(plane, (o, x))| {
                    let (a, b) = (scale[plane % c], shift[plane % c]);
                    for (o, &x) in o.iter_mut().zip(x) {
                        *o = x * a + b;
                    }
                });
            Ok([out])
        },
        |call| {
            let (sb, tb) = (call.ctx.upload(scale)?, call.ctx.upload(shift)?);
            let params = ChannelsParams::whole(call.batch(), hw, c, c)?;
            let out = &call.out[0];
            let bufs = [call.input(0)?, &sb, &tb, out];
            call.ctx
                .dispatch(&AFFINE, &params, &bufs, groups_for(out.len(), 256)?)
        },
    )?;
    Ok(y)
}

// ------------------------------------------------------------------ recorded ops

/// Concat's backward is a split of the gradient into the inputs' channel counts.
struct ConcatBack;
impl Backward for ConcatBack {
    fn name(&self) -> &'static str {
        "concat_channels"
    }
    fn backward(&self, i: &[Tensor], _o: &Tensor, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let mut off = 0;
        let mut grads = Vec::with_capacity(i.len());
        for x in i {
            let count = x.shape()[1];
            grads.push(Some(slice_raw(g, off, count)?));
            off += count;
        }
        Ok(grads)
    }
}

/// Concatenates NCHW tensors along C.
pub fn concat_channels(xs: &[&Tensor]) -> Result<Tensor> {
    Ok(concat_raw(xs)?.record(ConcatBack, xs))
}

/// One piece of a split: its backward places the gradient at the piece's channels of a zero
/// tensor (the concat of the piece's gradient with zeros for the other pieces).
struct SplitPieceBack {
    offset: usize,
}
impl Backward for SplitPieceBack {
    fn name(&self) -> &'static str {
        "split_channels"
    }
    fn backward(&self, i: &[Tensor], _o: &Tensor, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(pad_raw(g, self.offset, i[0].shape()[1])?)])
    }
}

/// Splits along C into pieces of the given channel counts (summing to C).
pub fn split_channels(x: &Tensor, sizes: &[usize]) -> Result<Vec<Tensor>> {
    let (_, c, _) = n_c_hw(x, "split_channels")?;
    if sizes.iter().sum::<usize>() != c {
        return shape_err(
            "split_channels",
            format!("sizes {sizes:?} for {c} channels"),
        );
    }
    let mut off = 0;
    let mut pieces = Vec::with_capacity(sizes.len());
    for &count in sizes {
        pieces.push(slice_raw(x, off, count)?.record(SplitPieceBack { offset: off }, &[x]));
        off += count;
    }
    Ok(pieces)
}

/// The backward of a permutation gathers with the inverse permutation.
struct PermuteBack {
    inverse: Vec<usize>,
}
impl Backward for PermuteBack {
    fn name(&self) -> &'static str {
        "permute_channels"
    }
    fn backward(&self, _i: &[Tensor], _o: &Tensor, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(gather_raw(g, &self.inverse)?)])
    }
}

/// out[:, i] = x[:, perm[i]] (e.g. [2, 1, 0] turns RGB into BGR).
pub fn permute_channels(x: &Tensor, perm: &[usize]) -> Result<Tensor> {
    let (_, c, _) = n_c_hw(x, "permute_channels")?;
    let mut inverse = vec![usize::MAX; c];
    if perm.len() != c {
        return shape_err(
            "permute_channels",
            format!("permutation {perm:?} for {c} channels"),
        );
    }
    for (i, &p) in perm.iter().enumerate() {
        if p >= c || inverse[p] != usize::MAX {
            return invalid(
                "permute_channels",
                format!("{perm:?} is not a permutation of 0..{c}"),
            );
        }
        inverse[p] = i;
    }
    Ok(gather_raw(x, perm)?.record(PermuteBack { inverse }, &[x]))
}

/// The gradient of a per-channel affine map is g * scale[c].
struct ChannelAffineBack {
    scale: Vec<f32>,
}
impl Backward for ChannelAffineBack {
    fn name(&self) -> &'static str {
        "channel_affine"
    }
    fn backward(&self, _i: &[Tensor], _o: &Tensor, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let zeros = vec![0.0; self.scale.len()];
        Ok(vec![Some(affine_raw(g, &self.scale, &zeros)?)])
    }
}

/// out[:, c] = x[:, c] * scale[c] + shift[c], constants per channel (input normalisation).
pub fn channel_affine(x: &Tensor, scale: &[f32], shift: &[f32]) -> Result<Tensor> {
    let out = affine_raw(x, scale, shift)?;
    Ok(out.record(
        ChannelAffineBack {
            scale: scale.to_vec(),
        },
        &[x],
    ))
}
