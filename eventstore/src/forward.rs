//! What a member that does not lead its context's group asks of the leader: appends, schedule
//! changes (Axon's EventScheduler), and the index a read must wait for.
//!
//! A client may connect to any member (issue 11). Its append is handed to the local appender
//! when this node leads; otherwise it is sent, as one command in the log's binary form, through
//! the context's [`Outbox`](crate::outbox::Outbox) and the router to the leader's eventstore,
//! which appends it with its own appender (one transaction stays one transaction, also when the
//! outbox carries it in a batch with others) and answers with the outcome.
//!
//! What a client is told:
//! - The outcome the leader reported, once committed and applied there.
//! - `NotLeader` (AXONIQ-2100, UNAVAILABLE) when no leader is known within [`WAIT_FOR_LEADER`]:
//!   definite, nothing was proposed.
//! - `Unknown` when the append was sent and its answer was lost: it may have been stored.
//!   Never a success that was not confirmed.
//!
//! Reads that must see every event committed before they started (aggregate reads, the highest
//! sequence of an aggregate, the first and last tokens and the token at an instant) wait for
//! [`read_barrier`]: on the leader, a confirmation that it
//! still leads (a heartbeat round to a majority) and its commit index; on a follower, the same
//! asked of the leader; then until this replica has applied that index. A standalone group has
//! nothing to wait for: its appends are applied before they are confirmed.

use std::time::{Duration, Instant};

use bytes::Bytes;
use myelin_proto::internal::raft_answer::Outcome as Answer;
use myelin_proto::internal::{RaftAnswer, RaftMessage};
use myelin_raft_relay::not_delivered;

use crate::append::{AppendError, Work};
use crate::command::{Command, Outcome};
use crate::context::Context;
use crate::outbox::{Leader, Sent};

/// How long an append waits for its context to have a leader: longer than an election after the
/// leader is lost (about one second, see docs/cluster.md), short enough that a client without a
/// majority hears so at once.
const WAIT_FOR_LEADER: Duration = Duration::from_millis(2_000);

/// Stores `work` through the context's leader, wherever it is.
pub async fn append(context: &Context, work: Work) -> Result<Outcome, AppendError> {
    let mut work = Some(work);
    match to_leader(context, || encode(work.take().expect("work until encoded"))).await {
        Led::Elsewhere(answer) => answer,
        Led::Here(encoded) => match work {
            Some(work) => context.appender.append(work).await,
            // Encoded for a leader elsewhere that has since moved here.
            None => {
                let command = Command::decode(encoded.expect("encoded when taken"))
                    .map_err(|e| AppendError::Storage(format!("re-reading a forwarded append: {e}")))?;
                context.appender.append(work_of(command)?).await
            }
        },
    }
}

/// Proposes a schedule change ([`Command::Schedule`] or [`Command::CancelScheduled`]) through
/// the context's leader, wherever it is; what the caller is told is as for [`append`]. The
/// command goes to a leader elsewhere as it is, so the token it names stays the same whoever
/// proposes it.
pub async fn schedule(context: &Context, command: Command) -> Result<Outcome, AppendError> {
    let encode = || {
        let mut out = Vec::with_capacity(command.encoded_len_hint());
        command.encode(&mut out);
        Bytes::from(out)
    };
    match to_leader(context, encode).await {
        Led::Elsewhere(answer) => answer,
        Led::Here(_) => crate::publisher::propose(&context.raft, command).await,
    }
}

/// Where a command went: answered by a leader elsewhere, or to be proposed here (this member
/// leads), with its encoding if it was made for a leader elsewhere first.
enum Led {
    Elsewhere(Result<Outcome, AppendError>),
    Here(Option<Bytes>),
}

/// Sends a command (`encode`d once, when first needed) to the context's leader through the
/// outbox until a leader answers, or returns [`Led::Here`] once this member leads. `NotLeader`
/// when no leader is known within [`WAIT_FOR_LEADER`].
async fn to_leader(context: &Context, encode: impl FnOnce() -> Bytes) -> Led {
    let deadline = Instant::now() + WAIT_FOR_LEADER;
    let mut encode = Some(encode);
    let mut encoded: Option<Bytes> = None;
    loop {
        let leader = crate::consensus::leader(&context.raft);
        let previous = leader.as_ref().map(|(member, _)| *member);
        match leader {
            Some((leader, _)) if leader == context.member.id => return Led::Here(encoded),
            Some((leader, node)) => {
                let Some(node) = node else {
                    return Led::Elsewhere(Err(AppendError::NotLeader));
                };
                let bytes = encoded
                    .get_or_insert_with(|| encode.take().expect("encoded once")())
                    .clone();
                match context.outbox.send(Leader { member: leader, node }, bytes).await {
                    Sent::Answered(result) => return Led::Elsewhere(result),
                    Sent::Lost(why) => return Led::Elsewhere(Err(AppendError::Unknown(why))),
                    // Definite: the leader did not take it; ask again once the group moved on.
                    Sent::NotTaken => {}
                }
            }
            None => {}
        }
        let now = Instant::now();
        if now >= deadline {
            return Led::Elsewhere(Err(AppendError::NotLeader));
        }
        // Wait for a (new) leader, or a moment before asking the same one again.
        let _ = context
            .raft
            .wait(Some((deadline - now).min(Duration::from_millis(100))))
            .metrics(
                |m| m.current_leader.is_some() && m.current_leader != previous,
                "a leader",
            )
            .await;
    }
}

