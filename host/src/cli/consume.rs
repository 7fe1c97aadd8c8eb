//! `procd consume TOPIC [--partition p] [--from N] [--follow]`: prints events as NDJSON.
//!
//! Without `--partition` it reads every partition. Without `--follow` it stops at the end offset each
//! partition had when it got there; with it, it long-polls each partition (in its own task) until
//! interrupted.

use anyhow::Context as _;
use clap::Args;
use std::io::Write as _;

use super::{Endpoints, check};
use crate::client::Client;

#[derive(Debug, Args)]
pub struct ConsumeArgs {
    /// Topic to read.
    topic: String,
    /// Read only this partition.
    #[arg(long)]
    partition: Option<u32>,
    /// First offset to read (in each partition read).
    #[arg(long, default_value_t = 0)]
    from: u64,
    /// Keep waiting for new events.
    #[arg(long)]
    follow: bool,
    /// Events per request.
    #[arg(long, default_value_t = 1000)]
    limit: usize,
}

pub(super) async fn run(args: ConsumeArgs, endpoints: &Endpoints) -> anyhow::Result<()> {
    Client::new(&endpoints.url)?; // Refuse a bad --url before doing anything.
    let partitions: Vec<u32> = match args.partition {
        Some(p) => vec![p],
        None => {
            let mut admin = Client::new(&endpoints.admin_url)?;
            let topic = check(admin.get(&format!("/v1/topics/{}", args.topic)).await?)?.json()?;
            let count = topic["partitions"]
                .as_u64()
                .context("server did not say how many partitions the topic has")?;
            (0..count as u32).collect()
        }
    };
    let mut tasks = tokio::task::JoinSet::new();
    for p in partitions {
        let (url, topic, from, follow, limit) = (
            endpoints.url.clone(),
            args.topic.clone(),
            args.from,
            args.follow,
            args.limit,
        );
        tasks.spawn(async move { consume_partition(&url, &topic, p, from, follow, limit).await });
    }
    while let Some(done) = tasks.join_next().await {
        done.context("consumer task failed")??;
    }
    Ok(())
}

async fn consume_partition(
    url: &str,
    topic: &str,
    p: u32,
    mut from: u64,
    follow: bool,
    limit: usize,
) -> anyhow::Result<()> {
    let mut client = Client::new(url)?;
    let wait = if follow { 5_000 } else { 0 };
    loop {
        let path = format!(
            "/v1/topics/{topic}/partitions/{p}/events?from={from}&limit={limit}&wait_ms={wait}"
        );
        let resp = check(client.get(&path).await?)?;
        let next = resp
            .header("procd-next-offset")
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(from);
        let end = resp
            .header("procd-end-offset")
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(next);
        // One locked write per response keeps lines from different partitions whole.
        std::io::stdout().lock().write_all(&resp.body)?;
        from = next.max(from);
        if !follow && (from >= end || resp.body.is_empty()) {
            return Ok(());
        }
    }
}
