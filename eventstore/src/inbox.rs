//! `RaftInbox`: Raft messages from other nodes, handed over by the router, for the groups of the
//! contexts stored here. A message for a context or member this node does not have is answered as
//! not delivered (the sender retries after its backoff); it never reaches another group.

use std::sync::Arc;

use myelin_proto::internal::raft_inbox_server::RaftInbox;
use myelin_proto::internal::{RaftAnswer, RaftMessage, RaftRpc};
use myelin_raft_relay::{deliver, not_delivered};
use tonic::{Request, Response, Status};

use crate::consensus::TypeConfig;
use crate::consensus::network::LogRecords;
use crate::context::Contexts;

pub struct Inbox {
    pub contexts: Arc<Contexts>,
}

#[tonic::async_trait]
impl RaftInbox for Inbox {
    #[tracing::instrument(level = "trace", skip_all, fields(group = %request.get_ref().group))]
    async fn deliver(&self, request: Request<RaftMessage>) -> Result<Response<RaftAnswer>, Status> {
        let message = request.into_inner();
        let Some(context) = self.contexts.get(&message.group) else {
            return Ok(Response::new(not_delivered(format!(
                "context {} is not stored on node {}",
                message.group, message.to_node
            ))));
        };
        if context.member.id != message.to_member {
            return Ok(Response::new(not_delivered(format!(
                "node {} is member {} of context {}, not {}",
                message.to_node, context.member.id, message.group, message.to_member
            ))));
        }
        if message.rpc == RaftRpc::ForwardAppend as i32 {
            return Ok(Response::new(crate::forward::receive(&context, message).await));
        }
        if message.rpc == RaftRpc::ReadIndex as i32 {
            return Ok(Response::new(crate::forward::answer_read_index(&context).await));
        }
        Ok(Response::new(
            deliver::<TypeConfig, LogRecords>(&context.raft, message).await,
        ))
    }
}
