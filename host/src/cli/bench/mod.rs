//! `procd bench`: whole-system measurements on this machine. Each benchmark prints the parameters it
//! ran with, so a figure can be reproduced and compared; micro-benchmarks live in criterion instead.

mod capacity;
mod child;
mod e2e;
mod exactly_once;
mod fairness;
mod handler;
mod ingest;
mod isolation;
mod load;
mod open_loop;
mod requests;
mod server;
mod surge;
mod util;
mod workload;

use anyhow::Context as _;
use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Raw fjall group-commit append versus HTTP NDJSON ingest of the same events, in one run.
    Ingest(ingest::IngestArgs),
    /// Per-event cost of the passthrough and counter handlers through the wasm boundary, next to the
    /// same logic in native Rust, in one run.
    Handler(handler::HandlerArgs),
    /// HTTP ingest alone versus HTTP ingest -> passthrough handler -> output topic, in one run.
    E2e(e2e::E2eArgs),
    /// Other partitions' throughput and event->output latency while one partition's handler loops
    /// forever on a trigger, against a run without triggers, in one run.
    Isolation(isolation::IsolationArgs),
    /// Open-loop load with a surge to --factor x the measured capacity C against a server rated at C:
    /// goodput, refusals, latencies, server RSS, recovery, exactly-once check (about 100 s by default).
    Surge(surge::SurgeArgs),
    /// Open-loop load from several tenants with quotas, one offering 20x its quota: each tenant's
    /// goodput, exactly-once check (about 40 s by default).
    Fairness(fairness::FairnessArgs),
}

pub(super) async fn run(command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Ingest(args) => ingest::run(args).await,
        // Single-threaded and CPU-bound: on a thread of its own, not a runtime worker.
        BenchCommand::Handler(args) => tokio::task::spawn_blocking(move || handler::run(args))
            .await
            .context("the handler benchmark panicked")?,
        BenchCommand::E2e(args) => e2e::run(args).await,
        BenchCommand::Isolation(args) => isolation::run(args).await,
        BenchCommand::Surge(args) => surge::run(args).await,
        BenchCommand::Fairness(args) => fairness::run(args).await,
    }
}
