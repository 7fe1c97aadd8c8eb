//! `procd bench ingest`: how much of the storage's durable append rate survives the HTTP data plane.
//!
//! Two phases write the same events: event `i` has key `k<i>` and, as its value, a JSON string of exactly
//! `--value-bytes` bytes (quotes included) generated from `i`, so both phases store the same bytes and the
//! values compress no better than real ones would.
//!
//! - **(a) raw**: the events are routed by the server's partitioner over the same partitions, encoded as
//!   records (one buffer per group) *before* the clock starts, and appended straight to fjall by one
//!   writer thread per cell, each with its own [`Store`] (the cells' own options) owning the partitions
//!   `p % C == k`. Each writer stamps its group's time, commits one atomic batch and one fsync
//!   (`SyncData`) per group, and forms its groups as a cell writer does when its queue never runs dry:
//!   each request's share for the cell is added whole until the group holds at least
//!   `cell.group_commit_max_events` events. That is the best the server's writers can do with none of
//!   the work in front of them: the ceiling.
//! - **(b) http**: an in-process [`Server`] (defaults plus `--set`) on a fresh data directory, and
//!   `--connections` keep-alive clients (default 16: enough requests in flight that the writers' groups
//!   are about as full as (a)'s) posting NDJSON bodies of `--batch` events, built before the clock
//!   starts. Everything the server does is timed: HTTP, parsing, routing, encoding, queueing, group commit,
//!   the response, and the client reading it (the client checks the answers after the clock stops).
//!
//! Both phases write the same records to the same kind of Database on the same disk with the same
//! durability and the same group-size rule, and both are timed from the first append to the last
//! acknowledgement, so (b)/(a) is the share of the storage ceiling the server delivers. The client runs in
//! this process and shares the CPUs with the server, as a load generator on the same host would.
//!
//! fsync latency on shared or virtual disks drifts by a factor of two within seconds, so the phases run
//! interleaved for `--rounds` rounds, each on fresh directories, and the figures are totals over rounds:
//! drift then weighs on both phases alike instead of on whichever ran during a slow spell.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use bytes::Bytes;
use clap::Args;

use super::server::post_all;
use crate::cell::AppendEvents;
use crate::client::Client;
use crate::config::Config;
use crate::ingest::partitioner;
use crate::log::layout::Shape;
use crate::log::{PartitionLog, PayloadRef, RecordRef, Store};
use crate::server::{AppState, Server};

use super::util::{Scratch, check_range, load_average, percentile, process_cpu};
use super::workload::{Workload, WorkloadArgs, event_key, ndjson_line};

/// The topic both phases write.
const TOPIC: &str = "bench";
/// The acceptance target: HTTP ingest should reach this share of the raw append rate.
const TARGET_RATIO: f64 = 0.8;
/// Default connections of (b). Phase (a) commits groups of at least `cell.group_commit_max_events`
/// (1 244 events on average with the defaults); with 4 connections (b)'s writers find only ~750 events
/// waiting per commit, so (b) paid two thirds more fsyncs per event than (a). 16 fill them to ~1 130
/// (32 gave no more: its requests then wait longer for the commits).
const CONNECTIONS: usize = 16;

/// `procd bench ingest` flags.
#[derive(Debug, Args)]
pub struct IngestArgs {
    /// Events each phase writes in each round (a million keeps each phase near a second or more, so
    /// that start-up and the last fsync do not decide the figure).
    #[arg(long, default_value_t = 1_000_000)]
    events: usize,
    /// Rounds of (a) then (b); figures are totals over all rounds.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    #[command(flatten)]
    load: WorkloadArgs,
}

/// Validated settings of a run.
#[derive(Debug, Clone)]
struct Plan {
    events: usize,
    rounds: usize,
    /// The request stream and the server's configuration; phase (a) takes its shape and cell options
    /// from it too.
    load: Workload,
}

