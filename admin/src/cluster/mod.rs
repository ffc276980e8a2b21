//! Admin's part of the cluster: how this node's admin works with the other nodes' admins.
//!
//! - `links`: the transport. The router's directory of peers is kept equal to the `nodes` table;
//!   `_admin` Raft messages from other nodes arrive on admin's socket (`RaftInbox`).
//! - `calls`: admin-to-admin calls (`AdminCall`) through the routers: a change proposed on a node
//!   that does not lead `_admin` is forwarded to the leader; the handlers for calls from others.
//! - `join`: `register-node`, both sides: the new node asks, the `_admin` leader checks and
//!   records it; the new node then gives up its own `_admin` and follows the cluster's.
//! - `members`: on the `_admin` leader, the group's members follow the `nodes` table (a
//!   registered node becomes a learner, then a voter; an unregistered one leaves); on every
//!   node, noticing that this node was removed.
//! - `placement`: on every node, the event store's contexts follow the configuration: a context
//!   this node is a member of is joined, one it left is removed (or set aside), and where this
//!   node's event store leads a context, its group's members follow the configured members.
//!
//! Configuration is data in `_admin`; everything here converges the world to it, retrying until
//! it holds, so a crash or a lost call at any step heals by itself.

pub mod calls;
pub mod join;
pub mod links;
pub mod members;
pub mod placement;

/// Runs `round` after every applied `_admin` change and every `period`, until the process ends
/// or this node is restarting to join a cluster; a failure is logged when it differs from the
/// last one (a failing round is retried, not repeated in the log).
pub(crate) async fn each_change<F, Fut>(
    state: &crate::api::AppState,
    period: std::time::Duration,
    what: &str,
    mut round: F,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool, String>>,
{
    let mut changes = state.admin.changes();
    let mut last_error = String::new();
    loop {
        if state.restarting.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        match round().await {
            Ok(true) => last_error.clear(),
            Ok(false) => return,
            Err(e) if e != last_error => {
                tracing::warn!(error = %e, "{what}");
                last_error = e;
            }
            Err(_) => {}
        }
        crate::raft::next_change(&mut changes, period).await;
    }
}
