//! HTTPS to the admin API: Axon's `-s/--https` and `-i/--insecure-ssl`, and a CA file.
//!
//! Without `--ca-file` the server's certificate is checked against the Mozilla roots built into
//! the tool (ureq's), which a node with a certificate from a private CA will not pass; `-i`
//! skips the check altogether (the connection is encrypted, but anyone in the middle can read
//! it) and says so on stderr.

use std::path::PathBuf;
use std::sync::Arc;

use ureq::tls::{PemItem, RootCerts, TlsConfig};

use crate::failure::Failure;

/// How to talk TLS to the server.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Use `https://` even when the server URL says `http://`.
    pub https: bool,
    /// Do not verify the server's certificate.
    pub insecure: bool,
    /// PEM file of the CA certificates the server's certificate must chain to.
    pub ca_file: Option<PathBuf>,
}

impl Options {
    /// `base` with `https://` when `--https` asks for it.
    pub fn apply_scheme(&self, base: String) -> String {
        match base.strip_prefix("http://") {
            Some(rest) if self.https => format!("https://{rest}"),
            _ => base,
        }
    }

    /// The TLS configuration of every request.
    pub fn config(&self) -> Result<TlsConfig, Failure> {
        let mut config = TlsConfig::builder();
        if let Some(path) = &self.ca_file {
            let pem = std::fs::read(path)
                .map_err(|e| Failure::Usage(format!("--ca-file: cannot read {}: {e}", path.display())))?;
            let mut certificates = Vec::new();
            for item in ureq::tls::parse_pem(&pem) {
                match item {
                    Ok(PemItem::Certificate(certificate)) => certificates.push(certificate),
                    Ok(_) => {}
                    Err(e) => {
                        return Err(Failure::Usage(format!("--ca-file: {} is not PEM: {e}", path.display())));
                    }
                }
            }
            if certificates.is_empty() {
                return Err(Failure::Usage(format!(
                    "--ca-file: {} holds no PEM certificate",
                    path.display()
                )));
            }
            config = config.root_certs(RootCerts::Specific(Arc::new(certificates)));
        }
        if self.insecure {
            eprintln!("warning: -i/--insecure-ssl: the server's certificate is not verified");
            config = config.disable_verification(true);
        }
        Ok(config.build())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn https_changes_only_an_http_url() {
        let https = Options {
            https: true,
            ..Options::default()
        };
        assert_eq!(https.apply_scheme("http://h:8024".into()), "https://h:8024");
        assert_eq!(https.apply_scheme("https://h:8024".into()), "https://h:8024");
        assert_eq!(Options::default().apply_scheme("http://h".into()), "http://h");
    }

    #[test]
    fn a_ca_file_without_certificates_is_a_usage_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, "nothing here").unwrap();
        let options = Options {
            ca_file: Some(path),
            ..Options::default()
        };
        let e = options.config().unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("holds no PEM certificate"), "{e}");
        let missing = Options {
            ca_file: Some(dir.path().join("missing.pem")),
            ..Options::default()
        };
        assert!(
            missing
                .config()
                .unwrap_err()
                .to_string()
                .starts_with("--ca-file: cannot read")
        );
    }
}
