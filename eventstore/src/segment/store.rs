//! A token-ordered store of events (or snapshots) in segment files.
//!
//! Guarantees:
//! - Tokens are dense: the i-th stored event has token `i` (after the first token of the store).
//! - Only one writer (the context's state machine) appends; any number of readers read
//!   concurrently. A reader sees an event only after its whole record is written, and never past
//!   `visible` (the next token to be written).
//! - The last segment is the open one. When a record would take it past the maximum size it is
//!   fsynced, its index and bloom filter are written (temp file, fsync, rename), and a new segment
//!   named by the next token is created. Closed segments never change again.
//! - `open` recovers: the open segment is scanned, a torn or damaged tail is cut off, and its
//!   index rebuilt. Damage anywhere else refuses to open: corrupt data is never served.
//!
//! Appends are written with `pwrite` but not fsynced here: durability of a confirmed append comes
//! from the Raft log (fsynced before commit). The state machine calls `sync` before it lets the
//! log be purged, so data only the segments hold is always on disk.

use std::collections::{BTreeMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::ops::RangeInclusive;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use parking_lot::{Mutex, RwLock};
use tokio::sync::watch;

use super::bloom::Bloom;
use super::index::{Position, SegmentIndex};
use super::record::{self, EntryRef, Kind, Parsed};

/// How many closed-segment indexes are kept in memory (Axon's `max-indexes-in-memory` idea).
/// Each can be tens of MB for a full 256 MiB segment, so keep few.
const INDEX_CACHE: usize = 8;
/// Largest `pread` when scanning records. A read is also cut at the end of the records it wants
/// (see `locate`), so it never reads (and zeroes) much more than it returns.
const READ_CHUNK: usize = 1 << 20;
/// Events of an aggregate at most this far apart in a file are read by one `pread`.
const COALESCE_GAP: u64 = 16 << 10;
/// Largest single `pread` of an aggregate read.
const MAX_RUN: u64 = 1 << 20;

/// The facts the index needs about one stored event.
#[derive(Debug, Clone, Copy)]
pub struct Indexed<'a> {
    pub aggregate_id: &'a str,
    pub sequence: i64,
    pub indexed: bool,
}

/// An event's aggregate id, sequence and whether it is indexed, from its bytes.
pub type Facts = fn(&[u8]) -> Option<(String, i64, bool)>;

/// How a store reads what it indexes from an event's bytes.
#[derive(Debug, Clone, Copy)]
pub struct Inspect {
    /// The index facts, when an index is rebuilt from a file (appends pass them in).
    pub facts: Facts,
    /// The event's timestamp in ms, for [`SegmentStore::token_at`]; `i64::MIN` when it has none
    /// that can be read (such an event is at or after no instant). Called on every append, so
    /// it must be cheap (a field scan, not a decode).
    pub timestamp: fn(&[u8]) -> i64,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} at offset {offset}: {what}")]
    Corrupt { path: PathBuf, offset: u64, what: String },
}

impl StoreError {
    fn io(path: &Path, source: io::Error) -> StoreError {
        StoreError::Io {
            path: path.to_owned(),
            source,
        }
    }

    fn corrupt(path: &Path, offset: u64, what: impl Into<String>) -> StoreError {
        StoreError::Corrupt {
            path: path.to_owned(),
            offset,
            what: what.into(),
        }
    }
}

impl From<StoreError> for io::Error {
    fn from(e: StoreError) -> io::Error {
        match e {
            StoreError::Io { source, .. } => source,
            other => io::Error::new(io::ErrorKind::InvalidData, other.to_string()),
        }
    }
}

pub(super) struct Closed {
    pub(super) path: PathBuf,
    pub(super) file: Arc<File>,
    next_token: i64,
    bloom: Bloom,
    /// The latest event timestamp in the segment (see `index`).
    latest: i64,
}

pub(super) struct Open {
    pub(super) base: i64,
    pub(super) path: PathBuf,
    pub(super) file: Arc<File>,
    len: u64,
    pub(super) index: SegmentIndex,
}

pub(super) struct State {
    pub(super) closed: BTreeMap<i64, Closed>,
    /// Per closed segment, oldest first: its base and the latest event timestamp in it and every
    /// segment before it. Never decreasing, so `token_at` finds the segment by binary search.
    latest: Vec<(i64, i64)>,
    pub(super) open: Open,
    next_token: i64,
    last_entry: Option<EntryRef>,
}

/// Room `may_roll` adds for a record's framing on top of its events' bytes.
const ROLL_SLACK: u64 = 4096;

pub struct SegmentStore {
    dir: PathBuf,
    kind: Kind,
    max_size: u64,
    inspect: Inspect,
    pub(super) state: RwLock<State>,
    index_cache: Mutex<VecDeque<(i64, Arc<SegmentIndex>)>>,
    visible: watch::Sender<i64>,
}

/// One file of a [`Shipment`]: its name in the store's directory, where it is, and how many of
/// its bytes to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShipFile {
    pub name: String,
    pub path: PathBuf,
    pub len: u64,
}

/// What [`SegmentStore::shipment`] lists.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Shipment {
    pub files: Vec<ShipFile>,
    /// The Raft entry of the last record shipped, if any.
    pub last: Option<EntryRef>,
    /// The Raft entry of the first record not shipped, if the store holds one.
    pub following: Option<EntryRef>,
}

/// One event read back: its token and its bytes.
pub type TokenEvent = (i64, Bytes);

