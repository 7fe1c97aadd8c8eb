//! Open-loop load: requests sent at a fixed arrival rate on a schedule, whatever the server answers,
//! and the record of what each got. Shared by `procd bench surge` and `procd bench fairness`.
//!
//! A closed-loop client (send, wait, send) slows down with the server and so never measures the wait of
//! the requests it did not send (coordinated omission). Here each request has an *intended* send time
//! (`phase start + i / rate`) and its latency is measured from that time, so time spent waiting for a
//! free connection counts. A dispatcher per stream hands due requests to a bounded backlog that
//! `connections` keep-alive connections drain; a request that finds the backlog full is recorded as
//! *not sent* rather than queued without bound. Bodies are built by the connection that sends them
//! (a template copy, see [`Bodies`]), so the dispatcher only keeps time. Its timer has tokio's 1 ms
//! resolution: send lateness (actual − intended) is recorded so its share of a latency can be seen.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::Deserialize;

use super::child::{Sample, sample};
use super::requests::{Bodies, Conn, Sent, append_request};
use super::util::process_cpu;

/// How often server RSS and CPU are sampled.
pub(super) const SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// Errors kept verbatim for the report (the rest are only counted).
const KEPT_ERRORS: usize = 5;

/// A stretch of constant arrival rate.
#[derive(Debug, Clone)]
pub(super) struct Phase {
    pub name: &'static str,
    pub requests_per_sec: f64,
    pub secs: f64,
}

impl Phase {
    /// Requests the phase schedules.
    pub fn requests(&self) -> u64 {
        (self.requests_per_sec * self.secs).round().max(0.0) as u64
    }
}

/// One client's load: its phases in order, over its own connections.
#[derive(Debug, Clone)]
pub(super) struct Stream {
    /// Sent as `Procd-Tenant` when set.
    pub tenant: Option<String>,
    pub phases: Vec<Phase>,
    pub connections: usize,
    /// Due requests that may wait for a free connection before further ones are not sent.
    pub backlog: usize,
}

impl Stream {
    pub fn requests(&self) -> u64 {
        self.phases.iter().map(Phase::requests).sum()
    }
}

/// What a request got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    /// `202`: every event accepted.
    Accepted,
    /// `207`: some events accepted (which ones: [`Recording::partial`]).
    Partial,
    /// Any other status: nothing accepted.
    Refused(u16),
    /// No answer (connection error, timeout): the outcome is unknown.
    Failed,
    /// Never sent: every connection was busy and the backlog full.
    NotSent,
}

/// One scheduled request.
#[derive(Debug, Clone, Copy)]
pub(super) struct Record {
    /// Its number over the whole run (streams numbered one after the other); its events are
    /// `request × batch ..`.
    pub request: u64,
    pub stream: usize,
    /// Intended send time, from the start of the run.
    pub intended_us: u64,
    /// How late it was actually sent.
    pub late_us: u32,
    /// From its intended send time to the end of its answer.
    pub latency_us: u32,
    pub outcome: Outcome,
    /// Events accepted.
    pub accepted: u32,
}

impl Record {
    /// Second of the run it was due in.
    pub fn second(&self) -> usize {
        (self.intended_us / 1_000_000) as usize
    }
}

/// Everything a run recorded.
pub(super) struct Recording {
    /// One per scheduled request, in request order (`records[i].request == i`).
    pub records: Vec<Record>,
    /// Per-event acceptance of `207` answers.
    pub partial: HashMap<u64, Vec<bool>>,
    /// TCP connections each stream opened.
    pub connects: Vec<u64>,
    /// Some of the failures, verbatim.
    pub errors: Vec<String>,
    pub elapsed: Duration,
    /// CPU time of this process (the load generator) during the run.
    pub client_cpu: Option<Duration>,
    pub samples: Vec<Sample>,
}

struct Job {
    request: u64,
    intended: Instant,
}

struct Worked {
    records: Vec<Record>,
    partial: Vec<(u64, Vec<bool>)>,
    connects: u64,
    errors: Vec<String>,
}

