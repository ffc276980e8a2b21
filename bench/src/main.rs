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
    /// Threads of this process's runtime. Default: 1 for the load generators, the CPU count for
    /// the null server and the handler applications. One thread drives these loads (it reports
    /// its CPU time); more only take CPU from the system under test on a small machine, and hand
    /// each response from the thread that read it to another.
    #[arg(long, global = true, env = "MYELIN_BENCH_THREADS")]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Workload,
}

impl Workload {
    /// Whether this subcommand plays a server or an application rather than generating load.
    fn serves(&self) -> bool {
        matches!(
            self,
            Workload::NullServer(_) | Workload::CommandHandler(_) | Workload::QueryHandler(_)
        )
    }
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
    let threads = match cli.threads {
        Some(0) => anyhow::bail!("--threads must be at least 1"),
        Some(n) => n,
        None if cli.command.serves() => std::thread::available_parallelism().map_or(1, |n| n.get()),
        None => 1,
    };
    common::set_runtime_threads(threads);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()?;
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
