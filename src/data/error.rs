//! Errors of the data layer. Each message names the file or directory and says what to do.

use std::path::{Path, PathBuf};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum DataError {
    #[error("{what}: directory {path} not found; {hint}")]
    MissingDir {
        what: String,
        path: PathBuf,
        hint: String,
    },
    #[error("{what}: file {path} not found; {hint}")]
    MissingFile {
        what: String,
        path: PathBuf,
        hint: String,
    },
    #[error("{path}:{line}: malformed line: {detail}; the file may be truncated or from another release: re-download it")]
    MalformedLine {
        path: PathBuf,
        line: usize,
        detail: String,
    },
    #[error(
        "{path} line {line}: the entry '{entry}' leads outside the dataset folder {root}; a list \
         names images inside it by relative path: fix or remove the line"
    )]
    EntryOutsideDataset {
        path: PathBuf,
        line: usize,
        entry: String,
        root: PathBuf,
    },
    #[error("{path}: {detail}; the file is corrupt or not in the expected format: re-download it")]
    BadFile { path: PathBuf, detail: String },
    #[error(
        "folder {} is the folder {} again, reached through a link (a loop, or the same images \
         read twice, possibly under two classes); remove the link",
        path.display(),
        first.display()
    )]
    RepeatedFolder { path: PathBuf, first: PathBuf },
    #[error("cannot decode image {path}: {detail}; the file is corrupt: re-download or delete it")]
    CorruptImage { path: PathBuf, detail: String },
    #[error(
        "image {path} exceeds the image-size limit of the decoder ({detail}); it is too large to \
         decode safely (or a decompression bomb): resize or remove it"
    )]
    ImageTooLarge { path: PathBuf, detail: String },
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

pub type DataResult<T> = std::result::Result<T, DataError>;

impl DataError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    pub fn bad_file(path: &Path, detail: impl Into<String>) -> Self {
        DataError::BadFile {
            path: path.to_path_buf(),
            detail: detail.into(),
        }
    }

    pub fn malformed(path: &Path, line: usize, detail: impl Into<String>) -> Self {
        DataError::MalformedLine {
            path: path.to_path_buf(),
            line,
            detail: detail.into(),
        }
    }
}

/// Errors unless `path` is a directory.
pub(crate) fn require_dir(what: &str, path: &Path, hint: &str) -> DataResult<()> {
    if path.is_dir() {
        Ok(())
    } else {
        Err(DataError::MissingDir {
            what: what.to_string(),
            path: path.to_path_buf(),
            hint: hint.to_string(),
        })
    }
}

/// Errors unless `path` is a file.
pub(crate) fn require_file(what: &str, path: &Path, hint: &str) -> DataResult<()> {
    if path.is_file() {
        Ok(())
    } else {
        Err(DataError::MissingFile {
            what: what.to_string(),
            path: path.to_path_buf(),
            hint: hint.to_string(),
        })
    }
}