/// Runs `streams` against the data plane at `addr`, appending to `topic`, sampling process `pid`.
pub(super) async fn run(
    addr: &str,
    topic: &str,
    bodies: Arc<Bodies>,
    streams: &[Stream],
    pid: u32,
) -> anyhow::Result<Recording> {
    let total: u64 = streams.iter().map(Stream::requests).sum();
    anyhow::ensure!(
        bodies.fits(total),
        "{total} requests of {} events are too many to number; shorten the run",
        bodies.batch()
    );
    let path: Arc<str> = Arc::from(format!("/v1/topics/{topic}/events"));
    // Connections are opened before the clock starts, so the first second is not all handshakes.
    let mut conns: Vec<Vec<Conn>> = Vec::with_capacity(streams.len());
    for stream in streams {
        let mut own = Vec::with_capacity(stream.connections);
        for _ in 0..stream.connections.max(1) {
            own.push(Conn::new(addr));
        }
        conns.push(own);
    }

    let client_cpu_before = process_cpu();
    let started = Instant::now() + Duration::from_millis(20);
    let (stop_sampler, stopped) = tokio::sync::oneshot::channel();
    let sampler = tokio::spawn(sample(pid, started, SAMPLE_EVERY, stopped));
    let mut dispatchers = tokio::task::JoinSet::new();
    let mut workers = tokio::task::JoinSet::new();
    let mut base = 0u64;
    for (index, (stream, own)) in streams.iter().zip(conns).enumerate() {
        let (tx, rx) = flume::bounded::<Job>(stream.backlog.max(1));
        for conn in own {
            let (rx, bodies, path) = (rx.clone(), bodies.clone(), path.clone());
            let tenant = stream.tenant.clone();
            let host = addr.to_string();
            workers.spawn(work(conn, rx, bodies, path, host, tenant, index, started));
        }
        dispatchers.spawn(dispatch(stream.phases.clone(), base, index, started, tx));
        base += stream.requests();
    }

    let mut records = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    while let Some(done) = dispatchers.join_next().await {
        records.extend(done.context("a dispatcher panicked")?);
    }
    let mut partial = HashMap::new();
    let mut connects = vec![0; streams.len()];
    let mut errors = Vec::new();
    while let Some(done) = workers.join_next().await {
        let (stream, worked) = done.context("a load connection panicked")?;
        records.extend(worked.records);
        partial.extend(worked.partial);
        connects[stream] += worked.connects;
        for e in worked.errors {
            if errors.len() < KEPT_ERRORS {
                errors.push(e);
            }
        }
    }
    let elapsed = started.elapsed();
    let client_cpu = process_cpu()
        .zip(client_cpu_before)
        .map(|(now, before)| now.saturating_sub(before));
    let _ = stop_sampler.send(());
    let samples = sampler.await.context("the sampler panicked")?;
    records.sort_unstable_by_key(|r| r.request);
    anyhow::ensure!(
        records.len() as u64 == total
            && records
                .iter()
                .enumerate()
                .all(|(i, r)| r.request == i as u64),
        "the run recorded {} outcomes for {total} requests",
        records.len()
    );
    Ok(Recording {
        records,
        partial,
        connects,
        errors,
        elapsed,
        client_cpu,
        samples,
    })
}

/// Hands each request of `phases` to the connections at its intended time; records those the
/// backlog had no room for.
async fn dispatch(
    phases: Vec<Phase>,
    base: u64,
    stream: usize,
    started: Instant,
    tx: flume::Sender<Job>,
) -> Vec<Record> {
    let mut not_sent = Vec::new();
    let mut request = base;
    let mut phase_start = Duration::ZERO;
    for phase in &phases {
        let n = phase.requests();
        let gap_secs = 1.0 / phase.requests_per_sec.max(f64::MIN_POSITIVE);
        for i in 0..n {
            let intended = started + phase_start + Duration::from_secs_f64(i as f64 * gap_secs);
            // Sleep only when ahead: requests that came due during a sleep go out back to back.
            if intended > Instant::now() {
                tokio::time::sleep_until(intended.into()).await;
            }
            match tx.try_send(Job { request, intended }) {
                Ok(()) => {}
                Err(_) => not_sent.push(Record {
                    request,
                    stream,
                    intended_us: micros(intended.saturating_duration_since(started)),
                    late_us: 0,
                    latency_us: 0,
                    outcome: Outcome::NotSent,
                    accepted: 0,
                }),
            }
            request += 1;
        }
        phase_start += Duration::from_secs_f64(phase.secs);
    }
    not_sent
}

