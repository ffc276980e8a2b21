//! Metrics of the event store calls clients make (appends and reads the router relays to the
//! eventstore), taken where every call passes: a tower layer in front of the client gRPC server.
//!
//! Per context the layer counts each call by kind and outcome (`ok`, `error`, `cancelled`: the
//! client went away first), the events of successful appends, the events streamed out by reads,
//! and the duration of appends and of finite reads (tracking streams last as long as the client
//! wants, so they get no duration). It learns all of it from the HTTP/2 exchange: the path names
//! the call, the `AxonIQ-Context` header the context, the `grpc-status` of the trailers (or of a
//! trailers-only answer) the outcome, and messages are counted from the 5-byte gRPC frame
//! headers of the bodies, without decoding a message. The cost per call is one map lookup; per
//! body chunk, a few arithmetic steps and one atomic add.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context as TaskContext, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use metrics::{Counter, Histogram};
use tonic::Status;
use tonic::body::Body;

use crate::metrics::PerContext;

const EVENT_STORE_PATH: &str = "/io.axoniq.axonserver.grpc.event.EventStore/";

/// The kinds of event store calls, as the `call` label names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    AppendEvents,
    AppendSnapshot,
    ReadAggregate,
    ReadSnapshots,
    Track,
    /// Token and sequence look-ups.
    Other,
}

const CALLS: [Call; 6] = [
    Call::AppendEvents,
    Call::AppendSnapshot,
    Call::ReadAggregate,
    Call::ReadSnapshots,
    Call::Track,
    Call::Other,
];

impl Call {
    fn of_path(path: &str) -> Option<Call> {
        let method = path.strip_prefix(EVENT_STORE_PATH)?;
        Some(match method {
            "AppendEvent" => Call::AppendEvents,
            "AppendSnapshot" => Call::AppendSnapshot,
            "ListAggregateEvents" => Call::ReadAggregate,
            "ListAggregateSnapshots" => Call::ReadSnapshots,
            "ListEvents" => Call::Track,
            _ => Call::Other,
        })
    }

    fn label(self) -> &'static str {
        match self {
            Call::AppendEvents => "append_events",
            Call::AppendSnapshot => "append_snapshot",
            Call::ReadAggregate => "read_aggregate",
            Call::ReadSnapshots => "read_snapshots",
            Call::Track => "track",
            Call::Other => "other",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Ok,
    Error,
    Cancelled,
}

const OUTCOMES: [Outcome; 3] = [Outcome::Ok, Outcome::Error, Outcome::Cancelled];

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Error => "error",
            Outcome::Cancelled => "cancelled",
        }
    }
}

pub(crate) fn describe() {
    use metrics::{Unit, describe_counter, describe_histogram};
    describe_counter!(
        "myelin_event_calls_total",
        "Event store calls of clients, by call and outcome"
    );
    describe_counter!(
        "myelin_events_appended_total",
        "Events in successful append transactions"
    );
    describe_counter!("myelin_snapshots_appended_total", "Snapshots stored");
    describe_histogram!(
        "myelin_append_duration_seconds",
        Unit::Seconds,
        "Append calls from their start to the confirmation, by kind (events, snapshot)"
    );
    describe_counter!(
        "myelin_events_read_total",
        "Events and snapshots streamed to clients, by call"
    );
    describe_histogram!(
        "myelin_event_read_duration_seconds",
        Unit::Seconds,
        "Aggregate reads from their start to the last event"
    );
}

/// The handles of one context.
pub struct EventMetrics {
    calls: [[Counter; OUTCOMES.len()]; CALLS.len()],
    events_appended: Counter,
    snapshots_appended: Counter,
    append_events_duration: Histogram,
    append_snapshot_duration: Histogram,
    /// Per call; only the reads have one.
    events_read: [Option<Counter>; CALLS.len()],
    read_aggregate_duration: Histogram,
    read_snapshots_duration: Histogram,
}

impl EventMetrics {
    fn new(context: &str) -> EventMetrics {
        let ctx = context.to_owned();
        EventMetrics {
            calls: CALLS.map(|call| {
                OUTCOMES.map(|outcome| {
                    metrics::counter!("myelin_event_calls_total", "context" => ctx.clone(), "call" => call.label(), "outcome" => outcome.label())
                })
            }),
            events_appended: metrics::counter!("myelin_events_appended_total", "context" => ctx.clone()),
            snapshots_appended: metrics::counter!("myelin_snapshots_appended_total", "context" => ctx.clone()),
            append_events_duration: metrics::histogram!("myelin_append_duration_seconds", "context" => ctx.clone(), "kind" => "events"),
            append_snapshot_duration: metrics::histogram!("myelin_append_duration_seconds", "context" => ctx.clone(), "kind" => "snapshot"),
            events_read: CALLS.map(|call| {
                matches!(call, Call::ReadAggregate | Call::ReadSnapshots | Call::Track).then(|| {
                    metrics::counter!("myelin_events_read_total", "context" => ctx.clone(), "call" => call.label())
                })
            }),
            read_aggregate_duration: metrics::histogram!("myelin_event_read_duration_seconds", "context" => ctx.clone(), "call" => Call::ReadAggregate.label()),
            read_snapshots_duration: metrics::histogram!("myelin_event_read_duration_seconds", "context" => ctx, "call" => Call::ReadSnapshots.label()),
        }
    }
}

