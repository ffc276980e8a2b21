//! Appends a member sends to its group's leader on behalf of its clients, batched.
//!
//! Each forwarded append crosses three processes each way (this eventstore, its router, the
//! leader's router, the leader's eventstore). Sent one message per append, the hops cost more
//! than the append itself: a follower with 20 clients made 20 messages where one would do. So a
//! member keeps one outbox per context: appends that wait while earlier batches are on their way
//! leave together, as one message whose entries are the appends' commands (each still one
//! transaction, answered on its own), with at most [`MAX_IN_FLIGHT`] messages on their way. A
//! lone append leaves at once: the batch grows only with the load, as in the group commit of
//! `append`.
//!
//! The outbox decides nothing about leaders: the caller names the member it believes leads, and
//! hears back per append whether the leader answered, did not take it (definite: ask again), or
//! whether the answer was lost (the append may have been stored).

use std::sync::Arc;

use bytes::Bytes;
use myelin_proto::internal::raft_answer::Outcome as Answer;
use myelin_proto::internal::raft_relay_client::RaftRelayClient;
use myelin_proto::internal::{RaftAnswer, RaftMessage, RaftRpc};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tonic::transport::Channel;

use crate::append::AppendError;
use crate::command::Outcome;

/// Batches of one context on their way to its leader at once. Two carried as many appends per
/// second as four with 64 clients on three nodes, in 40% fewer messages (see docs/benchmarks.md).
const MAX_IN_FLIGHT: usize = 2;
/// A batch is cut at this many appends or bytes (a larger append leaves alone).
const MAX_BATCH_ITEMS: usize = 1024;
const MAX_BATCH_BYTES: usize = 4 << 20;
/// Appends waiting for a batch; a full queue makes callers wait, as the appender's does.
const QUEUE: usize = 8192;

/// What became of one forwarded append.
#[derive(Debug, Clone)]
pub enum Sent {
    /// The leader's outcome.
    Answered(Result<Outcome, AppendError>),
    /// Definite: the member asked does not lead, or the message never reached it.
    NotTaken,
    /// Indefinite: the message was sent and its answer lost.
    Lost(String),
}

/// The member believed to lead: its id and its node's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leader {
    pub member: u64,
    pub node: String,
}

struct Request {
    leader: Leader,
    command: Bytes,
    reply: oneshot::Sender<Sent>,
}

/// One context's outbox; dropping the last handle ends its task once its batches are answered.
#[derive(Clone)]
pub struct Outbox {
    queue: mpsc::Sender<Request>,
}

impl Outbox {
    pub fn start(group: &str, relay: RaftRelayClient<Channel>) -> Outbox {
        let (queue, rx) = mpsc::channel(QUEUE);
        tokio::spawn(batch_loop(group.to_owned(), relay, rx, crate::metrics::context(group)));
        Outbox { queue }
    }

    /// Sends `command` (one append in the log's binary form) to `leader` and waits for its fate.
    pub async fn send(&self, leader: Leader, command: Bytes) -> Sent {
        let (reply, answer) = oneshot::channel();
        let request = Request { leader, command, reply };
        if self.queue.send(request).await.is_err() {
            return Sent::NotTaken;
        }
        answer
            .await
            .unwrap_or_else(|_| Sent::Lost("the batch carrying the append was dropped".into()))
    }
}

async fn batch_loop(
    group: String,
    relay: RaftRelayClient<Channel>,
    mut rx: mpsc::Receiver<Request>,
    metrics: Arc<crate::metrics::ContextMetrics>,
) {
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut carry: Option<Request> = None;
    loop {
        let first = match carry.take() {
            Some(request) => request,
            None => match rx.recv().await {
                Some(request) => request,
                None => break,
            },
        };
        // While every slot is busy, more appends queue up: the next batch grows with the load.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        let leader = first.leader.clone();
        let mut bytes = first.command.len();
        let mut batch = vec![first];
        while let Ok(next) = rx.try_recv() {
            if next.leader != leader || batch.len() >= MAX_BATCH_ITEMS || bytes + next.command.len() > MAX_BATCH_BYTES {
                carry = Some(next);
                break;
            }
            bytes += next.command.len();
            batch.push(next);
        }
        metrics.forward_batches.increment(1);
        metrics.forwarded_appends.increment(batch.len() as u64);
        let relay = relay.clone();
        let group = group.clone();
        tokio::spawn(async move {
            send_batch(relay, &group, leader, batch).await;
            drop(slot);
        });
    }
}

