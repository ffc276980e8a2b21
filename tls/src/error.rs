//! Why a TLS setting cannot be honoured. Every message names the configuration key and the file,
//! because it is what an operator reads when the node refuses to start or keeps an old
//! certificate.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{key} must be set when {needed_by} is true")]
    NotSet { key: String, needed_by: String },
    #[error("{key}: cannot read {}: {source}", path.display())]
    Read {
        key: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{key}: {} is not PEM: {detail}", path.display())]
    NotPem { key: String, path: PathBuf, detail: String },
    #[error("{key}: {} holds no PEM certificate (-----BEGIN CERTIFICATE-----)", path.display())]
    NoCertificate { key: String, path: PathBuf },
    #[error(
        "{key}: {} holds no PEM private key (PKCS#8 \"PRIVATE KEY\", PKCS#1 \"RSA PRIVATE KEY\" or SEC1 \"EC PRIVATE KEY\")",
        path.display()
    )]
    NoKey { key: String, path: PathBuf },
    #[error("{key}: the private key in {} cannot be used: {detail}", path.display())]
    BadKey { key: String, path: PathBuf, detail: String },
    #[error(
        "{key_key}: the private key in {} does not match the certificate in {} ({cert_key})",
        key_path.display(),
        cert_path.display()
    )]
    KeyMismatch {
        key_key: String,
        key_path: PathBuf,
        cert_key: String,
        cert_path: PathBuf,
    },
    #[error("{key}: the certificate in {} cannot be parsed as X.509", path.display())]
    BadCertificate { key: String, path: PathBuf },
    #[error("{key}: the certificate in {} expired at {not_after}", path.display())]
    Expired {
        key: String,
        path: PathBuf,
        not_after: String,
    },
    #[error("{key}: the certificate in {} is not valid before {not_before}", path.display())]
    NotYetValid {
        key: String,
        path: PathBuf,
        not_before: String,
    },
}

/// Why a port cannot serve TLS: its certificate, or the watch that keeps it current.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Certificate(#[from] TlsError),
    #[error("cannot watch for SIGHUP to reload the certificate: {0}")]
    Signals(#[from] std::io::Error),
}
