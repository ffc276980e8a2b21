//! The contexts this eventstore stores, each with its stores, Raft group and appender, and their
//! life cycle: opened at start, created and deleted at runtime.
//!
//! A context is the directory `<data>/<name>/` holding `events/`, `snapshots/` and the Raft
//! `log/`. What holds across crashes:
//! - Creating is idempotent: a context that exists is returned as it is. A crash during creation
//!   leaves at most an empty context, which recovers like any other.
//! - Deleting never leaves a half context that opens again. The intent is recorded first (in
//!   `deleted-contexts`, so a context named in the start-up configuration is not created again),
//!   the group is stopped, and the directory is renamed in one step to a tombstone
//!   (`.deleting-<name>-<nanos>`, a name no context can have), the data directory fsynced, and
//!   only then the tombstone removed. Start-up removes tombstones and finishes a delete whose
//!   intent was recorded but whose directory was not yet renamed.
//! - Deleting with `preserve` moves the directory to `.preserved/<name>-<unix millis>/` instead:
//!   the files stay for an operator, the context is gone.
//! - Streams of a deleted context end with CONTEXT_NOT_FOUND (they watch [`Context::closed`]);
//!   appends waiting in its queue are answered as not stored; calls that arrive afterwards do not
//!   find it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use parking_lot::RwLock;
use tokio_util::sync::CancellationToken;

use crate::append::Appender;
use crate::consensus::{self, LOCAL_NODE, Raft};
use crate::segment::store::{sync_dir, write_atomically};
use crate::stored::{Limits, StoredContext};

pub struct Context {
    pub name: String,
    /// This node's member id and name in the context's group.
    pub member: consensus::Member,
    /// The router's relay: appends forwarded to a leader on another node go through it.
    pub relay: myelin_proto::internal::raft_relay_client::RaftRelayClient<tonic::transport::Channel>,
    pub stored: Arc<StoredContext>,
    pub raft: Raft,
    pub appender: Appender,
    /// Appends of this node's clients on their way to a leader on another node.
    pub outbox: crate::outbox::Outbox,
    /// Read index rounds shared by the reads waiting at once.
    pub read_indexes: crate::read_index::ReadIndexes,
    /// Cancelled when the context is deleted: its open streams end.
    pub closed: CancellationToken,
}

/// A context name is a directory name and travels in headers: keep it to a safe alphabet.
/// Names starting with `_` are reserved for the system (`_admin`).
pub fn valid_context_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        && !name.starts_with('.')
}

/// System contexts (`_admin`) are managed by Myelin itself, never through the API.
pub fn is_internal_context(name: &str) -> bool {
    name.starts_with('_')
}

/// Why a create or delete was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    /// Definite: nothing changed.
    #[error("invalid context name {0:?}: use 1 to 64 letters, digits, '-', '_' or '.', not starting with '.'")]
    InvalidName(String),
    /// Definite: nothing changed.
    #[error("{0}: internal contexts cannot be created or deleted")]
    Internal(String),
    /// Definite: nothing changed.
    #[error("{0}: context not found")]
    NotFound(String),
    /// Definite: nothing changed. The node stores the context as another member of its group.
    #[error("context {context} is stored on this node as member {stored} of its group, not {asked}")]
    OtherMember { context: String, stored: u64, asked: u64 },
    /// Indefinite: the operation may have been partly done; retrying it is safe.
    #[error(transparent)]
    Failed(#[from] anyhow::Error),
}

impl LifecycleError {
    /// The gRPC status with Axon's code for this error.
    pub fn status(&self) -> tonic::Status {
        use myelin_proto::errors::ErrorCode;
        match self {
            LifecycleError::InvalidName(_) => ErrorCode::InvalidContextName.status(self),
            LifecycleError::Internal(_) => ErrorCode::CannotDeleteInternalContext.status(self),
            LifecycleError::NotFound(_) => ErrorCode::ContextNotFound.status(self),
            LifecycleError::OtherMember { .. } => ErrorCode::CannotJoin.status(self),
            LifecycleError::Failed(e) => {
                tracing::error!(error = format!("{e:#}"), "context create/delete failed");
                ErrorCode::DatafileWriteError.status(format!("{e:#}"))
            }
        }
    }
}

