//! One launch path for every op. It does the part every op shares: the same-device check, the
//! choice between the CPU code and the GPU kernels, the split of GPU work over the binding limit
//! ([`super::split`]) and the allocation of the outputs. An op states only what differs: its
//! inputs and split rule, its output shapes, its CPU code and its dispatches.
//!
//! ```ignore
//! pub fn unary_raw(x: &Tensor, op: Unary) -> Result<Tensor> {
//!     let [y] = Launch::flat("elementwise", &[x]).run(
//!         [x.shape()],
//!         || Ok([op.map_cpu(&x.cpu()?)]),
//!         |call| {
//!             let (n, xb) = (call.out[0].len(), call.input(0)?);
//!             let bufs = [xb, xb, &call.out[0]];
//!             let params = elementwise_params(n, op.code())?;
//!             call.ctx.dispatch(&UNARY, &params, &bufs, groups_for(n, 256)?)
//!         },
//!     )?;
//!     Ok(y)
//! }
//! ```
//!
//! The CPU closure returns the values of every output. The GPU closure gets fresh output
//! buffers and records the kernels that fill them; when a tensor is over one binding it runs
//! once per chunk, on views of that chunk, so it reads every size from `call.inputs` and
//! `call.out`, never from the whole tensors. The context's [`super::KernelPolicy`]
//! (`call.ctx.policy()`) picks the variant. Ops whose GPU code makes its own outputs (convolution routes, multi-pass sums) use
//! [`Launch::run_tensors`]; results that are not tensors (top-k lists, in-place updates, batch
//! norm's own chunking) use [`by_device`], the device dispatch alone.

use std::sync::Arc;

use super::device::Device;
use super::error::{invalid, shape_err, EngineError, Result};
use super::gpu::{GpuBuffer, GpuContext};
use super::split;
use super::tensor::{numel, same_device, Tensor};

/// How an op's GPU work is cut when one of its tensors exceeds a binding.
enum Split<'a> {
    /// Never: every tensor is bound whole (the dispatch refuses one over the limit, by name).
    Never,
    /// Elementwise: inputs and outputs, all of one size, in the same flat ranges.
    Flat,
    /// Per sample: the cut inputs and the outputs (all [N, ...]) in the same batch chunks.
    PerSample,
    /// A sum over the batch: the cut inputs in batch chunks, the one output summed over them;
    /// the op's intermediates hold the values per sample that the function gives for the
    /// context (they may depend on its kernel policy).
    BatchSum(PerSampleValues<'a>),
}

/// Values per sample that an op's intermediates hold on a context (its policy picks the route).
type PerSampleValues<'a> = Box<dyn Fn(&GpuContext) -> Vec<usize> + 'a>;

/// One op's inputs and how its GPU work may be split; run with [`Launch::run`].
pub(crate) struct Launch<'a> {
    op: &'static str,
    /// The inputs the split cuts, then those every chunk sees whole.
    inputs: Vec<&'a Tensor>,
    /// How many leading `inputs` the split cuts.
    cut: usize,
    split: Split<'a>,
    zeroed: bool,
}

/// What an op's GPU closure gets: the context, the inputs (a chunk's views of the cut ones) and
/// fresh outputs of the chunk's shapes.
pub(crate) struct GpuCall<'a, const N: usize> {
    pub ctx: &'a Arc<GpuContext>,
    pub inputs: &'a [Tensor],
    pub out: &'a [GpuBuffer; N],
}

impl<const N: usize> GpuCall<'_, N> {
    /// The buffer of input `i`.
    pub fn input(&self, i: usize) -> Result<&GpuBuffer> {
        self.inputs[i].gpu()
    }

    /// The batch of this call: the first dimension of the first input.
    pub fn batch(&self) -> usize {
        self.inputs[0].shape().first().copied().unwrap_or(0)
    }
}

