//! Rebuilding a stopped node's data directory from a complete backup set.
//!
//! What holds:
//! - **Never under a running node.** The supervisor holds `myelin.lock` in the data directory
//!   from before its children start, and the event store `eventstore.lock` for its whole life;
//!   restore takes both first and keeps them to the end, so a node cannot start meanwhile either.
//! - **Never over data by accident.** A data directory that holds anything (or a control DB at
//!   the target path) is refused unless `--force`, which moves what is there aside into
//!   `.pre-restore-<millis>/` (the event store ignores names starting with `.`) instead of
//!   deleting it.
//! - **Verify everything, then swap.** Every file, the control DB too, is first copied into
//!   `.restoring-<millis>/` inside the data directory (a control DB kept elsewhere: into
//!   `.restoring-<millis>-<name>` beside it), checked against the manifest's SHA-256 while it is
//!   copied, and fsynced. Only then is anything that exists touched: what the directory holds is
//!   moved aside (with `--force`) and the staged files are renamed into place, a few renames on
//!   one file system, each undone if a later one fails.
//! - **A failed restore changes nothing.** Whatever fails (a damaged or missing file, a bad
//!   control DB zip, a full disk, a rename), the data directory is left exactly as it was and the
//!   staging places are removed. A restore killed outright may leave a `.restoring-*` folder,
//!   which the next restore removes (the event store ignores names starting with `.`).
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
const IGNORED: [&str; 3] = [NODE_LOCK, EVENTSTORE_LOCK, "lost+found"];
/// The supervisor's lock in the data directory.
const NODE_LOCK: &str = "myelin.lock";
/// The event store's lock in the data directory.
const EVENTSTORE_LOCK: &str = "eventstore.lock";

pub struct Options {
    pub backup: PathBuf,
    pub data: PathBuf,
    pub control_db: Option<PathBuf>,
    pub force: bool,
    /// The operator restores every node of a cluster, all of them stopped (see [`cluster_size`]).
    pub whole_cluster: bool,
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

/// Takes the node's locks on `data`: the supervisor's (`myelin.lock`, held by a running node
/// from before its children start) and the event store's own (`eventstore.lock`).
fn lock_data(data: &Path) -> anyhow::Result<[Flock<fs::File>; 2]> {
    Ok([lock_file(data, NODE_LOCK)?, lock_file(data, EVENTSTORE_LOCK)?])
}

fn lock_file(data: &Path, name: &str) -> anyhow::Result<Flock<fs::File>> {
    let path = data.join(name);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(lock),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
            let holder = match fs::read_to_string(&path).unwrap_or_default().trim() {
                "" => String::new(),
                pid => format!(", pid {pid}"),
            };
            bail!(
                "{} holds a running node ({} is locked{holder}): stop the node first",
                data.display(),
                path.display()
            )
        }
        Err((_, errno)) => bail!("cannot lock {}: {errno}", path.display()),
    }
}

pub fn restore(options: Options, progress: &mut Progress) -> anyhow::Result<Summary> {
    restore_with(options, progress, &mut |_| Ok(()))
}

