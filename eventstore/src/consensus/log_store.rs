//! The Raft log of one context, in segment files under the context's `log/` directory.
//!
//! # What this layer guarantees
//!
//! - **No holes.** The log is one contiguous range of indexes, starting right after the purged
//!   id. `append` refuses an entry whose index is not the next one (entries at or below the purged
//!   id are already covered by a snapshot and are dropped); recovery refuses segments that do not
//!   follow each other index by index, or that start after where the last purge left the log.
//!   A log that never purged starts at its first entry, normally index 0.
//! - **Readable when `append` returns.** An appended entry is in the in-memory index (and in the
//!   cache of recent entries) before `append` returns, so replication can read it while it is still
//!   on its way to disk.
//! - **Durable before the flush callback.** `LogFlushed::log_io_completed(Ok(()))` is called only
//!   after the entry's bytes were `fdatasync`ed, and after the directory was `fsync`ed when the
//!   entry opened a new segment file. `save_vote`, `truncate` and `purge` are durable when they
//!   return.
//! - **All writes in order.** Every write — appends, vote, truncate, purge, committed — goes
//!   through one queue to one writer thread, so a later write never overtakes an earlier one (the
//!   ordering rule of `RaftLogStorage`), and no fsync ever runs on an async runtime worker.
//! - **Group commit.** The writer drains every request queued so far, writes the appends among
//!   them, issues one `fdatasync` per touched segment, then fires their callbacks in order. Under
//!   load, many appends share one fsync.
//! - **An IO error is fatal** (STYLE 3). After a failed write or fsync the writer answers every
//!   pending and later request with an error and never touches the files again; in particular it
//!   never retries an fsync, whose failure may have dropped dirty pages the kernel will not write
//!   again. The replica must restart and recover from what is on disk.
//! - **Corruption is never served.** Every record carries a CRC32 that is checked on every read,
//!   from disk and at recovery.
//!
//! # On disk
//!
//! ```text
//! log/
//!   00000000000000000000.log   segment: entries from index 0 on (name = first index, 20 digits)
//!   00000000000000000042.log   the last segment is the only one appended to
//!   vote                       JSON of openraft's Vote; written to vote.tmp, fsynced, renamed
//!   purged                     JSON {"purged": LogId, "first": index the log then started at};
//!                              same atomic, durable write
//!   committed                  JSON of the last committed LogId; atomic rename, no fsync
//!
//! segment   = header record*
//! header    = "MYLNRLOG" (8 bytes) | format version u32 LE (= 1)
//! record    = body length u32 LE | CRC32 of body u32 LE | body
//! body      = index u64 LE | term u64 LE | leader node id u64 LE | tag u8 | payload
//! tag       = 0 blank (no payload) | 1 normal (`Command::encode`) | 2 membership (serde_json)
//! ```
//!
//! A segment grows until the next record would make it larger than `segment_size`; a record larger
//! than that still goes into a segment of its own.
//!
//! The writer reserves the active segment's space ahead of its records, `PREALLOCATE` bytes at a
//! time (`fallocate`, which also sets the file size): an `fdatasync` of a write that does not
//! change the file's size need not commit the file system's journal, which on ext4 makes the
//! per-commit fsync markedly cheaper. So a segment may end in zeros: the reserved space not used
//! yet, or not given back (the writer trims a segment to its records when the next one starts,
//! and recovery trims any segment). Zeros from the end of the last record to the end of the file
//! are therefore a clean end, in any segment, never damage.
//!
//! # Recovery (`LogStore::open`)
//!
//! Segments are scanned in index order and every record is checksummed. A damaged record at the end
//! of the **last** segment is a torn write of an append that was never acknowledged: it and
//! everything after it are cut off (with a warning naming file and offset). Damage anywhere else —
//! in a segment that is not the last, or a damaged record followed by a valid record of the next
//! index — is corruption of acknowledged data and `open` refuses, naming file and offset. The latter
//! rule errs on the side of refusing: a crash in the middle of a multi-page group write whose pages
//! reached the disk out of order also looks like this, and needs an operator (or a wipe and
//! re-replication), but acknowledged entries are never silently dropped.
//!
//! Nothing is modified on disk before every check has passed.

// openraft's `StorageError` (224 bytes) is what every storage method returns; helpers return it
// too rather than converting at each call.
#![allow(clippy::result_large_err)]

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Debug;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::ops::{Bound, RangeBounds};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use bytes::{BufMut, Bytes};
use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{
    AnyError, BasicNode, CommittedLeaderId, EntryPayload, ErrorSubject, ErrorVerb, LogState, Membership, OptionalSend,
    RaftLogReader, StorageIOError, Vote,
};
use parking_lot::RwLock;
use tokio::sync::{mpsc, oneshot};

use super::{Entry, LogId, NodeId, StorageError, TypeConfig};
use crate::backup::CompactionHold;
use crate::command::Command;

const MAGIC: &[u8; 8] = b"MYLNRLOG";
const FORMAT_VERSION: u32 = 1;
const HEADER_LEN: u64 = 12;
/// Body length and CRC in front of every body.
const RECORD_HEADER_LEN: usize = 8;
/// index, term, leader node id, payload tag.
const BODY_FIXED_LEN: usize = 25;

const TAG_BLANK: u8 = 0;
const TAG_NORMAL: u8 = 1;
const TAG_MEMBERSHIP: u8 = 2;

const VOTE_FILE: &str = "vote";
const PURGED_FILE: &str = "purged";
const COMMITTED_FILE: &str = "committed";

/// Requests queued to the writer. Bounded, so a writer that falls behind slows `append` down
/// instead of growing memory.
const WRITE_QUEUE: usize = 1024;
/// A disk read of contiguous records is split into reads of at most this many bytes.
const MAX_READ_SPAN: u64 = 4 * 1024 * 1024;
/// What a cached entry costs besides its encoded size (the `Entry` value, queue slot).
const CACHE_ENTRY_OVERHEAD: u64 = 64;

/// The `purged` file: the last purged id and the first index the log kept, so that recovery can
/// tell a missing segment from entries that were never there.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
struct PurgedFile {
    purged: LogId,
    first: u64,
}

/// Tuning of a [`LogStore`].
#[derive(Debug, Clone)]
pub struct LogStoreOptions {
    /// Largest size of a segment file in bytes. A record larger than this gets a segment of its own.
    pub segment_size: u64,
    /// Byte budget of the cache of recently appended entries. Entries not yet fsynced are always
    /// kept, whatever the budget; the oldest flushed entries are evicted first.
    pub cache_bytes: u64,
    /// While this hold is on, a purge deletes no segment file (a backup is copying them); the
    /// deletions wait until it ends. The eventstore passes the node's hold (`backup::node_hold`).
    pub hold: Arc<CompactionHold>,
}

impl Default for LogStoreOptions {
    fn default() -> Self {
        LogStoreOptions {
            segment_size: 64 * 1024 * 1024,
            cache_bytes: 64 * 1024 * 1024,
            hold: Arc::default(),
        }
    }
}

/// Where an entry lives on disk: in the segment with the greatest first index `<=` its index.
#[derive(Debug, Clone, Copy)]
struct Loc {
    leader: CommittedLeaderId<NodeId>,
    offset: u64,
    len: u32,
}

/// The in-memory view shared by the store, its readers and the writer thread.
struct LogIndex {
    purged: Option<LogId>,
    /// Index of `locs[0]`: `purged + 1`, or 0 when nothing was purged.
    first: u64,
    locs: VecDeque<Loc>,
    /// Segments whose file exists, by first index. Only the writer adds and removes files here.
    segments: BTreeMap<u64, Arc<File>>,
    /// Recently appended entries: always a suffix of the log, `cache_first ..= last`.
    /// Invariant: every entry not yet fsynced is here.
    cache: VecDeque<(Entry, u64)>,
    cache_first: u64,
    cache_bytes: u64,
}

impl LogIndex {
    fn next(&self) -> u64 {
        self.first + self.locs.len() as u64
    }

    fn loc(&self, index: u64) -> Option<&Loc> {
        index.checked_sub(self.first).and_then(|i| self.locs.get(i as usize))
    }

    fn last_log_id(&self) -> Option<LogId> {
        match self.locs.back() {
            Some(loc) => Some(LogId::new(loc.leader, self.next() - 1)),
            None => self.purged,
        }
    }

    fn truncate_cache(&mut self, index: u64) {
        if index <= self.cache_first {
            self.cache.clear();
            self.cache_bytes = 0;
            self.cache_first = index;
        } else {
            let keep = (index - self.cache_first) as usize;
            while self.cache.len() > keep {
                if let Some((_, cost)) = self.cache.pop_back() {
                    self.cache_bytes -= cost;
                }
            }
        }
    }

    /// Evicts the oldest cached entries while over `budget`, but never one not yet fsynced.
    fn evict(&mut self, budget: u64, flushed_next: u64) {
        while self.cache_bytes > budget && self.cache_first < flushed_next {
            let Some((_, cost)) = self.cache.pop_front() else {
                break;
            };
            self.cache_bytes -= cost;
            self.cache_first += 1;
        }
    }

    /// Drops cached entries below `index`.
    fn drop_cache_before(&mut self, index: u64) {
        while self.cache_first < index {
            match self.cache.pop_front() {
                Some((_, cost)) => self.cache_bytes -= cost,
                None => {
                    self.cache_first = index;
                    return;
                }
            }
            self.cache_first += 1;
        }
    }
}

struct Shared {
    state: RwLock<LogIndex>,
    /// Entries with an index below this are fsynced; only those may leave the cache.
    flushed_next: AtomicU64,
    fsyncs: AtomicU64,
    cache_budget: u64,
    /// The first fatal IO error; once set, every write is refused.
    failed: OnceLock<String>,
    /// The newest committed id openraft reported and the writer has not written yet. Left here
    /// rather than sent to the writer: a message per commit woke the writer thread once more per
    /// append, for a file that is only a start-up hint (see `Writer::save_unsaved_committed`).
    unsaved_committed: parking_lot::Mutex<Option<Option<LogId>>>,
    #[cfg(test)]
    fail_next_sync: std::sync::atomic::AtomicBool,
}

