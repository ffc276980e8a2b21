//! The command line, in the manner of Axon Server's `axonserver-cli`: one sub-command per
//! operation, the connection options (`-S`, `-t`, `-o`/`--json`) accepted before or after it.
//!
//! Everything a user types is checked here, before any request is sent: a name the server would
//! refuse, a role without a name or a token too short to be a token is a usage error (exit code
//! 2) and nothing reaches the server. The checks mirror the admin API's own, so the server
//! remains the authority and this only saves a round trip and gives a clearer message.

use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::failure::Failure;

/// Longest context name (a directory name on the node).
pub const MAX_CONTEXT_LEN: usize = 64;
/// Longest application name.
pub const MAX_APPLICATION_LEN: usize = 128;
/// Longest node name.
pub const MAX_NODE_LEN: usize = 255;
/// Longest role name.
pub const MAX_ROLE_LEN: usize = 64;
/// Longest application description accepted.
pub const MAX_DESCRIPTION_LEN: usize = 1024;
/// Shortest and longest application token accepted with `-T`.
pub const MIN_TOKEN_LEN: usize = 16;
pub const MAX_TOKEN_LEN: usize = 512;

/// Manage a Myelin node through its admin HTTP API (like Axon Server's axonserver-cli).
///
/// Exit codes: 0 done; 1 the server refused the request (or answered something unexpected);
/// 2 invalid usage (nothing was sent); 3 the server could not be reached.
#[derive(Parser, Debug)]
#[command(name = "myelin-cli", version, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

/// Options of every command.
#[derive(Args, Debug)]
#[command(next_help_heading = "Global options")]
pub struct Global {
    /// The node's admin HTTP address
    #[arg(
        short = 'S',
        long = "server",
        value_name = "URL",
        global = true,
        env = "MYELIN_SERVER",
        default_value = "http://localhost:8024"
    )]
    pub server: String,
    /// Access token, sent as the AxonIQ-Access-Token header [default: read from $MYELIN_TOKEN_FILE,
    /// or on the node itself from ./security/.token or /var/lib/myelin/security/.token]
    #[arg(
        short = 't',
        long = "token",
        global = true,
        env = "MYELIN_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
    /// Output format
    #[arg(short = 'o', long = "output", value_name = "FORMAT", global = true, value_enum)]
    pub output: Option<Format>,
    /// Machine-readable JSON output (same as -o json)
    #[arg(long, global = true)]
    pub json: bool,
    /// Use HTTPS, even when the server URL says http:// (as axonserver-cli's -s)
    #[arg(short = 's', long = "https", global = true)]
    pub https: bool,
    /// Do not verify the server's TLS certificate (as axonserver-cli's -i)
    #[arg(short = 'i', long = "insecure-ssl", global = true)]
    pub insecure_ssl: bool,
    /// PEM file of the CA certificates the server's TLS certificate must chain to [default: the
    /// Mozilla roots built into this tool]
    #[arg(long = "ca-file", value_name = "FILE", global = true, env = "MYELIN_CA_FILE")]
    pub ca_file: Option<std::path::PathBuf>,
    /// Seconds to wait for the server's answer
    #[arg(long, value_name = "SECONDS", global = true, default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub timeout: u64,
}

impl Global {
    pub fn format(&self) -> Format {
        if self.json {
            Format::Json
        } else {
            self.output.unwrap_or(Format::Txt)
        }
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout)
    }

    pub fn tls(&self) -> crate::tls::Options {
        crate::tls::Options {
            https: self.https,
            insecure: self.insecure_ssl,
            ca_file: self.ca_file.clone(),
        }
    }
}

/// How results are printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Tables and sentences for people (Axon's `txt`)
    #[value(alias = "table", alias = "text")]
    Txt,
    /// JSON for scripts
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// List contexts with their member nodes and roles
    Contexts,
    /// Create a context
    RegisterContext(RegisterContext),
    /// Delete a context and (unless --preserve-event-store) its events and snapshots
    DeleteContext(DeleteContext),
    /// List the cluster's nodes
    Nodes,
    /// Make this node a cluster of its own with `_admin` and a first context (Axon's init-cluster)
    InitCluster(InitCluster),
    /// List the cluster's nodes (Axon's `cluster`)
    Cluster,
    /// Make the node at --server join the cluster that the node at -h belongs to
    RegisterNode(RegisterNode),
    /// Remove a node from the cluster (it leaves every context it serves)
    UnregisterNode(UnregisterNode),
    /// Make a node a member of a context (it catches up in the background)
    AddNodeToContext(AddNodeToContext),
    /// Remove a node from a context's members
    DeleteNodeFromContext(DeleteNodeFromContext),
    /// Register an application and print its access token (shown only once)
    RegisterApplication(RegisterApplication),
    /// List registered applications with their roles per context
    Applications,
    /// Delete an application; its token stops working
    DeleteApplication(DeleteApplication),
    /// Back up the control DB into a zip file on the node and print its path
    BackupControlDb,
}

