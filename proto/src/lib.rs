//! Generated protobuf and gRPC code.
//!
//! `axon` is the client API, wire-compatible with Axon Server: the same packages
//! (`io.axoniq.axonserver.grpc.*`), message and field names, numbers and types. The `.proto`
//! files under `protos/axon` are our own text, written from the public API's facts.
//!
//! `internal` is Myelin's process-to-process API (router <-> eventstore <-> admin over Unix
//! sockets). It reuses the Axon message types where the data is the same, so nothing has to be
//! converted on the hot path, but lives in its own package so it can change without touching the
//! client contract.

#![allow(clippy::all, clippy::pedantic)]

pub mod io {
    pub mod axoniq {
        pub mod axonserver {
            pub mod grpc {
                include!(concat!(env!("OUT_DIR"), "/io.axoniq.axonserver.grpc.rs"));
                pub mod event {
                    include!(concat!(env!("OUT_DIR"), "/io.axoniq.axonserver.grpc.event.rs"));
                }
                pub mod control {
                    include!(concat!(env!("OUT_DIR"), "/io.axoniq.axonserver.grpc.control.rs"));
                }
                pub mod command {
                    include!(concat!(env!("OUT_DIR"), "/io.axoniq.axonserver.grpc.command.rs"));
                }
                pub mod query {
                    include!(concat!(env!("OUT_DIR"), "/io.axoniq.axonserver.grpc.query.rs"));
                }
            }
        }
    }
}

pub mod myelin {
    pub mod internal {
        include!(concat!(env!("OUT_DIR"), "/myelin.internal.rs"));
    }
}

/// The Axon-compatible client API.
pub use io::axoniq::axonserver::grpc as axon;
/// Myelin's internal process-to-process API.
pub use myelin::internal;

pub mod encoded;
pub mod errors;
pub mod limits;
pub mod local_socket;
pub mod roles;
pub mod telemetry;

/// Request metadata key naming the context on internal calls.
pub const CONTEXT_KEY: &str = "myelin-context";
/// Client request metadata key naming the context (Axon's `AxonIQ-Context`).
pub const AXON_CONTEXT_KEY: &str = "axoniq-context";
/// The context a client uses when it names none.
pub const DEFAULT_CONTEXT: &str = "default";
