"""Writes the class-balanced Fashion-MNIST subset that ships inside the binary (include_bytes! in
src/data/fashion_mnist.rs): the zero-shot split of the Fashion-MNIST protocol (docs/DESIGN.md,
"The Fashion-MNIST protocol"), i.e. TRAIN_PER_CLASS images of each of classes 0-4 from the
official training set and TEST_PER_CLASS images of each of classes 5-9 from the official test
set, picked at random with SEED and kept in their original order. Run once by a developer
(python3 generate.py [FASHION_MNIST_DIR]); never at run time. The output is deterministic:
gzip's timestamp and file name are not written.
"""
import gzip
import sys

import numpy as np

SRC = sys.argv[1] if len(sys.argv) > 1 else "/usr/share/datasets/fashion-mnist"
SEED = 0
TRAIN_CLASSES, TRAIN_PER_CLASS = range(0, 5), 1000
TEST_CLASSES, TEST_PER_CLASS = range(5, 10), 400


def read_idx(name):
    with gzip.open(f"{SRC}/{name}", "rb") as f:
        raw = f.read()
    dims = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * dims).reshape(shape)


def write_idx(name, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with open(name, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw,
                                                 compresslevel=9, mtime=0) as f:
        f.write(header + array.tobytes())


def pick(prefix, classes, per_class, rng):
    images = read_idx(f"{prefix}-images-idx3-ubyte.gz")
    labels = read_idx(f"{prefix}-labels-idx1-ubyte.gz")
    keep = np.sort(np.concatenate(
        [rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in classes]))
    write_idx(f"{prefix}-images-idx3-ubyte.gz", images[keep])
    write_idx(f"{prefix}-labels-idx1-ubyte.gz", labels[keep])
    print(prefix, len(keep), "images, per class:", np.bincount(labels[keep], minlength=10).tolist())


rng = np.random.default_rng(SEED)
pick("train", TRAIN_CLASSES, TRAIN_PER_CLASS, rng)
pick("t10k", TEST_CLASSES, TEST_PER_CLASS, rng)
