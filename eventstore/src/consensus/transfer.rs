//! A context's snapshot as openraft moves it: the segment files themselves, streamed.
//!
//! A snapshot of a context is a pointer (see `state_machine`): the segments up to the tokens it
//! names are its state. A member behind the leader's purged log receives those files, so it never
//! replays history as entries. openraft's chunked snapshot path carries them: the leader reads
//! this stream in chunks of `snapshot_max_chunk_size` (each one relay message, so the router's
//! per-group bound on a peer link applies and other groups' traffic goes on), and the receiver
//! writes the chunks into its own stream, which stages the files (see `crate::install`).
//!
//! The stream, the same bytes whoever builds it from the same manifest:
//! ```text
//! "MYELSNP1" | u32 manifest length | u32 CRC32 of the manifest | manifest (JSON)
//! per file of the manifest, in order:
//!     frames of up to FRAME bytes: data | u32 CRC32 of (u32 file number, u64 offset, data)
//!     u32 CRC32 of the whole file
//! ```
//! What holds:
//! - The receiver checks every frame as it completes (a damaged chunk is refused at once, the
//!   transfer fails and nothing is installed), and each file's length and whole-file checksum
//!   before it fsyncs it. The frame's checksum covers its file and offset, so data put in the
//!   wrong place is refused too.
//! - Neither side holds more than a frame and a chunk in memory, however large the context.
//! - A chunk sent again (an answer that was lost) is taken as already written; a gap is refused;
//!   a transfer that starts over (offset 0) starts over on a fresh staging directory.
//! - The stream of one snapshot is fixed when the leader lists its files: closed segments never
//!   change, and the segment cut at the snapshot's token only grows past the cut.

use std::fs::File;
use std::io::{self, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncSeek, AsyncWrite, ReadBuf};

use super::state_machine::SnapshotPointer;
use crate::install::Staging;
use crate::segment::store::Shipment;

const MAGIC: &[u8; 8] = b"MYELSNP1";
const HEAD_LEN: u64 = 16;
/// Bytes of file data per checked frame.
pub const FRAME: u64 = 256 << 10;
/// The largest manifest a receiver takes (about 200 bytes a file: hundreds of thousands of files).
const MAX_MANIFEST: u32 = 64 << 20;

/// One file of a snapshot stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// `events` or `snapshots`.
    pub store: String,
    /// Its name in the store's directory.
    pub name: String,
    pub len: u64,
}

/// What a snapshot stream holds: the pointer the receiver's state answers to once installed, and
/// the files.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub pointer: SnapshotPointer,
    pub files: Vec<FileEntry>,
}

impl Manifest {
    /// Bytes of file data the stream carries.
    pub fn data_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.len).sum()
    }
}

fn frames(len: u64) -> u64 {
    len.div_ceil(FRAME)
}

fn frame_len(len: u64, index: u64) -> u64 {
    (len - index * FRAME).min(FRAME)
}

fn frame_crc(file: usize, offset: u64, data: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&(file as u32).to_le_bytes());
    hasher.update(&offset.to_le_bytes());
    hasher.update(data);
    hasher.finalize()
}

fn invalid(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

/// Runs file I/O of a stream's poll off the async worker when the runtime allows it.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// Where each part of a stream starts.
#[derive(Debug)]
struct Layout {
    head: Vec<u8>,
    files: Vec<FileEntry>,
    /// Stream offset of each file's first frame.
    starts: Vec<u64>,
    total: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Head,
    Frame { file: usize, index: u64 },
    Trailer { file: usize },
}

impl Layout {
    fn new(manifest: &Manifest) -> io::Result<Layout> {
        let json = serde_json::to_vec(manifest).map_err(io::Error::other)?;
        let mut head = Vec::with_capacity(HEAD_LEN as usize + json.len());
        head.extend_from_slice(MAGIC);
        head.extend_from_slice(&(json.len() as u32).to_le_bytes());
        head.extend_from_slice(&crc32fast::hash(&json).to_le_bytes());
        head.extend_from_slice(&json);
        let mut starts = Vec::with_capacity(manifest.files.len());
        let mut at = head.len() as u64;
        for file in &manifest.files {
            starts.push(at);
            at += file.len + 4 * frames(file.len) + 4;
        }
        Ok(Layout {
            head,
            files: manifest.files.clone(),
            starts,
            total: at,
        })
    }

    /// The part holding stream offset `pos` and where it starts.
    fn part_at(&self, pos: u64) -> Option<(Part, u64)> {
        if pos >= self.total {
            return None;
        }
        if pos < self.head.len() as u64 {
            return Some((Part::Head, 0));
        }
        let file = self.starts.partition_point(|s| *s <= pos) - 1;
        let start = self.starts[file];
        let len = self.files[file].len;
        let framed = len + 4 * frames(len);
        let rel = pos - start;
        if rel < framed {
            let index = rel / (FRAME + 4);
            Some((Part::Frame { file, index }, start + index * (FRAME + 4)))
        } else {
            Some((Part::Trailer { file }, start + framed))
        }
    }
}

/// The leader's side: reads the files of a snapshot as a stream.
pub struct Outgoing {
    layout: Layout,
    paths: Vec<PathBuf>,
    pos: u64,
    /// The part read last: its start and bytes.
    part: Option<(u64, Vec<u8>)>,
    /// Whole-file checksums, as reading the frames in order computes them.
    file_crcs: Vec<Option<u32>>,
    /// (file, next frame, checksum so far) of the file being read in order.
    running: Option<(usize, u64, crc32fast::Hasher)>,
    open: Option<(usize, File)>,
}

impl std::fmt::Debug for Outgoing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outgoing")
            .field("files", &self.layout.files.len())
            .field("total", &self.layout.total)
            .field("pos", &self.pos)
            .finish()
    }
}