impl Shared {
    fn refused(&self) -> Option<io::Error> {
        self.failed
            .get()
            .map(|e| io::Error::other(format!("raft log refuses writes after an earlier IO error: {e}")))
    }
}

type FlushCallback = Box<dyn FnOnce(io::Result<()>) + Send>;

struct SegmentWrite {
    segment: u64,
    /// The file is new: create it (the bytes start with the segment header).
    create: bool,
    offset: u64,
    bytes: Vec<u8>,
}

enum Request {
    Append {
        writes: Vec<SegmentWrite>,
        /// Index of the last entry in `writes`, if any.
        last_index: Option<u64>,
        done: FlushCallback,
    },
    Truncate {
        index: u64,
        /// Segment to cut and its new length; `None` when the cut falls on a segment boundary.
        cut: Option<(u64, u64)>,
        /// Segments to delete, all after the cut.
        remove: Vec<u64>,
        done: oneshot::Sender<io::Result<()>>,
    },
    Purge {
        purged: PurgedFile,
        remove: Vec<u64>,
        done: oneshot::Sender<io::Result<()>>,
    },
    SaveVote {
        vote: Vote<NodeId>,
        done: oneshot::Sender<io::Result<()>>,
    },
    /// The compaction hold may have ended: delete the segments purges left behind.
    ReleaseHeld,
    /// Test hook: the writer blocks until the sender is dropped or sends.
    #[cfg(test)]
    Pause(std::sync::mpsc::Receiver<()>),
}

/// An append encoded and laid out, not yet visible or queued.
struct PreparedAppend {
    writes: Vec<SegmentWrite>,
    /// Each entry with its location and cache cost.
    entries: Vec<(Entry, Loc, u64)>,
    last_index: Option<u64>,
}

/// The Raft log of one context. See the module docs for the guarantees.
pub struct LogStore {
    shared: Arc<Shared>,
    tx: mpsc::Sender<Request>,
    /// Joined on drop, so that everything queued (the deferred committed id included) is on
    /// disk before another `open` of the same directory.
    writer: Option<std::thread::JoinHandle<()>>,
    options: LogStoreOptions,
    /// First indexes of all segments, including ones queued for creation but not created yet.
    layout: Vec<u64>,
    /// Size of the last segment in `layout` once the queued writes land.
    active_size: u64,
    vote: Option<Vote<NodeId>>,
    committed: Option<LogId>,
}

/// A cheap, cloneable reader of a [`LogStore`], for openraft's replication tasks.
#[derive(Clone)]
pub struct LogReader {
    shared: Arc<Shared>,
}

impl LogStore {
    /// Opens (or creates) the log in `dir`, recovering from a crash as the module docs describe,
    /// and starts the writer thread.
    ///
    /// Blocking: it reads every segment and may truncate and fsync. Call it before the runtime
    /// starts or from `tokio::task::spawn_blocking`. Corruption that recovery must not repair is an
    /// `InvalidData` error naming the file and offset.
    pub fn open(dir: &Path, options: LogStoreOptions) -> Result<LogStore, io::Error> {
        fs::create_dir_all(dir)?;
        let recovered = recover(dir)?;
        let Recovered {
            vote,
            committed,
            purged,
            segments,
        } = recovered;

        let mut index = LogIndex {
            purged,
            first: purged.map_or(0, |p| p.index + 1),
            locs: VecDeque::new(),
            segments: BTreeMap::new(),
            cache: VecDeque::new(),
            cache_first: 0,
            cache_bytes: 0,
        };
        let mut files = BTreeMap::new();
        let mut layout = Vec::new();
        let mut active_size = 0;
        for segment in segments {
            let file = Arc::new(
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(segment_path(dir, segment.first))?,
            );
            for (i, loc) in segment.locs.into_iter().enumerate() {
                if segment.first + i as u64 >= index.first {
                    index.locs.push_back(loc);
                }
            }
            files.insert(segment.first, file.clone());
            index.segments.insert(segment.first, file);
            layout.push(segment.first);
            active_size = segment.size;
        }
        // A log may start after the purged id (see `PurgedFile`), or anywhere if it never purged.
        if let Some(segment) = index.segments.keys().next() {
            index.first = index.first.max(*segment);
        }
        index.cache_first = index.next();

        let shared = Arc::new(Shared {
            flushed_next: AtomicU64::new(index.next()),
            state: RwLock::new(index),
            fsyncs: AtomicU64::new(0),
            cache_budget: options.cache_bytes,
            failed: OnceLock::new(),
            unsaved_committed: parking_lot::Mutex::new(None),
            #[cfg(test)]
            fail_next_sync: std::sync::atomic::AtomicBool::new(false),
        });
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        let writer = Writer {
            shared: shared.clone(),
            dir: dir.to_path_buf(),
            dir_handle: File::open(dir)?,
            files,
            segment_size: options.segment_size,
            active: None,
            committed_saved_at: std::time::Instant::now(),
            hold: options.hold.clone(),
            held: Vec::new(),
            release_scheduled: false,
            requests: tx.downgrade(),
        };
        let writer = std::thread::Builder::new()
            .name("raft-log-writer".into())
            .spawn(move || writer.run(rx))?;

        Ok(LogStore {
            shared,
            tx,
            writer: Some(writer),
            options,
            layout,
            active_size,
            vote,
            committed,
        })
    }

    /// Number of fsyncs (data and directory) this store has issued since it was opened.
    pub fn fsync_count(&self) -> u64 {
        self.shared.fsyncs.load(Ordering::Relaxed)
    }

    /// A reader sharing this store's index and cache.
    pub fn reader(&self) -> LogReader {
        LogReader {
            shared: self.shared.clone(),
        }
    }

    fn check_writable(&self) -> Result<(), StorageError> {
        match self.shared.refused() {
            Some(e) => Err(write_error(e)),
            None => Ok(()),
        }
    }

    async fn send(&self, request: Request) -> Result<(), StorageError> {
        self.tx
            .send(request)
            .await
            .map_err(|_| write_error("raft log writer thread is gone"))
    }

    async fn call(&self, request: Request, reply: oneshot::Receiver<io::Result<()>>) -> Result<(), StorageError> {
        self.send(request).await?;
        match reply.await {
            Ok(result) => result.map_err(write_error),
            Err(_) => Err(write_error("raft log writer thread is gone")),
        }
    }

    /// `append` with any completion callback: the trait's `LogFlushed` cannot be built outside
    /// openraft, and the tests need to watch completions.
    async fn append_with<I>(&mut self, entries: I, done: FlushCallback) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry>,
    {
        self.check_writable()?;
        let layout_before = (self.layout.len(), self.active_size);
        let prepared = self.prepare_append(entries);
        if prepared.is_err() {
            // Nothing was queued: forget the segments this append would have opened.
            self.layout.truncate(layout_before.0);
            self.active_size = layout_before.1;
        }
        let PreparedAppend {
            writes,
            entries: new_entries,
            last_index,
        } = prepared?;

        {
            let mut state = self.shared.state.write();
            if state.locs.is_empty()
                && let Some((entry, _, _)) = new_entries.first()
            {
                // An empty log starts with this entry: right after the purged id (checked by
                // `prepare_append`), or anywhere if it never purged.
                state.first = entry.log_id.index;
                state.cache_first = entry.log_id.index;
            }
            for (entry, loc, cost) in new_entries {
                state.locs.push_back(loc);
                state.cache.push_back((entry, cost));
                state.cache_bytes += cost;
            }
            let flushed_next = self.shared.flushed_next.load(Ordering::Acquire);
            state.evict(self.shared.cache_budget, flushed_next);
        }

        self.send(Request::Append {
            writes,
            last_index,
            done,
        })
        .await
    }

    /// Encodes `entries` and lays them out in segments (updating `layout` and `active_size`).
    fn prepare_append<I>(&mut self, entries: I) -> Result<PreparedAppend, StorageError>
    where
        I: IntoIterator<Item = Entry>,
    {
        // An empty log that never purged anything starts wherever its first entry says
        // (openraft's own suite starts at 1); otherwise the next entry must follow the last.
        let mut next = {
            let state = self.shared.state.read();
            (!state.locs.is_empty() || state.purged.is_some()).then(|| state.next())
        };
        let mut writes: Vec<SegmentWrite> = Vec::new();
        let mut new_entries = Vec::new();
        let mut last_index = None;

        let purged = self.shared.state.read().purged.map(|p| p.index);
        for entry in entries {
            let index = entry.log_id.index;
            if purged.is_some_and(|p| index <= p) {
                continue;
            }
            if next.is_some_and(|next| next != index) {
                return Err(StorageIOError::write_log_entry(
                    entry.log_id,
                    AnyError::error(format!(
                        "append would leave a hole or overlap: expected index {}, got {index}",
                        next.unwrap_or_default()
                    )),
                )
                .into());
            }
            let mut record = Vec::new();
            encode_record(&entry, &mut record)
                .map_err(|e| StorageError::from(StorageIOError::write_log_entry(entry.log_id, AnyError::error(e))))?;
            let len = record.len() as u64;

            let start_new = self.layout.is_empty()
                || (self.active_size > HEADER_LEN && self.active_size + len > self.options.segment_size);
            if start_new {
                let mut bytes = Vec::with_capacity(HEADER_LEN as usize + record.len());
                bytes.extend_from_slice(MAGIC);
                bytes.put_u32_le(FORMAT_VERSION);
                writes.push(SegmentWrite {
                    segment: index,
                    create: true,
                    offset: 0,
                    bytes,
                });
                self.layout.push(index);
                self.active_size = HEADER_LEN;
            }
            let active = *self.layout.last().expect("a segment was just ensured");
            if writes.last().is_none_or(|w| w.segment != active) {
                writes.push(SegmentWrite {
                    segment: active,
                    create: false,
                    offset: self.active_size,
                    bytes: Vec::new(),
                });
            }
            let write = writes.last_mut().expect("pushed above");
            write.bytes.extend_from_slice(&record);
            let loc = Loc {
                leader: entry.log_id.leader_id,
                offset: self.active_size,
                len: record.len() as u32,
            };
            self.active_size += len;
            last_index = Some(index);
            next = Some(index + 1);
            new_entries.push((entry, loc, len + CACHE_ENTRY_OVERHEAD));
        }
        Ok(PreparedAppend {
            writes,
            entries: new_entries,
            last_index,
        })
    }
}