/// The context label of a call: its `AxonIQ-Context` (or legacy `Context`) header, `default`
/// without one, `_invalid` for a name the router would refuse.
fn context_label(headers: &http::HeaderMap) -> &str {
    let value = headers
        .get(myelin_proto::AXON_CONTEXT_KEY)
        .or_else(|| headers.get("context"));
    match value.map(|v| v.to_str()) {
        None | Some(Ok("")) => myelin_proto::DEFAULT_CONTEXT,
        Some(Ok(name)) if name.len() <= 64 && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) => {
            name
        }
        Some(_) => "_invalid",
    }
}

/// Counts gRPC messages in a body from their 5-byte headers (flag, big-endian length).
#[derive(Debug, Default)]
struct Frames {
    header: [u8; 5],
    header_len: usize,
    /// Payload bytes of the current message still to skip.
    remaining: u64,
}

impl Frames {
    /// Feeds one chunk; returns how many messages started in it.
    fn feed(&mut self, mut data: &[u8]) -> u64 {
        let mut started = 0;
        while !data.is_empty() {
            if self.remaining > 0 {
                let skip = usize::try_from(self.remaining).unwrap_or(usize::MAX).min(data.len());
                self.remaining -= skip as u64;
                data = &data[skip..];
                continue;
            }
            let take = (5 - self.header_len).min(data.len());
            self.header[self.header_len..self.header_len + take].copy_from_slice(&data[..take]);
            self.header_len += take;
            data = &data[take..];
            if self.header_len == 5 {
                let length = u32::from_be_bytes([self.header[1], self.header[2], self.header[3], self.header[4]]);
                self.remaining = u64::from(length);
                self.header_len = 0;
                started += 1;
            }
        }
        started
    }
}

/// One call being measured; recorded exactly once, when it ends in any way.
struct Record {
    call: Call,
    handles: Arc<EventMetrics>,
    started: Instant,
    /// Messages the client sent (counted for appends only).
    sent: Arc<AtomicU64>,
    done: bool,
}

impl Record {
    fn finish(&mut self, outcome: Outcome) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let m = &self.handles;
        m.calls[self.call as usize][outcome as usize].increment(1);
        let elapsed = self.started.elapsed();
        match self.call {
            Call::AppendEvents => {
                if outcome == Outcome::Ok {
                    m.events_appended.increment(self.sent.load(Ordering::Relaxed));
                }
                if outcome != Outcome::Cancelled {
                    m.append_events_duration.record(elapsed);
                }
            }
            Call::AppendSnapshot => {
                if outcome == Outcome::Ok {
                    m.snapshots_appended.increment(1);
                }
                if outcome != Outcome::Cancelled {
                    m.append_snapshot_duration.record(elapsed);
                }
            }
            Call::ReadAggregate if outcome == Outcome::Ok => m.read_aggregate_duration.record(elapsed),
            Call::ReadSnapshots if outcome == Outcome::Ok => m.read_snapshots_duration.record(elapsed),
            _ => {}
        }
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        self.finish(Outcome::Cancelled);
    }
}

/// The client's request body of an append: counts its messages.
struct RequestBody {
    inner: Body,
    frames: Frames,
    sent: Arc<AtomicU64>,
}

impl HttpBody for RequestBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            let started = this.frames.feed(data);
            this.sent.fetch_add(started, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The response body: counts streamed messages and takes the outcome from the trailers.
struct ResponseBody {
    inner: Body,
    frames: Frames,
    record: Record,
}

impl HttpBody for ResponseBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    if let Some(events_read) = &this.record.handles.events_read[this.record.call as usize] {
                        events_read.increment(this.frames.feed(data));
                    }
                } else if let Some(trailers) = frame.trailers_ref() {
                    let ok = trailers.get("grpc-status").is_some_and(|s| s == "0");
                    this.record.finish(if ok { Outcome::Ok } else { Outcome::Error });
                }
            }
            Poll::Ready(Some(Err(_))) | Poll::Ready(None) => this.record.finish(Outcome::Error),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The layer; clones share the per-context handles.
#[derive(Clone)]
pub struct EventMetricsLayer {
    contexts: Arc<PerContext<EventMetrics>>,
}

impl Default for EventMetricsLayer {
    fn default() -> Self {
        EventMetricsLayer {
            contexts: Arc::new(PerContext::new(EventMetrics::new)),
        }
    }
}

