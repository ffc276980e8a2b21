//! Consensus: one openraft group per context. This module is the only place that names
//! openraft types; the rest of the eventstore talks to it through `Command`/`CommandResult`.
//!
//! openraft is pinned to one exact version (see docs/decisions/0002-openraft-version.md).
//! - `log_store`: the Raft log in segment files under `<context>/log/`; an append is
//!   acknowledged to openraft (flush callback) only after it is fsynced, and concurrent appends
//!   share one fsync (group commit).
//! - `state_machine`: applying committed entries into the context's event and snapshot segments.
//! - `network`: the group's RPCs to other members, through the router (`myelin_raft_relay`).
//! - `transfer`: the snapshot data: the segment files streamed to a member behind the leader's
//!   purged log, checked and staged on its side (docs/decisions/0011).

pub mod log_store;
pub mod network;
pub mod state_machine;
pub mod transfer;

use crate::command::{Command, CommandResult};

openraft::declare_raft_types!(
    /// Raft types of a context's group.
    pub TypeConfig:
        D = Command,
        R = CommandResult,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = transfer::SegmentStream,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type NodeId = u64;
pub type LogId = openraft::LogId<NodeId>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type StorageError = openraft::StorageError<NodeId>;

/// The Raft handle of a context's group.
pub type Raft = openraft::Raft<TypeConfig>;

/// The member id of a standalone group's one member: every context created before this node
/// joined a cluster. Groups that span nodes get their ids from the cluster configuration.
pub const LOCAL_NODE: NodeId = 1;

/// The openraft network of every group: RPCs go through this node's router (see
/// `myelin_raft_relay`), entries as their log records.
pub type Network = myelin_raft_relay::RelayNetwork<TypeConfig, network::LogRecords>;

/// Who this node is in a context's group, kept in `<context>/member.json` so that a restart
/// keeps its identity. A context without the file is a standalone group whose one member is
/// [`LOCAL_NODE`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Member {
    pub id: NodeId,
    pub node: String,
}

/// How a group that has no membership yet gets one.
#[derive(Debug, Clone)]
pub enum Bootstrap {
    /// This node alone is the group (a standalone context).
    Alone,
    /// These members (id -> node name) are the group's first voters; every one of them is given
    /// the same list, so whichever initialises first, they agree.
    Voters(std::collections::BTreeMap<NodeId, String>),
    /// A member added to a running group: the leader brings it the membership.
    Wait,
}

/// Test-only: `MYELIN_TEST_SNAPSHOT_LOGS=<n>` takes a snapshot every `n` entries (keeping `n / 5`
/// behind it) instead of every 1000 (keeping 200), so that a cluster test purges a log after
/// hundreds of appends rather than thousands. Not a setting: production never sets it.
pub const TEST_SNAPSHOT_LOGS_ENV: &str = "MYELIN_TEST_SNAPSHOT_LOGS";

/// How many entries go between snapshots, and how many are kept behind one.
fn snapshot_logs() -> (u64, u64) {
    match std::env::var(TEST_SNAPSHOT_LOGS_ENV)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        Some(n) if n >= 10 => (n, n / 5),
        _ => (1_000, 200),
    }
}

/// The member this group's member believes leads it, and that member's node (`None` when its
/// membership names no node, as in a group created before the node had peers).
pub fn leader(raft: &Raft) -> Option<(NodeId, Option<String>)> {
    let metrics = raft.metrics();
    let metrics = metrics.borrow();
    let leader = metrics.current_leader?;
    let node = metrics
        .membership_config
        .membership()
        .get_node(&leader)
        .map(|n| n.addr.clone())
        .filter(|n| !n.is_empty());
    Some((leader, node))
}