impl<'a> Launch<'a> {
    fn with_rule(op: &'static str, cut: &[&'a Tensor], split: Split<'a>) -> Self {
        Launch {
            op,
            inputs: cut.to_vec(),
            cut: cut.len(),
            split,
            zeroed: false,
        }
    }

    /// An op whose tensors are always bound whole.
    pub fn new(op: &'static str, inputs: &[&'a Tensor]) -> Self {
        Self::with_rule(op, inputs, Split::Never)
    }

    /// An elementwise op: `inputs` and the outputs all have one size and are cut into the same
    /// flat ranges.
    pub fn flat(op: &'static str, inputs: &[&'a Tensor]) -> Self {
        Self::with_rule(op, inputs, Split::Flat)
    }

    /// A per-sample op: `batched` and the outputs (all [N, ...]) are cut into batch chunks.
    pub fn per_sample(op: &'static str, batched: &[&'a Tensor]) -> Self {
        Self::with_rule(op, batched, Split::PerSample)
    }

    /// A reduction over the batch of `batched` (all [N, ...]) into one output, summed over batch
    /// chunks; the op's intermediates hold `intermediate(ctx)` values per sample.
    pub fn batch_sum(
        op: &'static str,
        batched: &[&'a Tensor],
        intermediate: impl Fn(&GpuContext) -> Vec<usize> + 'a,
    ) -> Self {
        Self::with_rule(op, batched, Split::BatchSum(Box::new(intermediate)))
    }

    /// Adds inputs that every chunk sees whole (weights, biases).
    pub fn with_whole(mut self, whole: &[&'a Tensor]) -> Self {
        self.inputs.extend_from_slice(whole);
        self
    }

    /// The GPU outputs start zeroed (for kernels that write only part of them).
    pub fn zeroed(mut self) -> Self {
        self.zeroed = true;
        self
    }

    /// Runs the op with outputs of `out_shapes`: `cpu` returns their values; `gpu` records the
    /// kernels that fill the fresh buffers of [`GpuCall::out`].
    pub fn run<const N: usize>(
        self,
        out_shapes: [&[usize]; N],
        cpu: impl FnOnce() -> Result<[Vec<f32>; N]>,
        gpu: impl Fn(&GpuCall<N>) -> Result<()>,
    ) -> Result<[Tensor; N]> {
        let zeroed = self.zeroed;
        self.execute(out_shapes, cpu, |ctx, inputs, shapes| {
            let alloc = |s: &Vec<usize>| {
                if zeroed {
                    ctx.zeros(numel(s))
                } else {
                    ctx.alloc(numel(s))
                }
            };
            let out: Vec<GpuBuffer> = shapes.iter().map(alloc).collect::<Result<_>>()?;
            let out: [GpuBuffer; N] = array(self.op, out)?;
            gpu(&GpuCall {
                ctx,
                inputs,
                out: &out,
            })?;
            let tensors = out
                .into_iter()
                .zip(shapes)
                .map(|(b, s)| Tensor::from_gpu(b, s));
            array(self.op, tensors.collect::<Result<Vec<_>>>()?)
        })
    }

    /// [`Launch::run`] for GPU code that makes its outputs itself (several passes or routes):
    /// `gpu` gets the context and the inputs and returns outputs of the declared shapes.
    pub fn run_tensors<const N: usize>(
        self,
        out_shapes: [&[usize]; N],
        cpu: impl FnOnce() -> Result<[Vec<f32>; N]>,
        gpu: impl Fn(&Arc<GpuContext>, &[Tensor]) -> Result<[Tensor; N]>,
    ) -> Result<[Tensor; N]> {
        self.execute(out_shapes, cpu, |ctx, inputs, _| gpu(ctx, inputs))
    }

    /// The device dispatch and the split; `gpu` runs on the whole inputs or on each chunk, with
    /// the output shapes of that call, and its outputs are checked against them.
    fn execute<const N: usize>(
        &self,
        out_shapes: [&[usize]; N],
        cpu: impl FnOnce() -> Result<[Vec<f32>; N]>,
        gpu: impl Fn(&Arc<GpuContext>, &[Tensor], &[Vec<usize>; N]) -> Result<[Tensor; N]>,
    ) -> Result<[Tensor; N]> {
        if self.inputs.is_empty() {
            return invalid(self.op, "no input tensors");
        }
        let Device::Gpu(ctx) = same_device(self.op, &self.inputs)? else {
            let tensors = cpu()?
                .into_iter()
                .zip(out_shapes)
                .map(|(v, s)| Tensor::from_cpu(v, s));
            return array(self.op, tensors.collect::<Result<Vec<_>>>()?);
        };
        let checked = |inputs: &[Tensor], shapes: [Vec<usize>; N]| {
            let outs = gpu(&ctx, inputs, &shapes)?;
            for (t, s) in outs.iter().zip(&shapes) {
                if t.shape() != s.as_slice() {
                    return shape_err(
                        self.op,
                        format!("GPU output {:?}, expected {s:?}", t.shape()),
                    );
                }
            }
            Ok(outs)
        };
        if let Some(outs) = self.split(&ctx, &out_shapes, &checked)? {
            return Ok(outs);
        }
        let inputs: Vec<Tensor> = self.inputs.iter().map(|t| (*t).clone()).collect();
        checked(&inputs, out_shapes.map(<[usize]>::to_vec))
    }

    /// The outputs computed chunk by chunk, when the split rule cuts and a tensor is over one
    /// binding; `None` otherwise.
    fn split<const N: usize>(
        &self,
        ctx: &Arc<GpuContext>,
        out_shapes: &[&[usize]; N],
        gpu: &impl Fn(&[Tensor], [Vec<usize>; N]) -> Result<[Tensor; N]>,
    ) -> Result<Option<[Tensor; N]>> {
        let (cut, whole) = self.inputs.split_at(self.cut);
        // A chunk's inputs: its views of the cut ones, then the whole ones.
        let chunk_inputs = |chunk: &[Tensor]| {
            let mut all = chunk.to_vec();
            all.extend(whole.iter().map(|t| (*t).clone()));
            all
        };
        let outs = match &self.split {
            Split::Never => None,
            Split::Flat => split::flat(self.op, cut, out_shapes, |chunk| {
                let shapes = [0; N].map(|_| vec![chunk[0].numel()]);
                Ok(Vec::from(gpu(&chunk_inputs(chunk), shapes)?))
            })?,
            Split::PerSample => split::per_sample(self.op, cut, out_shapes, |chunk| {
                let n = chunk[0].shape()[0];
                let shapes = out_shapes.map(|s| with_batch(s, n));
                Ok(Vec::from(gpu(&chunk_inputs(chunk), shapes)?))
            })?,
            Split::BatchSum(intermediate) => {
                split::batch_sum(self.op, cut, &intermediate(ctx), |chunk| {
                    let outs = gpu(&chunk_inputs(chunk), out_shapes.map(<[usize]>::to_vec))?;
                    let [sum] = array(self.op, Vec::from(outs))?;
                    Ok(sum)
                })?
                .map(|sum| vec![sum])
            }
        };
        outs.map(|v| array(self.op, v)).transpose()
    }
}

/// `shape` with its first (batch) dimension set to `n`.
fn with_batch(shape: &[usize], n: usize) -> Vec<usize> {
    let mut s = shape.to_vec();
    s[0] = n;
    s
}

/// `v` as an array of `N` items, or an error naming the op.
fn array<T, const N: usize>(op: &'static str, v: Vec<T>) -> Result<[T; N]> {
    v.try_into()
        .map_err(|v: Vec<T>| EngineError::Gpu(format!("{op}: {} outputs, expected {N}", v.len())))
}

/// Runs `cpu` or `gpu` by the device all `inputs` share (an error names the op when they do
/// not): for ops whose results are not tensors of fixed shapes, or which split themselves.
pub(crate) fn by_device<T>(
    op: &'static str,
    inputs: &[&Tensor],
    cpu: impl FnOnce() -> Result<T>,
    gpu: impl FnOnce(&Arc<GpuContext>) -> Result<T>,
) -> Result<T> {
    if inputs.is_empty() {
        return invalid(op, "no input tensors");
    }
    match same_device(op, inputs)? {
        Device::Cpu => cpu(),
        Device::Gpu(ctx) => gpu(&ctx),
    }
}
