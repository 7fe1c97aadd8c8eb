//! The crash test: procd acknowledges an event (`202`, or an offset in a `207`) only once it is durable, so
//! killing the server at any moment must never lose, move or duplicate an acknowledged event.
//!
//! Each cycle starts `procd serve` on the same data directory (8 partitions in 2 cells), lets several
//! concurrent clients post NDJSON batches of 1 to 200 events, and SIGKILLs the server after a random delay
//! while requests are in flight. Every event carries a unique value (`{"cycle","client","n"}`). After the last
//! cycle the server is started once more and every partition is read back in full. The test proves that:
//!
//! - every partition's offsets are exactly `0..end`: no holes, nothing out of place;
//! - every acknowledged event is at the partition and offset it was given, with the value it was sent, so
//!   an offset is never handed out twice across a crash;
//! - no event is in the log twice: exactly once for acknowledged events, at most once for events whose
//!   request failed (those may or may not have been written);
//! - a partition's durable end never moves backwards across a restart (checked at every restart, so a loss
//!   is reported with the cycle that caused it).
//!
//! A second scenario, `crash_counter`, runs the same cycles with the `counter` example handler deployed
//! on the topic (every event is keyed by one of 64 keys), so kills also land while batches are processed
//! and their outputs, state and offsets committed. After the last restart it waits until the handler has
//! processed the whole input log and proves exactly-once processing:
//!
//! - everything above holds for the input topic (every acknowledged event is in it, once, where it was
//!   acknowledged);
//! - per partition, the output log is exactly one record per input event, in input order, with the
//!   event's key and its running count: so for each key the outputs are `1..=n`, each value once, where
//!   `n` is the number of events with that key in the input log. Events whose request was cut off by
//!   the kill may still be in the input log; they count as much as acknowledged ones;
//! - the handler's state holds `n`: one more event per key is answered with `n + 1`.
//!
//! What it cannot show: SIGKILL ends the process but keeps the kernel's page cache, so a missing or
//! misplaced fsync would only show up on power loss, which this test does not simulate.
//!
//! It is its own test binary (`harness = false`) so long runs can ask for more cycles:
//! `cargo test --release -p procd --test crash -- --cycles 200 [--scenario log|counter|all] [--seed S]
//! [--clients K]`; or set `PROCD_CRASH_CYCLES`, which also works when other test binaries receive the same
//! arguments. Without either, `crash` runs 20 cycles and `crash_counter` 10. The seed fixes the schedule
//! (kill delays, batch sizes, keys) and is printed so a failure can be replayed; thread timing still
//! differs between runs. libtest's own flags are accepted and mostly ignored; name filters select the
//! scenarios by their names, `crash` and `crash_counter`, and one that matches neither skips them.

#[path = "../harness/mod.rs"]
mod harness;

use std::collections::{HashMap, HashSet};
use std::fmt::{self, Write as _};
use std::ops::RangeInclusive;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use harness::guests::example;
use harness::{TestHost, TestResult, ensure_status};
use procd::client::{Client, Response};
use serde_json::Value;

/// Cycles in CI: each is a start, a burst of ingest and a SIGKILL.
const DEFAULT_CYCLES: u32 = 20;
/// Cycles of the counter scenario in CI: each restart also replays the handler's commits, and the first
/// deploy compiles the component (seconds in a debug build), so fewer cycles keep it near a minute.
const DEFAULT_COUNTER_CYCLES: u32 = 10;
/// Concurrent clients: enough that group commits hold several requests when the kill lands.
const DEFAULT_CLIENTS: u32 = 4;
/// Several partitions per cell, so one group commit (one atomic batch) spans partitions.
const PARTITIONS: u32 = 8;
const CELLS: u32 = 2;
const TOPIC: &str = "crash";
/// The counter scenario's input and output topics and handler.
const COUNTER_INPUT: &str = "counted";
const COUNTER_OUTPUT: &str = "counts";
const COUNTER_HANDLER: &str = "counter";
/// Keys of the counter scenario's events: few enough that every key is counted hundreds of times in a
/// run, and `key-0`..`key-63` reach all 8 partitions.
const COUNTER_KEYS: u64 = 64;
/// How long the handler gets to process the whole input log after the last restart. A debug build on
/// two cores processes several thousand events per second; long release runs hold a few million.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(600);
/// The smallest memtables procd allows (1 MiB), so memtables are flushed to tables during the run (about
/// once per partition in a 20-cycle debug run, dozens of times in long runs) and crashes land on flushes
/// too, not only on journal appends.
const SETTINGS: &[&str] = &["cell.max_memtable_bytes=1048576"];
/// Events per request: from single events up to batches that fill a good part of a group commit.
const MAX_BATCH_EVENTS: usize = 200;
/// When the server is killed, after it became ready and the clients started. At full load the log grows by
/// thousands of events per cycle and every restart replays the journal, so later restarts take longer
/// (about 0.3 s per 10,000 events in a debug build): this range keeps 20 cycles of a debug build on two
/// cores near 40 s while still landing kills both in the first burst of requests and under steady load.
const KILL_AFTER_MS: RangeInclusive<u64> = 20..=300;
/// A request to a live server on loopback takes milliseconds; a hung one fails the cycle instead of the CI job.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long clients get to notice the kill and return what they saw (a request in flight is at most
/// `REQUEST_TIMEOUT` old).
const CLIENT_STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// Pause after a failed request, so a client does not spin on a closed port before it is told to stop.
const RETRY_PAUSE: Duration = Duration::from_millis(5);
/// Violations printed on failure; the rest are counted.
const MAX_SHOWN_VIOLATIONS: usize = 20;