impl Outgoing {
    /// The stream of `pointer`'s state, from the files the stores listed for it.
    pub fn new(pointer: SnapshotPointer, events: Shipment, snapshots: Shipment) -> io::Result<Outgoing> {
        let mut files = Vec::new();
        let mut paths = Vec::new();
        for (store, shipment) in [("events", events), ("snapshots", snapshots)] {
            for file in shipment.files {
                files.push(FileEntry {
                    store: store.to_owned(),
                    name: file.name,
                    len: file.len,
                });
                paths.push(file.path);
            }
        }
        let manifest = Manifest { pointer, files };
        let layout = Layout::new(&manifest)?;
        Ok(Outgoing {
            file_crcs: vec![None; paths.len()],
            layout,
            paths,
            pos: 0,
            part: None,
            running: None,
            open: None,
        })
    }

    /// Bytes of the whole stream.
    pub fn total(&self) -> u64 {
        self.layout.total
    }

    fn file(&mut self, file: usize) -> io::Result<&File> {
        if self.open.as_ref().is_none_or(|(i, _)| *i != file) {
            let opened = File::open(&self.paths[file])
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", self.paths[file].display())))?;
            self.open = Some((file, opened));
        }
        Ok(&self.open.as_ref().expect("just opened").1)
    }

    fn read_data(&mut self, file: usize, offset: u64, len: u64) -> io::Result<Vec<u8>> {
        let mut data = vec![0; len as usize];
        self.file(file)?.read_exact_at(&mut data, offset)?;
        Ok(data)
    }

    fn build(&mut self, part: Part) -> io::Result<Vec<u8>> {
        match part {
            Part::Head => Ok(self.layout.head.clone()),
            Part::Frame { file, index } => {
                let len = self.layout.files[file].len;
                let offset = index * FRAME;
                let mut data = self.read_data(file, offset, frame_len(len, index))?;
                match &mut self.running {
                    Some((f, next, hasher)) if *f == file && *next == index => {
                        hasher.update(&data);
                        *next += 1;
                    }
                    _ if index == 0 => {
                        let mut hasher = crc32fast::Hasher::new();
                        hasher.update(&data);
                        self.running = Some((file, 1, hasher));
                    }
                    _ => {}
                }
                if let Some((f, next, hasher)) = &self.running
                    && *f == file
                    && *next == frames(len)
                {
                    self.file_crcs[file] = Some(hasher.clone().finalize());
                    self.running = None;
                }
                let crc = frame_crc(file, offset, &data);
                data.extend_from_slice(&crc.to_le_bytes());
                Ok(data)
            }
            Part::Trailer { file } => {
                let crc = match self.file_crcs[file] {
                    Some(crc) => crc,
                    None => {
                        // Read out of order (a chunk asked for again): checksum the file anew.
                        let len = self.layout.files[file].len;
                        let mut hasher = crc32fast::Hasher::new();
                        for index in 0..frames(len) {
                            hasher.update(&self.read_data(file, index * FRAME, frame_len(len, index))?);
                        }
                        let crc = hasher.finalize();
                        self.file_crcs[file] = Some(crc);
                        crc
                    }
                };
                Ok(crc.to_le_bytes().to_vec())
            }
        }
    }

    fn fill(&mut self, buf: &mut ReadBuf<'_>) -> io::Result<()> {
        while buf.remaining() > 0 {
            let Some((part, start)) = self.layout.part_at(self.pos) else {
                break;
            };
            let cached = matches!(&self.part, Some((s, _)) if *s == start);
            if !cached {
                let bytes = self.build(part)?;
                self.part = Some((start, bytes));
            }
            let (start, bytes) = self.part.as_ref().expect("part built");
            let from = (self.pos - start) as usize;
            let n = (bytes.len() - from).min(buf.remaining());
            buf.put_slice(&bytes[from..from + n]);
            self.pos += n as u64;
        }
        Ok(())
    }
}