#[derive(Args, Debug)]
pub struct RegisterContext {
    /// Name of the new context
    #[arg(short = 'c', long = "context", value_name = "NAME")]
    pub context: String,
    /// Nodes that store the context as PRIMARY members (comma-separated) [default: chosen by
    /// the server]
    #[arg(short = 'n', long = "nodes", value_name = "NODES", value_delimiter = ',')]
    pub primaries: Vec<String>,
    /// Nodes that are ACTIVE_BACKUP members (comma-separated)
    #[arg(short = 'a', long = "active-backup", value_name = "NODES", value_delimiter = ',')]
    pub active_backups: Vec<String>,
    /// Nodes that are PASSIVE_BACKUP members (comma-separated)
    #[arg(short = 'p', long = "passive-backup", value_name = "NODES", value_delimiter = ',')]
    pub passive_backups: Vec<String>,
    /// Nodes that are MESSAGING_ONLY members (comma-separated)
    #[arg(short = 'm', long = "messaging-only", value_name = "NODES", value_delimiter = ',')]
    pub messaging_only: Vec<String>,
}

/// `-h` names the cluster node, as in Axon's CLI, so help is `--help` only.
#[derive(Args, Debug)]
#[command(disable_help_flag = true)]
pub struct RegisterNode {
    /// Internal host name of a node of the cluster to join
    #[arg(short = 'h', long = "internal-host", value_name = "HOST")]
    pub internal_host: String,
    /// That node's internal port
    #[arg(short = 'p', long = "internal-port", value_name = "PORT", default_value_t = 8224)]
    pub internal_port: u16,
    /// Serve only this context [default: every context of the cluster]
    #[arg(short = 'c', long = "context", value_name = "NAME", conflicts_with = "no_contexts")]
    pub context: Option<String>,
    /// Serve no context (only `_admin`)
    #[arg(long = "no-contexts")]
    pub no_contexts: bool,
    /// Print help
    #[arg(long, action = clap::ArgAction::Help)]
    pub help: Option<bool>,
}

#[derive(Args, Debug)]
pub struct UnregisterNode {
    /// Name of the node to remove
    #[arg(short = 'n', long = "node", value_name = "NODE")]
    pub node: String,
}

#[derive(Args, Debug)]
pub struct AddNodeToContext {
    /// The context
    #[arg(short = 'c', long = "context", value_name = "NAME")]
    pub context: String,
    /// The node to add
    #[arg(short = 'n', long = "node", value_name = "NODE")]
    pub node: String,
    /// Its role: PRIMARY, ACTIVE_BACKUP, PASSIVE_BACKUP or MESSAGING_ONLY
    #[arg(short = 'r', long = "role", value_name = "ROLE", default_value = "PRIMARY")]
    pub role: String,
}

#[derive(Args, Debug)]
pub struct DeleteNodeFromContext {
    /// The context
    #[arg(short = 'c', long = "context", value_name = "NAME")]
    pub context: String,
    /// The node to remove
    #[arg(short = 'n', long = "node", value_name = "NODE")]
    pub node: String,
    /// Keep the node's copy of the context on its disk (set aside)
    #[arg(long = "preserve-event-store")]
    pub preserve_event_store: bool,
}

#[derive(Args, Debug)]
pub struct InitCluster {
    /// The first context besides `_admin` [default: default]
    #[arg(short = 'c', long = "context", value_name = "NAME")]
    pub context: Option<String>,
}

#[derive(Args, Debug)]
pub struct DeleteContext {
    /// Name of the context to delete
    #[arg(short = 'c', long = "context", value_name = "NAME")]
    pub context: String,
    /// Keep the context's event and snapshot files on disk
    #[arg(long = "preserve-event-store")]
    pub preserve_event_store: bool,
}

#[derive(Args, Debug)]
pub struct RegisterApplication {
    /// Name of the application
    #[arg(short = 'a', long = "application", value_name = "NAME")]
    pub application: String,
    /// Description shown in listings
    #[arg(short = 'd', long = "description", value_name = "TEXT")]
    pub description: Option<String>,
    /// Roles, comma-separated, each ROLE@CONTEXT (a ROLE alone applies to every context, "*")
    #[arg(
        short = 'r',
        long = "roles",
        value_name = "ROLES",
        value_delimiter = ',',
        required = true
    )]
    pub roles: Vec<String>,
    /// Use this token instead of a generated one (16 to 512 printable characters)
    #[arg(short = 'T', long = "app-token", value_name = "TOKEN")]
    pub app_token: Option<String>,
}

