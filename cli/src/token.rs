//! Which access token a command sends.
//!
//! In order: `-t`/`--token` or `$MYELIN_TOKEN` (clap resolves both); the file named by
//! `$MYELIN_TOKEN_FILE`; and, only when the server is on this machine (a loopback URL), the
//! node's system token file where Axon Server's CLI looks for it: `./security/.token` (relative
//! to the working directory, as when run from where the node was started), then
//! `/var/lib/myelin/security/.token` (the service's data directory in the documented install).
//!
//! A token file found on this machine is never offered to another host: the URL decides. An
//! explicitly named file that cannot be read is an error; the implicit ones are skipped when
//! absent or unreadable (the user may simply not run with access control).

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::failure::Failure;

/// Environment variable naming a file that holds the token.
pub const TOKEN_FILE_ENV: &str = "MYELIN_TOKEN_FILE";
/// Token files looked for when the server is on this machine, in order.
pub const LOCAL_TOKEN_FILES: &[&str] = &["security/.token", "/var/lib/myelin/security/.token"];
/// A token file larger than this is not a token file.
const MAX_TOKEN_FILE: u64 = 4096;

/// Picks the token: `given` (flag or `$MYELIN_TOKEN`) first, then `token_file` (from
/// `$MYELIN_TOKEN_FILE`), then `local_files` when `server_is_local`.
pub fn resolve(
    given: Option<String>,
    token_file: Option<PathBuf>,
    server_is_local: bool,
    local_files: &[PathBuf],
) -> Result<Option<String>, Failure> {
    if let Some(token) = given {
        return Ok(Some(token));
    }
    if let Some(path) = token_file {
        return match read_token(&path) {
            Ok(Some(token)) => Ok(Some(token)),
            Ok(None) => Err(Failure::Usage(format!(
                "the token file {} ({TOKEN_FILE_ENV}) is empty",
                path.display()
            ))),
            Err(e) => Err(Failure::Usage(format!(
                "cannot read the token file {} ({TOKEN_FILE_ENV}): {e}",
                path.display()
            ))),
        };
    }
    if server_is_local {
        for path in local_files {
            if let Ok(Some(token)) = read_token(path) {
                return Ok(Some(token));
            }
        }
    }
    Ok(None)
}

/// The default local token files, relative ones taken against the working directory.
pub fn local_files() -> Vec<PathBuf> {
    LOCAL_TOKEN_FILES.iter().map(PathBuf::from).collect()
}

/// The file's first line, trimmed; `None` when that is empty.
fn read_token(path: &Path) -> std::io::Result<Option<String>> {
    let mut text = String::new();
    std::fs::File::open(path)?
        .take(MAX_TOKEN_FILE + 1)
        .read_to_string(&mut text)?;
    if text.len() as u64 > MAX_TOKEN_FILE {
        return Err(std::io::Error::other(format!("larger than {MAX_TOKEN_FILE} bytes")));
    }
    let token = text.lines().next().unwrap_or_default().trim();
    Ok((!token.is_empty()).then(|| token.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_of_sources() {
        let dir = tempfile::tempdir().unwrap();
        let explicit = dir.path().join("explicit");
        std::fs::write(&explicit, "from-env-file\n").unwrap();
        let local = dir.path().join(".token");
        std::fs::write(&local, "  from-local-file  \nsecond line ignored\n").unwrap();
        let missing = dir.path().join("missing");
        let locals = vec![missing.clone(), local.clone()];

        assert_eq!(
            resolve(Some("given".into()), Some(explicit.clone()), true, &locals).unwrap(),
            Some("given".into())
        );
        assert_eq!(
            resolve(None, Some(explicit), true, &locals).unwrap(),
            Some("from-env-file".into())
        );
        assert_eq!(
            resolve(None, None, true, &locals).unwrap(),
            Some("from-local-file".into())
        );
        assert_eq!(
            resolve(None, None, false, &locals).unwrap(),
            None,
            "never offered to another host"
        );
        assert_eq!(resolve(None, None, true, std::slice::from_ref(&missing)).unwrap(), None);
    }

    #[test]
    fn a_named_file_must_be_readable_and_hold_a_token() {
        let dir = tempfile::tempdir().unwrap();
        let err = resolve(None, Some(dir.path().join("nope")), true, &[]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("nope"), "{err}");
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n").unwrap();
        assert!(
            resolve(None, Some(empty), true, &[])
                .unwrap_err()
                .to_string()
                .contains("empty")
        );
        let huge = dir.path().join("huge");
        std::fs::write(&huge, "x".repeat(10_000)).unwrap();
        assert!(resolve(None, Some(huge), true, &[]).is_err());
    }
}
