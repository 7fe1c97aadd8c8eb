//! `procd bench e2e`: how much of the HTTP ingest rate survives when every event also goes through a
//! handler, measured in one run.
//!
//! Each round runs two phases, each on a fresh in-process [`Server`] (defaults plus `--set`) with a
//! fresh data directory, with the same pre-built NDJSON bodies as `procd bench ingest` (event `i`: key
//! `k<i>`, value a `--value-bytes` JSON string) posted by `--connections` keep-alive clients:
//!
//! - **(i) ingest**: the events are posted to topic `in`, which no handler reads; timed from the first
//!   request to the last `202`. This is `procd bench ingest`'s phase (b).
//! - **(ii) ingest → passthrough → output**: `passthrough.wasm` is deployed from `in` to `out` through
//!   the admin API (`PUT /v1/handlers/pass`) and the clock starts only once every partition has its
//!   instance running. The same events are posted to `in`; the phase is timed from the first request
//!   until the end offsets of `out` (`GET /v1/topics/out`, summed over partitions, polled every few
//!   milliseconds once ingest is done) reach the number of events, i.e. until every event's output is
//!   durable.
//!
//! Both phases post the same bytes to the same kind of server on the same disk, and both clocks start
//! at the first request, so (ii)/(i) is the share of the ingest rate the whole pipeline (ingest, read
//! back, wasm call, output encoding, second durable write) delivers. Everything shares this machine's
//! CPUs, as it would in production.
//!
//! Where the data directory is on a block device, the bytes written to it while each clock ran
//! (`/proc/diskstats`) are printed per event and per second: on a disk, (ii) writes every event twice
//! (input and output, each to a journal and later a table), and how close that comes to what the disk
//! can write bounds the ratio (README, End to end).
//!
//! Latency of an event's output: input and output records both carry their log-append time, and the
//! passthrough's output for input offset `o` of partition `p` is offset `o` of `out`'s partition `p`, so
//! `out.timestamp_ms - in.timestamp_ms` is the delay from the input's append to its output's append
//! (millisecond resolution). It is sampled from the data plane's read API after phase (ii) (under load,
//! so mostly time spent waiting behind the backlog), and again for `--probes` single events posted one
//! at a time afterwards (an idle pipeline).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use clap::Args;

use super::server::{AppendResults, Running, post_all};
use super::util::{
    Component, DiskWrites, Scratch, check_range, components_dir, machine_line, percentile,
    process_cpu, read_component,
};
use super::workload::{Workload, WorkloadArgs, ndjson_line};

/// Input topic of both phases, and output topic of (ii).
const INPUT: &str = "in";
const OUTPUT: &str = "out";
/// Handler name in (ii).
const HANDLER: &str = "pass";
/// The acceptance target: the pipeline should deliver this share of the ingest rate.
const TARGET_RATIO: f64 = 0.6;
/// How often the output's end offsets are polled once ingest is done.
const POLL: Duration = Duration::from_millis(2);
/// How long the output may make no progress before the run is declared stuck.
const STALL: Duration = Duration::from_secs(60);
/// Chunks sampled per partition for the under-load latency, and events per chunk.
const SAMPLE_CHUNKS: u64 = 10;
const SAMPLE_CHUNK: u64 = 100;
/// Gap between latency probes.
const PROBE_GAP: Duration = Duration::from_millis(20);

/// `procd bench e2e` flags.
#[derive(Debug, Args)]
pub struct E2eArgs {
    /// Directory holding passthrough.wasm [default: guest-examples/target/wasm32-wasip2/release].
    #[arg(long, value_name = "DIR")]
    components: Option<PathBuf>,
    /// Events each phase writes in each round (a million keeps each phase above a second, so that
    /// start-up and the last flush do not decide the figure).
    #[arg(long, default_value_t = 1_000_000)]
    events: usize,
    /// Rounds of (i) then (ii); figures are totals over all rounds.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Single events posted one at a time after (ii) to measure the latency of an idle pipeline (0: none).
    #[arg(long, default_value_t = 100)]
    probes: usize,
    #[command(flatten)]
    load: WorkloadArgs,
}

