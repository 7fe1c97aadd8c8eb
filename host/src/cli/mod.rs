//! The `procd` command line: raw arguments ([`Cli`]) parsed by clap, turned into validated settings by
//! each command. Errors bubble up as `anyhow` chains and are printed by `main` as one line.

mod bench;
mod consume;
mod produce;
mod serve;
mod topics;

use clap::{Args, Parser, Subcommand};

/// procd: a WebAssembly-extensible stream processor.
#[derive(Debug, Parser)]
#[command(name = "procd", version, about, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    endpoints: Endpoints,
    #[command(subcommand)]
    command: Command,
}

/// Where the client commands find the server.
#[derive(Debug, Clone, Args)]
pub struct Endpoints {
    /// Data-plane URL (ingest and reads).
    #[arg(
        long,
        env = "PROCD_URL",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    pub url: String,
    /// Control-plane URL (topics, health).
    #[arg(
        long,
        env = "PROCD_ADMIN_URL",
        default_value = "http://127.0.0.1:8081",
        global = true
    )]
    pub admin_url: String,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server.
    Serve(serve::ServeArgs),
    /// Create, list, show and delete topics.
    Topics {
        #[command(subcommand)]
        command: topics::TopicsCommand,
    },
    /// Send NDJSON events (one JSON object per line) from a file or stdin; prints each event's result.
    Produce(produce::ProduceArgs),
    /// Print a topic's events as NDJSON.
    Consume(consume::ConsumeArgs),
    /// Measure procd on this machine.
    Bench {
        #[command(subcommand)]
        command: bench::BenchCommand,
    },
}

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => serve::run(args).await,
        Command::Topics { command } => topics::run(command, &cli.endpoints).await,
        Command::Produce(args) => produce::run(args, &cli.endpoints).await,
        Command::Consume(args) => consume::run(args, &cli.endpoints).await,
        Command::Bench { command } => bench::run(command).await,
    }
}

/// Turns a non-2xx response into an error line.
pub(crate) fn check(resp: crate::client::Response) -> anyhow::Result<crate::client::Response> {
    if resp.is_success() {
        Ok(resp)
    } else {
        Err(anyhow::anyhow!(resp.error_line()))
    }
}