/// The file recording deleted contexts (see the module docs).
const DELETED_FILE: &str = "deleted-contexts";
/// This node's member id and name in a context's group (absent: a standalone group).
const MEMBER_FILE: &str = "member.json";
/// In the data directory once the configured contexts were created (the first start).
const INITIALIZED_FILE: &str = ".initialized";

fn read_member(path: &Path) -> anyhow::Result<Option<consensus::Member>> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(
            serde_json::from_slice(&bytes).with_context(|| format!("reading {}", path.display()))?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}
const TOMBSTONE_PREFIX: &str = ".deleting-";
const PRESERVED_DIR: &str = ".preserved";

/// What became of a deleted context's files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Removed,
    Preserved,
}

pub struct Contexts {
    data_dir: PathBuf,
    limits: Limits,
    log_segment_size: u64,
    /// This node's name: a standalone group's member is named by it.
    node_name: String,
    /// The router's relay, through which every group reaches its other members.
    relay: myelin_proto::internal::raft_relay_client::RaftRelayClient<tonic::transport::Channel>,
    map: RwLock<BTreeMap<String, Arc<Context>>>,
    /// Serializes creates and deletes (never taken on a client's path).
    lifecycle: tokio::sync::Mutex<()>,
}

impl Contexts {
    /// Contexts of a node without peers (tests): its groups can never send.
    pub fn new(data_dir: &Path, limits: Limits, log_segment_size: u64) -> Contexts {
        let relay = myelin_raft_relay::relay_client(Path::new("/nonexistent/router.sock")).expect("an absolute path");
        Contexts::with_relay(data_dir, limits, log_segment_size, "myelin", relay)
    }

    pub fn with_relay(
        data_dir: &Path,
        limits: Limits,
        log_segment_size: u64,
        node_name: &str,
        relay: myelin_proto::internal::raft_relay_client::RaftRelayClient<tonic::transport::Channel>,
    ) -> Contexts {
        Contexts {
            data_dir: data_dir.to_owned(),
            limits,
            log_segment_size,
            node_name: node_name.to_owned(),
            relay,
            map: RwLock::new(BTreeMap::new()),
            lifecycle: tokio::sync::Mutex::new(()),
        }
    }