impl RaftLogReader<TypeConfig> for LogReader {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let (start, end) = bounds(&range);
        read_entries(&self.shared, start, end).await
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let (start, end) = bounds(&range);
        read_entries(&self.shared, start, end).await
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogReader;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let state = self.shared.state.read();
        Ok(LogState {
            last_purged_log_id: state.purged,
            last_log_id: state.last_log_id(),
        })
    }

    async fn get_log_reader(&mut self) -> LogReader {
        self.reader()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        self.check_writable()?;
        let (done, reply) = oneshot::channel();
        self.call(Request::SaveVote { vote: *vote, done }, reply)
            .await
            .map_err(|e| StorageError::from(StorageIOError::write_vote(AnyError::error(e))))?;
        self.vote = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        Ok(self.vote)
    }

    /// Left for the writer, which writes it once it is durable in this log; not awaited and not
    /// fsynced — see `Writer::save_unsaved_committed`.
    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        self.check_writable()?;
        self.committed = committed;
        *self.shared.unsaved_committed.lock() = Some(committed);
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.committed)
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        self.append_with(entries, Box::new(move |result| callback.log_io_completed(result)))
            .await
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.check_writable()?;
        let index = log_id.index;
        let (cut, remove) = {
            let mut state = self.shared.state.write();
            if index >= state.next() {
                return Ok(());
            }
            if index < state.first {
                return Err(write_error(format!(
                    "truncate at {index} would remove purged (committed) entries; first is {}",
                    state.first
                )));
            }
            let offset = state.loc(index).expect("index is in the log").offset;
            let pos = self.layout.partition_point(|&first| first <= index);
            let segment = self.layout[pos - 1];
            let (cut, remove) = if segment == index {
                (None, self.layout.split_off(pos - 1))
            } else {
                (Some((segment, offset)), self.layout.split_off(pos))
            };
            let keep = (index - state.first) as usize;
            state.locs.truncate(keep);
            state.truncate_cache(index);
            self.active_size = match cut {
                Some((_, offset)) => offset,
                None if self.layout.is_empty() => 0,
                None => {
                    let prev = state
                        .loc(index - 1)
                        .expect("a remaining segment holds the entry before the cut");
                    prev.offset + u64::from(prev.len)
                }
            };
            (cut, remove)
        };
        let (done, reply) = oneshot::channel();
        self.call(
            Request::Truncate {
                index,
                cut,
                remove,
                done,
            },
            reply,
        )
        .await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.check_writable()?;
        let index = log_id.index;
        let remove = {
            let mut state = self.shared.state.write();
            if state.purged.is_some_and(|p| p.index >= index) {
                return Ok(());
            }
            state.purged = Some(log_id);
            let remove = if index + 1 >= state.next() {
                state.locs.clear();
                state.first = index + 1;
                state.drop_cache_before(index + 1);
                self.active_size = 0;
                std::mem::take(&mut self.layout)
            } else {
                let drop = (index + 1).saturating_sub(state.first) as usize;
                state.locs.drain(..drop);
                state.first = state.first.max(index + 1);
                state.drop_cache_before(index + 1);
                // A segment is wholly purged when the next one starts at or below index + 1.
                // (None is when the log starts above index + 1: a log that never purged before.)
                let keep_from = self
                    .layout
                    .partition_point(|&first| first <= index + 1)
                    .saturating_sub(1);
                self.layout.drain(..keep_from).collect()
            };
            let file = PurgedFile {
                purged: log_id,
                first: state.first,
            };
            (file, remove)
        };
        let (purged, remove) = remove;
        let (done, reply) = oneshot::channel();
        self.call(Request::Purge { purged, remove, done }, reply).await
    }
}

/// Reads `[start, end)` ∩ the log: flushed-and-evicted entries from disk (off the async
/// runtime), the rest from the cache.
async fn read_entries(shared: &Arc<Shared>, start: u64, end: u64) -> Result<Vec<Entry>, StorageError> {
    let mut disk = Vec::new();
    let mut cached = Vec::new();
    {
        let state = shared.state.read();
        let start = start.max(state.first);
        let end = end.min(state.next());
        for index in start..end {
            if index >= state.cache_first {
                let (entry, _) = &state.cache[(index - state.cache_first) as usize];
                cached.push(entry.clone());
            } else {
                let loc = state.loc(index).copied();
                let file = state.segments.range(..=index).next_back().map(|(_, f)| f.clone());
                let (Some(loc), Some(file)) = (loc, file) else {
                    return Err(read_error(format!("log index {index} has no location on disk")));
                };
                disk.push((index, file, loc));
            }
        }
    }
    if disk.is_empty() {
        return Ok(cached);
    }
    let mut entries = tokio::task::spawn_blocking(move || read_from_disk(disk))
        .await
        .map_err(|e| read_error(format!("log read task failed: {e}")))??;
    entries.extend(cached);
    Ok(entries)
}

/// Reads records with as few preads as possible: runs of adjacent records in one file are read
/// at once (up to `MAX_READ_SPAN`).
fn read_from_disk(wanted: Vec<(u64, Arc<File>, Loc)>) -> Result<Vec<Entry>, StorageError> {
    let mut entries = Vec::with_capacity(wanted.len());
    let mut i = 0;
    while i < wanted.len() {
        let (_, file, first_loc) = &wanted[i];
        let start = first_loc.offset;
        let mut end = start + u64::from(first_loc.len);
        let mut j = i + 1;
        while j < wanted.len() {
            let (_, next_file, loc) = &wanted[j];
            if !Arc::ptr_eq(file, next_file) || loc.offset != end || end + u64::from(loc.len) - start > MAX_READ_SPAN {
                break;
            }
            end += u64::from(loc.len);
            j += 1;
        }
        let mut buf = vec![0u8; (end - start) as usize];
        file.read_exact_at(&mut buf, start)
            .map_err(|e| StorageError::from(StorageIOError::read_log_at_index(wanted[i].0, AnyError::new(&e))))?;
        let buf = Bytes::from(buf);
        for (index, _, loc) in &wanted[i..j] {
            let at = (loc.offset - start) as usize;
            let record = buf.slice(at..at + loc.len as usize);
            let entry = decode_record(record).map_err(|e| {
                StorageError::from(StorageIOError::read_log_at_index(
                    *index,
                    AnyError::error(format!("at offset {}: {e}", loc.offset)),
                ))
            })?;
            if entry.log_id.index != *index || entry.log_id.leader_id != loc.leader {
                return Err(StorageIOError::read_log_at_index(
                    *index,
                    AnyError::error(format!(
                        "record at offset {} holds {} (log changed under the reader?)",
                        loc.offset, entry.log_id
                    )),
                )
                .into());
            }
            entries.push(entry);
        }
        i = j;
    }
    Ok(entries)
}

fn bounds(range: &impl RangeBounds<u64>) -> (u64, u64) {
    let start = match range.start_bound() {
        Bound::Included(&s) => s,
        Bound::Excluded(&s) => s.saturating_add(1),
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(&e) => e.saturating_add(1),
        Bound::Excluded(&e) => e,
        Bound::Unbounded => u64::MAX,
    };
    (start, end)
}

fn write_error(e: impl ToString) -> StorageError {
    StorageIOError::write_logs(AnyError::error(e.to_string())).into()
}

fn read_error(e: impl ToString) -> StorageError {
    StorageIOError::new(ErrorSubject::Logs, ErrorVerb::Read, AnyError::error(e.to_string())).into()
}

// ---------------------------------------------------------------------------------------------
// Record encoding

