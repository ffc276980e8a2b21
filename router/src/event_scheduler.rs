//! The client-facing `EventScheduler` service (Axon's ScheduleEvent, RescheduleEvent,
//! CancelScheduledEvent): relays each call as it is to the eventstore process, naming the
//! client's context. The eventstore keeps schedules as replicated state of the context's Raft
//! group and forwards a change to the group's leader when this node does not lead it; access
//! is checked before a call gets here (scheduling needs the right to append events).

use myelin_proto::axon::InstructionAck;
use myelin_proto::axon::event::event_scheduler_server::EventScheduler;
use myelin_proto::axon::event::{
    CancelScheduledEventRequest, RescheduleEventRequest, ScheduleEventRequest, ScheduleToken,
};
use myelin_proto::internal::event_scheduling_client::EventSchedulingClient;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::context::client_context;
use crate::event_store::{internal, relayed};

#[derive(Clone)]
pub struct EventSchedulerRelay {
    pub scheduling: EventSchedulingClient<Channel>,
}

#[tonic::async_trait]
impl EventScheduler for EventSchedulerRelay {
    #[tracing::instrument(skip_all, fields(context))]
    async fn schedule_event(&self, request: Request<ScheduleEventRequest>) -> Result<Response<ScheduleToken>, Status> {
        let context = client_context(&request)?;
        tracing::Span::current().record("context", context.as_str());
        let request = internal(&context, request.into_inner())?;
        let token = self.scheduling.clone().schedule_event(request).await.map_err(relayed)?;
        Ok(Response::new(token.into_inner()))
    }

    #[tracing::instrument(skip_all, fields(context))]
    async fn reschedule_event(
        &self,
        request: Request<RescheduleEventRequest>,
    ) -> Result<Response<ScheduleToken>, Status> {
        let context = client_context(&request)?;
        tracing::Span::current().record("context", context.as_str());
        let request = internal(&context, request.into_inner())?;
        let token = self
            .scheduling
            .clone()
            .reschedule_event(request)
            .await
            .map_err(relayed)?;
        Ok(Response::new(token.into_inner()))
    }

    #[tracing::instrument(skip_all, fields(context))]
    async fn cancel_scheduled_event(
        &self,
        request: Request<CancelScheduledEventRequest>,
    ) -> Result<Response<InstructionAck>, Status> {
        let context = client_context(&request)?;
        tracing::Span::current().record("context", context.as_str());
        let request = internal(&context, request.into_inner())?;
        let ack = self
            .scheduling
            .clone()
            .cancel_scheduled_event(request)
            .await
            .map_err(relayed)?;
        Ok(Response::new(ack.into_inner()))
    }
}
