//! The `_admin` context: a Raft group (openraft, as the eventstore's contexts) whose state
//! machine is the control DB.
//!
//! Every change to cluster configuration — nodes, contexts with their members and roles,
//! applications with their grants — is an [`AdminCommand`] proposed with [`AdminGroup::propose`],
//! and reaches the control DB only by being applied as a committed entry. An API handler answers
//! after its command is committed and applied here, so what it read back is what every member
//! will hold. Reads stay plain reads of the local file. The node's own bookkeeping (backup
//! pointers) is not configuration: it is written directly (see `snapshot` for the list of
//! replicated tables).
//!
//! - `log_store`: the Raft log in the control DB's file (docs/decisions/0009-admin-raft-log.md).
//! - `state_machine`: apply and snapshots, each in one SQLite transaction with the applied id.
//! - `command`: the commands and their deterministic apply; refused changes are answers.
//! - `snapshot`: the replicated tables as one value.
//! - `network`: [`NoPeers`], the network of a standalone node; the cluster transport is any other
//!   `RaftNetworkFactory<AdminTypes>` given to [`AdminGroup::start`].
//!
//! Starting: a standalone node (no `_admin` membership in its file yet) initialises a one-node
//! group with itself as node [`LOCAL_NODE`]. A control DB written before `_admin` was a Raft
//! group starts the same way: its rows are the state before the first entry. Because a member
//! that replayed the log from index 0 would never see those rows, a node leading a one-node group
//! whose log was never purged takes a snapshot and purges the log behind it before it serves:
//! from then on a new member always starts from a snapshot, which carries every row.

pub mod command;
pub mod log_store;
pub mod network;
pub mod snapshot;
pub mod state_machine;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::io::Cursor;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{ClientWriteError, ForwardToLeader, InitializeError, RaftError};
use openraft::network::RaftNetworkFactory;
use openraft::{BasicNode, ChangeMembers};
use tokio::sync::watch;

pub use command::{AdminCommand, AdminResponse, Refusal};
pub use network::NoPeers;

use crate::control_db::ControlDb;

openraft::declare_raft_types!(
    /// Raft types of the `_admin` group.
    pub AdminTypes:
        D = AdminCommand,
        R = AdminResponse,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<AdminTypes>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type NodeId = u64;
pub type LogId = openraft::LogId<NodeId>;
pub type Vote = openraft::Vote<NodeId>;
pub type Entry = openraft::Entry<AdminTypes>;
pub type Membership = openraft::StoredMembership<NodeId, BasicNode>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, BasicNode>;
pub type StorageError = openraft::StorageError<NodeId>;
pub type Fatal = openraft::error::Fatal<NodeId>;
/// The Raft handle of the `_admin` group.
pub type AdminRaft = openraft::Raft<AdminTypes>;

/// The group's name (openraft's cluster name, and the context's).
pub const ADMIN_GROUP: &str = "_admin";
/// A standalone node's id in `_admin`, as in every eventstore group.
pub const LOCAL_NODE: NodeId = 1;

/// How a node comes to be a member of `_admin`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bootstrap {
    /// If the control DB holds no `_admin` membership, this node initialises a one-node group
    /// with itself as the only voter.
    Standalone,
    /// This node waits to be added by a leader (`add_learner`, then `change_membership`); until
    /// then it is a member of nothing and proposals are refused with `ForwardToLeader`.
    Join,
}

/// How to run this node's member of `_admin`.
#[derive(Debug, Clone)]
pub struct GroupOptions {
    /// This node's id in `_admin`.
    pub id: NodeId,
    /// How other members reach this node (the address its network factory is given).
    pub node: BasicNode,
    pub bootstrap: Bootstrap,
    pub config: openraft::Config,
    /// How long a proposal waits for a leader to be elected when the group has none.
    pub leader_wait: Duration,
    /// How long a standalone node waits to lead its one-node group at start.
    pub start_wait: Duration,
}

impl GroupOptions {
    /// A standalone node: id [`LOCAL_NODE`], reachable at `address`.
    pub fn standalone(address: impl ToString) -> GroupOptions {
        GroupOptions {
            id: LOCAL_NODE,
            node: BasicNode::new(address),
            bootstrap: Bootstrap::Standalone,
            config: default_config(),
            leader_wait: Duration::from_secs(5),
            start_wait: Duration::from_secs(30),
        }
    }

