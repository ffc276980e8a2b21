//! Calls for a service or method this node does not serve.
//!
//! A client calling a service no server of the client port claims (Axon's `EventTransformationService`, say)
//! gets tonic's trailers-only UNIMPLEMENTED answer; so does a method a generated service lacks,
//! and the few RPCs the router knows but does not support (`QueryEvents`) answer the same. The
//! client sees UNIMPLEMENTED, and without this layer the operator saw nothing: an application
//! relying on a missing feature failed with no trace on the node.
//!
//! This layer looks at each answer's headers (where a trailers-only answer carries its
//! `grpc-status`) and logs a warning the first time a path is answered UNIMPLEMENTED, naming the
//! service, the method and the client's context; an answer without a message (tonic's own) gets
//! one naming the method and service, so the client's error says what was not served. A path is logged once per router process.
//! What it remembers is bounded: after [`MAX_REMEMBERED`] distinct paths (a client inventing
//! paths), one more warning says that further ones are not logged, and nothing grows.

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};

/// Distinct unimplemented paths remembered (and so logged) at most.
pub const MAX_REMEMBERED: usize = 256;

/// gRPC's status code UNIMPLEMENTED, as a `grpc-status` header value.
const UNIMPLEMENTED: &str = "12";

/// What to do about one UNIMPLEMENTED answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Note {
    /// The first time for this path: log it.
    First,
    /// Logged before, or past the bound after it was reported: nothing.
    Seen,
    /// The bound was just reached: say that further paths are not logged.
    Full,
}

#[derive(Debug, Default)]
struct Seen {
    paths: HashSet<String>,
    full_reported: bool,
}

impl Seen {
    fn note(&mut self, path: &str) -> Note {
        if self.paths.contains(path) {
            return Note::Seen;
        }
        if self.paths.len() >= MAX_REMEMBERED {
            if self.full_reported {
                return Note::Seen;
            }
            self.full_reported = true;
            return Note::Full;
        }
        self.paths.insert(path.to_owned());
        Note::First
    }
}

/// `(service, method)` of a gRPC path `/package.Service/Method`.
fn service_and_method(path: &str) -> (&str, &str) {
    let trimmed = path.strip_prefix('/').unwrap_or(path);
    trimmed.rsplit_once('/').unwrap_or((trimmed, ""))
}

/// The layer in front of the client gRPC server.
#[derive(Debug, Clone, Default)]
pub struct UnimplementedLayer {
    seen: Arc<Mutex<Seen>>,
}

impl<S> tower::Layer<S> for UnimplementedLayer {
    type Service = UnimplementedService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        UnimplementedService {
            inner,
            seen: self.seen.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct UnimplementedService<S> {
    inner: S,
    seen: Arc<Mutex<Seen>>,
}

type BoxFuture<T, E> = Pin<Box<dyn std::future::Future<Output = Result<T, E>> + Send>>;

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for UnimplementedService<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        // Both clones share their bytes with the request (no copy).
        let uri = request.uri().clone();
        let context = request.headers().get(myelin_proto::AXON_CONTEXT_KEY).cloned();
        let seen = self.seen.clone();
        let answer = self.inner.call(request);
        Box::pin(async move {
            let mut response = answer.await?;
            if response
                .headers()
                .get("grpc-status")
                .is_some_and(|status| status == UNIMPLEMENTED)
            {
                let path = uri.path();
                name_the_call(response.headers_mut(), path);
                let note = seen.lock().unwrap_or_else(|e| e.into_inner()).note(path);
                let context = context
                    .as_ref()
                    .and_then(|c| c.to_str().ok())
                    .unwrap_or(myelin_proto::DEFAULT_CONTEXT);
                match note {
                    Note::First => {
                        let (service, method) = service_and_method(path);
                        tracing::warn!(
                            service,
                            method,
                            context,
                            "a client called a service or method this node does not implement; answered UNIMPLEMENTED \
                             (logged once per method)"
                        );
                    }
                    Note::Full => tracing::warn!(
                        limit = MAX_REMEMBERED,
                        "clients called more unimplemented methods than are remembered; further ones are not logged"
                    ),
                    Note::Seen => {}
                }
            }
            Ok(response)
        })
    }
}

/// Gives an UNIMPLEMENTED answer without a message (tonic's, for a service or method no server
/// claims) one that names what was called, so the client's error says it.
fn name_the_call(headers: &mut http::HeaderMap, path: &str) {
    if headers.get("grpc-message").is_some_and(|m| !m.is_empty()) {
        return;
    }
    let (service, method) = service_and_method(path);
    let message = format!("Myelin does not implement method {method} of service {service}");
    if let Ok(value) = http::HeaderValue::from_str(&percent_encode(&message)) {
        headers.insert("grpc-message", value);
    }
}

/// gRPC's `grpc-message` encoding: bytes outside printable ASCII, and `%`, as `%XX`.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::{Layer as _, ServiceExt as _};

    #[test]
    fn a_path_is_noted_once_and_the_memory_is_bounded() {
        let mut seen = Seen::default();
        assert_eq!(seen.note("/a.B/C"), Note::First);
        assert_eq!(seen.note("/a.B/C"), Note::Seen);
        for i in 1..MAX_REMEMBERED {
            assert_eq!(seen.note(&format!("/x.Y/M{i}")), Note::First);
        }
        assert_eq!(seen.note("/one.More/Path"), Note::Full);
        assert_eq!(seen.note("/and.Another/One"), Note::Seen);
        assert_eq!(seen.paths.len(), MAX_REMEMBERED);
    }

    #[test]
    fn service_and_method_are_split_from_the_path() {
        assert_eq!(
            service_and_method("/io.axoniq.axonserver.grpc.event.EventScheduler/ScheduleEvent"),
            ("io.axoniq.axonserver.grpc.event.EventScheduler", "ScheduleEvent")
        );
        assert_eq!(service_and_method("/odd"), ("odd", ""));
    }

    #[tokio::test]
    async fn only_unimplemented_answers_are_noted() {
        let layer = UnimplementedLayer::default();
        let inner = tower::service_fn(|request: http::Request<()>| async move {
            let status = if request.uri().path().starts_with("/known.") {
                "0"
            } else {
                UNIMPLEMENTED
            };
            Ok::<_, std::convert::Infallible>(
                http::Response::builder()
                    .header("grpc-status", status)
                    .body(())
                    .unwrap(),
            )
        });
        let service = layer.layer(inner);
        for path in ["/known.Service/Call", "/unknown.Service/Call", "/unknown.Service/Call"] {
            let request = http::Request::builder().uri(path).body(()).unwrap();
            service.clone().oneshot(request).await.unwrap();
        }
        let request = http::Request::builder().uri("/unknown.Service/Call").body(()).unwrap();
        let answer = service.clone().oneshot(request).await.unwrap();
        assert_eq!(
            answer.headers()["grpc-message"],
            "Myelin does not implement method Call of service unknown.Service"
        );
        assert_eq!(percent_encode("a%b\u{e9}\n"), "a%25b%C3%A9%0A");
        let seen = layer.seen.lock().unwrap();
        assert_eq!(
            seen.paths.iter().map(String::as_str).collect::<Vec<_>>(),
            ["/unknown.Service/Call"]
        );
    }
}