impl<S> tower::Layer<S> for EventMetricsLayer {
    type Service = EventMetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        EventMetricsService {
            inner,
            contexts: self.contexts.clone(),
        }
    }
}

#[derive(Clone)]
pub struct EventMetricsService<S> {
    inner: S,
    contexts: Arc<PerContext<EventMetrics>>,
}

type BoxFuture<T, E> = Pin<Box<dyn std::future::Future<Output = Result<T, E>> + Send>>;

impl<S, B> tower::Service<http::Request<Body>> for EventMetricsService<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<B>>,
    S::Future: Send + 'static,
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<tonic::codegen::StdError>,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let Some(call) = Call::of_path(request.uri().path()) else {
            let response = self.inner.call(request);
            return Box::pin(async move { Ok(response.await?.map(Body::new)) });
        };
        let mut record = Record {
            call,
            handles: self.contexts.get(context_label(request.headers())),
            started: Instant::now(),
            sent: Arc::new(AtomicU64::new(0)),
            done: false,
        };
        let request = if call == Call::AppendEvents {
            let sent = record.sent.clone();
            request.map(|inner| {
                Body::new(RequestBody {
                    inner,
                    frames: Frames::default(),
                    sent,
                })
            })
        } else {
            request
        };
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            // A trailers-only answer (an error before any message) carries its status here.
            if let Some(status) = response.headers().get("grpc-status") {
                record.finish(if status == "0" { Outcome::Ok } else { Outcome::Error });
                return Ok(response.map(Body::new));
            }
            Ok(response.map(|inner| {
                Body::new(ResponseBody {
                    inner: Body::new(inner),
                    frames: Frames::default(),
                    record,
                })
            }))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(len: u32) -> Vec<u8> {
        let mut bytes = vec![0];
        bytes.extend_from_slice(&len.to_be_bytes());
        bytes.extend(std::iter::repeat_n(7u8, len as usize));
        bytes
    }

    #[test]
    fn frames_are_counted_across_any_chunking() {
        let mut stream = Vec::new();
        for len in [0, 3, 300, 1, 70_000] {
            stream.extend(message(len));
        }
        for chunk in [1, 2, 4, 5, 6, 7, 64, 1000, stream.len()] {
            let mut frames = Frames::default();
            let counted: u64 = stream.chunks(chunk).map(|c| frames.feed(c)).sum();
            assert_eq!(counted, 5, "chunks of {chunk}");
            assert_eq!((frames.header_len, frames.remaining), (0, 0));
        }
    }

    #[test]
    fn calls_and_contexts_are_recognised() {
        assert_eq!(
            Call::of_path("/io.axoniq.axonserver.grpc.event.EventStore/AppendEvent"),
            Some(Call::AppendEvents)
        );
        assert_eq!(
            Call::of_path("/io.axoniq.axonserver.grpc.event.EventStore/GetLastToken"),
            Some(Call::Other)
        );
        assert_eq!(
            Call::of_path("/io.axoniq.axonserver.grpc.command.CommandService/Dispatch"),
            None
        );
        let mut headers = http::HeaderMap::new();
        assert_eq!(context_label(&headers), "default");
        headers.insert("axoniq-context", "orders".parse().unwrap());
        assert_eq!(context_label(&headers), "orders");
        headers.insert("axoniq-context", "no/slashes".parse().unwrap());
        assert_eq!(context_label(&headers), "_invalid");
    }

    #[test]
    fn a_call_is_recorded_once() {
        let recorder = crate::metrics::builder().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            let handles = Arc::new(EventMetrics::new("ctx"));
            let sent = Arc::new(AtomicU64::new(3));
            let mut record = Record {
                call: Call::AppendEvents,
                handles: handles.clone(),
                started: Instant::now(),
                sent,
                done: false,
            };
            record.finish(Outcome::Ok);
            drop(record); // no second outcome
            drop(Record {
                call: Call::Track,
                handles,
                started: Instant::now(),
                sent: Arc::default(),
                done: false,
            });
        });
        let text = handle.render();
        let calls = |call, outcome| {
            crate::metrics::sample(
                &text,
                "myelin_event_calls_total",
                &[("context", "ctx"), ("call", call), ("outcome", outcome)],
            )
        };
        assert_eq!(calls("append_events", "ok"), Some(1.0));
        assert_eq!(calls("append_events", "cancelled"), Some(0.0));
        assert_eq!(calls("track", "cancelled"), Some(1.0));
        assert_eq!(
            crate::metrics::sample(&text, "myelin_events_appended_total", &[("context", "ctx")]),
            Some(3.0)
        );
        assert_eq!(
            crate::metrics::sample(
                &text,
                "myelin_append_duration_seconds_count",
                &[("context", "ctx"), ("kind", "events")]
            ),
            Some(1.0)
        );
    }
}
