//! Datasets, splits and the image pipeline.
//!
//! Every loader returns a [`Dataset`]: a list of samples for training and for evaluation, with the
//! standard class-disjoint (zero-shot) split of docs/DESIGN.md (Datasets and splits). Labels are remapped inside each
//! split to `0..n_classes` in the order of the original class ids, so that the training labels can
//! index proxies directly; the original names are kept in `train_classes` / `test_classes`.
//!
//! Images are not decoded at load time (except for the in-memory datasets); file-based loaders check
//! each file's header so that unreadable files are skipped with a warning and counted
//! ([`SkipSummary`]) instead of failing in the middle of an epoch.

pub mod error;
pub mod fashion_mnist;
pub mod folders;
pub mod lists;
pub mod loader;
pub mod mat;
pub mod spc2;
pub mod synthetic;
pub mod transform;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use error::{DataError, DataResult};
pub use loader::{Batch, BatchLoader, EpochIter, LoaderConfig, Sampling};
pub use synthetic::SyntheticConfig;
pub use transform::{Augment, ImageTransform};

/// An image held in memory as 8-bit pixels, row-major, interleaved channels (1 = gray, 3 = RGB).
#[derive(Clone, Debug, PartialEq)]
pub struct MemImage {
    pub width: usize,
    pub height: usize,
    pub channels: usize,
    pub pixels: Arc<Vec<u8>>,
}

impl MemImage {
    pub fn new(width: usize, height: usize, channels: usize, pixels: Vec<u8>) -> DataResult<Self> {
        if channels != 1 && channels != 3 {
            return Err(DataError::Invalid(format!(
                "in-memory image with {channels} channels; only 1 (gray) or 3 (RGB) are supported"
            )));
        }
        if pixels.len() != width * height * channels {
            return Err(DataError::Invalid(format!(
                "in-memory image of {width}x{height}x{channels} needs {} bytes, got {}",
                width * height * channels,
                pixels.len()
            )));
        }
        Ok(MemImage {
            width,
            height,
            channels,
            pixels: Arc::new(pixels),
        })
    }
}

/// Where a sample's pixels come from.
#[derive(Clone, Debug, PartialEq)]
pub enum ImageSource {
    /// A JPEG or PNG file, decoded by the loader's worker threads.
    File(PathBuf),
    /// Already decoded pixels (Fashion-MNIST, synthetic).
    Memory(MemImage),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub source: ImageSource,
    /// Class index inside its split, in `0..n_classes` of that split.
    pub label: usize,
}

/// Images that a loader skipped, with the reason for each (never dropped silently).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SkipSummary {
    pub skipped: Vec<(PathBuf, String)>,
}

impl SkipSummary {
    pub fn count(&self) -> usize {
        self.skipped.len()
    }

    /// Records a skipped file and warns on stderr (the first few individually, to keep logs short).
    pub fn skip(&mut self, path: &Path, reason: impl Into<String>) {
        let reason = reason.into();
        const SHOWN: usize = 20;
        if self.skipped.len() < SHOWN {
            eprintln!("warning: skipping image {}: {reason}", path.display());
        } else if self.skipped.len() == SHOWN {
            eprintln!("warning: more images skipped; the summary gives the total");
        }
        self.skipped.push((path.to_path_buf(), reason));
    }
}

/// A dataset with its class-disjoint split.
#[derive(Clone, Debug)]
pub struct Dataset {
    /// Short name, e.g. "cub200".
    pub name: String,
    pub train: Vec<Sample>,
    /// The evaluation set. For In-Shop it is the query set followed by the gallery set (clustering
    /// metrics use both together); see [`Dataset::query`] and [`Dataset::gallery`].
    pub test: Vec<Sample>,
    /// For query/gallery datasets (In-Shop): how many of `test`'s first samples are queries.
    pub query_count: Option<usize>,
    /// Class names of the training split; `train_classes[label]`.
    pub train_classes: Vec<String>,
    /// Class names of the evaluation split; `test_classes[label]`.
    pub test_classes: Vec<String>,
    pub skipped: SkipSummary,
}

impl Dataset {
    pub fn num_train_classes(&self) -> usize {
        self.train_classes.len()
    }

    pub fn num_test_classes(&self) -> usize {
        self.test_classes.len()
    }

    /// The query part of the evaluation set (In-Shop), `None` for the single-set datasets.
    pub fn query(&self) -> Option<&[Sample]> {
        self.query_count.map(|n| &self.test[..n])
    }

