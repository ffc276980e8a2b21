//! Admin's side of the links between nodes: where the other nodes are (told to the router), and
//! the `_admin` group's messages from them (`RaftInbox`, on admin's socket).
//!
//! The directory of peers is data: the `nodes` table of the replicated configuration. Admin gives
//! it to the router at start, after every applied `_admin` change, and every few seconds (a
//! router that restarted has lost it), so the router never decides membership itself.

use std::time::Duration;

use myelin_proto::internal::peer_directory_client::PeerDirectoryClient;
use myelin_proto::internal::raft_inbox_server::RaftInbox;
use myelin_proto::internal::{PeerAddress, RaftAnswer, RaftMessage, SetPeersRequest};
use myelin_raft_relay::{JsonEntries, deliver, not_delivered};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::api::AppState;
use crate::raft::{AdminGroup, AdminTypes};

/// The `_admin` group's network: through this node's router.
pub type AdminNetwork = myelin_raft_relay::RelayNetwork<AdminTypes, JsonEntries>;

/// How often the directory is given again even when nothing changed.
const REFRESH: Duration = Duration::from_secs(5);

/// Keeps the router's directory of peers equal to the `nodes` table, until the process ends.
pub fn follow_peers(state: AppState, router: Channel) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut directory = PeerDirectoryClient::new(router);
        let mut changes = state.admin.changes();
        let mut last_error = String::new();
        loop {
            match push(&state, &mut directory).await {
                Ok(()) => last_error.clear(),
                Err(e) if e != last_error => {
                    tracing::warn!(error = %e, "telling the router where the other nodes are");
                    last_error = e;
                }
                Err(_) => {}
            }
            crate::raft::next_change(&mut changes, REFRESH).await;
        }
    })
}

async fn push(state: &AppState, directory: &mut PeerDirectoryClient<Channel>) -> Result<(), String> {
    let (nodes, contexts) = state
        .db
        .call(|conn| crate::control_db::contexts::layout(conn))
        .await
        .map_err(|e| e.to_string())?;
    // The contexts whose events a node stores (not `_admin`, not a messaging-only role).
    let stored_on = |node: &str| -> Vec<String> {
        contexts
            .iter()
            .filter(|c| !c.name.starts_with('_'))
            .filter(|c| c.members.iter().any(|m| m.node == node && m.role.stores()))
            .map(|c| c.name.clone())
            .collect()
    };
    let local_contexts = stored_on(&state.node.name);
    let peers = nodes
        .into_iter()
        .filter(|n| n.name != state.node.name)
        .map(|n| PeerAddress {
            internal_address: format!("{}:{}", n.internal_host_name, n.grpc_internal_port),
            host_name: n.host_name.clone(),
            grpc_port: u32::from(n.grpc_port),
            http_port: u32::from(n.http_port),
            contexts: stored_on(&n.name),
            node: n.name,
        })
        .collect();
    directory
        .set_peers(SetPeersRequest { peers, local_contexts })
        .await
        .map(|_| ())
        .map_err(|e| e.message().to_owned())
}

/// `RaftInbox` on admin's socket: `_admin` messages from other nodes, handed over by the router.
pub struct Inbox {
    pub admin: AdminGroup,
}

#[tonic::async_trait]
impl RaftInbox for Inbox {
    #[tracing::instrument(level = "trace", skip_all, fields(from = %request.get_ref().from_node))]
    async fn deliver(&self, request: Request<RaftMessage>) -> Result<Response<RaftAnswer>, Status> {
        let message = request.into_inner();
        if message.group != crate::raft::ADMIN_GROUP || message.to_member != self.admin.id() {
            return Ok(Response::new(not_delivered(format!(
                "this admin is member {} of {}, not member {} of {}",
                self.admin.id(),
                crate::raft::ADMIN_GROUP,
                message.to_member,
                message.group
            ))));
        }
        Ok(Response::new(
            deliver::<AdminTypes, JsonEntries>(self.admin.raft(), message).await,
        ))
    }
}
