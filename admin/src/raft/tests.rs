//! Tests of the `_admin` group as a whole: openraft's storage suite on the SQLite log and state
//! machine, crash and restart, a control DB from before `_admin` was a Raft group, and three
//! (then four) members in one process over a network that calls the other members directly.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{InstallSnapshotError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::storage::{RaftLogReader, RaftLogStorage, RaftLogStorageExt, RaftStateMachine};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{AnyError, CommittedLeaderId, EntryPayload};
use tempfile::TempDir;

use super::log_store::AdminLog;
use super::state_machine::AdminStateMachine;
use super::*;
use crate::control_db::applications::NewApplication;
use crate::control_db::contexts::{Member, MemberRole, Node};

// -- openraft's storage suite ----------------------------------------------------------------

struct Builder;

impl StoreBuilder<AdminTypes, AdminLog, AdminStateMachine, TempDir> for Builder {
    async fn build(&self) -> Result<(TempDir, AdminLog, AdminStateMachine), StorageError> {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = ControlDb::open(&dir.path().join("control.sqlite3")).expect("open control DB");
        Ok((dir, AdminLog::new(db.clone()), AdminStateMachine::new(db)))
    }
}

#[test]
fn openraft_storage_suite() {
    Suite::test_all(Builder).unwrap();
}

// -- fixtures ---------------------------------------------------------------------------------

const WAIT: Duration = Duration::from_secs(20);

fn node_row(name: &str, port: u16) -> Node {
    Node {
        name: name.into(),
        host_name: format!("{name}.example"),
        grpc_port: port,
        http_port: 28024,
        internal_host_name: format!("{name}.internal"),
        grpc_internal_port: 28224,
    }
}

fn create_context(name: &str, node: &str) -> AdminCommand {
    AdminCommand::CreateContext {
        name: name.into(),
        meta_data: BTreeMap::from([("owner".to_owned(), "tests".to_owned())]),
        members: vec![Member {
            node: node.into(),
            role: MemberRole::Primary,
        }],
        created_at_millis: 1_700_000_000_000,
        seats: Vec::new(),
    }
}

fn application(name: &str, token: u8) -> AdminCommand {
    AdminCommand::CreateApplication(NewApplication {
        name: name.into(),
        description: "an app".into(),
        token_sha256: [token; 32],
        token_prefix: "0123".into(),
        roles: BTreeMap::from([("*".to_owned(), vec!["READ".to_owned()])]),
        created_at_millis: 1_700_000_000_001,
    })
}

/// Every replicated row of a control DB, one line each, sorted.
async fn rows(db: &ControlDb) -> Vec<String> {
    let data = db.call(|conn| snapshot::dump(conn)).await.unwrap();
    let value: serde_json::Value = serde_json::from_slice(&data).unwrap();
    let mut lines = Vec::new();
    for (table, content) in value["tables"].as_object().unwrap() {
        for row in content["rows"].as_array().unwrap() {
            lines.push(format!("{table}: {row}"));
        }
    }
    lines.sort();
    lines
}

fn has_context(rows: &[String], name: &str) -> bool {
    rows.iter()
        .any(|r| r.starts_with("contexts: ") && r.contains(&format!("{{\"Text\":\"{name}\"}}")))
}

fn test_config() -> openraft::Config {
    openraft::Config {
        heartbeat_interval: 50,
        election_timeout_min: 200,
        election_timeout_max: 400,
        ..default_config()
    }
}

fn options(id: NodeId, bootstrap: Bootstrap) -> GroupOptions {
    GroupOptions {
        id,
        node: openraft::BasicNode::new(format!("node-{id}")),
        bootstrap,
        config: test_config(),
        leader_wait: Duration::from_secs(1),
        start_wait: WAIT,
    }
}

fn log_id(index: u64) -> LogId {
    LogId::new(CommittedLeaderId::new(1, LOCAL_NODE), index)
}

fn entry(index: u64, payload: EntryPayload<AdminTypes>) -> Entry {
    Entry {
        log_id: log_id(index),
        payload,
    }
}