/// [`restore`], with `inject` called before each step of the swap (tests make it fail there).
fn restore_with(
    options: Options,
    progress: &mut Progress,
    inject: &mut dyn FnMut(usize) -> std::io::Result<()>,
) -> anyhow::Result<Summary> {
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
    remove_stale_staging(&data, &control_db);

    // What is there already.
    let mut present: Vec<PathBuf> = Vec::new();
    for entry in fs::read_dir(&data)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !IGNORED.contains(&name.as_str()) && !name.starts_with(".pre-restore-") && !name.starts_with(STAGING_PREFIX)
        {
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

    // 1. Copy and check everything into staging places; nothing that exists is touched yet.
    let stamp = millis();
    let staging = Staging::new(&data, &control_db, stamp);
    let staged = match stage(&backup, &manifest, &staging, progress) {
        Ok(staged) => staged,
        Err(e) => {
            progress.finish();
            staging.discard();
            return Err(e.context(format!("the restore stopped before it changed {}", data.display())));
        }
    };
    if staged.control_db && !options.whole_cluster {
        let refusal = match cluster_size(&staging.control_db) {
            Ok(nodes) if nodes > 1 => Some(anyhow::anyhow!(
                "this backup is of a member of a cluster of {nodes} nodes: restoring it while the others run would \
                 bring back an older Raft log and vote, and a majority that counted on this member's newer entries \
                 could lose confirmed events. To bring a member back, unregister it (myelin-cli unregister-node -n \
                 NODE), start it with an empty data directory and register it again: the cluster streams it the \
                 segments. Pass --whole-cluster only when every node of the cluster is stopped and restored from \
                 its own backup (docs/backups.md)"
            )),
            Ok(_) => None,
            Err(e) => Some(e.context("the backup's control DB cannot be read")),
        };
        if let Some(refusal) = refusal {
            progress.finish();
            staging.discard();
            return Err(refusal.context(format!("the restore stopped before it changed {}", data.display())));
        }
    }

    // 2. Swap: move what is there aside, the staged files into place. Only renames, each undone
    // if a later one fails.
    let aside = data.join(format!(".pre-restore-{stamp}"));
    let mut plan = Vec::new();
    if !present.is_empty() || !outside_db.is_empty() {
        plan.push(Step::CreateDir(aside.clone()));
        for path in &present {
            let name = path.file_name().expect("a directory entry has a name");
            plan.push(Step::Rename {
                from: path.clone(),
                to: aside.join(name),
            });
        }
        for path in &outside_db {
            let name = path.file_name().expect("a file name");
            plan.push(Step::Rename {
                from: path.clone(),
                to: path.with_file_name(format!("{}.pre-restore-{stamp}", name.to_string_lossy())),
            });
        }
    }
    for context in &contexts {
        let from = staging.dir.join(context);
        if from.exists() {
            plan.push(Step::Rename {
                from,
                to: data.join(context),
            });
        }
    }
    if staged.control_db {
        // Folders between the data directory and the control DB that will not be there once
        // what the directory held has moved aside (`_admin`, by default).
        if control_db.starts_with(&data) {
            let mut missing: Vec<PathBuf> = control_db
                .ancestors()
                .skip(1)
                .take_while(|a| *a != data)
                .filter(|a| !a.exists() || present.iter().any(|p| a.starts_with(p)))
                .map(Path::to_path_buf)
                .collect();
            missing.reverse();
            plan.extend(missing.into_iter().map(Step::CreateDir));
        }
        plan.push(Step::Rename {
            from: staging.control_db.clone(),
            to: control_db.clone(),
        });
    }
    if let Err(e) = apply(&plan, inject) {
        progress.finish();
        staging.discard();
        return Err(e);
    }
    let mut synced = vec![data.clone()];
    if plan.iter().any(|s| matches!(s, Step::CreateDir(d) if *d == aside)) {
        synced.push(aside.clone());
    }
    if staged.control_db
        && let Some(dir) = control_db.parent()
    {
        synced.push(dir.to_owned());
        synced.extend(dir.parent().map(Path::to_path_buf));
    }
    for dir in &synced {
        files::sync_dir(dir)?;
    }
    staging.discard();
    let moved_aside = if present.is_empty() && outside_db.is_empty() {
        None
    } else {
        progress.step(&format!("moved what {} held into {}", data.display(), aside.display()));
        Some(aside.display().to_string())
    };
    progress.finish();
    Ok(Summary {
        data: data.display().to_string(),
        control_db: staged.control_db.then(|| control_db.display().to_string()),
        contexts,
        files: manifest.files.len(),
        bytes: staged.bytes,
        moved_aside,
    })
}

/// Prefix of the staging folder in the data directory (and of a staged control DB outside it).
const STAGING_PREFIX: &str = ".restoring-";

/// Where a restore copies the backup before anything is swapped: `<data>/.restoring-<millis>/`,
/// and for the control DB a file in that folder, or, when the control DB lives outside the data
/// directory, `.restoring-<millis>-<name>` beside it (a rename must not cross file systems).
struct Staging {
    dir: PathBuf,
    control_db: PathBuf,
}

impl Staging {
    fn new(data: &Path, control_db: &Path, stamp: u128) -> Staging {
        let dir = data.join(format!("{STAGING_PREFIX}{stamp}"));
        let control_db = if control_db.starts_with(data) {
            dir.join(".control-db")
        } else {
            let name = control_db.file_name().unwrap_or_default().to_string_lossy();
            control_db.with_file_name(format!("{STAGING_PREFIX}{stamp}-{name}"))
        };
        Staging { dir, control_db }
    }

    /// Removes whatever staging left; a restore leaves none of it behind, done or failed.
    fn discard(&self) {
        for (path, result) in [
            (&self.dir, fs::remove_dir_all(&self.dir)),
            (&self.control_db, files::remove_file(&self.control_db)),
        ] {
            if let Err(e) = result
                && e.kind() != std::io::ErrorKind::NotFound
            {
                eprintln!("myelin-backup-agent: warning: could not remove {}: {e}", path.display());
            }
        }
    }
}

/// Staging folders a killed restore left (the data lock is held, so none is in use).
fn remove_stale_staging(data: &Path, control_db: &Path) {
    let name = control_db
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    let mut places = vec![data.to_path_buf()];
    places.extend(control_db.parent().filter(|p| *p != data).map(Path::to_path_buf));
    for place in places {
        let Ok(entries) = fs::read_dir(&place) else { continue };
        for entry in entries.flatten() {
            let entry_name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            if place == data && entry_name.starts_with(STAGING_PREFIX) && path.is_dir() {
                let _ = fs::remove_dir_all(&path);
            } else if place != data && entry_name.starts_with(STAGING_PREFIX) && entry_name.ends_with(&name) {
                let _ = fs::remove_file(&path);
            }
        }
    }
}

struct Staged {
    bytes: u64,
    control_db: bool,
}

/// Copies every file of the set into the staging places, checking each against the manifest
/// while it is copied, and makes them durable.
fn stage(backup: &Path, manifest: &Manifest, staging: &Staging, progress: &mut Progress) -> anyhow::Result<Staged> {
    fs::create_dir(&staging.dir).with_context(|| format!("creating {}", staging.dir.display()))?;
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
        let target = staging.dir.join(rest);
        progress.file(i + 1, total, &file.path, file.size);
        let copied = files::copy_file(&backup.join(&file.path), &target, &mut |_| {})
            .with_context(|| format!("restoring {}", file.path))?;
        check(&file.path, &copied, file)?;
        bytes += copied.size;
        let mut dir = target.parent();
        while let Some(d) = dir.filter(|d| d.starts_with(&staging.dir)) {
            dirs.insert(d.to_owned());
            dir = d.parent();
        }
    }
    let control_db = match &manifest.control_db {
        Some(zip) => {
            let entry = manifest
                .files
                .iter()
                .find(|f| &f.path == zip)
                .with_context(|| format!("the manifest names the control DB {zip} but lists no such file"))?;
            progress.step("checking the control DB");
            bytes += stage_control_db(&backup.join(zip), entry, &staging.control_db)?;
            true
        }
        None => false,
    };
    // Deepest first, so every folder's entries are durable before the folder's own entry.
    for dir in dirs.iter().rev() {
        files::sync_dir(dir)?;
    }
    files::sync_dir(&staging.dir)?;
    Ok(Staged { bytes, control_db })
}

