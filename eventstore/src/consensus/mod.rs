//! Consensus: one openraft group per context. This module is the only place that names
//! openraft types; the rest of the eventstore talks to it through `Command`/`CommandResult`.
//!
//! openraft is pinned to one exact version (see docs/decisions/0002-openraft-version.md).
//! - `log_store`: the Raft log in segment files under `<context>/log/`; an append is
//!   acknowledged to openraft (flush callback) only after it is fsynced, and concurrent appends
//!   share one fsync (group commit).
//! - `state_machine`: applying committed entries into the context's event and snapshot segments.

pub mod log_store;
pub mod network;
pub mod state_machine;

use std::io::Cursor;

use crate::command::{Command, CommandResult};

openraft::declare_raft_types!(
    /// Raft types of a context's group.
    pub TypeConfig:
        D = Command,
        R = CommandResult,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type NodeId = u64;
pub type LogId = openraft::LogId<NodeId>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type StorageError = openraft::StorageError<NodeId>;

/// The Raft handle of a context's group.
pub type Raft = openraft::Raft<TypeConfig>;

/// This node's id in every group. A single node is always node 1; cluster membership will
/// assign ids from the `_admin` context.
pub const LOCAL_NODE: NodeId = 1;

/// Starts the Raft group of one context over its recovered stores, and makes this node its
/// single voter if the group is new.
pub async fn start_group(
    context: &str,
    stored: std::sync::Arc<crate::stored::StoredContext>,
    log_segment_size: u64,
) -> anyhow::Result<Raft> {
    use anyhow::Context as _;
    let log_dir = stored.dir.join("log");
    let log = log_store::LogStore::open(
        &log_dir,
        log_store::LogStoreOptions {
            segment_size: log_segment_size,
            cache_bytes: 64 << 20,
        },
    )
    .with_context(|| format!("opening the Raft log of context {context}"))?;
    let sm = state_machine::StateMachine::open(stored)
        .with_context(|| format!("opening the state machine of context {context}"))?;
    let config = openraft::Config {
        cluster_name: context.to_owned(),
        // A lone voter elects itself after one election timeout: keep start-up quick.
        heartbeat_interval: 100,
        election_timeout_min: 200,
        election_timeout_max: 400,
        // Snapshots are pointers (see state_machine); take one every few thousand batches so the
        // log can be purged behind durable segments (an entry can hold thousands of events, so the
        // log would otherwise hold a second copy of gigabytes of them).
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(1_000),
        max_in_snapshot_log_to_keep: 200,
        max_payload_entries: 64,
        ..Default::default()
    };
    let config = std::sync::Arc::new(config.validate().context("raft config")?);
    let raft = openraft::Raft::new(LOCAL_NODE, config, network::NoPeers, log, sm)
        .await
        .with_context(|| format!("starting the Raft group of context {context}"))?;
    if !raft.is_initialized().await.context("raft state")? {
        let mut members = std::collections::BTreeMap::new();
        members.insert(LOCAL_NODE, openraft::BasicNode::default());
        raft.initialize(members)
            .await
            .with_context(|| format!("initializing the Raft group of context {context}"))?;
    }
    Ok(raft)
}