/// What a scenario runs against the crashing server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    /// Ingest only: the log keeps every acknowledged event.
    Log,
    /// Ingest with `counter` deployed: every event is processed exactly once.
    Counter,
}

impl Scenario {
    const ALL: [Scenario; 2] = [Scenario::Log, Scenario::Counter];

    /// The name the scenario is listed and filtered under.
    fn name(self) -> &'static str {
        match self {
            Scenario::Log => "crash",
            Scenario::Counter => "crash_counter",
        }
    }

    fn default_cycles(self) -> u32 {
        match self {
            Scenario::Log => DEFAULT_CYCLES,
            Scenario::Counter => DEFAULT_COUNTER_CYCLES,
        }
    }

    /// The topic clients post to.
    fn topic(self) -> &'static str {
        match self {
            Scenario::Log => TOPIC,
            Scenario::Counter => COUNTER_INPUT,
        }
    }

    /// The key an event is posted with, a function of its identity so the check can recompute it: unique
    /// per event for the log scenario, one of `COUNTER_KEYS` (spread by a multiplicative hash) for the
    /// counter.
    fn key(self, sent: &Sent) -> String {
        match self {
            Scenario::Log => format!("{}-{}-{}", sent.cycle, sent.client, sent.n),
            Scenario::Counter => {
                let mixed =
                    (sent.n ^ (u64::from(sent.client) << 32) ^ (u64::from(sent.cycle) << 48))
                        .wrapping_mul(0x9e37_79b9_7f4a_7c15);
                format!("key-{}", (mixed >> 32) % COUNTER_KEYS)
            }
        }
    }
}

/// What this run was asked to do.
#[derive(Debug, Clone)]
struct Options {
    /// The scenarios to run, in order.
    scenarios: Vec<Scenario>,
    /// Cycles for every scenario, if asked for (else each scenario's default).
    cycles: Option<u32>,
    clients: u32,
    seed: u64,
}

/// What the command line asks for.
#[derive(Debug)]
enum Mode {
    Run(Options),
    /// `--list`: name the scenarios the filters select.
    List {
        selected: Vec<Scenario>,
    },
}

/// Parses this binary's own flags among libtest's. libtest flags that take a value have it consumed;
/// other flags (`--nocapture`, `--quiet`, `--include-ignored`, ...) are ignored.
fn parse_args(
    args: impl IntoIterator<Item = String>,
    env_cycles: Option<String>,
) -> Result<Mode, String> {
    let mut args = args.into_iter();
    let (mut cycles, mut clients, mut seed) = (None, None, None);
    let mut only: Option<Vec<Scenario>> = None;
    let (mut filters, mut skips) = (Vec::new(), Vec::new());
    let (mut exact, mut list, mut ignored_only) = (false, false, false);
    while let Some(arg) = args.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((name, value)) if name.starts_with("--") => {
                (name.to_string(), Some(value.to_string()))
            }
            _ => (arg, None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match name.as_str() {
            "--cycles" => cycles = Some(number(&name, &value()?, 1)?),
            "--clients" => clients = Some(number(&name, &value()?, 1)?),
            "--scenario" => {
                let text = value()?;
                only = Some(match text.trim() {
                    "log" => vec![Scenario::Log],
                    "counter" => vec![Scenario::Counter],
                    "all" => Scenario::ALL.to_vec(),
                    _ => {
                        return Err(format!(
                            "--scenario must be log, counter or all; got {text:?}"
                        ));
                    }
                });
            }
            "--seed" => {
                let text = value()?;
                let parsed = text.trim().parse().map_err(|_| {
                    format!(
                        "--seed must be a whole number in 0..={}; got {text:?}",
                        u64::MAX
                    )
                })?;
                seed = Some(parsed);
            }
            "--list" => list = true,
            "--exact" => exact = true,
            // libtest: run only ignored tests. This one is not ignored.
            "--ignored" => ignored_only = true,
            "--skip" => skips.push(value()?),
            "--test-threads" | "--color" | "--format" | "--logfile" | "--shuffle-seed" | "-Z" => {
                value()?;
            }
            flag if flag.starts_with('-') => {}
            _ => filters.push(name),
        }
    }
    let selected: Vec<Scenario> = Scenario::ALL
        .into_iter()
        .filter(|scenario| {
            let name = scenario.name();
            let matches = |pattern: &String| {
                if exact {
                    pattern == name
                } else {
                    name.contains(pattern.as_str())
                }
            };
            (filters.is_empty() || filters.iter().any(matches))
                && !skips.iter().any(matches)
                && !ignored_only
                && only.as_ref().is_none_or(|only| only.contains(scenario))
        })
        .collect();
    if list {
        return Ok(Mode::List { selected });
    }
    let cycles = match (cycles, env_cycles) {
        (Some(n), _) => Some(n),
        (None, Some(text)) => Some(number("PROCD_CRASH_CYCLES", &text, 1)?),
        (None, None) => None,
    };
    Ok(Mode::Run(Options {
        scenarios: selected,
        cycles,
        clients: clients.unwrap_or(DEFAULT_CLIENTS),
        seed: seed.unwrap_or_else(|| fastrand::u64(..)),
    }))
}