    /// This node's name.
    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    /// The directory holding one sub-directory per context.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub fn get(&self, name: &str) -> Option<Arc<Context>> {
        self.map.read().get(name).cloned()
    }

    pub fn all(&self) -> Vec<Arc<Context>> {
        self.map.read().values().cloned().collect()
    }

    /// At start: finishes interrupted deletes, then opens every context stored in the data
    /// directory and, on a fresh data directory only, creates the `configured` ones. Returns the
    /// names opened.
    pub async fn open_at_start(&self, configured: &[String]) -> anyhow::Result<Vec<String>> {
        let deleted = read_deleted(&self.data_dir)?;
        for (name, fate) in &deleted {
            let dir = self.data_dir.join(name);
            if dir.exists() {
                tracing::info!(context = %name, "finishing an interrupted delete");
                dispose(&self.data_dir, name, *fate).with_context(|| format!("finishing the delete of {name}"))?;
            }
        }
        remove_tombstones(&self.data_dir);
        // The configured contexts are created on a fresh data directory only: later, what this
        // node stores is decided by the cluster's configuration (a node that joined a cluster
        // gave its own `default` up, and must not grow a standalone one at its next start).
        let marker = self.data_dir.join(INITIALIZED_FILE);
        let fresh = !marker.exists();
        let mut names: Vec<String> = configured
            .iter()
            .filter(|_| fresh)
            .filter(|n| !deleted.iter().any(|(d, _)| d == *n))
            .cloned()
            .collect();
        // Contexts created earlier are stored as directories with a Raft log.
        for entry in std::fs::read_dir(&self.data_dir)? {
            let entry = entry?;
            if entry.path().join("log").is_dir()
                && let Some(name) = entry.file_name().to_str()
                && valid_context_name(name)
                && !names.iter().any(|n| n == name)
            {
                names.push(name.to_owned());
            }
        }
        for name in &names {
            self.open(name).await?;
        }
        if fresh {
            write_atomically(&marker, b"the configured contexts were created here\n")?;
        }
        Ok(names)
    }

    /// Opens (recovering) or creates a context; a standalone one is ready (has its leader) when
    /// this returns.
    pub async fn open(&self, name: &str) -> anyhow::Result<Arc<Context>> {
        self.open_as(name, None).await
    }

    /// Opens or creates a context as `member` of a group that spans nodes (see
    /// [`consensus::Bootstrap`]). A context stored here as another member is refused: a node
    /// that comes back without its data must be given a new member id (openraft requires it).
    pub async fn join(
        &self,
        name: &str,
        member: consensus::Member,
        bootstrap: consensus::Bootstrap,
    ) -> Result<Arc<Context>, LifecycleError> {
        check_api_name(name)?;
        let _lifecycle = self.lifecycle.lock().await;
        if let Some(existing) = self.get(name) {
            if existing.member == member {
                return Ok(existing);
            }
            return Err(LifecycleError::OtherMember {
                context: name.to_owned(),
                stored: existing.member.id,
                asked: member.id,
            });
        }
        let data_dir = self.data_dir.clone();
        let owned = name.to_owned();
        tokio::task::spawn_blocking(move || forget_deleted(&data_dir, &owned))
            .await
            .context("join task")??;
        Ok(self.open_as(name, Some((member, bootstrap))).await?)
    }

    async fn open_as(
        &self,
        name: &str,
        join: Option<(consensus::Member, consensus::Bootstrap)>,
    ) -> anyhow::Result<Arc<Context>> {
        if let Some(existing) = self.get(name) {
            return Ok(existing);
        }
        anyhow::ensure!(valid_context_name(name), "invalid context name {name:?}");
        let dir = self.data_dir.join(name);
        let limits = self.limits;
        let dir2 = dir.clone();
        let name2 = name.to_owned();
        let stored = tokio::task::spawn_blocking(move || StoredContext::open(&name2, &dir2, limits))
            .await?
            .with_context(|| format!("recovering context {name} in {}", dir.display()))?;
        let stored = Arc::new(stored);
        let member_file = dir.join(MEMBER_FILE);
        let (member, bootstrap) = match (read_member(&member_file)?, join) {
            (Some(stored_as), Some((asked, _))) if stored_as != asked => anyhow::bail!(
                "context {name} is stored here as member {} of its group, not {}",
                stored_as.id,
                asked.id
            ),
            // Restarted as a member of a group that spans nodes: its membership is in its log,
            // or comes from the leader.
            (Some(member), _) => (member, consensus::Bootstrap::Wait),
            (None, Some((member, bootstrap))) => {
                let bytes = serde_json::to_vec(&member).context("member file")?;
                write_atomically(&member_file, &bytes)?;
                (member, bootstrap)
            }
            (None, None) => (
                consensus::Member {
                    id: LOCAL_NODE,
                    node: self.node_name.clone(),
                },
                consensus::Bootstrap::Alone,
            ),
        };
        let network = consensus::Network::new(name, self.relay.clone());
        let raft =
            consensus::start_group(name, stored.clone(), self.log_segment_size, &member, bootstrap, network).await?;
        // A group whose only voter is this node elects it at once: wait, so that the context is
        // ready when it is listed. A group that spans nodes elects when a majority is up.
        let voters: Vec<u64> = raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .collect();
        if voters == [member.id] {
            raft.wait(Some(Duration::from_secs(30)))
                .current_leader(member.id, "leader elected")
                .await
                .with_context(|| format!("context {name}: no leader within 30 s"))?;
        }
        let appender = Appender::start(raft.clone(), stored.clone());
        let read_indexes = crate::read_index::ReadIndexes::start(name, member.id, raft.clone(), self.relay.clone());
        let closed = CancellationToken::new();
        crate::publisher::start(raft.clone(), stored.clone(), member.id, closed.clone());
        let context = Arc::new(Context {
            member,
            relay: self.relay.clone(),
            name: name.to_owned(),
            stored,
            raft,
            appender,
            outbox: crate::outbox::Outbox::start(name, self.relay.clone()),
            read_indexes,
            closed,
        });
        self.map.write().insert(name.to_owned(), context.clone());
        tracing::info!(
            context = name,
            next_token = context.stored.events.next_token(),
            "context open"
        );
        Ok(context)
    }

    /// Creates a context through the API; returns the existing one unchanged if it exists.
    pub async fn create(&self, name: &str) -> Result<Arc<Context>, LifecycleError> {
        check_api_name(name)?;
        let _lifecycle = self.lifecycle.lock().await;
        if let Some(existing) = self.get(name) {
            return Ok(existing);
        }
        // Created again after a delete: no longer on the deleted list.
        let data_dir = self.data_dir.clone();
        let owned = name.to_owned();
        tokio::task::spawn_blocking(move || forget_deleted(&data_dir, &owned))
            .await
            .context("create task")??;
        let context = self.open(name).await?;
        tracing::info!(context = name, "context created");
        Ok(context)
    }

    /// Deletes a context through the API: stops its group, ends its streams, and removes its
    /// files (or moves them aside when `preserve`). See the module docs for the crash story.
    pub async fn delete(&self, name: &str, preserve: bool) -> Result<(), LifecycleError> {
        check_api_name(name)?;
        let _lifecycle = self.lifecycle.lock().await;
        let Some(context) = self.get(name) else {
            return Err(LifecycleError::NotFound(name.to_owned()));
        };
        let fate = if preserve { Fate::Preserved } else { Fate::Removed };
        let data_dir = self.data_dir.clone();
        let owned = name.to_owned();
        tokio::task::spawn_blocking(move || remember_deleted(&data_dir, &owned, fate))
            .await
            .context("delete task")??;

        // From here on new calls do not find it; calls in progress end.
        self.map.write().remove(name);
        context.closed.cancel();
        context.appender.close().await;
        if let Err(e) = context.raft.shutdown().await {
            tracing::warn!(context = name, error = %e, "raft shutdown");
        }

        let data_dir = self.data_dir.clone();
        let owned = name.to_owned();
        tokio::task::spawn_blocking(move || dispose(&data_dir, &owned, fate))
            .await
            .context("delete task")?
            .with_context(|| format!("removing the files of context {name}"))?;
        tracing::info!(context = name, preserve, "context deleted");
        Ok(())
    }

    /// Stops every group (used at shutdown).
    pub async fn shutdown(&self) {
        for context in self.all() {
            if let Err(e) = context.raft.shutdown().await {
                tracing::warn!(context = %context.name, error = %e, "raft shutdown");
            }
        }
    }
}

