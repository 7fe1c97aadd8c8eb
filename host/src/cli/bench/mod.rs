//! `procd bench`: whole-system measurements on this machine. Each benchmark prints the parameters it
//! ran with, so a figure can be reproduced and compared; micro-benchmarks live in criterion instead.

mod ingest;

use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Raw fjall group-commit append versus HTTP NDJSON ingest of the same events, in one run.
    Ingest(ingest::IngestArgs),
}

pub(super) async fn run(command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Ingest(args) => ingest::run(args).await,
    }
}
