//! Tensors larger than one storage binding.
//!
//! wgpu binds at most `max_storage_buffer_binding_size` bytes of a buffer to one kernel binding
//! (128 MiB on many adapters, llvmpipe among them), while a buffer itself may be much larger:
//! MobileNetV2 at batch 64 and 224x224 has a 308 MB activation. Ops whose tensors exceed a
//! binding therefore run chunk by chunk on views ([`GpuBuffer::view`]) of them:
//! - per-sample ops (convolutions, pooling, channel ops) over batch chunks, each chunk's outputs
//!   copied into the whole outputs ([`per_sample`]);
//! - reductions over the batch (weight and bias gradients) as sums of chunk results
//!   ([`batch_sum`]);
//! - elementwise ops over flat ranges ([`flat`]);
//! - batch norm, which couples the batch, combines per-chunk statistics in its own module.
//!
//! Chunks start on the adapter's storage offset alignment where they can (views); otherwise
//! their inputs are copied. On the CPU, and on a GPU when everything fits, these helpers
//! return `None` and the op runs as usual. Ops reach them through [`super::launch::Launch`],
//! which names the rule; batch norm calls them itself.

use std::ops::Range;
use std::sync::Arc;

use super::device::Device;
use super::error::{shape_err, EngineError, Result};
use super::gpu::{GpuBuffer, GpuContext};
use super::ops::elementwise::{binary_raw, Binary};
use super::tensor::{numel, Tensor};

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Batch ranges such that the chunk of every tensor (`per_sample` values per sample) fits one
/// binding and starts on an aligned offset; `None` when every whole tensor fits already.
pub(crate) fn batch_ranges(
    ctx: &GpuContext,
    op: &str,
    n: usize,
    per_sample: &[usize],
) -> Result<Option<Vec<Range<usize>>>> {
    let limit = ctx.max_binding_elems();
    if per_sample.iter().all(|&s| n * s <= limit) {
        return Ok(None);
    }
    let align = ctx.offset_align_elems();
    // Chunks of `step` samples start every tensor's view on an aligned value.
    let step = per_sample.iter().filter(|&&s| s > 0).fold(1, |acc, &s| {
        let need = align / gcd(align, s);
        acc / gcd(acc, need) * need
    });
    let widest = per_sample.iter().copied().max().unwrap_or(1).max(1);
    // Aligned chunks are views (no copy). Where the smallest aligned chunk is over a binding
    // (odd sample sizes and a 256-byte alignment, the WebGPU baseline), chunks of any size
    // are used and the unaligned ones are copied ([`read_range`]).
    let chunk = match limit / widest / step * step {
        0 => limit / widest,
        aligned => aligned,
    };
    if chunk == 0 {
        return Err(EngineError::BindingTooLarge {
            name: format!("{op}: one sample of {widest} values"),
            bytes: (widest * 4) as u64,
            limit: ctx.max_binding_bytes(),
        });
    }
    ctx.count_split();
    Ok(Some(
        (0..n)
            .step_by(chunk)
            .map(|s| s..(s + chunk).min(n))
            .collect(),
    ))
}

/// Whether values from `start` on in `buf` can be bound directly (the adapter's storage offset
/// alignment).
pub(crate) fn is_aligned(buf: &GpuBuffer, start: usize) -> bool {
    (buf.offset() + start).is_multiple_of(buf.ctx().offset_align_elems())
}

/// Values `start..start + len` of `buf` for reading: a view where the start is aligned, else
/// a copy (buffer copies need only 4-byte offsets), recorded in order with the dispatches.
pub(crate) fn read_range(buf: &GpuBuffer, start: usize, len: usize) -> Result<GpuBuffer> {
    if is_aligned(buf, start) {
        return buf.view(start, len);
    }
    let copy = buf.ctx().alloc(len)?;
    buf.ctx().copy(buf, start, &copy, 0, len);
    Ok(copy)
}

/// Samples `r` of a GPU tensor whose first dimension is the batch, for reading (a view, or a
/// copy where the chunk does not start on the alignment).
pub(crate) fn chunk_view(t: &Tensor, r: &Range<usize>) -> Result<Tensor> {
    let n = t.shape()[0];
    let per = t.numel() / n.max(1);
    let view = read_range(t.gpu()?, r.start * per, r.len() * per)?;
    let mut shape = t.shape().to_vec();
    shape[0] = r.len();
    Tensor::from_gpu(view, &shape)
}

/// Values per sample of each shape, checking that each leads with the batch `n`.
fn per_sample_sizes(op: &'static str, n: usize, shapes: &[&[usize]]) -> Result<Vec<usize>> {
    shapes
        .iter()
        .map(|s| match s.first() {
            Some(&m) if m == n => Ok(numel(s) / n),
            _ => shape_err(op, format!("{s:?} does not lead with the batch size {n}")),
        })
        .collect()
}

/// Where an op's chunks run and which samples each covers.
type Plan = (Arc<GpuContext>, Vec<Range<usize>>);

