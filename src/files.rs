//! Reading the files a user names. Only regular files are read: a FIFO or a device such as
//! `/dev/zero` would block or never end. A file larger than the memory the OS reports available
//! is refused before it is read, instead of the process aborting part-way.

use std::io::{Error, ErrorKind};
use std::path::Path;

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
    fn sizes_read_as_people_write_them() {
        assert_eq!(human_bytes(1536.0), "1.5 KiB");
        assert_eq!(human_bytes(3.0 * 1024.0 * 1024.0 * 1024.0), "3.0 GiB");
    }
}
