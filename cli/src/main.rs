//! `myelin-cli`: manage a Myelin node from the command line through its admin HTTP API, with
//! the commands and flags of Axon Server's `axonserver-cli` (see docs/cli.md).
//!
//! The binary is thin: parse the arguments, pick the token, run one command, print its output
//! on stdout, or `error: <message> (<code>)` on stderr with an exit code that says what kind of
//! failure it was (see `failure.rs`). Output is printed only once the command has succeeded.

mod args;
mod commands;
mod failure;
mod output;
mod server;
mod tls;
mod token;

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;

use crate::args::Cli;
use crate::failure::Failure;
use crate::server::Server;

fn main() -> ExitCode {
    // Usage errors exit with 2, help and --version with 0 (clap's own handling).
    let cli = Cli::parse();
    let mut token_given = false;
    let result = (|| {
        let tls = cli.global.tls();
        let base = tls.apply_scheme(server::parse_base(&cli.global.server)?);
        let token = token::resolve(
            cli.global.token.clone(),
            std::env::var_os(token::TOKEN_FILE_ENV)
                .filter(|v| !v.is_empty())
                .map(Into::into),
            server::is_loopback(&base),
            &token::local_files(),
        )?;
        token_given = token.is_some();
        let server = Server::new(&base, token, cli.global.timeout())?.with_tls(tls.config()?);
        commands::run(&cli.command, &server, cli.global.format())
    })();
    match result {
        Ok(text) => {
            let mut stdout = std::io::stdout().lock();
            // A closed pipe (`| head`) is not this command's failure.
            let _ = stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush());
            ExitCode::SUCCESS
        }
        Err(failure) => {
            report(&failure, token_given);
            ExitCode::from(failure.exit_code())
        }
    }
}

fn report(failure: &Failure, token_given: bool) {
    eprintln!("error: {failure}");
    if let Some(hint) = failure.hint(token_given) {
        eprintln!("hint: {hint}");
    }
}
