//! The `procd` binary: parse the command line, set up tracing, run, and print any error as one line.

use clap::Parser as _;

/// mimalloc's per-thread heaps make a free on another thread cheap; see the workspace Cargo.toml.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = procd::cli::Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new("info,fjall=warn,lsm_tree=warn")
            }),
        )
        .with_writer(std::io::stderr)
        .init();
    match procd::cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` joins the error chain on one line: "what failed: why".
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
