//! Rebuilding a stopped node's data directory from a complete backup set.
//!
//! What holds:
//! - **Never under a running node.** The event store holds `eventstore.lock` in its data
//!   directory for its whole life; restore takes the same lock first and keeps it to the end, so
//!   a node cannot start meanwhile either.
//! - **Never over data by accident.** A data directory that holds anything (or a control DB at
//!   the target path) is refused unless `--force`, which moves what is there aside into
//!   `.pre-restore-<millis>/` (the event store ignores names starting with `.`) instead of
//!   deleting it.
//! - **All or nothing.** Files are copied into `.restoring-<millis>/` inside the data directory,
//!   each checked against the manifest's SHA-256 while it is copied and fsynced, and only then
//!   renamed into place; the control DB comes last. A restore that fails leaves that folder
//!   behind (and says so), never a half data directory that a node would start on.
//!
//! Where things go: `contexts/<c>/...` to `<data>/<c>/...` (log segments and Raft state, event
//! and snapshot segments, as the event store lays them out), and the control DB out of its zip
//! to `--control-db` (default `<data>/_admin/myelin-controldb.sqlite3`, the node's default).
//! Starting the node then recovers as after a crash: torn tails of copied open segments are cut,
//! log entries the segments lack are applied again, and segments ahead of the copied log are
//! taken as its snapshot.

use std::collections::BTreeSet;
use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use nix::fcntl::{Flock, FlockArg};
use serde::Serialize;

use crate::files;
use crate::progress::Progress;
use crate::set::{self, Manifest};

/// The control DB's place relative to the data directory when the node uses its default.
pub const DEFAULT_CONTROL_DB: &str = "_admin/myelin-controldb.sqlite3";
/// Entries of a data directory that do not make it "used".
const IGNORED: [&str; 2] = ["eventstore.lock", "lost+found"];

pub struct Options {
    pub backup: PathBuf,
    pub data: PathBuf,
    pub control_db: Option<PathBuf>,
    pub force: bool,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    pub data: String,
    pub control_db: Option<String>,
    pub contexts: Vec<String>,
    pub files: usize,
    pub bytes: u64,
    /// Where `--force` moved what the data directory held.
    pub moved_aside: Option<String>,
}

/// Why a restore did not start.
#[derive(Debug)]
pub struct Incomplete(pub String);

impl std::fmt::Display for Incomplete {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Incomplete {}

fn millis() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

/// Takes the event store's own lock on `data`.
fn lock_data(data: &Path) -> anyhow::Result<Flock<fs::File>> {
    let path = data.join("eventstore.lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(lock),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => bail!(
            "{} holds a running node ({} is locked by its event store): stop the node first",
            data.display(),
            path.display()
        ),
        Err((_, errno)) => bail!("cannot lock {}: {errno}", path.display()),
    }
}