#[derive(Args, Debug)]
pub struct DeleteApplication {
    /// Name of the application to delete
    #[arg(short = 'a', long = "application", value_name = "NAME")]
    pub application: String,
}

/// A context member's role, as Axon names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemberRole {
    Primary,
    ActiveBackup,
    PassiveBackup,
    MessagingOnly,
}

impl MemberRole {
    pub fn as_str(self) -> &'static str {
        match self {
            MemberRole::Primary => "PRIMARY",
            MemberRole::ActiveBackup => "ACTIVE_BACKUP",
            MemberRole::PassiveBackup => "PASSIVE_BACKUP",
            MemberRole::MessagingOnly => "MESSAGING_ONLY",
        }
    }
}

impl RegisterContext {
    /// The members named on the command line, each once, in the order given.
    pub fn members(&self) -> Result<Vec<(String, MemberRole)>, Failure> {
        let mut members: Vec<(String, MemberRole)> = Vec::new();
        let lists = [
            (&self.primaries, MemberRole::Primary),
            (&self.active_backups, MemberRole::ActiveBackup),
            (&self.passive_backups, MemberRole::PassiveBackup),
            (&self.messaging_only, MemberRole::MessagingOnly),
        ];
        for (names, role) in lists {
            for name in names {
                let name = name.trim();
                check_node(name)?;
                if let Some((_, other)) = members.iter().find(|(n, _)| n == name) {
                    return Err(Failure::Usage(format!(
                        "node {name:?} is named twice (as {} and {})",
                        other.as_str(),
                        role.as_str()
                    )));
                }
                members.push((name.to_string(), role));
            }
        }
        Ok(members)
    }
}

/// Roles of an application in one context.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContextRoles {
    /// A context name, or `*` for every context.
    pub context: String,
    pub roles: Vec<String>,
}

impl RegisterApplication {
    /// The roles grouped per context, contexts in the order first named, no role twice.
    pub fn roles_per_context(&self) -> Result<Vec<ContextRoles>, Failure> {
        let mut grouped: Vec<ContextRoles> = Vec::new();
        for spec in &self.roles {
            let (role, context) = parse_role(spec)?;
            match grouped.iter_mut().find(|g| g.context == context) {
                Some(group) if group.roles.contains(&role) => {}
                Some(group) => group.roles.push(role),
                None => grouped.push(ContextRoles {
                    context,
                    roles: vec![role],
                }),
            }
        }
        if grouped.is_empty() {
            return Err(Failure::Usage("give at least one role with -r ROLE@CONTEXT".into()));
        }
        Ok(grouped)
    }

    pub fn check(&self) -> Result<(), Failure> {
        check_application(&self.application)?;
        if let Some(description) = &self.description
            && description.chars().count() > MAX_DESCRIPTION_LEN
        {
            return Err(Failure::Usage(format!(
                "the description is longer than {MAX_DESCRIPTION_LEN} characters"
            )));
        }
        if let Some(token) = &self.app_token {
            let len = token.chars().count();
            if !(MIN_TOKEN_LEN..=MAX_TOKEN_LEN).contains(&len) || !token.chars().all(|c| c.is_ascii_graphic()) {
                return Err(Failure::Usage(format!(
                    "an application token (-T) must be {MIN_TOKEN_LEN} to {MAX_TOKEN_LEN} printable ASCII \
                     characters without spaces"
                )));
            }
        }
        Ok(())
    }
}

/// Splits `ROLE@CONTEXT` (or a bare `ROLE`, meaning every context) and normalises the role's case.
pub fn parse_role(spec: &str) -> Result<(String, String), Failure> {
    let spec = spec.trim();
    let (role, context) = match spec.split_once('@') {
        Some((role, context)) => (role, context),
        None => (spec, "*"),
    };
    if role.is_empty()
        || role.len() > MAX_ROLE_LEN
        || !role.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        || role.starts_with(|c: char| c.is_ascii_digit())
    {
        return Err(Failure::Usage(format!(
            "invalid role {spec:?}: write ROLE@CONTEXT, e.g. READ_EVENTS@default (role names are \
             letters, digits and '_')"
        )));
    }
    if context != "*" {
        check_context(context).map_err(|e| Failure::Usage(format!("invalid role {spec:?}: {e}")))?;
    }
    Ok((role.to_ascii_uppercase(), context.to_string()))
}

