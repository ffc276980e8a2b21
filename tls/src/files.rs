//! A certificate chain and its private key in PEM files, loaded and checked as a pair.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

use crate::TlsError;
use crate::validity;

/// Where a port's certificate comes from, with the configuration keys that named the files (for
/// messages): e.g. `axoniq.axonserver.ssl.cert-chain-file` and `...ssl.private-key-file`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertFiles {
    pub cert_key: String,
    pub cert_path: PathBuf,
    pub key_key: String,
    pub key_path: PathBuf,
}

impl CertFiles {
    /// Reads both files and checks them: PEM, a key that signs for the first certificate, and
    /// that certificate valid now.
    pub fn load(&self) -> Result<Arc<CertifiedKey>, TlsError> {
        let chain = read_certificates(&self.cert_key, &self.cert_path)?;
        let key_bytes = read(&self.key_key, &self.key_path)?;
        let key = PrivateKeyDer::from_pem_slice(&key_bytes).map_err(|e| match e {
            pem::Error::NoItemsFound => TlsError::NoKey {
                key: self.key_key.clone(),
                path: self.key_path.clone(),
            },
            other => TlsError::NotPem {
                key: self.key_key.clone(),
                path: self.key_path.clone(),
                detail: other.to_string(),
            },
        })?;
        let signing = rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| TlsError::BadKey {
            key: self.key_key.clone(),
            path: self.key_path.clone(),
            detail: e.to_string(),
        })?;
        let (not_before, not_after) = validity::validity(&chain[0]).ok_or_else(|| TlsError::BadCertificate {
            key: self.cert_key.clone(),
            path: self.cert_path.clone(),
        })?;
        let now = validity::now();
        if now >= not_after {
            return Err(TlsError::Expired {
                key: self.cert_key.clone(),
                path: self.cert_path.clone(),
                not_after: validity::format(not_after),
            });
        }
        if now < not_before {
            return Err(TlsError::NotYetValid {
                key: self.cert_key.clone(),
                path: self.cert_path.clone(),
                not_before: validity::format(not_before),
            });
        }
        let certified = CertifiedKey::new(chain, signing);
        match certified.keys_match() {
            // `Unknown`: the key cannot tell its public half; the first handshake will.
            Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
            Err(rustls::Error::InconsistentKeys(_)) => {
                return Err(TlsError::KeyMismatch {
                    key_key: self.key_key.clone(),
                    key_path: self.key_path.clone(),
                    cert_key: self.cert_key.clone(),
                    cert_path: self.cert_path.clone(),
                });
            }
            Err(_) => {
                return Err(TlsError::BadCertificate {
                    key: self.cert_key.clone(),
                    path: self.cert_path.clone(),
                });
            }
        }
        Ok(Arc::new(certified))
    }

    /// When the certificate served from these files stops being valid, as `2026-12-07T20:00:00Z`.
    pub fn not_after(certified: &CertifiedKey) -> Option<String> {
        let (_, not_after) = validity::validity(certified.cert.first()?)?;
        Some(validity::format(not_after))
    }
}

/// The certificates of a PEM file named by `key`, as trust anchors (a CA file).
pub fn load_roots(key: &str, path: &Path) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for certificate in read_certificates(key, path)? {
        roots.add(certificate).map_err(|_| TlsError::BadCertificate {
            key: key.to_owned(),
            path: path.to_owned(),
        })?;
    }
    Ok(roots)
}

fn read(key: &str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        key: key.to_owned(),
        path: path.to_owned(),
        source,
    })
}

/// Every certificate of a PEM file, at least one.
fn read_certificates(key: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(key, path)?;
    let chain = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::NotPem {
            key: key.to_owned(),
            path: path.to_owned(),
            detail: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            key: key.to_owned(),
            path: path.to_owned(),
        });
    }
    Ok(chain)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A certificate for localhost and its key, as PEM.
    pub fn pair(not_after_year: i32) -> (String, String) {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params.not_before = rcgen::date_time_ymd(2000, 1, 1);
        params.not_after = rcgen::date_time_ymd(not_after_year, 1, 1);
        let key = rcgen::KeyPair::generate().unwrap();
        (params.self_signed(&key).unwrap().pem(), key.serialize_pem())
    }

    pub fn files(dir: &Path, cert: &str, key: &str) -> CertFiles {
        let cert_path = dir.join("cert.pem");
        let key_path = dir.join("key.pem");
        std::fs::write(&cert_path, cert).unwrap();
        std::fs::write(&key_path, key).unwrap();
        CertFiles {
            cert_key: "ssl.cert-chain-file".into(),
            cert_path,
            key_key: "ssl.private-key-file".into(),
            key_path,
        }
    }

    fn error(files: &CertFiles) -> String {
        files.load().unwrap_err().to_string()
    }

    #[test]
    fn a_good_pair_loads() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = pair(2100);
        let loaded = files(dir.path(), &cert, &key).load().unwrap();
        assert_eq!(loaded.cert.len(), 1);
        assert_eq!(CertFiles::not_after(&loaded).unwrap(), "2100-01-01T00:00:00Z");
    }

    #[test]
    fn every_problem_names_the_key_and_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = pair(2100);
        let (_, other_key) = pair(2100);

        let mut missing = files(dir.path(), &cert, &key);
        missing.key_path = dir.path().join("nope.pem");
        let e = error(&missing);
        assert!(
            e.starts_with("ssl.private-key-file: cannot read ") && e.contains("nope.pem"),
            "{e}"
        );

        let e = error(&files(dir.path(), "hello", &key));
        assert!(
            e.starts_with("ssl.cert-chain-file: ") && e.contains("cert.pem holds no PEM certificate"),
            "{e}"
        );
        let e = error(&files(dir.path(), &cert, "hello"));
        assert!(
            e.starts_with("ssl.private-key-file: ") && e.contains("key.pem holds no PEM private key"),
            "{e}"
        );
        let broken = "-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n";
        let e = error(&files(dir.path(), broken, &key));
        assert!(
            e.starts_with("ssl.cert-chain-file: ") && e.contains("is not PEM"),
            "{e}"
        );

        let e = error(&files(dir.path(), &cert, &other_key));
        assert!(
            e.starts_with("ssl.private-key-file: the private key in ")
                && e.contains("does not match the certificate in"),
            "{e}"
        );

        let (old_cert, old_key) = pair(2001);
        let e = error(&files(dir.path(), &old_cert, &old_key));
        assert!(
            e.starts_with("ssl.cert-chain-file: the certificate in ") && e.ends_with("expired at 2001-01-01T00:00:00Z"),
            "{e}"
        );
    }

    #[test]
    fn roots_come_from_every_certificate_of_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let (a, _) = pair(2100);
        let (b, _) = pair(2100);
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, format!("{a}{b}")).unwrap();
        assert_eq!(load_roots("--ca-file", &path).unwrap().len(), 2);
        std::fs::write(&path, "").unwrap();
        assert!(
            load_roots("--ca-file", &path)
                .unwrap_err()
                .to_string()
                .contains("holds no PEM certificate")
        );
    }
}
