//! What `procd bench surge` and `procd bench fairness` share: their common flags, the child server's
//! flags, how capacity C is obtained, and the parameter lines both print.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Args;

use super::capacity::{self, Capacity};
use super::child::ChildServer;
use super::requests::Bodies;
use super::util::{check_range, machine_line};

/// Flags of the open-loop load benchmarks.
#[derive(Debug, Args)]
pub struct LoadArgs {
    /// Capacity C in requests per second; skips measuring it.
    #[arg(long, value_name = "REQUESTS_PER_SEC")]
    capacity: Option<f64>,
    /// Seconds of closed-loop load that measure C (the first quarter, at most 1 s, is warm-up).
    #[arg(long, default_value_t = 5)]
    capacity_secs: u64,
    /// Closed-loop connections that measure C.
    #[arg(long, default_value_t = 8)]
    capacity_connections: usize,
    /// Events per request.
    #[arg(long, default_value_t = 100)]
    pub batch: usize,
    /// Size of each event's value as JSON text, quotes included (its number is part of it).
    #[arg(long, default_value_t = 64)]
    pub value_bytes: usize,
    /// Keep-alive connections of each load stream.
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
    /// Due requests that may wait for a free connection; beyond, requests are counted as not sent.
    #[arg(long, default_value_t = 1024)]
    pub backlog: usize,
    /// Partitions of the topic.
    #[arg(long, default_value_t = 8)]
    pub partitions: u32,
    /// Cells of the server.
    #[arg(long, default_value_t = 2)]
    cells: u32,
    /// Where the servers' temporary data directories go (removed afterwards) [default: the system
    /// temp dir].
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Any server config key, as KEY=VALUE, after the benchmark's own settings. Repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
}

impl LoadArgs {
    /// Checks the flags and builds the request bodies.
    pub fn bodies(&self) -> anyhow::Result<Arc<Bodies>> {
        check_range("--batch", self.batch, 1, 10_000)?;
        check_range("--value-bytes", self.value_bytes, 1, 65_536)?;
        check_range("--connections", self.connections, 1, 1000)?;
        check_range("--backlog", self.backlog, 1, 1_000_000)?;
        check_range("--capacity-connections", self.capacity_connections, 1, 1000)?;
        check_range("--partitions", self.partitions as usize, 1, 1024)?;
        if let Some(c) = self.capacity
            && !(c.is_finite() && c > 0.0)
        {
            anyhow::bail!("--capacity must be a positive number of requests per second; got {c}");
        }
        if self.capacity.is_none() && self.capacity_secs == 0 {
            anyhow::bail!("--capacity-secs must be at least 1 (or give --capacity)");
        }
        Ok(Arc::new(Bodies::new(self.batch, self.value_bytes)?))
    }

    /// Starts a server with the benchmark's `settings` (`KEY=VALUE`), then `--set`.
    pub async fn server(&self, settings: &[String]) -> anyhow::Result<ChildServer> {
        let mut args = vec![
            "--partitions".to_string(),
            self.partitions.to_string(),
            "--cells".to_string(),
            self.cells.to_string(),
        ];
        for kv in settings.iter().chain(&self.set) {
            args.push("--set".into());
            args.push(kv.clone());
        }
        ChildServer::start(&self.parent(), args).await
    }

    fn parent(&self) -> PathBuf {
        self.dir.clone().unwrap_or_else(std::env::temp_dir)
    }

    /// C: given, or measured closed-loop on a server of its own with admission off.
    pub async fn capacity(&self, bodies: &Arc<Bodies>) -> anyhow::Result<Capacity> {
        if let Some(c) = self.capacity {
            return Ok(Capacity::given(c));
        }
        let server = self.server(&[]).await?;
        server.create_topic("capacity").await?;
        let measured = capacity::measure(
            &server,
            "capacity",
            bodies.clone(),
            self.capacity_connections,
            self.capacity_secs as f64,
        )
        .await
        .context("measuring capacity")?;
        drop(server);
        Ok(measured)
    }

    /// The parameter lines every load benchmark prints.
    pub fn print_common(&self, bodies: &Bodies) {
        println!(
            "  requests      {} events of {}-byte values per request, NDJSON body {} B, every event unique \
             (its number in key and value; no ids)",
            bodies.batch(),
            self.value_bytes,
            bodies.len()
        );
        println!(
            "  client        open loop in this process: {} keep-alive connections per stream, backlog {} \
             requests; latency from each request's intended send time",
            self.connections, self.backlog
        );
        println!(
            "  server        `procd serve` child process, {} partitions over {} cells, fresh data dir under {}, \
             no procd.toml or PROCD_*",
            self.partitions,
            self.cells,
            self.parent().display()
        );
        println!("  machine       {}", machine_line());
    }
}

/// `met` or `NOT met`.
pub(super) fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "NOT met" }
}

/// Server settings as `--set` would take them, one line.
pub(super) fn settings_line(settings: &[String], set: &[String]) -> String {
    let mut all: Vec<&str> = settings.iter().map(String::as_str).collect();
    all.extend(set.iter().map(String::as_str));
    if all.is_empty() {
        "defaults".into()
    } else {
        format!("defaults and {}", all.join(" "))
    }
}
