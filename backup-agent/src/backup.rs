//! Taking a backup into a backup set (see `set` for the layout), in the order that makes the copies
//! fit together:
//!
//! 1. The node is asked for its contexts and a control-DB backup (admin writes a consistent zip
//!    and holds the node's Raft log compaction for its window); a node that does not answer or
//!    refuses the token fails the run here, with the last backup still complete. Then the set is
//!    marked incomplete (its manifest removed) before anything in it changes.
//! 2. The control DB zip is copied in.
//! 3. Each context's Raft log: every log segment file and the Raft state files, replacing the
//!    previous copy whole. Within the hold, none of the listed segments can vanish; if one does
//!    (the hold ran out, or the event store restarted and lost it) the run fails.
//! 4. Each context's snapshot segments, then its event segments: closed segments newer than the
//!    last one copied (closed segments never change, so earlier copies stay valid), and the open
//!    segment, copied again every run. Snapshots go first so that a restored node never holds a
//!    snapshot of events it lacks; the events copied last are the newest the set has.
//! 5. The manifest, with the SHA-256 of every file, written last and atomically.
//!
//! Every file is written under a temp name, fsynced and renamed; the incremental state is saved
//! only after the files it names are durable. A run that dies anywhere leaves a set without a
//! manifest, which `verify` reports as incomplete and the next run completes.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context as _, bail};
use serde::Serialize;

use crate::client::Client;
use crate::files;
use crate::progress::Progress;
use crate::set::{self, FileEntry, KindState, Manifest};

pub struct Options {
    pub server: String,
    pub dest: PathBuf,
    pub contexts: Vec<String>,
    pub token: Option<String>,
    pub tls: crate::client::Tls,
}

/// What a run did, printed with `--json`.
#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    pub server: String,
    pub dest: String,
    /// The control DB zip in the set.
    pub control_db: Option<String>,
    pub contexts: BTreeMap<String, ContextSummary>,
    /// Files copied by this run, and their bytes.
    pub files_copied: usize,
    pub bytes_copied: u64,
    /// Files the set holds now (the manifest's entries).
    pub files_in_set: usize,
    pub duration_millis: u128,
}

#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ContextSummary {
    pub log_files: usize,
    /// By kind (`EVENT`, `SNAPSHOT`).
    pub segments: BTreeMap<String, KindSummary>,
}

#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KindSummary {
    /// Closed segments copied by this run (each with its index and bloom filter).
    pub closed_segments_copied: usize,
    /// Files copied by this run, the open segment included.
    pub files_copied: usize,
    /// Base token of the newest closed segment the set holds, -1 for none.
    pub last_closed_segment: i64,
    /// Base token of the open segment copied.
    pub open_segment: Option<i64>,
}

/// The kinds of segment, in copy order, with the folder the server keeps them in.
const KINDS: [(&str, &str); 2] = [("SNAPSHOT", "snapshots"), ("EVENT", "events")];

struct Run<'a> {
    client: Client,
    dest: PathBuf,
    progress: &'a mut Progress,
    summary: Summary,
    /// The server's data directory, learned from the paths it lists; the set must be outside it.
    data_dirs: BTreeSet<PathBuf>,
}

