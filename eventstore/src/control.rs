//! `StorageControl`: node-level operations on the stored contexts, asked by admin over the
//! Unix socket. Each RPC decodes its request and calls the module that owns the work.

use std::sync::Arc;

use myelin_proto::internal::storage_control_server::StorageControl;
use myelin_proto::internal::{
    AddMemberRequest, ContextStatus, CreateContextRequest, DeleteContextRequest, DeleteContextResponse, GroupStatus,
    GroupStatusRequest, HoldLogCompactionRequest, HoldLogCompactionResponse, JoinContextRequest, ListContextsRequest,
    ListContextsResponse, ListLogSegmentsRequest, ListLogSegmentsResponse, ListSegmentsRequest, ListSegmentsResponse,
    MetricsRequest, MetricsText, RemoveMemberRequest,
};
use tonic::{Request, Response, Status};

use crate::context::{Context, Contexts};

pub struct Control {
    pub contexts: Arc<Contexts>,
}

/// Positions of one open context.
pub fn context_status(c: &Context) -> ContextStatus {
    ContextStatus {
        name: c.name.clone(),
        first_token: c.stored.events.first_token(),
        last_token: c.stored.events.next_token() - 1,
        last_snapshot_token: c.stored.snapshots.next_token() - 1,
        applied_index: c.raft.metrics().borrow().last_applied.map_or(0, |l| l.index),
    }
}

#[tonic::async_trait]
impl StorageControl for Control {
    async fn list_contexts(&self, _: Request<ListContextsRequest>) -> Result<Response<ListContextsResponse>, Status> {
        let contexts = self.contexts.all().iter().map(|c| context_status(c)).collect();
        Ok(Response::new(ListContextsResponse { contexts }))
    }

    #[tracing::instrument(skip_all, fields(context))]
    async fn create_context(&self, request: Request<CreateContextRequest>) -> Result<Response<ContextStatus>, Status> {
        let name = request.into_inner().name;
        tracing::Span::current().record("context", name.as_str());
        let context = self.contexts.create(&name).await.map_err(|e| e.status())?;
        Ok(Response::new(context_status(&context)))
    }

    #[tracing::instrument(skip_all, fields(context))]
    async fn delete_context(
        &self,
        request: Request<DeleteContextRequest>,
    ) -> Result<Response<DeleteContextResponse>, Status> {
        let request = request.into_inner();
        tracing::Span::current().record("context", request.name.as_str());
        self.contexts
            .delete(&request.name, request.preserve_files)
            .await
            .map_err(|e| e.status())?;
        Ok(Response::new(DeleteContextResponse {}))
    }