/// One step of the swap.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    CreateDir(PathBuf),
    Rename { from: PathBuf, to: PathBuf },
}

/// Takes the steps in order; if one fails, undoes those taken, newest first, so that everything
/// is where it was. The error says what failed and, if undoing failed too, where things are.
fn apply(plan: &[Step], inject: &mut dyn FnMut(usize) -> std::io::Result<()>) -> anyhow::Result<()> {
    for (i, step) in plan.iter().enumerate() {
        let result = inject(i).and_then(|()| match step {
            Step::CreateDir(dir) => fs::create_dir(dir),
            Step::Rename { from, to } => fs::rename(from, to),
        });
        let Err(e) = result else { continue };
        let failed = match step {
            Step::CreateDir(dir) => format!("creating {}", dir.display()),
            Step::Rename { from, to } => format!("moving {} to {}", from.display(), to.display()),
        };
        let mut stuck = Vec::new();
        for done in plan[..i].iter().rev() {
            let undone = match done {
                Step::CreateDir(dir) => fs::remove_dir(dir),
                Step::Rename { from, to } => fs::rename(to, from),
            };
            if let Err(undo) = undone {
                stuck.push(match done {
                    Step::CreateDir(dir) => format!("{} could not be removed ({undo})", dir.display()),
                    Step::Rename { from, to } => {
                        format!("{} is still at {} ({undo})", from.display(), to.display())
                    }
                });
            }
        }
        if stuck.is_empty() {
            bail!("{failed} failed: {e}; the restore was undone and the data directory is as it was");
        }
        bail!(
            "{failed} failed: {e}; undoing the restore failed too, so move these back by hand: {}",
            stuck.join("; ")
        );
    }
    Ok(())
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

/// Checks the zip against the manifest, then writes its one entry to `staged` durably.
fn stage_control_db(zip: &Path, expected: &set::FileEntry, staged: &Path) -> anyhow::Result<u64> {
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
    let written = files::write_stream(&mut entry, staged, &mut |_| {})
        .with_context(|| format!("writing {}", staged.display()))?;
    Ok(written.size)
}

/// How many nodes the cluster configuration in the control DB at `db` names. A member of a
/// cluster of several nodes must not be restored alone: its Raft log and vote would go back in
/// time while the other members rely on them (a vote given twice in a term, or an entry this
/// member had acknowledged for a majority gone), which Raft cannot survive.
fn cluster_size(db: &Path) -> anyhow::Result<u64> {
    let conn = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .with_context(|| format!("opening {}", db.display()))?;
    let nodes: i64 = conn
        .query_row("SELECT count(*) FROM nodes", [], |row| row.get(0))
        .with_context(|| format!("counting the nodes in {}", db.display()))?;
    Ok(u64::try_from(nodes).unwrap_or(0))
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

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;

    /// Writes a small complete backup set: one context with a log and an event segment, and a
    /// control DB zip.
    fn write_set(dir: &Path) {
        write_set_of(dir, 1);
    }

    /// A control DB whose cluster configuration names `nodes` nodes.
    fn control_db_of(nodes: usize) -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite3");
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch("CREATE TABLE nodes (name TEXT PRIMARY KEY NOT NULL)")
            .unwrap();
        for n in 0..nodes {
            conn.execute("INSERT INTO nodes (name) VALUES (?1)", [format!("n{n}")])
                .unwrap();
        }
        drop(conn);
        fs::read(&path).unwrap()
    }

    /// [`write_set`] of a node of a cluster of `nodes` nodes.
    fn write_set_of(dir: &Path, nodes: usize) {
        let mut entries = Vec::new();
        let mut put = |path: &str, bytes: &[u8]| {
            let full = dir.join(path);
            fs::create_dir_all(full.parent().unwrap()).unwrap();
            fs::write(&full, bytes).unwrap();
            let digested = files::digest_file(&full).unwrap();
            entries.push(set::FileEntry {
                path: path.to_owned(),
                size: digested.size,
                sha256: digested.sha256,
            });
        };
        put("contexts/default/log/00000000000000000000.log", b"restored log");
        put(
            "contexts/default/events/00000000000000000000.events",
            b"restored events",
        );
        let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        zip.start_file("myelin-controldb.sqlite3", zip::write::SimpleFileOptions::default())
            .unwrap();
        zip.write_all(&control_db_of(nodes)).unwrap();
        put("controldb/controldb1.zip", &zip.finish().unwrap().into_inner());
        let manifest = Manifest {
            format: set::FORMAT,
            created_at_millis: 1,
            server: "http://localhost:8024".into(),
            control_db: Some("controldb/controldb1.zip".into()),
            contexts: vec!["default".into()],
            files: entries,
        };
        fs::write(dir.join(set::MANIFEST), serde_json::to_vec(&manifest).unwrap()).unwrap();
    }

    /// A node's data directory in use: a context and the control DB with its WAL.
    fn write_live_data(data: &Path) {
        for (path, bytes) in [
            ("default/log/00000000000000000000.log", "live log"),
            ("default/events/00000000000000000000.events", "live events"),
            ("orders/log/00000000000000000000.log", "live orders log"),
            ("_admin/myelin-controldb.sqlite3", "live control db"),
            ("_admin/myelin-controldb.sqlite3-wal", "live wal"),
            ("eventstore.lock", ""),
            ("myelin.lock", "1234\n"),
        ] {
            let full = data.join(path);
            fs::create_dir_all(full.parent().unwrap()).unwrap();
            fs::write(full, bytes).unwrap();
        }
    }

    /// Every entry under `dir` (relative path, and a file's content), sorted.
    fn tree(dir: &Path) -> Vec<(String, Option<Vec<u8>>)> {
        fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, Option<Vec<u8>>)>) {
            for entry in fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                let name = path.strip_prefix(root).unwrap().display().to_string();
                if path.is_dir() {
                    out.push((name, None));
                    walk(root, &path, out);
                } else {
                    out.push((name, Some(fs::read(&path).unwrap())));
                }
            }
        }
        let mut out = Vec::new();
        walk(dir, dir, &mut out);
        out.sort();
        out
    }

    fn forced(set: &Path, data: &Path) -> Options {
        Options {
            backup: set.to_owned(),
            data: data.to_owned(),
            control_db: None,
            force: true,
            whole_cluster: false,
        }
    }

    #[test]
    fn a_damaged_set_leaves_the_data_directory_as_it_was() {
        type Damage = (&'static str, fn(&Path));
        let damages: [Damage; 4] = [
            ("a flipped byte in an event segment", |set| {
                fs::write(
                    set.join("contexts/default/events/00000000000000000000.events"),
                    b"restored evenTs",
                )
                .unwrap()
            }),
            ("a missing log segment", |set| {
                fs::remove_file(set.join("contexts/default/log/00000000000000000000.log")).unwrap()
            }),
            ("a damaged control DB zip", |set| {
                let zip = set.join("controldb/controldb1.zip");
                let mut bytes = fs::read(&zip).unwrap();
                let last = bytes.len() - 30;
                bytes[last] ^= 0xff;
                fs::write(zip, bytes).unwrap()
            }),
            ("a missing control DB zip", |set| {
                fs::remove_file(set.join("controldb/controldb1.zip")).unwrap()
            }),
        ];
        for (what, damage) in damages {
            let set = tempfile::tempdir().unwrap();
            write_set(set.path());
            damage(set.path());
            let data = tempfile::tempdir().unwrap();
            write_live_data(data.path());
            let before = tree(data.path());
            let err = restore(forced(set.path(), data.path()), &mut Progress::new(true)).unwrap_err();
            let message = format!("{err:#}");
            assert!(message.contains("stopped before it changed"), "{what}: {message}");
            assert_eq!(tree(data.path()), before, "{what}: the data directory changed");
        }
    }

    #[test]
    fn a_failing_step_of_the_swap_is_undone() {
        let set = tempfile::tempdir().unwrap();
        write_set(set.path());
        let data = tempfile::tempdir().unwrap();
        write_live_data(data.path());
        let before = tree(data.path());
        let mut failed_steps = 0;
        for fail_at in 0..50 {
            let result = restore_with(forced(set.path(), data.path()), &mut Progress::new(true), &mut |step| {
                if step == fail_at {
                    Err(std::io::Error::other("injected"))
                } else {
                    Ok(())
                }
            });
            match result {
                Err(e) => {
                    let message = format!("{e:#}");
                    assert!(message.contains("injected") && message.contains("undone"), "{message}");
                    assert_eq!(
                        tree(data.path()),
                        before,
                        "failing at step {fail_at} changed the data directory"
                    );
                    failed_steps += 1;
                }
                Ok(summary) => {
                    assert_eq!(summary.contexts, ["default"]);
                    break;
                }
            }
        }
        // The aside folder, 3 entries moved into it, the context, `_admin`, the control DB.
        assert_eq!(failed_steps, 7);
        let after = tree(data.path());
        let aside = after
            .iter()
            .find(|(name, _)| name.starts_with(".pre-restore-") && !name.contains('/'))
            .expect("what was there is moved aside")
            .0
            .clone();
        let file = |path: &str| fs::read_to_string(data.path().join(path)).unwrap();
        assert_eq!(file("default/log/00000000000000000000.log"), "restored log");
        assert_eq!(file("default/events/00000000000000000000.events"), "restored events");
        assert_eq!(
            cluster_size(&data.path().join("_admin/myelin-controldb.sqlite3")).unwrap(),
            1
        );
        assert!(!data.path().join("_admin/myelin-controldb.sqlite3-wal").exists());
        assert!(!data.path().join("orders").exists());
        assert_eq!(
            file(&format!("{aside}/orders/log/00000000000000000000.log")),
            "live orders log"
        );
        assert!(
            after.iter().all(|(name, _)| !name.starts_with(STAGING_PREFIX)),
            "{after:?}"
        );
    }

    #[test]
    fn a_staging_folder_left_by_a_killed_restore_is_removed() {
        let set = tempfile::tempdir().unwrap();
        write_set(set.path());
        let data = tempfile::tempdir().unwrap();
        fs::create_dir_all(data.path().join(".restoring-1/default/log")).unwrap();
        restore(
            Options {
                force: false,
                ..forced(set.path(), data.path())
            },
            &mut Progress::new(true),
        )
        .unwrap();
        assert!(!data.path().join(".restoring-1").exists());
        assert_eq!(
            cluster_size(&data.path().join("_admin/myelin-controldb.sqlite3")).unwrap(),
            1
        );
    }

    /// A member of a cluster of several nodes restored alone would go back in time under the
    /// others: refused, nothing changed, unless the operator restores the whole cluster.
    #[test]
    fn a_member_of_a_cluster_is_restored_only_with_the_whole_cluster() {
        let set = tempfile::tempdir().unwrap();
        write_set_of(set.path(), 3);
        let data = tempfile::tempdir().unwrap();
        fs::create_dir_all(data.path().join("default/log")).unwrap();
        fs::write(data.path().join("default/log/00000000000000000000.log"), b"live log").unwrap();
        let before = tree(data.path());
        let refused = restore(forced(set.path(), data.path()), &mut Progress::new(true))
            .expect_err("a member of a cluster of 3 restored alone");
        let message = format!("{refused:#}");
        assert!(message.contains("a member of a cluster of 3 nodes"), "{message}");
        assert!(message.contains("the restore stopped before it changed"), "{message}");
        // The locks restore takes are the only files it may leave.
        let after: Vec<_> = tree(data.path())
            .into_iter()
            .filter(|(name, _)| !name.ends_with(".lock"))
            .collect();
        assert_eq!(after, before, "the data directory changed");
        restore(
            Options {
                whole_cluster: true,
                ..forced(set.path(), data.path())
            },
            &mut Progress::new(true),
        )
        .unwrap();
        assert_eq!(
            fs::read_to_string(data.path().join("default/log/00000000000000000000.log")).unwrap(),
            "restored log"
        );
    }
}