/// A context name as the admin API accepts it (and safe in a URL path): 1 to 64 letters,
/// digits, `-`, `_` or `.`, not starting with `.`.
pub fn check_context(name: &str) -> Result<(), Failure> {
    check_simple("context", name, MAX_CONTEXT_LEN)?;
    if name.starts_with('.') {
        return Err(Failure::Usage(format!(
            "the context name {name:?} must not start with '.'"
        )));
    }
    Ok(())
}

/// A context that may be created or deleted: not one of the system's (`_admin`, any `_` name).
pub fn check_user_context(name: &str) -> Result<(), Failure> {
    check_context(name)?;
    if name.starts_with('_') {
        return Err(Failure::Usage(format!(
            "the context name {name:?} starts with '_': such contexts are the system's own"
        )));
    }
    Ok(())
}

/// An application name: 1 to 128 letters, digits, `-`, `_` or `.` (not `.` or `..`, which
/// mean something else in a URL path).
pub fn check_application(name: &str) -> Result<(), Failure> {
    check_simple("application", name, MAX_APPLICATION_LEN)?;
    if name == "." || name == ".." {
        return Err(Failure::Usage(format!("{name:?} is not an application name")));
    }
    Ok(())
}

/// A node name: 1 to 255 characters without control characters.
pub fn check_node(name: &str) -> Result<(), Failure> {
    if name.is_empty() || name.chars().count() > MAX_NODE_LEN || name.chars().any(char::is_control) {
        return Err(Failure::Usage(format!(
            "invalid node name {name:?}: 1 to {MAX_NODE_LEN} characters, no control characters"
        )));
    }
    Ok(())
}