/// Validated settings of a run.
#[derive(Clone)]
struct Plan {
    events: usize,
    rounds: usize,
    probes: usize,
    load: Workload,
}

impl Plan {
    fn new(args: E2eArgs) -> anyhow::Result<Self> {
        check_range("--events", args.events, 1, 100_000_000)?;
        check_range("--rounds", args.rounds, 1, 1000)?;
        check_range("--probes", args.probes, 0, 100_000)?;
        Ok(Self {
            events: args.events,
            rounds: args.rounds,
            probes: args.probes,
            load: Workload::new(args.load, args.events, 2..=1 << 20, &[])?,
        })
    }
}

/// What one phase of one round measured.
struct Measured {
    /// Until the last `202`.
    ingest: Duration,
    /// Until every output is durable ((ii) only).
    output: Option<Duration>,
    /// Outputs already durable when ingest was done ((ii) only).
    output_at_ingest: u64,
    /// CPU time of the whole process while the clock ran.
    cpu: Option<Duration>,
    /// Bytes written to the data directory's disk while the clock ran (by anything on the machine).
    disk: Option<u64>,
    /// Event→output delays in ms, sampled under load and with single probes ((ii) only).
    loaded_ms: Vec<u64>,
    probe_ms: Vec<u64>,
}

impl Measured {
    /// The phase's duration: to the last output if there is one, else to the last `202`.
    fn elapsed(&self) -> Duration {
        self.output.unwrap_or(self.ingest)
    }
}

pub(super) async fn run(args: E2eArgs) -> anyhow::Result<()> {
    let dir = components_dir(args.components.clone());
    let plan = Plan::new(args)?;
    let component = read_component(&dir, "passthrough")?;
    let scratch = Scratch::create(&plan.load.parent)?;
    print_parameters(&plan, &component, scratch.path());

    let bodies = plan.load.bodies(plan.events, |i| plan.load.value(i));
    let component = Bytes::from(component.bytes);
    let mut ingest = Vec::with_capacity(plan.rounds);
    let mut pipeline = Vec::with_capacity(plan.rounds);
    for round in 1..=plan.rounds {
        let dir = Scratch::create(scratch.path())?;
        let measured = phase(&plan, dir.path(), bodies.clone(), None)
            .await
            .with_context(|| format!("phase (i), round {round}"))?;
        drop(dir);
        ingest.push(measured);
        let dir = Scratch::create(scratch.path())?;
        let measured = phase(&plan, dir.path(), bodies.clone(), Some(component.clone()))
            .await
            .with_context(|| format!("phase (ii), round {round}"))?;
        drop(dir);
        pipeline.push(measured);
    }
    let disk = DiskWrites::of(scratch.path()).map(|d| d.name);
    print_results(&plan, &ingest, &pipeline, disk.as_deref());
    Ok(())
}

/// One phase on a fresh server: (i) without `component`, (ii) with it.
async fn phase(
    plan: &Plan,
    data_dir: &Path,
    bodies: Arc<Vec<Bytes>>,
    component: Option<Bytes>,
) -> anyhow::Result<Measured> {
    let mut server = Running::start(&plan.load.config, data_dir).await?;
    let disk = DiskWrites::of(data_dir);
    let measured = measure_phase(plan, &mut server, disk.as_ref(), bodies, component).await;
    server.stop().await?;
    measured
}

