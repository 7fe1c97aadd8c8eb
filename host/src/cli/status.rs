//! `procd status [--watch [SECS]]`: one table row per handler and partition — version, committed
//! offset, lag in events and seconds, events/s, state, dead letters — from the control plane
//! (`GET /v1/handlers`).
//!
//! Events/s needs two samples: a single `status` samples twice, [`SAMPLE_WINDOW`] apart; `--watch`
//! uses the previous refresh as the first sample. The rate is of `events_processed`, the processor's
//! counter since the server started, so a server restart between samples reads as 0, not as a
//! negative rate.

use std::collections::HashMap;
use std::io::{IsTerminal as _, Write as _};
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::Value;

use super::table::render_table;
use super::{Endpoints, check};
use crate::client::Client;

/// How far apart a single `procd status` takes its two samples.
const SAMPLE_WINDOW: Duration = Duration::from_secs(1);
/// The shortest `--watch` period: faster only loads the control plane.
const MIN_WATCH_SECS: f64 = 0.2;

const HEADERS: [&str; 9] = [
    "HANDLER",
    "VERSION",
    "PARTITION",
    "COMMITTED",
    "LAG",
    "LAG_S",
    "EVENTS/S",
    "STATE",
    "DLQ",
];

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Refresh every SECS seconds (default 2) until interrupted.
    #[arg(long, value_name = "SECS", num_args = 0..=1, default_missing_value = "2")]
    watch: Option<f64>,
}

/// One sample of every handler's partitions.
struct Sample {
    at: Instant,
    handlers: Vec<Value>,
}

async fn sample(admin: &mut Client) -> anyhow::Result<Sample> {
    let resp = check(admin.get("/v1/handlers").await?)?.json()?;
    Ok(Sample {
        at: Instant::now(),
        handlers: resp["handlers"].as_array().cloned().unwrap_or_default(),
    })
}

pub(super) async fn run(args: StatusArgs, endpoints: &Endpoints) -> anyhow::Result<()> {
    if let Some(secs) = args.watch
        && !(secs.is_finite() && secs >= MIN_WATCH_SECS)
    {
        anyhow::bail!("--watch {secs}: the period must be at least {MIN_WATCH_SECS} seconds");
    }
    let mut admin = Client::new(&endpoints.admin_url)?;
    let mut previous = sample(&mut admin).await?;
    let Some(period) = args.watch else {
        tokio::time::sleep(SAMPLE_WINDOW).await;
        let current = sample(&mut admin).await?;
        print!("{}", render(&previous, &current));
        return Ok(());
    };
    let period = Duration::from_secs_f64(period);
    // Redraw in place on a terminal; append tables (separated by a blank line) when piped.
    let clear = std::io::stdout().is_terminal();
    let shutdown = crate::server::shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = tokio::time::sleep(period) => {}
            () = &mut shutdown => return Ok(()),
        }
        let current = sample(&mut admin).await?;
        let table = render(&previous, &current);
        let mut out = std::io::stdout().lock();
        if clear {
            write!(out, "\x1b[2J\x1b[H")?;
        }
        writeln!(out, "{table}")?;
        out.flush()?;
        previous = current;
    }
}

/// The table for `current`, with rates measured since `previous`.
fn render(previous: &Sample, current: &Sample) -> String {
    let elapsed = current.at.saturating_duration_since(previous.at);
    let mut before: HashMap<(String, u64), u64> = HashMap::new();
    for h in &previous.handlers {
        for p in h["partitions"].as_array().into_iter().flatten() {
            if let (Some(name), Some(part), Some(done)) = (
                h["name"].as_str(),
                p["partition"].as_u64(),
                p["events_processed"].as_u64(),
            ) {
                before.insert((name.to_string(), part), done);
            }
        }
    }
    let mut rows = Vec::new();
    for h in &current.handlers {
        let name = h["name"].as_str().unwrap_or("?");
        for p in h["partitions"].as_array().into_iter().flatten() {
            let rate = match (
                p["partition"].as_u64(),
                p["events_processed"].as_u64(),
                elapsed.as_secs_f64(),
            ) {
                (Some(part), Some(done), secs) if secs > 0.0 => before
                    .get(&(name.to_string(), part))
                    .map(|b| done.saturating_sub(*b) as f64 / secs),
                _ => None,
            };
            rows.push(row(name, p, rate));
        }
    }
    if rows.is_empty() {
        return "no handlers deployed (deploy one with `procd deploy` or try `procd dev`)\n"
            .to_string();
    }
    render_table(&HEADERS, &rows)
}

fn row(handler: &str, p: &Value, rate: Option<f64>) -> Vec<String> {
    let num = |v: &Value| {
        v.as_u64()
            .map_or_else(|| "-".to_string(), |n| n.to_string())
    };
    let version = match p["version"].as_u64() {
        Some(0) | None => "-".to_string(),
        Some(v) => format!("v{v}"),
    };
    let lag_s = p["lag_ms"].as_u64().map_or_else(
        || "-".to_string(),
        |ms| format!("{:.1}", ms as f64 / 1000.0),
    );
    let state = p["status"].as_str().unwrap_or("-").to_string();
    vec![
        handler.to_string(),
        version,
        num(&p["partition"]),
        num(&p["committed_offset"]),
        num(&p["lag"]),
        lag_s,
        rate.map_or_else(|| "-".to_string(), |r| format!("{r:.0}")),
        state,
        num(&p["dead_letters"]),
    ]
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn sample(at: Instant, processed: u64) -> Sample {
        Sample {
            at,
            handlers: vec![json!({
                "name": "counter",
                "partitions": [
                    {"partition": 0, "version": 2, "committed_offset": 40, "lag": 3, "lag_ms": 1500,
                     "status": "running", "events_processed": processed, "dead_letters": 1},
                    {"partition": 1, "version": 0, "committed_offset": 0, "lag": 0, "lag_ms": 0,
                     "status": "idle", "events_processed": 0, "dead_letters": 0},
                ],
            })],
        }
    }

    #[test]
    fn rates_come_from_two_samples() {
        let t0 = Instant::now();
        let table = render(&sample(t0, 100), &sample(t0 + Duration::from_secs(2), 300));
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3, "{table}");
        assert!(lines[0].starts_with("HANDLER"), "{table}");
        let cells: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(
            cells,
            [
                "counter", "v2", "0", "40", "3", "1.5", "100", "running", "1"
            ]
        );
        let cells: Vec<&str> = lines[2].split_whitespace().collect();
        assert_eq!(
            cells,
            ["counter", "-", "1", "0", "0", "0.0", "0", "idle", "0"]
        );
    }

    #[test]
    fn a_restarted_server_reads_as_zero_not_negative() {
        let t0 = Instant::now();
        let table = render(&sample(t0, 500), &sample(t0 + Duration::from_secs(1), 10));
        let rate = table
            .lines()
            .nth(1)
            .and_then(|l| l.split_whitespace().nth(6).map(str::to_string));
        assert_eq!(rate.as_deref(), Some("0"), "{table}");
    }

    #[test]
    fn no_handlers_says_what_to_do() {
        let empty = Sample {
            at: Instant::now(),
            handlers: vec![],
        };
        assert!(render(&empty, &empty).contains("procd deploy"));
    }
}