    /// A node that joined a cluster as member `id` (it never initialises a group of its own).
    pub fn joined(address: impl ToString, id: NodeId) -> GroupOptions {
        GroupOptions {
            id,
            bootstrap: Bootstrap::Join,
            ..GroupOptions::standalone(address)
        }
    }
}

/// Makes this node's control DB ready to join a cluster as `_admin` member `id`: its own
/// `_admin` log, vote, snapshot and every replicated row are dropped (the cluster's snapshot
/// replaces them), and the new identity is recorded, in one transaction. The group must be
/// shut down first; the next start follows the cluster ([`GroupOptions::joined`]).
pub async fn prepare_join(db: &ControlDb, id: NodeId) -> Result<(), crate::control_db::DbError> {
    db.call(move |conn| {
        let tx = conn.transaction()?;
        tx.execute("DELETE FROM raft_log", [])?;
        tx.execute("DELETE FROM raft_state", [])?;
        tx.execute("DELETE FROM raft_snapshot", [])?;
        for table in snapshot::REPLICATED_TABLES.iter().rev() {
            tx.execute(&format!("DELETE FROM {table}"), [])?;
        }
        tx.execute(
            "INSERT OR REPLACE INTO admin_identity (id, member, joined_at_millis) VALUES (1, ?1, ?2)",
            rusqlite::params![id as i64, crate::control_db::now_millis()],
        )?;
        tx.commit()?;
        Ok(())
    })
    .await
}

