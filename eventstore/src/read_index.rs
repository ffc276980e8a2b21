//! Read indexes, one round for every read waiting at once.
//!
//! A read that must see every event committed before it started needs the leader's commit index
//! from a moment after it started, confirmed by a heartbeat round to a majority (openraft's
//! `get_read_log_id`). One round per read made 64 concurrent readers cost 64 rounds: on the
//! leader 128 heartbeats, on a follower 64 requests across three processes each way. Here the
//! reads of a context share rounds, as etcd's ReadIndex does: a round runs for every read that
//! was waiting when it started, and a read that arrives while a round runs waits for the next
//! one (a round that started before the read could miss an entry committed in between). At most
//! one round is on its way per context.
//!
//! A follower's `ReadIndex` request is answered by the leader with a round of its own, outside
//! these rounds (`forward::answer_read_index`): a round here may wait for another node, and an
//! answer that waited for it could close a cycle between two nodes during a leader change.

use std::time::Duration;

use bytes::Bytes;
use myelin_proto::internal::raft_answer::Outcome as Answer;
use myelin_proto::internal::raft_relay_client::RaftRelayClient;
use myelin_proto::internal::{RaftMessage, RaftRpc};
use tokio::sync::{mpsc, oneshot};
use tonic::transport::Channel;

use crate::consensus::Raft;

/// Reads waiting for a round; a full queue makes callers wait.
const QUEUE: usize = 8192;
/// How long a follower's round waits for the leader's answer; after it the round's reads look
/// for a (new) leader and ask again. Half of the time a read waits for a leader at all
/// (`forward::WAIT_FOR_LEADER`), so that a read caught by a leader that stopped answering (its
/// node paused, its link stalled) can still be served by the next one; far above a round's
/// time under load (a heartbeat round trip to a majority, milliseconds).
const RELAY_TIMEOUT: Duration = Duration::from_millis(1_000);

/// One context's read index rounds; dropping the last handle ends its task.
#[derive(Clone)]
pub struct ReadIndexes {
    queue: mpsc::Sender<oneshot::Sender<Option<u64>>>,
}

impl ReadIndexes {
    pub fn start(group: &str, member: u64, raft: Raft, relay: RaftRelayClient<Channel>) -> ReadIndexes {
        let (queue, rx) = mpsc::channel(QUEUE);
        let asker = Asker {
            group: group.to_owned(),
            member,
            raft,
            relay,
        };
        tokio::spawn(rounds(asker, rx, crate::metrics::context(group)));
        ReadIndexes { queue }
    }

    /// The index this replica must apply before the read that calls this may run, from a round
    /// that started after the call; `None` when no leader answered (look for a new one).
    pub async fn next(&self) -> Option<u64> {
        let (reply, answer) = oneshot::channel();
        self.queue.send(reply).await.ok()?;
        answer.await.ok().flatten()
    }
}

async fn rounds(
    asker: Asker,
    mut rx: mpsc::Receiver<oneshot::Sender<Option<u64>>>,
    metrics: std::sync::Arc<crate::metrics::ContextMetrics>,
) {
    let mut waiting = Vec::new();
    while let Some(first) = rx.recv().await {
        waiting.push(first);
        while let Ok(next) = rx.try_recv() {
            waiting.push(next);
        }
        metrics.read_index_rounds.increment(1);
        metrics.read_index_reads.increment(waiting.len() as u64);
        let index = asker.round(waiting.len()).await;
        for reply in waiting.drain(..) {
            let _ = reply.send(index);
        }
    }
}

/// What a round needs of its context (not the context itself, which owns the rounds).
struct Asker {
    group: String,
    member: u64,
    raft: Raft,
    relay: RaftRelayClient<Channel>,
}

impl Asker {
    #[tracing::instrument(level = "trace", skip(self), fields(group = %self.group))]
    async fn round(&self, reads: usize) -> Option<u64> {
        let (leader, node) = crate::consensus::leader(&self.raft)?;
        if leader == self.member {
            return leader_read_index(&self.raft).await;
        }
        let message = RaftMessage {
            group: self.group.clone(),
            to_node: node?,
            to_member: leader,
            from_node: String::new(),
            rpc: RaftRpc::ReadIndex as i32,
            header: Bytes::new(),
            entries: Vec::new(),
        };
        // Bounded: a leader that stopped answering (its node paused, its link stalled) must not
        // hold this context's reads past the time they give up on a leader.
        let sent = tokio::time::timeout(RELAY_TIMEOUT, self.relay.clone().send(message)).await;
        let answer = sent.ok()?.ok()?.into_inner();
        match answer.outcome {
            Some(Answer::Response(body)) => serde_json::from_slice::<Option<u64>>(&body).ok().flatten(),
            _ => None,
        }
    }
}

/// On a node that leads: its commit index, confirmed by a heartbeat round to a majority; `None`
/// when it no longer leads.
pub async fn leader_read_index(raft: &Raft) -> Option<u64> {
    match raft.get_read_log_id().await {
        Ok((read, _)) => Some(read.map_or(0, |l| l.index)),
        Err(e) => {
            tracing::debug!(error = %e, "read index: no longer the leader");
            None
        }
    }
}
