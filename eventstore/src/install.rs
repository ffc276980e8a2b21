//! Installing a context's segments received from another member of its group: a member behind
//! the leader's purged log is sent the leader's segment files (see `consensus::transfer`), and
//! they take the place of its own.
//!
//! What holds:
//! - Files are received into a staging directory `<context>/install/<id>/` (`events/`,
//!   `snapshots/`), never into the live ones: a transfer that breaks off, or a file that fails
//!   its checksum, leaves the live stores as they were, and the staging directory is removed.
//! - Only once every file arrived whole and was fsynced is the marker `READY` written (atomically,
//!   holding the snapshot pointer the installed state answers to). From then on the install is
//!   decided: each store directory is swapped with its staged one (the old moved aside, the new
//!   renamed in, the parent fsynced), `READY` becomes the context's `snapshot.json`, and the
//!   staging directory goes.
//! - A crash anywhere in that is finished at the next open ([`recover`], before the stores open):
//!   with `READY` the swap is done again (each step is idempotent), without it the staging
//!   directory is an unfinished transfer and is removed. So a member never serves a mix of old
//!   and new files, and a member that crashed mid-install starts and is sent the snapshot again.

use std::path::{Path, PathBuf};

use crate::segment::StoreError;
use crate::segment::store::{swap_dir, sync_dir, write_atomically};

/// Where transfers are staged, inside a context's directory.
pub const INSTALL_DIR: &str = "install";
/// The context's snapshot pointer (see `consensus::state_machine`); an install ends by putting
/// the pointer it received there.
pub const POINTER_FILE: &str = "snapshot.json";
/// The marker of a staged install whose files are all there.
const READY: &str = "READY";
/// The store directories of a context, each replaced whole.
pub const STORES: [&str; 2] = ["events", "snapshots"];

fn io(path: &Path) -> impl Fn(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A staging directory being filled. Dropped before it was installed, it is removed.
#[derive(Debug)]
pub struct Staging {
    context_dir: PathBuf,
    root: PathBuf,
    installed: bool,
}

impl Staging {
    /// A new, empty staging directory under `context_dir`. Staging directories of earlier
    /// transfers that never completed are removed first (one transfer at a time per context).
    pub fn create(context_dir: &Path) -> Result<Staging, StoreError> {
        let parent = context_dir.join(INSTALL_DIR);
        if parent.exists() {
            for entry in std::fs::read_dir(&parent).map_err(io(&parent))?.flatten() {
                if !entry.path().join(READY).exists() {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let root = parent.join(format!("{nanos}"));
        for store in STORES {
            let dir = root.join(store);
            std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        }
        Ok(Staging {
            context_dir: context_dir.to_owned(),
            root,
            installed: false,
        })
    }

    /// Where the file `name` of store `store` is staged. Refuses names that are not a plain
    /// segment file name (they come from another node).
    pub fn path_of(&self, store: &str, name: &str) -> Result<PathBuf, String> {
        if !STORES.contains(&store) {
            return Err(format!("unknown store {store:?}"));
        }
        let plain = !name.is_empty()
            && name.len() <= 64
            && !name.starts_with('.')
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.');
        if !plain {
            return Err(format!("not a segment file name: {name:?}"));
        }
        Ok(self.root.join(store).join(name))
    }

    /// Records that every file is staged and durable, with the snapshot pointer the installed
    /// state answers to: from here on the install is decided (see the module docs).
    pub fn mark_ready(&self, pointer: &[u8]) -> Result<(), StoreError> {
        for store in STORES {
            sync_dir(&self.root.join(store))?;
        }
        write_atomically(&self.root.join(READY), pointer)?;
        sync_dir(&self.context_dir.join(INSTALL_DIR))
    }

    /// The staging directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The staged store directory `store` and where the live one is moved aside to.
    pub fn store_dirs(&self, store: &str) -> (PathBuf, PathBuf) {
        (self.root.join(store), self.root.join(format!("old-{store}")))
    }

    /// After the stores were swapped: the pointer takes its place and the staging directory goes.
    pub fn finish(mut self) -> Result<(), StoreError> {
        finish(&self.context_dir, &self.root)?;
        self.installed = true;
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.installed && !self.root.join(READY).exists() {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}

/// The last steps of an install, after the store directories were swapped: `READY` becomes the
/// context's pointer, then the staging directory (with the old stores) is removed.
fn finish(context_dir: &Path, root: &Path) -> Result<(), StoreError> {
    let ready = root.join(READY);
    if ready.exists() {
        let pointer = context_dir.join(POINTER_FILE);
        std::fs::rename(&ready, &pointer).map_err(io(&ready))?;
        sync_dir(context_dir)?;
    }
    crate::crash::point("install-after-pointer");
    std::fs::remove_dir_all(root).map_err(io(root))?;
    sync_dir(&context_dir.join(INSTALL_DIR))
}

/// At open, before the stores open: finishes an install that was decided (`READY` written) and
/// removes every staging directory of a transfer that was not. Returns whether an install was
/// finished.
pub fn recover(context_dir: &Path) -> Result<bool, StoreError> {
    let parent = context_dir.join(INSTALL_DIR);
    if !parent.exists() {
        return Ok(false);
    }
    let mut finished = false;
    for entry in std::fs::read_dir(&parent).map_err(io(&parent))? {
        let root = entry.map_err(io(&parent))?.path();
        if root.join(READY).exists() {
            tracing::warn!(staging = %root.display(), "finishing an install interrupted by a crash");
            for store in STORES {
                swap_dir(
                    &context_dir.join(store),
                    &root.join(store),
                    &root.join(format!("old-{store}")),
                )?;
            }
            finish(context_dir, &root)?;
            finished = true;
        } else {
            tracing::info!(staging = %root.display(), "removing an unfinished transfer");
            std::fs::remove_dir_all(&root).map_err(io(&root))?;
        }
    }
    Ok(finished)
}