fn check_api_name(name: &str) -> Result<(), LifecycleError> {
    if is_internal_context(name) {
        return Err(LifecycleError::Internal(name.to_owned()));
    }
    if !valid_context_name(name) {
        return Err(LifecycleError::InvalidName(name.to_owned()));
    }
    Ok(())
}

/// Moves a stopped context's directory out of the way in one rename, then removes it (or keeps
/// it under `.preserved/`). Done when the directory is already gone.
fn dispose(data_dir: &Path, name: &str, fate: Fate) -> anyhow::Result<()> {
    let dir = data_dir.join(name);
    if !dir.exists() {
        return Ok(());
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    match fate {
        Fate::Preserved => {
            let preserved = data_dir.join(PRESERVED_DIR);
            std::fs::create_dir_all(&preserved).with_context(|| format!("creating {}", preserved.display()))?;
            let target = preserved.join(format!("{name}-{}", nanos.as_millis()));
            std::fs::rename(&dir, &target)
                .with_context(|| format!("moving {} to {}", dir.display(), target.display()))?;
            sync_dir(&preserved)?;
            sync_dir(data_dir)?;
            tracing::info!(context = name, path = %target.display(), "context files preserved");
        }
        Fate::Removed => {
            let tombstone = data_dir.join(format!("{TOMBSTONE_PREFIX}{name}-{}", nanos.as_nanos()));
            std::fs::rename(&dir, &tombstone)
                .with_context(|| format!("moving {} to {}", dir.display(), tombstone.display()))?;
            sync_dir(data_dir)?;
            // The context is gone once the rename is durable; a failure here leaves only a
            // tombstone, which the next start removes.
            if let Err(e) = std::fs::remove_dir_all(&tombstone) {
                tracing::warn!(path = %tombstone.display(), error = %e, "could not remove a deleted context's files");
            }
        }
    }
    Ok(())
}

/// Removes what deletes left behind: directories renamed to tombstones.
fn remove_tombstones(data_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(data_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let is_tombstone = entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(TOMBSTONE_PREFIX));
        if is_tombstone && entry.path().is_dir() {
            match std::fs::remove_dir_all(entry.path()) {
                Ok(()) => tracing::info!(path = %entry.path().display(), "removed a deleted context's files"),
                Err(e) => tracing::warn!(path = %entry.path().display(), error = %e, "could not remove a tombstone"),
            }
        }
    }
}

