//! The connected client applications, per context, as their control streams report them.
//!
//! A client is known from its `register` until its control stream ends; it is keyed by the
//! stream's id `<client_id>.<uuid>` so that two streams of one client id (a reconnect racing the
//! old stream's end) never overwrite each other. Each entry also holds the stream's outbound
//! queue, which is how the node reaches the client with an instruction. Event-processor reports
//! are kept per client and processor, latest only, at most [`MAX_PROCESSORS`] per stream and
//! [`MAX_REPORT_BYTES`] each, so what one client can make the node hold is bounded. The map sits
//! behind one short mutex, never held across an await.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard};
use std::time::SystemTime;

use myelin_proto::axon::control::{ClientIdentification, EventProcessorInfo};

use super::stream::Outbox;

/// Distinct processors one control stream may report; reports of further processors are
/// refused, so a client cannot grow the node's memory by inventing processor names.
pub const MAX_PROCESSORS: usize = 256;
/// Largest processor report kept, encoded (room for a couple of thousand segments).
pub const MAX_REPORT_BYTES: usize = 64 * 1024;

/// The latest report of one event processor.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessorReport {
    pub info: EventProcessorInfo,
    /// When the report arrived.
    pub reported_at: SystemTime,
}

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
    /// Latest report per processor, ordered by processor name.
    pub processors: Vec<ProcessorReport>,
}

/// One registered control stream, as the node reaches it.
pub struct ControlStream {
    pub client_id: String,
    pub tags: HashMap<String, String>,
    pub stream_id: String,
    pub outbox: Outbox,
}

struct Entry {
    snapshot: ClientSnapshot,
    outbox: Outbox,
}

#[derive(Default)]
pub struct Clients {
    streams: Mutex<HashMap<String, Entry>>,
}