async fn measure_phase(
    plan: &Plan,
    server: &mut Running,
    disk: Option<&DiskWrites>,
    bodies: Arc<Vec<Bytes>>,
    component: Option<Bytes>,
) -> anyhow::Result<Measured> {
    server.create_topic(INPUT).await?;
    let pipeline = component.is_some();
    if let Some(component) = component {
        server.create_topic(OUTPUT).await?;
        server
            .deploy(
                HANDLER,
                &format!("input={INPUT}&output={OUTPUT}"),
                component,
            )
            .await?;
    }

    let disk_before = disk.and_then(DiskWrites::written);
    let cpu_before = process_cpu();
    let started = Instant::now();
    let posted = post_all(&server.data_url, INPUT, plan.load.connections, bodies).await?;
    let ingest = started.elapsed();
    let mut measured = Measured {
        ingest,
        output: None,
        output_at_ingest: 0,
        cpu: None,
        disk: None,
        loaded_ms: Vec::new(),
        probe_ms: Vec::new(),
    };
    let target = plan.events as u64;
    if pipeline {
        measured.output_at_ingest = server.end_offsets(OUTPUT).await?;
        wait_for_outputs(server, target).await?;
        measured.output = Some(started.elapsed());
    }
    measured.cpu = process_cpu()
        .zip(cpu_before)
        .map(|(now, before)| now.saturating_sub(before));
    measured.disk = disk
        .and_then(DiskWrites::written)
        .zip(disk_before)
        .map(|(now, before)| now.saturating_sub(before));
    posted.check(plan.events)?;

    let stored = server.end_offsets(INPUT).await?;
    if stored != target {
        bail!("{target} events were accepted but {INPUT} holds {stored}");
    }
    if pipeline {
        let status = server.handler_status(HANDLER).await?;
        let dead: u64 = status.partitions.iter().map(|p| p.dead_letters).sum();
        if dead > 0 {
            bail!("passthrough dead-lettered {dead} events");
        }
        measured.loaded_ms = sample_delays(server).await?;
        measured.probe_ms = probe_delays(plan, server, target).await?;
    }
    Ok(measured)
}