/// Which part a receiver expects next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Head,
    Manifest { len: u32, crc: u32 },
    Part(Part),
    Complete,
}

/// The receiving member's side: takes the stream's bytes as they come and stages the files.
pub struct Incoming {
    context_dir: PathBuf,
    staging: Option<Staging>,
    manifest: Option<Manifest>,
    stage: Stage,
    /// Bytes of the part being assembled.
    pending: Vec<u8>,
    /// Where the next write lands (openraft seeks to each chunk's offset).
    pos: u64,
    /// Stream bytes taken so far.
    taken: u64,
    current: Option<File>,
    hasher: crc32fast::Hasher,
    /// Why the stream was refused; every later write is refused too, until it starts over.
    failed: Option<String>,
    started: Instant,
}

impl std::fmt::Debug for Incoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incoming")
            .field("context_dir", &self.context_dir)
            .field("stage", &self.stage)
            .field("taken", &self.taken)
            .field("failed", &self.failed)
            .finish()
    }
}

/// A stream received whole: its manifest, the staged files, and what the transfer took.
#[derive(Debug)]
pub struct Received {
    pub manifest: Manifest,
    pub staging: Staging,
    pub bytes: u64,
    pub started: Instant,
}

impl Incoming {
    /// A receiver that stages into `context_dir`'s install directory.
    pub fn new(context_dir: &Path) -> Incoming {
        Incoming {
            context_dir: context_dir.to_owned(),
            staging: None,
            manifest: None,
            stage: Stage::Head,
            pending: Vec::new(),
            pos: 0,
            taken: 0,
            current: None,
            hasher: crc32fast::Hasher::new(),
            failed: None,
            started: Instant::now(),
        }
    }

    /// The received stream, once every file arrived and passed its checks.
    pub fn finish(self) -> Result<Received, String> {
        if let Some(why) = self.failed {
            return Err(why);
        }
        match (self.stage, self.manifest, self.staging) {
            (Stage::Complete, Some(manifest), Some(staging)) => Ok(Received {
                manifest,
                staging,
                bytes: self.taken,
                started: self.started,
            }),
            (stage, _, _) => Err(format!(
                "the snapshot stream ended after {} bytes, at {stage:?}",
                self.taken
            )),
        }
    }

    fn need(&self) -> usize {
        match self.stage {
            Stage::Head => HEAD_LEN as usize,
            Stage::Manifest { len, .. } => len as usize,
            Stage::Part(Part::Frame { file, index }) => {
                let len = self.manifest.as_ref().expect("manifest read").files[file].len;
                frame_len(len, index) as usize + 4
            }
            Stage::Part(Part::Trailer { .. }) => 4,
            Stage::Part(Part::Head) | Stage::Complete => 0,
        }
    }

    /// Takes the next bytes of the stream.
    fn take(&mut self, mut data: &[u8]) -> Result<(), String> {
        while !data.is_empty() {
            let need = self.need();
            if need == 0 {
                return Err(format!("{} bytes past the end of the snapshot stream", data.len()));
            }
            let n = (need - self.pending.len()).min(data.len());
            self.pending.extend_from_slice(&data[..n]);
            data = &data[n..];
            self.taken += n as u64;
            if self.pending.len() == need {
                let part = std::mem::take(&mut self.pending);
                self.stage = self.process(&part)?;
                self.pending = part;
                self.pending.clear();
            }
        }
        Ok(())
    }