/// Waits until this replica has applied every entry committed before the call; see the module
/// docs. `NotLeader` when no leader answers within [`WAIT_FOR_LEADER`].
pub async fn read_barrier(context: &Context) -> Result<(), AppendError> {
    let me = context.member.id;
    let alone = {
        let metrics = context.raft.metrics();
        let metrics = metrics.borrow();
        metrics.membership_config.membership().voter_ids().eq([me])
    };
    if alone {
        return Ok(());
    }
    let deadline = Instant::now() + WAIT_FOR_LEADER;
    loop {
        let leader = context.raft.metrics().borrow().current_leader;
        let index = context.read_indexes.next().await;
        if let Some(index) = index {
            let remaining = deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(100));
            return context
                .raft
                .wait(Some(remaining))
                .applied_index_at_least(Some(index), "read index applied")
                .await
                .map(|_| ())
                .map_err(|_| AppendError::NotLeader);
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(AppendError::NotLeader);
        }
        let _ = context
            .raft
            .wait(Some((deadline - now).min(Duration::from_millis(100))))
            .metrics(|m| m.current_leader.is_some() && m.current_leader != leader, "a leader")
            .await;
    }
}

/// On the leader: the index a follower's read must wait for, or `None` if this node no longer
/// leads (the follower then looks for the new leader).
pub async fn answer_read_index(context: &Context) -> RaftAnswer {
    // Only a leader answers (a follower that asked a node which no longer leads looks for the
    // new leader itself), and with a round of its own, never from the shared rounds: a node's
    // rounds may wait for another node's answer, so an answer that waited for them could close
    // a cycle between two nodes (A's round waits for B, whose round, taken over by a leader
    // change, waits for A) that no timeout would break.
    let index = crate::read_index::leader_read_index(&context.raft).await;
    match serde_json::to_vec(&index) {
        Ok(body) => RaftAnswer {
            outcome: Some(Answer::Response(body.into())),
        },
        Err(e) => myelin_raft_relay::lost(format!("cannot encode the read index: {e}")),
    }
}

fn encode(work: Work) -> Bytes {
    let command = match work {
        Work::Events(tx) => Command::AppendEvents(vec![tx]),
        Work::Snapshot(record) => Command::AppendSnapshots(vec![record]),
    };
    let mut out = Vec::with_capacity(command.encoded_len_hint());
    command.encode(&mut out);
    out.into()
}

fn work_of(command: Command) -> Result<Work, AppendError> {
    let malformed = || AppendError::Storage("a forwarded append holds more than one transaction".into());
    match command {
        Command::AppendEvents(mut txs) if txs.len() == 1 => Ok(Work::Events(txs.pop().ok_or_else(malformed)?)),
        Command::AppendSnapshots(mut records) if records.len() == 1 => {
            Ok(Work::Snapshot(records.pop().ok_or_else(malformed)?))
        }
        _ => Err(malformed()),
    }
}

/// On the leader: appends another member forwarded, one command each (see `outbox`). Each is
/// appended here only (never forwarded again, so a message cannot circle while leadership
/// moves) and answered on its own, in order; `NotLeader` sends the sender to look for the new
/// leader. All are queued for the appender before any answer is awaited, so that they can share
/// an entry.
pub async fn receive(context: &Context, message: RaftMessage) -> RaftAnswer {
    if message.entries.is_empty() {
        return not_delivered("a forwarded append without its command");
    }
    let leading = context.raft.metrics().borrow().current_leader == Some(context.member.id);
    let mut waiting = Vec::with_capacity(message.entries.len());
    for bytes in message.entries {
        let command =
            Command::decode(bytes).map_err(|e| AppendError::Storage(format!("undecodable forwarded append: {e}")));
        // A schedule change is an entry of its own (rare, small): proposed beside the batches.
        if let Ok(command @ (Command::Schedule(_) | Command::CancelScheduled(_))) = command {
            waiting.push(if leading {
                let (reply, answer) = tokio::sync::oneshot::channel();
                let raft = context.raft.clone();
                tokio::spawn(async move {
                    let _ = reply.send(crate::publisher::propose(&raft, command).await);
                });
                Ok(answer)
            } else {
                Err(AppendError::NotLeader)
            });
            continue;
        }
        let work = command.and_then(work_of);
        waiting.push(match work {
            Ok(work) if leading => context.appender.submit(work).await,
            Ok(_) => Err(AppendError::NotLeader),
            Err(e) => Err(e),
        });
    }
    let mut results = Vec::with_capacity(waiting.len());
    for answer in waiting {
        results.push(match answer {
            Ok(answer) => answer.await.unwrap_or(Err(AppendError::Closed)),
            Err(e) => Err(e),
        });
    }
    match crate::outbox::encode_outcomes(&results) {
        Ok(body) => RaftAnswer {
            outcome: Some(Answer::Response(body.into())),
        },
        Err(e) => myelin_raft_relay::lost(format!("cannot encode the outcomes: {e}")),
    }
}

/// What the leader makes of a forwarded `work`.
#[cfg(test)]
fn round_trip(work: Work) -> Work {
    work_of(Command::decode(encode(work)).unwrap()).unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::Transaction;

    #[test]
    fn a_forwarded_transaction_stays_one_transaction() {
        let record = |s: i64| crate::command::EventRecord {
            aggregate_id: "a".into(),
            sequence: s,
            indexed: true,
            encoded: Bytes::from(vec![s as u8; 10]),
        };
        let tx = Transaction {
            events: (0..5).map(record).collect(),
        };
        match round_trip(Work::Events(tx.clone())) {
            Work::Events(back) => assert_eq!(back, tx),
            Work::Snapshot(_) => panic!("a transaction came back as a snapshot"),
        }
        match round_trip(Work::Snapshot(record(7))) {
            Work::Snapshot(back) => assert_eq!(back, record(7)),
            Work::Events(_) => panic!("a snapshot came back as events"),
        }
        assert!(work_of(Command::AppendEvents(vec![tx.clone(), tx])).is_err());
    }
}