fn number(name: &str, text: &str, min: u32) -> Result<u32, String> {
    match text.trim().parse::<u32>() {
        Ok(n) if n >= min => Ok(n),
        _ => Err(format!(
            "{name} must be a whole number in {min}..={}; got {text:?}",
            u32::MAX
        )),
    }
}

fn main() -> ExitCode {
    let options = match parse_args(
        std::env::args().skip(1),
        std::env::var("PROCD_CRASH_CYCLES").ok(),
    ) {
        Ok(Mode::Run(options)) => options,
        Ok(Mode::List { selected }) => {
            for scenario in selected {
                println!("{}: test", scenario.name());
            }
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("crash: {e}");
            return ExitCode::from(2);
        }
    };
    let (mut passed, mut failed) = (0, 0);
    for &scenario in &options.scenarios {
        if run_scenario(scenario, &options) {
            passed += 1;
        } else {
            failed += 1;
        }
    }
    println!("{passed} passed, {failed} failed");
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Runs one scenario and prints its report; returns whether it passed.
fn run_scenario(scenario: Scenario, options: &Options) -> bool {
    let name = scenario.name();
    let cycles = options.cycles.unwrap_or(scenario.default_cycles());
    let (clients, seed) = (options.clients, options.seed);
    println!("{name}: {cycles} cycles, {clients} clients, seed {seed} (replay with --seed {seed})");
    let started = Instant::now();
    let outcome = run(scenario, cycles, clients, seed);
    let elapsed = started.elapsed().as_secs_f64();
    match outcome {
        Ok(report) => {
            println!(
                "{name}: {} cycles, {} requests ({} answered 202, {} 207, {} 503, {} failed, {} timed out), \
                 {} events sent, {} acked, {} in log ({} unacked but written), seed {seed}, {elapsed:.1} s",
                report.cycles_run,
                report.clients.requests,
                report.clients.accepted,
                report.clients.partial,
                report.clients.refused,
                report.clients.failed,
                report.clients.timed_out,
                report.clients.events_sent,
                report.acked,
                report.in_log,
                report.in_log.saturating_sub(report.acked),
            );
            if let Some(counter) = &report.counter {
                println!(
                    "{name}: {} outputs for {} keys (counts up to {}), caught up {} ms after the last start; \
                     {} of {} kills landed while the handler had events to process",
                    counter.outputs,
                    counter.keys,
                    counter.max_count,
                    counter.catch_up_ms,
                    report.kills_while_processing,
                    report.cycles_run
                );
            }
            if report.violations.is_empty() {
                println!("{name}: ok");
                true
            } else {
                println!(
                    "{name}: FAILED with {} violations (seed {seed}); the first ones:",
                    report.violations.len()
                );
                for v in report.violations.iter().take(MAX_SHOWN_VIOLATIONS) {
                    println!("  - {v}");
                }
                false
            }
        }
        Err(e) => {
            println!("{name}: FAILED (seed {seed}, after {elapsed:.1} s): {e}");
            false
        }
    }
}

/// One event's identity: unique over the whole run, sent as the event's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Sent {
    cycle: u32,
    client: u32,
    n: u64,
}

impl Sent {
    fn from_value(value: &Value) -> Option<Self> {
        Some(Self {
            cycle: u32::try_from(value.get("cycle")?.as_u64()?).ok()?,
            client: u32::try_from(value.get("client")?.as_u64()?).ok()?,
            n: value.get("n")?.as_u64()?,
        })
    }
}

impl fmt::Display for Sent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "event (cycle {}, client {}, n {})",
            self.cycle, self.client, self.n
        )
    }
}

/// What one client saw in one cycle.
#[derive(Debug, Default)]
struct ClientLog {
    /// `(partition, offset, event)` for every acknowledged event.
    acks: Vec<(u32, u64, Sent)>,
    violations: Vec<String>,
    tally: Tally,
}