    /// The stage after the first file's (or the next one's) start.
    fn start_file(&mut self, file: usize) -> Result<Stage, String> {
        let manifest = self.manifest.as_ref().expect("manifest read");
        let Some(entry) = manifest.files.get(file) else {
            return Ok(Stage::Complete);
        };
        let staging = self.staging.as_ref().expect("staging created");
        let path = staging.path_of(&entry.store, &entry.name)?;
        let created = File::create(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        self.current = Some(created);
        self.hasher = crc32fast::Hasher::new();
        Ok(if entry.len == 0 {
            Stage::Part(Part::Trailer { file })
        } else {
            Stage::Part(Part::Frame { file, index: 0 })
        })
    }

    fn process(&mut self, part: &[u8]) -> Result<Stage, String> {
        let word = |i: usize| u32::from_le_bytes(part[i..i + 4].try_into().expect("4 bytes"));
        match self.stage {
            Stage::Head => {
                if &part[..8] != MAGIC {
                    return Err("not a snapshot stream of segment files".to_owned());
                }
                if word(8) > MAX_MANIFEST {
                    return Err(format!("a snapshot manifest of {} bytes", word(8)));
                }
                Ok(Stage::Manifest {
                    len: word(8),
                    crc: word(12),
                })
            }
            Stage::Manifest { crc, .. } => {
                if crc32fast::hash(part) != crc {
                    return Err("the snapshot manifest failed its checksum".to_owned());
                }
                let manifest: Manifest =
                    serde_json::from_slice(part).map_err(|e| format!("the snapshot manifest: {e}"))?;
                let staging = Staging::create(&self.context_dir).map_err(|e| e.to_string())?;
                for file in &manifest.files {
                    staging.path_of(&file.store, &file.name)?;
                }
                self.staging = Some(staging);
                self.manifest = Some(manifest);
                self.start_file(0)
            }
            Stage::Part(Part::Frame { file, index }) => {
                let (data, crc) = part.split_at(part.len() - 4);
                let offset = index * FRAME;
                if frame_crc(file, offset, data) != u32::from_le_bytes(crc.try_into().expect("4 bytes")) {
                    let name = &self.manifest.as_ref().expect("manifest read").files[file].name;
                    return Err(format!("{name} at offset {offset}: a chunk failed its checksum"));
                }
                let current = self.current.as_ref().expect("file open");
                current.write_all_at(data, offset).map_err(|e| e.to_string())?;
                self.hasher.update(data);
                let len = self.manifest.as_ref().expect("manifest read").files[file].len;
                Ok(if index + 1 < frames(len) {
                    Stage::Part(Part::Frame { file, index: index + 1 })
                } else {
                    Stage::Part(Part::Trailer { file })
                })
            }
            Stage::Part(Part::Trailer { file }) => {
                let entry = self.manifest.as_ref().expect("manifest read").files[file].clone();
                let hasher = std::mem::replace(&mut self.hasher, crc32fast::Hasher::new());
                if hasher.finalize() != word(0) {
                    return Err(format!("{}: the file failed its checksum", entry.name));
                }
                let current = self.current.take().expect("file open");
                let len = current.metadata().map_err(|e| e.to_string())?.len();
                if len != entry.len {
                    return Err(format!("{}: {len} bytes staged, {} expected", entry.name, entry.len));
                }
                current.sync_all().map_err(|e| format!("{}: {e}", entry.name))?;
                crate::crash::point("transfer-after-file");
                self.start_file(file + 1)
            }
            Stage::Part(Part::Head) | Stage::Complete => Err("unexpected bytes".to_owned()),
        }
    }

    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(why) = &self.failed {
            return Err(invalid(why.clone()));
        }
        let mut data = buf;
        if self.pos < self.taken {
            // Sent again (its answer was lost): those bytes are in already.
            let skip = ((self.taken - self.pos) as usize).min(data.len());
            data = &data[skip..];
            self.pos += skip as u64;
        }
        if !data.is_empty() && self.pos > self.taken {
            let why = format!(
                "a gap in the snapshot stream: {} bytes taken, a chunk at {}",
                self.taken, self.pos
            );
            self.failed = Some(why.clone());
            return Err(invalid(why));
        }
        if let Err(why) = self.take(data) {
            tracing::warn!(context_dir = %self.context_dir.display(), error = %why, "snapshot stream refused");
            // Nothing of it is installed: the staging directory goes at once.
            self.staging = None;
            self.current = None;
            self.failed = Some(why.clone());
            return Err(invalid(why));
        }
        self.pos += data.len() as u64;
        Ok(buf.len())
    }

    fn seek(&mut self, to: u64) {
        if to == 0 && (self.taken > 0 || self.failed.is_some()) {
            // The sender starts over (perhaps with another listing): so does the receiver.
            *self = Incoming::new(&self.context_dir);
        }
        self.pos = to;
    }
}

/// The snapshot data of a context's group: the leader's files being read, or a member's being
/// received.
#[derive(Debug)]
pub enum SegmentStream {
    Outgoing(Box<Outgoing>),
    Incoming(Box<Incoming>),
}

impl SegmentStream {
    /// The stream of a snapshot that holds no files (what openraft keeps of a snapshot it built,
    /// and what storage tests pass around).
    pub fn empty(meta: &openraft::SnapshotMeta<super::NodeId, openraft::BasicNode>) -> SegmentStream {
        let pointer = SnapshotPointer {
            meta: meta.clone(),
            event_tokens: 0,
            snapshot_tokens: 0,
            scheduled: Default::default(),
        };
        let stream = Outgoing::new(pointer, Shipment::default(), Shipment::default()).expect("a manifest encodes");
        SegmentStream::Outgoing(Box::new(stream))
    }
}

fn wrong_side(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        format!("a snapshot stream cannot {what} on this side"),
    )
}

