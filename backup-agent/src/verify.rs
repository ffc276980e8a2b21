//! Checking a backup set: complete (it has a manifest, and no backup is writing it) and whole
//! (every file the manifest names is there with its size and SHA-256).

use std::path::Path;

use serde::Serialize;

use crate::files;
use crate::progress::Progress;
use crate::set;

/// The verdict on a set.
#[derive(Debug, Serialize)]
#[serde(tag = "result", rename_all = "camelCase")]
pub enum Verdict {
    /// Every file is there and matches.
    Ok { files: usize, bytes: u64 },
    /// The set has no manifest (a backup was interrupted, or is running).
    Incomplete { reason: String },
    /// Files are missing or differ from the manifest.
    Damaged { problems: Vec<String> },
}

pub fn verify(dir: &Path, progress: &mut Progress) -> anyhow::Result<Verdict> {
    anyhow::ensure!(dir.is_dir(), "{} is not a directory", dir.display());
    let _lock = match set::lock_for_reading(dir) {
        Ok(lock) => lock,
        Err(e) => {
            return Ok(Verdict::Incomplete {
                reason: format!("{e:#}"),
            });
        }
    };
    let manifest = match set::read_manifest(dir) {
        Ok(Some(manifest)) => manifest,
        Ok(None) => {
            return Ok(Verdict::Incomplete {
                reason: format!(
                    "{} has no {}: the backup that wrote it did not finish; run the backup again",
                    dir.display(),
                    set::MANIFEST
                ),
            });
        }
        Err(e) => {
            return Ok(Verdict::Damaged {
                problems: vec![format!("{e:#}")],
            });
        }
    };
    let mut problems = Vec::new();
    let mut bytes = 0;
    let total = manifest.files.len();
    for (i, file) in manifest.files.iter().enumerate() {
        progress.file(i + 1, total, &file.path, file.size);
        match files::digest_file(&dir.join(&file.path)) {
            Ok(found) if found.size != file.size => problems.push(format!(
                "{}: {} bytes, the manifest says {}",
                file.path, found.size, file.size
            )),
            Ok(found) if found.sha256 != file.sha256 => {
                problems.push(format!("{}: checksum differs from the manifest", file.path))
            }
            Ok(found) => bytes += found.size,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => problems.push(format!("{}: missing", file.path)),
            Err(e) => problems.push(format!("{}: {e}", file.path)),
        }
    }
    if let Some(control_db) = &manifest.control_db
        && !manifest.files.iter().any(|f| &f.path == control_db)
    {
        problems.push(format!("the control DB {control_db} is not among the files"));
    }
    progress.finish();
    Ok(if problems.is_empty() {
        Verdict::Ok { files: total, bytes }
    } else {
        Verdict::Damaged { problems }
    })
}
