//! The `procd` binary: parse the command line, set up tracing, run, and print any error as one line.

use clap::Parser as _;

/// mimalloc's per-thread heaps make a free on another thread cheap; see the workspace Cargo.toml.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = match procd::cli::Cli::try_parse() {
        Ok(cli) => cli,
        // --help and --version: clap prints them to stdout and exits 0.
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            eprintln!("{}", one_line(&e.render().to_string()));
            return std::process::ExitCode::from(2);
        }
    };
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

/// Clap's multi-line usage error as one line: the error, then the usage it showed.
fn one_line(rendered: &str) -> String {
    let first = rendered
        .lines()
        .next()
        .unwrap_or("error: invalid arguments");
    match rendered.lines().find_map(|l| l.strip_prefix("Usage: ")) {
        Some(usage) => format!("{first} (usage: {usage}; more with --help)"),
        None => format!("{first} (more with --help)"),
    }
}
