//! What the in-process whole-system benchmarks (`ingest`, `e2e`, `isolation`) share: the flags of the
//! request stream and of the server it runs against, the server configuration built from them, and
//! the events themselves (event `i`: key `k<i>`, value a JSON string of `--value-bytes` bytes). The
//! open-loop benchmarks (`surge`, `fairness`) drive a child server instead and share theirs in `load`.

use std::ops::{Range, RangeInclusive};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use clap::Args;

use super::util::{check_range, event_value};
use crate::config::{Config, Overrides};

/// The request stream and the server's shape.
#[derive(Debug, Args)]
pub struct WorkloadArgs {
    /// Events per HTTP request.
    #[arg(long, default_value_t = 1000)]
    batch: usize,
    /// Size of each event's value as JSON text: a string of this many bytes, quotes included.
    #[arg(long, default_value_t = 256)]
    value_bytes: usize,
    /// Concurrent keep-alive HTTP connections posting the events [default: 4; `ingest`: 16, so that
    /// the server's group commits are as full as phase (a)'s].
    #[arg(long)]
    connections: Option<usize>,
    /// Partitions of the topics.
    #[arg(long, default_value_t = 8)]
    pub(super) partitions: u32,
    /// Cells of the server (`ingest`: also the raw writer threads of phase (a)).
    #[arg(long, default_value_t = 2)]
    cells: u32,
    /// Where the temporary data directories go (removed afterwards) [default: the system temp dir].
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Any server config key, as KEY=VALUE, over the benchmark's own settings (`isolation`:
    /// handler.deadline_ms=200); `ingest`'s phase (a) follows the cell keys too. Repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

/// Connections when neither `--connections` nor the benchmark says otherwise.
const DEFAULT_CONNECTIONS: usize = 4;

impl WorkloadArgs {
    /// Uses `connections` unless `--connections` was given.
    pub(super) fn with_default_connections(mut self, connections: usize) -> Self {
        self.connections.get_or_insert(connections);
        self
    }
}

/// Validated [`WorkloadArgs`], with the server configuration they make.
#[derive(Debug, Clone)]
pub(super) struct Workload {
    pub(super) batch: usize,
    pub(super) value_bytes: usize,
    pub(super) connections: usize,
    /// Built like `procd serve` builds it, minus procd.toml and PROCD_*: a benchmark must not depend
    /// on the directory it is run from.
    pub(super) config: Config,
    /// The `--set` overrides the configuration was built with, for the parameter block.
    pub(super) set: Vec<String>,
    /// Where the scratch directory goes.
    pub(super) parent: PathBuf,
}

impl Workload {
    /// Validates `args` for a run of `events` events whose values may be `value_bytes` long, and builds
    /// the server configuration: ephemeral ports, the benchmark's own `defaults`, then `--set`.
    pub(super) fn new(
        args: WorkloadArgs,
        events: usize,
        value_bytes: RangeInclusive<usize>,
        defaults: &[(&str, String)],
    ) -> anyhow::Result<Self> {
        check_range("--batch", args.batch, 1, 1_000_000)?;
        check_range(
            "--value-bytes",
            args.value_bytes,
            *value_bytes.start(),
            *value_bytes.end(),
        )?;
        let connections = args.connections.unwrap_or(DEFAULT_CONNECTIONS);
        check_range("--connections", connections, 1, 1024)?;
        let mut flags = Overrides::default();
        flags.set("partitions", args.partitions.to_string(), "--partitions");
        flags.set("cells", args.cells.to_string(), "--cells");
        flags.set("listen", "127.0.0.1:0", "the benchmark");
        flags.set("admin_listen", "127.0.0.1:0", "the benchmark");
        for (key, value) in defaults {
            flags.set(key, value.clone(), "the benchmark");
        }
        for kv in &args.set {
            let (key, value) = kv
                .split_once('=')
                .with_context(|| format!("--set {kv:?}: expected KEY=VALUE"))?;
            flags.set(key.trim(), value, format!("--set {key}"));
        }
        let config = Config::load(None, Vec::new(), flags)?;
        // The longest line is the last one (longest key); a body of `batch` of them must be accepted.
        let last = events.saturating_sub(1);
        let body_bytes = ndjson_line(last, &event_value(last, args.value_bytes))
            .len()
            .saturating_mul(args.batch);
        if body_bytes > config.ingest.max_body_bytes {
            bail!(
                "--batch {} of {}-byte values makes {body_bytes}-byte bodies, over the server's \
                 ingest.max_body_bytes ({}); lower --batch or --value-bytes",
                args.batch,
                args.value_bytes,
                config.ingest.max_body_bytes
            );
        }
        Ok(Self {
            batch: args.batch,
            value_bytes: args.value_bytes,
            connections,
            config,
            set: args.set,
            parent: args.dir.unwrap_or_else(std::env::temp_dir),
        })
    }