pub fn run(options: Options, progress: &mut Progress) -> anyhow::Result<Summary> {
    let started = Instant::now();
    std::fs::create_dir_all(&options.dest)
        .with_context(|| format!("creating the backup directory {}", options.dest.display()))?;
    let dest = std::fs::canonicalize(&options.dest)?;
    let _lock = set::lock(&dest)?;
    let client = Client::new(&options.server, options.token, &options.tls)?;
    for context in &options.contexts {
        check_context(context)?;
    }

    let mut state = set::read_state(&dest)?;

    let mut run = Run {
        summary: Summary {
            server: client.server().to_owned(),
            dest: dest.display().to_string(),
            ..Summary::default()
        },
        client,
        dest,
        progress,
        data_dirs: BTreeSet::new(),
    };
    // The node must answer (and accept the token) before anything in the set changes: a
    // misconfigured run leaves the last complete backup complete.
    let on_node = run.client.contexts()?;
    let contexts: Vec<String> = if options.contexts.is_empty() {
        on_node.into_iter().filter(|c| check_context(c).is_ok()).collect()
    } else {
        if let Some(missing) = options.contexts.iter().find(|c| !on_node.contains(c)) {
            bail!("context {missing} is not on the node (it has {})", on_node.join(", "));
        }
        options.contexts.clone()
    };
    run.progress.step("backing up the control DB");
    let zip = PathBuf::from(run.client.create_control_db_backup()?);

    // 1. From here on the set is incomplete until the new manifest is written.
    files::remove_file(&run.dest.join(set::MANIFEST))?;
    files::sync_dir(&run.dest)?;

    // 2. The control DB.
    let control_db = run.control_db(&zip)?;

    // 3. Raft logs.
    let mut logs = BTreeMap::new();
    for context in &contexts {
        run.progress.step(&format!("copying the Raft log of context {context}"));
        logs.insert(context.clone(), run.log(context)?);
    }

    // 4. Snapshot, then event segments.
    let mut open_files: BTreeMap<String, Vec<FileEntry>> = BTreeMap::new();
    for context in &contexts {
        for (kind, folder) in KINDS {
            run.progress.step(&format!(
                "copying the {} segments of context {context}",
                kind.to_lowercase()
            ));
            let kind_state = state
                .contexts
                .entry(context.clone())
                .or_default()
                .segments
                .entry(kind.to_owned())
                .or_default();
            let open = run.segments(context, kind, folder, kind_state)?;
            files::write_file(&run.dest.join(set::STATE), &serde_json::to_vec_pretty(&state)?)?;
            open_files.entry(context.clone()).or_default().extend(open);
        }
    }

    // 5. Forget what this set no longer holds, then write the manifest.
    state.contexts.retain(|name, _| contexts.contains(name));
    files::write_file(&run.dest.join(set::STATE), &serde_json::to_vec_pretty(&state)?)?;
    let mut entries = vec![control_db.clone()];
    for context in &contexts {
        entries.extend(logs.remove(context).unwrap_or_default());
        if let Some(kinds) = state.contexts.get(context) {
            for kind in kinds.segments.values() {
                entries.extend(kind.closed.iter().cloned());
            }
        }
        entries.extend(open_files.remove(context).unwrap_or_default());
    }
    run.remove_stale(&contexts, &entries)?;
    let manifest = Manifest {
        format: set::FORMAT,
        created_at_millis: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        server: run.summary.server.clone(),
        control_db: Some(control_db.path.clone()),
        contexts: contexts.clone(),
        files: entries,
    };
    run.summary.files_in_set = manifest.files.len();
    run.summary.control_db = Some(control_db.path);
    files::write_file(&run.dest.join(set::MANIFEST), &serde_json::to_vec_pretty(&manifest)?)?;
    run.progress.finish();
    run.summary.duration_millis = started.elapsed().as_millis();
    Ok(run.summary)
}

/// Context names become directory names: the event store's rule, and no internal ones.
fn check_context(name: &str) -> anyhow::Result<()> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && !name.starts_with('_')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    if !valid {
        bail!(
            "{name:?} is not a context that can be backed up (1 to 64 of A-Z a-z 0-9 - _ ., not starting with . or _)"
        );
    }
    Ok(())
}

fn file_name(path: &Path) -> anyhow::Result<&str> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("the server listed {}, which has no file name", path.display()))?;
    set::check_file_name(name)?;
    Ok(name)
}

fn parent_name(path: &Path) -> Option<&str> {
    path.parent()?.file_name()?.to_str()
}