/// The `_admin` group's Raft settings.
pub fn default_config() -> openraft::Config {
    openraft::Config {
        cluster_name: ADMIN_GROUP.to_owned(),
        // A lone voter elects itself after one election timeout: keep start-up quick.
        heartbeat_interval: 100,
        election_timeout_min: 300,
        election_timeout_max: 600,
        // The whole control DB is one snapshot of kilobytes: take one every few hundred changes
        // and keep a tail of the log so a follower a little behind gets entries, not the snapshot.
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(500),
        max_in_snapshot_log_to_keep: 100,
        // A snapshot is sent in one chunk; give it time on a slow link.
        install_snapshot_timeout: 2_000,
        ..Default::default()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("_admin Raft settings: {0}")]
    Config(#[from] openraft::ConfigError),
    #[error("_admin group: {0}")]
    Fatal(#[from] Fatal),
    #[error("initialising the one-node _admin group: {0}")]
    Initialize(#[from] RaftError<NodeId, InitializeError<NodeId, BasicNode>>),
    #[error("_admin: waiting until {what}: {error}")]
    Wait {
        what: &'static str,
        error: openraft::metrics::WaitError,
    },
}

/// Why a proposal has no answer from the state machine.
#[derive(Debug, thiserror::Error)]
pub enum ProposeError {
    /// This node does not lead `_admin` (it names the leader if it knows one): the command was
    /// not appended, so sending it to the leader cannot apply it twice.
    #[error("this node does not lead _admin{}", leader_text(.0))]
    ForwardToLeader(ForwardToLeader<NodeId, BasicNode>),
    /// The group stopped (shut down, or a storage error): the outcome is unknown.
    #[error("the _admin group stopped: {0}")]
    Stopped(#[from] Fatal),
    /// openraft answered something a normal command never gets.
    #[error("_admin: {0}")]
    Unexpected(String),
}

fn leader_text(forward: &ForwardToLeader<NodeId, BasicNode>) -> String {
    match (&forward.leader_id, &forward.leader_node) {
        (Some(id), Some(node)) => format!(" (node {id} at {} does)", node.addr),
        (Some(id), None) => format!(" (node {id} does)"),
        _ => " (it has no leader now)".to_owned(),
    }
}

/// This node's member of `_admin`; cheap to clone.
#[derive(Clone)]
pub struct AdminGroup {
    raft: AdminRaft,
    id: NodeId,
    leader_wait: Duration,
    changes: watch::Receiver<u64>,
}

impl AdminGroup {
    /// Opens the group over `db` (its log and state machine) with `network` to reach the other
    /// members, and bootstraps it as `options` say.
    pub async fn start<N>(db: ControlDb, options: GroupOptions, network: N) -> Result<AdminGroup, StartError>
    where
        N: RaftNetworkFactory<AdminTypes>,
    {
        let config = Arc::new(options.config.clone().validate()?);
        let log = log_store::AdminLog::new(db.clone());
        let state_machine = state_machine::AdminStateMachine::new(db);
        let changes = state_machine.changes();
        let raft = openraft::Raft::new(options.id, config, network, log, state_machine).await?;
        let group = AdminGroup {
            raft,
            id: options.id,
            leader_wait: options.leader_wait,
            changes,
        };
        if options.bootstrap == Bootstrap::Standalone {
            group.start_standalone(&options).await?;
        }
        Ok(group)
    }

    async fn start_standalone(&self, options: &GroupOptions) -> Result<(), StartError> {
        if !self.raft.is_initialized().await? {
            let members = BTreeMap::from([(self.id, options.node.clone())]);
            match self.raft.initialize(members).await {
                Ok(()) => tracing::info!(node = self.id, "_admin initialised as a one-node group"),
                // Initialised meanwhile (it has a log now): fine.
                Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let wait = |what: &'static str| move |error| StartError::Wait { what, error };
        // The metrics show the stored membership once the core has started.
        let metrics = self
            .raft
            .wait(Some(options.start_wait))
            .metrics(
                |m| m.membership_config.voter_ids().next().is_some(),
                "an _admin membership",
            )
            .await
            .map_err(wait("the _admin membership is loaded"))?;
        let voters: Vec<NodeId> = metrics.membership_config.voter_ids().collect();
        if voters != [self.id] {
            // A member of a larger group: it follows whichever leader the group elects.
            return Ok(());
        }
        let id = self.id;
        let metrics = self
            .raft
            .wait(Some(options.start_wait))
            .metrics(|m| m.current_leader == Some(id), "this node leads _admin")
            .await
            .map_err(wait("this node leads its one-node _admin group"))?;
        if metrics.purged.is_none() {
            // The rows from before the first entry must reach new members by a snapshot. It is
            // taken once something is applied (a snapshot of nothing names no entry to purge to).
            self.raft
                .wait(Some(options.start_wait))
                .metrics(|m| m.last_applied.is_some(), "an applied _admin entry")
                .await
                .map_err(wait("the first entry is applied"))?;
            self.raft.trigger().snapshot().await?;
            let built = self
                .raft
                .wait(Some(options.start_wait))
                .metrics(|m| m.snapshot.is_some(), "a first _admin snapshot")
                .await
                .map_err(wait("a first snapshot is built"))?;
            let upto = built.snapshot.map_or(0, |s| s.index);
            self.raft.trigger().purge_log(upto).await?;
            self.raft
                .wait(Some(options.start_wait))
                .metrics(|m| m.purged.is_some_and(|p| p.index >= upto), "the log purged")
                .await
                .map_err(wait("the log is purged behind the first snapshot"))?;
            tracing::info!(upto, "_admin: first snapshot taken, log purged behind it");
        }
        Ok(())
    }

    /// Proposes a command and returns what applying it answered, once it is committed and
    /// applied on this node (the leader). When the group has no leader it waits up to
    /// `leader_wait` for one; a command this node cannot append (it does not lead) comes back as
    /// [`ProposeError::ForwardToLeader`].
    pub async fn propose(&self, command: AdminCommand) -> Result<AdminResponse, ProposeError> {
        Ok(self.propose_at(command).await?.1)
    }

    /// [`propose`](Self::propose), also returning the entry's log id (for waiting until other
    /// members have applied it).
    #[tracing::instrument(level = "debug", skip_all, fields(command = command.kind()))]
    pub async fn propose_at(&self, command: AdminCommand) -> Result<(LogId, AdminResponse), ProposeError> {
        let deadline = tokio::time::Instant::now() + self.leader_wait;
        loop {
            let forward = match self.raft.client_write(command.clone()).await {
                Ok(written) => return Ok((written.log_id, written.data)),
                Err(RaftError::APIError(ClientWriteError::ForwardToLeader(forward))) => forward,
                Err(RaftError::APIError(e)) => return Err(ProposeError::Unexpected(e.to_string())),
                Err(RaftError::Fatal(fatal)) => return Err(ProposeError::Stopped(fatal)),
            };
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            if forward.leader_id.is_some() || remaining.is_zero() {
                return Err(ProposeError::ForwardToLeader(forward));
            }
            // No leader now (an election is on): wait for one, then ask again; the new leader
            // answers for itself, or the next try names it.
            if self
                .raft
                .wait(Some(remaining))
                .metrics(|m| m.current_leader.is_some(), "an _admin leader")
                .await
                .is_err()
            {
                return Err(ProposeError::ForwardToLeader(forward));
            }
        }
    }

    /// Adds a node as a learner (it receives the log, or a snapshot, but does not vote); returns
    /// once the change is committed, without waiting for the learner to catch up.
    pub async fn add_learner(&self, id: NodeId, node: BasicNode) -> Result<LogId, ProposeError> {
        match self.raft.add_learner(id, node, false).await {
            Ok(written) => Ok(written.log_id),
            Err(e) => Err(membership_error(e)),
        }
    }

    /// Makes `voters` the group's voters (each must be a member already, as a learner if new);
    /// members left out stay learners.
    pub async fn change_voters(&self, voters: impl IntoIterator<Item = NodeId>) -> Result<LogId, ProposeError> {
        let voters: std::collections::BTreeSet<NodeId> = voters.into_iter().collect();
        match self
            .raft
            .change_membership(ChangeMembers::ReplaceAllVoters(voters), true)
            .await
        {
            Ok(written) => Ok(written.log_id),
            Err(e) => Err(membership_error(e)),
        }
    }

    /// Removes members entirely (voters and learners alike).
    pub async fn remove_members(&self, ids: impl IntoIterator<Item = NodeId>) -> Result<LogId, ProposeError> {
        let ids: std::collections::BTreeSet<NodeId> = ids.into_iter().collect();
        let voters: std::collections::BTreeSet<NodeId> = {
            let metrics = self.raft.metrics();
            let metrics = metrics.borrow();
            metrics.membership_config.membership().voter_ids().collect()
        };
        let leaving: std::collections::BTreeSet<NodeId> = ids.intersection(&voters).copied().collect();
        if !leaving.is_empty() {
            self.raft
                .change_membership(ChangeMembers::RemoveVoters(leaving), true)
                .await
                .map_err(membership_error)?;
        }
        match self
            .raft
            .change_membership(ChangeMembers::RemoveNodes(ids), false)
            .await
        {
            Ok(written) => Ok(written.log_id),
            Err(e) => Err(membership_error(e)),
        }
    }

    /// The leader as this member knows it: its id and node name.
    pub fn leader(&self) -> Option<(NodeId, String)> {
        let metrics = self.raft.metrics();
        let metrics = metrics.borrow();
        let id = metrics.current_leader?;
        let name = metrics.membership_config.membership().get_node(&id)?.addr.clone();
        Some((id, name))
    }

    pub fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().current_leader == Some(self.id)
    }

    /// How many voters the group has, as this member knows.
    pub fn voter_count(&self) -> usize {
        self.raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .count()
    }

    /// The openraft handle: for the network to deliver RPCs (`append_entries`, `vote`,
    /// `install_snapshot`), for metrics and membership.
    pub fn raft(&self) -> &AdminRaft {
        &self.raft
    }

    pub fn id(&self) -> NodeId {
        self.id
    }

    /// A counter bumped after each applied change to replicated rows (on every member, whoever
    /// proposed it) and each installed snapshot.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.clone()
    }

    /// Resolves when the group stops: why (a storage error stops it; a shutdown is `Stopped`).
    pub async fn stopped(&self) -> Fatal {
        let mut metrics = self.raft.metrics();
        loop {
            if let Err(fatal) = &metrics.borrow_and_update().running_state {
                return fatal.clone();
            }
            if metrics.changed().await.is_err() {
                return Fatal::Stopped;
            }
        }
    }

    /// Stops the group (its tasks end; the control DB stays open for reads).
    pub async fn shutdown(&self) {
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(error = %e, "_admin group did not stop cleanly");
        }
    }
}

/// Waits for the next applied change, or `period`, whichever comes first. Once the group has
/// stopped (no more changes will come), it waits the whole period: a loop that follows changes
/// never spins.
pub async fn next_change(changes: &mut watch::Receiver<u64>, period: Duration) {
    match tokio::time::timeout(period, changes.changed()).await {
        Ok(Ok(())) | Err(_) => {}
        Ok(Err(_)) => tokio::time::sleep(period).await,
    }
}

fn membership_error(e: RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>) -> ProposeError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(forward)) => ProposeError::ForwardToLeader(forward),
        RaftError::APIError(e) => ProposeError::Unexpected(e.to_string()),
        RaftError::Fatal(fatal) => ProposeError::Stopped(fatal),
    }
}