impl Clients {
    fn streams(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        self.streams.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records a registration of the control stream whose outbound queue is `outbox`; returns
    /// the stream's id.
    pub fn register(&self, context: &str, client: &ClientIdentification, outbox: Outbox) -> String {
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
        self.streams()
            .insert(client_stream_id.clone(), Entry { snapshot, outbox });
        client_stream_id
    }

    pub fn heartbeat(&self, client_stream_id: &str) {
        if let Some(entry) = self.streams().get_mut(client_stream_id) {
            entry.snapshot.last_heartbeat = Some(SystemTime::now());
        }
    }

    /// Keeps the latest report of the processor; false if it was refused (too large, or too many
    /// processors).
    pub fn processor_info(&self, client_stream_id: &str, info: EventProcessorInfo) -> bool {
        if prost::Message::encoded_len(&info) > MAX_REPORT_BYTES {
            return false;
        }
        let mut streams = self.streams();
        let Some(entry) = streams.get_mut(client_stream_id) else {
            return true;
        };
        let report = ProcessorReport {
            info,
            reported_at: SystemTime::now(),
        };
        let processors = &mut entry.snapshot.processors;
        match processors.binary_search_by(|p| p.info.processor_name.cmp(&report.info.processor_name)) {
            Ok(at) => processors[at] = report,
            Err(_) if processors.len() >= MAX_PROCESSORS => return false,
            Err(at) => processors.insert(at, report),
        }
        true
    }

    pub fn remove(&self, client_stream_id: &str) {
        self.streams().remove(client_stream_id);
    }

    /// Every connected client, ordered by context, client id and stream id.
    pub fn snapshot(&self) -> Vec<ClientSnapshot> {
        let mut all: Vec<ClientSnapshot> = self.streams().values().map(|e| e.snapshot.clone()).collect();
        all.sort_by(|a, b| {
            (&a.context, &a.client_id, &a.client_stream_id).cmp(&(&b.context, &b.client_id, &b.client_stream_id))
        });
        all
    }

    /// The control streams of `client_id` in `context`: (stream id, outbound queue).
    pub fn outboxes(&self, context: &str, client_id: &str) -> Vec<(String, Outbox)> {
        let mut found: Vec<(String, Outbox)> = self
            .streams()
            .iter()
            .filter(|(_, e)| e.snapshot.context == context && e.snapshot.client_id == client_id)
            .map(|(id, e)| (id.clone(), e.outbox.clone()))
            .collect();
        found.sort_by(|a, b| a.0.cmp(&b.0));
        found
    }

    /// The control streams of `context`, youngest first: what the balancer chooses from.
    pub fn of_context(&self, context: &str) -> Vec<ControlStream> {
        let mut found: Vec<(SystemTime, ControlStream)> = self
            .streams()
            .iter()
            .filter(|(_, e)| e.snapshot.context == context)
            .map(|(id, e)| {
                let stream = ControlStream {
                    client_id: e.snapshot.client_id.clone(),
                    tags: e.snapshot.tags.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                    stream_id: id.clone(),
                    outbox: e.outbox.clone(),
                };
                (e.snapshot.connected_since, stream)
            })
            .collect();
        found.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.stream_id.cmp(&b.1.stream_id)));
        found.into_iter().map(|(_, stream)| stream).collect()
    }

    /// Registered control streams per context.
    pub fn count_per_context(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for entry in self.streams().values() {
            *counts.entry(entry.snapshot.context.clone()).or_default() += 1;
        }
        counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc;

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

    fn outbox() -> Outbox {
        mpsc::channel(1).0
    }

    #[test]
    fn tracks_clients_per_context_and_latest_processor_reports() {
        let clients = Clients::default();
        let a = clients.register("ctx-a", &client("app-1", "orders"), outbox());
        let b = clients.register("ctx-b", &client("app-2", "billing"), outbox());
        assert!(a.starts_with("app-1.") && a.len() > "app-1.".len() + 30, "{a}");
        assert_ne!(a, b);

        clients.heartbeat(&a);
        assert!(clients.processor_info(&a, processor("p2", 1)));
        assert!(clients.processor_info(&a, processor("p1", 1)));
        assert!(clients.processor_info(&a, processor("p1", 4)));

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
            .map(|p| (p.info.processor_name.as_str(), p.info.active_threads))
            .collect();
        assert_eq!(reports, [("p1", 4), ("p2", 1)]);
        assert!(all[0].processors[0].reported_at >= all[0].connected_since);
        assert_eq!((all[1].context.as_str(), all[1].client_id.as_str()), ("ctx-b", "app-2"));
        assert!(all[1].last_heartbeat.is_none() && all[1].processors.is_empty());
        assert_eq!(
            clients.count_per_context().into_iter().collect::<Vec<_>>(),
            [("ctx-a".to_owned(), 1), ("ctx-b".to_owned(), 1)]
        );

        clients.remove(&a);
        let left: Vec<String> = clients.snapshot().into_iter().map(|c| c.client_stream_id).collect();
        assert_eq!(left, [b]);
    }

    #[test]
    fn outboxes_of_a_client_and_the_processor_bound() {
        let clients = Clients::default();
        let first = clients.register("c", &client("app", "x"), outbox());
        let second = clients.register("c", &client("app", "x"), outbox());
        clients.register("other", &client("app", "x"), outbox());
        clients.register("c", &client("app-2", "x"), outbox());
        let mut expected = vec![first.clone(), second];
        expected.sort();
        let found: Vec<String> = clients.outboxes("c", "app").into_iter().map(|(id, _)| id).collect();
        assert_eq!(found, expected);
        assert!(clients.outboxes("c", "nobody").is_empty());

        for i in 0..MAX_PROCESSORS {
            assert!(clients.processor_info(&first, processor(&format!("p{i:04}"), 1)));
        }
        assert!(!clients.processor_info(&first, processor("one-too-many", 1)));
        // An update of a known processor is still taken, unless it is too large.
        assert!(clients.processor_info(&first, processor("p0000", 7)));
        let mut huge = processor("p0001", 1);
        huge.mode = "x".repeat(MAX_REPORT_BYTES);
        assert!(!clients.processor_info(&first, huge));
        let snapshot = clients.snapshot();
        let mine = snapshot.iter().find(|c| c.client_stream_id == first).unwrap();
        assert_eq!(mine.processors.len(), MAX_PROCESSORS);
        assert_eq!(mine.processors[0].info.active_threads, 7);
    }
}
