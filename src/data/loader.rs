//! The batch loader: shuffles per epoch, decodes and transforms on background threads with a
//! bounded prefetch queue, and yields batches in order.
//!
//! Determinism: the epoch's order comes from `Rng::new(f(seed, epoch))`, and every sample's
//! augmentation from `Rng::new(f(seed, epoch, sample index))`, so a batch's content depends on
//! neither the number of workers nor thread timing. Worker `w` of `W` builds the batches
//! `w, w + W, ...` and sends them on its own bounded channel; the consumer reads the channels
//! round-robin, so batches come out in order and at most `prefetch` wait in memory.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use super::transform::{decode, Augment, ImageTransform};
use super::Sample;
use crate::engine::{Device, Rng, Tensor};

#[derive(Clone, Debug, PartialEq)]
pub struct LoaderConfig {
    pub batch_size: usize,
    pub transform: ImageTransform,
    /// Shuffle the order every epoch (training); false keeps dataset order (evaluation).
    pub shuffle: bool,
    /// Drop the last, smaller batch.
    pub drop_last: bool,
    /// Decoding threads; 0 decodes on the calling thread.
    pub workers: usize,
    /// Batches decoded ahead (at least one per worker).
    pub prefetch: usize,
    pub seed: u64,
    /// How training batches are formed (shuffled samples, or robrank's SPC-2 pairs).
    pub sampling: Sampling,
}

/// How an epoch's samples are grouped into batches.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Sampling {
    /// `batch_size` samples of the epoch's order (shuffled or not) per batch.
    #[default]
    Plain,
    /// robrank's SPC-2 batches (`super::spc2`): `batch_size / 2` anchors of the epoch's order,
    /// each followed by a positive of its class; `batch_size` must be even.
    Spc2,
}

impl LoaderConfig {
    /// Training defaults: shuffle, drop_last, train augmentation, 2 workers.
    pub fn train(batch_size: usize, image_size: usize, seed: u64) -> Self {
        LoaderConfig {
            batch_size,
            transform: ImageTransform::train(image_size),
            shuffle: true,
            drop_last: true,
            workers: 2,
            prefetch: 4,
            seed,
            sampling: Sampling::Plain,
        }
    }

    /// These training batches as robrank's SPC-2 pairs (the triplet loss's batches).
    pub fn spc2(mut self) -> Self {
        self.sampling = Sampling::Spc2;
        self
    }

    /// Small in-memory images (Fashion-MNIST, synthetic) keep their whole frame: training only
    /// flips them and evaluation only resizes them, as the field does for such datasets; the
    /// crop transforms of docs/DESIGN.md (Datasets and splits) are for photographs. Other samples keep this config.
    pub fn for_samples(mut self, samples: &[crate::data::Sample]) -> Self {
        let in_memory = !samples.is_empty()
            && samples
                .iter()
                .all(|s| matches!(s.source, crate::data::ImageSource::Memory(_)));
        if in_memory {
            self.transform.augment = match self.transform.augment {
                Augment::Train => Augment::Flip,
                _ => Augment::Resize,
            };
        }
        self
    }

    /// Evaluation defaults: dataset order, keep every sample, test transform, 2 workers.
    pub fn eval(batch_size: usize, image_size: usize) -> Self {
        LoaderConfig {
            batch_size,
            transform: ImageTransform::test(image_size),
            shuffle: false,
            drop_last: false,
            workers: 2,
            prefetch: 4,
            seed: 0,
            sampling: Sampling::Plain,
        }
    }
}

/// One batch: images `[B, 3, S, S]` (CHW per image, RGB in [0, 1]), labels, dataset indices.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    pub images: Vec<f32>,
    pub labels: Vec<usize>,
    /// Index of each image in the loader's sample list.
    pub indices: Vec<usize>,
    /// Position of this batch in its epoch.
    pub batch_index: usize,
    pub image_size: usize,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The images as a `[B, 3, S, S]` tensor on `device`.
    pub fn images_tensor(&self, device: &Device) -> crate::engine::Result<Tensor> {
        let s = self.image_size;
        Tensor::from_vec(self.images.clone(), &[self.len(), 3, s, s], device)
    }
}

