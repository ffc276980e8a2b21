//! The node's TLS settings checked before any child starts.
//!
//! A TLS setting that cannot be honoured stops the node with a message naming the key and the
//! file (docs/decisions/0015-tls.md): an operator who asked for TLS must never get plaintext.
//! The checks are the ones the serving process makes again when it starts ([`CertFiles::load`]),
//! made here first so that the node fails as a whole, at once, and not as a child that keeps
//! restarting.

use myelin_tls::{CertFiles, TlsError};

use crate::config::{Config, HttpSsl, Ssl};

const SSL_ENABLED: &str = "axoniq.axonserver.ssl.enabled";

/// What the node serves with TLS, from a configuration whose files were all checked.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tls {
    /// The client gRPC port's certificate.
    pub grpc: Option<CertFiles>,
    /// The HTTP port's certificate.
    pub http: Option<CertFiles>,
}

/// Why the node does not start.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    #[error(transparent)]
    Files(#[from] TlsError),
    #[error("{0}")]
    Unsupported(String),
}

/// Checks every TLS setting of `config`; `warnings` gets what is ignored and why.
pub fn check(config: &Config, warnings: &mut Vec<String>) -> Result<Tls, TlsConfigError> {
    let grpc = grpc(&config.ssl, warnings)?;
    let http = http(&config.http_ssl)?;
    for files in grpc.iter().chain(http.iter()) {
        files.load()?;
    }
    Ok(Tls { grpc, http })
}

fn grpc(ssl: &Ssl, warnings: &mut Vec<String>) -> Result<Option<CertFiles>, TlsConfigError> {
    let internal = [
        (
            "axoniq.axonserver.ssl.internal-cert-chain-file",
            &ssl.internal_cert_chain_file,
        ),
        (
            "axoniq.axonserver.ssl.internal-private-key-file",
            &ssl.internal_private_key_file,
        ),
        (
            "axoniq.axonserver.ssl.internal-trust-manager-file",
            &ssl.internal_trust_manager_file,
        ),
    ];
    if !ssl.enabled {
        let set: Vec<&str> = [
            ("axoniq.axonserver.ssl.cert-chain-file", &ssl.cert_chain_file),
            ("axoniq.axonserver.ssl.private-key-file", &ssl.private_key_file),
        ]
        .iter()
        .chain(internal.iter())
        .filter(|(_, path)| path.is_some())
        .map(|(key, _)| *key)
        .collect();
        if !set.is_empty() {
            warnings.push(format!(
                "{} set but {SSL_ENABLED} is false: the gRPC ports serve plaintext",
                set.join(", ")
            ));
        }
        return Ok(None);
    }
    if let Some((key, _)) = internal.iter().find(|(_, path)| path.is_some()) {
        return Err(TlsConfigError::Unsupported(format!(
            "{key} is set, but Myelin does not serve the internal port (node-to-node) over TLS yet; \
             remove the internal-* ssl keys to run with a plaintext internal port (keep it on a \
             private network)"
        )));
    }
    warnings.push(
        "the internal (node-to-node) port serves plaintext: Myelin has no TLS for it yet; keep it on a \
         private network"
            .to_owned(),
    );
    Ok(Some(pair(
        ("axoniq.axonserver.ssl.cert-chain-file", &ssl.cert_chain_file),
        ("axoniq.axonserver.ssl.private-key-file", &ssl.private_key_file),
        SSL_ENABLED,
    )?))
}

fn http(ssl: &HttpSsl) -> Result<Option<CertFiles>, TlsConfigError> {
    // Spring's rule: TLS is on when something names a certificate, unless switched off.
    let named = ssl.certificate.is_some() || ssl.key_store.is_some();
    if !ssl.enabled.unwrap_or(named) {
        return Ok(None);
    }
    if ssl.key_store.is_some() {
        return Err(TlsConfigError::Unsupported(
            "server.ssl.key-store is set, but Myelin reads no keystores (PKCS12, JKS): give the HTTP \
             port's certificate as PEM files with server.ssl.certificate and \
             server.ssl.certificate-private-key"
                .to_owned(),
        ));
    }
    Ok(Some(pair(
        ("server.ssl.certificate", &ssl.certificate),
        ("server.ssl.certificate-private-key", &ssl.certificate_private_key),
        "server.ssl.enabled",
    )?))
}

fn pair(
    (cert_key, cert): (&str, &Option<std::path::PathBuf>),
    (key_key, key): (&str, &Option<std::path::PathBuf>),
    needed_by: &str,
) -> Result<CertFiles, TlsError> {
    let set = |name: &str, path: &Option<std::path::PathBuf>| {
        path.clone().ok_or_else(|| TlsError::NotSet {
            key: name.to_owned(),
            needed_by: needed_by.to_owned(),
        })
    };
    Ok(CertFiles {
        cert_path: set(cert_key, cert)?,
        cert_key: cert_key.to_owned(),
        key_path: set(key_key, key)?,
        key_key: key_key.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn grpc_ssl(cert: Option<&str>, key: Option<&str>) -> Ssl {
        Ssl {
            enabled: true,
            cert_chain_file: cert.map(PathBuf::from),
            private_key_file: key.map(PathBuf::from),
            ..Ssl::default()
        }
    }

    #[test]
    fn enabled_without_files_names_the_missing_key() {
        let e = grpc(&grpc_ssl(None, Some("/k")), &mut Vec::new())
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "axoniq.axonserver.ssl.cert-chain-file must be set when axoniq.axonserver.ssl.enabled is true"
        );
        let e = grpc(&grpc_ssl(Some("/c"), None), &mut Vec::new())
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("axoniq.axonserver.ssl.private-key-file must be set"),
            "{e}"
        );
    }

    #[test]
    fn internal_tls_is_refused_rather_than_ignored() {
        let mut ssl = grpc_ssl(Some("/c"), Some("/k"));
        ssl.internal_trust_manager_file = Some("/t".into());
        let e = grpc(&ssl, &mut Vec::new()).unwrap_err().to_string();
        assert!(
            e.starts_with("axoniq.axonserver.ssl.internal-trust-manager-file is set"),
            "{e}"
        );
    }

    #[test]
    fn files_without_enabled_are_a_warning() {
        let mut warnings = Vec::new();
        let mut ssl = grpc_ssl(Some("/c"), None);
        ssl.enabled = false;
        assert_eq!(grpc(&ssl, &mut warnings).unwrap(), None);
        assert!(warnings[0].contains("ssl.cert-chain-file set but"), "{warnings:?}");
    }

    #[test]
    fn http_follows_springs_rule_and_refuses_keystores() {
        assert_eq!(http(&HttpSsl::default()).unwrap(), None);
        let pem = HttpSsl {
            certificate: Some("/c".into()),
            certificate_private_key: Some("/k".into()),
            ..HttpSsl::default()
        };
        assert_eq!(http(&pem).unwrap().unwrap().cert_path, PathBuf::from("/c"));
        let off = HttpSsl {
            enabled: Some(false),
            ..pem.clone()
        };
        assert_eq!(http(&off).unwrap(), None);
        let store = HttpSsl {
            key_store: Some("classpath:keystore.p12".into()),
            ..HttpSsl::default()
        };
        assert!(http(&store).unwrap_err().to_string().contains("reads no keystores"));
        let bare = HttpSsl {
            enabled: Some(true),
            ..HttpSsl::default()
        };
        assert!(
            http(&bare)
                .unwrap_err()
                .to_string()
                .starts_with("server.ssl.certificate must be set")
        );
    }
}
