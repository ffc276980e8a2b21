//! The internal `myelin.internal.EventScheduling` service: Axon's EventScheduler as the router
//! relays it. Handlers check the request, build the schedule change, have the context's leader
//! commit it (`forward::schedule`) and answer; the book and its rules are in
//! `crate::scheduled`, the timer that publishes due events in `crate::publisher`.
//!
//! What Axon Server does, and so do we: ScheduleEvent answers an opaque token; RescheduleEvent
//! cancels the token it names (when not empty, and if still pending) and schedules the new
//! event, one step here (one entry); CancelScheduledEvent answers success also for a token
//! already published, cancelled or never known. A scheduled event is appended once, at its
//! instant or just after, as an ordinary event of the context.

use std::sync::Arc;

use myelin_proto::axon::InstructionAck;
use myelin_proto::axon::event::{
    CancelScheduledEventRequest, Event, RescheduleEventRequest, ScheduleEventRequest, ScheduleToken,
};
use myelin_proto::errors::ErrorCode;
use myelin_proto::internal::event_scheduling_server::EventScheduling;
use prost::Message;
use tonic::{Request, Response, Status};

use crate::command::{Command, EventRecord, Outcome, Scheduling};
use crate::context::Contexts;
use crate::segment::Kind;

pub struct Service {
    pub contexts: Arc<Contexts>,
    /// The largest event a schedule may carry: the bound on one appended transaction.
    pub max_event_bytes: usize,
}

impl Service {
    /// Checks `event` as an append would, and makes it the record it will be stored as.
    fn record(&self, event: Option<Event>) -> Result<EventRecord, Status> {
        let event = event.ok_or_else(|| Status::invalid_argument("a scheduled event is missing its event"))?;
        crate::service::check_event(&event)?;
        // Axon schedules events of no aggregate; one that named an aggregate type would take
        // part in sequence checks at a time nobody waits for its outcome.
        if !event.aggregate_type.is_empty() {
            return Err(Status::invalid_argument(format!(
                "scheduled event {} names aggregate type {:?}: a scheduled event is published as an event of no aggregate",
                event.message_identifier, event.aggregate_type
            )));
        }
        let size = event.encoded_len();
        if size > self.max_event_bytes {
            return Err(ErrorCode::PayloadTooLarge.status(format!(
                "scheduled event of {size} bytes exceeds the maximum size of {} bytes",
                self.max_event_bytes
            )));
        }
        let record = crate::stored::record_of(&event, Kind::Events);
        debug_assert!(!record.indexed);
        Ok(record)
    }

    async fn schedule<T>(
        &self,
        request: &Request<T>,
        instant: i64,
        replaces: String,
        event: Option<Event>,
    ) -> Result<Response<ScheduleToken>, Status> {
        let context = crate::service::context_of(&self.contexts, request)?;
        tracing::Span::current().record("context", context.name.as_str());
        let record = self.record(event)?;
        let token = uuid::Uuid::new_v4().to_string();
        let command = Command::Schedule(Scheduling {
            token: token.clone(),
            instant,
            replaces,
            record,
        });
        let outcome = crate::forward::schedule(&context, command)
            .await
            .map_err(|e| crate::service::append_status(&context.name, e))?;
        match outcome {
            Outcome::Scheduled => {
                tracing::debug!(%token, instant, "event scheduled");
                Ok(Response::new(ScheduleToken { token }))
            }
            Outcome::TooManyScheduled { pending, pending_bytes } => Err(ErrorCode::TooManyRequests.status(format!(
                "context {} holds {pending} scheduled events ({pending_bytes} bytes); at most {} ({} bytes) may wait",
                context.name,
                crate::scheduled::MAX_PENDING,
                crate::scheduled::MAX_PENDING_BYTES
            ))),
            other => Err(Status::internal(format!("unexpected outcome of a schedule: {other:?}"))),
        }
    }
}

#[tonic::async_trait]
impl EventScheduling for Service {
    #[tracing::instrument(skip_all, fields(context))]
    async fn schedule_event(&self, request: Request<ScheduleEventRequest>) -> Result<Response<ScheduleToken>, Status> {
        let ScheduleEventRequest { instant, event } = request.get_ref().clone();
        self.schedule(&request, instant, String::new(), event).await
    }

    #[tracing::instrument(skip_all, fields(context))]
    async fn reschedule_event(
        &self,
        request: Request<RescheduleEventRequest>,
    ) -> Result<Response<ScheduleToken>, Status> {
        let RescheduleEventRequest { token, instant, event } = request.get_ref().clone();
        self.schedule(&request, instant, token, event).await
    }

    #[tracing::instrument(skip_all, fields(context))]
    async fn cancel_scheduled_event(
        &self,
        request: Request<CancelScheduledEventRequest>,
    ) -> Result<Response<InstructionAck>, Status> {
        let context = crate::service::context_of(&self.contexts, &request)?;
        tracing::Span::current().record("context", context.name.as_str());
        let token = request.into_inner().token;
        // An empty token names nothing: nothing to propose, and Axon answers success.
        if !token.is_empty() {
            crate::forward::schedule(&context, Command::CancelScheduled(token))
                .await
                .map_err(|e| crate::service::append_status(&context.name, e))?;
        }
        Ok(Response::new(InstructionAck {
            instruction_id: String::new(),
            success: true,
            error: None,
        }))
    }
}