    /// Event `i`'s value.
    pub(super) fn value(&self, i: usize) -> String {
        event_value(i, self.value_bytes)
    }

    /// The event numbers of each of the requests that post `events` events: `--batch` at a time.
    pub(super) fn requests(&self, events: usize) -> impl Iterator<Item = Range<usize>> + use<> {
        let batch = self.batch;
        (0..events)
            .step_by(batch)
            .map(move |start| start..(start + batch).min(events))
    }

    /// The NDJSON body of each request, with `value(i)` as event `i`'s value. Built before any clock
    /// starts, so the client's cost is sending and checking only.
    pub(super) fn bodies(&self, events: usize, value: impl Fn(usize) -> String) -> Arc<Vec<Bytes>> {
        let body = |request: Range<usize>| {
            Bytes::from(
                request
                    .map(|i| ndjson_line(i, &value(i)))
                    .collect::<String>(),
            )
        };
        Arc::new(self.requests(events).map(body).collect())
    }
}

/// Event `i`'s key.
pub(super) fn event_key(i: usize) -> String {
    format!("k{i}")
}

/// Event `i` as an NDJSON line with the given JSON value text, newline included.
pub(super) fn ndjson_line(i: usize, value: &str) -> String {
    format!("{{\"key\":\"{}\",\"value\":{value}}}\n", event_key(i))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(batch: usize, value_bytes: usize) -> WorkloadArgs {
        WorkloadArgs {
            batch,
            value_bytes,
            connections: None,
            partitions: 4,
            cells: 2,
            dir: None,
            set: vec!["handler.deadline_ms=300".into()],
        }
    }

    #[test]
    fn ndjson_lines_parse_as_the_server_expects() -> Result<(), String> {
        let value = event_value(42, 256);
        let line = ndjson_line(42, &value);
        let events = crate::ingest::parse::ndjson(line.as_bytes())?;
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].key.as_deref(), Some("k42"));
        assert_eq!(
            events[0].value,
            crate::log::PayloadRef::Json(value.as_bytes())
        );
        Ok(())
    }

    #[test]
    fn requests_cover_every_event_once_in_batches() -> anyhow::Result<()> {
        let load = Workload::new(args(1000, 16), 2500, 2..=4096, &[])?;
        let requests: Vec<_> = load.requests(2500).collect();
        assert_eq!(requests, vec![0..1000, 1000..2000, 2000..2500]);
        let bodies = load.bodies(2500, |i| i.to_string());
        let lines: Vec<usize> = bodies
            .iter()
            .map(|b| b.split(|&c| c == b'\n').count() - 1)
            .collect();
        assert_eq!(lines, vec![1000, 1000, 500]);
        assert!(bodies[2].ends_with(b"{\"key\":\"k2499\",\"value\":2499}\n"));
        Ok(())
    }

    #[test]
    fn set_overrides_the_benchmarks_defaults() -> anyhow::Result<()> {
        let defaults = [("handler.deadline_ms", "200".to_string())];
        let load = Workload::new(args(1000, 256), 1000, 2..=4096, &defaults)?;
        assert_eq!(load.config.handler.deadline_ms, 300);
        assert_eq!((load.config.partitions, load.config.cells), (4, 2));
        Ok(())
    }

    #[test]
    fn bad_flags_are_refused_naming_the_flag() {
        let refused = |args, events| match Workload::new(args, events, 3..=4096, &[]) {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        };
        assert!(refused(args(0, 256), 10).starts_with("--batch must be in"));
        assert!(refused(args(10, 2), 10).starts_with("--value-bytes must be in 3..=4096"));
        // A million events of 4 KiB in one request: far over the 16 MiB body limit.
        assert!(refused(args(1_000_000, 4096), 1_000_000).contains("ingest.max_body_bytes"));
    }
}