    #[tracing::instrument(skip_all, fields(context))]
    async fn list_segments(
        &self,
        request: Request<ListSegmentsRequest>,
    ) -> Result<Response<ListSegmentsResponse>, Status> {
        let request = request.into_inner();
        tracing::Span::current().record("context", request.context.as_str());
        let context = crate::backup::find_context(&self.contexts, &request.context)?;
        use myelin_proto::internal::SegmentKind;
        let store = match SegmentKind::try_from(request.kind) {
            Ok(SegmentKind::Event) => &context.stored.events,
            Ok(SegmentKind::Snapshot) => &context.stored.snapshots,
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "unknown segment kind {}",
                    request.kind
                )));
            }
        };
        Ok(Response::new(crate::backup::list_segments(
            store.segment_files(),
            request.last_segment_backed_up,
        )))
    }

    #[tracing::instrument(skip_all, fields(context))]
    async fn list_log_segments(
        &self,
        request: Request<ListLogSegmentsRequest>,
    ) -> Result<Response<ListLogSegmentsResponse>, Status> {
        let request = request.into_inner();
        tracing::Span::current().record("context", request.context.as_str());
        let context = crate::backup::find_context(&self.contexts, &request.context)?;
        let dir = context.stored.dir.clone();
        let listed = tokio::task::spawn_blocking(move || crate::backup::list_log_segments(&dir))
            .await
            .map_err(|e| Status::internal(format!("listing log segments: {e}")))?;
        listed.map(Response::new).map_err(|e| {
            myelin_proto::errors::ErrorCode::DatafileReadError.status(format!("listing the log segments: {e}"))
        })
    }

    async fn hold_log_compaction(
        &self,
        request: Request<HoldLogCompactionRequest>,
    ) -> Result<Response<HoldLogCompactionResponse>, Status> {
        let until = request.into_inner().until_unix_millis;
        let held = crate::backup::hold_log_compaction(crate::backup::node_hold(), until)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        // Durable before admin hears the hold is on: a restart must not lift it.
        if let Some(end) = held {
            let dir = self.contexts.data_dir().to_owned();
            tokio::task::spawn_blocking(move || crate::backup::persist_hold(&dir, end))
                .await
                .map_err(|e| Status::internal(format!("storing the hold: {e}")))?
                .map_err(|e| {
                    myelin_proto::errors::ErrorCode::DatafileWriteError.status(format!("storing the hold: {e}"))
                })?;
        }
        tracing::info!(until_unix_millis = until, on = held.is_some(), "log compaction hold");
        Ok(Response::new(HoldLogCompactionResponse {}))
    }

    async fn metrics(&self, _: Request<MetricsRequest>) -> Result<Response<MetricsText>, Status> {
        Ok(Response::new(MetricsText {
            text: crate::metrics::render(&self.contexts),
        }))
    }

    #[tracing::instrument(skip_all, fields(context, member))]
    async fn join_context(&self, request: Request<JoinContextRequest>) -> Result<Response<ContextStatus>, Status> {
        let request = request.into_inner();
        tracing::Span::current().record("context", request.name.as_str());
        tracing::Span::current().record("member", request.member_id);
        let me = crate::consensus::Member {
            id: request.member_id,
            node: self.contexts.node_name().to_owned(),
        };
        let bootstrap = if request.initial_members.is_empty() {
            crate::consensus::Bootstrap::Wait
        } else {
            if !request
                .initial_members
                .iter()
                .any(|m| m.id == me.id && m.node == me.node)
            {
                return Err(Status::invalid_argument(format!(
                    "the first members of {} do not include this node as member {}",
                    request.name, me.id
                )));
            }
            crate::consensus::Bootstrap::Voters(request.initial_members.into_iter().map(|m| (m.id, m.node)).collect())
        };
        let context = self
            .contexts
            .join(&request.name, me, bootstrap)
            .await
            .map_err(|e| e.status())?;
        Ok(Response::new(context_status(&context)))
    }

    #[tracing::instrument(skip_all, fields(context))]
    async fn add_member(&self, request: Request<AddMemberRequest>) -> Result<Response<GroupStatus>, Status> {
        let request = request.into_inner();
        tracing::Span::current().record("context", request.context.as_str());
        let context = crate::backup::find_context(&self.contexts, &request.context)?;
        let member = request
            .member
            .ok_or_else(|| Status::invalid_argument("no member to add"))?;
        Ok(Response::new(crate::membership::add(&context, member).await?))
    }

    #[tracing::instrument(skip_all, fields(context, member))]
    async fn remove_member(&self, request: Request<RemoveMemberRequest>) -> Result<Response<GroupStatus>, Status> {
        let request = request.into_inner();
        tracing::Span::current().record("context", request.context.as_str());
        tracing::Span::current().record("member", request.member_id);
        let context = crate::backup::find_context(&self.contexts, &request.context)?;
        Ok(Response::new(
            crate::membership::remove(&context, request.member_id).await?,
        ))
    }

    async fn get_group_status(&self, request: Request<GroupStatusRequest>) -> Result<Response<GroupStatus>, Status> {
        let request = request.into_inner();
        let context = crate::backup::find_context(&self.contexts, &request.context)?;
        Ok(Response::new(crate::membership::status(&context)))
    }
}
