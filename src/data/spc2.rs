//! SPC-2 batches (docs/DESIGN.md, "Triplet loss and SPC-2 batches"), as robrank builds them
//! (`MNISTPairDataset` in `robrank/datasets/mnist.py`, shuffled by a `DataLoader`): every
//! training image is an anchor once per epoch, in shuffled order; each anchor brings one
//! positive drawn uniformly from all the images of its class (the anchor itself included, as
//! robrank's `random.choice(cls2idx[label])`). A batch of B images holds B / 2 such pairs, laid
//! out [a_0, p_0, a_1, p_1, ...]; classes may repeat between pairs. Every draw is a function of
//! (seed, epoch, anchor), so a batch does not depend on threads or on where a run resumed.

use std::collections::BTreeMap;

use crate::engine::Rng;

fn mix(a: u64, b: u64) -> u64 {
    (a ^ b.wrapping_mul(0x9E37_79B9_7F4A_7C15)).rotate_left(29)
}

/// The images of each class, by label.
pub fn class_index(labels: &[usize]) -> BTreeMap<usize, Vec<usize>> {
    let mut by_class: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (i, &l) in labels.iter().enumerate() {
        by_class.entry(l).or_default().push(i);
    }
    by_class
}

/// The positive of `anchor` in `epoch`: uniform over its class's images.
pub fn positive(
    by_class: &BTreeMap<usize, Vec<usize>>,
    labels: &[usize],
    anchor: usize,
    seed: u64,
    epoch: u64,
) -> usize {
    let class = &by_class[&labels[anchor]];
    let mut rng = Rng::new(mix(mix(mix(seed, 0x5BC2), epoch), anchor as u64));
    class[rng.below(class.len())]
}

/// The sample indices of every SPC-2 batch of `epoch`: `anchor_order` (the epoch's shuffled
/// order) cut into groups of `pairs` anchors (the last, smaller group dropped), each anchor
/// followed by its positive.
pub fn batches(
    labels: &[usize],
    anchor_order: &[usize],
    pairs: usize,
    seed: u64,
    epoch: u64,
) -> Vec<Vec<usize>> {
    if pairs == 0 {
        return Vec::new();
    }
    let by_class = class_index(labels);
    anchor_order
        .chunks_exact(pairs)
        .map(|group| {
            group
                .iter()
                .flat_map(|&a| [a, positive(&by_class, labels, a, seed, epoch)])
                .collect()
        })
        .collect()
}