/// Request counts, summed over clients and cycles.
#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    requests: u64,
    events_sent: u64,
    accepted: u64,
    partial: u64,
    refused: u64,
    failed: u64,
    timed_out: u64,
}

impl Tally {
    fn add(&mut self, other: &Tally) {
        self.requests += other.requests;
        self.events_sent += other.events_sent;
        self.accepted += other.accepted;
        self.partial += other.partial;
        self.refused += other.refused;
        self.failed += other.failed;
        self.timed_out += other.timed_out;
    }
}

#[derive(Debug, Default)]
struct Report {
    cycles_run: u32,
    clients: Tally,
    acked: u64,
    in_log: u64,
    violations: Vec<String>,
    /// What the counter scenario saw.
    counter: Option<CounterReport>,
    /// Counter scenario: cycles whose kill landed while the handler had events to process.
    kills_while_processing: u32,
}

#[derive(Debug, Default)]
struct CounterReport {
    /// Output records after the final check (before the extra events).
    outputs: u64,
    /// Distinct keys in the input log.
    keys: usize,
    /// The highest count of a key.
    max_count: u64,
    /// From the last start until the handler had processed the whole input log.
    catch_up_ms: u128,
}

/// Runs the cycles and the final check. `Err` is a failure of the test's own machinery (or a server that
/// cannot restart); broken guarantees are `Report::violations`.
fn run(scenario: Scenario, cycles: u32, clients: u32, seed: u64) -> TestResult<Report> {
    // The harness blocks (waiting for the ready line, for exit), so this thread stays outside the runtime and
    // only enters it with `block_on`; the clients run on the runtime's workers meanwhile.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut rng = fastrand::Rng::with_seed(seed);
    let topic = scenario.topic();
    let mut report = Report::default();
    // Every acknowledgement, by where it was placed.
    let mut acked: HashMap<(u32, u64), (Sent, u32)> = HashMap::new();
    // Per partition: one past the highest acknowledged offset, and the durable end seen at the last start.
    let mut acked_end = vec![0u64; PARTITIONS as usize];
    let mut durable_end = vec![0u64; PARTITIONS as usize];
    // Per partition: the counter's committed offset seen at the last start.
    let mut handler_committed = vec![0u64; PARTITIONS as usize];

    let mut host = TestHost::start_with(PARTITIONS, CELLS, SETTINGS)?;
    runtime.block_on(host.create_topic(topic))?;
    if scenario == Scenario::Counter {
        runtime.block_on(deploy_counter(&host))?;
    }
    for cycle in 1..=cycles {
        let cycle_started = Instant::now();
        if cycle > 1 {
            host.restart().map_err(|e| {
                format!("cycle {cycle}: procd did not come back after SIGKILL: {e}")
            })?;
        }
        let start_ms = cycle_started.elapsed().as_millis();
        let ends = runtime.block_on(end_offsets(&host, topic))?;
        // How far the handler had got when it was killed: its committed offsets are durable, so they
        // never go back across a crash.
        let progress = match scenario {
            Scenario::Log => String::new(),
            Scenario::Counter => {
                let committed = runtime.block_on(loaded_committed_offsets(&host))?;
                for (p, (&now, before)) in committed.iter().zip(&handler_committed).enumerate() {
                    if now < *before {
                        report.violations.push(format!(
                            "cycle {cycle}: the handler's committed offset on partition {p} went back from \
                             {before} to {now} across the crash"
                        ));
                    }
                }
                let total: u64 = committed.iter().sum();
                handler_committed = committed;
                format!(
                    ", handler committed {total} of {} when started",
                    ends.iter().sum::<u64>()
                )
            }
        };
        for (p, &end) in ends.iter().enumerate() {
            if end < durable_end[p] {
                report.violations.push(format!(
                    "cycle {cycle}: partition {p}'s durable end went back from {} to {end} across the crash",
                    durable_end[p]
                ));
            }
            if end < acked_end[p] {
                report.violations.push(format!(
                    "cycle {cycle}: partition {p} ends at {end} after the crash, but offsets up to {} were \
                     acknowledged",
                    acked_end[p] - 1
                ));
            }
        }
        durable_end = ends;
        if !report.violations.is_empty() {
            break;
        }

        let stop = Arc::new(AtomicBool::new(false));
        let clients: Vec<_> = (0..clients)
            .map(|client| {
                runtime.spawn(produce(
                    host.url.clone(),
                    scenario,
                    cycle,
                    client,
                    rng.u64(..),
                    stop.clone(),
                ))
            })
            .collect();
        let kill_after_ms = rng.u64(KILL_AFTER_MS);
        std::thread::sleep(Duration::from_millis(kill_after_ms));
        // Whether the handler had work in hand when the kill landed: the input's durable end against the
        // handler's committed offsets a moment before. (Not the status's `lag`: it is computed from the end
        // the processor saw at its last step, so it reads 0 between steps.)
        let at_kill = match scenario {
            Scenario::Log => String::new(),
            Scenario::Counter => {
                let (ends, committed) = runtime.block_on(async {
                    Ok::<_, Box<dyn std::error::Error + Send + Sync>>((
                        end_offsets(&host, topic).await?,
                        committed_offsets(&host).await?,
                    ))
                })?;
                let behind: u64 = ends
                    .iter()
                    .zip(&committed)
                    .map(|(e, c)| e.saturating_sub(*c))
                    .sum();
                if behind > 0 {
                    report.kills_while_processing += 1;
                }
                format!(" with the handler {behind} events behind")
            }
        };
        host.kill()?;
        stop.store(true, Ordering::Release);
        let logs = runtime
            .block_on(async {
                tokio::time::timeout(CLIENT_STOP_TIMEOUT, async {
                    let mut logs = Vec::with_capacity(clients.len());
                    for client in clients {
                        logs.push(client.await?);
                    }
                    Ok::<_, tokio::task::JoinError>(logs)
                })
                .await
            })
            .map_err(|_| {
                format!(
                    "cycle {cycle}: clients did not stop within {CLIENT_STOP_TIMEOUT:?} of the kill"
                )
            })??;

        let mut cycle_tally = Tally::default();
        let mut cycle_acks = 0usize;
        for log in logs {
            cycle_tally.add(&log.tally);
            cycle_acks += log.acks.len();
            report.violations.extend(
                log.violations
                    .into_iter()
                    .map(|v| format!("cycle {cycle}: {v}")),
            );
            for (p, offset, sent) in log.acks {
                if let Some((earlier, earlier_cycle)) = acked.insert((p, offset), (sent, cycle)) {
                    report.violations.push(format!(
                        "partition {p} offset {offset} was acknowledged twice: for {earlier} in cycle {earlier_cycle}, \
                         then for {sent} in cycle {cycle}"
                    ));
                }
                if let Some(end) = acked_end.get_mut(p as usize) {
                    *end = (*end).max(offset + 1);
                }
            }
        }
        report.clients.add(&cycle_tally);
        report.cycles_run = cycle;
        println!(
            "cycle {cycle}/{cycles}: up in {start_ms} ms{progress}, killed after {kill_after_ms} ms{at_kill}; {} requests, \
             {cycle_acks} events acked, {} failed; {} ms in all",
            cycle_tally.requests,
            cycle_tally.failed + cycle_tally.refused + cycle_tally.timed_out,
            cycle_started.elapsed().as_millis()
        );
        if !report.violations.is_empty() {
            break;
        }
    }

    let check_started = Instant::now();
    host.restart()
        .map_err(|e| format!("procd did not come back after the last SIGKILL: {e}"))?;
    let start_ms = check_started.elapsed().as_millis();
    let partitions = runtime.block_on(read_topic(&host, topic))?;
    report.acked = acked.len() as u64;
    report.in_log = partitions.iter().map(|events| events.len() as u64).sum();
    let read_ms = check_started.elapsed().as_millis() - start_ms;
    verify(scenario, &partitions, &acked, &mut report.violations);
    println!(
        "final check: up in {start_ms} ms, read back in {read_ms} ms, verified in {} ms",
        check_started.elapsed().as_millis() - start_ms - read_ms
    );
    if scenario == Scenario::Counter {
        let counter = runtime.block_on(check_counter(
            &host,
            &partitions,
            check_started,
            &mut report.violations,
        ))?;
        report.counter = Some(counter);
    }
    let code = host.stop()?;
    if code != 0 {
        println!("crash: note: procd exited with code {code} on SIGINT after the final check");
    }
    Ok(report)
}