    /// The gallery part of the evaluation set (In-Shop), `None` for the single-set datasets.
    pub fn gallery(&self) -> Option<&[Sample]> {
        self.query_count.map(|n| &self.test[n..])
    }

    /// The first in-memory image whose channels differ (a colour image), as "train image 3".
    /// Image files are not decoded here; attacks with tied channels check their batches.
    pub fn first_colour_image(&self) -> Option<String> {
        for (split, samples) in [("train", &self.train), ("test", &self.test)] {
            for (i, s) in samples.iter().enumerate() {
                let ImageSource::Memory(m) = &s.source else {
                    continue;
                };
                let colour = |p: &[u8]| p[0] != p[1] || p[0] != p[2];
                if m.channels == 3 && m.pixels.chunks_exact(3).any(colour) {
                    return Some(format!("{split} image {i}"));
                }
            }
        }
        None
    }

    /// One line for the log: sizes and skipped files.
    pub fn summary(&self) -> String {
        let eval = match self.query_count {
            Some(q) => format!("query {} + gallery {}", q, self.test.len() - q),
            None => format!("test {}", self.test.len()),
        };
        let mut s = format!(
            "{}: train {} images / {} classes, {} images / {} classes",
            self.name,
            self.train.len(),
            self.num_train_classes(),
            eval,
            self.num_test_classes()
        );
        if self.skipped.count() > 0 {
            s.push_str(&format!(
                "; skipped {} unreadable image(s), listed in the warnings above",
                self.skipped.count()
            ));
        }
        s
    }

    /// What makes the results of this dataset hard to read (empty classes, too few classes or
    /// images), for warnings: such data is accepted but never silently.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (split, samples, names) in [
            ("training", &self.train, &self.train_classes),
            ("test", &self.test, &self.test_classes),
        ] {
            let mut counts = vec![0usize; names.len()];
            for s in samples.iter() {
                if let Some(c) = counts.get_mut(s.label) {
                    *c += 1;
                }
            }
            let empty: Vec<&str> = names
                .iter()
                .zip(&counts)
                .filter(|(_, &c)| c == 0)
                .map(|(n, _)| n.as_str())
                .collect();
            if !empty.is_empty() {
                out.push(format!(
                    "{} {split} class(es) have no images and are ignored: {}",
                    empty.len(),
                    empty.join(", ")
                ));
            }
            let single = counts.iter().filter(|&&c| c == 1).count();
            if single > 0 {
                out.push(format!(
                    "{single} {split} class(es) have a single image; Recall@k has no match for them"
                ));
            }
        }
        if self.num_train_classes() < 2 {
            out.push(format!(
                "{} training class: Proxy Anchor learns nothing without a second class",
                self.num_train_classes()
            ));
        }
        if self.num_test_classes() < 5 {
            out.push(format!(
                "only {} test classes: Recall@k is high by chance and NMI / F1 say little",
                self.num_test_classes()
            ));
        }
        out
    }

    /// Checks the invariants every loader promises (non-empty splits, labels in range).
    pub fn validate(&self) -> DataResult<()> {
        if self.train.is_empty() || self.test.is_empty() {
            return Err(DataError::Invalid(format!(
                "dataset {} has an empty split (train {}, test {}); check the data directory",
                self.name,
                self.train.len(),
                self.test.len()
            )));
        }
        let check =
            |samples: &[Sample], n: usize, split: &str| match samples.iter().find(|s| s.label >= n)
            {
                Some(s) => Err(DataError::Invalid(format!(
                    "dataset {}: {split} label {} out of range (classes {n})",
                    self.name, s.label
                ))),
                None => Ok(()),
            };
        check(&self.train, self.num_train_classes(), "train")?;
        check(&self.test, self.num_test_classes(), "test")
    }
}

/// Which split of Fashion-MNIST to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FashionSplit {
    /// The official train set for training, the official test set for evaluation (all 10 classes).
    Standard,
    /// Zero-shot: classes 0-4 of the official train set for training, classes 5-9 of the official
    /// test set for evaluation (so no test image or class was seen in training).
    ZeroShot,
}

/// The datasets this crate knows, as named on the command line.
#[derive(Clone, Debug, PartialEq)]
pub enum DatasetKind {
    Cub200,
    Cars196,
    InShop,
    Sop,
    FashionMnist(FashionSplit),
    /// The Fashion-MNIST subset compiled into the binary (zero-shot split).
    FashionMnistEmbedded,
    ImageFolder,
    Synthetic(SyntheticConfig),
}

