//! What a backup needs from the eventstore: the list of files it may copy, and a hold that keeps
//! log compaction from deleting Raft log segments while it copies them.
//!
//! A backup copies, in this order, the control DB (admin), then each context's Raft log, then its
//! snapshot and event segments (docs/backups.md). What makes the copies safe to take from a running
//! node:
//! - **Closed segments never change.** A segment is listed as closed only after its data was
//!   fsynced and its index and bloom filter were written durably (see `SegmentStore::roll`), so a
//!   closed segment copied once never needs copying again.
//! - **The open segment and the last log segment only grow.** A copy taken while they grow is a
//!   prefix of whole records plus at most one partial record, which recovery cuts off (records
//!   are length- and CRC-framed).
//! - **No log segment is deleted while a hold is on.** Admin sets the hold when it backs up the
//!   control DB; until it ends, log compaction still advances the purge point (openraft's view of
//!   the log) but defers deleting files, so every listed log segment stays on disk for the copy.
//!   A purge that arrives during the hold deletes its files once the hold ends.
//!
//! The hold is also written (fsynced) to `log-hold-until` in the data directory before admin is
//! told it is on, and an eventstore that restarts takes it up again before it opens any context,
//! so a restart within the window does not delete log segments a backup still has to copy.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, SystemTime};

use myelin_proto::errors::ErrorCode;
use myelin_proto::internal::{ListLogSegmentsResponse, ListSegmentsResponse, SegmentFile};
use parking_lot::Mutex;

use crate::context::{Context, Contexts};
use crate::segment::store::SegmentFiles;

/// The longest hold a request may ask for: a hold keeps the whole Raft log on disk, so an absurd
/// value (a bug or a typo in an operator's setting) must not keep it forever.
pub const MAX_HOLD: Duration = Duration::from_secs(24 * 60 * 60);

/// Files of a context's Raft state that a restore needs beside the log segments, in the order a
/// backup must copy them, relative to the context directory. `log/purged` comes before
/// `snapshot.json` because a purge always follows the snapshot that covers it: copied in this
/// order, the snapshot pointer restored is never older than the purge point restored.
/// `member.json` is who this node is in the group: without it a restored context would open as
/// a new member 1, which the log's membership (say, member 501 since the context was created
/// through `_admin`) does not count, and never elect a leader.
pub const RAFT_STATE_FILES: [&str; 5] = [
    "member.json",
    "log/vote",
    "log/purged",
    "raft-state.json",
    "snapshot.json",
];

/// A node-wide hold on deleting Raft log segments.
#[derive(Debug, Default)]
pub struct CompactionHold {
    until: Mutex<Option<SystemTime>>,
}

impl CompactionHold {
    /// Holds deletions until `until`. A hold is only ever extended, never shortened: two
    /// overlapping backups each keep the protection they asked for.
    pub fn hold_until(&self, until: SystemTime) {
        let mut current = self.until.lock();
        if current.is_none_or(|c| c < until) {
            *current = Some(until);
        }
    }

    /// The end of the hold, if one is on now.
    pub fn held_until(&self) -> Option<SystemTime> {
        let current = *self.until.lock();
        current.filter(|until| *until > SystemTime::now())
    }

    /// Runs `delete` unless a hold is on, in which case it returns the hold's end. The hold's lock
    /// is kept while `delete` runs, so once `hold_until` has returned no deletion is still under
    /// way: every file a backup lists after setting the hold stays until the hold ends.
    pub fn unless_held<T>(&self, delete: impl FnOnce() -> T) -> Result<T, SystemTime> {
        let current = self.until.lock();
        match *current {
            Some(until) if until > SystemTime::now() => Err(until),
            _ => Ok(delete()),
        }
    }
}

/// The hold of this process, shared by every context's Raft log.
pub fn node_hold() -> &'static Arc<CompactionHold> {
    static HOLD: LazyLock<Arc<CompactionHold>> = LazyLock::new(Default::default);
    &HOLD
}