/// The durable end offset of every partition, as a reader sees it.
async fn end_offsets(host: &TestHost, topic: &str) -> TestResult<Vec<u64>> {
    let mut client = host.data()?;
    let mut ends = Vec::with_capacity(PARTITIONS as usize);
    for p in 0..PARTITIONS {
        let resp = client
            .get(&format!(
                "/v1/topics/{topic}/partitions/{p}/events?from=0&limit=1"
            ))
            .await?;
        ensure_status(&resp, 200)?;
        ends.push(
            resp.header("procd-end-offset")
                .ok_or("no procd-end-offset header")?
                .parse()?,
        );
    }
    Ok(ends)
}

/// Posts batches until told to stop, recording what was acknowledged. Failed requests are dropped: their
/// events may or may not be in the log.
async fn produce(
    url: String,
    scenario: Scenario,
    cycle: u32,
    client: u32,
    seed: u64,
    stop: Arc<AtomicBool>,
) -> ClientLog {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut log = ClientLog::default();
    let path = format!("/v1/topics/{}/events", scenario.topic());
    let mut http = match Client::new(&url) {
        Ok(http) => http,
        Err(e) => {
            log.violations.push(format!("client {client}: {e}"));
            return log;
        }
    };
    let mut n = 0u64;
    while !stop.load(Ordering::Acquire) {
        let batch: Vec<Sent> = (0..batch_len(&mut rng))
            .map(|_| {
                n += 1;
                Sent { cycle, client, n }
            })
            .collect();
        let mut body = String::with_capacity(batch.len() * 80);
        for sent in &batch {
            // Writing into a String cannot fail.
            let _ = writeln!(
                body,
                r#"{{"key":"{}","value":{{"cycle":{},"client":{},"n":{}}}}}"#,
                scenario.key(sent),
                sent.cycle,
                sent.client,
                sent.n
            );
        }
        log.tally.requests += 1;
        log.tally.events_sent += batch.len() as u64;
        match tokio::time::timeout(REQUEST_TIMEOUT, http.post_ndjson(&path, body)).await {
            Ok(Ok(resp)) => record(&resp, &batch, &mut log),
            Ok(Err(_)) => {
                log.tally.failed += 1;
                tokio::time::sleep(RETRY_PAUSE).await;
            }
            Err(_) => {
                log.tally.timed_out += 1;
                // The abandoned exchange may leave the connection mid-response: start a fresh one.
                if let Ok(fresh) = Client::new(&url) {
                    http = fresh;
                }
            }
        }
    }
    log
}

