//! `procd deploy handler.wasm --name NAME --input TOPIC [--output TOPIC]... [--config K=V]... [--limit N=V]... [--from P]`:
//! uploads a component as a new handler or a new version of one (`PUT /v1/handlers/{name}`).
//!
//! Flags are validated here before anything is sent; the server validates the rest (the component, its
//! `init` with the config, the topics) before it records anything. While the upload and the server-side
//! compile take more than a moment, a spinner on stderr says so (only when stderr is a terminal, so
//! scripts and logs see nothing but the result line).

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use clap::Args;

use super::progress::{human_bytes, with_spinner};
use super::{Endpoints, check, encode_component, parse_config};
use crate::catalog::StartPosition;
use crate::client::Client;

/// The largest component any procd accepts (the top of `handler.max_component_bytes`'s range), so a
/// wrong path to a huge file fails here instead of being read into memory and uploaded.
const MAX_COMPONENT_BYTES: u64 = 1 << 30;

#[derive(Debug, Args)]
pub struct DeployArgs {
    /// The handler component (a `.wasm` built for wasm32-wasip2).
    component: PathBuf,
    /// Handler name, 1 to 128 characters from [a-zA-Z0-9._-] [default: the file name without `.wasm`].
    #[arg(long)]
    name: Option<String>,
    /// Input topic (required for a new handler; a new version keeps its handler's input).
    #[arg(long)]
    input: Option<String>,
    /// Output topic, in the order the handler refers to them by index. Repeatable; a new version
    /// without any keeps the previous version's outputs.
    #[arg(long = "output", value_name = "TOPIC")]
    outputs: Vec<String>,
    /// Configuration passed to the handler's `init`, as KEY=VALUE. Repeatable; a new version without
    /// any keeps the previous version's configuration.
    #[arg(long = "config", value_name = "KEY=VALUE")]
    config: Vec<String>,
    /// Where a new handler starts on each partition: earliest, latest or an offset [default: earliest].
    #[arg(long, value_name = "earliest|latest|OFFSET")]
    from: Option<String>,
    /// A limit for this version, below the server's handler.* maximum: max_memory_bytes, deadline_ms,
    /// max_outputs_per_batch, max_output_bytes_per_batch, max_state_value_bytes, max_state_bytes or
    /// log_lines_per_sec.
    /// Repeatable; a new version without any keeps the previous version's limits.
    #[arg(long = "limit", value_name = "NAME=VALUE")]
    limits: Vec<String>,
}

/// Deploy settings, validated.
struct Deploy {
    path: PathBuf,
    name: String,
    query: String,
    /// Whether `--input` was given (a new handler needs it).
    has_input: bool,
}

impl Deploy {
    fn from_args(args: DeployArgs) -> anyhow::Result<Self> {
        let name = match args.name {
            Some(name) => name,
            None => default_name(&args.component)?,
        };
        let mut query = Vec::new();
        if let Some(input) = &args.input {
            query.push(format!("input={}", encode_component(input)));
        }
        for output in &args.outputs {
            query.push(format!("output={}", encode_component(output)));
        }
        for kv in &args.config {
            parse_config(kv)?;
            query.push(format!("config={}", encode_component(kv)));
        }
        for limit in &args.limits {
            let (name, value) = limit.split_once('=').ok_or_else(|| {
                anyhow::anyhow!(
                    "--limit {limit:?} must be NAME=VALUE, e.g. --limit deadline_ms=200"
                )
            })?;
            query.push(format!(
                "limit.{}={}",
                encode_component(name),
                encode_component(value)
            ));
        }
        if let Some(from) = &args.from {
            let from: StartPosition = from.parse().map_err(|e| anyhow::anyhow!("--from: {e}"))?;
            query.push(format!("from={from}"));
        }
        Ok(Self {
            path: args.component,
            name,
            query: query.join("&"),
            has_input: args.input.is_some(),
        })
    }
}

/// `counter.wasm` deploys as `counter` unless `--name` says otherwise.
fn default_name(path: &Path) -> anyhow::Result<String> {
    path.file_stem()
        .and_then(|s| s.to_str())
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .with_context(|| {
            format!(
                "cannot name a handler after {}; pass --name NAME",
                path.display()
            )
        })
}

fn read_component(path: &Path) -> anyhow::Result<Vec<u8>> {
    let len = std::fs::metadata(path)
        .with_context(|| format!("cannot read {}", path.display()))?
        .len();
    if len > MAX_COMPONENT_BYTES {
        bail!(
            "{} is {len} bytes; procd accepts components of at most {MAX_COMPONENT_BYTES} bytes \
             (handler.max_component_bytes)",
            path.display()
        );
    }
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

pub(super) async fn run(args: DeployArgs, endpoints: &Endpoints) -> anyhow::Result<()> {
    let deploy = Deploy::from_args(args)?;
    let mut admin = Client::new(&endpoints.admin_url)?;
    let component = read_component(&deploy.path)?;
    let size = component.len();
    let mut path = format!("/v1/handlers/{}", encode_component(&deploy.name));
    if !deploy.query.is_empty() {
        path = format!("{path}?{}", deploy.query);
    }
    let request = admin.request(
        hyper::Method::PUT,
        &path,
        &[("content-type", "application/wasm")],
        component,
    );
    // Short (the name, not the path), so the spinner line does not wrap and `\r` can redraw it.
    let label = format!(
        "deploying {} ({}): uploading and compiling",
        deploy.name,
        human_bytes(size as u64)
    );
    let resp = with_spinner(&label, request).await?;
    let needs_input = resp.status == 400
        && !deploy.has_input
        && resp.json().is_ok_and(|v| {
            v["detail"]
                .as_str()
                .is_some_and(|d| d.contains("needs input"))
        });
    if needs_input {
        bail!(
            "handler {:?} does not exist yet: pass --input TOPIC to create it",
            deploy.name
        );
    }
    let resp = check(resp)?;
    let body = resp.json().unwrap_or_default();
    let outputs: Vec<&str> = body["outputs"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default();
    println!(
        "deployed {} v{} (input: {}, outputs: {})",
        body["name"].as_str().unwrap_or(&deploy.name),
        body["version"],
        body["input"].as_str().unwrap_or("?"),
        if outputs.is_empty() {
            "none".to_string()
        } else {
            outputs.join(", ")
        }
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> DeployArgs {
        #[derive(Debug, clap::Parser)]
        struct Wrapper {
            #[command(flatten)]
            args: DeployArgs,
        }
        let argv = ["deploy", "dir/counter.wasm"].iter().chain(extra);
        match <Wrapper as clap::Parser>::try_parse_from(argv) {
            Ok(w) => w.args,
            Err(e) => panic!("test arguments do not parse: {e}"),
        }
    }

    #[test]
    fn flags_become_an_encoded_query() -> anyhow::Result<()> {
        let d = Deploy::from_args(args(&[
            "--input",
            "in",
            "--output",
            "a",
            "--output",
            "b c",
            "--config",
            "add.x=1&2",
            "--from",
            "12",
        ]))?;
        assert_eq!(d.name, "counter");
        assert_eq!(
            d.query,
            "input=in&output=a&output=b%20c&config=add.x%3D1%262&from=12"
        );
        Ok(())
    }

    #[test]
    fn bad_flags_are_refused_before_anything_is_sent() {
        let err = Deploy::from_args(args(&["--from", "sideways"]))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("--from") && err.contains("earliest"), "{err}");
        let err = Deploy::from_args(args(&["--config", "novalue"]))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("KEY=VALUE"), "{err}");
    }
}
