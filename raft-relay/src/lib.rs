//! Raft RPCs of any Myelin group (a context's group in the eventstore, `_admin` in admin),
//! carried through the node's router to the other nodes.
//!
//! Only routers talk to other nodes (DESIGN.md). A group member's openraft network is a
//! [`RelayNetwork`]: every RPC becomes a [`RaftMessage`] sent to the local router over its Unix
//! socket (`RaftRelay.Send`), which forwards it on its link to the target node; that node's router
//! hands it to the process hosting the group (`RaftInbox.Deliver`), which calls [`deliver`].
//!
//! What holds:
//! - A member is addressed by its id in the group and the *name* of its node, which openraft keeps
//!   in the membership (`BasicNode::addr`); the routers map names to addresses, so a node that
//!   moves keeps its membership.
//! - Log entries cross as the group's own encoding ([`EntryCodec`]): the eventstore's is its log
//!   record, so events travel as they are stored and are never re-encoded.
//! - A snapshot chunk's data crosses as raw bytes (the message's one `entries` item), its request
//!   without the data as the JSON header: a chunk of segment files costs its size on the wire.
//! - Each RPC is bounded by openraft's own deadline (`RPCOption::hard_ttl`). An answer that did not
//!   come is `Unreachable` (openraft retries with backoff); only a decoded refusal of the target is
//!   a `RemoteError`.

// openraft's network trait returns its `RPCError`, which is large; our helpers return the same.
#![allow(clippy::result_large_err)]

use std::marker::PhantomData;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use myelin_proto::internal::raft_answer::Outcome;
use myelin_proto::internal::raft_relay_client::RaftRelayClient;
use myelin_proto::internal::{RaftAnswer, RaftMessage, RaftRpc};
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Timeout, Unreachable};
use openraft::network::{RPCOption, RPCTypes, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::{BasicNode, LogId, RaftTypeConfig, Vote};
use serde::{Deserialize, Serialize};

/// Member ids in a group.
pub type MemberId = u64;

/// How a group's log entries cross the wire.
pub trait EntryCodec<C: RaftTypeConfig>: Send + Sync + 'static {
    fn encode(entry: &C::Entry) -> Result<Vec<u8>, String>;
    fn decode(bytes: Bytes) -> Result<C::Entry, String>;
}

/// Entries as JSON: for groups whose entries are small (`_admin`).
pub struct JsonEntries;

impl<C: RaftTypeConfig> EntryCodec<C> for JsonEntries
where
    C::Entry: Serialize + for<'de> Deserialize<'de>,
{
    fn encode(entry: &C::Entry) -> Result<Vec<u8>, String> {
        serde_json::to_vec(entry).map_err(|e| e.to_string())
    }

    fn decode(bytes: Bytes) -> Result<C::Entry, String> {
        serde_json::from_slice(&bytes).map_err(|e| e.to_string())
    }
}

/// An AppendEntries request without its entries.
#[derive(Serialize, Deserialize)]
#[serde(bound = "")]
struct AppendHeader<C: RaftTypeConfig> {
    vote: Vote<C::NodeId>,
    prev_log_id: Option<LogId<C::NodeId>>,
    leader_commit: Option<LogId<C::NodeId>>,
}

/// An InstallSnapshot request without its data.
#[derive(Serialize, Deserialize)]
#[serde(bound = "")]
struct SnapshotChunkHeader<C: RaftTypeConfig> {
    vote: Vote<C::NodeId>,
    meta: openraft::SnapshotMeta<C::NodeId, C::Node>,
    offset: u64,
    done: bool,
}

/// The openraft network of one group on this node.
pub struct RelayNetwork<C, K> {
    group: String,
    relay: RaftRelayClient<tonic::transport::Channel>,
    _types: PhantomData<fn() -> (C, K)>,
}

impl<C, K> Clone for RelayNetwork<C, K> {
    fn clone(&self) -> Self {
        RelayNetwork {
            group: self.group.clone(),
            relay: self.relay.clone(),
            _types: PhantomData,
        }
    }
}

impl<C, K> RelayNetwork<C, K> {
    /// A network for `group` that sends through `relay`, the router's `RaftRelay`.
    pub fn new(group: &str, relay: RaftRelayClient<tonic::transport::Channel>) -> Self {
        RelayNetwork {
            group: group.to_owned(),
            relay,
            _types: PhantomData,
        }
    }
}

/// A relay client for the router's socket, without message size limits: what a group sends is
/// bounded by openraft's batch sizes and by the router's per-peer budget.
pub fn relay_client(router_socket: &Path) -> std::io::Result<RaftRelayClient<tonic::transport::Channel>> {
    let channel = myelin_proto::local_socket::channel(router_socket)?;
    Ok(RaftRelayClient::new(channel)
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX))
}

