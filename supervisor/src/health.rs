//! Asking a child whether it serves: `grpc.health.v1.Health/Check` for the overall service `""`
//! over the child's Unix socket.
//!
//! The channel is lazy and reconnects by itself, so one probe per child lives as long as the
//! supervisor and keeps working across that child's restarts.

use std::path::Path;
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// What a child said, if anything.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    Serving,
    /// It answered, with another status (e.g. still recovering).
    NotServing,
    /// No answer: not listening yet, gone, or too slow.
    Silent,
}

#[derive(Clone, Debug)]
pub struct Probe {
    client: HealthClient<Channel>,
    timeout: Duration,
}

impl Probe {
    /// Must be called inside the runtime. `socket` must be absolute.
    pub fn new(socket: &Path, timeout: Duration) -> anyhow::Result<Probe> {
        let endpoint = Endpoint::from_shared(format!("unix://{}", socket.display()))?
            .connect_timeout(timeout)
            .timeout(timeout);
        Ok(Probe {
            client: HealthClient::new(endpoint.connect_lazy()),
            timeout,
        })
    }

    pub async fn check(&self) -> Health {
        let mut client = self.client.clone();
        let request = HealthCheckRequest { service: String::new() };
        match tokio::time::timeout(self.timeout, client.check(request)).await {
            Ok(Ok(response)) if response.get_ref().status == ServingStatus::Serving as i32 => Health::Serving,
            Ok(Ok(_)) => Health::NotServing,
            Ok(Err(_)) | Err(_) => Health::Silent,
        }
    }
}
