//! Placeholder: the backup agent arrives with the admin/backup issue (#4).
//! It exits non-zero so that nobody mistakes it for a working backup.

fn main() -> std::process::ExitCode {
    eprintln!("myelin-backup-agent: not implemented yet (see issue #4)");
    std::process::ExitCode::from(2)
}
