//! `myelin-backup-agent`: takes, checks and restores backups of a Myelin node, for cron or a
//! systemd timer. It talks only to the node's admin HTTP API and copies the files it names (it
//! runs on the node's host); it never writes into the node's data directory, except `restore`,
//! whose job that is, on a stopped node. See docs/backups.md.
//!
//! Exit codes: 0 done (verify: the set is complete and whole); 1 failed (the message says why);
//! 2 bad command line; 3 not now, a later run may succeed: the node could not be reached or did
//! not answer (as `myelin-cli`'s 3), or the backup set is incomplete (no manifest: a backup did
//! not finish or is running); 4 the backup set is damaged (a file is missing or differs from the
//! manifest).

mod backup;
mod client;
mod files;
mod progress;
mod restore;
mod set;
mod verify;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

const EXIT_FAILED: u8 = 1;
/// Not now, a later run may succeed: the node is unreachable, or the set incomplete or busy.
const EXIT_NOT_NOW: u8 = 3;
const EXIT_DAMAGED: u8 = 4;

#[derive(Parser)]
#[command(
    name = "myelin-backup-agent",
    version,
    about = "Takes, checks and restores backups of a Myelin node"
)]
struct Cli {
    /// No progress output, even on a terminal (errors are still printed).
    #[arg(long, short, global = true)]
    quiet: bool,
    /// Print a JSON summary on stdout.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Backs the node up into a backup set: control DB, then Raft logs, then snapshot and event
    /// segments (incremental for closed segments), then the manifest.
    Backup {
        /// The node's admin HTTP API.
        #[arg(long, short = 'S', env = "MYELIN_SERVER", default_value = "http://localhost:8024")]
        server: String,
        /// The backup set's directory (created if missing); must be outside the node's data
        /// directory.
        #[arg(long)]
        dest: PathBuf,
        /// A context to back up (repeatable); default: every context of the node.
        #[arg(long = "context", short = 'c')]
        contexts: Vec<String>,
        /// Access token (sent as `AxonIQ-Access-Token`), needed when access control is on.
        #[arg(long, short = 't', env = "MYELIN_TOKEN", hide_env_values = true)]
        token: Option<String>,
        #[command(flatten)]
        tls: client::Tls,
    },
    /// Checks that a backup set is complete and every file matches its manifest.
    Verify {
        /// The backup set's directory.
        dir: PathBuf,
    },
    /// Rebuilds a stopped node's data directory from a backup set.
    Restore {
        /// The backup set's directory.
        dir: PathBuf,
        /// The node's data directory (`axoniq.axonserver.event.storage`).
        #[arg(long)]
        data: PathBuf,
        /// Where the node keeps its control DB, when not in the default place
        /// (`<data>/_admin/myelin-controldb.sqlite3`).
        #[arg(long)]
        control_db: Option<PathBuf>,
        /// Restore into a data directory that is not empty, moving what it holds aside into
        /// `<data>/.pre-restore-<millis>/`.
        #[arg(long)]
        force: bool,
        /// Restore a member of a cluster of several nodes. Refused without this flag: one member
        /// restored while the others run would go back in time under them. Only when every node
        /// of the cluster is stopped and each is restored from its own backup.
        #[arg(long)]
        whole_cluster: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut progress = progress::Progress::new(cli.quiet);
    match run(cli.command, cli.json, &mut progress) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            progress.finish();
            eprintln!("myelin-backup-agent: error: {e:#}");
            let not_now = e.chain().any(|cause| {
                cause.is::<restore::Incomplete>() || cause.is::<set::Busy>() || cause.is::<client::Unreachable>()
            });
            if not_now {
                ExitCode::from(EXIT_NOT_NOW)
            } else {
                ExitCode::from(EXIT_FAILED)
            }
        }
    }
}

fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn run(command: Command, json: bool, progress: &mut progress::Progress) -> anyhow::Result<u8> {
    match command {
        Command::Backup {
            server,
            dest,
            contexts,
            token,
            tls,
        } => {
            let summary = backup::run(
                backup::Options {
                    server,
                    dest,
                    contexts,
                    token,
                    tls,
                },
                progress,
            )?;
            if json {
                print_json(&summary)?;
            } else {
                progress.step(&format!(
                    "backup complete in {}: {} files copied ({}), {} files in the set",
                    summary.dest,
                    summary.files_copied,
                    progress::human(summary.bytes_copied),
                    summary.files_in_set
                ));
            }
            Ok(0)
        }
        Command::Verify { dir } => {
            let verdict = verify::verify(&dir, progress)?;
            if json {
                print_json(&verdict)?;
            }
            Ok(match verdict {
                verify::Verdict::Ok { files, bytes } => {
                    if !json {
                        println!(
                            "{}: complete, {files} files ({}) match the manifest",
                            dir.display(),
                            progress::human(bytes)
                        );
                    }
                    0
                }
                verify::Verdict::Incomplete { reason } => {
                    eprintln!("myelin-backup-agent: INCOMPLETE: {reason}");
                    EXIT_NOT_NOW
                }
                verify::Verdict::Damaged { problems } => {
                    for problem in &problems {
                        eprintln!("myelin-backup-agent: DAMAGED: {problem}");
                    }
                    EXIT_DAMAGED
                }
            })
        }
        Command::Restore {
            dir,
            data,
            control_db,
            force,
            whole_cluster,
        } => {
            let summary = restore::restore(
                restore::Options {
                    backup: dir,
                    data,
                    control_db,
                    force,
                    whole_cluster,
                },
                progress,
            )?;
            if json {
                print_json(&summary)?;
            } else {
                println!(
                    "restored {} files ({}) of contexts {} into {}; start the node to recover them",
                    summary.files,
                    progress::human(summary.bytes),
                    summary.contexts.join(", "),
                    summary.data
                );
            }
            Ok(0)
        }
    }
}