/// The answer of [`SegmentStore::token_at`] and what it cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenAt {
    pub token: i64,
    /// Records read from the segment files to find it (0 or 1).
    pub records_read: u32,
}

/// The files of one segment (see [`SegmentStore::segment_files`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentFiles {
    /// The segment's first token.
    pub base: i64,
    /// The segment file, then (closed segments only) its index and bloom filter.
    pub paths: Vec<PathBuf>,
    /// False for the open segment, which may still grow.
    pub closed: bool,
}

impl SegmentStore {
    /// Opens (or creates) the store in `dir`, recovering the open segment.
    pub fn open(dir: &Path, kind: Kind, max_size: u64, inspect: Inspect) -> Result<SegmentStore, StoreError> {
        fs::create_dir_all(dir).map_err(|e| StoreError::io(dir, e))?;
        let mut bases = list_segments(dir, kind)?;
        // A segment file with a torn header can only be the newest one, created by a roll-over
        // that crashed; it holds nothing. Remove it so the previous one is open again.
        while let Some(&base) = bases.last() {
            let path = segment_path(dir, kind, base);
            let mut head = Vec::new();
            File::open(&path)
                .and_then(|f| f.take(record::HEADER_LEN).read_to_end(&mut head))
                .map_err(|e| StoreError::io(&path, e))?;
            match record::check_header(&head, kind) {
                Ok(true) => break,
                Ok(false) if bases.len() > 1 || base != 0 => {
                    tracing::warn!(path = %path.display(), "removing segment with a torn header");
                    fs::remove_file(&path).map_err(|e| StoreError::io(&path, e))?;
                    bases.pop();
                }
                Ok(false) => {
                    fs::remove_file(&path).map_err(|e| StoreError::io(&path, e))?;
                    bases.pop();
                }
                Err(what) => return Err(StoreError::corrupt(&path, 0, what)),
            }
        }
        if bases.is_empty() {
            create_segment(dir, kind, 0)?;
            bases.push(0);
        }
        let open_base = *bases.last().expect("at least one segment");
        let mut closed = BTreeMap::new();
        let mut latest: Vec<(i64, i64)> = Vec::new();
        let mut last_entry = None;
        let mut expected_base = bases[0];
        for &base in &bases[..bases.len() - 1] {
            if base != expected_base {
                return Err(StoreError::corrupt(
                    &segment_path(dir, kind, base),
                    0,
                    format!("segment starts at token {base}, expected {expected_base}"),
                ));
            }
            let (segment, entry) = open_closed(dir, kind, base, inspect)?;
            expected_base = segment.next_token;
            let before = latest.last().map_or(i64::MIN, |(_, t)| *t);
            latest.push((base, before.max(segment.latest)));
            last_entry = entry.or(last_entry);
            closed.insert(base, segment);
        }
        if open_base != expected_base {
            return Err(StoreError::corrupt(
                &segment_path(dir, kind, open_base),
                0,
                format!("segment starts at token {open_base}, expected {expected_base}"),
            ));
        }
        // Indexes of the open segment are rebuilt; stale ones from an interrupted close go.
        for suffix in ["index", "bloom"] {
            let _ = fs::remove_file(side_path(dir, open_base, suffix, kind));
        }
        let path = segment_path(dir, kind, open_base);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| StoreError::io(&path, e))?;
        let scan = scan(&file, &path, open_base, inspect, true)?;
        let file_len = file.metadata().map_err(|e| StoreError::io(&path, e))?.len();
        if scan.valid_len < file_len {
            tracing::warn!(
                path = %path.display(),
                kept = scan.valid_len,
                dropped = file_len - scan.valid_len,
                "cutting off an incomplete tail"
            );
            file.set_len(scan.valid_len).map_err(|e| StoreError::io(&path, e))?;
            file.sync_all().map_err(|e| StoreError::io(&path, e))?;
        }
        let next_token = scan.next_token;
        last_entry = scan.last_entry.or(last_entry);
        let (visible, _) = watch::channel(next_token);
        Ok(SegmentStore {
            dir: dir.to_owned(),
            kind,
            max_size,
            inspect,
            state: RwLock::new(State {
                closed,
                latest,
                open: Open {
                    base: open_base,
                    path,
                    file: Arc::new(file),
                    len: scan.valid_len,
                    index: scan.index,
                },
                next_token,
                last_entry,
            }),
            index_cache: Mutex::new(VecDeque::new()),
            visible,
        })
    }

    /// Appends the stored events of one Raft entry as one record and returns the first token.
    /// The caller (the single writer) passes each event's bytes and index facts.
    pub fn append(&self, entry: EntryRef, events: &[(&[u8], Indexed<'_>)]) -> Result<i64, StoreError> {
        // Scanned before the lock, which readers wait for.
        let max_timestamp = events
            .iter()
            .map(|(b, _)| (self.inspect.timestamp)(b))
            .max()
            .unwrap_or(i64::MIN);
        let mut state = self.state.write();
        let first_token = state.next_token;
        let bytes: Vec<&[u8]> = events.iter().map(|(b, _)| *b).collect();
        let (record, offsets) = record::encode(entry, first_token, &bytes);
        let size = record.len() as u64;
        if self.rolls_for(&state, size) {
            self.roll(&mut state)?;
        }
        let open = &mut state.open;
        open.file
            .write_all_at(&record, open.len)
            .map_err(|e| StoreError::io(&open.path, e))?;
        crate::crash::point("segment-after-write");
        let record_offset = open.len;
        open.index.add_record(first_token, record_offset, max_timestamp);
        for ((event, facts), offset) in events.iter().zip(&offsets) {
            if facts.indexed {
                open.index.add_event(
                    facts.aggregate_id,
                    Position {
                        sequence: facts.sequence,
                        offset: record_offset + u64::from(*offset),
                        len: event.len() as u32,
                    },
                );
            }
        }
        open.len += size;
        state.next_token += events.len() as i64;
        state.last_entry = Some(entry);
        let next = state.next_token;
        drop(state);
        self.visible.send_replace(next);
        Ok(first_token)
    }

    /// Closes the open segment and starts a new one at the next token.
    fn roll(&self, state: &mut State) -> Result<(), StoreError> {
        let open = &state.open;
        open.file.sync_data().map_err(|e| StoreError::io(&open.path, e))?;
        crate::crash::point("roll-after-sync");
        let mut bloom = Bloom::with_capacity(open.index.aggregates.len());
        for id in open.index.aggregates.keys() {
            bloom.insert(id);
        }
        write_side_files(
            &self.dir,
            self.kind,
            open.base,
            &open.index,
            open.len,
            state.next_token,
            &bloom,
        )?;
        crate::crash::point("roll-after-index");
        let base = state.next_token;
        let (path, file) = create_segment(&self.dir, self.kind, base)?;
        crate::crash::point("roll-after-create");
        let old = std::mem::replace(
            &mut state.open,
            Open {
                base,
                path,
                file: Arc::new(file),
                len: record::HEADER_LEN,
                index: SegmentIndex::default(),
            },
        );
        let latest = old.index.latest_timestamp();
        let index = Arc::new(old.index);
        self.cache_index(old.base, index);
        state.closed.insert(
            old.base,
            Closed {
                path: old.path,
                file: old.file,
                next_token: base,
                bloom,
                latest,
            },
        );
        let before = state.latest.last().map_or(i64::MIN, |(_, t)| *t);
        state.latest.push((old.base, before.max(latest)));
        Ok(())
    }

    /// Makes everything appended so far durable.
    pub fn sync(&self) -> Result<(), StoreError> {
        let (file, path) = {
            let state = self.state.read();
            (state.open.file.clone(), state.open.path.clone())
        };
        file.sync_data().map_err(|e| StoreError::io(&path, e))
    }

    /// Whether appending a record of about `bytes` may close the open segment first (an fsync
    /// and the index files): errs on the side of yes.
    pub fn may_roll(&self, bytes: u64) -> bool {
        self.rolls_for(&self.state.read(), bytes + ROLL_SLACK)
    }

    /// Whether a record of `size` bytes closes the open segment first: it would take a segment
    /// that holds records past the maximum size (a larger record gets a segment of its own).
    fn rolls_for(&self, state: &State, size: u64) -> bool {
        state.open.len > record::HEADER_LEN && state.open.len + size > self.max_size
    }

    /// The token the next stored event gets; also the number of tokens ever stored.
    pub fn next_token(&self) -> i64 {
        self.state.read().next_token
    }

    /// The first token still stored.
    pub fn first_token(&self) -> i64 {
        let state = self.state.read();
        state.closed.keys().next().copied().unwrap_or(state.open.base)
    }

    /// The Raft entry of the newest record, if any.
    pub fn last_entry(&self) -> Option<EntryRef> {
        self.state.read().last_entry
    }

    /// Watches the next token as records are written (for live tailing).
    pub fn subscribe(&self) -> watch::Receiver<i64> {
        self.visible.subscribe()
    }

    /// Every segment's files for a backup: closed segments oldest first, then the open one,
    /// read under one lock so the open segment listed is the one right after the last closed.
    ///
    /// A segment is in the closed list only once its data was fsynced and its index and bloom
    /// filter were written durably (`roll` does all of that before it moves the segment there,
    /// under the write lock), and a closed segment never changes again: a copy of one is final.
    /// The open segment's copy is a prefix of whole records plus at most one partial record,
    /// which recovery cuts off.
    pub fn segment_files(&self) -> Vec<SegmentFiles> {
        let state = self.state.read();
        let mut files: Vec<SegmentFiles> = state
            .closed
            .iter()
            .map(|(base, closed)| SegmentFiles {
                base: *base,
                paths: vec![
                    closed.path.clone(),
                    side_path(&self.dir, *base, "index", self.kind),
                    side_path(&self.dir, *base, "bloom", self.kind),
                ],
                closed: true,
            })
            .collect();
        files.push(SegmentFiles {
            base: state.open.base,
            paths: vec![state.open.path.clone()],
            closed: false,
        });
        files
    }

    /// The files that hold exactly the tokens before `upto`, for a member that catches up by
    /// receiving them (see `consensus::transfer`): every closed segment that ends at or before
    /// `upto` whole, with its index and bloom filter, then the segment holding `upto` cut at the
    /// record that starts there (that one becomes the receiver's open segment, whose index it
    /// rebuilds). Closed segments never change and the open one only grows past the cut, so the
    /// bytes listed stay the same while they are read.
    ///
    /// Fails if `upto` is past the stored tokens or not the first token of a record. Also
    /// returns the Raft entries of the records on both sides of the cut, so that the caller can
    /// check the cut is where its snapshot says.
    pub fn shipment(&self, upto: i64) -> Result<Shipment, StoreError> {
        let state = self.state.read();
        if upto > state.next_token || upto < self.first_token_locked(&state) {
            return Err(StoreError::corrupt(
                &self.dir,
                0,
                format!(
                    "cannot ship up to token {upto}: the store holds {}..{}",
                    self.first_token_locked(&state),
                    state.next_token
                ),
            ));
        }
        let mut files = Vec::new();
        let name = |path: &Path| {
            path.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        let mut cut = None;
        for (base, closed) in &state.closed {
            if closed.next_token <= upto {
                let len = fs::metadata(&closed.path)
                    .map_err(|e| StoreError::io(&closed.path, e))?
                    .len();
                files.push(ShipFile {
                    name: name(&closed.path),
                    path: closed.path.clone(),
                    len,
                });
                for what in ["index", "bloom"] {
                    let path = side_path(&self.dir, *base, what, self.kind);
                    let len = fs::metadata(&path).map_err(|e| StoreError::io(&path, e))?.len();
                    files.push(ShipFile {
                        name: name(&path),
                        path,
                        len,
                    });
                }
            } else {
                cut = Some((*base, closed.path.clone(), None));
                break;
            }
        }
        let (base, path, open_len) = cut.unwrap_or((state.open.base, state.open.path.clone(), Some(state.open.len)));
        let offset_of = |token: i64| -> Result<u64, StoreError> {
            if token == base {
                return Ok(record::HEADER_LEN);
            }
            if let Some(len) = open_len
                && token == state.next_token
            {
                return Ok(len);
            }
            let index = if open_len.is_some() {
                None
            } else {
                Some(self.closed_index(base)?)
            };
            let index = index.as_deref().unwrap_or(&state.open.index);
            match index.record_for(token) {
                Some((first, offset)) if first == token => Ok(offset),
                _ => Err(StoreError::corrupt(
                    &path,
                    0,
                    format!("token {upto} does not start a record"),
                )),
            }
        };
        let len = offset_of(upto)?;
        files.push(ShipFile {
            name: name(&path),
            path: path.clone(),
            len,
        });
        let following = if upto < state.next_token {
            self.entry_of(&state, upto)?
        } else {
            None
        };
        let last = if upto > self.first_token_locked(&state) {
            self.entry_of(&state, upto - 1)?
        } else {
            None
        };
        Ok(Shipment { files, last, following })
    }

    /// The Raft entry of the record holding `token` (which must be stored).
    fn entry_of(&self, state: &State, token: i64) -> Result<Option<EntryRef>, StoreError> {
        let (path, offset) = if token >= state.open.base {
            (
                state.open.path.clone(),
                state.open.index.record_for(token).map(|(_, o)| o),
            )
        } else {
            let (base, closed) = state
                .closed
                .range(..=token)
                .next_back()
                .expect("token within closed segments");
            (
                closed.path.clone(),
                self.closed_index(*base)?.record_for(token).map(|(_, o)| o),
            )
        };
        match offset {
            Some(offset) => entry_at(&path, offset).map(Some),
            None => Ok(None),
        }
    }

    /// Replaces everything this store holds by the store in `staged` (the same layout, every
    /// file complete and durable), moving the current directory to `trash`, and reopens: readers
    /// see the new segments from then on. Only for a store whose tokens the staged one holds and
    /// more (a member catching up), so what a reader saw stays true. Blocking file I/O.
    pub fn replace_with(&self, staged: &Path, trash: &Path) -> Result<(), StoreError> {
        let mut state = self.state.write();
        swap_dir(&self.dir, staged, trash)?;
        let fresh = SegmentStore::open(&self.dir, self.kind, self.max_size, self.inspect)?;
        if fresh.next_token() < state.next_token {
            tracing::warn!(
                dir = %self.dir.display(),
                before = state.next_token,
                after = fresh.next_token(),
                "an installed store holds fewer tokens than the one it replaced"
            );
        }
        *state = fresh.state.into_inner();
        self.index_cache.lock().clear();
        let next = state.next_token;
        drop(state);
        self.visible.send_replace(next);
        Ok(())
    }

    /// Base token and path of every closed segment, oldest first.
    pub fn closed_segments(&self) -> Vec<(i64, PathBuf)> {
        let state = self.state.read();
        state.closed.iter().map(|(b, c)| (*b, c.path.clone())).collect()
    }

    /// Highest sequence number stored for the aggregate, if it has any.
    pub fn last_sequence(&self, aggregate_id: &str) -> Result<Option<i64>, StoreError> {
        let candidates = {
            let state = self.state.read();
            if let Some(seq) = state.open.index.last_sequence(aggregate_id) {
                return Ok(Some(seq));
            }
            self.candidates(&state, aggregate_id)
        };
        for (base, _) in candidates.iter().rev() {
            if let Some(seq) = self.closed_index(*base)?.last_sequence(aggregate_id) {
                return Ok(Some(seq));
            }
        }
        Ok(None)
    }

    /// Closed segments whose bloom filter may hold the aggregate, oldest first.
    pub(super) fn candidates(&self, state: &State, aggregate_id: &str) -> Vec<(i64, Arc<File>)> {
        state
            .closed
            .iter()
            .filter(|(_, c)| c.bloom.may_contain(aggregate_id))
            .map(|(b, c)| (*b, c.file.clone()))
            .collect()
    }

    /// The stored entries of an aggregate whose sequence is in `sequences`, in storage order
    /// (ascending sequence for events). Blocking file I/O: call from a blocking context.
    pub fn read_aggregate(
        &self,
        aggregate_id: &str,
        sequences: RangeInclusive<i64>,
    ) -> Result<Vec<(i64, Bytes)>, StoreError> {
        let in_range = |positions: &[Position]| -> Vec<Position> {
            positions
                .iter()
                .filter(|p| sequences.contains(&p.sequence))
                .copied()
                .collect()
        };
        let (candidates, open_file, open_path, open_positions) = {
            let state = self.state.read();
            (
                self.candidates(&state, aggregate_id),
                state.open.file.clone(),
                state.open.path.clone(),
                state
                    .open
                    .index
                    .aggregates
                    .get(aggregate_id)
                    .map(|p| in_range(p))
                    .unwrap_or_default(),
            )
        };
        let mut out = Vec::new();
        for (base, file) in candidates {
            let index = self.closed_index(base)?;
            if let Some(positions) = index.aggregates.get(aggregate_id) {
                let path = segment_path(&self.dir, self.kind, base);
                read_positions(&file, &path, &in_range(positions), &mut out)?;
            }
        }
        read_positions(&open_file, &open_path, &open_positions, &mut out)?;
        Ok(out)
    }

    /// Reads events from `from` on, at most `max_events` of them and about `max_bytes`, never
    /// past what is visible. Blocking file I/O: call from a blocking context.
    pub fn read_from(&self, from: i64, max_events: usize, max_bytes: usize) -> Result<Vec<TokenEvent>, StoreError> {
        let mut out = self.read_from_with(from, max_events, max_bytes, &mut ReadBuffers::default())?;
        out.truncate(max_events);
        Ok(out)
    }

    /// [`read_from`](Self::read_from) for a reader that goes on reading (a tracking stream): into
    /// buffers it keeps, and by whole records. It may return more than `max_events`: the rest of
    /// the last record it read, whose checksum covers the whole record, so no record is read
    /// (and checked) twice.
    pub fn read_from_with(
        &self,
        from: i64,
        max_events: usize,
        max_bytes: usize,
        buffers: &mut ReadBuffers,
    ) -> Result<Vec<TokenEvent>, StoreError> {
        let mut out = Vec::new();
        let mut token = from;
        let mut bytes_read = 0usize;
        while out.len() < max_events && bytes_read < max_bytes {
            let wanted = max_events - out.len();
            let Some((file, path, start, end, segment_end_token)) = self.locate(token, wanted)? else {
                break;
            };
            let before = out.len();
            bytes_read += read_records(
                &file,
                &path,
                start,
                end,
                token,
                segment_end_token,
                wanted,
                max_bytes - bytes_read,
                buffers,
                &mut out,
            )?;
            match out.last() {
                Some((last, _)) if out.len() > before => token = last + 1,
                _ => break,
            }
        }
        Ok(out)
    }

    /// The first token whose event has a timestamp at or after `instant` (ms), in token order;
    /// the next token when there is none. Exact whatever order the clients' timestamps are in:
    /// the segments' and records' running maxima (see `index`) lead by binary search to the one
    /// record that holds the answer, so at most one record is read. Blocking file I/O.
    pub fn token_at(&self, instant: i64) -> Result<TokenAt, StoreError> {
        let (segment, first, end) = {
            let state = self.state.read();
            let i = state.latest.partition_point(|(_, latest)| *latest < instant);
            let closed = state
                .latest
                .get(i)
                .map(|(base, _)| (*base, state.closed[base].next_token));
            match closed {
                Some((base, next)) => {
                    drop(state);
                    let index = self.closed_index(base)?;
                    let path = segment_path(&self.dir, self.kind, base);
                    let r = index.first_record_reaching(instant).ok_or_else(|| {
                        StoreError::corrupt(&path, 0, "index disagrees with its segment's timestamps")
                    })?;
                    let end = index.records.get(r + 1).map_or(next, |(t, _)| *t);
                    (path, index.records[r].0, end)
                }
                None => {
                    let index = &state.open.index;
                    let Some(r) = index.first_record_reaching(instant) else {
                        return Ok(TokenAt {
                            token: state.next_token,
                            records_read: 0,
                        });
                    };
                    let end = index.records.get(r + 1).map_or(state.next_token, |(t, _)| *t);
                    (state.open.path.clone(), index.records[r].0, end)
                }
            }
        };
        let record = self.read_from(first, (end - first) as usize, usize::MAX)?;
        let found = record
            .iter()
            .find(|(_, event)| (self.inspect.timestamp)(event) >= instant)
            .map(|(token, _)| *token)
            .ok_or_else(|| {
                StoreError::corrupt(&segment, 0, format!("no event at or after {instant} at token {first}"))
            })?;
        Ok(TokenAt {
            token: found,
            records_read: 1,
        })
    }

    /// Finds the segment and byte range to read for `count` tokens from `token`: (file, path,
    /// start offset, end offset, first token past what may be read there). The range ends with
    /// the record that holds the last wanted token, so a read takes no more than it needs.
    #[allow(clippy::type_complexity)]
    fn locate(&self, token: i64, count: usize) -> Result<Option<(Arc<File>, PathBuf, u64, u64, i64)>, StoreError> {
        let last = token.saturating_add(i64::try_from(count).unwrap_or(i64::MAX).max(1) - 1);
        let state = self.state.read();
        if token >= state.next_token || token < self.first_token_locked(&state) {
            return Ok(None);
        }
        if token >= state.open.base {
            let index = &state.open.index;
            let (_, offset) = index.record_for(token).expect("token within the open segment");
            return Ok(Some((
                state.open.file.clone(),
                state.open.path.clone(),
                offset,
                index.record_after(last).unwrap_or(state.open.len),
                state.next_token,
            )));
        }
        let (base, closed) = state
            .closed
            .range(..=token)
            .next_back()
            .expect("token within closed segments");
        let (base, file, path, next) = (*base, closed.file.clone(), closed.path.clone(), closed.next_token);
        drop(state);
        let index = self.closed_index(base)?;
        let (_, offset) = index
            .record_for(token)
            .ok_or_else(|| StoreError::corrupt(&path, 0, format!("no record for token {token}")))?;
        let end = match index.record_after(last) {
            Some(end) => end,
            None => file.metadata().map_err(|e| StoreError::io(&path, e))?.len(),
        };
        Ok(Some((file, path, offset, end, next)))
    }

    fn first_token_locked(&self, state: &State) -> i64 {
        state.closed.keys().next().copied().unwrap_or(state.open.base)
    }

    /// The index of a closed segment, from the cache or its file (rebuilt if damaged).
    pub(super) fn closed_index(&self, base: i64) -> Result<Arc<SegmentIndex>, StoreError> {
        if let Some((_, index)) = self.index_cache.lock().iter().find(|(b, _)| *b == base) {
            return Ok(index.clone());
        }
        let index = Arc::new(load_or_rebuild_index(&self.dir, self.kind, base, self.inspect)?.0);
        self.cache_index(base, index.clone());
        Ok(index)
    }

    fn cache_index(&self, base: i64, index: Arc<SegmentIndex>) {
        let mut cache = self.index_cache.lock();
        cache.retain(|(b, _)| *b != base);
        if cache.len() >= INDEX_CACHE {
            cache.pop_front();
        }
        cache.push_back((base, index));
    }
}

/// Reads the events at `positions` into one buffer whose slices are returned. Neighbours (in
/// file order, as an index lists them) closer than `COALESCE_GAP` are read by one `pread`,
/// which costs less than a system call per event.
pub(super) fn read_positions(
    file: &File,
    path: &Path,
    positions: &[Position],
    out: &mut Vec<(i64, Bytes)>,
) -> Result<(), StoreError> {
    /// One `pread`: file range `[start, end)` holding `positions[first..last]`.
    struct Run {
        start: u64,
        end: u64,
        first: usize,
        last: usize,
    }
    let mut runs: Vec<Run> = Vec::new();
    for (i, p) in positions.iter().enumerate() {
        let end = p.offset + u64::from(p.len);
        match runs.last_mut() {
            Some(run)
                if p.offset >= run.start
                    && p.offset <= run.end + COALESCE_GAP
                    && end.max(run.end) - run.start <= MAX_RUN =>
            {
                run.end = run.end.max(end);
                run.last = i + 1;
            }
            _ => runs.push(Run {
                start: p.offset,
                end,
                first: i,
                last: i + 1,
            }),
        }
    }
    let total: u64 = runs.iter().map(|r| r.end - r.start).sum();
    let mut buf = vec![0u8; total as usize];
    let mut at = 0usize;
    for run in &runs {
        let len = (run.end - run.start) as usize;
        file.read_exact_at(&mut buf[at..at + len], run.start)
            .map_err(|e| StoreError::io(path, e))?;
        at += len;
    }
    let buf = Bytes::from(buf);
    let mut at = 0usize;
    for run in &runs {
        for p in &positions[run.first..run.last] {
            let start = at + (p.offset - run.start) as usize;
            out.push((p.sequence, buf.slice(start..start + p.len as usize)));
        }
        at += (run.end - run.start) as usize;
    }
    Ok(())
}

/// Reads whole records from `offset` up to `end`, keeping events with tokens in
/// `[from, limit_token)`, until a record takes the count to `max_events` or more. Returns the
/// number of bytes read.
#[allow(clippy::too_many_arguments)]
fn read_records(
    file: &File,
    path: &Path,
    mut offset: u64,
    end: u64,
    from: i64,
    limit_token: i64,
    max_events: usize,
    max_bytes: usize,
    buffers: &mut ReadBuffers,
    out: &mut Vec<TokenEvent>,
) -> Result<usize, StoreError> {
    let mut total = 0usize;
    let mut taken = 0usize;
    while offset < end && taken < max_events && total < max_bytes {
        let want = ((end - offset) as usize).min((max_bytes - total).clamp(record::PREFIX_LEN, READ_CHUNK));
        let chunk = buffers.read(file, path, offset, want)?;
        let mut at = 0usize;
        loop {
            match record::parse(&chunk[at..]) {
                Parsed::Record { len, body } => {
                    for (i, (rel, data)) in body.events.iter().enumerate() {
                        let token = body.first_token + i as i64;
                        if token >= from && token < limit_token {
                            let start = at + *rel as usize;
                            out.push((token, chunk.slice(start..start + data.len())));
                            taken += 1;
                        }
                    }
                    at += len;
                    if taken >= max_events || at >= chunk.len() {
                        break;
                    }
                }
                Parsed::Incomplete if at > 0 => break,
                Parsed::Incomplete => {
                    // One record larger than the chunk: read exactly that record.
                    let mut prefix = [0u8; record::PREFIX_LEN];
                    file.read_exact_at(&mut prefix, offset)
                        .map_err(|e| StoreError::io(path, e))?;
                    let len = record::PREFIX_LEN + u32::from_le_bytes(prefix[0..4].try_into().expect("4")) as usize;
                    if offset + len as u64 > end {
                        return Err(StoreError::corrupt(path, offset, "record runs past the end of data"));
                    }
                    let whole = buffers.read(file, path, offset, len)?;
                    let Parsed::Record { body, .. } = record::parse(&whole) else {
                        return Err(StoreError::corrupt(path, offset, "damaged record"));
                    };
                    for (i, (rel, data)) in body.events.iter().enumerate() {
                        let token = body.first_token + i as i64;
                        if token >= from && token < limit_token {
                            out.push((token, whole.slice(*rel as usize..*rel as usize + data.len())));
                            taken += 1;
                        }
                    }
                    at = len;
                    break;
                }
                Parsed::Corrupt(what) => return Err(StoreError::corrupt(path, offset + at as u64, what)),
            }
        }
        offset += at as u64;
        total += at;
        if at == 0 {
            break;
        }
    }
    Ok(total)
}

/// Buffers a reader reads records into, used again once no event sliced from them is alive:
/// a tracking stream then neither allocates nor zeroes memory for each read. At most
/// `KEPT_BUFFERS` are kept; a buffer still in use when it drops out is freed by its last user.
#[derive(Default)]
pub struct ReadBuffers {
    lent: VecDeque<Bytes>,
}

const KEPT_BUFFERS: usize = 3;

impl ReadBuffers {
    /// Reads `len` bytes at `offset`.
    fn read(&mut self, file: &File, path: &Path, offset: u64, len: usize) -> Result<Bytes, StoreError> {
        let mut buf = match self.reclaim() {
            Some(buf) if buf.capacity() >= len => buf,
            // Rounded up so that reads of varying sizes can take turns in it.
            _ => BytesMut::with_capacity(len.max(len.next_power_of_two().min(READ_CHUNK))),
        };
        // Zeroes only what this buffer never held.
        buf.resize(len, 0);
        file.read_exact_at(&mut buf, offset)
            .map_err(|e| StoreError::io(path, e))?;
        let bytes = buf.freeze();
        if self.lent.len() >= KEPT_BUFFERS {
            self.lent.pop_front();
        }
        self.lent.push_back(bytes.clone());
        Ok(bytes)
    }

    /// A kept buffer nothing else refers to any more.
    fn reclaim(&mut self) -> Option<BytesMut> {
        let i = self.lent.iter().position(Bytes::is_unique)?;
        self.lent.remove(i)?.try_into_mut().ok()
    }
}

struct Scan {
    index: SegmentIndex,
    valid_len: u64,
    next_token: i64,
    last_entry: Option<EntryRef>,
}

/// Scans a segment's records. With `tolerate_tail`, the first incomplete or damaged record ends
/// the data (the open segment after a crash); otherwise any damage is an error.
fn scan(file: &File, path: &Path, base: i64, inspect: Inspect, tolerate_tail: bool) -> Result<Scan, StoreError> {
    let mut data = Vec::new();
    (&*file).read_to_end(&mut data).map_err(|e| StoreError::io(path, e))?;
    let mut index = SegmentIndex::default();
    let mut at = record::HEADER_LEN as usize;
    let mut next_token = base;
    let mut last_entry = None;
    while at < data.len() {
        match record::parse(&data[at..]) {
            Parsed::Record { len, body } => {
                if body.first_token != next_token {
                    let what = format!("record starts at token {}, expected {next_token}", body.first_token);
                    if tolerate_tail {
                        tracing::warn!(path = %path.display(), offset = at, "{what}; treating as torn tail");
                        break;
                    }
                    return Err(StoreError::corrupt(path, at as u64, what));
                }
                let max_timestamp = body
                    .events
                    .iter()
                    .map(|(_, event)| (inspect.timestamp)(event))
                    .max()
                    .unwrap_or(i64::MIN);
                index.add_record(next_token, at as u64, max_timestamp);
                for (rel, event) in &body.events {
                    let Some((id, sequence, indexed)) = (inspect.facts)(event) else {
                        return Err(StoreError::corrupt(path, at as u64, "event does not decode"));
                    };
                    if indexed {
                        index.add_event(
                            &id,
                            Position {
                                sequence,
                                offset: (at + *rel as usize) as u64,
                                len: event.len() as u32,
                            },
                        );
                    }
                }
                next_token += body.events.len() as i64;
                last_entry = Some(body.entry);
                at += len;
            }
            Parsed::Incomplete | Parsed::Corrupt(_) if tolerate_tail => break,
            Parsed::Incomplete => return Err(StoreError::corrupt(path, at as u64, "incomplete record")),
            Parsed::Corrupt(what) => return Err(StoreError::corrupt(path, at as u64, what)),
        }
    }
    Ok(Scan {
        index,
        valid_len: at.min(data.len()).max(record::HEADER_LEN as usize) as u64,
        next_token,
        last_entry,
    })
}

fn open_closed(dir: &Path, kind: Kind, base: i64, inspect: Inspect) -> Result<(Closed, Option<EntryRef>), StoreError> {
    let path = segment_path(dir, kind, base);
    let file = File::open(&path).map_err(|e| StoreError::io(&path, e))?;
    let (index, next_token, entry) = load_or_rebuild_index(dir, kind, base, inspect)?;
    let bloom_path = side_path(dir, base, "bloom", kind);
    let bloom = match fs::read(&bloom_path).ok().and_then(|b| Bloom::decode(&b)) {
        Some(bloom) => bloom,
        None => {
            let mut bloom = Bloom::with_capacity(index.aggregates.len());
            for id in index.aggregates.keys() {
                bloom.insert(id);
            }
            let mut bytes = Vec::new();
            bloom.encode(&mut bytes);
            write_atomically(&bloom_path, &bytes)?;
            bloom
        }
    };
    Ok((
        Closed {
            path,
            file: Arc::new(file),
            next_token,
            bloom,
            latest: index.latest_timestamp(),
        },
        entry,
    ))
}

/// Loads a closed segment's index, or rebuilds it (and its file) by scanning the segment, which
/// must then be whole. Returns the index, the next token and — when scanned — the last entry.
fn load_or_rebuild_index(
    dir: &Path,
    kind: Kind,
    base: i64,
    inspect: Inspect,
) -> Result<(SegmentIndex, i64, Option<EntryRef>), StoreError> {
    let path = segment_path(dir, kind, base);
    let index_path = side_path(dir, base, "index", kind);
    let file_len = fs::metadata(&path).map_err(|e| StoreError::io(&path, e))?.len();
    if let Some((index, data_len, next)) = fs::read(&index_path).ok().and_then(|b| SegmentIndex::decode(&b))
        && data_len == file_len
    {
        let entry = last_entry_of(&path, &index)?;
        return Ok((index, next, entry));
    }
    tracing::info!(path = %path.display(), "rebuilding segment index");
    let file = File::open(&path).map_err(|e| StoreError::io(&path, e))?;
    let scan = scan(&file, &path, base, inspect, false)?;
    write_atomically(&index_path, &scan.index.encode(file_len, scan.next_token))?;
    Ok((scan.index, scan.next_token, scan.last_entry))
}

/// The Raft entry of a closed segment's last record.
fn last_entry_of(path: &Path, index: &SegmentIndex) -> Result<Option<EntryRef>, StoreError> {
    let Some((_, offset)) = index.records.last() else {
        return Ok(None);
    };
    entry_at(path, *offset).map(Some)
}

/// The Raft entry of the record at `offset` of a segment file.
fn entry_at(path: &Path, offset: u64) -> Result<EntryRef, StoreError> {
    let file = File::open(path).map_err(|e| StoreError::io(path, e))?;
    let mut head = [0u8; record::PREFIX_LEN + 24];
    file.read_exact_at(&mut head, offset)
        .map_err(|e| StoreError::io(path, e))?;
    let word = |i: usize| u64::from_le_bytes(head[i..i + 8].try_into().expect("8 bytes"));
    Ok(EntryRef {
        term: word(8),
        leader: word(16),
        index: word(24),
    })
}

fn write_side_files(
    dir: &Path,
    kind: Kind,
    base: i64,
    index: &SegmentIndex,
    data_len: u64,
    next_token: i64,
    bloom: &Bloom,
) -> Result<(), StoreError> {
    write_atomically(
        &side_path(dir, base, "index", kind),
        &index.encode(data_len, next_token),
    )?;
    let mut bytes = Vec::new();
    bloom.encode(&mut bytes);
    write_atomically(&side_path(dir, base, "bloom", kind), &bytes)
}

/// Writes a file so that it is either absent or whole after a crash.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let mut name = path.file_name().expect("a file path").to_os_string();
    name.push(".tmp");
    let tmp = path.with_file_name(name);
    let io = |e| StoreError::io(path, e);
    {
        let file = File::create(&tmp).map_err(io)?;
        file.write_all_at(bytes, 0).map_err(io)?;
        file.sync_all().map_err(io)?;
    }
    fs::rename(&tmp, path).map_err(io)?;
    sync_dir(path.parent().expect("file in a directory"))
}

/// Puts the directory `staged` in the place of `live`, moving `live` (if there) to `trash`, and
/// makes the renames durable. Done again after a crash it finishes what was begun: once `staged`
/// is gone, it has nothing left to do.
pub fn swap_dir(live: &Path, staged: &Path, trash: &Path) -> Result<(), StoreError> {
    if !staged.exists() {
        return Ok(());
    }
    if live.exists() {
        if trash.exists() {
            fs::remove_dir_all(trash).map_err(|e| StoreError::io(trash, e))?;
        }
        fs::rename(live, trash).map_err(|e| StoreError::io(live, e))?;
    }
    crate::crash::point("install-after-move-aside");
    fs::rename(staged, live).map_err(|e| StoreError::io(staged, e))?;
    sync_dir(live.parent().expect("a store directory has a parent"))?;
    if let Some(parent) = trash.parent() {
        sync_dir(parent)?;
    }
    Ok(())
}

pub fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StoreError::io(dir, e))
}