fn mix(a: u64, b: u64) -> u64 {
    (a ^ b.wrapping_mul(0x9E37_79B9_7F4A_7C15)).rotate_left(29)
}

/// The generator for one sample's augmentation in one epoch.
pub fn sample_rng(seed: u64, epoch: u64, index: usize) -> Rng {
    Rng::new(mix(mix(mix(seed, 0xA5A5), epoch), index as u64))
}

/// What every worker shares.
struct Shared {
    samples: Arc<Vec<Sample>>,
    transform: ImageTransform,
    seed: u64,
    decode_failures: Arc<AtomicUsize>,
}

impl Shared {
    fn build(&self, epoch: u64, batch_index: usize, indices: &[usize]) -> Batch {
        let len = self.transform.output_len();
        let mut images = vec![0f32; indices.len() * len];
        let mut labels = Vec::with_capacity(indices.len());
        for (slot, &index) in indices.iter().enumerate() {
            let sample = &self.samples[index];
            let out = &mut images[slot * len..(slot + 1) * len];
            match decode(&sample.source) {
                Ok(img) => {
                    let mut rng = sample_rng(self.seed, epoch, index);
                    self.transform.apply(&img, &mut rng, out);
                }
                Err(e) => {
                    // Counted and reported, never silent; a mid-grey image keeps the batch shape.
                    self.decode_failures.fetch_add(1, Ordering::Relaxed);
                    eprintln!("warning: {e}; using a grey image in its place");
                    out.fill(0.5);
                }
            }
            labels.push(sample.label);
        }
        Batch {
            images,
            labels,
            indices: indices.to_vec(),
            batch_index,
            image_size: self.transform.size,
        }
    }
}

/// Produces batches of a sample list, epoch after epoch.
pub struct BatchLoader {
    shared: Arc<Shared>,
    cfg: LoaderConfig,
}

impl BatchLoader {
    pub fn new(samples: Vec<Sample>, cfg: LoaderConfig) -> crate::engine::Result<Self> {
        Self::from_shared(Arc::new(samples), cfg)
    }

    /// Like [`BatchLoader::new`] for a sample list shared with other loaders.
    pub fn from_shared(
        samples: Arc<Vec<Sample>>,
        cfg: LoaderConfig,
    ) -> crate::engine::Result<Self> {
        if cfg.sampling == Sampling::Spc2 && !cfg.batch_size.is_multiple_of(2) {
            return crate::engine::error::invalid(
                "BatchLoader",
                format!(
                    "an SPC-2 batch holds pairs of images; batch_size {} is odd",
                    cfg.batch_size
                ),
            );
        }
        if cfg.batch_size == 0 || cfg.transform.size == 0 {
            return crate::engine::error::invalid(
                "BatchLoader",
                format!(
                    "batch_size ({}) and image size ({}) must be positive",
                    cfg.batch_size, cfg.transform.size
                ),
            );
        }
        Ok(BatchLoader {
            shared: Arc::new(Shared {
                samples,
                transform: cfg.transform,
                seed: cfg.seed,
                decode_failures: Arc::new(AtomicUsize::new(0)),
            }),
            cfg,
        })
    }

    pub fn config(&self) -> &LoaderConfig {
        &self.cfg
    }

    pub fn num_samples(&self) -> usize {
        self.shared.samples.len()
    }

    pub fn batches_per_epoch(&self) -> usize {
        let (n, b) = (self.num_samples(), self.cfg.batch_size);
        if self.cfg.sampling == Sampling::Spc2 {
            // Every sample is an anchor once; the positives come on top.
            return n / (b / 2).max(1);
        }
        if self.cfg.drop_last {
            n / b
        } else {
            n.div_ceil(b)
        }
    }

    /// Images that failed to decode so far (each also warned about on stderr).
    pub fn decode_failures(&self) -> usize {
        self.shared.decode_failures.load(Ordering::Relaxed)
    }