/// The deleted-contexts file: one `removed <name>` or `preserved <name>` per line.
fn read_deleted(data_dir: &Path) -> anyhow::Result<Vec<(String, Fate)>> {
    let path = data_dir.join(DELETED_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let (fate, name) = line
            .split_once(' ')
            .with_context(|| format!("{}: bad line {line:?}", path.display()))?;
        let fate = match fate {
            "removed" => Fate::Removed,
            "preserved" => Fate::Preserved,
            _ => anyhow::bail!("{}: bad line {line:?}", path.display()),
        };
        anyhow::ensure!(
            valid_context_name(name),
            "{}: bad context name {name:?}",
            path.display()
        );
        out.push((name.to_owned(), fate));
    }
    Ok(out)
}

fn write_deleted(data_dir: &Path, deleted: &[(String, Fate)]) -> anyhow::Result<()> {
    let text: String = deleted
        .iter()
        .map(|(name, fate)| match fate {
            Fate::Removed => format!("removed {name}\n"),
            Fate::Preserved => format!("preserved {name}\n"),
        })
        .collect();
    write_atomically(&data_dir.join(DELETED_FILE), text.as_bytes())?;
    Ok(())
}

fn remember_deleted(data_dir: &Path, name: &str, fate: Fate) -> anyhow::Result<()> {
    let mut deleted = read_deleted(data_dir)?;
    deleted.retain(|(n, _)| n != name);
    deleted.push((name.to_owned(), fate));
    write_deleted(data_dir, &deleted)
}