impl<C, K> RaftNetworkFactory<C> for RelayNetwork<C, K>
where
    C: RaftTypeConfig<NodeId = MemberId, Node = BasicNode>,
    K: EntryCodec<C>,
{
    type Network = RelayTarget<C, K>;

    async fn new_client(&mut self, target: MemberId, node: &BasicNode) -> RelayTarget<C, K> {
        RelayTarget {
            network: self.clone(),
            to_node: node.addr.clone(),
            to_member: target,
        }
    }
}

/// One member of the group, as seen from this node.
pub struct RelayTarget<C, K> {
    network: RelayNetwork<C, K>,
    to_node: String,
    to_member: MemberId,
}

/// Why a message got no answer from the target's group.
#[derive(Debug)]
struct NoAnswer(String);

impl std::fmt::Display for NoAnswer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NoAnswer {}

impl<C, K> RelayTarget<C, K>
where
    C: RaftTypeConfig<NodeId = MemberId, Node = BasicNode>,
    K: EntryCodec<C>,
{
    /// Sends one message and returns the target's answer: `Ok(response JSON)` or
    /// `Err(refusal JSON)`; a message that got no answer is an `RPCError` already.
    async fn send<E: std::error::Error>(
        &mut self,
        rpc: RaftRpc,
        header: Vec<u8>,
        entries: Vec<Bytes>,
        option: &RPCOption,
    ) -> Result<Result<Bytes, Bytes>, RPCError<MemberId, BasicNode, E>> {
        let action = match rpc {
            RaftRpc::Vote => RPCTypes::Vote,
            RaftRpc::InstallSnapshot => RPCTypes::InstallSnapshot,
            _ => RPCTypes::AppendEntries,
        };
        let message = RaftMessage {
            group: self.network.group.clone(),
            to_node: self.to_node.clone(),
            to_member: self.to_member,
            from_node: String::new(),
            rpc: rpc as i32,
            header: header.into(),
            entries,
        };
        let ttl = option.hard_ttl();
        let answer = match tokio::time::timeout(ttl, self.network.relay.send(message)).await {
            Err(_) => {
                return Err(RPCError::Timeout(Timeout {
                    action,
                    id: 0,
                    target: self.to_member,
                    timeout: ttl,
                }));
            }
            Ok(Err(status)) => return Err(unreachable(format!("relay: {}", status.message()))),
            Ok(Ok(answer)) => answer.into_inner(),
        };
        match answer.outcome {
            Some(Outcome::Response(body)) => Ok(Ok(body)),
            Some(Outcome::Refused(body)) => Ok(Err(body)),
            Some(Outcome::Unreachable(why) | Outcome::Lost(why)) => Err(unreachable(why)),
            None => Err(unreachable("empty answer".to_owned())),
        }
    }

    fn decode<T: for<'de> Deserialize<'de>, E: std::error::Error>(
        body: &[u8],
    ) -> Result<T, RPCError<MemberId, BasicNode, E>> {
        serde_json::from_slice(body).map_err(|e| RPCError::Network(NetworkError::new(&e)))
    }

    fn refused<E>(&self, body: &[u8]) -> RPCError<MemberId, BasicNode, RaftError<MemberId, E>>
    where
        E: std::error::Error + for<'de> Deserialize<'de>,
        RaftError<MemberId, E>: for<'de> Deserialize<'de>,
    {
        match serde_json::from_slice::<RaftError<MemberId, E>>(body) {
            Ok(error) => RPCError::RemoteError(RemoteError::new(self.to_member, error)),
            Err(e) => RPCError::Network(NetworkError::new(&e)),
        }
    }
}

fn unreachable<E: std::error::Error>(why: String) -> RPCError<MemberId, BasicNode, E> {
    RPCError::Unreachable(Unreachable::new(&NoAnswer(why)))
}

fn json<T: Serialize, E: std::error::Error>(value: &T) -> Result<Vec<u8>, RPCError<MemberId, BasicNode, E>> {
    serde_json::to_vec(value).map_err(|e| RPCError::Network(NetworkError::new(&e)))
}