impl AsyncRead for SegmentStream {
    fn poll_read(self: Pin<&mut Self>, _: &mut TaskContext<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(match self.get_mut() {
            SegmentStream::Outgoing(out) => blocking(|| out.fill(buf)),
            SegmentStream::Incoming(_) => Err(wrong_side("be read")),
        })
    }
}

impl AsyncWrite for SegmentStream {
    fn poll_write(self: Pin<&mut Self>, _: &mut TaskContext<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Poll::Ready(match self.get_mut() {
            SegmentStream::Incoming(incoming) => blocking(|| incoming.write(buf)),
            SegmentStream::Outgoing(_) => Err(wrong_side("be written")),
        })
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(match self.get_mut() {
            SegmentStream::Incoming(incoming) => match (&incoming.failed, incoming.stage) {
                (Some(why), _) => Err(invalid(why.clone())),
                (None, Stage::Complete) => Ok(()),
                (None, stage) => Err(invalid(format!("the snapshot stream ended early, at {stage:?}"))),
            },
            SegmentStream::Outgoing(_) => Ok(()),
        })
    }
}

impl AsyncSeek for SegmentStream {
    fn start_seek(self: Pin<&mut Self>, position: SeekFrom) -> io::Result<()> {
        let this = self.get_mut();
        let (pos, total) = match this {
            SegmentStream::Outgoing(out) => (out.pos, out.layout.total),
            SegmentStream::Incoming(incoming) => (incoming.pos, u64::MAX),
        };
        let to = match position {
            SeekFrom::Start(to) => Some(to),
            SeekFrom::End(delta) => total.checked_add_signed(delta),
            SeekFrom::Current(delta) => pos.checked_add_signed(delta),
        }
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "seek out of range"))?;
        match this {
            SegmentStream::Outgoing(out) => out.pos = to,
            SegmentStream::Incoming(incoming) => incoming.seek(to),
        }
        Ok(())
    }

    fn poll_complete(self: Pin<&mut Self>, _: &mut TaskContext<'_>) -> Poll<io::Result<u64>> {
        Poll::Ready(Ok(match self.get_mut() {
            SegmentStream::Outgoing(out) => out.pos,
            SegmentStream::Incoming(incoming) => incoming.pos,
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::Path;

    use myelin_proto::axon::event::Event;
    use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

    use super::*;
    use crate::command::{Command, Transaction};
    use crate::segment::{EntryRef, Kind};
    use crate::stored::{Limits, StoredContext, record_of};

    const LIMITS: Limits = Limits {
        event_segment_size: 1500,
        snapshot_segment_size: 500,
    };

    fn open(dir: &Path) -> StoredContext {
        StoredContext::open("ctx", dir, LIMITS).unwrap()
    }

    /// Applies entries `from..to` as the state machine would: each a transaction of two events
    /// on an aggregate of its own, every third one also a snapshot of an earlier aggregate.
    fn apply(stored: &StoredContext, from: u64, to: u64) {
        for index in from..to {
            let entry = EntryRef {
                term: 2,
                leader: 1,
                index,
            };
            let events: Vec<_> = (0..2)
                .map(|s| {
                    let event = Event {
                        aggregate_identifier: format!("agg-{index}"),
                        aggregate_sequence_number: s,
                        aggregate_type: "T".into(),
                        message_identifier: format!("{index}-{s}-{}", "x".repeat(40)),
                        ..Default::default()
                    };
                    record_of(&event, Kind::Events)
                })
                .collect();
            stored
                .apply(entry, &Command::AppendEvents(vec![Transaction { events }]))
                .unwrap();
            if index % 3 == 0 {
                let snapshot = Event {
                    aggregate_identifier: format!("agg-{index}"),
                    aggregate_sequence_number: 1,
                    aggregate_type: "T".into(),
                    snapshot: true,
                    ..Default::default()
                };
                let entry = EntryRef {
                    term: 2,
                    leader: 1,
                    index,
                };
                stored
                    .apply(
                        entry,
                        &Command::AppendSnapshots(vec![record_of(&snapshot, Kind::Snapshots)]),
                    )
                    .unwrap();
            }
        }
    }

    /// The pointer of the state right after entry `index` (the stores are at that state now).
    fn pointer(stored: &StoredContext, index: u64) -> SnapshotPointer {
        SnapshotPointer {
            meta: openraft::SnapshotMeta {
                last_log_id: Some(openraft::LogId::new(openraft::CommittedLeaderId::new(2, 1), index)),
                last_membership: Default::default(),
                snapshot_id: format!("{index}-{}", stored.events.next_token()),
            },
            event_tokens: stored.events.next_token(),
            snapshot_tokens: stored.snapshots.next_token(),
            scheduled: stored.scheduled.persisted(),
        }
    }

    fn outgoing(stored: &StoredContext, pointer: &SnapshotPointer) -> SegmentStream {
        let events = stored.events.shipment(pointer.event_tokens).unwrap();
        let snapshots = stored.snapshots.shipment(pointer.snapshot_tokens).unwrap();
        SegmentStream::Outgoing(Box::new(Outgoing::new(pointer.clone(), events, snapshots).unwrap()))
    }

    /// Sends `from` into `to` the way openraft's chunked transport does (seek to each chunk's
    /// offset, read it, the receiver seeks and writes), sending every chunk twice as if its
    /// answer had been lost, and flipping a bit of the chunk numbered `damage` if given.
    /// Returns the first write error.
    async fn send(
        from: &mut SegmentStream,
        to: &mut SegmentStream,
        chunk: usize,
        damage: Option<usize>,
    ) -> io::Result<()> {
        let end = from.seek(SeekFrom::End(0)).await?;
        let mut offset = 0;
        let mut n = 0;
        while offset < end {
            from.seek(SeekFrom::Start(offset)).await?;
            let mut buf = Vec::with_capacity(chunk);
            while buf.len() < chunk {
                if from.read_buf(&mut buf).await? == 0 {
                    break;
                }
            }
            if damage == Some(n) {
                let middle = buf.len() / 2;
                buf[middle] ^= 0x04;
            }
            for _ in 0..2 {
                to.seek(SeekFrom::Start(offset)).await?;
                to.write_all(&buf).await?;
            }
            offset += buf.len() as u64;
            n += 1;
        }
        to.shutdown().await
    }

    fn received(stream: SegmentStream) -> Result<Received, String> {
        match stream {
            SegmentStream::Incoming(incoming) => incoming.finish(),
            SegmentStream::Outgoing(_) => panic!("not a receiver"),
        }
    }

    /// Every file of the context's stores, by store and name.
    fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
        let mut out = BTreeMap::new();
        for store in crate::install::STORES {
            for entry in std::fs::read_dir(dir.join(store)).unwrap() {
                let entry = entry.unwrap();
                let name = entry.file_name().into_string().unwrap();
                out.insert(format!("{store}/{name}"), std::fs::read(entry.path()).unwrap());
            }
        }
        out
    }

    fn events(stored: &StoredContext) -> Vec<(i64, bytes::Bytes)> {
        stored.events.read_from(0, usize::MAX, usize::MAX).unwrap()
    }

    /// A member that holds a prefix of the history receives the leader's files for a snapshot
    /// taken mid-segment, in chunks (each sent twice), installs them, and goes on applying the
    /// entries after it: it then holds byte for byte what the leader holds.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_member_installs_the_segments_from_chunks() {
        let leader_dir = tempfile::tempdir().unwrap();
        let member_dir = tempfile::tempdir().unwrap();
        let leader = open(leader_dir.path());
        let member = open(member_dir.path());
        apply(&leader, 1, 11);
        apply(&member, 1, 11);
        apply(&leader, 11, 50);
        // A pending scheduled event: the snapshot's pointer carries the book.
        let reminder = Event {
            message_identifier: "reminder".into(),
            ..Default::default()
        };
        let schedule = Command::Schedule(crate::command::Scheduling {
            token: "t".into(),
            instant: 1,
            replaces: String::new(),
            record: record_of(&reminder, Kind::Events),
        });
        let at = EntryRef {
            term: 2,
            leader: 1,
            index: 49,
        };
        leader.apply(at, &schedule).unwrap();
        let snapshot = pointer(&leader, 49);
        apply(&leader, 50, 60);
        assert!(leader.events.closed_segments().len() > 3);
        assert!(leader.snapshots.closed_segments().len() > 1);

        let mut from = outgoing(&leader, &snapshot);
        let mut to = SegmentStream::Incoming(Box::new(Incoming::new(member_dir.path())));
        send(&mut from, &mut to, 700, None).await.unwrap();
        let received = received(to).unwrap();
        assert_eq!(received.manifest.pointer.event_tokens, snapshot.event_tokens);
        let book = crate::scheduled::Book::try_from(&received.manifest.pointer.scheduled).unwrap();
        assert!(book.contains("t") && book.len() == 1);
        let pointer = serde_json::to_vec(&received.manifest.pointer).unwrap();
        received.staging.mark_ready(&pointer).unwrap();
        member.install(received.staging).unwrap();

        assert_eq!(member.events.next_token(), snapshot.event_tokens);
        assert_eq!(member.snapshots.next_token(), snapshot.snapshot_tokens);
        assert_eq!(member.last_entry().unwrap().index, 49);
        assert_eq!(events(&member)[..], events(&leader)[..snapshot.event_tokens as usize]);
        assert!(
            !member_dir
                .path()
                .join(crate::install::INSTALL_DIR)
                .read_dir()
                .unwrap()
                .any(|_| true)
        );
        assert!(member_dir.path().join(crate::install::POINTER_FILE).is_file());
        // Aggregate reads use the installed indexes.
        assert_eq!(member.events.last_sequence("agg-12").unwrap(), Some(1));
        assert_eq!(
            member.snapshots.read_aggregate("agg-12", 0..=i64::MAX).unwrap().len(),
            1
        );

        apply(&member, 50, 60);
        assert_eq!(files(member_dir.path()), files(leader_dir.path()));
        drop(member);
        let member = open(member_dir.path());
        assert_eq!(events(&member), events(&leader));
    }

    /// A chunk damaged on its way is refused at once: the transfer fails, the staged files go,
    /// and the member's own stores are untouched. Sent again whole, it installs.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_damaged_chunk_is_refused_and_nothing_installed() {
        let leader_dir = tempfile::tempdir().unwrap();
        let member_dir = tempfile::tempdir().unwrap();
        let leader = open(leader_dir.path());
        let member = open(member_dir.path());
        apply(&leader, 1, 40);
        apply(&member, 1, 5);
        let before = files(member_dir.path());
        let snapshot = pointer(&leader, 39);

        let mut to = SegmentStream::Incoming(Box::new(Incoming::new(member_dir.path())));
        for damaged in [0, 3] {
            let mut from = outgoing(&leader, &snapshot);
            let refused = send(&mut from, &mut to, 1000, Some(damaged)).await.unwrap_err();
            assert_eq!(refused.kind(), io::ErrorKind::InvalidData, "{refused}");
            assert!(refused.to_string().contains("checksum"), "{refused}");
            let staged = member_dir.path().join(crate::install::INSTALL_DIR);
            assert!(
                !staged.exists() || !staged.read_dir().unwrap().any(|_| true),
                "staged files left"
            );
            assert_eq!(files(member_dir.path()), before);
            assert_eq!(member.events.next_token(), 8);
        }
        // openraft starts over from offset 0: so does the receiver.
        let mut from = outgoing(&leader, &snapshot);
        send(&mut from, &mut to, 1000, None).await.unwrap();
        let received = received(to).unwrap();
        received.staging.mark_ready(b"{}").unwrap();
        member.install(received.staging).unwrap();
        assert_eq!(events(&member), events(&leader));
    }

    /// The state machine of a member that installs a snapshot takes the book of scheduled
    /// events from it, in place of its own (which may hold schedules since published), and keeps
    /// it across a restart.
    #[tokio::test(flavor = "multi_thread")]
    async fn an_installed_snapshot_brings_its_scheduled_events() {
        use openraft::storage::RaftStateMachine;
        let leader_dir = tempfile::tempdir().unwrap();
        let member_dir = tempfile::tempdir().unwrap();
        let leader = open(leader_dir.path());
        let member = std::sync::Arc::new(open(member_dir.path()));
        let schedule = |token: &str| {
            let event = Event {
                message_identifier: token.into(),
                ..Default::default()
            };
            Command::Schedule(crate::command::Scheduling {
                token: token.into(),
                instant: 1,
                replaces: String::new(),
                record: record_of(&event, Kind::Events),
            })
        };
        let at = |index| EntryRef {
            term: 2,
            leader: 1,
            index,
        };
        // The member knew "old", which the leader has published since; "new" it never saw.
        apply(&leader, 1, 5);
        apply(&member, 1, 5);
        leader.apply(at(5), &schedule("old")).unwrap();
        member.apply(at(5), &schedule("old")).unwrap();
        apply(&leader, 6, 20);
        leader
            .apply(at(20), &Command::PublishScheduled(vec!["old".into()]))
            .unwrap();
        leader.apply(at(21), &schedule("new")).unwrap();
        let snapshot = pointer(&leader, 21);

        let mut sm = crate::consensus::state_machine::StateMachine::open(member.clone()).unwrap();
        let mut to = *sm.begin_receiving_snapshot().await.unwrap();
        let mut from = outgoing(&leader, &snapshot);
        send(&mut from, &mut to, 1000, None).await.unwrap();
        sm.install_snapshot(&snapshot.meta, Box::new(to)).await.unwrap();
        let pending = |stored: &StoredContext| stored.scheduled.read(|b| b.due(i64::MAX, 10));
        assert_eq!(pending(&member), vec!["new"]);
        assert_eq!(events(&member), events(&leader));
        drop(sm);
        drop(member);
        let member = std::sync::Arc::new(open(member_dir.path()));
        let _sm = crate::consensus::state_machine::StateMachine::open(member.clone()).unwrap();
        assert_eq!(pending(&member), vec!["new"]);
    }

    /// A stream cut short is not a snapshot: it cannot be installed, and what it staged goes.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_stream_cut_short_is_not_installed() {
        let leader_dir = tempfile::tempdir().unwrap();
        let member_dir = tempfile::tempdir().unwrap();
        let leader = open(leader_dir.path());
        apply(&leader, 1, 30);
        let snapshot = pointer(&leader, 29);
        let mut from = outgoing(&leader, &snapshot);
        let mut to = SegmentStream::Incoming(Box::new(Incoming::new(member_dir.path())));
        let mut buf = vec![0; 5000];
        from.read_exact(&mut buf).await.unwrap();
        to.write_all(&buf).await.unwrap();
        assert!(to.shutdown().await.is_err());
        let why = received(to).unwrap_err();
        assert!(why.contains("ended"), "{why}");
        let staged = member_dir.path().join(crate::install::INSTALL_DIR);
        assert!(!staged.read_dir().unwrap().any(|_| true), "staged files left");
    }

    /// A crash at each step of an install: before the marker, the member opens with its own
    /// stores and no staged files; after it (one store swapped, or both, or the pointer moved),
    /// opening finishes the install.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_crash_mid_install_is_finished_or_undone_at_open() {
        let leader_dir = tempfile::tempdir().unwrap();
        let leader = open(leader_dir.path());
        apply(&leader, 1, 45);
        let snapshot = pointer(&leader, 44);
        let expected = files(leader_dir.path());
        for crash_after in 0..4usize {
            let member_dir = tempfile::tempdir().unwrap();
            let member = open(member_dir.path());
            apply(&member, 1, 3);
            let before = files(member_dir.path());
            let mut from = outgoing(&leader, &snapshot);
            let mut to = SegmentStream::Incoming(Box::new(Incoming::new(member_dir.path())));
            send(&mut from, &mut to, 4096, None).await.unwrap();
            let received = received(to).unwrap();
            let staging = received.staging;
            if crash_after > 0 {
                staging.mark_ready(&serde_json::to_vec(&snapshot).unwrap()).unwrap();
            }
            for store in crate::install::STORES.iter().take(crash_after.saturating_sub(1)) {
                let (staged, trash) = staging.store_dirs(store);
                crate::segment::store::swap_dir(&member_dir.path().join(store), &staged, &trash).unwrap();
            }
            // The process dies here: nothing else runs.
            std::mem::forget(staging);
            drop(member);

            let member = open(member_dir.path());
            let staged = member_dir.path().join(crate::install::INSTALL_DIR);
            assert!(
                !staged.read_dir().unwrap().any(|_| true),
                "crash after {crash_after}: staging left"
            );
            if crash_after == 0 {
                assert_eq!(files(member_dir.path()), before);
                assert_eq!(member.events.next_token(), 4);
                assert!(!member_dir.path().join(crate::install::POINTER_FILE).exists());
            } else {
                // The leader's open segment was cut at the snapshot, which is the end here.
                assert_eq!(
                    files(member_dir.path()).keys().collect::<Vec<_>>(),
                    expected.keys().collect::<Vec<_>>()
                );
                assert_eq!(events(&member), events(&leader), "crash after {crash_after}");
                let pointer: SnapshotPointer = serde_json::from_slice(
                    &std::fs::read(member_dir.path().join(crate::install::POINTER_FILE)).unwrap(),
                )
                .unwrap();
                assert_eq!(pointer.meta.last_log_id, snapshot.meta.last_log_id);
            }
        }
    }

    /// The files listed for a snapshot end exactly at its tokens, whether the cut falls inside
    /// the open segment, inside a closed one, or on a segment's end; a token inside a record is
    /// refused.
    #[test]
    fn a_shipment_ends_at_the_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let stored = open(dir.path());
        let mut cuts = vec![(0, 0)];
        for index in 1..40 {
            apply(&stored, index, index + 1);
            cuts.push((index, stored.events.next_token()));
        }
        let closed = stored.events.closed_segments();
        for (index, tokens) in cuts {
            let shipment = stored.events.shipment(tokens).unwrap();
            assert_eq!(shipment.last.map(|e| e.index), (index > 0).then_some(index));
            assert_eq!(shipment.following.map(|e| e.index), (index < 39).then_some(index + 1));
            let segments: Vec<_> = shipment.files.iter().filter(|f| f.name.ends_with(".events")).collect();
            let last = segments.last().unwrap();
            let whole = closed.iter().filter(|(base, _)| *base < tokens).count();
            assert!(segments.len() == whole || segments.len() == whole + 1, "{index}");
            assert!(last.len <= std::fs::metadata(&last.path).unwrap().len());
        }
        assert!(
            stored.events.shipment(1).is_err(),
            "token 1 is inside a record of two events"
        );
        assert!(stored.events.shipment(stored.events.next_token() + 2).is_err());
    }
}