/// The GPU context and batch ranges for an op over `batched` (all [N, ...]) whose other
/// tensors (outputs, intermediates) hold `extra` values per sample; `None` on the CPU, for an
/// empty batch, or when everything fits one binding.
fn plan(op: &'static str, batched: &[&Tensor], extra: &[usize]) -> Result<Option<Plan>> {
    let Device::Gpu(ctx) = batched[0].device() else {
        return Ok(None);
    };
    let n = batched[0].shape().first().copied().unwrap_or(0);
    if n == 0 {
        return Ok(None);
    }
    let shapes: Vec<&[usize]> = batched.iter().map(|t| t.shape()).collect();
    let mut sizes = per_sample_sizes(op, n, &shapes)?;
    sizes.extend_from_slice(extra);
    Ok(batch_ranges(&ctx, op, n, &sizes)?.map(|ranges| (ctx, ranges)))
}

/// Views of samples `r` of every tensor in `batched`.
fn chunk_views(batched: &[&Tensor], r: &Range<usize>) -> Result<Vec<Tensor>> {
    batched.iter().map(|t| chunk_view(t, r)).collect()
}

/// Runs a per-sample op in batch chunks when one of its tensors exceeds a binding: `f` gets
/// views of `batched` (all [N, ...]) for one chunk and returns that chunk's outputs, which are
/// copied into whole outputs of `out_shapes` (all [N, ...]). `None` when no split is needed.
pub(crate) fn per_sample(
    op: &'static str,
    batched: &[&Tensor],
    out_shapes: &[&[usize]],
    f: impl Fn(&[Tensor]) -> Result<Vec<Tensor>>,
) -> Result<Option<Vec<Tensor>>> {
    let n = batched[0].shape().first().copied().unwrap_or(0);
    if n == 0 {
        return Ok(None);
    }
    let outs = per_sample_sizes(op, n, out_shapes)?;
    let Some((ctx, ranges)) = plan(op, batched, &outs)? else {
        return Ok(None);
    };
    let whole: Vec<GpuBuffer> = out_shapes
        .iter()
        .map(|s| ctx.alloc(numel(s)))
        .collect::<Result<_>>()?;
    for r in &ranges {
        let ys = f(&chunk_views(batched, r)?)?;
        if ys.len() != whole.len() {
            return Err(EngineError::Gpu(format!(
                "{op}: a chunk gave {} outputs, expected {}",
                ys.len(),
                whole.len()
            )));
        }
        for ((y, dst), &per) in ys.iter().zip(&whole).zip(&outs) {
            if y.numel() != r.len() * per {
                return shape_err(
                    op,
                    format!("chunk output {:?} for {} samples", y.shape(), r.len()),
                );
            }
            ctx.copy(y.gpu()?, 0, dst, r.start * per, r.len() * per);
        }
    }
    whole
        .into_iter()
        .zip(out_shapes)
        .map(|(b, s)| Tensor::from_gpu(b, s))
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

/// Sums `f` over batch chunks of `batched` when one of them, or an intermediate of `f` holding
/// `intermediate` values per sample, exceeds a binding: reductions over the batch such as
/// weight and bias gradients. `None` when no split is needed.
pub(crate) fn batch_sum(
    op: &'static str,
    batched: &[&Tensor],
    intermediate: &[usize],
    f: impl Fn(&[Tensor]) -> Result<Tensor>,
) -> Result<Option<Tensor>> {
    let Some((_, ranges)) = plan(op, batched, intermediate)? else {
        return Ok(None);
    };
    let mut total: Option<Tensor> = None;
    for r in &ranges {
        let part = f(&chunk_views(batched, r)?)?;
        total = Some(match total {
            None => part,
            Some(t) => binary_raw(&t, &part, Binary::Axpby(1.0, 1.0))?,
        });
    }
    Ok(total)
}

/// Runs an elementwise op over flat ranges when its operands exceed a binding: `f` gets
/// same-length 1-D views of `inputs` (all of one size) and returns the range's outputs, which
/// make whole outputs of `out_shapes` (each of that size too).
pub(crate) fn flat(
    op: &'static str,
    inputs: &[&Tensor],
    out_shapes: &[&[usize]],
    f: impl Fn(&[Tensor]) -> Result<Vec<Tensor>>,
) -> Result<Option<Vec<Tensor>>> {
    let len = inputs[0].numel();
    let Device::Gpu(ctx) = inputs[0].device() else {
        return Ok(None);
    };
    if len <= ctx.max_binding_elems() {
        return Ok(None);
    }
    if let Some(s) = out_shapes.iter().find(|s| numel(s) != len) {
        return shape_err(op, format!("output {s:?} for inputs of {len} values"));
    }
    let flat: Vec<Tensor> = inputs
        .iter()
        .map(|t| t.reshape_raw(&[t.numel()]))
        .collect::<Result<_>>()?;
    let refs: Vec<&Tensor> = flat.iter().collect();
    let flat_shapes = vec![[len]; out_shapes.len()];
    let flat_refs: Vec<&[usize]> = flat_shapes.iter().map(|s| &s[..]).collect();
    let Some(outs) = per_sample(op, &refs, &flat_refs, f)? else {
        return Ok(None);
    };
    outs.iter()
        .zip(out_shapes)
        .map(|(y, s)| y.reshape_raw(s))
        .collect::<Result<Vec<_>>>()
        .map(Some)
}