impl Plan {
    fn new(args: IngestArgs) -> anyhow::Result<Self> {
        check_range("--events", args.events, 1, 100_000_000)?;
        check_range("--rounds", args.rounds, 1, 1000)?;
        Ok(Self {
            events: args.events,
            rounds: args.rounds,
            load: Workload::new(
                args.load.with_default_connections(CONNECTIONS),
                args.events,
                2..=1 << 20,
                &[],
            )?,
        })
    }

    fn shape(&self) -> Shape {
        Shape {
            partitions: self.load.config.partitions,
            cells: self.load.config.cells,
        }
    }

    fn group_events(&self) -> usize {
        self.load.config.cell.group_commit_max_events.max(1)
    }

    /// The event numbers of each request, in order: `--batch` at a time.
    fn requests(&self) -> impl Iterator<Item = std::ops::Range<usize>> + use<> {
        self.load.requests(self.events)
    }
}

/// What a phase measured, summed over rounds.
#[derive(Default)]
struct Measured {
    events: usize,
    elapsed: Duration,
    /// CPU time of the whole process (server, client, storage threads) while the clock ran; `None` where
    /// it cannot be read.
    cpu: Option<Duration>,
    /// Per group commit in (a), per request in (b).
    latencies: Vec<Duration>,
    /// Group commits the cell writers made in (b) (from their metrics: in (a) each latency is one).
    commits: u64,
}

impl Measured {
    fn events_per_sec(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64().max(f64::MIN_POSITIVE)
    }

    fn add(&mut self, round: Measured) {
        self.events += round.events;
        self.elapsed += round.elapsed;
        self.cpu = if self.latencies.is_empty() {
            round.cpu
        } else {
            self.cpu.zip(round.cpu).map(|(a, b)| a + b)
        };
        self.latencies.extend(round.latencies);
        self.commits += round.commits;
    }
}

/// CPU used since `before`, if both readings exist.
fn cpu_since(before: Option<Duration>) -> Option<Duration> {
    process_cpu()
        .zip(before)
        .map(|(now, before)| now.saturating_sub(before))
}

pub(super) async fn run(args: IngestArgs) -> anyhow::Result<()> {
    let plan = Plan::new(args)?;
    let scratch = Scratch::create(&plan.load.parent)?;
    print_parameters(&plan, scratch.path());

    let bodies = plan.load.bodies(plan.events, |i| plan.load.value(i));
    let (mut raw, mut http) = (Measured::default(), Measured::default());
    let mut ratios = Vec::with_capacity(plan.rounds);
    for round in 0..plan.rounds {
        let raw_dir = Scratch::create(scratch.path())?;
        let raw_round = {
            let (plan, dir) = (plan.clone(), raw_dir.path().to_path_buf());
            tokio::task::spawn_blocking(move || raw_phase(&plan, &dir))
                .await
                .context("phase (a) panicked")??
        };
        drop(raw_dir);
        let server_dir = Scratch::create(scratch.path())?;
        let http_round = http_phase(&plan, server_dir.path().to_path_buf(), bodies.clone())
            .await
            .with_context(|| format!("phase (b), round {}", round + 1))?;
        drop(server_dir);
        ratios
            .push(http_round.events_per_sec() / raw_round.events_per_sec().max(f64::MIN_POSITIVE));
        raw.add(raw_round);
        http.add(http_round);
    }
    print_results(&plan, &raw, &http, &ratios);
    Ok(())
}

// ---------------------------------------------------------------------------------------------------
// (a) raw fjall append

/// One raw writer: a cell's Database, its partitions, and the groups it will commit.
struct RawWriter {
    store: Store,
    logs: HashMap<u32, PartitionLog>,
    /// Each group commit's events, in one buffer as a cell writer gets a request's share.
    groups: Vec<AppendEvents>,
}

