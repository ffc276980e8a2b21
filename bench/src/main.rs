//! `myelin-bench`: load generator for Myelin benchmarks. Talks to a node over its client gRPC
//! API (Axon Server's EventStore, CommandService and QueryService) exactly as an application
//! would.
//!
//! Every subcommand prints a human summary on stderr and, with `--json`, one JSON line of
//! results on stdout. See docs/benchmarks.md and bench/run.sh.

mod aggregate_read;
mod append;
mod command;
mod common;
mod compare;
mod cpu;
mod fill;
mod fsync;
mod null_server;
mod query;
mod replay;
mod roundtrip;
mod system;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "myelin-bench",
    version,
    about = "Load generator for Myelin (gRPC, like a real client)"
)]
struct Cli {
    #[command(subcommand)]
    command: Workload,
}

#[derive(Subcommand, Debug)]
enum Workload {
    /// One workload against Myelin or a peer (Redis, PostgreSQL, NATS JetStream) in the shape
    /// shared by all systems; see bench/compare.sh.
    Compare(compare::Args),
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
    /// A command-handling application: H handler streams answering every command at once.
    CommandHandler(command::HandlerArgs),
    /// Command round trips (Dispatch) by K concurrent loops; needs a running command-handler.
    CommandDispatch(command::DispatchArgs),
    /// A query-handling application: H handler streams answering every query (response + complete).
    QueryHandler(query::HandlerArgs),
    /// Point-to-point query round trips by K concurrent loops; needs a running query-handler.
    QueryDispatch(query::DispatchArgs),
    /// A server with the client API that does no work (appends confirmed unstored, commands and
    /// queries answered by itself): the floor of what this client and gRPC cost on this machine.
    NullServer(null_server::Args),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        match cli.command {
            Workload::Compare(a) => compare::run(a).await,
            Workload::Append(a) => append::run(a).await,
            Workload::Fill(a) => fill::run(a).await,
            Workload::Replay(a) => replay::run(a).await,
            Workload::AggregateRead(a) => aggregate_read::run(a).await,
            Workload::Fsync(a) => fsync::run(a).await,
            Workload::CommandHandler(a) => command::run_handler(a).await,
            Workload::CommandDispatch(a) => command::run_dispatch(a).await,
            Workload::QueryHandler(a) => query::run_handler(a).await,
            Workload::QueryDispatch(a) => query::run_dispatch(a).await,
            Workload::NullServer(a) => null_server::run(a).await,
        }
    })
}