async fn applied_state(db: &ControlDb) -> (Option<LogId>, Membership) {
    AdminStateMachine::new(db.clone()).applied_state().await.unwrap()
}

// -- crash and restart ------------------------------------------------------------------------

/// The log of a one-node group that committed six entries, of which a crash let only the first
/// five reach the state machine. Entry 3 creates `short-lived`, entry 4 deletes it: a state
/// machine that applied an entry twice (3 again after 4) would show it.
async fn crashed_before_applying_the_last_entry(path: &Path) {
    let db = ControlDb::open(path).unwrap();
    let mut log = AdminLog::new(db.clone());
    let mut sm = AdminStateMachine::new(db.clone());
    let members = BTreeMap::from([(LOCAL_NODE, openraft::BasicNode::new("node-1"))]);
    let entries = vec![
        entry(
            0,
            EntryPayload::Membership(openraft::Membership::new(vec![BTreeSet::from([LOCAL_NODE])], members)),
        ),
        entry(1, EntryPayload::Blank),
        entry(
            2,
            EntryPayload::Normal(AdminCommand::UpsertNode(node_row("node-1", 28124))),
        ),
        entry(3, EntryPayload::Normal(create_context("short-lived", "node-1"))),
        entry(
            4,
            EntryPayload::Normal(AdminCommand::DeleteContext {
                preserve: false,
                name: "short-lived".into(),
            }),
        ),
        entry(5, EntryPayload::Normal(create_context("orders", "node-1"))),
    ];
    log.save_vote(&Vote::new_committed(1, LOCAL_NODE)).await.unwrap();
    log.blocking_append(entries.clone()).await.unwrap();
    log.save_committed(Some(log_id(5))).await.unwrap();
    sm.apply(entries[..3].to_vec()).await.unwrap();
    sm.apply(entries[3..5].to_vec()).await.unwrap();

    // The crash: the last apply fails (the file turned read-only), and nothing of it stays.
    db.call(|conn| Ok(conn.pragma_update(None, "query_only", true)?))
        .await
        .unwrap();
    let failed = sm.apply(entries[5..].to_vec()).await;
    assert!(failed.is_err(), "an SQLite failure is a storage error");
    db.call(|conn| Ok(conn.pragma_update(None, "query_only", false)?))
        .await
        .unwrap();
    assert_eq!(applied_state(&db).await.0, Some(log_id(4)));
    let rows = rows(&db).await;
    assert!(
        !has_context(&rows, "orders") && !has_context(&rows, "short-lived"),
        "{rows:?}"
    );
}

#[tokio::test]
async fn a_restart_applies_each_committed_entry_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("control.sqlite3");
    crashed_before_applying_the_last_entry(&path).await;

    // Reopened: the applied id names exactly the entries whose rows are there.
    let db = ControlDb::open(&path).unwrap();
    assert_eq!(applied_state(&db).await.0, Some(log_id(4)));
    let group = AdminGroup::start(db.clone(), options(LOCAL_NODE, Bootstrap::Standalone), NoPeers)
        .await
        .unwrap();
    group
        .raft()
        .wait(Some(WAIT))
        .metrics(|m| m.last_applied >= Some(log_id(5)), "entry 5 applied")
        .await
        .unwrap();
    let after_restart = rows(&db).await;
    assert!(
        has_context(&after_restart, "orders"),
        "the committed entry 5 was applied"
    );
    assert!(
        !has_context(&after_restart, "short-lived"),
        "entry 3 was not applied again: {after_restart:?}"
    );

    // A change after the restart, then a clean restart: log, applied id and rows agree.
    let (written, response) = group.propose_at(application("billing", 7)).await.unwrap();
    assert_eq!(response, AdminResponse::Applied);
    let applied = written;
    group.shutdown().await;
    drop(group);

    let db = ControlDb::open(&path).unwrap();
    let before = rows(&db).await;
    assert_eq!(applied_state(&db).await.0, Some(applied));
    let mut log = AdminLog::new(db.clone());
    let state = log.get_log_state().await.unwrap();
    assert_eq!(
        state.last_log_id,
        Some(applied),
        "every log entry is applied after a clean stop"
    );
    let purged = state
        .last_purged_log_id
        .expect("the first start purged the log behind a snapshot");
    let kept = log.try_get_log_entries(..).await.unwrap();
    let indexes: Vec<u64> = kept.iter().map(|e| e.log_id.index).collect();
    let expected: Vec<u64> = (purged.index + 1..=applied.index).collect();
    assert_eq!(indexes, expected, "the log is one run of entries after the purged id");

    let group = AdminGroup::start(db.clone(), options(LOCAL_NODE, Bootstrap::Standalone), NoPeers)
        .await
        .unwrap();
    assert_eq!(rows(&db).await, before, "a restart changes no row");
    assert_eq!(
        group.propose(application("billing", 8)).await.unwrap(),
        AdminResponse::Refused(Refusal::ApplicationExists("billing".into())),
        "a refusal is an answer"
    );
    group.shutdown().await;
}