impl<C, K> RaftNetwork<C> for RelayTarget<C, K>
where
    C: RaftTypeConfig<NodeId = MemberId, Node = BasicNode>,
    K: EntryCodec<C>,
{
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<C>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<MemberId>, RPCError<MemberId, BasicNode, RaftError<MemberId>>> {
        let header = json(&AppendHeader::<C> {
            vote: rpc.vote,
            prev_log_id: rpc.prev_log_id,
            leader_commit: rpc.leader_commit,
        })?;
        let mut entries = Vec::with_capacity(rpc.entries.len());
        for entry in &rpc.entries {
            let encoded = K::encode(entry).map_err(|e| RPCError::Network(NetworkError::new(&NoAnswer(e))))?;
            entries.push(Bytes::from(encoded));
        }
        match self.send(RaftRpc::AppendEntries, header, entries, &option).await? {
            Ok(body) => Self::decode(&body),
            Err(body) => Err(self.refused(&body)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<C>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<MemberId>,
        RPCError<MemberId, BasicNode, RaftError<MemberId, InstallSnapshotError>>,
    > {
        let header = json(&SnapshotChunkHeader::<C> {
            vote: rpc.vote,
            meta: rpc.meta,
            offset: rpc.offset,
            done: rpc.done,
        })?;
        let data = vec![Bytes::from(rpc.data)];
        match self.send(RaftRpc::InstallSnapshot, header, data, &option).await? {
            Ok(body) => Self::decode(&body),
            Err(body) => Err(self.refused(&body)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<MemberId>,
        option: RPCOption,
    ) -> Result<VoteResponse<MemberId>, RPCError<MemberId, BasicNode, RaftError<MemberId>>> {
        let header = json(&rpc)?;
        match self.send(RaftRpc::Vote, header, Vec::new(), &option).await? {
            Ok(body) => Self::decode(&body),
            Err(body) => Err(self.refused(&body)),
        }
    }

    fn backoff(&self) -> openraft::network::Backoff {
        // A peer that is down is retried every 200 ms: quick enough for a restarted node to be
        // caught up at once, rare enough to cost nothing.
        openraft::network::Backoff::new(std::iter::repeat(Duration::from_millis(200)))
    }
}

/// An answer that says the message never reached a group (it was not acted on).
pub fn not_delivered(why: impl Into<String>) -> RaftAnswer {
    RaftAnswer {
        outcome: Some(Outcome::Unreachable(why.into())),
    }
}

/// An answer that says the message was sent but its answer did not come back.
pub fn lost(why: impl Into<String>) -> RaftAnswer {
    RaftAnswer {
        outcome: Some(Outcome::Lost(why.into())),
    }
}

fn answer<T: Serialize, E: Serialize>(result: Result<T, E>) -> RaftAnswer {
    let outcome = match result {
        Ok(response) => serde_json::to_vec(&response).map(|b| Outcome::Response(b.into())),
        Err(refused) => serde_json::to_vec(&refused).map(|b| Outcome::Refused(b.into())),
    };
    RaftAnswer {
        outcome: Some(outcome.unwrap_or_else(|e| Outcome::Unreachable(format!("cannot encode the answer: {e}")))),
    }
}

/// Hands a message that arrived for this node to its group's `raft`, and returns the answer.
/// A message this group cannot decode is answered as not delivered, never applied in part.
pub async fn deliver<C, K>(raft: &openraft::Raft<C>, message: RaftMessage) -> RaftAnswer
where
    C: RaftTypeConfig<NodeId = MemberId, Node = BasicNode>,
    K: EntryCodec<C>,
{
    let undecodable = |e: &dyn std::fmt::Display| not_delivered(format!("cannot decode the message: {e}"));
    match RaftRpc::try_from(message.rpc) {
        Ok(RaftRpc::AppendEntries) => {
            let header: AppendHeader<C> = match serde_json::from_slice(&message.header) {
                Ok(header) => header,
                Err(e) => return undecodable(&e),
            };
            let mut entries = Vec::with_capacity(message.entries.len());
            for bytes in message.entries {
                match K::decode(bytes) {
                    Ok(entry) => entries.push(entry),
                    Err(e) => return undecodable(&e),
                }
            }
            let request = AppendEntriesRequest {
                vote: header.vote,
                prev_log_id: header.prev_log_id,
                leader_commit: header.leader_commit,
                entries,
            };
            answer(raft.append_entries(request).await)
        }
        Ok(RaftRpc::Vote) => match serde_json::from_slice::<VoteRequest<MemberId>>(&message.header) {
            Ok(request) => answer(raft.vote(request).await),
            Err(e) => undecodable(&e),
        },
        Ok(RaftRpc::InstallSnapshot) => {
            let header: SnapshotChunkHeader<C> = match serde_json::from_slice(&message.header) {
                Ok(header) => header,
                Err(e) => return undecodable(&e),
            };
            let data = match <[Bytes; 1]>::try_from(message.entries) {
                Ok([data]) => Vec::from(data),
                Err(entries) => {
                    return not_delivered(format!("a snapshot chunk carries {} data items, not 1", entries.len()));
                }
            };
            let request = InstallSnapshotRequest {
                vote: header.vote,
                meta: header.meta,
                offset: header.offset,
                data,
                done: header.done,
            };
            answer(raft.install_snapshot(request).await)
        }
        _ => not_delivered(format!("unknown Raft RPC {}", message.rpc)),
    }
}