    /// The sample order of `epoch` (a permutation when shuffling, else `0..n`).
    pub fn order(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.num_samples()).collect();
        if self.cfg.shuffle {
            Rng::new(mix(mix(self.cfg.seed, 0x5EED), epoch)).shuffle(&mut order);
        }
        order
    }

    /// The sample indices of every batch of `epoch`.
    pub fn batch_indices(&self, epoch: u64) -> Vec<Vec<usize>> {
        let order = self.order(epoch);
        if self.cfg.sampling == Sampling::Spc2 {
            let labels: Vec<usize> = self.shared.samples.iter().map(|s| s.label).collect();
            let pairs = self.cfg.batch_size / 2;
            return super::spc2::batches(&labels, &order, pairs, self.cfg.seed, epoch);
        }
        order
            .chunks(self.cfg.batch_size)
            .take(self.batches_per_epoch())
            .map(<[usize]>::to_vec)
            .collect()
    }

    /// Iterates over the batches of `epoch`.
    pub fn epoch(&self, epoch: u64) -> EpochIter {
        self.epoch_from(epoch, 0)
    }

    /// Iterates over the batches of `epoch` starting at batch `start_batch` (for resuming); the
    /// batches are the same as those of a full epoch from that position on.
    pub fn epoch_from(&self, epoch: u64, start_batch: usize) -> EpochIter {
        let batches: Arc<Vec<Vec<usize>>> = Arc::new(
            self.batch_indices(epoch)
                .into_iter()
                .skip(start_batch)
                .collect(),
        );
        let workers = self.cfg.workers.min(batches.len());
        let mut receivers = Vec::with_capacity(workers);
        let mut handles = Vec::with_capacity(workers);
        if let Some(per_worker) = self.cfg.prefetch.checked_div(workers) {
            let depth = per_worker.max(1);
            for w in 0..workers {
                let (tx, rx) = sync_channel::<Batch>(depth);
                let shared = Arc::clone(&self.shared);
                let batches = Arc::clone(&batches);
                let handle = std::thread::Builder::new()
                    .name(format!("data-loader-{w}"))
                    .spawn(move || {
                        for rel in (w..batches.len()).step_by(workers) {
                            let batch = shared.build(epoch, start_batch + rel, &batches[rel]);
                            if tx.send(batch).is_err() {
                                return; // the consumer stopped early
                            }
                        }
                    });
                match handle {
                    Ok(h) => {
                        handles.push(h);
                        receivers.push(rx);
                    }
                    Err(e) => {
                        // Cannot spawn threads: fall back to decoding on the caller's thread.
                        eprintln!(
                            "warning: cannot start a data-loader thread ({e}); decoding inline"
                        );
                        receivers.clear();
                        break;
                    }
                }
            }
        }
        EpochIter {
            shared: Arc::clone(&self.shared),
            batches,
            epoch,
            start_batch,
            next: 0,
            receivers,
            handles,
        }
    }
}

/// The batches of one epoch, in order.
pub struct EpochIter {
    shared: Arc<Shared>,
    batches: Arc<Vec<Vec<usize>>>,
    epoch: u64,
    start_batch: usize,
    next: usize,
    receivers: Vec<Receiver<Batch>>,
    handles: Vec<JoinHandle<()>>,
}

impl EpochIter {
    /// Batches left in this epoch.
    pub fn remaining(&self) -> usize {
        self.batches.len() - self.next
    }
}

impl Iterator for EpochIter {
    type Item = Batch;

    fn next(&mut self) -> Option<Batch> {
        if self.next >= self.batches.len() {
            return None;
        }
        let rel = self.next;
        self.next += 1;
        if self.receivers.is_empty() {
            return Some(
                self.shared
                    .build(self.epoch, self.start_batch + rel, &self.batches[rel]),
            );
        }
        let w = rel % self.receivers.len();
        match self.receivers[w].recv() {
            Ok(batch) => Some(batch),
            Err(_) => {
                // The worker ended without sending: it panicked. Re-raise its panic here.
                let handle = self.handles.remove(w);
                match handle.join() {
                    Err(payload) => std::panic::resume_unwind(payload),
                    Ok(()) => panic!("data-loader worker {w} stopped early"),
                }
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining(), Some(self.remaining()))
    }
}

impl ExactSizeIterator for EpochIter {}

impl Drop for EpochIter {
    fn drop(&mut self) {
        // Closing the channels makes blocked workers' sends fail, so they exit; then wait for them.
        self.receivers.clear();
        for handle in self.handles.drain(..) {
            let _ = handle.join();
        }
    }
}
