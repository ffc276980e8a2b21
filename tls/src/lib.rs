//! TLS for Myelin's network ports, with rustls and PEM files only.
//!
//! What this layer guarantees:
//! - A certificate is only ever served after it was checked: the files exist and are readable,
//!   hold PEM, the key matches the first certificate of the chain, and that certificate is valid
//!   now. Every failure names the configuration key and the file ([`TlsError`]), so the
//!   supervisor can refuse to start with a message an operator can act on. There is no
//!   plaintext fallback anywhere: a port configured for TLS serves TLS or nothing.
//! - The certificate can be replaced while the port serves ([`ReloadingCert`]): a reload that
//!   fails keeps the certificate in use and says why; connections already open keep the
//!   certificate they were opened with.
//! - A slow or hostile client cannot stall the port: handshakes run concurrently, bounded in
//!   number and time ([`incoming`]).
//!
//! See docs/decisions/0015-tls.md for why rustls, why PEM only and how reloads work.

mod error;
mod files;
mod incoming;
mod reload;
mod validity;

pub use error::{ServeError, TlsError};
pub use files::{CertFiles, load_roots};
pub use incoming::{TlsConnection, incoming};
pub use reload::{ReloadingCert, keep_current};

/// ALPN protocols of a gRPC port: HTTP/2 only (grpc-core refuses a server that selects none).
pub const ALPN_GRPC: &[&[u8]] = &[b"h2"];
/// ALPN protocols of the HTTP port.
pub const ALPN_HTTP: &[&[u8]] = &[b"h2", b"http/1.1"];

/// The crypto provider everything here uses: ring, as the rest of the tree (ureq) does.
pub fn provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::ring::default_provider())
}

/// A server configuration that serves `cert`'s current certificate, offering `alpn`.
pub fn server_config(cert: std::sync::Arc<ReloadingCert>, alpn: &[&[u8]]) -> std::sync::Arc<rustls::ServerConfig> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_no_client_auth()
        .with_cert_resolver(cert);
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    std::sync::Arc::new(config)
}

/// The server configuration of a port that serves the certificate in `files`, offering `alpn`:
/// loaded and checked now (a file that cannot be used fails here, before the port serves), and
/// kept current from then on (SIGHUP, or a change of the files).
pub fn reloading_server_config(
    files: CertFiles,
    alpn: &[&[u8]],
) -> Result<std::sync::Arc<rustls::ServerConfig>, ServeError> {
    let cert = ReloadingCert::load(files)?;
    keep_current(vec![cert.clone()])?;
    Ok(server_config(cert, alpn))
}