fn forget_deleted(data_dir: &Path, name: &str) -> anyhow::Result<()> {
    let mut deleted = read_deleted(data_dir)?;
    let before = deleted.len();
    deleted.retain(|(n, _)| n != name);
    if deleted.len() != before {
        write_deleted(data_dir, &deleted)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_names() {
        for ok in ["default", "_admin", "orders-2", "a.b"] {
            assert!(valid_context_name(ok), "{ok}");
        }
        for bad in ["", "../x", "a/b", ".hidden", "sp ace", &"x".repeat(65)] {
            assert!(!valid_context_name(bad), "{bad}");
        }
        assert!(matches!(check_api_name("_admin"), Err(LifecycleError::Internal(_))));
        assert!(matches!(check_api_name("a/b"), Err(LifecycleError::InvalidName(_))));
        assert!(check_api_name("orders").is_ok());
    }

    fn limits() -> Limits {
        Limits {
            event_segment_size: 1 << 20,
            snapshot_segment_size: 1 << 20,
        }
    }

    #[tokio::test]
    async fn create_delete_and_restart() {
        let dir = tempfile::tempdir().unwrap();
        let configured = vec!["default".to_owned(), "orders".to_owned()];
        {
            let contexts = Contexts::new(dir.path(), limits(), 1 << 20);
            let names = contexts.open_at_start(&configured).await.unwrap();
            assert_eq!(names, configured);
            contexts.create("extra").await.unwrap();
            // Idempotent.
            contexts.create("extra").await.unwrap();
            assert!(matches!(
                contexts.create("_admin").await,
                Err(LifecycleError::Internal(_))
            ));
            assert!(matches!(
                contexts.create("../x").await,
                Err(LifecycleError::InvalidName(_))
            ));
            let orders = contexts.get("orders").unwrap();
            contexts.delete("orders", false).await.unwrap();
            assert!(orders.closed.is_cancelled());
            assert!(contexts.get("orders").is_none());
            assert!(!dir.path().join("orders").exists());
            assert!(matches!(
                contexts.delete("orders", false).await,
                Err(LifecycleError::NotFound(_))
            ));
            contexts.delete("extra", true).await.unwrap();
            let preserved: Vec<_> = std::fs::read_dir(dir.path().join(PRESERVED_DIR))
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            assert_eq!(preserved.len(), 1);
            assert!(preserved[0].starts_with("extra-"), "{preserved:?}");
            contexts.shutdown().await;
        }
        // A configured context that was deleted is not created again; a preserved one is not
        // opened from its preserved files.
        let contexts = Contexts::new(dir.path(), limits(), 1 << 20);
        let names = contexts.open_at_start(&configured).await.unwrap();
        assert_eq!(names, vec!["default".to_owned()]);
        // Creating it again starts it empty and takes it off the deleted list.
        let orders = contexts.create("orders").await.unwrap();
        assert_eq!(orders.stored.events.next_token(), 0);
        assert_eq!(
            read_deleted(dir.path()).unwrap(),
            vec![("extra".to_owned(), Fate::Preserved)]
        );
        contexts.shutdown().await;
    }

    #[tokio::test]
    async fn start_finishes_interrupted_deletes() {
        let dir = tempfile::tempdir().unwrap();
        {
            let contexts = Contexts::new(dir.path(), limits(), 1 << 20);
            contexts.open_at_start(&["a".to_owned(), "b".to_owned()]).await.unwrap();
            contexts.shutdown().await;
        }
        // A crash after the intent was written, before the rename; and one after the rename.
        remember_deleted(dir.path(), "a", Fate::Removed).unwrap();
        std::fs::rename(dir.path().join("b"), dir.path().join(".deleting-b-1")).unwrap();
        let contexts = Contexts::new(dir.path(), limits(), 1 << 20);
        let names = contexts.open_at_start(&[]).await.unwrap();
        assert!(names.is_empty(), "{names:?}");
        let mut left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, vec![INITIALIZED_FILE.to_owned(), DELETED_FILE.to_owned()]);
        contexts.shutdown().await;
    }

    #[tokio::test]
    async fn configured_contexts_are_created_on_a_fresh_directory_only() {
        let dir = tempfile::tempdir().unwrap();
        {
            let contexts = Contexts::new(dir.path(), limits(), 1 << 20);
            let names = contexts.open_at_start(&["default".to_owned()]).await.unwrap();
            assert_eq!(names, vec!["default".to_owned()]);
            contexts.shutdown().await;
        }
        // Later (this node joined a cluster and gave `default` up), a start creates nothing.
        std::fs::remove_dir_all(dir.path().join("default")).unwrap();
        let contexts = Contexts::new(dir.path(), limits(), 1 << 20);
        let names = contexts.open_at_start(&["default".to_owned()]).await.unwrap();
        assert!(names.is_empty(), "{names:?}");
        contexts.shutdown().await;
    }
}