/// One connection: sends the jobs it takes from the backlog and records their outcomes.
#[allow(clippy::too_many_arguments)]
async fn work(
    mut conn: Conn,
    rx: flume::Receiver<Job>,
    bodies: Arc<Bodies>,
    path: Arc<str>,
    host: String,
    tenant: Option<String>,
    stream: usize,
    started: Instant,
) -> (usize, Worked) {
    #[derive(Deserialize)]
    struct Results {
        results: Vec<EventResult>,
    }
    #[derive(Deserialize)]
    struct EventResult {
        offset: Option<u64>,
    }
    let batch = bodies.batch() as u32;
    let mut worked = Worked {
        records: Vec::new(),
        partial: Vec::new(),
        connects: 0,
        errors: Vec::new(),
    };
    while let Ok(job) = rx.recv_async().await {
        let sent_at = Instant::now();
        let body = bodies.body(job.request);
        let sent = match append_request(&path, &host, tenant.as_deref(), body) {
            Ok(request) => conn.send(request).await,
            Err(e) => Sent::Failed(format!("cannot build a request: {e}")),
        };
        let done = Instant::now();
        let (outcome, accepted) = match sent {
            Sent::Answered(202, _) => (Outcome::Accepted, batch),
            Sent::Answered(207, body) => match serde_json::from_slice::<Results>(&body) {
                Ok(r) => {
                    let mask: Vec<bool> = r.results.iter().map(|o| o.offset.is_some()).collect();
                    let accepted = mask.iter().filter(|&&a| a).count() as u32;
                    worked.partial.push((job.request, mask));
                    (Outcome::Partial, accepted)
                }
                Err(e) => {
                    worked.errors.push(format!("unexpected 207 answer: {e}"));
                    (Outcome::Failed, 0)
                }
            },
            Sent::Answered(status, _) => (Outcome::Refused(status), 0),
            Sent::Failed(e) => {
                if worked.errors.len() < KEPT_ERRORS {
                    worked.errors.push(e);
                }
                (Outcome::Failed, 0)
            }
        };
        worked.records.push(Record {
            request: job.request,
            stream,
            intended_us: micros(job.intended.saturating_duration_since(started)),
            late_us: micros(sent_at.saturating_duration_since(job.intended)) as u32,
            latency_us: micros(done.saturating_duration_since(job.intended)).min(u32::MAX as u64)
                as u32,
            outcome,
            accepted,
        });
    }
    worked.connects = conn.connects;
    (stream, worked)
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Counts and latencies of a set of records.
#[derive(Debug, Default, Clone)]
pub(super) struct Tally {
    pub requests: u64,
    pub events_offered: u64,
    pub events_accepted: u64,
    pub accepted_requests: u64,
    pub refused_429: u64,
    pub refused_503: u64,
    pub refused_other: u64,
    pub failed: u64,
    pub not_sent: u64,
    /// Latencies in µs of requests with events accepted, and of refused ones.
    pub accepted_us: Vec<u32>,
    pub refused_us: Vec<u32>,
    pub late_us: Vec<u32>,
    /// Service times (from the actual send to the answer): the server's share of the latency, the
    /// rest being the wait for a free connection.
    pub accepted_service_us: Vec<u32>,
    pub refused_service_us: Vec<u32>,
}

impl Tally {
    pub fn add(&mut self, r: &Record, batch: usize) {
        self.requests += 1;
        self.events_offered += batch as u64;
        self.events_accepted += u64::from(r.accepted);
        match r.outcome {
            Outcome::Accepted | Outcome::Partial => {
                self.accepted_requests += 1;
                self.accepted_us.push(r.latency_us);
                self.accepted_service_us
                    .push(r.latency_us.saturating_sub(r.late_us));
            }
            Outcome::Refused(status) => {
                match status {
                    429 => self.refused_429 += 1,
                    503 => self.refused_503 += 1,
                    _ => self.refused_other += 1,
                }
                self.refused_us.push(r.latency_us);
                self.refused_service_us
                    .push(r.latency_us.saturating_sub(r.late_us));
            }
            Outcome::Failed => self.failed += 1,
            Outcome::NotSent => self.not_sent += 1,
        }
        if r.outcome != Outcome::NotSent {
            self.late_us.push(r.late_us);
        }
    }

    /// Sorts the latencies, for [`Latencies::of`].
    pub fn finish(&mut self) {
        self.accepted_us.sort_unstable();
        self.refused_us.sort_unstable();
        self.late_us.sort_unstable();
        self.accepted_service_us.sort_unstable();
        self.refused_service_us.sort_unstable();
    }
}

/// Percentiles of sorted latencies, in ms.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Latencies {
    pub n: usize,
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Latencies {
    pub fn of(sorted_us: &[u32]) -> Self {
        let ms = |q: f64| f64::from(super::util::percentile(sorted_us, q)) / 1000.0;
        Self {
            n: sorted_us.len(),
            p50: ms(0.5),
            p99: ms(0.99),
            p999: ms(0.999),
            max: ms(1.0),
        }
    }

    /// `p50/p99/p999/max` in ms, or `-` without samples.
    pub fn cell(&self) -> String {
        if self.n == 0 {
            return "-".into();
        }
        format!(
            "{}/{}/{}/{}",
            ms(self.p50),
            ms(self.p99),
            ms(self.p999),
            ms(self.max)
        )
    }
}

/// Milliseconds, with fewer decimals as they grow.
pub(super) fn ms(v: f64) -> String {
    if v < 10.0 {
        format!("{v:.2}")
    } else if v < 100.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.0}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_schedule_rate_times_duration() {
        let p = Phase {
            name: "x",
            requests_per_sec: 250.0,
            secs: 2.5,
        };
        assert_eq!(p.requests(), 625);
    }

    #[test]
    fn a_tally_splits_refusals_by_status() {
        let mut t = Tally::default();
        let rec = |outcome, accepted, latency_us| Record {
            request: 0,
            stream: 0,
            intended_us: 0,
            late_us: 0,
            latency_us,
            outcome,
            accepted,
        };
        t.add(&rec(Outcome::Accepted, 10, 3000), 10);
        t.add(&rec(Outcome::Refused(429), 0, 100), 10);
        t.add(&rec(Outcome::Refused(503), 0, 200), 10);
        t.add(&rec(Outcome::Refused(400), 0, 300), 10);
        t.add(&rec(Outcome::NotSent, 0, 0), 10);
        t.finish();
        assert_eq!(
            (t.requests, t.events_offered, t.events_accepted),
            (5, 50, 10)
        );
        assert_eq!((t.refused_429, t.refused_503, t.refused_other), (1, 1, 1));
        assert_eq!(t.not_sent, 1);
        let refused = Latencies::of(&t.refused_us);
        assert_eq!((refused.p50, refused.max), (0.2, 0.3));
    }
}
