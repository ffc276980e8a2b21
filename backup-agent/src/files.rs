//! Durable file writes. Every file is written under a temp name in its final directory, fsynced
//! and renamed over the final name; the directory is fsynced after the renames. A crash leaves
//! the old file or the whole new one (plus perhaps a temp file, which the next run removes),
//! never a torn file under a final name.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Size and SHA-256 (hex) of a file's content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digested {
    pub size: u64,
    pub sha256: String,
}

/// Prefix of temp files: hidden, and never a name the server gives a file.
const TEMP_PREFIX: &str = ".tmp-";

/// The temp name `dest` is written under.
pub fn temp_path(dest: &Path) -> PathBuf {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dest.with_file_name(format!("{TEMP_PREFIX}{name}"))
}

/// Whether `name` is one of our temp files (left over by an interrupted run).
pub fn is_temp_name(name: &str) -> bool {
    name.starts_with(TEMP_PREFIX)
}

/// Copies `reader` into `dest` durably (see the module docs, except the directory fsync, which
/// the caller does once for many files), hashing what it writes. `on_bytes` hears of progress.
pub fn write_stream(reader: &mut dyn Read, dest: &Path, on_bytes: &mut dyn FnMut(u64)) -> io::Result<Digested> {
    if let Some(dir) = dest.parent() {
        fs::create_dir_all(dir)?;
    }
    let tmp = temp_path(dest);
    let result = (|| {
        let mut out = File::create(&tmp)?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut size = 0u64;
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n])?;
            size += n as u64;
            on_bytes(n as u64);
        }
        out.sync_all()?;
        fs::rename(&tmp, dest)?;
        Ok(Digested {
            size,
            sha256: hex::encode(hasher.finalize()),
        })
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Copies the file `src` (which may still grow: it is read up to the end it has when reached)
/// into `dest` durably.
pub fn copy_file(src: &Path, dest: &Path, on_bytes: &mut dyn FnMut(u64)) -> io::Result<Digested> {
    let mut input = File::open(src)?;
    write_stream(&mut input, dest, on_bytes)
}

/// Writes `bytes` to `dest` durably, directory fsync included.
pub fn write_file(dest: &Path, bytes: &[u8]) -> io::Result<()> {
    write_stream(&mut &bytes[..], dest, &mut |_| {})?;
    sync_dir(dest.parent().unwrap_or(Path::new(".")))
}

/// Size and SHA-256 of a file.
pub fn digest_file(path: &Path) -> io::Result<Digested> {
    let mut input = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok(Digested {
        size,
        sha256: hex::encode(hasher.finalize()),
    })
}

/// Makes the entries of `dir` (renames, creations, removals) durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Removes a file, durably once the caller syncs its directory; a missing file is fine.
pub fn remove_file(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_are_whole_and_hashed() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("a");
        fs::write(&src, b"hello").unwrap();
        let dest = dir.path().join("sub/b");
        let mut seen = 0;
        let copied = copy_file(&src, &dest, &mut |n| seen += n).unwrap();
        assert_eq!(seen, 5);
        assert_eq!(copied.size, 5);
        assert_eq!(
            copied.sha256,
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert_eq!(digest_file(&dest).unwrap(), copied);
        assert!(!temp_path(&dest).exists());
        assert!(is_temp_name(temp_path(&dest).file_name().unwrap().to_str().unwrap()));
        let missing = copy_file(&dir.path().join("nope"), &dest, &mut |_| {}).unwrap_err();
        assert_eq!(missing.kind(), io::ErrorKind::NotFound);
        assert_eq!(fs::read(&dest).unwrap(), b"hello", "a failed copy leaves the old file");
    }
}