#[tracing::instrument(level = "trace", skip_all, fields(group, node = %leader.node, appends = batch.len()))]
async fn send_batch(mut relay: RaftRelayClient<Channel>, group: &str, leader: Leader, batch: Vec<Request>) {
    let (commands, replies): (Vec<Bytes>, Vec<oneshot::Sender<Sent>>) =
        batch.into_iter().map(|r| (r.command, r.reply)).unzip();
    let message = RaftMessage {
        group: group.to_owned(),
        to_node: leader.node.clone(),
        to_member: leader.member,
        from_node: String::new(),
        rpc: RaftRpc::ForwardAppend as i32,
        header: Bytes::new(),
        entries: commands,
    };
    let answered = match relay.send(message).await {
        Ok(answer) => fates(answer.into_inner(), replies.len(), &leader.node),
        Err(status) => Fate::All(Sent::Lost(format!(
            "forwarding to the leader on {}: {}",
            leader.node,
            status.message()
        ))),
    };
    match answered {
        Fate::Each(results) => {
            for (reply, result) in replies.into_iter().zip(results) {
                let sent = match result {
                    Err(AppendError::NotLeader) => Sent::NotTaken,
                    result => Sent::Answered(result),
                };
                let _ = reply.send(sent);
            }
        }
        Fate::All(sent) => {
            if matches!(sent, Sent::NotTaken) {
                tracing::debug!(group, node = %leader.node, "appends not delivered to the leader");
            }
            for reply in replies {
                let _ = reply.send(sent.clone());
            }
        }
    }
}

/// The fate of a batch: one outcome per append, or one for all of them.
enum Fate {
    Each(Vec<Result<Outcome, AppendError>>),
    All(Sent),
}

fn fates(answer: RaftAnswer, appends: usize, node: &str) -> Fate {
    match answer.outcome {
        Some(Answer::Response(body)) => match decode_outcomes(&body) {
            Ok(results) if results.len() == appends => Fate::Each(results),
            Ok(results) => Fate::All(Sent::Lost(format!(
                "the leader on {node} answered {} of {appends} appends",
                results.len()
            ))),
            Err(e) => Fate::All(Sent::Lost(format!("undecodable answer from the leader on {node}: {e}"))),
        },
        Some(Answer::Unreachable(_)) => Fate::All(Sent::NotTaken),
        Some(Answer::Lost(why)) => Fate::All(Sent::Lost(why)),
        Some(Answer::Refused(_)) | None => Fate::All(Sent::Lost(format!("no answer from the leader on {node}"))),
    }
}

/// The leader's answer to a batch: one result per append, in the batch's order.
pub fn encode_outcomes(results: &[Result<Outcome, AppendError>]) -> Result<Vec<u8>, serde_json::Error> {
    serde_json::to_vec(results)
}

fn decode_outcomes(body: &[u8]) -> Result<Vec<Result<Outcome, AppendError>>, serde_json::Error> {
    serde_json::from_slice(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(body: Vec<u8>) -> RaftAnswer {
        RaftAnswer {
            outcome: Some(Answer::Response(body.into())),
        }
    }

    #[test]
    fn each_append_of_a_batch_gets_its_own_outcome() {
        let results = vec![
            Ok(Outcome::Stored {
                first_token: 7,
                count: 2,
            }),
            Err(AppendError::NotLeader),
            Err(AppendError::Unknown("gone".into())),
        ];
        let body = encode_outcomes(&results).unwrap();
        match fates(answer(body), 3, "n1") {
            Fate::Each(back) => {
                assert!(matches!(
                    back[0],
                    Ok(Outcome::Stored {
                        first_token: 7,
                        count: 2
                    })
                ));
                assert!(matches!(back[1], Err(AppendError::NotLeader)));
                assert!(matches!(back[2], Err(AppendError::Unknown(_))));
            }
            Fate::All(sent) => panic!("one fate for all: {sent:?}"),
        }
    }

    #[test]
    fn an_answer_of_the_wrong_length_leaves_every_append_unknown() {
        let body = encode_outcomes(&[Ok(Outcome::Stored {
            first_token: 0,
            count: 1,
        })])
        .unwrap();
        assert!(matches!(fates(answer(body), 2, "n1"), Fate::All(Sent::Lost(_))));
        assert!(matches!(
            fates(myelin_raft_relay::not_delivered("down"), 2, "n1"),
            Fate::All(Sent::NotTaken)
        ));
    }
}
