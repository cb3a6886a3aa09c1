//! Fashion-MNIST from IDX files (gzipped or not), held in memory as 28x28 gray images.

use std::io::Read;
use std::path::{Path, PathBuf};

use super::{DataError, DataResult, Dataset, FashionSplit, ImageSource, MemImage, Sample};

/// Where Debian's `dataset-fashion-mnist` package installs the files.
pub const DEFAULT_DIR: &str = "/usr/share/datasets/fashion-mnist/";

pub const CLASS_NAMES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

/// An IDX array of unsigned bytes: its dimensions and data.
#[derive(Clone, Debug, PartialEq)]
pub struct IdxArray {
    pub dims: Vec<usize>,
    pub data: Vec<u8>,
}

/// Parses IDX bytes (magic `00 00 08 ndims`, big-endian u32 dimensions, then the bytes).
pub fn parse_idx(bytes: &[u8]) -> Result<IdxArray, String> {
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 {
        return Err("not an IDX file (bad magic number)".into());
    }
    if bytes[2] != 0x08 {
        return Err(format!(
            "IDX element type 0x{:02x}; only unsigned bytes (0x08) are supported",
            bytes[2]
        ));
    }
    let ndims = bytes[3] as usize;
    let header = 4 + 4 * ndims;
    if bytes.len() < header {
        return Err("truncated IDX header".into());
    }
    let dims: Vec<usize> = (0..ndims)
        .map(|i| {
            let o = 4 + 4 * i;
            u32::from_be_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]) as usize
        })
        .collect();
    // Sizes come from the file: checked, so a hostile header is an error, not an overflow.
    let count = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| {
            format!("IDX dimensions {dims:?} are too large (their product overflows)")
        })?;
    if bytes.len() - header != count {
        return Err(format!(
            "IDX dimensions {dims:?} need {count} data bytes, file has {}",
            bytes.len() - header
        ));
    }
    Ok(IdxArray {
        dims,
        data: bytes[header..].to_vec(),
    })
}

/// The largest unpacked IDX file read (Fashion-MNIST's biggest is 47 MB).
const MAX_IDX_BYTES: u64 = 4 << 30;

/// Reads an IDX file; a `.gz` name is gunzipped.
pub fn read_idx(path: &Path) -> DataResult<IdxArray> {
    let raw = crate::files::read_regular(path).map_err(|e| DataError::io(path, e))?;
    let gzipped = path.extension().is_some_and(|e| e == "gz");
    idx_from_bytes(&raw, gzipped, path)
}

/// Parses IDX bytes, gunzipping them first when `gzipped`; `origin` names them in errors.
fn idx_from_bytes(raw: &[u8], gzipped: bool, origin: &Path) -> DataResult<IdxArray> {
    let bytes = if gzipped {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(raw)
            .take(MAX_IDX_BYTES + 1)
            .read_to_end(&mut out)
            .map_err(|e| DataError::bad_file(origin, format!("cannot gunzip: {e}")))?;
        if out.len() as u64 > MAX_IDX_BYTES {
            return Err(DataError::bad_file(
                origin,
                format!(
                    "unpacks to more than {} MiB, the limit for an IDX file",
                    MAX_IDX_BYTES >> 20
                ),
            ));
        }
        out
    } else {
        raw.to_vec()
    };
    parse_idx(&bytes).map_err(|d| DataError::bad_file(origin, d))
}