impl DatasetKind {
    /// Parses a command-line name: cub200, cars196, inshop, sop, fashion-mnist (standard split),
    /// fashion-mnist-zero-shot, fashion-mnist-embedded (the built-in subset, zero-shot),
    /// imagefolder, synthetic.
    pub fn parse(name: &str) -> DataResult<Self> {
        let lower = name.to_ascii_lowercase().replace('_', "-");
        Ok(match lower.as_str() {
            "cub200" | "cub" | "cub-200-2011" => DatasetKind::Cub200,
            "cars196" | "cars" => DatasetKind::Cars196,
            "inshop" | "in-shop" => DatasetKind::InShop,
            "sop" | "stanford-online-products" => DatasetKind::Sop,
            "fashion-mnist" | "fmnist" | "fashion-mnist-standard" => {
                DatasetKind::FashionMnist(FashionSplit::Standard)
            }
            "fashion-mnist-zero-shot" | "fmnist-zero-shot" | "fashion-mnist-zeroshot" => {
                DatasetKind::FashionMnist(FashionSplit::ZeroShot)
            }
            "fashion-mnist-embedded" | "fmnist-embedded" => DatasetKind::FashionMnistEmbedded,
            "imagefolder" | "image-folder" | "folder" => DatasetKind::ImageFolder,
            "synthetic" | "synth" => DatasetKind::Synthetic(SyntheticConfig::default()),
            _ => {
                return Err(DataError::Invalid(format!(
                    "unknown dataset '{name}'; expected one of cub200, cars196, inshop, sop, \
                     fashion-mnist, fashion-mnist-zero-shot, fashion-mnist-embedded, imagefolder, synthetic"
                )))
            }
        })
    }
}

impl fmt::Display for DatasetKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            DatasetKind::Cub200 => "cub200",
            DatasetKind::Cars196 => "cars196",
            DatasetKind::InShop => "inshop",
            DatasetKind::Sop => "sop",
            DatasetKind::FashionMnist(FashionSplit::Standard) => "fashion-mnist",
            DatasetKind::FashionMnist(FashionSplit::ZeroShot) => "fashion-mnist-zero-shot",
            DatasetKind::FashionMnistEmbedded => fashion_mnist::EMBEDDED_NAME,
            DatasetKind::ImageFolder => "imagefolder",
            DatasetKind::Synthetic(_) => "synthetic",
        };
        f.write_str(s)
    }
}

/// Loads a dataset. `data_dir` is required for the file-based datasets; Fashion-MNIST falls back to
/// [`fashion_mnist::DEFAULT_DIR`]; the synthetic dataset ignores it. Prints the summary (and every
/// skipped file's warning) on stderr.
pub fn load(kind: &DatasetKind, data_dir: Option<&Path>) -> DataResult<Dataset> {
    let need_dir = || {
        data_dir.ok_or_else(|| {
            DataError::Invalid(format!(
                "dataset {kind} needs a data directory; pass --data-dir <path>"
            ))
        })
    };
    let dataset = match kind {
        DatasetKind::Cub200 => folders::load_cub200(need_dir()?)?,
        DatasetKind::Cars196 => folders::load_cars196(need_dir()?)?,
        DatasetKind::InShop => lists::load_inshop(need_dir()?)?,
        DatasetKind::Sop => lists::load_sop(need_dir()?)?,
        DatasetKind::FashionMnist(split) => {
            let dir = data_dir
                .map(Path::to_path_buf)
                .unwrap_or_else(|| PathBuf::from(fashion_mnist::DEFAULT_DIR));
            fashion_mnist::load_fashion_mnist(&dir, *split)?
        }
        DatasetKind::FashionMnistEmbedded => fashion_mnist::load_embedded()?,
        DatasetKind::ImageFolder => folders::load_image_folder(need_dir()?)?,
        DatasetKind::Synthetic(cfg) => synthetic::load_synthetic(cfg)?,
    };
    dataset.validate()?;
    eprintln!("{}", dataset.summary());
    for w in dataset.warnings() {
        eprintln!("warning: dataset {}: {w}", dataset.name);
    }
    Ok(dataset)
}

/// File extensions accepted as images.
pub(crate) fn is_image_file(path: &Path) -> bool {
    matches!(
        path.extension()
            .and_then(|e| e.to_str())
            .map(|e| e.to_ascii_lowercase())
            .as_deref(),
        Some("jpg" | "jpeg" | "png")
    )
}

