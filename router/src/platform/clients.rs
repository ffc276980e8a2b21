//! The connected client applications, per context, as their control streams report them.
//!
//! A client is known from its `register` until its control stream ends; it is keyed by the
//! stream's id `<client_id>.<uuid>` so that two streams of one client id (a reconnect racing the
//! old stream's end) never overwrite each other. Event-processor reports are kept per client and
//! processor, latest only. The map sits behind one short mutex, never held across an await.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard};
use std::time::SystemTime;

use myelin_proto::axon::control::{ClientIdentification, EventProcessorInfo};

/// One connected client, as the admin API shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientSnapshot {
    pub context: String,
    pub client_id: String,
    pub client_stream_id: String,
    pub component_name: String,
    pub version: String,
    pub tags: BTreeMap<String, String>,
    pub connected_since: SystemTime,
    /// When the client last sent a heartbeat (none: an old client that never does).
    pub last_heartbeat: Option<SystemTime>,
    /// Latest report per processor, by processor name.
    pub processors: Vec<EventProcessorInfo>,
}

#[derive(Default)]
pub struct Clients {
    streams: Mutex<HashMap<String, ClientSnapshot>>,
}

impl Clients {
    fn streams(&self) -> MutexGuard<'_, HashMap<String, ClientSnapshot>> {
        self.streams.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records a registration; returns the stream's id.
    pub fn register(&self, context: &str, client: &ClientIdentification) -> String {
        let client_stream_id = format!("{}.{}", client.client_id, crate::query::unique_id());
        let snapshot = ClientSnapshot {
            context: context.to_owned(),
            client_id: client.client_id.clone(),
            client_stream_id: client_stream_id.clone(),
            component_name: client.component_name.clone(),
            version: client.version.clone(),
            tags: client.tags.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            connected_since: SystemTime::now(),
            last_heartbeat: None,
            processors: Vec::new(),
        };
        self.streams().insert(client_stream_id.clone(), snapshot);
        client_stream_id
    }

    pub fn heartbeat(&self, client_stream_id: &str) {
        if let Some(client) = self.streams().get_mut(client_stream_id) {
            client.last_heartbeat = Some(SystemTime::now());
        }
    }

    /// Keeps the latest report of the processor.
    pub fn processor_info(&self, client_stream_id: &str, info: EventProcessorInfo) {
        if let Some(client) = self.streams().get_mut(client_stream_id) {
            match client
                .processors
                .iter_mut()
                .find(|p| p.processor_name == info.processor_name)
            {
                Some(known) => *known = info,
                None => {
                    client.processors.push(info);
                    client
                        .processors
                        .sort_by(|a, b| a.processor_name.cmp(&b.processor_name));
                }
            }
        }
    }

    pub fn remove(&self, client_stream_id: &str) {
        self.streams().remove(client_stream_id);
    }

    /// Every connected client, ordered by context, client id and stream id.
    pub fn snapshot(&self) -> Vec<ClientSnapshot> {
        let mut all: Vec<ClientSnapshot> = self.streams().values().cloned().collect();
        all.sort_by(|a, b| {
            (&a.context, &a.client_id, &a.client_stream_id).cmp(&(&b.context, &b.client_id, &b.client_stream_id))
        });
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(id: &str, component: &str) -> ClientIdentification {
        ClientIdentification {
            client_id: id.into(),
            component_name: component.into(),
            tags: [("region".to_owned(), "eu".to_owned())].into(),
            version: "4.6.0".into(),
        }
    }

    fn processor(name: &str, threads: i32) -> EventProcessorInfo {
        EventProcessorInfo {
            processor_name: name.into(),
            active_threads: threads,
            ..Default::default()
        }
    }

    #[test]
    fn tracks_clients_per_context_and_latest_processor_reports() {
        let clients = Clients::default();
        let a = clients.register("ctx-a", &client("app-1", "orders"));
        let b = clients.register("ctx-b", &client("app-2", "billing"));
        assert!(a.starts_with("app-1.") && a.len() > "app-1.".len() + 30, "{a}");
        assert_ne!(a, b);

        clients.heartbeat(&a);
        clients.processor_info(&a, processor("p2", 1));
        clients.processor_info(&a, processor("p1", 1));
        clients.processor_info(&a, processor("p1", 4));

        let all = clients.snapshot();
        assert_eq!(all.len(), 2);
        assert_eq!(
            (
                all[0].context.as_str(),
                all[0].client_id.as_str(),
                all[0].component_name.as_str()
            ),
            ("ctx-a", "app-1", "orders")
        );
        assert_eq!(all[0].version, "4.6.0");
        assert_eq!(all[0].tags.get("region").map(String::as_str), Some("eu"));
        assert!(all[0].last_heartbeat.is_some());
        let reports: Vec<(&str, i32)> = all[0]
            .processors
            .iter()
            .map(|p| (p.processor_name.as_str(), p.active_threads))
            .collect();
        assert_eq!(reports, [("p1", 4), ("p2", 1)]);
        assert_eq!((all[1].context.as_str(), all[1].client_id.as_str()), ("ctx-b", "app-2"));
        assert!(all[1].last_heartbeat.is_none() && all[1].processors.is_empty());

        clients.remove(&a);
        let left: Vec<String> = clients.snapshot().into_iter().map(|c| c.client_stream_id).collect();
        assert_eq!(left, [b]);
    }
}