/// Why a hold request is refused.
#[derive(Debug, thiserror::Error)]
pub enum HoldError {
    #[error("hold until {0} ms after the epoch is more than {max} hours ahead", max = MAX_HOLD.as_secs() / 3600)]
    TooLong(i64),
}

/// Sets the node's hold until `until_unix_millis`; a time in the past changes nothing.
pub fn hold_log_compaction(hold: &CompactionHold, until_unix_millis: i64) -> Result<Option<SystemTime>, HoldError> {
    let now = SystemTime::now();
    let Ok(millis) = u64::try_from(until_unix_millis) else {
        return Ok(hold.held_until());
    };
    let until = SystemTime::UNIX_EPOCH + Duration::from_millis(millis);
    if until > now + MAX_HOLD {
        return Err(HoldError::TooLong(until_unix_millis));
    }
    hold.hold_until(until);
    Ok(hold.held_until())
}

/// File in the data directory that keeps the hold across restarts: its end, in milliseconds
/// since the epoch.
pub const HOLD_FILE: &str = "log-hold-until";

/// Writes the hold's end durably (temp file, fsync, rename, fsync of the directory).
pub fn persist_hold(data_dir: &Path, until: SystemTime) -> io::Result<()> {
    use std::io::Write as _;
    let millis = until
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    let temp = data_dir.join(format!("{HOLD_FILE}.tmp"));
    let mut file = std::fs::File::create(&temp)?;
    file.write_all(millis.to_string().as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&temp, data_dir.join(HOLD_FILE))?;
    std::fs::File::open(data_dir)?.sync_all()
}

/// Takes up a hold written by an earlier run, if it has not ended (and is not absurdly far off).
pub fn restore_hold(data_dir: &Path, hold: &CompactionHold) {
    let Ok(text) = std::fs::read_to_string(data_dir.join(HOLD_FILE)) else {
        return;
    };
    match text
        .trim()
        .parse::<i64>()
        .map(|millis| hold_log_compaction(hold, millis))
    {
        Ok(Ok(Some(until))) => tracing::info!(?until, "log compaction hold taken up from the last run"),
        Ok(Ok(None)) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "ignoring the stored log compaction hold"),
        Err(e) => tracing::warn!(error = %e, "ignoring an unreadable {HOLD_FILE}"),
    }
}

/// The open context named `name`, or NOT_FOUND (AXONIQ-1302).
pub fn find_context(contexts: &Contexts, name: &str) -> Result<Arc<Context>, tonic::Status> {
    contexts
        .get(name)
        .ok_or_else(|| ErrorCode::ContextNotFound.status(format!("context {name} is not stored on this node")))
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_owned())
}

fn segment_file(files: SegmentFiles) -> SegmentFile {
    SegmentFile {
        base: files.base,
        paths: files.paths.iter().map(|p| absolute(p).display().to_string()).collect(),
        closed: files.closed,
    }
}

/// Closed segments with a base token above `last_backed_up`, oldest first, then the open
/// segment; and the base of the newest closed segment (-1 when none).
pub fn list_segments(files: Vec<SegmentFiles>, last_backed_up: i64) -> ListSegmentsResponse {
    let last_closed_segment = files.iter().filter(|f| f.closed).map(|f| f.base).max().unwrap_or(-1);
    let segments = files
        .into_iter()
        .filter(|f| !f.closed || f.base > last_backed_up)
        .map(segment_file)
        .collect();
    ListSegmentsResponse {
        segments,
        last_closed_segment,
    }
}