/// Checks that an image file exists and has a readable header; returns the reason if not.
/// Reading only the header keeps loading fast; a file whose body is broken is caught again (and
/// counted) when the batch loader decodes it.
pub fn check_image_header(path: &Path) -> Result<(), String> {
    // A FIFO named like an image would block the loader forever.
    crate::files::check_regular(path).map_err(|e| format!("cannot open: {e}"))?;
    let reader = image::ImageReader::open(path).map_err(|e| format!("cannot open: {e}"))?;
    let reader = reader
        .with_guessed_format()
        .map_err(|e| format!("cannot read: {e}"))?;
    if reader.format().is_none() {
        return Err("not a recognised image format (corrupt or truncated?)".into());
    }
    let decoder = reader.into_decoder().map_err(|e| match e {
        image::ImageError::Limits(l) => format!("exceeds the image-size limit: {l}"),
        e => format!("corrupt image header: {e}"),
    })?;
    check_decodable_size(&decoder)
}

/// Refuses, from the header alone, an image that the decoder would refuse for its size (a
/// decompression bomb: a few bytes that claim 100,000 x 100,000 pixels). Found here, it is
/// skipped like a corrupt file, instead of failing later in the batch loader.
fn check_decodable_size(decoder: &impl image::ImageDecoder) -> Result<(), String> {
    let limit = image::Limits::default().max_alloc.unwrap_or(u64::MAX);
    let need = decoder.total_bytes();
    if need <= limit {
        return Ok(());
    }
    let (w, h) = decoder.dimensions();
    Err(format!(
        "exceeds the image-size limit: its header claims {w}x{h} pixels ({} decoded), over the \
         decoder's limit of {} (a decompression bomb or a corrupt header)",
        crate::files::human_bytes(need as f64),
        crate::files::human_bytes(limit as f64)
    ))
}

/// The image a list file's line names, `root` joined with `rel`. An entry that could lead
/// outside `root` (an absolute path, `..`, a drive prefix) is refused, naming the list and the
/// line, instead of being read or silently dropped.
pub(crate) fn list_entry_path(
    root: &Path,
    rel: &str,
    list: &Path,
    line: usize,
) -> DataResult<PathBuf> {
    use std::path::Component;
    let inside = Path::new(rel)
        .components()
        .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
    if !inside {
        return Err(DataError::EntryOutsideDataset {
            path: list.to_path_buf(),
            line,
            entry: rel.to_string(),
            root: root.to_path_buf(),
        });
    }
    Ok(root.join(rel))
}

/// Adds `path` as a sample if its header is readable, else records it as skipped.
pub(crate) fn push_checked(
    samples: &mut Vec<Sample>,
    skipped: &mut SkipSummary,
    path: PathBuf,
    label: usize,
) {
    match check_image_header(&path) {
        Ok(()) => samples.push(Sample {
            source: ImageSource::File(path),
            label,
        }),
        Err(reason) => skipped.skip(&path, reason),
    }
}

/// Sorted entries of a directory, with an error that names it.
pub(crate) fn read_dir_sorted(dir: &Path) -> DataResult<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))?;
    let mut paths = Vec::new();
    for entry in entries {
        paths.push(entry.map_err(|e| DataError::io(dir, e))?.path());
    }
    paths.sort();
    Ok(paths)
}

/// Folders already read, by their canonical path: a link back to one of them is a loop (or
/// the same images counted twice, possibly under two classes).
#[derive(Default)]
pub(crate) struct VisitedDirs(std::collections::HashMap<PathBuf, PathBuf>);

impl VisitedDirs {
    /// Records `dir`; errors naming both paths if it was read before under another name.
    pub(crate) fn enter(&mut self, dir: &Path) -> DataResult<()> {
        let canonical = dir.canonicalize().map_err(|e| DataError::io(dir, e))?;
        match self.0.get(&canonical) {
            Some(first) => Err(DataError::RepeatedFolder {
                path: dir.to_path_buf(),
                first: first.clone(),
            }),
            None => {
                self.0.insert(canonical, dir.to_path_buf());
                Ok(())
            }
        }
    }
}

/// All image files under `dir` (recursively), sorted.
pub(crate) fn image_files_recursive(
    dir: &Path,
    visited: &mut VisitedDirs,
) -> DataResult<Vec<PathBuf>> {
    visited.enter(dir)?;
    let mut out = Vec::new();
    for path in read_dir_sorted(dir)? {
        if path.is_dir() {
            out.extend(image_files_recursive(&path, visited)?);
        } else if is_image_file(&path) {
            out.push(path);
        }
    }
    Ok(out)
}
