//! `procd bench`: whole-system measurements on this machine.

use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Raw fjall group-commit append versus HTTP NDJSON ingest of the same events, in one run.
    Ingest,
}

pub(super) async fn run(command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Ingest => anyhow::bail!("not built yet"),
    }
}