/// A request's event count in `1..=MAX_BATCH_EVENTS`, log-uniform: as many requests of 1-14 events as of
/// 15-200. Mostly small requests give many group commits (and crash points) per cycle without making the log
/// so large that replaying the journal at each restart dominates a debug-build run.
fn batch_len(rng: &mut fastrand::Rng) -> usize {
    let span = (MAX_BATCH_EVENTS + 1) as f64;
    (span.powf(rng.f64()) as usize).clamp(1, MAX_BATCH_EVENTS)
}

/// Records the acknowledged events of one response.
fn record(resp: &Response, batch: &[Sent], log: &mut ClientLog) {
    match resp.status {
        202 => log.tally.accepted += 1,
        207 => log.tally.partial += 1,
        503 => {
            log.tally.refused += 1;
            return;
        }
        status => {
            let body = String::from_utf8_lossy(&resp.body);
            log.violations.push(format!(
                "unexpected HTTP {status} to an append: {}",
                body.trim()
            ));
            return;
        }
    }
    let results = match resp.json() {
        Ok(body) => body
            .get("results")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default(),
        Err(e) => {
            log.violations.push(format!(
                "HTTP {} with a body that is not JSON: {e}",
                resp.status
            ));
            return;
        }
    };
    if results.len() != batch.len() {
        log.violations.push(format!(
            "HTTP {} with {} results for {} events",
            resp.status,
            results.len(),
            batch.len()
        ));
        return;
    }
    for (result, sent) in results.iter().zip(batch) {
        let partition = result
            .get("partition")
            .and_then(Value::as_u64)
            .and_then(|p| u32::try_from(p).ok());
        let offset = result.get("offset").and_then(Value::as_u64);
        match (partition, offset) {
            (Some(p), Some(offset)) if p < PARTITIONS => {
                if result.get("duplicate").and_then(Value::as_bool) == Some(true) {
                    log.violations.push(format!(
                        "{sent} was reported a duplicate though it has no id: {result}"
                    ));
                }
                log.acks.push((p, offset, *sent));
            }
            (_, None) if resp.status == 207 && result.get("error").is_some() => {}
            _ => log.violations.push(format!(
                "HTTP {}: bad result for {sent}: {result}",
                resp.status
            )),
        }
    }
}