#[tokio::test]
async fn a_failed_append_is_reported_and_leaves_no_entry() {
    let dir = tempfile::tempdir().unwrap();
    let db = ControlDb::open(&dir.path().join("control.sqlite3")).unwrap();
    let mut log = AdminLog::new(db.clone());
    log.blocking_append([entry(0, EntryPayload::Blank)]).await.unwrap();
    db.call(|conn| Ok(conn.pragma_update(None, "query_only", true)?))
        .await
        .unwrap();
    let two = [entry(1, EntryPayload::Blank), entry(2, EntryPayload::Blank)];
    assert!(log.blocking_append(two).await.is_err());
    db.call(|conn| Ok(conn.pragma_update(None, "query_only", false)?))
        .await
        .unwrap();
    assert_eq!(log.get_log_state().await.unwrap().last_log_id, Some(log_id(0)));
}

/// A control DB as the release before `_admin` Raft wrote it keeps its rows, and they are in
/// the first snapshot (so a later member receives them).
#[tokio::test]
async fn a_control_db_from_before_the_raft_group_starts_with_its_rows() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("control.sqlite3");
    {
        let mut conn = crate::control_db::connect(&path).unwrap();
        crate::control_db::schema::migrate(&mut conn, &path, &crate::control_db::schema::MIGRATIONS[..3]).unwrap();
        conn.execute_batch(
            "INSERT INTO nodes VALUES ('old', 'h', 8124, 8024, 'h', 8224);
             INSERT INTO contexts (name, created_at_millis) VALUES ('_admin', 1), ('legacy', 2);
             INSERT INTO context_members VALUES ('_admin', 'old', 'PRIMARY'), ('legacy', 'old', 'PRIMARY');",
        )
        .unwrap();
    }
    let db = ControlDb::open(&path).unwrap();
    let before = rows(&db).await;
    assert_eq!(applied_state(&db).await.0, None);
    let group = AdminGroup::start(db.clone(), options(LOCAL_NODE, Bootstrap::Standalone), NoPeers)
        .await
        .unwrap();
    assert_eq!(rows(&db).await, before);
    let metrics = group.raft().metrics().borrow().clone();
    assert_eq!(metrics.current_leader, Some(LOCAL_NODE));
    assert!(metrics.purged.is_some(), "the log starts after a snapshot: {metrics:?}");
    let snapshot = group.raft().get_snapshot().await.unwrap().expect("a snapshot");
    let other = tempfile::tempdir().unwrap();
    let copy = ControlDb::open(&other.path().join("copy.sqlite3")).unwrap();
    let data = snapshot.snapshot.into_inner();
    copy.call(move |conn| {
        let tx = conn.transaction()?;
        snapshot::restore(&tx, &data).map_err(|e| crate::control_db::DbError::Io(std::io::Error::other(e)))?;
        tx.commit()?;
        Ok(())
    })
    .await
    .unwrap();
    assert_eq!(rows(&copy).await, before, "the snapshot carries the rows from before");
    group.shutdown().await;
}

// -- several members in one process -----------------------------------------------------------

