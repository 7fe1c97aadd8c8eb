//! The `procd` command line: raw arguments ([`Cli`]) parsed by clap, turned into validated settings by
//! each command. Errors bubble up as `anyhow` chains and are printed by `main` as one line.

mod bench;
mod consume;
mod deploy;
mod dev;
mod handlers;
mod new;
mod produce;
mod progress;
mod run;
mod serve;
mod status;
mod table;
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
    /// Control-plane URL (topics, handlers, health).
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
    /// Develop a handler: local server, build, deploy, live reload on every change, outputs tailed.
    Dev(dev::DevArgs),
    /// Deploy a handler component (a new handler, or a new version of one).
    Deploy(deploy::DeployArgs),
    /// List, show, roll back, pause, resume, reset and remove handlers; list, replay and purge their dead letters.
    Handlers {
        #[command(subcommand)]
        command: handlers::HandlersCommand,
    },
    /// Create a handler crate (example handler, unit tests, sample events) ready for `procd dev`.
    New(new::NewArgs),
    /// Run a handler over an NDJSON file locally (no server, in-memory state); prints its outputs.
    Run(run::RunArgs),
    /// Show every handler's progress per partition: version, committed offset, lag, events/s, state,
    /// dead letters.
    Status(status::StatusArgs),
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
        Command::Deploy(args) => deploy::run(args, &cli.endpoints).await,
        Command::Dev(args) => dev::run(args).await,
        Command::Handlers { command } => handlers::run(command, &cli.endpoints).await,
        Command::New(args) => new::run(args),
        Command::Run(args) => run::run(args).await,
        Command::Status(args) => status::run(args, &cli.endpoints).await,
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

/// Percent-encodes a URL path segment or query value: everything but RFC 3986's unreserved characters.
pub(crate) fn encode_component(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Splits a `--config KEY=VALUE` flag.
pub(crate) fn parse_config(kv: &str) -> anyhow::Result<(String, String)> {
    match kv.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_string(), value.to_string())),
        _ => anyhow::bail!("--config {kv:?}: expected KEY=VALUE, e.g. --config add.region=eu"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn components_are_percent_encoded() {
        assert_eq!(encode_component("in.put-1_~"), "in.put-1_~");
        assert_eq!(
            encode_component("a=b&c d+%/é"),
            "a%3Db%26c%20d%2B%25%2F%C3%A9"
        );
    }

    #[test]
    fn config_flags_split_at_the_first_equals_sign() {
        assert_eq!(
            parse_config("add.x=a=b").ok(),
            Some(("add.x".to_string(), "a=b".to_string()))
        );
        assert_eq!(
            parse_config("k=").ok(),
            Some(("k".to_string(), String::new()))
        );
        assert!(parse_config("novalue").is_err());
        assert!(parse_config("=v").is_err());
    }
}