/// Checks the full log against the acknowledgements; see the module doc for the properties.
fn verify(
    scenario: Scenario,
    partitions: &[Vec<Value>],
    acked: &HashMap<(u32, u64), (Sent, u32)>,
    violations: &mut Vec<String>,
) {
    let acked_events: HashSet<Sent> = acked.values().map(|(sent, _)| *sent).collect();
    let mut found: HashMap<Sent, (u32, u64)> = HashMap::new();
    let mut stored: HashMap<(u32, u64), Sent> = HashMap::new();
    for (p, events) in (0u32..).zip(partitions) {
        let mut in_order = true;
        for (expected, event) in (0u64..).zip(events) {
            let offset = event.get("offset").and_then(Value::as_u64);
            // One report per partition: after a hole every later offset is off by the same amount.
            if offset != Some(expected) && in_order {
                in_order = false;
                violations.push(format!(
                    "partition {p}: event number {expected} (from 0) has offset {}: a hole or an offset out of order",
                    offset.map_or("none".into(), |o| o.to_string())
                ));
            }
            if event.get("partition").and_then(Value::as_u64) != Some(u64::from(p)) {
                violations.push(format!(
                    "partition {p} offset {expected} is labelled {}",
                    event["partition"]
                ));
            }
            let offset = offset.unwrap_or(expected);
            let Some(sent) = event.get("value").and_then(Sent::from_value) else {
                violations.push(format!(
                    "partition {p} offset {offset} holds a value no client sent: {event}"
                ));
                continue;
            };
            if event.get("key").and_then(Value::as_str) != Some(scenario.key(&sent).as_str()) {
                violations.push(format!(
                    "partition {p} offset {offset}: {sent} has key {}",
                    event["key"]
                ));
            }
            if let Some((first_p, first_offset)) = found.insert(sent, (p, offset)) {
                violations.push(format!(
                    "{sent} is in the log twice: partition {first_p} offset {first_offset} and partition {p} offset \
                     {offset}{}",
                    if acked_events.contains(&sent) { " (it was acknowledged)" } else { "" }
                ));
            }
            if let Some(first) = stored.get(&(p, offset)) {
                violations.push(format!(
                    "partition {p} offset {offset} is served twice: for {first} and for {sent}"
                ));
            } else {
                stored.insert((p, offset), sent);
            }
        }
    }
    let mut acks: Vec<_> = acked.iter().collect();
    acks.sort_by_key(|(at, _)| **at);
    for (&(p, offset), &(sent, cycle)) in acks {
        match stored.get(&(p, offset)) {
            Some(held) if *held == sent => {}
            Some(held) => violations.push(format!(
                "partition {p} offset {offset} was acknowledged in cycle {cycle} for {sent} but holds {held}{}",
                match found.get(&sent) {
                    Some((fp, fo)) => format!("; {sent} is at partition {fp} offset {fo}"),
                    None => String::new(),
                }
            )),
            None => violations.push(format!(
                "{sent}, acknowledged in cycle {cycle} at partition {p} offset {offset}, is missing (the partition \
                 ends at {})",
                partitions.get(p as usize).map_or(0, Vec::len)
            )),
        }
    }
}

/// Every partition of `topic`, read in full.
async fn read_topic(host: &TestHost, topic: &str) -> TestResult<Vec<Vec<Value>>> {
    let mut partitions = Vec::with_capacity(PARTITIONS as usize);
    for p in 0..PARTITIONS {
        partitions.push(host.read_all(topic, p).await?);
    }
    Ok(partitions)
}

/// Creates the counter scenario's output topic and deploys `counter` from the earliest input.
async fn deploy_counter(host: &TestHost) -> TestResult {
    host.create_topic(COUNTER_OUTPUT).await?;
    let resp = host
        .deploy(
            COUNTER_HANDLER,
            example("counter")?,
            COUNTER_INPUT,
            &[COUNTER_OUTPUT],
            &["from=earliest"],
        )
        .await?;
    ensure_status(&resp, 201)
}

/// The handler's committed offset on every partition, in partition order.
async fn committed_offsets(host: &TestHost) -> TestResult<Vec<u64>> {
    let status = handler_status(host).await?;
    let mut committed = vec![0u64; PARTITIONS as usize];
    for p in status["partitions"].as_array().ok_or("no partitions")? {
        let partition = p["partition"].as_u64().ok_or("no partition")? as usize;
        if let Some(slot) = committed.get_mut(partition) {
            *slot = p["committed_offset"]
                .as_u64()
                .ok_or("no committed_offset")?;
        }
    }
    Ok(committed)
}

