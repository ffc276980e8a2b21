//! A backup set: one directory holding one node's latest backup.
//!
//! ```text
//! DIR/
//!   manifest.json            every file of the set with its size and SHA-256; written LAST
//!   state.json               what the incremental backup remembers (closed segments copied)
//!   .lock                    flock'ed by a running backup, verify or restore
//!   controldb/controldb<ms>.zip
//!   contexts/<context>/log/<first index>.log, vote, purged
//!   contexts/<context>/member.json, raft-state.json, snapshot.json
//!   contexts/<context>/events/<base>.events, .index, .bloom
//!   contexts/<context>/snapshots/<base>.snapshots, .sindex, .sbloom
//! ```
//!
//! A set is complete exactly when `manifest.json` exists: a backup removes it before it changes
//! any file and writes it (atomically) after every file is durable. Paths in the manifest are
//! relative and checked on reading, so a damaged or hostile manifest cannot make a restore write
//! outside its target.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::path::{Component, Path, PathBuf};

use anyhow::{Context as _, bail};
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

pub const MANIFEST: &str = "manifest.json";
pub const STATE: &str = "state.json";
pub const LOCK: &str = ".lock";
pub const CONTROL_DB_DIR: &str = "controldb";
pub const CONTEXTS_DIR: &str = "contexts";
/// The version of the manifest and state formats this agent writes and reads.
pub const FORMAT: u32 = 1;
/// A manifest or state file larger than this is not one of ours.
const MAX_METADATA_BYTES: u64 = 256 << 20;

/// One file of the set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Relative to the set's directory, `/`-separated.
    pub path: String,
    pub size: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub format: u32,
    /// When the backup finished (Unix milliseconds).
    pub created_at_millis: u64,
    /// The admin URL it was taken from.
    pub server: String,
    /// The control DB zip, one of `files`; absent when the backup had none.
    pub control_db: Option<String>,
    /// The contexts in the set.
    pub contexts: Vec<String>,
    pub files: Vec<FileEntry>,
}

/// What an incremental backup remembers of earlier runs.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct State {
    pub format: u32,
    pub contexts: BTreeMap<String, ContextState>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContextState {
    /// By segment kind (`EVENT`, `SNAPSHOT`).
    pub segments: BTreeMap<String, KindState>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KindState {
    /// Base token of the newest closed segment copied (-1: none); the next run asks only for
    /// closed segments after it.
    pub last_closed: i64,
    /// The closed segment files copied so far (they never change on the server).
    pub closed: Vec<FileEntry>,
}

impl Default for KindState {
    fn default() -> Self {
        KindState {
            last_closed: -1,
            closed: Vec::new(),
        }
    }
}

/// Takes the set's lock, or fails at once saying another run holds it.
pub fn lock(dir: &Path) -> anyhow::Result<Flock<File>> {
    let path = dir.join(LOCK);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening the lock file {}", path.display()))?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(lock),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
            bail!(
                "another backup, verify or restore is using {} (lock {})",
                dir.display(),
                path.display()
            )
        }
        Err((_, errno)) => bail!("cannot lock {}: {errno}", path.display()),
    }
}

/// Takes the set's lock for a reader (verify, restore): fails if a backup holds it, but a set
/// the reader cannot write (a read-only copy) is read without a lock.
pub fn lock_for_reading(dir: &Path) -> anyhow::Result<Option<Flock<File>>> {
    let path = dir.join(LOCK);
    let file = match OpenOptions::new().create(true).truncate(false).write(true).open(&path) {
        Ok(file) => file,
        Err(_) => match File::open(&path) {
            Ok(file) => file,
            Err(_) => return Ok(None),
        },
    };
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(Some(lock)),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Err(Busy(dir.display().to_string()).into()),
        Err(_) => Ok(None),
    }
}

/// Another backup, verify or restore holds the set's lock.
#[derive(Debug)]
pub struct Busy(pub String);