/// Polls `out`'s end offsets until they reach `target`; fails if they stop moving for [`STALL`].
async fn wait_for_outputs(server: &mut Running, target: u64) -> anyhow::Result<()> {
    let mut last = (0, Instant::now());
    loop {
        let done = server.end_offsets(OUTPUT).await?;
        if done >= target {
            if done > target {
                bail!("{OUTPUT} holds {done} events for {target} inputs");
            }
            return Ok(());
        }
        if done != last.0 {
            last = (done, Instant::now());
        } else if last.1.elapsed() > STALL {
            let status = server.handler_status(HANDLER).await?;
            bail!(
                "the output stopped at {done} of {target} events for {} s; handler: {status:?}",
                STALL.as_secs()
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Output delays of evenly spaced chunks of every partition, in ms.
async fn sample_delays(server: &mut Running) -> anyhow::Result<Vec<u64>> {
    let mut delays = Vec::new();
    for partition in 0..server.state.shape.partitions {
        let end = server
            .state
            .cell_for(partition)
            .partition(INPUT, partition)
            .map_or(0, |view| view.end_offset());
        let step = (end / SAMPLE_CHUNKS).max(SAMPLE_CHUNK);
        let mut from = 0;
        while from < end {
            let input = server.read(INPUT, partition, from, SAMPLE_CHUNK).await?;
            let output = server.read(OUTPUT, partition, from, SAMPLE_CHUNK).await?;
            for (i, o) in input.iter().zip(&output) {
                if i.offset != o.offset || i.key != o.key {
                    bail!(
                        "{OUTPUT} partition {partition} offset {} does not match {INPUT}'s",
                        o.offset
                    );
                }
                delays.push(o.timestamp_ms.saturating_sub(i.timestamp_ms));
            }
            from += step;
        }
    }
    Ok(delays)
}

/// Posts `plan.probes` single events [`PROBE_GAP`] apart to the idle pipeline, waits for their
/// outputs, and returns their delays in ms.
async fn probe_delays(plan: &Plan, server: &mut Running, already: u64) -> anyhow::Result<Vec<u64>> {
    let path = format!("/v1/topics/{INPUT}/events");
    let mut placed = Vec::with_capacity(plan.probes);
    for i in 0..plan.probes {
        let line = format!("{{\"key\":\"probe-{i}\",\"value\":{i}}}\n");
        let resp = server.data.post_ndjson(&path, Bytes::from(line)).await?;
        let resp = crate::cli::check(resp).context("a latency probe was refused")?;
        let answer: AppendResults =
            serde_json::from_slice(&resp.body).context("unexpected answer to a probe")?;
        for outcome in answer.results {
            if let Some(offset) = outcome.offset {
                placed.push((outcome.partition, offset));
            }
        }
        tokio::time::sleep(PROBE_GAP).await;
    }
    wait_for_outputs(server, already + placed.len() as u64).await?;
    let mut delays = Vec::with_capacity(placed.len());
    for (partition, offset) in placed {
        let input = server.read(INPUT, partition, offset, 1).await?;
        let output = server.read(OUTPUT, partition, offset, 1).await?;
        if let (Some(i), Some(o)) = (input.first(), output.first()) {
            delays.push(o.timestamp_ms.saturating_sub(i.timestamp_ms));
        }
    }
    Ok(delays)
}

// ---------------------------------------------------------------------------------------------------
// Output

fn print_parameters(plan: &Plan, component: &Component, dir: &Path) {
    let shape = &plan.load.config;
    println!("procd bench e2e");
    println!(
        "  events        {} per phase per round, {} rounds of (i) then (ii), a fresh server and data \
         directory for each phase",
        plan.events, plan.rounds
    );
    println!(
        "  event         key \"k<i>\", value a {}-byte JSON string; NDJSON line ~{} B",
        plan.load.value_bytes,
        ndjson_line(plan.events / 2, &plan.load.value(plan.events / 2)).len()
    );
    println!(
        "  clients       {} keep-alive connections, {} requests of {} events, bodies pre-built, in-process",
        plan.load.connections,
        plan.events.div_ceil(plan.load.batch),
        plan.load.batch
    );
    println!(
        "  shape         {} partitions over {} cells; handler batches of <= {} events",
        shape.partitions, shape.cells, shape.handler.batch_max_events
    );
    println!("  (i) ingest    POST to topic {INPUT:?}, no handler; timed until the last 202");
    println!(
        "  (ii) pipeline {} ({} B) deployed {INPUT:?} -> {OUTPUT:?} before the clock starts; the same POSTs, timed \
         until the sum of {OUTPUT:?}'s end offsets (GET /v1/topics/{OUTPUT}, polled every {} ms after the \
         last 202) reaches the event count",
        component.path.display(),
        component.bytes.len(),
        POLL.as_millis()
    );
    let set = if plan.load.set.is_empty() {
        "none".to_string()
    } else {
        plan.load.set.join(" ")
    };
    println!("  server        defaults, procd.toml and PROCD_* not read; --set: {set}");
    println!("  data dir      {} (removed afterwards)", dir.display());
    println!("  machine       {}", machine_line());
    println!();
}

fn print_results(plan: &Plan, ingest: &[Measured], pipeline: &[Measured], disk: Option<&str>) {
    let total = |phases: &[Measured]| -> Duration { phases.iter().map(Measured::elapsed).sum() };
    let events = (plan.events * plan.rounds) as f64;
    let rate = |d: Duration| events / d.as_secs_f64().max(f64::MIN_POSITIVE);
    let cores = |phases: &[Measured]| -> String {
        let cpu: Option<Duration> = phases.iter().map(|m| m.cpu).sum();
        match cpu {
            Some(cpu) => format!(
                "{:.2}",
                cpu.as_secs_f64() / total(phases).as_secs_f64().max(f64::MIN_POSITIVE)
            ),
            None => "-".into(),
        }
    };
    println!(
        "{:<34} {:>10} {:>9} {:>12} {:>9}",
        "phase", "events", "seconds", "events/s", "CPU busy"
    );
    let (ti, tp) = (total(ingest), total(pipeline));
    let ingest_in_pipeline: Duration = pipeline.iter().map(|m| m.ingest).sum();
    println!(
        "{:<34} {:>10} {:>9.3} {:>12.0} {:>9}",
        "(i) http ingest",
        events,
        ti.as_secs_f64(),
        rate(ti),
        cores(ingest)
    );
    println!(
        "{:<34} {:>10} {:>9.3} {:>12.0} {:>9}",
        "(ii) ingest -> passthrough -> out",
        events,
        tp.as_secs_f64(),
        rate(tp),
        cores(pipeline)
    );
    let backlog: u64 = pipeline.iter().map(|m| m.output_at_ingest).sum();
    println!(
        "     of which ingest (last 202)  {:>10} {:>9.3} {:>12.0}    outputs durable by then: {:.0}%",
        events,
        ingest_in_pipeline.as_secs_f64(),
        rate(ingest_in_pipeline),
        backlog as f64 * 100.0 / events.max(1.0)
    );
    println!("(CPU busy: CPU time of the whole process while the clock ran, in cores)");
    let disk_line = |phases: &[Measured]| -> Option<String> {
        let bytes: u64 = phases.iter().map(|m| m.disk).sum::<Option<u64>>()?;
        let seconds = total(phases).as_secs_f64().max(f64::MIN_POSITIVE);
        Some(format!(
            "{:.0} B/event, {:.0} MB/s",
            bytes as f64 / events.max(1.0),
            bytes as f64 / seconds / 1e6
        ))
    };
    if let (Some(i), Some(p)) = (disk_line(ingest), disk_line(pipeline)) {
        println!(
            "(disk: bytes written to {} while the clock ran, by anything: (i) {i}; (ii) {p})",
            disk.unwrap_or("the data directory's device")
        );
    }
    println!();
    let ratio = rate(tp) / rate(ti).max(f64::MIN_POSITIVE);
    let verdict = if ratio >= TARGET_RATIO {
        "met"
    } else {
        "NOT met"
    };
    let per_round: Vec<String> = ingest
        .iter()
        .zip(pipeline)
        .map(|(i, p)| {
            format!(
                "{:.2}",
                i.elapsed().as_secs_f64() / p.elapsed().as_secs_f64().max(f64::MIN_POSITIVE)
            )
        })
        .collect();
    println!(
        "(ii)/(i) = {ratio:.2}   target >= {TARGET_RATIO:.2}: {verdict}   (per round: {})",
        per_round.join(" ")
    );
    let loaded: Vec<u64> = pipeline
        .iter()
        .flat_map(|m| m.loaded_ms.iter().copied())
        .collect();
    let probes: Vec<u64> = pipeline
        .iter()
        .flat_map(|m| m.probe_ms.iter().copied())
        .collect();
    println!(
        "event -> output delay (out.timestamp_ms - in.timestamp_ms, same partition and offset):"
    );
    println!(
        "  under load (sampled after (ii)):          {}",
        delay_line(&loaded)
    );
    if plan.probes > 0 {
        println!(
            "  idle (single events {} ms apart):         {}",
            PROBE_GAP.as_millis(),
            delay_line(&probes)
        );
    }
}

fn delay_line(delays: &[u64]) -> String {
    let mut sorted = delays.to_vec();
    sorted.sort_unstable();
    format!(
        "p50 {} ms, p99 {} ms, max {} ms over {} events",
        percentile(&sorted, 0.5),
        percentile(&sorted, 0.99),
        percentile(&sorted, 1.0),
        sorted.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_are_summarised_by_nearest_rank() {
        let line = delay_line(&[5, 1, 3, 2, 4]);
        assert_eq!(line, "p50 3 ms, p99 5 ms, max 5 ms over 5 events");
    }
}