impl RawWriter {
    /// Commits every group, one fsync each, like a cell writer (which also stamps each group's
    /// records with the time); returns each commit's duration.
    fn run(&mut self) -> anyhow::Result<Vec<Duration>> {
        let mut next_offsets: HashMap<u32, u64> = HashMap::new();
        let mut commits = Vec::with_capacity(self.groups.len());
        for group in std::mem::take(&mut self.groups) {
            let started = Instant::now();
            let now = crate::cell::now_ms();
            let mut batch = self.store.batch();
            for (partition, record, _) in group.into_events() {
                let log = self.logs.get(&partition).ok_or_else(|| {
                    anyhow!("event routed to partition {partition}, which this writer does not own")
                })?;
                let offset = next_offsets.entry(partition).or_insert(0);
                batch.append(log, *offset, record, now);
                *offset += 1;
            }
            self.store.commit(batch, true)?;
            commits.push(started.elapsed());
        }
        Ok(commits)
    }
}

fn raw_phase(plan: &Plan, root: &Path) -> anyhow::Result<Measured> {
    let shape = plan.shape();
    let options = plan.load.config.cell_options();
    let group_events = plan.group_events();
    let mut writers = Vec::new();
    for cell in 0..shape.cells {
        let store = Store::open(&root.join(format!("cell-{cell}")), options.store.clone())?;
        let mut logs = HashMap::new();
        for partition in shape.partitions_of(cell) {
            logs.insert(partition, store.partition(TOPIC, partition)?);
        }
        writers.push(RawWriter {
            store,
            logs,
            groups: Vec::new(),
        });
    }

    // Route and encode everything up front: (a) times storage alone. Groups are formed the way a cell
    // writer forms them when its queue is never empty: each request's share for the cell is added whole,
    // until the group holds at least `cell.group_commit_max_events` events.
    let mut filling: Vec<AppendEvents> = writers.iter().map(|_| AppendEvents::default()).collect();
    for request in plan.requests() {
        for i in request {
            let key = event_key(i);
            let partition = partitioner::route(Some(key.as_bytes()), None, shape.partitions);
            let value = plan.load.value(i);
            let record = RecordRef {
                timestamp_ms: 0,
                key: Some(key.as_bytes()),
                value: PayloadRef::Json(value.as_bytes()),
                headers: Vec::new(),
                id: None,
            };
            let cell = shape.cell_of(partition) as usize;
            let Some(group) = filling.get_mut(cell) else {
                bail!(
                    "partition {partition} maps to cell {cell}, but there are {} cells",
                    shape.cells
                );
            };
            group.push(partition, &record, None);
        }
        // The request's shares are in; close every group that reached the cap.
        for (writer, group) in writers.iter_mut().zip(filling.iter_mut()) {
            if group.len() >= group_events {
                writer.groups.push(std::mem::take(group));
            }
        }
    }
    for (writer, rest) in writers.iter_mut().zip(filling) {
        if !rest.is_empty() {
            writer.groups.push(rest);
        }
    }

    // Every writer waits at the gate until all are started, so the clock covers only the appends.
    let gate = RwLock::new(());
    let (elapsed, cpu, outcomes) = std::thread::scope(|scope| {
        let closed = gate.write().unwrap_or_else(PoisonError::into_inner);
        let mut handles = Vec::new();
        let mut spawn_error = None;
        for (cell, writer) in writers.iter_mut().enumerate() {
            let gate = &gate;
            let spawned = std::thread::Builder::new()
                .name(format!("bench-raw-{cell}"))
                .spawn_scoped(scope, move || {
                    drop(gate.read().unwrap_or_else(PoisonError::into_inner));
                    writer.run()
                });
            match spawned {
                Ok(handle) => handles.push(handle),
                Err(e) => {
                    spawn_error = Some(e);
                    break;
                }
            }
        }
        let cpu_before = process_cpu();
        let started = Instant::now();
        drop(closed);
        let mut outcomes: Vec<_> = handles.into_iter().map(|h| h.join()).collect();
        let (elapsed, cpu) = (started.elapsed(), cpu_since(cpu_before));
        if let Some(e) = spawn_error {
            outcomes.push(Ok(Err(
                anyhow!(e).context("cannot start a raw writer thread")
            )));
        }
        (elapsed, cpu, outcomes)
    });
    // The Databases close only now, after the clock, as the server's close only after its clock stops;
    // closing waits for fjall's background workers to stop, so none of them runs on into phase (b).
    drop(writers);
    let mut latencies = Vec::new();
    for outcome in outcomes {
        match outcome {
            Ok(commits) => latencies.extend(commits?),
            Err(_) => bail!("a raw writer thread panicked"),
        }
    }
    Ok(Measured {
        events: plan.events,
        elapsed,
        cpu,
        commits: latencies.len() as u64,
        latencies,
    })
}