/// The committed offsets once every partition's task has loaded its own from disk (before its first step
/// a task reports version 0 and offset 0).
async fn loaded_committed_offsets(host: &TestHost) -> TestResult<Vec<u64>> {
    let deadline = Instant::now() + REQUEST_TIMEOUT;
    loop {
        let status = handler_status(host).await?;
        let parts = status["partitions"].as_array().ok_or("no partitions")?;
        let loaded = parts.len() == PARTITIONS as usize
            && parts.iter().all(|p| p["version"].as_u64() > Some(0));
        if loaded {
            return committed_offsets(host).await;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the handler's partitions did not start within {REQUEST_TIMEOUT:?}: {status}"
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn handler_status(host: &TestHost) -> TestResult<Value> {
    let resp = host
        .admin()?
        .get(&format!("/v1/handlers/{COUNTER_HANDLER}"))
        .await?;
    ensure_status(&resp, 200)?;
    Ok(resp.json()?)
}

/// Waits until the handler has committed `ends[p]` on every partition. A partition that fails is not
/// an error here: it shows as a violation when outputs are compared.
async fn wait_committed(host: &TestHost, ends: &[u64]) -> TestResult {
    let deadline = Instant::now() + CATCH_UP_TIMEOUT;
    loop {
        let committed = committed_offsets(host).await?;
        if committed.iter().zip(ends).all(|(c, e)| c >= e) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the handler did not process the input log within {CATCH_UP_TIMEOUT:?}: committed \
                 {committed:?} of {ends:?}; status {}",
                handler_status(host).await?
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A key and count as the counter emitted them: the count is a JSON number (decimal ASCII).
fn count_of(output: &Value) -> (Option<&str>, Option<u64>) {
    (output["key"].as_str(), output["value"].as_u64())
}

/// Proves exactly-once processing by `counter` of the whole input log (see the module doc): the outputs
/// of each partition are the running counts of its input events in offset order, and the state holds the
/// final counts.
async fn check_counter(
    host: &TestHost,
    inputs: &[Vec<Value>],
    started: Instant,
    violations: &mut Vec<String>,
) -> TestResult<CounterReport> {
    let ends: Vec<u64> = inputs.iter().map(|events| events.len() as u64).collect();
    wait_committed(host, &ends).await?;
    let catch_up_ms = started.elapsed().as_millis();
    let outputs = read_topic(host, COUNTER_OUTPUT).await?;
    let mut totals: HashMap<String, (u32, u64)> = HashMap::new();
    for (p, (inp, out)) in (0u32..).zip(inputs.iter().zip(&outputs)) {
        if out.len() != inp.len() {
            violations.push(format!(
                "partition {p}: {} outputs for {} input events",
                out.len(),
                inp.len()
            ));
        }
        // Running count per key in offset order, and what the counter emitted for each event.
        let mut counts: HashMap<&str, u64> = HashMap::new();
        let mut seen: HashMap<&str, Vec<u64>> = HashMap::new();
        let mut first_mismatch = true;
        for (offset, event) in inp.iter().enumerate() {
            let key = event["key"].as_str().unwrap_or_default();
            let count = counts.entry(key).or_default();
            *count += 1;
            let got = out.get(offset).map(count_of);
            if let Some((_, Some(value))) = got {
                seen.entry(key).or_default().push(value);
            }
            // After a missing or doubled output every later one is shifted: report the first only.
            if got != Some((Some(key), Some(*count))) && first_mismatch {
                first_mismatch = false;
                violations.push(format!(
                    "partition {p} output {offset}: expected {key:?} = {count} (input offset {offset}), got {}",
                    out.get(offset).map_or("nothing".to_string(), Value::to_string)
                ));
            }
        }
        for (key, n) in &counts {
            totals.insert((*key).to_string(), (p, *n));
            let mut values = seen.remove(key).unwrap_or_default();
            values.sort_unstable();
            let expected: Vec<u64> = (1..=*n).collect();
            if values != expected {
                let dupes = values.windows(2).filter(|w| w[0] == w[1]).count();
                violations.push(format!(
                    "partition {p} key {key:?}: {n} events in the input log, but the outputs at their offsets \
                     hold {} counts ({dupes} repeated), not 1..={n} once each",
                    values.len()
                ));
            }
        }
    }
    // The state must hold each key's final count: one more event per key is answered with n + 1.
    let before: Vec<usize> = outputs.iter().map(Vec::len).collect();
    let mut keys: Vec<&String> = totals.keys().collect();
    keys.sort();
    let mut body = String::new();
    for key in &keys {
        let _ = writeln!(body, r#"{{"key":"{key}","value":"probe"}}"#);
    }
    let resp = host
        .data()?
        .post_ndjson(&format!("/v1/topics/{COUNTER_INPUT}/events"), body)
        .await?;
    ensure_status(&resp, 202)?;
    let mut ends = ends;
    for (p, end) in ends.iter_mut().enumerate() {
        *end += keys
            .iter()
            .filter(|k| {
                totals
                    .get(k.as_str())
                    .is_some_and(|(kp, _)| *kp as usize == p)
            })
            .count() as u64;
    }
    wait_committed(host, &ends).await?;
    let after = read_topic(host, COUNTER_OUTPUT).await?;
    let probes: usize = after
        .iter()
        .zip(&before)
        .map(|(out, skip)| out.len().saturating_sub(*skip))
        .sum();
    if probes != keys.len() {
        violations.push(format!(
            "{} probe events (one per key) gave {probes} outputs",
            keys.len()
        ));
    }
    for (p, (out, skip)) in after.iter().zip(&before).enumerate() {
        for output in out.iter().skip(*skip) {
            let (key, value) = count_of(output);
            let want = key.and_then(|k| totals.get(k)).map(|(_, n)| n + 1);
            if want.is_none() || value != want {
                violations.push(format!(
                    "partition {p}: a probe event after the check got {output}; expected the key's count + 1 = {}",
                    want.map_or("?".to_string(), |n| n.to_string())
                ));
            }
        }
    }
    Ok(CounterReport {
        outputs: before.iter().sum::<usize>() as u64,
        keys: totals.len(),
        max_count: totals.values().map(|(_, n)| *n).max().unwrap_or(0),
        catch_up_ms,
    })
}
