//! Reading the files a user names. Only regular files are read: a FIFO or a device such as
//! `/dev/zero` would block or never end. A file larger than the memory the OS reports available
//! is refused before it is read, instead of the process aborting part-way.

use std::io::{Error, ErrorKind, Write};
use std::path::{Path, PathBuf};

/// The whole file, if `path` is a regular file (links followed) that fits in memory.
pub fn read_regular(path: &Path) -> std::io::Result<Vec<u8>> {
    check_fits_in_memory(path)?;
    std::fs::read(path)
}

/// The whole file as UTF-8 text, under the same rules as [`read_regular`].
pub fn read_regular_to_string(path: &Path) -> std::io::Result<String> {
    check_fits_in_memory(path)?;
    std::fs::read_to_string(path)
}

/// Errors (with `NotFound` kept as such) unless `path` is a regular file; returns its metadata.
/// Cheap enough to run on every image of a dataset.
pub fn check_regular(path: &Path) -> std::io::Result<std::fs::Metadata> {
    let meta = std::fs::metadata(path)?;
    if !meta.is_file() {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!(
                "it is {}, not a regular file; pass a file",
                file_kind(&meta)
            ),
        ));
    }
    Ok(meta)
}

/// `<path>.tmp`: where [`write_atomic`] writes before the rename.
pub fn tmp_path(path: &Path) -> PathBuf {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    PathBuf::from(tmp)
}

/// A failed [`write_atomic`]: the file it failed on (`<path>.tmp` or `path`) and why.
#[derive(Debug)]
pub struct AtomicWriteError {
    pub path: PathBuf,
    pub source: Error,
}

/// Writes `bytes` to `path` so that a reader only ever sees the old file or the new one whole:
/// to `<path>.tmp`, fsync, rename over `path`, fsync the folder (best effort: not every platform
/// can open one). The folder is created if missing. A leftover `.tmp` of a killed write is
/// replaced; anything else by that name (a link, a directory) is refused rather than written
/// through. On failure (a full disk, say) the partial `.tmp` is removed, and `path` is untouched.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), AtomicWriteError> {
    let tmp = tmp_path(path);
    let at = |p: &Path| {
        let p = p.to_path_buf();
        move |source| AtomicWriteError { path: p, source }
    };
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    if let Some(dir) = dir {
        std::fs::create_dir_all(dir).map_err(at(dir))?;
    }
    if let Ok(m) = std::fs::symlink_metadata(&tmp) {
        if !m.is_file() {
            return Err(AtomicWriteError {
                path: tmp,
                source: Error::new(
                    ErrorKind::AlreadyExists,
                    "it exists and is not a regular file; remove it so the file can be written",
                ),
            });
        }
        std::fs::remove_file(&tmp).map_err(at(&tmp))?;
    }
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    })();
    if let Err(source) = written {
        // Best effort: the error that matters is the write's.
        let _ = std::fs::remove_file(&tmp);
        return Err(AtomicWriteError { path: tmp, source });
    }
    if let Err(source) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(AtomicWriteError {
            path: path.to_path_buf(),
            source,
        });
    }
    if let Some(d) = dir.and_then(|d| std::fs::File::open(d).ok()) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Writes `bytes` to `path` only if nothing is there yet, atomically: readers see no file or the
/// whole one, and of several processes racing to create it exactly one wins. Returns whether
/// this call created it (false: the file existed, and is left as it was). The bytes go to a
/// temporary file named after this process, which is hard-linked to `path` (a link fails when
/// `path` exists, where a rename would replace it) and then removed.
pub fn create_once(path: &Path, bytes: &[u8]) -> Result<bool, AtomicWriteError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let at = |p: &Path| {
        let p = p.to_path_buf();
        move |source| AtomicWriteError { path: p, source }
    };
    let written = (|| {
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    })();
    if let Err(source) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(AtomicWriteError { path: tmp, source });
    }
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            if let Some(d) = path.parent().and_then(|d| std::fs::File::open(d).ok()) {
                let _ = d.sync_all();
            }
            Ok(true)
        }
        Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(at(path)(e)),
    }
}

/// [`check_regular`], and the file is no larger than the memory the OS reports available.
fn check_fits_in_memory(path: &Path) -> std::io::Result<()> {
    let meta = check_regular(path)?;
    match available_memory_bytes() {
        Some(have) if meta.len() > have => Err(Error::new(
            ErrorKind::OutOfMemory,
            format!(
                "the file is {} but only {} of memory is available",
                human_bytes(meta.len() as f64),
                human_bytes(have as f64)
            ),
        )),
        _ => Ok(()),
    }
}

/// What a non-regular file is, for messages.
fn file_kind(meta: &std::fs::Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_dir() {
        return "a directory";
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return "a FIFO (named pipe)";
        }
        if t.is_char_device() || t.is_block_device() {
            return "a device";
        }
        if t.is_socket() {
            return "a socket";
        }
    }
    "a special file"
}

/// Memory the OS reports available (Linux `MemAvailable`), if known.
pub fn available_memory_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// `1536` -> `1.5 KiB`.
pub fn human_bytes(b: f64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = b;
    for unit in UNITS {
        if v < 1024.0 {
            return format!("{v:.1} {unit}");
        }
        v /= 1024.0;
    }
    format!("{v:.1e} EiB")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_and_directories_are_refused_without_reading() {
        let e = read_regular(Path::new("/dev/zero")).unwrap_err();
        assert!(e.to_string().contains("a device"), "{e}");
        let e = read_regular(Path::new("/")).unwrap_err();
        assert!(e.to_string().contains("a directory"), "{e}");
        let e = read_regular(Path::new("/no/such/file")).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound);
    }

    #[test]
    fn an_atomic_write_replaces_whole_and_leaves_no_tmp() {
        let dir = std::env::temp_dir().join(format!("robust-dml-atomic-{}", std::process::id()));
        let path = dir.join("sub").join("f.bin");
        write_atomic(&path, b"old").unwrap();
        std::fs::write(tmp_path(&path), b"leftover of a killed write").unwrap();
        write_atomic(&path, b"new").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        assert!(!tmp_path(&path).exists());
        // A directory where the .tmp would go is refused, naming it; the file is untouched.
        std::fs::create_dir(tmp_path(&path)).unwrap();
        let e = write_atomic(&path, b"newer").unwrap_err();
        assert_eq!(e.path, tmp_path(&path));
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_failed_atomic_write_removes_its_tmp_and_keeps_the_old_file() {
        // The rename onto a non-empty folder fails after the .tmp was written whole: the same
        // clean-up path as a write that fails part-way on a full disk.
        let dir = std::env::temp_dir().join(format!("robust-dml-atomic-f-{}", std::process::id()));
        let path = dir.join("target");
        std::fs::create_dir_all(path.join("inside")).unwrap();
        let e = write_atomic(&path, b"bytes").unwrap_err();
        assert_eq!(e.path, path);
        assert!(!tmp_path(&path).exists(), "the partial .tmp is removed");
        assert!(path.join("inside").is_dir(), "the old content is kept");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn create_once_keeps_the_first_file_and_leaves_no_tmp() {
        let dir = std::env::temp_dir().join(format!("robust-dml-once-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("settings.json");
        assert!(create_once(&path, b"first").unwrap());
        assert!(!create_once(&path, b"second").unwrap());
        assert_eq!(std::fs::read(&path).unwrap(), b"first");
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert_eq!(left.len(), 1, "only the file itself: {left:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(human_bytes(1536.0), "1.5 KiB");
        assert_eq!(human_bytes(3.0 * 1024.0 * 1024.0 * 1024.0), "3.0 GiB");
    }
}