/// The members of a test group, reachable by id; a member taken out is unreachable.
#[derive(Clone, Default)]
struct Members(Arc<Mutex<BTreeMap<NodeId, AdminRaft>>>);

impl Members {
    fn get(&self, id: NodeId) -> Option<AdminRaft> {
        self.0.lock().unwrap().get(&id).cloned()
    }
}

/// A network that calls the target member's `Raft` directly.
struct Direct {
    target: NodeId,
    members: Members,
}

impl Direct {
    fn raft(&self) -> Option<AdminRaft> {
        self.members.get(self.target)
    }
}

fn down<E: std::error::Error>(target: NodeId) -> RPCError<NodeId, openraft::BasicNode, E> {
    RPCError::Unreachable(Unreachable::new(&AnyError::error(format!("node {target} is down"))))
}

fn remote<E: std::error::Error>(target: NodeId, e: E) -> RPCError<NodeId, openraft::BasicNode, E> {
    RPCError::RemoteError(RemoteError::new(target, e))
}

impl RaftNetworkFactory<AdminTypes> for Members {
    type Network = Direct;

    async fn new_client(&mut self, target: NodeId, _node: &openraft::BasicNode) -> Direct {
        Direct {
            target,
            members: self.clone(),
        }
    }
}

impl RaftNetwork<AdminTypes> for Direct {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<AdminTypes>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, openraft::BasicNode, RaftError<NodeId>>> {
        let Some(raft) = self.raft() else {
            return Err(down(self.target));
        };
        raft.append_entries(rpc).await.map_err(|e| remote(self.target, e))
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<AdminTypes>,
        _option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, openraft::BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        let Some(raft) = self.raft() else {
            return Err(down(self.target));
        };
        raft.install_snapshot(rpc).await.map_err(|e| remote(self.target, e))
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        _option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, openraft::BasicNode, RaftError<NodeId>>> {
        let Some(raft) = self.raft() else {
            return Err(down(self.target));
        };
        raft.vote(rpc).await.map_err(|e| remote(self.target, e))
    }
}

/// One member: its control DB and its group.
struct Replica {
    _dir: TempDir,
    path: PathBuf,
    db: ControlDb,
    group: AdminGroup,
}

async fn start_member(members: &Members, id: NodeId, bootstrap: Bootstrap) -> Replica {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("control.sqlite3");
    let db = ControlDb::open(&path).unwrap();
    let group = AdminGroup::start(db.clone(), options(id, bootstrap), members.clone())
        .await
        .unwrap();
    members.0.lock().unwrap().insert(id, group.raft().clone());
    Replica {
        _dir: dir,
        path,
        db,
        group,
    }
}

async fn wait_applied(member: &Replica, index: u64) {
    member
        .group
        .raft()
        .wait(Some(WAIT))
        .applied_index_at_least(Some(index), "the entry is applied")
        .await
        .unwrap_or_else(|e| panic!("{}: {e}", member.path.display()));
}

/// Proposes a change that must apply; returns its index.
async fn propose(group: &AdminGroup, command: AdminCommand) -> u64 {
    let (log_id, response) = group.propose_at(command).await.unwrap();
    assert_eq!(response, AdminResponse::Applied);
    log_id.index
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_replicate_forward_take_a_fourth_by_snapshot_and_survive_their_leader() {
    let members = Members::default();
    let one = start_member(&members, 1, Bootstrap::Standalone).await;
    for name in ["node-1", "node-2", "node-3", "node-4"] {
        propose(&one.group, AdminCommand::UpsertNode(node_row(name, 28124))).await;
    }
    propose(&one.group, create_context("orders", "node-1")).await;
    propose(&one.group, application("billing", 1)).await;

    // Two more members join: learners first, then voters.
    let two = start_member(&members, 2, Bootstrap::Join).await;
    let three = start_member(&members, 3, Bootstrap::Join).await;
    for (id, member) in [(2, &two), (3, &three)] {
        assert!(
            matches!(
                member.group.propose(create_context("early", "node-1")).await,
                Err(ProposeError::ForwardToLeader(_))
            ),
            "a node that is no member yet refuses to propose"
        );
        one.group
            .add_learner(id, openraft::BasicNode::new(format!("node-{id}")))
            .await
            .unwrap();
    }
    one.group.change_voters([1, 2, 3]).await.unwrap();

    // A change on the leader reaches every member's control DB.
    let index = propose(&one.group, create_context("payments", "node-2")).await;
    for member in [&two, &three] {
        wait_applied(member, index).await;
    }
    let leader_rows = rows(&one.db).await;
    assert!(has_context(&leader_rows, "orders") && has_context(&leader_rows, "payments"));
    assert_eq!(rows(&two.db).await, leader_rows);
    assert_eq!(rows(&three.db).await, leader_rows);

    // A follower does not append: it names the leader.
    match two.group.propose(create_context("elsewhere", "node-2")).await {
        Err(ProposeError::ForwardToLeader(forward)) => {
            assert_eq!(forward.leader_id, Some(1));
            assert_eq!(forward.leader_node.map(|n| n.addr), Some("node-1".to_owned()));
        }
        other => panic!("expected ForwardToLeader, got {other:?}"),
    }
    // A refusal is an answer on the leader, and changes nothing anywhere.
    assert_eq!(
        one.group.propose(create_context("orders", "node-3")).await.unwrap(),
        AdminResponse::Refused(Refusal::ContextExists("orders".into()))
    );

    // More changes, a snapshot, and the log purged behind it: a new member can only start from
    // the snapshot.
    let mut last = 0;
    for port in 0..30 {
        last = propose(&one.group, AdminCommand::UpsertNode(node_row("node-4", 28300 + port))).await;
    }
    one.group.raft().trigger().snapshot().await.unwrap();
    one.group
        .raft()
        .wait(Some(WAIT))
        .metrics(
            |m| m.snapshot.is_some_and(|s| s.index >= last),
            "a snapshot of the latest change",
        )
        .await
        .unwrap();
    one.group.raft().trigger().purge_log(last).await.unwrap();
    one.group
        .raft()
        .wait(Some(WAIT))
        .metrics(|m| m.purged.is_some_and(|p| p.index >= last), "the log purged")
        .await
        .unwrap();

    let four = start_member(&members, 4, Bootstrap::Join).await;
    one.group
        .add_learner(4, openraft::BasicNode::new("node-4"))
        .await
        .unwrap();
    one.group.change_voters([1, 2, 3, 4]).await.unwrap();
    let index = propose(&one.group, create_context("after-snapshot", "node-4")).await;
    wait_applied(&four, index).await;
    let metrics = four.group.raft().metrics().borrow().clone();
    assert!(
        metrics.snapshot.is_some_and(|s| s.index >= last),
        "node 4 started from the snapshot: {metrics:?}"
    );
    let leader_rows = rows(&one.db).await;
    assert!(
        leader_rows.iter().any(|r| r.contains("28329")),
        "the last port is in the state"
    );
    assert_eq!(rows(&four.db).await, leader_rows, "node 4 holds the whole state");

    // The leader goes: the others elect one of themselves, which keeps every committed change.
    members.0.lock().unwrap().remove(&1);
    one.group.shutdown().await;
    let metrics = two
        .group
        .raft()
        .wait(Some(WAIT))
        .metrics(|m| m.current_leader.is_some_and(|l| l != 1), "a new leader")
        .await
        .unwrap();
    let leader_id = metrics.current_leader.unwrap();
    let survivors = [&two, &three, &four];
    let leader = survivors
        .iter()
        .find(|m| m.group.id() == leader_id)
        .expect("the leader is a survivor");
    let index = propose(&leader.group, application("after-failover", 2)).await;
    for member in survivors {
        wait_applied(member, index).await;
    }
    let new_rows = rows(&leader.db).await;
    for row in &leader_rows {
        assert!(new_rows.contains(row), "{row} was lost in the failover");
    }
    assert!(new_rows.iter().any(|r| r.contains("after-failover")));
    for member in survivors {
        assert_eq!(rows(&member.db).await, new_rows, "{}", member.path.display());
    }
    for member in survivors {
        member.group.shutdown().await;
    }
}