pub fn restore(options: Options, progress: &mut Progress) -> anyhow::Result<Summary> {
    let backup = fs::canonicalize(&options.backup)
        .with_context(|| format!("the backup set {} cannot be opened", options.backup.display()))?;
    let _set_lock = set::lock_for_reading(&backup)?;
    let Some(manifest) = set::read_manifest(&backup)? else {
        return Err(Incomplete(format!(
            "{} has no {}: the backup did not finish, so it cannot be restored (run `verify`)",
            backup.display(),
            set::MANIFEST
        ))
        .into());
    };
    fs::create_dir_all(&options.data).with_context(|| format!("creating {}", options.data.display()))?;
    let data = fs::canonicalize(&options.data)?;
    if data.starts_with(&backup) || backup.starts_with(&data) {
        bail!(
            "the backup set {} and the data directory {} must not contain each other",
            backup.display(),
            data.display()
        );
    }
    let _data_lock = lock_data(&data)?;
    let control_db = match &options.control_db {
        Some(path) => std::path::absolute(path)?,
        None => data.join(DEFAULT_CONTROL_DB),
    };
    let contexts = contexts_of(&manifest)?;

    // What is there already.
    let mut present: Vec<PathBuf> = Vec::new();
    for entry in fs::read_dir(&data)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !IGNORED.contains(&name.as_str()) && !name.starts_with(".pre-restore-") && !name.starts_with(".restoring-") {
            present.push(entry.path());
        }
    }
    let outside_db: Vec<PathBuf> = if control_db.starts_with(&data) {
        Vec::new()
    } else {
        db_files(&control_db).into_iter().filter(|p| p.exists()).collect()
    };
    if (!present.is_empty() || !outside_db.is_empty()) && !options.force {
        let mut names: Vec<String> = present
            .iter()
            .chain(&outside_db)
            .map(|p| p.display().to_string())
            .collect();
        names.truncate(5);
        bail!(
            "{} is not empty ({}{}); restore only into an empty data directory, or pass --force to move what \
             is there aside",
            data.display(),
            names.join(", "),
            if present.len() + outside_db.len() > 5 {
                ", ..."
            } else {
                ""
            }
        );
    }
    let stamp = millis();
    let mut moved_aside = None;
    if !present.is_empty() || !outside_db.is_empty() {
        let aside = data.join(format!(".pre-restore-{stamp}"));
        fs::create_dir(&aside)?;
        for path in &present {
            let name = path.file_name().expect("a directory entry has a name");
            fs::rename(path, aside.join(name)).with_context(|| format!("moving {} aside", path.display()))?;
        }
        for path in &outside_db {
            let name = path.file_name().expect("a file name");
            let target = path.with_file_name(format!("{}.pre-restore-{stamp}", name.to_string_lossy()));
            fs::rename(path, &target).with_context(|| format!("moving {} aside", path.display()))?;
        }
        files::sync_dir(&data)?;
        progress.step(&format!("moved what {} held into {}", data.display(), aside.display()));
        moved_aside = Some(aside.display().to_string());
    }

    // Copy and check everything into a staging folder.
    let staging = data.join(format!(".restoring-{stamp}"));
    fs::create_dir(&staging)?;
    let mut bytes = 0;
    let total = manifest.files.len();
    let mut dirs = BTreeSet::new();
    for (i, file) in manifest.files.iter().enumerate() {
        if Some(&file.path) == manifest.control_db.as_ref() {
            continue;
        }
        let rest = file
            .path
            .strip_prefix(&format!("{}/", set::CONTEXTS_DIR))
            .with_context(|| format!("the manifest names {}, which a restore does not know", file.path))?;
        let target = staging.join(rest);
        progress.file(i + 1, total, &file.path, file.size);
        let copied = files::copy_file(&backup.join(&file.path), &target, &mut |_| {})
            .with_context(|| format!("restoring {}", file.path))?;
        check(&file.path, &copied, file)?;
        bytes += copied.size;
        let mut dir = target.parent();
        while let Some(d) = dir.filter(|d| d.starts_with(&staging)) {
            dirs.insert(d.to_owned());
            dir = d.parent();
        }
    }
    // Deepest first, so every folder's entries are durable before the folder's own entry.
    for dir in dirs.iter().rev() {
        files::sync_dir(dir)?;
    }
    for context in &contexts {
        let staged = staging.join(context);
        if staged.exists() {
            fs::rename(&staged, data.join(context))?;
        }
    }
    fs::remove_dir(&staging).with_context(|| format!("removing {}", staging.display()))?;
    files::sync_dir(&data)?;

    // The control DB last.
    let restored_db = match &manifest.control_db {
        Some(zip) => {
            let entry = manifest
                .files
                .iter()
                .find(|f| &f.path == zip)
                .with_context(|| format!("the manifest names the control DB {zip} but lists no such file"))?;
            progress.step(&format!("restoring the control DB to {}", control_db.display()));
            bytes += restore_control_db(&backup.join(zip), entry, &control_db)?;
            Some(control_db.display().to_string())
        }
        None => None,
    };
    progress.finish();
    Ok(Summary {
        data: data.display().to_string(),
        control_db: restored_db,
        contexts,
        files: total,
        bytes,
        moved_aside,
    })
}

fn check(path: &str, copied: &files::Digested, expected: &set::FileEntry) -> anyhow::Result<()> {
    if copied.size != expected.size || copied.sha256 != expected.sha256 {
        bail!("{path} in the backup set is damaged (it differs from the manifest); the restore stopped");
    }
    Ok(())
}

/// The control DB and the WAL files SQLite keeps next to it: a stale WAL beside a restored DB
/// would be replayed into it.
fn db_files(db: &Path) -> Vec<PathBuf> {
    let name = db
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    vec![
        db.to_owned(),
        db.with_file_name(format!("{name}-wal")),
        db.with_file_name(format!("{name}-shm")),
    ]
}

/// Checks the zip against the manifest, then writes its one entry to `target` durably.
fn restore_control_db(zip: &Path, expected: &set::FileEntry, target: &Path) -> anyhow::Result<u64> {
    let digested = files::digest_file(zip).with_context(|| format!("reading {}", zip.display()))?;
    check(&expected.path, &digested, expected)?;
    let mut archive = zip::ZipArchive::new(fs::File::open(zip)?)
        .with_context(|| format!("{} is not a zip archive", zip.display()))?;
    anyhow::ensure!(
        archive.len() == 1,
        "{} holds {} files; a control DB backup holds one",
        zip.display(),
        archive.len()
    );
    let mut entry = archive.by_index(0)?;
    for stale in db_files(target).into_iter().skip(1) {
        files::remove_file(&stale)?;
    }
    let written = files::write_stream(&mut entry, target, &mut |_| {})
        .with_context(|| format!("writing {}", target.display()))?;
    if let Some(dir) = target.parent() {
        files::sync_dir(dir)?;
        if let Some(parent) = dir.parent() {
            files::sync_dir(parent)?;
        }
    }
    Ok(written.size)
}

/// The contexts a manifest holds, their names checked (they become directory names).
fn contexts_of(manifest: &Manifest) -> anyhow::Result<Vec<String>> {
    let mut contexts = BTreeSet::new();
    for file in &manifest.files {
        let mut parts = file.path.split('/');
        if parts.next() == Some(set::CONTEXTS_DIR) {
            let name = parts.next().unwrap_or_default();
            let valid = !name.is_empty()
                && !name.starts_with('.')
                && !name.starts_with('_')
                && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
            if !valid {
                bail!("the manifest names a context {name:?}, which is not a valid context name");
            }
            contexts.insert(name.to_owned());
        }
    }
    Ok(contexts.into_iter().collect())
}