impl std::fmt::Display for Busy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "a backup is writing {} right now (its lock is held)", self.0)
    }
}

impl std::error::Error for Busy {}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> anyhow::Result<Option<T>> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let len = file.metadata()?.len();
    if len > MAX_METADATA_BYTES {
        bail!(
            "{} is {len} bytes, too large to be a backup set's metadata",
            path.display()
        );
    }
    let value = serde_json::from_reader(std::io::BufReader::new(file))
        .with_context(|| format!("{} is not valid", path.display()))?;
    Ok(Some(value))
}

/// The set's manifest; `None` when the set is incomplete.
pub fn read_manifest(dir: &Path) -> anyhow::Result<Option<Manifest>> {
    let Some(manifest) = read_json::<Manifest>(&dir.join(MANIFEST))? else {
        return Ok(None);
    };
    if manifest.format != FORMAT {
        bail!(
            "{}: format {} is not one this agent reads ({FORMAT})",
            dir.join(MANIFEST).display(),
            manifest.format
        );
    }
    for file in &manifest.files {
        check_relative(&file.path)?;
    }
    Ok(Some(manifest))
}

/// The incremental state; empty for a new set.
pub fn read_state(dir: &Path) -> anyhow::Result<State> {
    let state = read_json::<State>(&dir.join(STATE))?.unwrap_or(State {
        format: FORMAT,
        ..State::default()
    });
    if state.format != FORMAT {
        bail!(
            "{}: format {} is not one this agent reads",
            dir.join(STATE).display(),
            state.format
        );
    }
    for kinds in state.contexts.values() {
        for kind in kinds.segments.values() {
            for file in &kind.closed {
                check_relative(&file.path)?;
            }
        }
    }
    Ok(state)
}

/// Checks that a manifest path stays inside the set: relative, no `..`, no empty parts, and
/// starting with one of the set's folders.
pub fn check_relative(path: &str) -> anyhow::Result<()> {
    let parts: Vec<&str> = path.split('/').collect();
    let normal = parts.len() >= 2
        && !path.contains(['\\', '\0'])
        && parts
            .iter()
            .all(|part| !part.is_empty() && *part != "." && *part != "..")
        && Path::new(path).components().all(|c| matches!(c, Component::Normal(_)));
    if !normal || !matches!(parts[0], CONTROL_DB_DIR | CONTEXTS_DIR) {
        bail!("the backup set names an invalid path {path:?}");
    }
    Ok(())
}

/// A name the server gave a file, checked before it becomes part of a path here.
pub fn check_file_name(name: &str) -> anyhow::Result<()> {
    if name.is_empty() || name.starts_with('.') || name.contains('/') || name.contains('\0') || name.len() > 255 {
        bail!("the server named a file {name:?}, which is not a plain file name");
    }
    Ok(())
}

/// Where a context's files live in the set.
pub fn context_dir(dir: &Path, context: &str) -> PathBuf {
    dir.join(CONTEXTS_DIR).join(context)
}

/// `contexts/<context>/<rest>` as a manifest path.
pub fn context_path(context: &str, rest: &str) -> String {
    format!("{CONTEXTS_DIR}/{context}/{rest}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_paths_stay_inside_the_set() {
        for ok in [
            "contexts/default/log/00000000000000000000.log",
            "controldb/controldb1.zip",
        ] {
            check_relative(ok).unwrap();
        }
        for bad in [
            "",
            "/etc/passwd",
            "contexts/../../x",
            "contexts",
            "other/x",
            "contexts//x",
            "./contexts/x",
            "contexts\\..\\x",
        ] {
            assert!(check_relative(bad).is_err(), "{bad}");
        }
        for bad in ["", ".lock", "a/b", ".."] {
            assert!(check_file_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_second_lock_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let first = lock(dir.path()).unwrap();
        let err = lock(dir.path()).unwrap_err().to_string();
        assert!(err.contains("another backup"), "{err}");
        drop(first);
        lock(dir.path()).unwrap();
    }
}
