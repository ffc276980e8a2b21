//! The contexts this eventstore stores, each with its stores, Raft group and appender.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use parking_lot::RwLock;

use crate::append::Appender;
use crate::consensus::{self, LOCAL_NODE, Raft};
use crate::stored::{Limits, StoredContext};

pub struct Context {
    pub name: String,
    pub stored: Arc<StoredContext>,
    pub raft: Raft,
    pub appender: Appender,
}

/// A context name is a directory name and travels in headers: keep it to a safe alphabet.
/// Names starting with `_` are reserved for the system (`_admin`).
pub fn valid_context_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        && !name.starts_with('.')
}

pub struct Contexts {
    data_dir: PathBuf,
    limits: Limits,
    log_segment_size: u64,
    map: RwLock<BTreeMap<String, Arc<Context>>>,
}

impl Contexts {
    pub fn new(data_dir: &Path, limits: Limits, log_segment_size: u64) -> Contexts {
        Contexts {
            data_dir: data_dir.to_owned(),
            limits,
            log_segment_size,
            map: RwLock::new(BTreeMap::new()),
        }
    }

    pub fn get(&self, name: &str) -> Option<Arc<Context>> {
        self.map.read().get(name).cloned()
    }

    pub fn all(&self) -> Vec<Arc<Context>> {
        self.map.read().values().cloned().collect()
    }

    /// Opens (recovering) or creates a context, and waits until its group has a leader.
    pub async fn open(&self, name: &str) -> anyhow::Result<Arc<Context>> {
        if let Some(existing) = self.get(name) {
            return Ok(existing);
        }
        anyhow::ensure!(valid_context_name(name), "invalid context name {name:?}");
        let dir = self.data_dir.join(name);
        let limits = self.limits;
        let dir2 = dir.clone();
        let name2 = name.to_owned();
        let stored = tokio::task::spawn_blocking(move || StoredContext::open(&name2, &dir2, limits))
            .await?
            .with_context(|| format!("recovering context {name} in {}", dir.display()))?;
        let stored = Arc::new(stored);
        let raft = consensus::start_group(name, stored.clone(), self.log_segment_size).await?;
        raft.wait(Some(Duration::from_secs(30)))
            .current_leader(LOCAL_NODE, "leader elected")
            .await
            .with_context(|| format!("context {name}: no leader within 30 s"))?;
        let appender = Appender::start(raft.clone(), stored.clone());
        let context = Arc::new(Context {
            name: name.to_owned(),
            stored,
            raft,
            appender,
        });
        self.map.write().insert(name.to_owned(), context.clone());
        tracing::info!(
            context = name,
            next_token = context.stored.events.next_token(),
            "context open"
        );
        Ok(context)
    }

    /// Stops every group (used at shutdown).
    pub async fn shutdown(&self) {
        for context in self.all() {
            if let Err(e) = context.raft.shutdown().await {
                tracing::warn!(context = %context.name, error = %e, "raft shutdown");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::valid_context_name;

    #[test]
    fn context_names() {
        for ok in ["default", "_admin", "orders-2", "a.b"] {
            assert!(valid_context_name(ok), "{ok}");
        }
        for bad in ["", "../x", "a/b", ".hidden", "sp ace", &"x".repeat(65)] {
            assert!(!valid_context_name(bad), "{bad}");
        }
    }
}
