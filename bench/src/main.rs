//! `myelin-bench`: load generator for Myelin benchmarks. Talks to a node over its client gRPC
//! API (Axon Server's EventStore service) exactly as an application would.
//!
//! Every subcommand prints a human summary on stderr and, with `--json`, one JSON line of
//! results on stdout. See docs/benchmarks.md and bench/run.sh.

mod aggregate_read;
mod append;
mod common;
mod fill;
mod fsync;
mod replay;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "myelin-bench",
    version,
    about = "Load generator for Myelin (gRPC, like a real client)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Durable appends by N concurrent clients, one transaction outstanding each.
    Append(append::Args),
    /// Load a store: N events in aggregates of a fixed size (`<prefix>-<k>`).
    Fill(fill::Args),
    /// One ListEvents stream from a token, with Axon-style permit refills.
    Replay(replay::Args),
    /// ListAggregateEvents of random aggregates; latency and completeness.
    AggregateRead(aggregate_read::Args),
    /// Raw write+fdatasync rate of a directory's disk (no server involved).
    Fsync(fsync::Args),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        match cli.command {
            Command::Append(a) => append::run(a).await,
            Command::Fill(a) => fill::run(a).await,
            Command::Replay(a) => replay::run(a).await,
            Command::AggregateRead(a) => aggregate_read::run(a).await,
            Command::Fsync(a) => fsync::run(a).await,
        }
    })
}
