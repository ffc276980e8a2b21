//! Room to write before the eventstore starts.
//!
//! A failed write or fsync stops the eventstore (STYLE 3: an IO error is never retried on the
//! same file; the process exits and recovery starts from what is on disk). On a full disk,
//! recovery itself must write (re-applying committed entries, reserving the Raft log's next
//! space), so a restart straight away fails again, and a crash loop makes the supervisor give
//! up on the node. Instead the eventstore, before it opens any context, makes sure the data
//! directory's file system can take [`needed`] bytes, and otherwise waits, checking every
//! [`RECHECK`], until it can. Clients see UNAVAILABLE meanwhile (the eventstore does not serve
//! yet); once space returns it starts at once and recovers, whatever the clients do.

use std::path::Path;
use std::time::Duration;

/// How often a full file system is checked again.
pub const RECHECK: Duration = Duration::from_millis(250);

/// Room recovery needs: the Raft log's next reservation twice over, and the largest batch,
/// or a quarter of the file system on one that is smaller than that (a test's small tmpfs).
const ROOM: u64 = 32 << 20;

/// Bytes that must be free to start: [`ROOM`], at most a quarter of the file system.
pub fn needed(dir: &Path) -> std::io::Result<u64> {
    let stat = nix::sys::statvfs::statvfs(dir).map_err(std::io::Error::from)?;
    #[allow(clippy::unnecessary_cast)]
    let total = (stat.blocks() as u64).saturating_mul(stat.fragment_size() as u64);
    Ok(ROOM.min(total / 4))
}

/// Whether `bytes` can be written under `dir` now: reserves them in a probe file (`fallocate`,
/// which fails at once with ENOSPC without writing data) and removes it again.
pub fn room_for(dir: &Path, bytes: u64) -> std::io::Result<bool> {
    let path = dir.join(".space-probe");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path);
    let file = match file {
        Ok(file) => file,
        Err(e) if is_no_space(&e) => return Ok(false),
        Err(e) => return Err(e),
    };
    let reserved = nix::fcntl::fallocate(&file, nix::fcntl::FallocateFlags::empty(), 0, bytes as i64);
    drop(file);
    let _ = std::fs::remove_file(&path);
    match reserved {
        Ok(()) => Ok(true),
        Err(nix::errno::Errno::ENOSPC) | Err(nix::errno::Errno::EDQUOT) => Ok(false),
        // A file system without fallocate: no cheap way to tell; go on and let writes decide.
        Err(nix::errno::Errno::EOPNOTSUPP) => Ok(true),
        Err(e) => Err(e.into()),
    }
}

fn is_no_space(e: &std::io::Error) -> bool {
    use nix::errno::Errno;
    matches!(
        Errno::from_raw(e.raw_os_error().unwrap_or(0)),
        Errno::ENOSPC | Errno::EDQUOT
    )
}

/// Waits until `dir` has room to start in; logs once while it waits, and again when it can go on.
pub async fn wait_for_room(dir: &Path) -> std::io::Result<()> {
    let needed = needed(dir)?;
    let mut waited = false;
    while !room_for(dir, needed)? {
        if !waited {
            tracing::error!(
                dir = %dir.display(),
                needed,
                "no room to write on the data directory's file system; waiting for space before starting"
            );
            waited = true;
        }
        tokio::time::sleep(RECHECK).await;
    }
    if waited {
        tracing::info!(dir = %dir.display(), "space on the data directory again; starting");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_probe_fits_and_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        assert!(room_for(dir.path(), 1 << 20).unwrap());
        assert!(!dir.path().join(".space-probe").exists());
        assert!(needed(dir.path()).unwrap() > 0);
    }

    #[test]
    fn a_probe_larger_than_the_disk_does_not_fit() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!room_for(dir.path(), u64::MAX / 4).unwrap_or(false));
    }
}