fn create_segment(dir: &Path, kind: Kind, base: i64) -> Result<(PathBuf, File), StoreError> {
    let path = segment_path(dir, kind, base);
    let io = |e| StoreError::io(&path, e);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(io)?;
    file.write_all_at(&record::header(kind), 0).map_err(io)?;
    file.sync_all().map_err(io)?;
    sync_dir(dir)?;
    Ok((path, file))
}

pub fn segment_path(dir: &Path, kind: Kind, base: i64) -> PathBuf {
    dir.join(format!("{base:020}.{}", kind.suffix()))
}

fn side_path(dir: &Path, base: i64, what: &str, kind: Kind) -> PathBuf {
    // Snapshot side files get their own suffixes so both kinds could share one folder.
    let suffix = match kind {
        Kind::Events => what.to_owned(),
        Kind::Snapshots => format!("s{what}"),
    };
    dir.join(format!("{base:020}.{suffix}"))
}

fn list_segments(dir: &Path, kind: Kind) -> Result<Vec<i64>, StoreError> {
    let mut bases = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| StoreError::io(dir, e))? {
        let entry = entry.map_err(|e| StoreError::io(dir, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(stem) = name.strip_suffix(&format!(".{}", kind.suffix()))
            && stem.len() == 20
            && let Ok(base) = stem.parse::<i64>()
        {
            bases.push(base);
        }
    }
    bases.sort_unstable();
    Ok(bases)
}
