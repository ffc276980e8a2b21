//! The certificate a port serves, replaceable while it serves.
//!
//! An operator rotates a certificate by writing new files and sending the node SIGHUP (the
//! supervisor forwards it to the processes that serve TLS); the files are also looked at every
//! few seconds, so a rotation tool that only writes files works too. Each reload loads and
//! checks the pair as at start; one that fails keeps the certificate in use and logs why, so a
//! half-written pair (a new certificate with the old key) never takes the port down, and the next
//! change of either file tries again.

use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::{CertFiles, TlsError};

/// How often the files are looked at for a change.
const POLL: Duration = Duration::from_secs(5);

/// Serves the current certificate of one port (a rustls [`ResolvesServerCert`]).
#[derive(Debug)]
pub struct ReloadingCert {
    files: CertFiles,
    current: RwLock<Arc<CertifiedKey>>,
}

impl ReloadingCert {
    /// Loads the files; fails as [`CertFiles::load`] does.
    pub fn load(files: CertFiles) -> Result<Arc<ReloadingCert>, TlsError> {
        let current = RwLock::new(files.load()?);
        Ok(Arc::new(ReloadingCert { files, current }))
    }

    pub fn files(&self) -> &CertFiles {
        &self.files
    }

    /// Loads the files again; on success new handshakes get the new certificate, on failure the
    /// current one stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let loaded = self.files.load()?;
        *self.current.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = loaded;
        Ok(())
    }

    fn current(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// Keeps `certs` current until the process ends: reloads all of them on SIGHUP, and each one
/// whose files changed (modification time or size) when they are polled. Call it early in a
/// process that serves TLS: from then on SIGHUP no longer ends the process.
pub fn keep_current(certs: Vec<Arc<ReloadingCert>>) -> std::io::Result<tokio::task::JoinHandle<()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangups = signal(SignalKind::hangup())?;
    Ok(tokio::spawn(async move {
        let mut seen: Vec<_> = certs.iter().map(|c| fingerprint(c.files())).collect();
        let mut poll = tokio::time::interval(POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let hangup = tokio::select! {
                _ = hangups.recv() => true,
                _ = poll.tick() => false,
            };
            for (cert, seen) in certs.iter().zip(seen.iter_mut()) {
                let now = fingerprint(cert.files());
                if hangup || now != *seen {
                    *seen = now;
                    reload_and_log(cert, if hangup { "SIGHUP" } else { "the files changed" });
                }
            }
        }
    }))
}

fn reload_and_log(cert: &ReloadingCert, why: &str) {
    let files = cert.files();
    match cert.reload() {
        Ok(()) => tracing::info!(
            certificate = %files.cert_path.display(),
            not_after = CertFiles::not_after(&cert.current()).unwrap_or_default(),
            "reloaded the TLS certificate ({why})"
        ),
        Err(e) => tracing::warn!("kept the TLS certificate in use; reloading it ({why}) failed: {e}"),
    }
}

/// What says a file changed: its modification time and size (`None` while it cannot be read).
type Fingerprint = [Option<(SystemTime, u64)>; 2];

fn fingerprint(files: &CertFiles) -> Fingerprint {
    let stat = |path: &Path| {
        let meta = std::fs::metadata(path).ok()?;
        Some((meta.modified().ok()?, meta.len()))
    };
    [stat(&files.cert_path), stat(&files.key_path)]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::files::tests::{files, pair};

    #[test]
    fn a_failed_reload_keeps_the_certificate_a_good_one_replaces_it() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = pair(2100);
        let reloading = ReloadingCert::load(files(dir.path(), &cert, &key)).unwrap();
        let first = reloading.current();

        // A new certificate written before its key: refused, the old one stays.
        let (new_cert, new_key) = pair(2099);
        std::fs::write(&reloading.files().cert_path, &new_cert).unwrap();
        let e = reloading.reload().unwrap_err().to_string();
        assert!(e.contains("does not match"), "{e}");
        assert!(Arc::ptr_eq(&first, &reloading.current()));

        std::fs::write(&reloading.files().key_path, &new_key).unwrap();
        reloading.reload().unwrap();
        let second = reloading.current();
        assert_ne!(first.cert, second.cert);
        assert_eq!(CertFiles::not_after(&second).unwrap(), "2099-01-01T00:00:00Z");
    }
}