/// Starts the Raft group of one context over its recovered stores, as member `me`, and gives a
/// new group its first membership as `bootstrap` says.
pub async fn start_group(
    context: &str,
    stored: std::sync::Arc<crate::stored::StoredContext>,
    log_segment_size: u64,
    me: &Member,
    bootstrap: Bootstrap,
    network: Network,
) -> anyhow::Result<Raft> {
    use anyhow::Context as _;
    let log_dir = stored.dir.join("log");
    let mut log = log_store::LogStore::open(
        &log_dir,
        log_store::LogStoreOptions {
            segment_size: log_segment_size,
            cache_bytes: 64 << 20,
            hold: crate::backup::node_hold().clone(),
        },
    )
    .with_context(|| format!("opening the Raft log of context {context}"))?;
    let mut sm = state_machine::StateMachine::open(stored)
        .with_context(|| format!("opening the state machine of context {context}"))?;
    // Before a restored context's applied state becomes its snapshot: that snapshot must hold
    // the book as of the applied state.
    sm.replay_scheduled(&mut log)
        .await
        .with_context(|| format!("restoring the scheduled events of context {context}"))?;
    reconcile_restored(context, &mut log, &mut sm).await?;
    let (snapshot_every, keep_behind) = snapshot_logs();
    let config = openraft::Config {
        cluster_name: context.to_owned(),
        // A lone voter elects itself after one election timeout: keep start-up quick.
        heartbeat_interval: 100,
        election_timeout_min: 200,
        election_timeout_max: 400,
        // Snapshots are pointers (see state_machine); take one every few thousand batches so the
        // log can be purged behind durable segments (an entry can hold thousands of events, so the
        // log would otherwise hold a second copy of gigabytes of them).
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(snapshot_every),
        max_in_snapshot_log_to_keep: keep_behind,
        max_payload_entries: 64,
        // A member behind the purged log is sent the segment files (`transfer`), a chunk per
        // relay message: 1 MiB keeps one group's transfer from crowding a peer link's window
        // (4 MiB per stream). Each chunk has this long; the last one includes the install
        // (renames and fsyncs of the staged files, which were fsynced as they arrived).
        snapshot_max_chunk_size: 1 << 20,
        install_snapshot_timeout: 10_000,
        ..Default::default()
    };
    let config = std::sync::Arc::new(config.validate().context("raft config")?);
    let raft = openraft::Raft::new(me.id, config, network, log, sm)
        .await
        .with_context(|| format!("starting the Raft group of context {context}"))?;
    if !raft.is_initialized().await.context("raft state")? {
        let voters: std::collections::BTreeMap<NodeId, openraft::BasicNode> = match bootstrap {
            Bootstrap::Alone => [(me.id, openraft::BasicNode::new(&me.node))].into(),
            Bootstrap::Voters(voters) => voters
                .into_iter()
                .map(|(id, node)| (id, openraft::BasicNode::new(node)))
                .collect(),
            Bootstrap::Wait => return Ok(raft),
        };
        raft.initialize(voters)
            .await
            .with_context(|| format!("initializing the Raft group of context {context}"))?;
    }
    Ok(raft)
}