/// The base token of a segment file, from its 20-digit name.
fn segment_base(name: &str) -> Option<i64> {
    let (digits, _) = name.split_once('.')?;
    (digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

impl Run<'_> {
    /// Copies one server file into the set at `rel` (a manifest path); a file that vanished is
    /// reported with `vanished`'s explanation.
    fn copy(&mut self, src: &Path, rel: &str, index: usize, total: usize, vanished: &str) -> anyhow::Result<FileEntry> {
        set::check_relative(rel)?;
        let dest = self.dest.join(rel);
        let name = rel.to_owned();
        let mut copied_bytes = 0u64;
        let progress = &mut *self.progress;
        let result = files::copy_file(src, &dest, &mut |n| {
            copied_bytes += n;
            if copied_bytes == n || copied_bytes % (64 << 20) < n {
                progress.file(index, total, &name, copied_bytes);
            }
        });
        let digested = match result {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && std::fs::metadata(src).is_err() => {
                bail!("{} disappeared before it was copied: {vanished}", src.display())
            }
            Err(e) => return Err(e).with_context(|| format!("copying {} to {}", src.display(), dest.display())),
        };
        self.summary.files_copied += 1;
        self.summary.bytes_copied += digested.size;
        Ok(FileEntry {
            path: rel.to_owned(),
            size: digested.size,
            sha256: digested.sha256,
        })
    }

    /// Refuses a set inside the node's data directory: the agent never writes there.
    fn note_data_dir(&mut self, context_dir: &Path) -> anyhow::Result<()> {
        let Some(data) = context_dir.parent() else {
            return Ok(());
        };
        let data = std::fs::canonicalize(data).unwrap_or_else(|_| data.to_owned());
        if self.dest.starts_with(&data) {
            bail!(
                "the backup directory {} is inside the node's data directory {}; choose one outside it",
                self.dest.display(),
                data.display()
            );
        }
        self.data_dirs.insert(data);
        Ok(())
    }

    fn control_db(&mut self, zip: &Path) -> anyhow::Result<FileEntry> {
        let name = file_name(zip)?.to_owned();
        let rel = format!("{}/{name}", set::CONTROL_DB_DIR);
        let entry = self.copy(
            zip,
            &rel,
            1,
            1,
            "the server wrote it on another host? The agent must run on the node's host",
        )?;
        files::sync_dir(&self.dest.join(set::CONTROL_DB_DIR))?;
        files::sync_dir(&self.dest)?;
        Ok(entry)
    }

    /// Replaces the set's copy of a context's Raft log with the files the server lists now.
    fn log(&mut self, context: &str) -> anyhow::Result<Vec<FileEntry>> {
        let listed = self.client.log_files(context)?;
        let mut context_dir: Option<PathBuf> = None;
        let mut plan = Vec::with_capacity(listed.len());
        for path in &listed {
            let path = PathBuf::from(path);
            let name = file_name(&path)?.to_owned();
            let (dir, rel) = if parent_name(&path) == Some("log") {
                let dir = path.parent().and_then(Path::parent).map(Path::to_owned);
                (dir, format!("log/{name}"))
            } else {
                (path.parent().map(Path::to_owned), name)
            };
            let dir = dir.with_context(|| format!("the server listed {}, outside any context", path.display()))?;
            match &context_dir {
                None => context_dir = Some(dir),
                Some(known) if *known == dir => {}
                Some(known) => bail!(
                    "the log listing of {context} names files in two directories: {} and {}",
                    known.display(),
                    dir.display()
                ),
            }
            plan.push((path, set::context_path(context, &rel)));
        }
        if let Some(dir) = &context_dir {
            self.note_data_dir(dir)?;
        }
        let mut entries = Vec::with_capacity(plan.len());
        let total = plan.len();
        for (i, (path, rel)) in plan.into_iter().enumerate() {
            entries.push(self.copy(
                &path,
                &rel,
                i + 1,
                total,
                "the log-hold window ran out, or the event store restarted, during the backup; run it again \
                 (and if it keeps happening, raise myelin.backup.log-hold-minutes)",
            )?);
        }
        // Whole replacement: what the server no longer has goes from the copy too.
        let keep: BTreeSet<String> = entries.iter().map(|e| e.path.clone()).collect();
        let ctx_dir = set::context_dir(&self.dest, context);
        for sub in ["log", ""] {
            let dir = if sub.is_empty() {
                ctx_dir.clone()
            } else {
                ctx_dir.join(sub)
            };
            let prefix = if sub.is_empty() {
                set::context_path(context, "")
            } else {
                set::context_path(context, "log/")
            };
            remove_unlisted_files(&dir, &prefix, &keep)?;
        }
        self.summary.contexts.entry(context.to_owned()).or_default().log_files = entries.len();
        Ok(entries)
    }

    /// Copies the closed segments the set lacks and the open segment; records the closed ones in
    /// `kind_state` (saved by the caller once they are durable) and returns the open segment's
    /// entries.
    fn segments(
        &mut self,
        context: &str,
        kind: &str,
        folder: &str,
        kind_state: &mut KindState,
    ) -> anyhow::Result<Vec<FileEntry>> {
        let listed = self.client.segment_files(context, kind, kind_state.last_closed)?;
        if listed.last_closed_segment < kind_state.last_closed {
            bail!(
                "the server's newest closed {kind} segment of context {context} starts at token {}, before the \
                 one this backup set already holds ({}): the set belongs to another (or a restored) event store; \
                 back up into a new directory",
                listed.last_closed_segment,
                kind_state.last_closed
            );
        }
        let mut plan = Vec::with_capacity(listed.filenames.len());
        for path in &listed.filenames {
            let path = PathBuf::from(path);
            let name = file_name(&path)?.to_owned();
            if parent_name(&path) != Some(folder) {
                bail!(
                    "the server listed {} as a {kind} segment file, outside a {folder} folder",
                    path.display()
                );
            }
            let base = segment_base(&name)
                .with_context(|| format!("the server listed {}, which is not a segment file", path.display()))?;
            if let Some(dir) = path.parent().and_then(Path::parent) {
                self.note_data_dir(dir)?;
            }
            let closed = base <= listed.last_closed_segment;
            plan.push((
                path,
                set::context_path(context, &format!("{folder}/{name}")),
                base,
                closed,
            ));
        }
        let total = plan.len();
        let mut open = Vec::new();
        let mut closed_bases = BTreeSet::new();
        let mut closed: BTreeMap<String, FileEntry> = std::mem::take(&mut kind_state.closed)
            .into_iter()
            .map(|e| (e.path.clone(), e))
            .collect();
        let mut summary = KindSummary {
            last_closed_segment: listed.last_closed_segment,
            ..KindSummary::default()
        };
        for (i, (path, rel, base, is_closed)) in plan.into_iter().enumerate() {
            let entry = self.copy(
                &path,
                &rel,
                i + 1,
                total,
                "segments are never deleted while their context exists; was the context deleted?",
            )?;
            summary.files_copied += 1;
            if is_closed {
                closed_bases.insert(base);
                closed.insert(entry.path.clone(), entry);
            } else {
                summary.open_segment = Some(base);
                open.push(entry);
            }
        }
        summary.closed_segments_copied = closed_bases.len();
        let dir = set::context_dir(&self.dest, context).join(folder);
        if dir.is_dir() {
            files::sync_dir(&dir)?;
        }
        kind_state.last_closed = kind_state.last_closed.max(listed.last_closed_segment);
        kind_state.closed = closed.into_values().collect();
        // An earlier run's copy of a then-open segment that this run did not list again is stale.
        let keep: BTreeSet<String> = kind_state.closed.iter().chain(&open).map(|e| e.path.clone()).collect();
        remove_unlisted_files(&dir, &set::context_path(context, &format!("{folder}/")), &keep)?;
        self.summary
            .contexts
            .entry(context.to_owned())
            .or_default()
            .segments
            .insert(kind.to_owned(), summary);
        Ok(open)
    }

    /// Removes contexts not in this backup, control DB zips other than the current one, and temp
    /// files of interrupted runs.
    fn remove_stale(&mut self, contexts: &[String], entries: &[FileEntry]) -> anyhow::Result<()> {
        let keep: BTreeSet<String> = entries.iter().map(|e| e.path.clone()).collect();
        remove_unlisted_files(
            &self.dest.join(set::CONTROL_DB_DIR),
            &format!("{}/", set::CONTROL_DB_DIR),
            &keep,
        )?;
        let contexts_dir = self.dest.join(set::CONTEXTS_DIR);
        if let Ok(dir) = std::fs::read_dir(&contexts_dir) {
            for entry in dir {
                let entry = entry?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if !contexts.contains(&name) {
                    self.progress
                        .step(&format!("removing context {name}, no longer in this backup"));
                    std::fs::remove_dir_all(entry.path())
                        .with_context(|| format!("removing {}", entry.path().display()))?;
                }
            }
            files::sync_dir(&contexts_dir)?;
        }
        for entry in std::fs::read_dir(&self.dest)? {
            let entry = entry?;
            if files::is_temp_name(&entry.file_name().to_string_lossy()) {
                files::remove_file(&entry.path())?;
            }
        }
        Ok(())
    }
}

/// Removes the files of `dir` (not its sub-folders) whose manifest path (`prefix` + name) is not
/// in `keep`, temp files included; then syncs the directory.
fn remove_unlisted_files(dir: &Path, prefix: &str, keep: &BTreeSet<String>) -> anyhow::Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    let mut removed = false;
    for entry in entries {
        let entry = entry?;
        if !entry.file_type()?.is_file() {
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        if !keep.contains(&format!("{prefix}{name}")) {
            files::remove_file(&entry.path())?;
            removed = true;
        }
    }
    if removed {
        files::sync_dir(dir)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_names_and_contexts() {
        assert_eq!(segment_base("00000000000000000042.events"), Some(42));
        assert_eq!(segment_base("00000000000000000042.sindex"), Some(42));
        assert_eq!(segment_base("42.events"), None);
        assert_eq!(segment_base("vote"), None);
        check_context("default").unwrap();
        for bad in ["", "_admin", "../x", ".x", "a/b"] {
            assert!(check_context(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn unlisted_files_go_and_folders_stay() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("keep"), b"1").unwrap();
        std::fs::write(dir.path().join("drop"), b"1").unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let keep = BTreeSet::from(["p/keep".to_owned()]);
        remove_unlisted_files(dir.path(), "p/", &keep).unwrap();
        assert!(dir.path().join("keep").exists());
        assert!(!dir.path().join("drop").exists());
        assert!(dir.path().join("sub").is_dir());
        remove_unlisted_files(&dir.path().join("missing"), "p/", &keep).unwrap();
    }
}
