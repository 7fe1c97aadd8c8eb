//! `procd produce TOPIC [FILE|-]`: NDJSON events in, one result line per event out.
//!
//! Lines are sent in batches. Events a cell refused (`503`, with a retry hint) are retried alone, after
//! the hint, a bounded number of times; an event with an `id` is safe to retry (the server deduplicates),
//! one without may be appended twice only if a response was lost, never because of a refusal. Errors in
//! the input name the line of the file. While it runs, a counter on stderr (only when stderr is a
//! terminal and the result lines go elsewhere) shows the events sent and how far through the file it is.

use std::io::{BufRead as _, IsTerminal as _};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Args;

use super::Endpoints;
use super::progress::Counter;
use crate::client::Client;

/// Retries of refused events before giving up.
const MAX_RETRIES: u32 = 8;

#[derive(Debug, Args)]
pub struct ProduceArgs {
    /// Topic to produce to.
    topic: String,
    /// NDJSON file; `-` or absent reads stdin.
    file: Option<PathBuf>,
    /// Events per request.
    #[arg(long, default_value_t = 1000)]
    batch: usize,
}

pub(super) async fn run(args: ProduceArgs, endpoints: &Endpoints) -> anyhow::Result<()> {
    let total_bytes = match &args.file {
        Some(path) if path.as_os_str() != "-" => std::fs::metadata(path).ok().map(|m| m.len()),
        _ => None,
    };
    let reader: Box<dyn std::io::BufRead> = match &args.file {
        Some(path) if path.as_os_str() != "-" => Box::new(std::io::BufReader::new(
            std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?,
        )),
        _ => Box::new(std::io::BufReader::new(std::io::stdin())),
    };
    let mut client = Client::new(&endpoints.url)?;
    let path = format!("/v1/topics/{}/events", args.topic);
    let mut batch: Vec<(usize, String)> = Vec::new();
    let (mut sent, mut failed) = (0usize, 0usize);
    // Result lines on the same terminal would tear the counter line: show it when they go elsewhere.
    let mut progress = Counter::new(format!("producing {}", args.topic), total_bytes)
        .visible_if(!std::io::stdout().is_terminal());
    let mut bytes_read = 0u64;
    for (i, line) in reader.lines().enumerate() {
        let line = line.with_context(|| format!("cannot read input line {}", i + 1))?;
        bytes_read += line.len() as u64 + 1;
        if line.trim().is_empty() {
            continue;
        }
        batch.push((i + 1, line));
        if batch.len() >= args.batch.max(1) {
            failed += send(&mut client, &path, std::mem::take(&mut batch)).await?;
            sent += args.batch.max(1);
            progress.update(sent as u64, bytes_read);
        }
    }
    let last = batch.len();
    if !batch.is_empty() {
        failed += send(&mut client, &path, batch).await?;
    }
    sent += last;
    progress.finish();
    if failed > 0 {
        bail!("{failed} of {sent} events were refused; see the result lines with an \"error\"");
    }
    Ok(())
}

/// Sends one batch; prints a result line per event; returns how many were finally refused.
async fn send(
    client: &mut Client,
    path: &str,
    mut batch: Vec<(usize, String)>,
) -> anyhow::Result<usize> {
    let mut attempt = 0;
    loop {
        let body = batch
            .iter()
            .map(|(_, l)| l.as_str())
            .collect::<Vec<_>>()
            .join("\n");
        let resp = client.post_ndjson(path, body).await?;
        let json = resp.json().ok();
        let results = json.as_ref().and_then(|j| j["results"].as_array()).cloned();
        let Some(results) = results else {
            // A whole-request error: translate "line K" of the batch into the file's line number.
            let mut line = resp.error_line();
            let file_line = json
                .as_ref()
                .and_then(|j| j["detail"].as_str())
                .and_then(|d| d.strip_prefix("line "))
                .and_then(|d| d.split_once(':'))
                .and_then(|(n, rest)| Some((n.parse::<usize>().ok()?, rest)))
                .and_then(|(k, rest)| Some((batch.get(k.checked_sub(1)?)?.0, rest)));
            if let Some((file_line, rest)) = file_line {
                line = format!(
                    "HTTP {} invalid_event: input line {file_line}:{rest}",
                    resp.status
                );
            }
            bail!(line);
        };
        let mut retry = Vec::new();
        let mut wait_ms = 0u64;
        for ((file_line, text), result) in batch.into_iter().zip(results) {
            let retryable = result.get("retry_after_ms").and_then(|v| v.as_u64());
            match retryable {
                Some(ms) if attempt < MAX_RETRIES && result["error"] != "unknown_topic" => {
                    wait_ms = wait_ms.max(ms);
                    retry.push((file_line, text));
                }
                _ => {
                    let mut out = serde_json::json!({ "line": file_line });
                    if let (Some(o), Some(r)) = (out.as_object_mut(), result.as_object()) {
                        o.extend(r.clone());
                    }
                    println!("{out}");
                }
            }
        }
        if retry.is_empty() {
            return Ok(0);
        }
        attempt += 1;
        if attempt > MAX_RETRIES {
            return Ok(retry.len());
        }
        tokio::time::sleep(Duration::from_millis(wait_ms.min(10_000))).await;
        batch = retry;
    }
}