/// Finds `<stem>` or `<stem>.gz` (also the `train-images.idx3-ubyte` spelling) in `dir`.
fn find_idx(dir: &Path, stem: &str) -> DataResult<PathBuf> {
    let dotted = stem.replace("-idx", ".idx");
    for name in [
        stem.to_string(),
        format!("{stem}.gz"),
        dotted.clone(),
        format!("{dotted}.gz"),
    ] {
        let p = dir.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(DataError::MissingFile {
        what: "Fashion-MNIST".into(),
        path: dir.join(format!("{stem}[.gz]")),
        hint: format!(
            "install Debian's package dataset-fashion-mnist (files in {DEFAULT_DIR}) or pass \
             --data-dir with the four IDX files"
        ),
    })
}

/// Reads one official set (images + labels) as in-memory samples with the original labels.
fn read_set(dir: &Path, prefix: &str) -> DataResult<Vec<(MemImage, usize)>> {
    let images_path = find_idx(dir, &format!("{prefix}-images-idx3-ubyte"))?;
    let labels_path = find_idx(dir, &format!("{prefix}-labels-idx1-ubyte"))?;
    let images = read_idx(&images_path)?;
    let labels = read_idx(&labels_path)?;
    pair_set(&images, &labels, &images_path, &labels_path)
}

/// Pairs an IDX image array [N, H, W] with its label array [N].
fn pair_set(
    images: &IdxArray,
    labels: &IdxArray,
    images_path: &Path,
    labels_path: &Path,
) -> DataResult<Vec<(MemImage, usize)>> {
    if images.dims.len() != 3 || labels.dims.len() != 1 || images.dims[0] != labels.dims[0] {
        return Err(DataError::bad_file(
            images_path,
            format!(
                "images {:?} and labels {:?} do not match (want [N,28,28] and [N])",
                images.dims, labels.dims
            ),
        ));
    }
    let (h, w) = (images.dims[1], images.dims[2]);
    if h == 0 || w == 0 {
        return Err(DataError::bad_file(
            images_path,
            format!("images are {h}x{w}; Fashion-MNIST images are 28x28"),
        ));
    }
    let mut out = Vec::with_capacity(labels.data.len());
    for (i, &label) in labels.data.iter().enumerate() {
        if label as usize >= CLASS_NAMES.len() {
            return Err(DataError::bad_file(
                labels_path,
                format!("label {label} at index {i} is not a Fashion-MNIST class (0-9)"),
            ));
        }
        let pixels = images.data[i * h * w..(i + 1) * h * w].to_vec();
        out.push((MemImage::new(w, h, 1, pixels)?, label as usize));
    }
    Ok(out)
}

fn to_samples(set: Vec<(MemImage, usize)>, classes: std::ops::Range<usize>) -> Vec<Sample> {
    set.into_iter()
        .filter(|(_, l)| classes.contains(l))
        .map(|(img, l)| Sample {
            source: ImageSource::Memory(img),
            label: l - classes.start,
        })
        .collect()
}

/// Fashion-MNIST. [`FashionSplit::Standard`]: official train / test sets, 10 classes each.
/// [`FashionSplit::ZeroShot`]: classes 0-4 of the official train set for training and classes 5-9
/// of the official test set for evaluation (labels 0-4 in each split); the train set's images of
/// classes 5-9 and the test set's of classes 0-4 are not used, so evaluation images are never
/// seen in training and the evaluation set keeps its usual 1,000 images per class.
pub fn load_fashion_mnist(dir: &Path, split: FashionSplit) -> DataResult<Dataset> {
    let train_set = read_set(dir, "train")?;
    let test_set = read_set(dir, "t10k")?;
    Ok(fashion_dataset(train_set, test_set, split))
}

/// The subset compiled into the binary (`data/fashion-mnist-subset/README.md`): classes 0-4 of
/// the official training set (1,000 images each) and classes 5-9 of the official test set (400
/// each), gzipped IDX, MIT licence (Zalando SE). Only the zero-shot split can be made from it.
const EMBEDDED: [(&str, &[u8]); 4] = [
    (
        "train-images-idx3-ubyte.gz",
        include_bytes!("../../data/fashion-mnist-subset/train-images-idx3-ubyte.gz"),
    ),
    (
        "train-labels-idx1-ubyte.gz",
        include_bytes!("../../data/fashion-mnist-subset/train-labels-idx1-ubyte.gz"),
    ),
    (
        "t10k-images-idx3-ubyte.gz",
        include_bytes!("../../data/fashion-mnist-subset/t10k-images-idx3-ubyte.gz"),
    ),
    (
        "t10k-labels-idx1-ubyte.gz",
        include_bytes!("../../data/fashion-mnist-subset/t10k-labels-idx1-ubyte.gz"),
    ),
];

/// Name of the embedded subset on the command line and in run directories.
pub const EMBEDDED_NAME: &str = "fashion-mnist-embedded";

/// The embedded subset as the zero-shot split: 5,000 training images (classes 0-4), 2,000 test
/// images (classes 5-9).
pub fn load_embedded() -> DataResult<Dataset> {
    let origin = |name: &str| PathBuf::from(format!("<embedded {EMBEDDED_NAME}>/{name}"));
    let arrays = EMBEDDED
        .iter()
        .map(|(name, bytes)| idx_from_bytes(bytes, true, &origin(name)))
        .collect::<DataResult<Vec<_>>>()?;
    let set = |i: usize| {
        pair_set(
            &arrays[i],
            &arrays[i + 1],
            &origin(EMBEDDED[i].0),
            &origin(EMBEDDED[i + 1].0),
        )
    };
    let mut dataset = fashion_dataset(set(0)?, set(2)?, FashionSplit::ZeroShot);
    dataset.name = EMBEDDED_NAME.into();
    Ok(dataset)
}

fn fashion_dataset(
    train_set: Vec<(MemImage, usize)>,
    test_set: Vec<(MemImage, usize)>,
    split: FashionSplit,
) -> Dataset {
    let names = |r: std::ops::Range<usize>| -> Vec<String> {
        CLASS_NAMES[r].iter().map(|s| s.to_string()).collect()
    };
    let (train_classes, test_classes) = match split {
        FashionSplit::Standard => (0..10, 0..10),
        FashionSplit::ZeroShot => (0..5, 5..10),
    };
    Dataset {
        name: match split {
            FashionSplit::Standard => "fashion-mnist".into(),
            FashionSplit::ZeroShot => "fashion-mnist-zero-shot".into(),
        },
        train: to_samples(train_set, train_classes.clone()),
        test: to_samples(test_set, test_classes.clone()),
        query_count: None,
        train_classes: names(train_classes),
        test_classes: names(test_classes),
        skipped: Default::default(),
    }
}
