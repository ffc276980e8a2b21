//! `StorageControl`: node-level operations on the stored contexts, asked by admin over the
//! Unix socket. Each RPC decodes its request and calls the module that owns the work.

use std::sync::Arc;

use myelin_proto::internal::storage_control_server::StorageControl;
use myelin_proto::internal::{
    ContextStatus, CreateContextRequest, DeleteContextRequest, DeleteContextResponse, HoldLogCompactionRequest,
    HoldLogCompactionResponse, ListContextsRequest, ListContextsResponse, ListLogSegmentsRequest,
    ListLogSegmentsResponse, ListSegmentsRequest, ListSegmentsResponse, MetricsRequest, MetricsText,
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

    async fn create_context(&self, _: Request<CreateContextRequest>) -> Result<Response<ContextStatus>, Status> {
        Err(Status::unimplemented("CreateContext arrives with the control DB"))
    }

    async fn delete_context(
        &self,
        _: Request<DeleteContextRequest>,
    ) -> Result<Response<DeleteContextResponse>, Status> {
        Err(Status::unimplemented("DeleteContext arrives with the control DB"))
    }

    async fn list_segments(&self, _: Request<ListSegmentsRequest>) -> Result<Response<ListSegmentsResponse>, Status> {
        Err(Status::unimplemented("ListSegments arrives with backups"))
    }

    async fn list_log_segments(
        &self,
        _: Request<ListLogSegmentsRequest>,
    ) -> Result<Response<ListLogSegmentsResponse>, Status> {
        Err(Status::unimplemented("ListLogSegments arrives with backups"))
    }

    async fn hold_log_compaction(
        &self,
        _: Request<HoldLogCompactionRequest>,
    ) -> Result<Response<HoldLogCompactionResponse>, Status> {
        Err(Status::unimplemented("HoldLogCompaction arrives with backups"))
    }

    async fn metrics(&self, _: Request<MetricsRequest>) -> Result<Response<MetricsText>, Status> {
        Err(Status::unimplemented("Metrics arrives with the Prometheus endpoint"))
    }
}
