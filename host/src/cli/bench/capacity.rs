//! The capacity C the load benchmarks scale from: closed-loop, `connections` clients each sending its
//! next request as soon as the last one is answered, for a few seconds, on a server with admission off.
//! Closed-loop is right here (and only here): it finds the rate the server sustains with latency
//! bounded by the connection count, which is what an operator would rate it at.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;

use super::child::ChildServer;
use super::open_loop::{Latencies, ms};
use super::requests::{Bodies, Conn, Sent, append_request};

/// What the closed-loop run measured.
#[derive(Debug, Clone, Copy)]
pub(super) struct Capacity {
    /// Requests answered `202` per second, after the warm-up.
    pub requests_per_sec: f64,
    pub latency: Latencies,
    /// Requests answered otherwise (none expected with admission off).
    pub not_accepted: u64,
    pub connections: usize,
    pub secs: f64,
}

impl Capacity {
    /// A capacity given on the command line rather than measured.
    pub fn given(requests_per_sec: f64) -> Self {
        Self {
            requests_per_sec,
            latency: Latencies::default(),
            not_accepted: 0,
            connections: 0,
            secs: 0.0,
        }
    }

    pub fn measured(&self) -> bool {
        self.secs > 0.0
    }

    /// One line for the report.
    pub fn line(&self, bodies: &Bodies) -> String {
        let c = self.requests_per_sec;
        let rates = format!(
            "{c:.0} requests/s = {:.0} events/s = {:.1} MB/s",
            c * bodies.batch() as f64,
            c * bodies.len() as f64 / 1e6
        );
        if self.measured() {
            format!(
                "{rates} (closed loop, {} connections, {:.0} s after a warm-up, admission off; \
                 latency p50/p99 {}/{} ms; {} not accepted)",
                self.connections,
                self.secs,
                ms(self.latency.p50),
                ms(self.latency.p99),
                self.not_accepted
            )
        } else {
            format!("{rates} (given with --capacity)")
        }
    }
}

/// Measures the capacity of `server` appending to `topic` (already created).
pub(super) async fn measure(
    server: &ChildServer,
    topic: &str,
    bodies: Arc<Bodies>,
    connections: usize,
    secs: f64,
) -> anyhow::Result<Capacity> {
    let warmup = Duration::from_secs_f64((secs / 4.0).min(1.0));
    let started = Instant::now();
    let measure_from = started + warmup;
    let until = started + Duration::from_secs_f64(secs);
    let next = Arc::new(AtomicU64::new(0));
    let path: Arc<str> = Arc::from(format!("/v1/topics/{topic}/events"));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..connections.max(1) {
        let mut conn = Conn::new(server.data_addr());
        let host = server.data_addr().to_string();
        let (next, bodies, path) = (next.clone(), bodies.clone(), path.clone());
        tasks.spawn(async move {
            // (latency in µs of accepted requests answered after the warm-up, others)
            let (mut latencies, mut others) = (Vec::new(), 0u64);
            while Instant::now() < until {
                let request = next.fetch_add(1, Ordering::Relaxed);
                let body = bodies.body(request);
                let sent_at = Instant::now();
                let sent = match append_request(&path, &host, None, body) {
                    Ok(r) => conn.send(r).await,
                    Err(e) => Sent::Failed(e.to_string()),
                };
                let done = Instant::now();
                match sent {
                    Sent::Answered(202, _) if done >= measure_from && done <= until => {
                        latencies.push(
                            u32::try_from(done.duration_since(sent_at).as_micros())
                                .unwrap_or(u32::MAX),
                        );
                    }
                    Sent::Answered(202, _) => {}
                    _ => others += 1,
                }
            }
            (latencies, others)
        });
    }
    let mut latencies = Vec::new();
    let mut not_accepted = 0;
    while let Some(done) = tasks.join_next().await {
        let (l, o) = done.context("a capacity connection panicked")?;
        latencies.extend(l);
        not_accepted += o;
    }
    latencies.sort_unstable();
    let window = (until - measure_from).as_secs_f64();
    let requests_per_sec = latencies.len() as f64 / window.max(f64::MIN_POSITIVE);
    anyhow::ensure!(
        requests_per_sec > 0.0,
        "no request was accepted while measuring capacity ({not_accepted} refused or failed)"
    );
    Ok(Capacity {
        requests_per_sec,
        latency: Latencies::of(&latencies),
        not_accepted,
        connections,
        secs: window,
    })
}