/// Makes a context whose segments are ahead of its Raft log startable. That happens only in a data
/// directory restored from a backup, which copies the log before the segments: the segments then
/// hold entries applied after the log copy (normally an entry is applied only after it is durable
/// in the log, so the log is never behind). openraft would purge its log up to the applied entry
/// but insists on a snapshot that covers it, and its vote may be older than those entries' term.
/// So: the applied state becomes the snapshot (the segments are fsynced and `snapshot.json`
/// points at the applied entry), and the vote is raised to the term of the applied entry.
///
/// The opposite case — the log holds entries the segments lack — needs nothing: openraft
/// re-applies them once the node leads again.
async fn reconcile_restored(
    context: &str,
    log: &mut log_store::LogStore,
    sm: &mut state_machine::StateMachine,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use openraft::storage::{RaftLogStorage, RaftStateMachine};
    let (applied, _) = sm.applied_state().await.context("reading the applied state")?;
    let Some(applied) = applied else {
        return Ok(());
    };
    let log_state = log.get_log_state().await.context("reading the log state")?;
    if log_state.last_log_id >= Some(applied) {
        return Ok(());
    }
    tracing::warn!(
        context,
        applied = %applied,
        log_ends = ?log_state.last_log_id,
        "the segments are ahead of the Raft log (a restored backup): taking them as the snapshot"
    );
    tokio::task::block_in_place(|| sm.snapshot_applied_state()).context("snapshot of the applied state")?;
    let vote = log.read_vote().await.context("reading the vote")?;
    if vote.is_none_or(|v| v.leader_id().term < applied.leader_id.term) {
        let raised = openraft::Vote::new_committed(applied.leader_id.term, applied.leader_id.node_id);
        log.save_vote(&raised).await.context("saving the vote")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! Restoring a context from copies taken while it runs, the way a backup takes them: the Raft
    //! log first, the segments later (see `crate::backup`).

    use std::path::Path;
    use std::sync::Arc;

    use myelin_proto::axon::event::Event;
    use prost::Message;

    use super::*;
    use crate::command::Transaction;
    use crate::stored::{Limits, StoredContext};

    const LIMITS: Limits = Limits {
        event_segment_size: 1500,
        snapshot_segment_size: 1500,
    };
    const LOG_SEGMENT: u64 = 2000;

    async fn open(dir: &Path) -> (Arc<StoredContext>, Raft) {
        let stored = Arc::new(StoredContext::open("ctx", dir, LIMITS).unwrap());
        let raft = start_group("ctx", stored.clone(), LOG_SEGMENT, &me(), Bootstrap::Alone, no_router())
            .await
            .unwrap();
        raft.wait(Some(std::time::Duration::from_secs(10)))
            .current_leader(LOCAL_NODE, "leader")
            .await
            .unwrap();
        (stored, raft)
    }

    fn me() -> Member {
        Member {
            id: LOCAL_NODE,
            node: "n1".into(),
        }
    }

    /// A standalone group never sends: a relay to a socket that does not exist will do.
    pub(crate) fn no_router() -> Network {
        Network::new(
            "ctx",
            myelin_raft_relay::relay_client(Path::new("/nonexistent/router.sock")).unwrap(),
        )
    }

    async fn append(raft: &Raft, from: i64, to: i64) {
        for seq in from..to {
            let event = Event {
                aggregate_identifier: "agg".into(),
                aggregate_sequence_number: seq,
                aggregate_type: "T".into(),
                ..Default::default()
            };
            let record = crate::stored::record_of(&event, crate::segment::Kind::Events);
            let result = raft
                .client_write(Command::AppendEvents(vec![Transaction { events: vec![record] }]))
                .await
                .unwrap();
            assert_eq!(
                result.data.outcomes,
                vec![crate::command::Outcome::Stored {
                    first_token: seq,
                    count: 1
                }]
            );
        }
    }

    async fn snapshot_and_purge(raft: &Raft) {
        let applied = raft.metrics().borrow().last_applied;
        raft.trigger().snapshot().await.unwrap();
        let wait = || raft.wait(Some(std::time::Duration::from_secs(10)));
        wait()
            .metrics(|m| m.snapshot.is_some() && m.snapshot >= applied, "snapshot built")
            .await
            .unwrap();
        let upto = raft.metrics().borrow().snapshot.unwrap().index - 5;
        raft.trigger().purge_log(upto).await.unwrap();
        wait()
            .metrics(|m| m.purged.is_some_and(|p| p.index == upto), "log purged")
            .await
            .unwrap();
    }

    fn copy(path: &str, context_dir: &Path, to: &Path) {
        let from = Path::new(path);
        let rel = from.strip_prefix(std::path::absolute(context_dir).unwrap()).unwrap();
        let target = to.join(rel);
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::copy(from, target).unwrap();
    }

    fn copy_log(from: &Path, to: &Path) {
        let listed = crate::backup::list_log_segments(from).unwrap();
        for segment in &listed.segments {
            for path in &segment.paths {
                copy(path, from, to);
            }
        }
        for path in &listed.state_files {
            copy(path, from, to);
        }
    }

    fn copy_segments(stored: &StoredContext, from: &Path, to: &Path) {
        for store in [&stored.snapshots, &stored.events] {
            for files in store.segment_files() {
                for path in &files.paths {
                    copy(&std::path::absolute(path).unwrap().display().to_string(), from, to);
                }
            }
        }
    }

    fn sequences(stored: &StoredContext) -> Vec<i64> {
        stored
            .events
            .read_from(0, usize::MAX, usize::MAX)
            .unwrap()
            .into_iter()
            .map(|(token, bytes)| {
                let event = Event::decode(bytes).unwrap();
                assert_eq!(token, event.aggregate_sequence_number, "tokens are unchanged");
                event.aggregate_sequence_number
            })
            .collect()
    }

    /// Segments copied after the log hold entries the log copy lacks (and the log was purged
    /// before): the restored context starts from the segments and goes on after them.
    #[tokio::test(flavor = "multi_thread")]
    async fn segments_ahead_of_the_log() {
        let live = tempfile::tempdir().unwrap();
        let restored = tempfile::tempdir().unwrap();
        let (stored, raft) = open(live.path()).await;
        append(&raft, 0, 60).await;
        snapshot_and_purge(&raft).await;
        append(&raft, 60, 80).await;
        copy_log(live.path(), restored.path());
        append(&raft, 80, 120).await;
        copy_segments(&stored, live.path(), restored.path());
        raft.shutdown().await.unwrap();
        drop(raft);

        let (stored, raft) = open(restored.path()).await;
        assert_eq!(sequences(&stored), (0..120).collect::<Vec<_>>());
        append(&raft, 120, 125).await;
        raft.shutdown().await.unwrap();
        drop(raft);
        let (stored, raft) = open(restored.path()).await;
        assert_eq!(sequences(&stored), (0..125).collect::<Vec<_>>());
        raft.shutdown().await.unwrap();
    }

    /// The log copy holds entries the segment copy lacks: they are applied again at start.
    #[tokio::test(flavor = "multi_thread")]
    async fn log_ahead_of_the_segments() {
        let live = tempfile::tempdir().unwrap();
        let restored = tempfile::tempdir().unwrap();
        let (stored, raft) = open(live.path()).await;
        append(&raft, 0, 50).await;
        copy_segments(&stored, live.path(), restored.path());
        append(&raft, 50, 70).await;
        copy_log(live.path(), restored.path());
        raft.shutdown().await.unwrap();
        drop(raft);

        let (stored, raft) = open(restored.path()).await;
        raft.wait(Some(std::time::Duration::from_secs(10)))
            .applied_index_at_least(Some(71), "re-applied")
            .await
            .unwrap();
        assert_eq!(sequences(&stored), (0..70).collect::<Vec<_>>());
        append(&raft, 70, 72).await;
        raft.shutdown().await.unwrap();
    }

    /// A pointer written before pointers were exact (its token counts past its entry) is never
    /// sent as it is: the snapshot is taken anew, at the applied state, and the files listed end
    /// there.
    #[tokio::test(flavor = "multi_thread")]
    async fn an_inexact_pointer_is_taken_anew_before_it_is_sent() {
        use openraft::storage::RaftStateMachine;
        let dir = tempfile::tempdir().unwrap();
        let (stored, raft) = open(dir.path()).await;
        append(&raft, 0, 30).await;
        snapshot_and_purge(&raft).await;
        raft.shutdown().await.unwrap();
        drop(raft);
        let path = dir.path().join(crate::install::POINTER_FILE);
        let mut pointer: state_machine::SnapshotPointer =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let exact = pointer.meta.last_log_id;
        let mut earlier = exact.unwrap();
        earlier.index -= 3;
        pointer.meta.last_log_id = Some(earlier);
        std::fs::write(&path, serde_json::to_vec(&pointer).unwrap()).unwrap();

        let mut sm = state_machine::StateMachine::open(stored.clone()).unwrap();
        let snapshot = sm.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(snapshot.meta.last_log_id, sm.applied_state().await.unwrap().0);
        let retaken: state_machine::SnapshotPointer = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(retaken.meta.last_log_id, snapshot.meta.last_log_id);
        assert_eq!(retaken.event_tokens, stored.events.next_token());
    }

    fn scheduled_event(id: &str, instant: i64, replaces: &str) -> Command {
        let event = Event {
            message_identifier: id.into(),
            ..Default::default()
        };
        Command::Schedule(crate::command::Scheduling {
            token: id.into(),
            instant,
            replaces: replaces.into(),
            record: crate::stored::record_of(&event, crate::segment::Kind::Events),
        })
    }

    async fn write(raft: &Raft, command: Command) -> Vec<crate::command::Outcome> {
        raft.client_write(command).await.unwrap().data.outcomes
    }

    /// Appends `n` events of no aggregate, one entry each.
    async fn fill(raft: &Raft, n: usize) {
        for _ in 0..n {
            let event = Event {
                message_identifier: "fill".into(),
                ..Default::default()
            };
            let record = crate::stored::record_of(&event, crate::segment::Kind::Events);
            write(raft, Command::AppendEvents(vec![Transaction { events: vec![record] }])).await;
        }
    }

    fn message_ids(stored: &StoredContext) -> Vec<String> {
        stored
            .events
            .read_from(0, usize::MAX, usize::MAX)
            .unwrap()
            .into_iter()
            .map(|(_, bytes)| Event::decode(bytes).unwrap().message_identifier)
            .collect()
    }

    fn pending(stored: &StoredContext) -> Vec<String> {
        stored.scheduled.read(|book| book.due(i64::MAX, usize::MAX))
    }

    /// Schedule, reschedule, publish and cancel through committed entries: a publish appends
    /// the event once and removes the schedule; a second publish of it (a new leader's timer)
    /// and a cancel after it change nothing.
    #[tokio::test(flavor = "multi_thread")]
    async fn scheduled_events_are_published_once_and_cancel_after_publish_is_a_no_op() {
        use crate::command::Outcome;
        let dir = tempfile::tempdir().unwrap();
        let (stored, raft) = open(dir.path()).await;
        append(&raft, 0, 2).await;
        assert_eq!(
            write(&raft, scheduled_event("s1", 10, "")).await,
            vec![Outcome::Scheduled]
        );
        assert_eq!(
            write(&raft, scheduled_event("s2", 20, "")).await,
            vec![Outcome::Scheduled]
        );
        assert_eq!(
            write(&raft, scheduled_event("s3", 30, "s2")).await,
            vec![Outcome::Scheduled]
        );
        assert_eq!(pending(&stored), vec!["s1", "s3"]);
        let published = write(&raft, Command::PublishScheduled(vec!["s1".into(), "s2".into()])).await;
        assert_eq!(
            published,
            vec![
                Outcome::Stored {
                    first_token: 2,
                    count: 1
                },
                Outcome::NotPending
            ]
        );
        assert_eq!(
            write(&raft, Command::PublishScheduled(vec!["s1".into()])).await,
            vec![Outcome::NotPending]
        );
        assert_eq!(
            write(&raft, Command::CancelScheduled("s1".into())).await,
            vec![Outcome::NotPending]
        );
        assert_eq!(
            write(&raft, Command::CancelScheduled("s3".into())).await,
            vec![Outcome::NotPending]
        );
        assert_eq!(
            write(&raft, Command::PublishScheduled(vec!["s3".into()])).await,
            vec![Outcome::NotPending]
        );
        assert!(pending(&stored).is_empty());
        let ids = message_ids(&stored);
        assert_eq!(ids.iter().filter(|id| *id == "s1").count(), 1);
        assert_eq!(ids.len(), 3, "{ids:?}");
        raft.shutdown().await.unwrap();
    }

    /// The book survives restarts: replayed from the log after the snapshot, then read from the
    /// snapshot pointer once the log is purged behind it; a publish applied before the restart
    /// is not pending after it.
    #[tokio::test(flavor = "multi_thread")]
    async fn scheduled_events_survive_restarts_from_the_log_and_from_the_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let (stored, raft) = open(dir.path()).await;
        write(&raft, scheduled_event("early", 1, "")).await;
        write(&raft, scheduled_event("late", 2, "")).await;
        fill(&raft, 10).await;
        write(&raft, Command::PublishScheduled(vec!["early".into()])).await;
        write(&raft, scheduled_event("later", 3, "")).await;
        raft.shutdown().await.unwrap();
        drop((stored, raft));

        let (stored, raft) = open(dir.path()).await;
        assert_eq!(pending(&stored), vec!["late", "later"]);
        fill(&raft, 60).await;
        write(&raft, Command::CancelScheduled("later".into())).await;
        write(&raft, scheduled_event("last", 4, "")).await;
        fill(&raft, 10).await;
        snapshot_and_purge(&raft).await;
        write(&raft, scheduled_event("after-snapshot", 5, "")).await;
        raft.shutdown().await.unwrap();
        drop((stored, raft));

        let pointer: state_machine::SnapshotPointer =
            serde_json::from_slice(&std::fs::read(dir.path().join(crate::install::POINTER_FILE)).unwrap()).unwrap();
        assert_eq!(pointer.scheduled.pending.len(), 2, "late and last are in the snapshot");
        let (stored, raft) = open(dir.path()).await;
        assert_eq!(pending(&stored), vec!["late", "last", "after-snapshot"]);
        assert_eq!(message_ids(&stored).iter().filter(|id| *id == "early").count(), 1);
        raft.shutdown().await.unwrap();
    }

    /// A restored vote (or none at all) older than the newest applied entry's term is raised to
    /// it, so that this node never leads in a term below entries it already holds.
    #[tokio::test(flavor = "multi_thread")]
    async fn the_vote_is_raised_to_the_applied_term() {
        use openraft::storage::RaftLogStorage;
        let dir = tempfile::tempdir().unwrap();
        let stored = Arc::new(StoredContext::open("ctx", dir.path(), LIMITS).unwrap());
        let event = Event {
            aggregate_identifier: "agg".into(),
            aggregate_type: "T".into(),
            ..Default::default()
        };
        let record = crate::stored::record_of(&event, crate::segment::Kind::Events);
        let entry = crate::segment::EntryRef {
            term: 3,
            leader: 1,
            index: 7,
        };
        stored
            .apply(
                entry,
                &Command::AppendEvents(vec![Transaction { events: vec![record] }]),
            )
            .unwrap();
        let mut log = log_store::LogStore::open(&dir.path().join("log"), Default::default()).unwrap();
        log.save_vote(&openraft::Vote::new_committed(1, 1)).await.unwrap();
        let mut sm = state_machine::StateMachine::open(stored).unwrap();
        reconcile_restored("ctx", &mut log, &mut sm).await.unwrap();
        assert_eq!(
            log.read_vote().await.unwrap(),
            Some(openraft::Vote::new_committed(3, 1))
        );
        assert!(dir.path().join("snapshot.json").is_file());
    }
}