fn check_simple(what: &str, name: &str, max: usize) -> Result<(), Failure> {
    if name.is_empty() {
        return Err(Failure::Usage(format!("the {what} name is empty")));
    }
    if name.chars().count() > max {
        return Err(Failure::Usage(format!(
            "the {what} name {name:?} is longer than {max} characters"
        )));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(Failure::Usage(format!(
            "the {what} name {name:?} may contain only letters, digits, '-', '_' and '.'"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("myelin-cli").chain(args.iter().copied()))
    }

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn global_options_go_before_or_after_the_command() {
        let before = parse(&["-S", "http://h:1", "-t", "tok", "--json", "contexts"]).unwrap();
        let after = parse(&["contexts", "-S", "http://h:1", "-t", "tok", "-o", "json"]).unwrap();
        for cli in [before, after] {
            assert_eq!(cli.global.server, "http://h:1");
            assert_eq!(cli.global.token.as_deref(), Some("tok"));
            assert_eq!(cli.global.format(), Format::Json);
            assert!(matches!(cli.command, Command::Contexts));
        }
    }

    #[test]
    fn defaults_are_axons() {
        // The environment may carry MYELIN_SERVER in a developer's shell; clap reads it.
        if std::env::var_os("MYELIN_SERVER").is_some() || std::env::var_os("MYELIN_TOKEN").is_some() {
            return;
        }
        let cli = parse(&["nodes"]).unwrap();
        assert_eq!(cli.global.server, "http://localhost:8024");
        assert_eq!(cli.global.token, None);
        assert_eq!(cli.global.format(), Format::Txt);
        assert_eq!(cli.global.timeout(), Duration::from_secs(30));
        assert_eq!(parse(&["nodes", "-o", "txt"]).unwrap().global.format(), Format::Txt);
        assert_eq!(parse(&["nodes", "-o", "table"]).unwrap().global.format(), Format::Txt);
        assert!(parse(&["nodes", "-o", "yaml"]).is_err());
        assert!(parse(&["nodes", "--timeout", "0"]).is_err());
    }

    #[test]
    fn register_context_takes_comma_lists_per_role() {
        let cli = parse(&["register-context", "-c", "orders", "-n", "a,b", "-p", "c"]).unwrap();
        let Command::RegisterContext(args) = cli.command else {
            panic!()
        };
        assert_eq!(args.context, "orders");
        assert_eq!(
            args.members().unwrap(),
            vec![
                ("a".to_string(), MemberRole::Primary),
                ("b".to_string(), MemberRole::Primary),
                ("c".to_string(), MemberRole::PassiveBackup),
            ]
        );
        let cli = parse(&["register-context", "-c", "orders", "-n", "a", "-m", "a"]).unwrap();
        let Command::RegisterContext(args) = cli.command else {
            panic!()
        };
        assert!(args.members().unwrap_err().to_string().contains("named twice"));
        let cli = parse(&["register-context", "-c", "orders"]).unwrap();
        let Command::RegisterContext(args) = cli.command else {
            panic!()
        };
        assert!(args.members().unwrap().is_empty());
        assert!(parse(&["register-context"]).is_err(), "-c is required");
    }

    #[test]
    fn delete_context_flag() {
        let cli = parse(&["delete-context", "-c", "x", "--preserve-event-store"]).unwrap();
        let Command::DeleteContext(args) = cli.command else {
            panic!()
        };
        assert!(args.preserve_event_store);
        let cli = parse(&["delete-context", "--context", "x"]).unwrap();
        let Command::DeleteContext(args) = cli.command else {
            panic!()
        };
        assert!(!args.preserve_event_store);
    }

    #[test]
    fn application_roles_group_per_context() {
        let cli = parse(&[
            "register-application",
            "-a",
            "billing",
            "-d",
            "Billing service",
            "-r",
            "read_events@default,APPEND_EVENTS@default,READ_EVENTS@default,MONITOR,READ_EVENTS@orders",
            "-T",
            "0123456789abcdef",
        ])
        .unwrap();
        let Command::RegisterApplication(args) = cli.command else {
            panic!()
        };
        args.check().unwrap();
        assert_eq!(args.app_token.as_deref(), Some("0123456789abcdef"));
        assert_eq!(
            args.roles_per_context().unwrap(),
            vec![
                ContextRoles {
                    context: "default".into(),
                    roles: vec!["READ_EVENTS".into(), "APPEND_EVENTS".into()]
                },
                ContextRoles {
                    context: "*".into(),
                    roles: vec!["MONITOR".into()]
                },
                ContextRoles {
                    context: "orders".into(),
                    roles: vec!["READ_EVENTS".into()]
                },
            ]
        );
        assert!(parse(&["register-application", "-a", "x"]).is_err(), "-r is required");
    }

    #[test]
    fn bad_roles_are_usage_errors() {
        for spec in [
            "",
            "@default",
            "READ EVENTS@default",
            "READ@",
            "READ@a/b",
            "1ROLE@x",
            "R-W@x",
        ] {
            let err = parse_role(spec).unwrap_err();
            assert!(matches!(err, Failure::Usage(_)), "{spec:?}: {err}");
        }
        assert_eq!(parse_role(" monitor ").unwrap(), ("MONITOR".into(), "*".into()));
    }

    #[test]
    fn application_checks() {
        let app = |name: &str, description: Option<&str>, token: Option<&str>| RegisterApplication {
            application: name.into(),
            description: description.map(Into::into),
            roles: vec!["READ_EVENTS@default".into()],
            app_token: token.map(Into::into),
        };
        app("ok-app_1.2", Some("fine\nsecond line"), Some("0123456789abcdef"))
            .check()
            .unwrap();
        assert!(app("bad name", None, None).check().is_err());
        assert!(
            app("x", Some(&"d".repeat(MAX_DESCRIPTION_LEN + 1)), None)
                .check()
                .is_err()
        );
        assert!(app("x", None, Some("only-15-chars-x")).check().is_err());
        assert!(app("x", None, Some("has a space in the middle")).check().is_err());
        assert!(app("x", None, Some(&"t".repeat(MAX_TOKEN_LEN + 1))).check().is_err());
    }

    #[test]
    fn names() {
        for ok in ["default", "orders-2", "a.b_c", "X", "_admin"] {
            check_context(ok).unwrap();
        }
        let long = "n".repeat(MAX_CONTEXT_LEN + 1);
        for bad in [
            "",
            "a/b",
            "a b",
            "a?b",
            "caf\u{e9}",
            ".hidden",
            "..",
            long.as_str(),
            "a%2F",
        ] {
            assert_eq!(check_context(bad).unwrap_err().exit_code(), 2, "{bad:?}");
        }
        check_user_context("orders").unwrap();
        assert!(check_user_context("_admin").is_err());
        check_application(&"a".repeat(MAX_APPLICATION_LEN)).unwrap();
        check_application(".app").unwrap();
        for bad in ["", ".", "..", "a b", "a/b", &"a".repeat(MAX_APPLICATION_LEN + 1)] {
            assert!(check_application(bad).is_err(), "{bad:?}");
        }
        check_node("node-1.example.org").unwrap();
        for bad in ["", "a\tb", &"n".repeat(MAX_NODE_LEN + 1)] {
            assert!(check_node(bad).is_err(), "{bad:?}");
        }
    }
}