// ---------------------------------------------------------------------------------------------------
// (b) HTTP ingest

async fn http_phase(
    plan: &Plan,
    data_dir: PathBuf,
    bodies: Arc<Vec<Bytes>>,
) -> anyhow::Result<Measured> {
    let config = Config {
        data_dir,
        ..plan.load.config.clone()
    };
    let server = Server::open(config).context("cannot open the benchmark server")?;
    let state = server.state().clone();
    let (data, admin) = server.bind().await?;
    let data_url = format!("http://{}", data.local_addr()?);
    let admin_url = format!("http://{}", admin.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(server.run(data, admin, async move {
        let _ = stopped.await;
    }));

    let measured = drive_http(plan, &data_url, &admin_url, bodies)
        .await
        .map(|measured| Measured {
            commits: group_commits(&state),
            ..measured
        });
    let stored = stored_events(&state);

    let _ = stop.send(());
    running.await.context("the benchmark server panicked")?;
    // The last handle on the cells: their Databases close here, before the directory is removed.
    drop(state);

    let measured = measured?;
    if stored != plan.events as u64 {
        bail!(
            "the server acknowledged {} events but its partitions hold {stored}",
            plan.events
        );
    }
    Ok(measured)
}

/// Group commits the cell writers have made, from their metrics.
fn group_commits(state: &AppState) -> u64 {
    state
        .cells
        .iter()
        .map(|cell| cell.metrics().group_commit_events.snapshot().count)
        .sum()
}

/// Events durable in the benchmark topic, summed over its partitions.
fn stored_events(state: &AppState) -> u64 {
    (0..state.shape.partitions)
        .filter_map(|p| state.cell_for(p).partition(TOPIC, p))
        .map(|view| view.end_offset())
        .sum()
}

async fn drive_http(
    plan: &Plan,
    data_url: &str,
    admin_url: &str,
    bodies: Arc<Vec<Bytes>>,
) -> anyhow::Result<Measured> {
    let created = Client::new(admin_url)?
        .post_json("/v1/topics", &serde_json::json!({ "name": TOPIC }))
        .await?;
    crate::cli::check(created).context("cannot create the benchmark topic")?;
    let cpu_before = process_cpu();
    let started = Instant::now();
    let posted = post_all(data_url, TOPIC, plan.load.connections, bodies).await?;
    let (elapsed, cpu) = (started.elapsed(), cpu_since(cpu_before));
    posted.check(plan.events)?;
    Ok(Measured {
        events: plan.events,
        elapsed,
        cpu,
        latencies: posted.latencies,
        commits: 0,
    })
}

// ---------------------------------------------------------------------------------------------------
// Output

fn print_parameters(plan: &Plan, dir: &Path) {
    let shape = plan.shape();
    let sample: Vec<usize> = (0..plan.events)
        .step_by((plan.events / 1000).max(1))
        .map(|i| ndjson_line(i, &plan.load.value(i)).len())
        .collect();
    let avg_line = sample.iter().sum::<usize>() / sample.len().max(1);
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("procd bench ingest");
    println!(
        "  events        {} per phase per round, {} rounds of (a) then (b), fresh directories each",
        plan.events, plan.rounds
    );
    println!(
        "  event         key \"k<i>\", value a {}-byte JSON string; NDJSON line ~{avg_line} B",
        plan.load.value_bytes
    );
    println!(
        "  shape         {} partitions over {} cells, Kafka murmur2 partitioner on the key",
        shape.partitions, shape.cells
    );
    println!(
        "  group commit  one writer thread per cell; a group takes whole request shares until it holds \
         >= {} events; one fsync (SyncData) per group",
        plan.group_events()
    );
    println!(
        "  (a) raw       {} writer threads, one fjall Database each (partitions p % {} == k), records pre-encoded",
        shape.cells, shape.cells
    );
    println!(
        "  (b) http      {} keep-alive connections, {} NDJSON requests of {} events per round, bodies \
         pre-built, client in-process",
        plan.load.connections,
        plan.events.div_ceil(plan.load.batch),
        plan.load.batch
    );
    let set = if plan.load.set.is_empty() {
        "none".to_string()
    } else {
        plan.load.set.join(" ")
    };
    println!("  server        defaults, procd.toml and PROCD_* not read; --set: {set}");
    println!("  data dir      {} (removed afterwards)", dir.display());
    // Other work on the machine takes CPU and disk from both phases, but more from (b), which needs more
    // CPU per event: say how busy the machine was, so a low ratio can be read for what it is.
    match load_average() {
        Some(load) => println!("  machine       {cpus} CPUs; load average {load} (1 min) at start"),
        None => println!("  machine       {cpus} CPUs"),
    }
    println!();
}

fn print_results(plan: &Plan, raw: &Measured, http: &Measured, ratios: &[f64]) {
    let mb_per_sec = |m: &Measured| m.events_per_sec() * plan.load.value_bytes as f64 / 1e6;
    let cores = |m: &Measured| match m.cpu {
        Some(cpu) => format!(
            "{:.2}",
            cpu.as_secs_f64() / m.elapsed.as_secs_f64().max(f64::MIN_POSITIVE)
        ),
        None => "-".into(),
    };
    println!(
        "{:<24} {:>10} {:>9} {:>12} {:>10} {:>9}",
        "phase", "events", "seconds", "events/s", "value MB/s", "CPU busy"
    );
    for (name, m) in [
        ("(a) raw fjall append", raw),
        ("(b) http ndjson ingest", http),
    ] {
        println!(
            "{name:<24} {:>10} {:>9.3} {:>12.0} {:>10.1} {:>9}",
            m.events,
            m.elapsed.as_secs_f64(),
            m.events_per_sec(),
            mb_per_sec(m),
            cores(m)
        );
    }
    println!(
        "(CPU busy: CPU time of the whole process while the clock ran, in cores; MB/s: 10^6 value bytes)"
    );
    println!();
    let ratio = http.events_per_sec() / raw.events_per_sec().max(f64::MIN_POSITIVE);
    let verdict = if ratio >= TARGET_RATIO {
        "met"
    } else {
        "NOT met"
    };
    let per_round: Vec<String> = ratios.iter().map(|r| format!("{r:.2}")).collect();
    println!(
        "(b)/(a) = {ratio:.2}   target >= {TARGET_RATIO:.2}: {verdict}   (per round: {})",
        per_round.join(" ")
    );
    let per_commit = raw.events as f64 / raw.commits.max(1) as f64;
    println!(
        "(a) commit:  {}; {per_commit:.0} events per commit on average",
        latency_line(&raw.latencies, "commits")
    );
    println!("(b) request: {}", latency_line(&http.latencies, "requests"));
    println!(
        "(b) commits: {}, {:.0} events per commit on average",
        http.commits,
        http.events as f64 / http.commits.max(1) as f64
    );
}

fn latency_line(latencies: &[Duration], what: &str) -> String {
    let mut sorted = latencies.to_vec();
    sorted.sort_unstable();
    let mut line = String::new();
    for (label, q) in [("p50", 0.5), ("p99", 0.99), ("max", 1.0)] {
        let _ = write!(
            line,
            "{label} {:.2} ms, ",
            percentile(&sorted, q).as_secs_f64() * 1e3
        );
    }
    let _ = write!(line, "over {} {what}", sorted.len());
    line
}