/// Appends the record of `entry` (length, CRC, body) to `out`.
pub(crate) fn encode_record(entry: &Entry, out: &mut Vec<u8>) -> Result<(), String> {
    let start = out.len();
    out.extend_from_slice(&[0u8; RECORD_HEADER_LEN]);
    out.put_u64_le(entry.log_id.index);
    out.put_u64_le(entry.log_id.leader_id.term);
    out.put_u64_le(entry.log_id.leader_id.node_id);
    match &entry.payload {
        EntryPayload::Blank => out.put_u8(TAG_BLANK),
        EntryPayload::Normal(command) => {
            out.reserve(command.encoded_len_hint() + 1);
            out.put_u8(TAG_NORMAL);
            command.encode(out);
        }
        EntryPayload::Membership(membership) => {
            out.put_u8(TAG_MEMBERSHIP);
            serde_json::to_writer(&mut *out, membership).map_err(|e| format!("cannot encode membership: {e}"))?;
        }
    }
    let body_len =
        u32::try_from(out.len() - start - RECORD_HEADER_LEN).map_err(|_| "entry larger than 4 GiB".to_string())?;
    let crc = crc32fast::hash(&out[start + RECORD_HEADER_LEN..]);
    out[start..start + 4].copy_from_slice(&body_len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// The fixed part of a checked record: index, leader, record length (header included).
struct RecordHead {
    index: u64,
    leader: CommittedLeaderId<NodeId>,
    len: usize,
}

/// Checks the record at `data[pos..]`: complete, checksum right, body well-formed at its fixed part.
fn check_record(data: &[u8], pos: usize) -> Result<RecordHead, &'static str> {
    let rest = &data[pos..];
    if rest.len() < RECORD_HEADER_LEN {
        return Err("incomplete record header");
    }
    let body_len = u32::from_le_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(rest[4..8].try_into().expect("4 bytes"));
    if body_len > rest.len() - RECORD_HEADER_LEN {
        return Err("record runs past the end of the file");
    }
    let body = &rest[RECORD_HEADER_LEN..RECORD_HEADER_LEN + body_len];
    if crc32fast::hash(body) != crc {
        return Err("checksum mismatch");
    }
    if body_len < BODY_FIXED_LEN {
        return Err("record body too short");
    }
    if body[24] > TAG_MEMBERSHIP {
        return Err("unknown payload tag");
    }
    let u64_at = |i: usize| u64::from_le_bytes(body[i..i + 8].try_into().expect("8 bytes"));
    Ok(RecordHead {
        index: u64_at(0),
        leader: CommittedLeaderId::new(u64_at(8), u64_at(16)),
        len: RECORD_HEADER_LEN + body_len,
    })
}

/// Decodes a whole record (header included) into an entry, checking its CRC.
pub(crate) fn decode_record(record: Bytes) -> Result<Entry, String> {
    let head = check_record(&record, 0).map_err(str::to_string)?;
    if head.len != record.len() {
        return Err("record length does not match the index".into());
    }
    let payload = record.slice(RECORD_HEADER_LEN + BODY_FIXED_LEN..);
    let payload = match record[RECORD_HEADER_LEN + 24] {
        TAG_BLANK if payload.is_empty() => EntryPayload::Blank,
        TAG_BLANK => return Err("blank entry with a payload".into()),
        TAG_NORMAL => EntryPayload::Normal(Command::decode(payload).map_err(|e| e.to_string())?),
        _ => EntryPayload::Membership(
            serde_json::from_slice::<Membership<NodeId, BasicNode>>(&payload)
                .map_err(|e| format!("bad membership: {e}"))?,
        ),
    };
    Ok(Entry {
        log_id: LogId::new(head.leader, head.index),
        payload,
    })
}

// ---------------------------------------------------------------------------------------------
// Recovery

struct RecoveredSegment {
    first: u64,
    locs: Vec<Loc>,
    /// File size after recovery (a torn tail cut off).
    size: u64,
}

struct Recovered {
    vote: Option<Vote<NodeId>>,
    committed: Option<LogId>,
    purged: Option<LogId>,
    segments: Vec<RecoveredSegment>,
}

/// The path of the segment whose first entry is `first`.
pub(crate) fn segment_path(dir: &Path, first: u64) -> PathBuf {
    dir.join(format!("{first:020}.log"))
}

/// The first index of a segment file named `name`, if it is one.
pub(crate) fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".log")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn corrupt(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

fn read_json_file<T: serde::de::DeserializeOwned>(path: &Path) -> io::Result<Option<T>> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| corrupt(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// What scanning one segment found.
struct Scan {
    locs: Vec<Loc>,
    /// Where the valid records end; less than the file size when the tail is torn.
    valid_len: u64,
    file_len: u64,
    /// Why the tail was cut, for the warning.
    torn: Option<&'static str>,
}

fn scan_segment(path: &Path, first: u64, is_last: bool) -> io::Result<Scan> {
    let data = fs::read(path)?;
    let file_len = data.len() as u64;
    let here = |offset: usize, what: &str| corrupt(format!("{} at offset {offset}: {what}", path.display()));
    let header_ok =
        data.len() >= HEADER_LEN as usize && &data[..8] == MAGIC && data[8..12] == FORMAT_VERSION.to_le_bytes();
    if !header_ok {
        let mut header = MAGIC.to_vec();
        header.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        // A last segment whose header never fully reached the disk holds no entry.
        if is_last && data.len() < header.len() && header.starts_with(&data) {
            return Ok(Scan {
                locs: Vec::new(),
                valid_len: 0,
                file_len,
                torn: Some("incomplete segment header"),
            });
        }
        return Err(here(0, "not a log segment of a known format version"));
    }

    let mut locs = Vec::new();
    let mut pos = HEADER_LEN as usize;
    let mut next = first;
    while pos < data.len() {
        if data[pos..].iter().all(|&b| b == 0) {
            // Reserved space (see the module docs): the records end here.
            break;
        }
        match check_record(&data, pos) {
            Ok(head) if head.index == next => {
                locs.push(Loc {
                    leader: head.leader,
                    offset: pos as u64,
                    len: head.len as u32,
                });
                pos += head.len;
                next += 1;
            }
            Ok(head) => {
                return Err(here(
                    pos,
                    &format!("record holds index {}, expected {next}", head.index),
                ));
            }
            Err(why) => {
                if !is_last {
                    return Err(here(pos, why));
                }
                if let Some(at) = later_record(&data, pos + 1, next + 1) {
                    return Err(here(
                        pos,
                        &format!("{why}, yet a valid record of index {} follows at offset {at}", next + 1),
                    ));
                }
                return Ok(Scan {
                    locs,
                    valid_len: pos as u64,
                    file_len,
                    torn: Some(why),
                });
            }
        }
    }
    Ok(Scan {
        locs,
        valid_len: pos as u64,
        file_len,
        torn: None,
    })
}

/// Offset of a valid record of `index` at or after `from`, if any: tells a torn tail (nothing
/// valid after the damage) from damage in the middle of acknowledged data.
fn later_record(data: &[u8], from: usize, index: u64) -> Option<usize> {
    let wanted = index.to_le_bytes();
    let last_start = data.len().checked_sub(RECORD_HEADER_LEN + BODY_FIXED_LEN)?;
    (from..=last_start).find(|&at| {
        data[at + RECORD_HEADER_LEN..at + RECORD_HEADER_LEN + 8] == wanted
            && check_record(data, at).is_ok_and(|head| head.index == index)
    })
}

/// Reads and checks everything, then repairs what recovery may repair (torn tail, leftovers of an
/// interrupted purge), and only then: nothing is changed on disk when `open` refuses.
fn recover(dir: &Path) -> io::Result<Recovered> {
    let vote = read_json_file::<Vote<NodeId>>(&dir.join(VOTE_FILE))?;
    let purged_file = read_json_file::<PurgedFile>(&dir.join(PURGED_FILE))?;
    let purged = purged_file.map(|f| f.purged);
    // `committed` is written without fsync; a damaged one is a lost hint, not corruption.
    let committed = read_json_file::<Option<LogId>>(&dir.join(COMMITTED_FILE))
        .unwrap_or_else(|e| {
            tracing::warn!("ignoring unreadable committed log id: {e}");
            None
        })
        .flatten();

    let mut firsts = Vec::new();
    let mut leftovers = Vec::new();
    for dir_entry in fs::read_dir(dir)? {
        let name = dir_entry?.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(first) = parse_segment_name(name) {
            firsts.push(first);
        } else if name.ends_with(".tmp") {
            leftovers.push(dir.join(name));
        }
    }
    firsts.sort_unstable();

    let mut scans = Vec::with_capacity(firsts.len());
    for (i, &first) in firsts.iter().enumerate() {
        let is_last = i + 1 == firsts.len();
        scans.push(scan_segment(&segment_path(dir, first), first, is_last)?);
    }
    for (i, pair) in firsts.windows(2).enumerate() {
        let end = pair[0] + scans[i].locs.len() as u64;
        if end != pair[1] {
            return Err(corrupt(format!(
                "{}: log segments are not contiguous: {} ends before index {end}, next starts at {}",
                dir.display(),
                segment_path(dir, pair[0]).display(),
                pair[1]
            )));
        }
    }
    let purged_next = purged.map_or(0, |p| p.index + 1);
    // Segments wholly covered by `purged` are leftovers of an interrupted purge.
    let purged_segments = firsts
        .iter()
        .zip(&scans)
        .take_while(|(first, scan)| **first + scan.locs.len() as u64 <= purged_next)
        .count();
    if let Some(&first) = firsts.get(purged_segments)
        && let Some(file) = purged_file
        && first > file.first
    {
        return Err(corrupt(format!(
            "{}: entries {}..{first} are missing: the log starts at {first} but the last purge ({}) left it starting at {}",
            dir.display(),
            file.first,
            file.purged,
            file.first,
        )));
    }

    // All checks passed: repair.
    for path in leftovers {
        fs::remove_file(path)?;
    }
    let mut dir_changed = false;
    for &first in &firsts[..purged_segments] {
        fs::remove_file(segment_path(dir, first))?;
        dir_changed = true;
    }
    let mut segments = Vec::new();
    let count = firsts.len();
    for (i, (first, scan)) in firsts.into_iter().zip(scans).enumerate() {
        if i < purged_segments {
            continue;
        }
        let path = segment_path(dir, first);
        if let Some(why) = scan.torn {
            tracing::warn!(
                "{}: cutting off a torn tail at offset {} ({why}; {} bytes dropped)",
                path.display(),
                scan.valid_len,
                scan.file_len - scan.valid_len
            );
        }
        debug_assert!(scan.torn.is_none() || i + 1 == count);
        if scan.locs.is_empty() {
            // Only the last segment can be empty (contiguity); it holds nothing worth keeping.
            fs::remove_file(&path)?;
            dir_changed = true;
            continue;
        }
        if scan.valid_len < scan.file_len {
            let file = OpenOptions::new().write(true).open(&path)?;
            file.set_len(scan.valid_len)?;
            file.sync_data()?;
        }
        segments.push(RecoveredSegment {
            first,
            locs: scan.locs,
            size: scan.valid_len,
        });
    }
    if dir_changed {
        File::open(dir)?.sync_all()?;
    }
    Ok(Recovered {
        vote,
        committed,
        purged,
        segments,
    })
}

// ---------------------------------------------------------------------------------------------
// The writer thread

struct Writer {
    shared: Arc<Shared>,
    dir: PathBuf,
    dir_handle: File,
    files: BTreeMap<u64, Arc<File>>,
    segment_size: u64,
    /// The segment written last, where its records end, and where its reserved space ends;
    /// `None` until the first write (and after a truncate), when it is read from the file.
    active: Option<Active>,
    /// When the committed id was last written. It is a start-up hint (our state machine records
    /// what it applied itself), so it is written at most every `COMMITTED_EVERY` instead of once
    /// per entry: a rename per Raft entry cost as much as the fsync that group commit is built
    /// around.
    committed_saved_at: std::time::Instant,
    /// The node's compaction hold (see `LogStoreOptions::hold`).
    hold: Arc<CompactionHold>,
    /// Purged segments whose files a hold kept on disk, to delete once it ends. Openraft's view
    /// is unaffected: they are out of the index, and recovery deletes them if the process stops
    /// first (they are wholly covered by the `purged` file, written before they were deferred).
    held: Vec<u64>,
    /// A timer thread will send `ReleaseHeld` when the hold ends.
    release_scheduled: bool,
    /// For that timer: a weak sender, so it never keeps the queue (and the writer) alive.
    requests: mpsc::WeakSender<Request>,
}

const COMMITTED_EVERY: std::time::Duration = std::time::Duration::from_millis(200);

/// Space reserved at a time at the end of the active segment (see the module docs): one
/// journal commit per this many bytes of log instead of one per fsync.
const PREALLOCATE: u64 = 4 << 20;

struct Active {
    segment: u64,
    used: u64,
    reserved: u64,
    /// After a failed reservation (a nearly full disk), the next attempt waits until the
    /// records reach here; the writes themselves go on as long as they fit.
    retry_at: u64,
}

impl Drop for LogStore {
    fn drop(&mut self) {
        // Closing the queue ends the writer once it has handled what is queued.
        let (closed, _) = mpsc::channel(1);
        drop(std::mem::replace(&mut self.tx, closed));
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

/// Appends written but not yet fsynced.
#[derive(Default)]
struct Pending {
    callbacks: Vec<FlushCallback>,
    dirty: Vec<u64>,
    created: bool,
    last_index: Option<u64>,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Request>) {
        while let Some(request) = rx.blocking_recv() {
            let mut pending = Pending::default();
            self.handle(request, &mut pending);
            // Group commit: everything queued meanwhile joins this batch.
            while let Ok(request) = rx.try_recv() {
                self.handle(request, &mut pending);
            }
            self.flush(&mut pending);
            if self.committed_saved_at.elapsed() >= COMMITTED_EVERY {
                self.save_unsaved_committed();
            }
        }
        self.save_unsaved_committed();
        self.give_back_reserved();
    }

    /// On a clean stop, trims the active segment to its records, so the files at rest hold
    /// records only (a crash leaves the reserved tail for recovery to trim).
    fn give_back_reserved(&mut self) {
        if self.shared.refused().is_some() {
            return;
        }
        let Some(active) = self.active.take() else { return };
        if active.reserved <= active.used {
            return;
        }
        if let Some(file) = self.files.get(&active.segment)
            && let Err(e) = file.set_len(active.used).and_then(|()| file.sync_data())
        {
            tracing::warn!("cannot trim the reserved tail of log segment {}: {e}", active.segment);
        }
    }

    /// Writes the newest committed id, once the entry it names is durable in this log (a
    /// follower may hear of a commit before its own copy of the entry is flushed); otherwise it
    /// waits for a later flush.
    fn save_unsaved_committed(&mut self) {
        let committed = {
            let mut unsaved = self.shared.unsaved_committed.lock();
            let flushed_next = self.shared.flushed_next.load(Ordering::Acquire);
            match *unsaved {
                Some(committed) if committed.is_none_or(|id| id.index < flushed_next) => unsaved.take(),
                _ => None,
            }
        };
        if let Some(committed) = committed {
            if let Err(e) = self.guarded(|w| w.save_committed(committed)) {
                tracing::error!("cannot save the committed log id: {e}");
            }
            self.committed_saved_at = std::time::Instant::now();
        }
    }

    fn handle(&mut self, request: Request, pending: &mut Pending) {
        match request {
            Request::Append {
                writes,
                last_index,
                done,
            } => {
                if let Some(e) = self.shared.refused() {
                    return done(Err(e));
                }
                for write in &writes {
                    if let Err(e) = self.write(write, pending) {
                        self.fail(&e);
                        self.fail_pending(pending);
                        return done(Err(e));
                    }
                }
                pending.callbacks.push(done);
                pending.last_index = last_index.or(pending.last_index);
            }
            Request::Truncate {
                index,
                cut,
                remove,
                done,
            } => {
                self.flush(pending);
                let result = self.guarded(|w| w.truncate(index, cut, &remove));
                let _ = done.send(result);
            }
            Request::Purge { purged, remove, done } => {
                self.flush(pending);
                let result = self.guarded(|w| w.purge(purged, &remove));
                let _ = done.send(result);
            }
            Request::SaveVote { vote, done } => {
                self.flush(pending);
                let result = self.guarded(|w| w.save_vote(&vote));
                let _ = done.send(result);
            }
            Request::ReleaseHeld => {
                self.release_scheduled = false;
                if let Err(e) = self.guarded(|w| w.delete_held()) {
                    tracing::error!("cannot delete purged log segments: {e}");
                }
            }
            #[cfg(test)]
            Request::Pause(resume) => {
                self.flush(pending);
                let _ = resume.recv();
            }
        }
    }

    /// Runs a control operation unless the log already failed; a failure makes the log fail.
    fn guarded(&mut self, op: impl FnOnce(&mut Self) -> io::Result<()>) -> io::Result<()> {
        if let Some(e) = self.shared.refused() {
            return Err(e);
        }
        op(self).inspect_err(|e| self.fail(e))
    }

    fn fail(&self, e: &io::Error) {
        tracing::error!("raft log write failed, refusing all further writes: {e}");
        let _ = self.shared.failed.set(e.to_string());
    }

    fn fail_pending(&self, pending: &mut Pending) {
        for callback in pending.callbacks.drain(..) {
            callback(Err(self.shared.refused().expect("the log has failed")));
        }
        *pending = Pending::default();
    }

    fn write(&mut self, write: &SegmentWrite, pending: &mut Pending) -> io::Result<()> {
        let file = if write.create {
            // A new segment never takes the name of a held one (names are first indexes, which
            // only grow past a purge), but never delete a file in use, whatever happens.
            self.held.retain(|&held| held != write.segment);
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(segment_path(&self.dir, write.segment))?;
            let file = Arc::new(file);
            self.files.insert(write.segment, file.clone());
            // Readers find the file before any entry in it leaves the cache (only after fsync).
            self.shared.state.write().segments.insert(write.segment, file.clone());
            pending.created = true;
            file
        } else {
            self.files
                .get(&write.segment)
                .cloned()
                .ok_or_else(|| io::Error::other(format!("segment {} is not open", write.segment)))?
        };
        let end = write.offset + write.bytes.len() as u64;
        self.reserve(write.segment, &file, end)?;
        file.write_all_at(&write.bytes, write.offset)?;
        if !pending.dirty.contains(&write.segment) {
            pending.dirty.push(write.segment);
        }
        Ok(())
    }

    /// Makes sure `segment` has space reserved up to `end` before a write ends there; when the
    /// writer moves on to a new segment, trims the previous one to its records. The trim needs
    /// no fsync of its own: recovery reads an unused reserved tail as the clean end it is.
    fn reserve(&mut self, segment: u64, file: &File, end: u64) -> io::Result<()> {
        let mut active = match self.active.take() {
            Some(active) if active.segment == segment => active,
            previous => {
                if let Some(previous) = previous
                    && previous.reserved > previous.used
                    && let Some(old) = self.files.get(&previous.segment)
                {
                    old.set_len(previous.used)?;
                }
                let len = file.metadata()?.len();
                Active {
                    segment,
                    used: len.min(end),
                    reserved: len,
                    retry_at: 0,
                }
            }
        };
        if end > active.reserved && end >= active.retry_at {
            let target = end.max((active.reserved + PREALLOCATE).min(self.segment_size));
            let reserved = nix::fcntl::fallocate(
                file,
                nix::fcntl::FallocateFlags::empty(),
                active.reserved as i64,
                (target - active.reserved) as i64,
            );
            match reserved {
                Ok(()) => active.reserved = target,
                // No room for the reservation (or a file system without fallocate): the file
                // grows with each write, as it would without one. Only the write's own failure
                // is the log's failure. Any part a failed call did reserve is zeros past the
                // records, which recovery reads as the clean end it is.
                Err(e) => {
                    tracing::debug!("cannot reserve log space ahead: {e}");
                    active.retry_at = end + PREALLOCATE;
                }
            }
        }
        active.used = active.used.max(end);
        self.active = Some(active);
        Ok(())
    }

    /// One fdatasync per touched segment (and one directory fsync if a segment was created), then
    /// the callbacks in order.
    fn flush(&mut self, pending: &mut Pending) {
        if pending.callbacks.is_empty() && pending.dirty.is_empty() {
            return;
        }
        crate::crash::point("log-after-write");
        let result = self.sync_pending(pending);
        match result {
            Ok(()) => {
                crate::crash::point("log-after-sync");
                if let Some(last) = pending.last_index {
                    self.shared.flushed_next.store(last + 1, Ordering::Release);
                    self.shared.state.write().evict(self.shared.cache_budget, last + 1);
                }
                for callback in pending.callbacks.drain(..) {
                    callback(Ok(()));
                }
                *pending = Pending::default();
            }
            Err(e) => {
                self.fail(&e);
                self.fail_pending(pending);
            }
        }
    }

    fn sync_pending(&mut self, pending: &Pending) -> io::Result<()> {
        if let Some(e) = self.shared.refused() {
            return Err(e);
        }
        for segment in &pending.dirty {
            let file = self.files.get(segment).cloned();
            if let Some(file) = file {
                self.sync_data(&file)?;
            }
        }
        if pending.created {
            self.sync_dir()?;
        }
        Ok(())
    }

    fn sync_data(&self, file: &File) -> io::Result<()> {
        #[cfg(test)]
        if self.shared.fail_next_sync.swap(false, Ordering::SeqCst) {
            return Err(io::Error::other("injected fsync failure"));
        }
        self.shared.fsyncs.fetch_add(1, Ordering::Relaxed);
        file.sync_data()
    }

    fn sync_dir(&self) -> io::Result<()> {
        self.shared.fsyncs.fetch_add(1, Ordering::Relaxed);
        self.dir_handle.sync_all()
    }

    /// Removes later segments first and makes that durable before cutting the segment that keeps
    /// a prefix: a crash in between then leaves a shorter but contiguous log, never a gap.
    fn truncate(&mut self, index: u64, cut: Option<(u64, u64)>, remove: &[u64]) -> io::Result<()> {
        // The cut changes where records end: read it from the file at the next write.
        self.active = None;
        for &segment in remove.iter().rev() {
            self.remove_segment(segment)?;
        }
        if !remove.is_empty() {
            self.sync_dir()?;
        }
        if let Some((segment, len)) = cut {
            let file = self
                .files
                .get(&segment)
                .cloned()
                .ok_or_else(|| io::Error::other(format!("segment {segment} is not open")))?;
            file.set_len(len)?;
            self.sync_data(&file)?;
        }
        self.shared.flushed_next.fetch_min(index, Ordering::AcqRel);
        Ok(())
    }

    /// Persists the purged id first, then deletes segments — unless the compaction hold is on,
    /// in which case the files stay until it ends. The deletions need no fsync: a segment that
    /// comes back after a crash is wholly covered by `purged` and recovery deletes it.
    fn purge(&mut self, purged: PurgedFile, remove: &[u64]) -> io::Result<()> {
        self.write_atomically(PURGED_FILE, &to_json(&purged)?, true)?;
        for &segment in remove {
            self.files.remove(&segment);
            self.shared.state.write().segments.remove(&segment);
            self.held.push(segment);
        }
        self.delete_held()
    }

    /// Deletes the purged segments left on disk, if no hold is on; otherwise makes sure a timer
    /// will bring the writer back when the hold ends.
    fn delete_held(&mut self) -> io::Result<()> {
        if self.held.is_empty() {
            return Ok(());
        }
        let hold = self.hold.clone();
        let deleted = hold.unless_held(|| -> io::Result<()> {
            for segment in std::mem::take(&mut self.held) {
                match fs::remove_file(segment_path(&self.dir, segment)) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            }
            Ok(())
        });
        match deleted {
            Ok(result) => result,
            Err(until) => {
                self.schedule_release(until);
                Ok(())
            }
        }
    }

    fn schedule_release(&mut self, until: std::time::SystemTime) {
        if self.release_scheduled {
            return;
        }
        self.release_scheduled = true;
        tracing::info!(
            segments = self.held.len(),
            "log compaction on hold for a backup; deleting later"
        );
        let requests = self.requests.clone();
        let spawned = std::thread::Builder::new().name("raft-log-hold".into()).spawn(move || {
            if let Ok(wait) = until.duration_since(std::time::SystemTime::now()) {
                std::thread::sleep(wait);
            }
            // The store may be gone by now; then there is nothing left to do.
            if let Some(requests) = requests.upgrade() {
                let _ = requests.blocking_send(Request::ReleaseHeld);
            }
        });
        if let Err(e) = spawned {
            // The next purge tries again; until then the files just stay.
            tracing::warn!("cannot start the log hold timer: {e}");
            self.release_scheduled = false;
        }
    }

    fn save_vote(&mut self, vote: &Vote<NodeId>) -> io::Result<()> {
        self.write_atomically(VOTE_FILE, &to_json(vote)?, true)
    }

    /// The committed log id is a hint openraft uses at startup to re-apply entries without waiting
    /// for a leader. A stale value only means less is re-applied early; the leader's commit index
    /// brings the rest. So it needs no fsync: the atomic rename is enough to never read a torn
    /// file, and a file that lost its data in a crash is read as "no hint". It is written after
    /// every earlier append was fsynced, so it never names an entry missing from this log.
    fn save_committed(&mut self, committed: Option<LogId>) -> io::Result<()> {
        self.write_atomically(COMMITTED_FILE, &to_json(&committed)?, false)
    }

    fn remove_segment(&mut self, segment: u64) -> io::Result<()> {
        self.files.remove(&segment);
        self.shared.state.write().segments.remove(&segment);
        match fs::remove_file(segment_path(&self.dir, segment)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Write to `name.tmp`, (fsync), rename over `name`, (fsync the directory).
    fn write_atomically(&self, name: &str, contents: &[u8], durable: bool) -> io::Result<()> {
        let tmp = self.dir.join(format!("{name}.tmp"));
        let mut file = File::create(&tmp)?;
        file.write_all(contents)?;
        if durable {
            self.shared.fsyncs.fetch_add(1, Ordering::Relaxed);
            file.sync_all()?;
        }
        fs::rename(&tmp, self.dir.join(name))?;
        if durable {
            self.sync_dir()?;
        }
        Ok(())
    }
}

fn to_json(value: &impl serde::Serialize) -> io::Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(io::Error::other)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::sync::Mutex;

    use openraft::storage::RaftStateMachine;
    use openraft::testing::{StoreBuilder, Suite};
    use openraft::{RaftSnapshotBuilder, Snapshot, SnapshotMeta, StoredMembership};
    use tempfile::TempDir;

    use super::*;
    use crate::command::{CommandResult, EventRecord, Transaction};
    use crate::consensus::transfer::SegmentStream;

    // -- fixtures ---------------------------------------------------------------------------

    fn options(segment_size: u64, cache_bytes: u64) -> LogStoreOptions {
        LogStoreOptions {
            segment_size,
            cache_bytes,
            ..LogStoreOptions::default()
        }
    }

    fn log_id(term: u64, index: u64) -> LogId {
        LogId::new(CommittedLeaderId::new(term, 1), index)
    }

    fn blank(term: u64, index: u64) -> Entry {
        Entry {
            log_id: log_id(term, index),
            payload: EntryPayload::Blank,
        }
    }

    fn normal(term: u64, index: u64, size: usize) -> Entry {
        let event = EventRecord {
            aggregate_id: format!("order-{index}"),
            sequence: index as i64,
            indexed: index.is_multiple_of(2),
            encoded: Bytes::from(vec![index as u8; size]),
        };
        Entry {
            log_id: log_id(term, index),
            payload: EntryPayload::Normal(Command::AppendEvents(vec![Transaction { events: vec![event] }])),
        }
    }

    fn membership(term: u64, index: u64) -> Entry {
        let voters = BTreeSet::from([1, 2, index % 5 + 3]);
        Entry {
            log_id: log_id(term, index),
            payload: EntryPayload::Membership(Membership::new(vec![voters], None)),
        }
    }

    /// Blank, normal (of varying sizes) and membership entries `from..to`.
    fn mixed(term: u64, from: u64, to: u64) -> Vec<Entry> {
        (from..to)
            .map(|i| match i % 4 {
                0 => blank(term, i),
                2 => membership(term, i),
                _ => normal(term, i, (i as usize * 7) % 40 + 1),
            })
            .collect()
    }

    fn open(dir: &Path, options: LogStoreOptions) -> LogStore {
        LogStore::open(dir, options).expect("open log")
    }

    fn callback() -> (FlushCallback, oneshot::Receiver<io::Result<()>>) {
        let (tx, rx) = oneshot::channel();
        let done: FlushCallback = Box::new(move |result| {
            let _ = tx.send(result);
        });
        (done, rx)
    }

    /// Appends and waits for the flush callback.
    async fn append(store: &mut LogStore, entries: Vec<Entry>) {
        let (done, rx) = callback();
        store.append_with(entries, done).await.expect("append");
        rx.await.expect("callback fired").expect("flushed");
    }

    async fn read_all(store: &mut LogStore) -> Vec<Entry> {
        store.try_get_log_entries(..).await.expect("read")
    }

    fn segment_files(dir: &Path) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "log"))
            .collect();
        files.sort();
        files
    }

    fn copy_dir(from: &Path) -> TempDir {
        let to = tempfile::tempdir().unwrap();
        for entry in fs::read_dir(from).unwrap() {
            let path = entry.unwrap().path();
            fs::copy(&path, to.path().join(path.file_name().unwrap())).unwrap();
        }
        to
    }

    /// End offsets of the records in a segment file (before its reserved tail, if any).
    fn record_ends(data: &[u8]) -> Vec<usize> {
        let mut ends = Vec::new();
        let mut pos = HEADER_LEN as usize;
        while pos < data.len() && data[pos..].iter().any(|&b| b != 0) {
            pos += check_record(data, pos).expect("test data is valid").len;
            ends.push(pos);
        }
        ends
    }

    /// Segment size of the recovery tests: a few records each (they are 60 to 160 bytes).
    const SEGMENT: u64 = 400;

    /// A log of at least 40 mixed entries in `SEGMENT`-byte segments, written by appends of 1 to 3
    /// entries, whose last segment holds at least 3 records.
    async fn written_log() -> (TempDir, Vec<Entry>) {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path(), options(SEGMENT, 0));
        let mut entries = Vec::new();
        let mut n = 1;
        loop {
            let last_records = match segment_files(dir.path()).last() {
                Some(last) => record_ends(&fs::read(last).unwrap()).len(),
                None => 0,
            };
            if entries.len() >= 40 && last_records >= 3 {
                break;
            }
            assert!(entries.len() < 200, "segments too small for the test entries");
            let next = entries.len() as u64;
            let batch = mixed(1, next, next + n);
            append(&mut store, batch.clone()).await;
            entries.extend(batch);
            n = n % 3 + 1;
        }
        (dir, entries)
    }

    // -- openraft's storage suite ------------------------------------------------------------

    #[derive(Default)]
    struct SmState {
        applied: Option<LogId>,
        membership: StoredMembership<NodeId, BasicNode>,
        snapshot: Option<(SnapshotMeta<NodeId, BasicNode>, Vec<u8>)>,
        built: u64,
    }

    /// The smallest state machine the suite accepts: it remembers what was applied.
    #[derive(Clone, Default)]
    struct MemStateMachine(Arc<Mutex<SmState>>);

    impl RaftSnapshotBuilder<TypeConfig> for MemStateMachine {
        async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
            let mut sm = self.0.lock().unwrap();
            sm.built += 1;
            let meta = SnapshotMeta {
                last_log_id: sm.applied,
                last_membership: sm.membership.clone(),
                snapshot_id: format!("snapshot-{}", sm.built),
            };
            let data = serde_json::to_vec(&(sm.applied, &sm.membership)).unwrap();
            sm.snapshot = Some((meta.clone(), data.clone()));
            Ok(Snapshot {
                snapshot: Box::new(SegmentStream::empty(&meta)),
                meta,
            })
        }
    }

    impl RaftStateMachine<TypeConfig> for MemStateMachine {
        type SnapshotBuilder = Self;

        async fn applied_state(
            &mut self,
        ) -> Result<(Option<LogId>, StoredMembership<NodeId, BasicNode>), StorageError> {
            let sm = self.0.lock().unwrap();
            Ok((sm.applied, sm.membership.clone()))
        }

        async fn apply<I>(&mut self, entries: I) -> Result<Vec<CommandResult>, StorageError>
        where
            I: IntoIterator<Item = Entry> + OptionalSend,
            I::IntoIter: OptionalSend,
        {
            let mut sm = self.0.lock().unwrap();
            let mut results = Vec::new();
            for entry in entries {
                sm.applied = Some(entry.log_id);
                if let EntryPayload::Membership(m) = entry.payload {
                    sm.membership = StoredMembership::new(Some(entry.log_id), m);
                }
                results.push(CommandResult::default());
            }
            Ok(results)
        }

        async fn get_snapshot_builder(&mut self) -> Self {
            self.clone()
        }

        async fn begin_receiving_snapshot(&mut self) -> Result<Box<SegmentStream>, StorageError> {
            let meta = SnapshotMeta::default();
            Ok(Box::new(SegmentStream::empty(&meta)))
        }

        /// The suite's snapshots are the meta alone (their data is that of this log's tests).
        async fn install_snapshot(
            &mut self,
            meta: &SnapshotMeta<NodeId, BasicNode>,
            _snapshot: Box<SegmentStream>,
        ) -> Result<(), StorageError> {
            let mut sm = self.0.lock().unwrap();
            sm.applied = meta.last_log_id;
            sm.membership = meta.last_membership.clone();
            let data = serde_json::to_vec(&(sm.applied, &sm.membership)).unwrap();
            sm.snapshot = Some((meta.clone(), data));
            Ok(())
        }

        async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
            let sm = self.0.lock().unwrap();
            Ok(sm.snapshot.as_ref().map(|(meta, _)| Snapshot {
                meta: meta.clone(),
                snapshot: Box::new(SegmentStream::empty(meta)),
            }))
        }
    }

    struct Builder(LogStoreOptions);

    impl StoreBuilder<TypeConfig, LogStore, MemStateMachine, TempDir> for Builder {
        async fn build(&self) -> Result<(TempDir, LogStore, MemStateMachine), StorageError> {
            let dir = tempfile::tempdir().expect("temp dir");
            let store = open(dir.path(), self.0.clone());
            Ok((dir, store, MemStateMachine::default()))
        }
    }

    #[test]
    fn openraft_suite_with_default_options() {
        Suite::test_all(Builder(LogStoreOptions::default())).unwrap();
    }

    /// Tiny segments and no cache: every boundary case of the layout, every read from disk.
    #[test]
    fn openraft_suite_with_tiny_segments_and_no_cache() {
        Suite::test_all(Builder(options(40, 0))).unwrap();
    }

    // -- recovery ----------------------------------------------------------------------------

    #[tokio::test]
    async fn recovery_keeps_whole_entries_at_every_cut_of_the_last_segment() {
        let (src, mut entries) = written_log().await;
        // The entry each repaired log is asked to take next, also when nothing was cut.
        let n = entries.len() as u64;
        entries.extend(mixed(1, n, n + 1));
        let files = segment_files(src.path());
        assert!(files.len() >= 5, "want several segments, got {}", files.len());
        let last = files.last().unwrap();
        let last_first: usize = parse_segment_name(last.file_name().unwrap().to_str().unwrap()).unwrap() as usize;
        let data = fs::read(last).unwrap();
        let ends = record_ends(&data);
        assert!(ends.len() >= 2);

        for cut in 0..=data.len() {
            let dir = copy_dir(src.path());
            let path = dir.path().join(last.file_name().unwrap());
            OpenOptions::new()
                .write(true)
                .open(&path)
                .unwrap()
                .set_len(cut as u64)
                .unwrap();
            let mut store =
                LogStore::open(dir.path(), options(SEGMENT, 0)).unwrap_or_else(|e| panic!("cut at {cut}: {e}"));
            let kept = last_first + ends.iter().filter(|&&end| end <= cut).count();
            assert_eq!(read_all(&mut store).await, entries[..kept], "cut at {cut}");
            let state = store.get_log_state().await.unwrap();
            assert_eq!(state.last_log_id, Some(entries[kept - 1].log_id), "cut at {cut}");

            // The repaired log takes the next entry and survives another restart.
            append(&mut store, vec![entries[kept].clone()]).await;
            drop(store);
            let mut store = open(dir.path(), options(SEGMENT, 0));
            assert_eq!(read_all(&mut store).await, entries[..=kept], "cut at {cut}");
        }
    }

    #[tokio::test]
    async fn recovery_refuses_a_cut_in_a_segment_that_is_not_the_last() {
        let (src, _) = written_log().await;
        let files = segment_files(src.path());
        let middle = &files[files.len() / 2];
        let len = fs::metadata(middle).unwrap().len();
        for cut in 0..len {
            let dir = copy_dir(src.path());
            let path = dir.path().join(middle.file_name().unwrap());
            OpenOptions::new()
                .write(true)
                .open(&path)
                .unwrap()
                .set_len(cut)
                .unwrap();
            let err = LogStore::open(dir.path(), options(SEGMENT, 0))
                .err()
                .unwrap_or_else(|| panic!("opened with a middle segment cut at {cut}"));
            assert_eq!(err.kind(), io::ErrorKind::InvalidData, "cut at {cut}: {err}");
            // Refusing changes nothing on disk.
            assert_eq!(fs::metadata(&path).unwrap().len(), cut);
        }

        let dir = copy_dir(src.path());
        fs::remove_file(dir.path().join(middle.file_name().unwrap())).unwrap();
        let err = LogStore::open(dir.path(), options(SEGMENT, 0)).err().unwrap();
        assert!(err.to_string().contains("not contiguous"), "{err}");
    }

    #[tokio::test]
    async fn recovery_detects_every_byte_flip_in_the_last_segment() {
        let (src, entries) = written_log().await;
        let files = segment_files(src.path());
        let last = files.last().unwrap();
        let data = fs::read(last).unwrap();
        let ends = record_ends(&data);
        let tail_start = ends[ends.len() - 2];

        let (mut truncated, mut refused) = (0, 0);
        for pos in 0..data.len() {
            for mask in [0x01u8, 0x80, 0xff] {
                let dir = copy_dir(src.path());
                let path = dir.path().join(last.file_name().unwrap());
                let mut damaged = data.clone();
                damaged[pos] ^= mask;
                fs::write(&path, &damaged).unwrap();
                match LogStore::open(dir.path(), options(SEGMENT, 0)) {
                    // Only damage in the tail record may be taken for a torn write, and then the
                    // log is exactly the entries before it: never a different entry.
                    Ok(mut store) => {
                        assert!(pos >= tail_start, "flip {mask:#x} at {pos} before the tail opened");
                        let got = read_all(&mut store).await;
                        assert_eq!(got, entries[..entries.len() - 1], "flip {mask:#x} at {pos}");
                        truncated += 1;
                    }
                    Err(e) => {
                        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
                        refused += 1;
                    }
                }
            }
        }
        eprintln!(
            "byte flips in a {}-byte last segment: {truncated} cut as torn tail, {refused} refused",
            data.len()
        );
        assert!(truncated > 0 && refused > 0);
    }

    #[tokio::test]
    async fn the_open_segment_is_reserved_ahead_and_trimmed_at_rest() {
        let dir = tempfile::tempdir().unwrap();
        let segment = 1 << 20;
        let mut store = open(dir.path(), options(segment, 0));
        let entries = mixed(1, 0, 8);
        append(&mut store, entries.clone()).await;
        let path = segment_files(dir.path())[0].clone();
        let data = fs::read(&path).unwrap();
        let records = *record_ends(&data).last().unwrap() as u64;
        // Reserved up to the segment size (smaller than one preallocation step here).
        assert_eq!(data.len() as u64, segment);
        assert!(data[records as usize..].iter().all(|&b| b == 0));
        drop(store);
        assert_eq!(fs::metadata(&path).unwrap().len(), records, "trimmed on a clean stop");
        let mut store = open(dir.path(), options(segment, 0));
        assert_eq!(read_all(&mut store).await, entries);
    }

    #[tokio::test]
    async fn a_reserved_tail_is_a_clean_end_in_any_segment() {
        let (src, entries) = written_log().await;
        let files = segment_files(src.path());
        let sizes: Vec<u64> = files.iter().map(|f| fs::metadata(f).unwrap().len()).collect();
        // A crash before the writer trimmed a finished segment, and one with the open segment's
        // reservation in place: both end in zeros.
        for file in [&files[files.len() / 2], files.last().unwrap()] {
            let f = OpenOptions::new().write(true).open(file).unwrap();
            f.set_len(fs::metadata(file).unwrap().len() + 777).unwrap();
        }
        let mut store = LogStore::open(src.path(), options(SEGMENT, 0)).expect("zeros are a clean end");
        assert_eq!(read_all(&mut store).await, entries);
        drop(store);
        let after: Vec<u64> = files.iter().map(|f| fs::metadata(f).unwrap().len()).collect();
        assert_eq!(after, sizes, "recovery trims the zeros");
    }

    #[tokio::test]
    async fn reads_check_the_checksum() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path(), options(1 << 20, 0));
        let entries = mixed(1, 0, 8);
        append(&mut store, entries.clone()).await;
        assert_eq!(read_all(&mut store).await, entries);

        let path = &segment_files(dir.path())[0];
        let mut data = fs::read(path).unwrap();
        // The last byte of the last record (the open segment's reserved space follows it).
        let last = record_ends(&data).last().unwrap() - 1;
        data[last] ^= 0x40;
        fs::write(path, &data).unwrap();
        let err = store.try_get_log_entries(7..8).await.unwrap_err();
        assert!(err.to_string().contains("checksum"), "{err}");
        assert_eq!(store.try_get_log_entries(0..7).await.unwrap(), entries[..7]);
    }

    // -- group commit and durability ---------------------------------------------------------

    /// Appends as openraft issues them: one after the other, without waiting for the callbacks.
    async fn append_without_waiting(
        store: &mut LogStore,
        indexes: std::ops::RangeInclusive<u64>,
    ) -> (Vec<oneshot::Receiver<io::Result<()>>>, Arc<Mutex<Vec<u64>>>) {
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut pending = Vec::new();
        for i in indexes {
            let (tx, rx) = oneshot::channel();
            let order = order.clone();
            let done: FlushCallback = Box::new(move |result| {
                order.lock().unwrap().push(i);
                let _ = tx.send(result);
            });
            store.append_with(vec![normal(1, i, 100)], done).await.unwrap();
            pending.push(rx);
        }
        (pending, order)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_appends_share_fsyncs() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path(), LogStoreOptions::default());
        append(&mut store, vec![blank(1, 0)]).await;
        let before = store.fsync_count();

        let (pending, order) = append_without_waiting(&mut store, 1..=64).await;
        for rx in pending {
            rx.await.unwrap().unwrap();
        }
        let fsyncs = store.fsync_count() - before;
        eprintln!("64 appends issued back to back: {fsyncs} fsyncs");
        assert!(fsyncs < 64, "{fsyncs} fsyncs for 64 appends");
        assert_eq!(*order.lock().unwrap(), (1..=64).collect::<Vec<_>>());
        assert_eq!(read_all(&mut store).await.len(), 65);
    }

    /// With the writer held back, the 64 appends queue up and must leave in one fsync; meanwhile
    /// they are readable but not acknowledged.
    #[tokio::test]
    async fn queued_appends_are_readable_and_flushed_by_one_fsync() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path(), options(1 << 20, 0));
        append(&mut store, vec![blank(1, 0)]).await;
        let before = store.fsync_count();

        let (resume, paused) = std::sync::mpsc::channel();
        store.send(Request::Pause(paused)).await.unwrap();
        let (pending, order) = append_without_waiting(&mut store, 1..=64).await;

        let mut reader = store.get_log_reader().await;
        let read = reader.try_get_log_entries(60..=64).await.unwrap();
        assert_eq!(read, (60..=64).map(|i| normal(1, i, 100)).collect::<Vec<_>>());
        assert_eq!(store.get_log_state().await.unwrap().last_log_id, Some(log_id(1, 64)));
        assert!(order.lock().unwrap().is_empty(), "acknowledged before fsync");

        drop(resume);
        for rx in pending {
            rx.await.unwrap().unwrap();
        }
        assert_eq!(store.fsync_count() - before, 1);
        assert_eq!(*order.lock().unwrap(), (1..=64).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_failed_fsync_fails_the_batch_and_every_later_write() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path(), LogStoreOptions::default());
        append(&mut store, vec![blank(1, 0)]).await;

        store.shared.fail_next_sync.store(true, Ordering::SeqCst);
        let (done, rx) = callback();
        store.append_with(vec![blank(1, 1)], done).await.unwrap();
        assert!(rx.await.unwrap().is_err());

        let (done, _rx) = callback();
        assert!(store.append_with(vec![blank(1, 2)], done).await.is_err());
        assert!(store.save_vote(&Vote::new(2, 1)).await.is_err());
        assert!(store.truncate(log_id(1, 1)).await.is_err());
        assert!(store.purge(log_id(1, 0)).await.is_err());
    }

    #[tokio::test]
    async fn append_refuses_holes_and_overlaps() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path(), LogStoreOptions::default());
        append(&mut store, vec![blank(1, 0), blank(1, 1)]).await;
        let (done, _rx) = callback();
        assert!(store.append_with(vec![blank(1, 1)], done).await.is_err());
        let (done, _rx) = callback();
        assert!(store.append_with(vec![blank(1, 3)], done).await.is_err());

        // Purged past the end: the log continues right after the purged id, nowhere else.
        store.purge(log_id(1, 5)).await.unwrap();
        let (done, _rx) = callback();
        assert!(store.append_with(vec![blank(1, 7)], done).await.is_err());
        append(&mut store, vec![blank(1, 6)]).await;
    }

    // -- truncate, purge, vote, committed across restarts ------------------------------------

    /// The cache must follow purges and truncations, not only the index.
    #[tokio::test]
    async fn cache_follows_purge_and_truncate() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path(), LogStoreOptions::default());
        append(&mut store, mixed(1, 0, 10)).await;
        store.purge(log_id(1, 4)).await.unwrap();
        assert_eq!(read_all(&mut store).await, mixed(1, 5, 10));
        store.truncate(log_id(1, 8)).await.unwrap();
        append(&mut store, mixed(2, 8, 12)).await;
        let mut expected = mixed(1, 5, 8);
        expected.extend(mixed(2, 8, 12));
        assert_eq!(read_all(&mut store).await, expected);

        store.purge(log_id(2, 20)).await.unwrap();
        assert!(read_all(&mut store).await.is_empty());
        append(&mut store, vec![blank(3, 21), normal(3, 22, 10)]).await;
        assert_eq!(read_all(&mut store).await, vec![blank(3, 21), normal(3, 22, 10)]);
        assert_eq!(store.try_get_log_entries(22..).await.unwrap(), vec![normal(3, 22, 10)]);
    }

    /// A log that never purged may start above 0 (openraft's suite does that); purging below its
    /// start must leave it readable and reopenable.
    #[tokio::test]
    async fn a_log_starting_above_zero_survives_purge_below_its_start() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path(), options(SEGMENT, 0));
        append(&mut store, mixed(1, 5, 15)).await;
        store.purge(log_id(1, 1)).await.unwrap();
        assert_eq!(read_all(&mut store).await, mixed(1, 5, 15));
        drop(store);
        let mut store = open(dir.path(), options(SEGMENT, 0));
        assert_eq!(read_all(&mut store).await, mixed(1, 5, 15));
        let state = store.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id, Some(log_id(1, 1)));
        assert_eq!(state.last_log_id, Some(log_id(1, 14)));
        append(&mut store, mixed(1, 15, 16)).await;
    }

    #[tokio::test]
    async fn truncate_and_purge_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let opts = options(SEGMENT, 0);
        let mut store = open(dir.path(), opts.clone());
        let mut expected = mixed(1, 0, 30);
        append(&mut store, expected.clone()).await;

        // A new leader overwrites 25.. with its own entries.
        store.truncate(log_id(1, 25)).await.unwrap();
        expected.truncate(25);
        assert_eq!(read_all(&mut store).await, expected);
        let replacement = mixed(2, 25, 28);
        append(&mut store, replacement.clone()).await;
        expected.extend(replacement);

        store.purge(log_id(1, 10)).await.unwrap();
        let vote = Vote::new_committed(2, 1);
        store.save_vote(&vote).await.unwrap();
        store.save_committed(Some(log_id(2, 26))).await.unwrap();
        // Queued behind save_committed: once it is done, the committed file is written.
        store.save_vote(&vote).await.unwrap();

        let check = |state: LogState<TypeConfig>| {
            assert_eq!(state.last_purged_log_id, Some(log_id(1, 10)));
            assert_eq!(state.last_log_id, Some(log_id(2, 27)));
        };
        check(store.get_log_state().await.unwrap());
        assert_eq!(read_all(&mut store).await, expected[11..]);
        drop(store);

        // Wholly purged segments are gone; the first one left still holds index 11.
        let firsts: Vec<u64> = segment_files(dir.path())
            .iter()
            .map(|p| parse_segment_name(p.file_name().unwrap().to_str().unwrap()).unwrap())
            .collect();
        assert!(firsts[0] <= 11 && firsts.get(1).is_none_or(|&f| f > 11), "{firsts:?}");

        let mut store = open(dir.path(), opts.clone());
        check(store.get_log_state().await.unwrap());
        assert_eq!(read_all(&mut store).await, expected[11..]);
        assert!(store.try_get_log_entries(0..11).await.unwrap().is_empty());
        assert_eq!(store.read_vote().await.unwrap(), Some(vote));
        assert_eq!(store.read_committed().await.unwrap(), Some(log_id(2, 26)));

        // Purging past the end leaves an empty log that continues after the purged id.
        store.purge(log_id(3, 40)).await.unwrap();
        assert!(segment_files(dir.path()).is_empty());
        drop(store);
        let mut store = open(dir.path(), opts.clone());
        let state = store.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id, Some(log_id(3, 40)));
        assert_eq!(state.last_log_id, Some(log_id(3, 40)));
        append(&mut store, vec![blank(3, 41)]).await;
        drop(store);
        let mut store = open(dir.path(), opts);
        assert_eq!(read_all(&mut store).await, vec![blank(3, 41)]);
        let names: Vec<_> = segment_files(dir.path())
            .iter()
            .map(|p| p.file_name().unwrap().to_str().unwrap().to_string())
            .collect();
        assert_eq!(names, ["00000000000000000041.log"]);
    }

    /// A purge during a compaction hold changes openraft's view at once but deletes no file
    /// until the hold ends; after a restart (no hold) recovery finishes the purge.
    #[tokio::test]
    async fn a_hold_defers_deleting_purged_segments() {
        let dir = tempfile::tempdir().unwrap();
        let hold = Arc::new(CompactionHold::default());
        let opts = LogStoreOptions {
            hold: hold.clone(),
            ..options(SEGMENT, 0)
        };
        let mut store = open(dir.path(), opts.clone());
        append(&mut store, mixed(1, 0, 30)).await;
        let before = segment_files(dir.path());
        assert!(before.len() > 3);

        let until = std::time::SystemTime::now() + std::time::Duration::from_millis(700);
        hold.hold_until(until);
        store.purge(log_id(1, 20)).await.unwrap();
        assert_eq!(
            store.get_log_state().await.unwrap().last_purged_log_id,
            Some(log_id(1, 20))
        );
        assert_eq!(read_all(&mut store).await, mixed(1, 21, 30));
        assert_eq!(segment_files(dir.path()), before, "no file deleted during the hold");
        // Appends and further purges go on meanwhile.
        append(&mut store, mixed(1, 30, 35)).await;
        store.purge(log_id(1, 25)).await.unwrap();
        assert!(segment_files(dir.path()).starts_with(&before));

        // The writer deletes them by itself once the hold ends.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let now = segment_files(dir.path());
            let first = parse_segment_name(now[0].file_name().unwrap().to_str().unwrap()).unwrap();
            if first > 0 {
                assert!(std::time::SystemTime::now() >= until, "deleted before the hold ended");
                assert!(first <= 26, "the segment holding index 26 stays");
                break;
            }
            assert!(std::time::Instant::now() < deadline, "held segments never deleted");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert_eq!(read_all(&mut store).await, mixed(1, 26, 35));

        // A hold does not survive a restart: recovery deletes what a held purge left behind.
        hold.hold_until(std::time::SystemTime::now() + std::time::Duration::from_secs(600));
        store.purge(log_id(1, 31)).await.unwrap();
        let held = segment_files(dir.path());
        drop(store);
        let mut store = open(dir.path(), options(SEGMENT, 0));
        assert!(segment_files(dir.path()).len() < held.len());
        assert_eq!(read_all(&mut store).await, mixed(1, 32, 35));
    }
}