/// Every Raft log segment file of a context, oldest first (the last one is still appended to),
/// then the Raft state files that exist (see [`RAFT_STATE_FILES`]).
///
/// Segments are listed from the directory, not from the log's own view: during a hold, segments
/// the log has already purged are still on disk, and copying them does no harm (recovery of a
/// restored log deletes the ones its purge point covers).
pub fn list_log_segments(context_dir: &Path) -> io::Result<ListLogSegmentsResponse> {
    let dir = absolute(context_dir);
    let log_dir = dir.join("log");
    let mut firsts = Vec::new();
    for entry in std::fs::read_dir(&log_dir)? {
        let name = entry?.file_name();
        if let Some(first) = name.to_str().and_then(crate::consensus::log_store::parse_segment_name) {
            firsts.push(first);
        }
    }
    firsts.sort_unstable();
    let count = firsts.len();
    let segments = firsts
        .into_iter()
        .enumerate()
        .map(|(i, first)| SegmentFile {
            base: first as i64,
            paths: vec![
                crate::consensus::log_store::segment_path(&log_dir, first)
                    .display()
                    .to_string(),
            ],
            closed: i + 1 < count,
        })
        .collect();
    let state_files = RAFT_STATE_FILES
        .iter()
        .map(|name| dir.join(name))
        .filter(|path| path.is_file())
        .map(|path| path.display().to_string())
        .collect();
    Ok(ListLogSegmentsResponse { segments, state_files })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hold_survives_a_restart_through_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let until = SystemTime::now() + Duration::from_secs(600);
        persist_hold(dir.path(), until).unwrap();
        let restarted = CompactionHold::default();
        restore_hold(dir.path(), &restarted);
        let held = restarted.held_until().expect("hold taken up");
        assert!(held.duration_since(until).unwrap_or_else(|e| e.duration()) < Duration::from_millis(1));
        // An ended hold is not taken up, and a missing or garbled file changes nothing.
        persist_hold(dir.path(), SystemTime::now() - Duration::from_secs(1)).unwrap();
        let fresh = CompactionHold::default();
        restore_hold(dir.path(), &fresh);
        assert_eq!(fresh.held_until(), None);
        std::fs::write(dir.path().join(HOLD_FILE), "soon").unwrap();
        restore_hold(dir.path(), &fresh);
        assert_eq!(fresh.held_until(), None);
    }

    #[test]
    fn a_hold_is_only_extended_and_ends_by_itself() {
        let hold = CompactionHold::default();
        assert_eq!(hold.unless_held(|| 1), Ok(1));
        let later = SystemTime::now() + Duration::from_secs(60);
        hold.hold_until(later);
        assert_eq!(hold.unless_held(|| 1), Err(later));
        hold.hold_until(SystemTime::now() + Duration::from_secs(1));
        assert_eq!(hold.held_until(), Some(later), "a shorter hold never shortens one");
        let past = CompactionHold::default();
        past.hold_until(SystemTime::now() - Duration::from_secs(1));
        assert_eq!(past.held_until(), None);
        assert_eq!(past.unless_held(|| 2), Ok(2));
    }

    #[test]
    fn hold_requests_are_bounded() {
        let hold = CompactionHold::default();
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        assert!(hold_log_compaction(&hold, now + 2 * MAX_HOLD.as_millis() as i64).is_err());
        assert!(hold.held_until().is_none());
        assert_eq!(hold_log_compaction(&hold, -5).unwrap(), None);
        assert!(hold_log_compaction(&hold, now + 60_000).unwrap().is_some());
    }

    #[test]
    fn segment_listing_skips_what_was_backed_up() {
        let file = |base: i64, closed: bool| SegmentFiles {
            base,
            paths: vec![PathBuf::from(format!("/d/{base:020}.events"))],
            closed,
        };
        let all = vec![file(0, true), file(10, true), file(25, true), file(40, false)];
        let listed = list_segments(all.clone(), 10);
        assert_eq!(listed.last_closed_segment, 25);
        let bases: Vec<(i64, bool)> = listed.segments.iter().map(|s| (s.base, s.closed)).collect();
        assert_eq!(bases, vec![(25, true), (40, false)]);
        let listed = list_segments(all, -1);
        assert_eq!(listed.segments.len(), 4);
        let fresh = list_segments(vec![file(0, false)], -1);
        assert_eq!(fresh.last_closed_segment, -1);
        assert_eq!(fresh.segments.len(), 1);
    }
}
