//! `procd bench isolation`: how much a handler that loops forever on one partition costs the other
//! partitions, measured in one run (issue 5's isolation benchmark).
//!
//! Each round runs two phases, each on a fresh in-process [`Server`] (defaults, a shorter
//! `handler.deadline_ms`, then `--set`) with a fresh data directory. In both, the test guest
//! `hostile.wasm` is deployed from `in` to `out` in `mode=loop` before the clock starts; it passes every
//! event through to output 0 except a *trigger* (an event whose value is exactly the `on` text), on
//! which it spins forever. The events are those of `procd bench e2e` (event `i`: key `k<i>`, value a
//! `--value-bytes` JSON string), posted as pre-built NDJSON bodies by `--connections` keep-alive
//! clients:
//!
//! - **(A) baseline**: no event is a trigger.
//! - **(B) poisoned**: the same events, except that every `--poison-every`th event whose key routes to
//!   the bad partition (`--bad-partition`; the first of them included) carries the trigger value, of the
//!   same size. Each trigger makes the bad partition's task miss its deadline and halve its batch until
//!   the trigger is alone and dead-lettered, burning one deadline per halving step; with the defaults
//!   the bad partition stays busy with that for the whole phase.
//!
//! Only the **other** partitions are measured, in both phases: their throughput (their events over the
//! time from the first request until all their outputs are durable, polled from the cells' durable end
//! offsets) and every one of their events' delay from input to output: passthrough's output for input
//! offset `o` of a partition is offset `o` of `out`'s same partition, and both records carry their
//! log-append time, so `out.timestamp_ms - in.timestamp_ms` is the delay (millisecond resolution). (On
//! the bad partition that correspondence ends at the first dead letter; its own progress and dead
//! letters, from `GET /v1/handlers/{name}` and `GET /v1/handlers/{name}/dlq`, are reported instead.)
//!
//! B/A compares the same partitions of the same events on the same kind of server, so it is the cost
//! of the looping neighbour. The target is at most 5% less throughput and at most 10% higher p99.
//! A looping guest really occupies a CPU until its deadline, so on a machine with few cores the figure
//! includes that lost CPU, not only scheduling interference; the parameter block prints the core count.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use clap::Args;

use super::server::{Running, post_all};
use super::util::{
    Component, Scratch, check_range, machine_line, percentile, process_cpu, read_component,
};
use super::workload::{Workload, WorkloadArgs, event_key, ndjson_line};
use crate::ingest::partitioner::route;

/// Input and output topics.
const INPUT: &str = "in";
const OUTPUT: &str = "out";
/// Handler name.
const HANDLER: &str = "iso";
/// Where `cargo build --release --target wasm32-wasip2` in `tests/guests/` puts `hostile.wasm`.
const DEFAULT_COMPONENTS: &str = "tests/guests/target/wasm32-wasip2/release";
/// The default deadline, shorter than the server's 1000 ms so that each halving step (and the run)
/// stays short; the isolation claim does not depend on its length.
const DEFAULT_DEADLINE_MS: u64 = 200;
/// Acceptance targets: the other partitions lose at most this share of throughput, and their p99
/// delay grows by at most this share.
const TARGET_THROUGHPUT_LOSS: f64 = 0.05;
const TARGET_P99_INCREASE: f64 = 0.10;
/// How often the durable end offsets are polled.
const POLL: Duration = Duration::from_millis(2);
/// How long the good partitions' outputs may make no progress before the run is declared stuck.
const STALL: Duration = Duration::from_secs(60);
/// Events read per request when collecting delays.
const READ_CHUNK: u64 = 1000;
/// Value characters of a trigger: `!` is not in the generated values' alphabet, so no ordinary
/// event can equal a trigger, and it needs no escaping in JSON or in a URL query.
const TRIGGER_CHAR: char = '!';

/// `procd bench isolation` flags.
#[derive(Debug, Args)]
pub struct IsolationArgs {
    /// Directory holding hostile.wasm [default: tests/guests/target/wasm32-wasip2/release].
    #[arg(long, value_name = "DIR")]
    components: Option<PathBuf>,
    /// Events each phase writes in each round (at 100 000 a phase lasts under a second on 2 cores,
    /// too short to compare against another process's noise).
    #[arg(long, default_value_t = 200_000)]
    events: usize,
    /// Rounds of (A) then (B); figures are totals over all rounds.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// The partition whose events carry triggers in (B).
    #[arg(long, default_value_t = 0)]
    bad_partition: u32,
    /// In (B), every Nth event of the bad partition's share is a trigger (the first one included).
    #[arg(long, default_value_t = 1000)]
    poison_every: usize,
    #[command(flatten)]
    load: WorkloadArgs,
}

/// Validated settings of a run.
struct Plan {
    events: usize,
    rounds: usize,
    partitions: u32,
    bad: u32,
    poison_every: usize,
    load: Workload,
}

impl Plan {
    fn new(args: IsolationArgs) -> anyhow::Result<Self> {
        check_range("--events", args.events, 1, 100_000_000)?;
        check_range("--rounds", args.rounds, 1, 1000)?;
        check_range("--poison-every", args.poison_every, 1, 100_000_000)?;
        let partitions = args.load.partitions;
        if partitions < 2 {
            bail!("--partitions must be at least 2 (one bad, others measured); got {partitions}");
        }
        if args.bad_partition >= partitions {
            bail!(
                "--bad-partition must be in 0..{partitions}; got {}",
                args.bad_partition
            );
        }
        let defaults = [("handler.deadline_ms", DEFAULT_DEADLINE_MS.to_string())];
        Ok(Self {
            events: args.events,
            rounds: args.rounds,
            partitions,
            bad: args.bad_partition,
            poison_every: args.poison_every,
            // The trigger travels in the deploy URL, so it is kept well under any URL limit.
            load: Workload::new(args.load, args.events, 3..=4096, &defaults)?,
        })
    }

    /// The measured partitions: all but the bad one.
    fn good(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.partitions).filter(|&p| p != self.bad)
    }
}

/// The trigger: a JSON string of exactly `value_bytes` bytes that no generated value equals.
fn trigger_value(value_bytes: usize) -> String {
    let inner: String = std::iter::repeat_n(TRIGGER_CHAR, value_bytes.saturating_sub(2)).collect();
    format!("\"{inner}\"")
}

/// Which of `events` events are triggers in (B): every `every`th one (the first included) of those
/// whose key routes to partition `bad` of `partitions`.
fn poison_mask(events: usize, partitions: u32, bad: u32, every: usize) -> Vec<bool> {
    let mut seen = 0usize;
    (0..events)
        .map(|i| {
            if route(Some(event_key(i).as_bytes()), None, partitions) != bad {
                return false;
            }
            let poison = seen.is_multiple_of(every.max(1));
            seen += 1;
            poison
        })
        .collect()
}

/// The request bodies of a phase: event `i` carries the trigger where `poison[i]`, else its value.
fn bodies(plan: &Plan, poison: &[bool]) -> Arc<Vec<Bytes>> {
    let trigger = trigger_value(plan.load.value_bytes);
    plan.load.bodies(plan.events, |i| {
        if poison.get(i).copied().unwrap_or(false) {
            trigger.clone()
        } else {
            plan.load.value(i)
        }
    })
}

/// What one phase of one round measured.
struct Measured {
    /// Events of the good partitions.
    good_events: u64,
    /// From the first request until every good partition's output was durable.
    elapsed: Duration,
    /// Until the last `202`.
    ingest: Duration,
    /// CPU time of the whole process while the clock ran.
    cpu: Option<Duration>,
    /// Event→output delays of every event of the good partitions, in ms.
    delays_ms: Vec<u64>,
    /// The bad partition when the good ones were done.
    bad: BadProgress,
}

/// How far the bad partition got.
struct BadProgress {
    inputs: u64,
    outputs: u64,
    committed: u64,
    dead_letters: usize,
    triggers: usize,
}

pub(super) async fn run(args: IsolationArgs) -> anyhow::Result<()> {
    let dir = args
        .components
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_COMPONENTS));
    let plan = Plan::new(args)?;
    let component = read_component(&dir, "hostile").map_err(|e| {
        anyhow::anyhow!(
            "{e}; hostile.wasm is a test guest: `cargo build --release --target wasm32-wasip2 \
             --manifest-path tests/guests/Cargo.toml`"
        )
    })?;
    let scratch = Scratch::create(&plan.load.parent)?;
    let poison = poison_mask(plan.events, plan.partitions, plan.bad, plan.poison_every);
    let triggers = poison.iter().filter(|&&p| p).count();
    print_parameters(&plan, &component, scratch.path(), triggers);

    let clean = bodies(&plan, &[]);
    let poisoned = bodies(&plan, &poison);
    let component = Bytes::from(component.bytes);
    let mut baseline = Vec::with_capacity(plan.rounds);
    let mut bad = Vec::with_capacity(plan.rounds);
    for round in 1..=plan.rounds {
        let dir = Scratch::create(scratch.path())?;
        let measured = phase(&plan, dir.path(), clean.clone(), component.clone(), 0)
            .await
            .with_context(|| format!("phase (A), round {round}"))?;
        drop(dir);
        baseline.push(measured);
        let dir = Scratch::create(scratch.path())?;
        let measured = phase(
            &plan,
            dir.path(),
            poisoned.clone(),
            component.clone(),
            triggers,
        )
        .await
        .with_context(|| format!("phase (B), round {round}"))?;
        drop(dir);
        bad.push(measured);
    }
    print_results(&plan, &baseline, &bad);
    Ok(())
}

/// One phase on a fresh server.
async fn phase(
    plan: &Plan,
    data_dir: &Path,
    bodies: Arc<Vec<Bytes>>,
    component: Bytes,
    triggers: usize,
) -> anyhow::Result<Measured> {
    let mut server = Running::start(&plan.load.config, data_dir).await?;
    let measured = measure_phase(plan, &mut server, bodies, component, triggers).await;
    server.stop().await?;
    measured
}

async fn measure_phase(
    plan: &Plan,
    server: &mut Running,
    bodies: Arc<Vec<Bytes>>,
    component: Bytes,
    triggers: usize,
) -> anyhow::Result<Measured> {
    server.create_topic(INPUT).await?;
    server.create_topic(OUTPUT).await?;
    // The trigger is a JSON string: its quotes are escaped for the query.
    let on = trigger_value(plan.load.value_bytes).replace('"', "%22");
    let query = format!("input={INPUT}&output={OUTPUT}&config=mode=loop&config=on={on}");
    server.deploy(HANDLER, &query, component).await?;

    let cpu_before = process_cpu();
    let started = Instant::now();
    let posted = post_all(&server.data_url, INPUT, plan.load.connections, bodies).await?;
    let ingest = started.elapsed();
    // Every input is durable now, so the targets are known.
    let targets: Vec<(u32, u64)> = plan
        .good()
        .map(|p| (p, server.end_offset(INPUT, p)))
        .collect();
    wait_for_good_outputs(server, &targets).await?;
    let elapsed = started.elapsed();
    let cpu = process_cpu()
        .zip(cpu_before)
        .map(|(now, before)| now.saturating_sub(before));
    posted.check(plan.events)?;

    // The bad partition as it stood when the others were done.
    let status = server.handler_status(HANDLER).await?;
    let committed = status
        .partitions
        .iter()
        .find(|t| t.partition == plan.bad)
        .map_or(0, |t| t.committed_offset);
    let bad = BadProgress {
        inputs: server.end_offset(INPUT, plan.bad),
        outputs: server.end_offset(OUTPUT, plan.bad),
        committed,
        dead_letters: server.dead_letters(HANDLER, plan.bad).await?,
        triggers,
    };
    for (p, _) in &targets {
        let dead = server.dead_letters(HANDLER, *p).await?;
        if dead > 0 {
            bail!("partition {p} (not the bad one) dead-lettered {dead} events");
        }
    }
    let mut delays_ms = Vec::new();
    for &(p, end) in &targets {
        delays_ms.extend(partition_delays(server, p, end).await?);
    }
    Ok(Measured {
        good_events: targets.iter().map(|(_, end)| end).sum(),
        elapsed,
        ingest,
        cpu,
        delays_ms,
        bad,
    })
}

/// Polls the good partitions' output end offsets until each reaches its input's; fails if they stop
/// moving for [`STALL`].
async fn wait_for_good_outputs(server: &mut Running, targets: &[(u32, u64)]) -> anyhow::Result<()> {
    let total: u64 = targets.iter().map(|(_, end)| end).sum();
    let mut last = (0, Instant::now());
    loop {
        let mut done = 0;
        let mut all = true;
        for &(p, end) in targets {
            let out = server.end_offset(OUTPUT, p);
            if out > end {
                bail!("{OUTPUT} partition {p} holds {out} events for {end} inputs");
            }
            all &= out == end;
            done += out;
        }
        if all {
            return Ok(());
        }
        if done != last.0 {
            last = (done, Instant::now());
        } else if last.1.elapsed() > STALL {
            let status = server.handler_status(HANDLER).await?;
            bail!(
                "the good partitions' output stopped at {done} of {total} events for {} s; handler: {status:?}",
                STALL.as_secs()
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Delays of every event of a good partition, in ms: output offset `o` is input offset `o`'s.
async fn partition_delays(
    server: &mut Running,
    partition: u32,
    end: u64,
) -> anyhow::Result<Vec<u64>> {
    let mut delays = Vec::with_capacity(usize::try_from(end).unwrap_or(0));
    let mut from = 0;
    while from < end {
        let input = server.read(INPUT, partition, from, READ_CHUNK).await?;
        let output = server.read(OUTPUT, partition, from, READ_CHUNK).await?;
        let read = input.len().min(output.len()) as u64;
        if read == 0 {
            bail!("partition {partition}: nothing to read at offset {from} of {end}");
        }
        for (i, o) in input.iter().zip(&output) {
            if i.offset != o.offset || i.key != o.key {
                bail!(
                    "{OUTPUT} partition {partition} offset {} does not match {INPUT}'s",
                    o.offset
                );
            }
            delays.push(o.timestamp_ms.saturating_sub(i.timestamp_ms));
        }
        from += read;
    }
    Ok(delays)
}

// ---------------------------------------------------------------------------------------------------
// Output

fn print_parameters(plan: &Plan, component: &Component, dir: &Path, triggers: usize) {
    let config = &plan.load.config;
    let good: Vec<String> = plan.good().map(|p| p.to_string()).collect();
    println!("procd bench isolation");
    println!(
        "  events        {} per phase per round, {} round(s) of (A) then (B), a fresh server and data \
         directory for each phase",
        plan.events, plan.rounds
    );
    println!(
        "  event         key \"k<i>\", value a {}-byte JSON string; NDJSON line ~{} B",
        plan.load.value_bytes,
        ndjson_line(plan.events / 2, &plan.load.value(0)).len()
    );
    println!(
        "  clients       {} keep-alive connections, {} requests of {} events, bodies pre-built, in-process",
        plan.load.connections,
        plan.events.div_ceil(plan.load.batch),
        plan.load.batch
    );
    println!(
        "  shape         {} partitions over {} cells; handler batches of <= {} events; \
         handler.deadline_ms {}",
        config.partitions,
        config.cells,
        config.handler.batch_max_events,
        config.handler.deadline_ms
    );
    println!(
        "  handler       {} ({} B), mode=loop, deployed {INPUT:?} -> {OUTPUT:?} before the clock starts",
        component.path.display(),
        component.bytes.len()
    );
    println!("  (A) baseline  no trigger");
    println!(
        "  (B) poisoned  the same events; every {}th of partition {}'s is a trigger ({triggers} \
         triggers; each costs ~log2(batch)+1 deadlines of halving)",
        plan.poison_every, plan.bad
    );
    println!(
        "  measured      partitions {} only: timed from the first request until their outputs are \
         durable (polled every {} ms); delay out.timestamp_ms - in.timestamp_ms of every event",
        good.join(","),
        POLL.as_millis()
    );
    let set = if plan.load.set.is_empty() {
        "none".to_string()
    } else {
        plan.load.set.join(" ")
    };
    println!(
        "  server        defaults but handler.deadline_ms={DEFAULT_DEADLINE_MS}, procd.toml and \
         PROCD_* not read; --set: {set}"
    );
    println!("  data dir      {} (removed afterwards)", dir.display());
    println!("  machine       {}", machine_line());
    println!();
}

/// Totals of one phase over all rounds.
struct Totals {
    events: u64,
    elapsed: Duration,
    ingest: Duration,
    cpu: Option<Duration>,
    delays: Vec<u64>,
}

impl Totals {
    fn of(phases: &[Measured]) -> Self {
        let mut delays: Vec<u64> = phases
            .iter()
            .flat_map(|m| m.delays_ms.iter().copied())
            .collect();
        delays.sort_unstable();
        Self {
            events: phases.iter().map(|m| m.good_events).sum(),
            elapsed: phases.iter().map(|m| m.elapsed).sum(),
            ingest: phases.iter().map(|m| m.ingest).sum(),
            cpu: phases.iter().map(|m| m.cpu).sum(),
            delays,
        }
    }

    fn rate(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64().max(f64::MIN_POSITIVE)
    }

    fn p99(&self) -> u64 {
        percentile(&self.delays, 0.99)
    }

    fn row(&self, label: &str) -> String {
        let cpu = self.cpu.map_or("-".into(), |cpu| {
            format!(
                "{:.2}",
                cpu.as_secs_f64() / self.elapsed.as_secs_f64().max(f64::MIN_POSITIVE)
            )
        });
        format!(
            "{label:<26} {:>9} {:>8.3} {:>8.3} {:>10.0} {:>6} {:>6} {:>6} {:>5}",
            self.events,
            self.ingest.as_secs_f64(),
            self.elapsed.as_secs_f64(),
            self.rate(),
            percentile(&self.delays, 0.5),
            self.p99(),
            percentile(&self.delays, 1.0),
            cpu
        )
    }
}

/// `met` or `NOT met`.
fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "NOT met" }
}

fn print_results(plan: &Plan, baseline: &[Measured], bad: &[Measured]) {
    let (a, b) = (Totals::of(baseline), Totals::of(bad));
    println!(
        "other partitions only       {:>9} {:>8} {:>8} {:>10} {:>6} {:>6} {:>6} {:>5}",
        "events", "ingest s", "total s", "events/s", "p50 ms", "p99 ms", "max ms", "CPU"
    );
    println!("{}", a.row("(A) no trigger"));
    println!("{}", b.row(&format!("(B) partition {} looping", plan.bad)));
    println!(
        "(ingest s: until the last 202; total s: until their outputs were durable; delay in ms of \
         log-append time; CPU: process CPU time over total s, in cores)"
    );
    println!();
    let throughput = b.rate() / a.rate().max(f64::MIN_POSITIVE);
    let loss = 1.0 - throughput;
    let p99 = b.p99() as f64 / (a.p99() as f64).max(1.0);
    let per_round: Vec<String> = baseline
        .iter()
        .zip(bad)
        .map(|(a, b)| {
            let rate = |m: &Measured| m.good_events as f64 / m.elapsed.as_secs_f64().max(1e-9);
            format!("{:.2}", rate(b) / rate(a).max(f64::MIN_POSITIVE))
        })
        .collect();
    println!(
        "throughput B/A = {throughput:.3} ({:+.1}%)   target loss <= {:.0}%: {}   (per round: {})",
        -loss * 100.0,
        TARGET_THROUGHPUT_LOSS * 100.0,
        verdict(loss <= TARGET_THROUGHPUT_LOSS),
        per_round.join(" ")
    );
    println!(
        "p99 delay  B/A = {p99:.3} ({:+.1}%)   target increase <= {:.0}%: {}   ({} ms vs {} ms, 1 ms resolution)",
        (p99 - 1.0) * 100.0,
        TARGET_P99_INCREASE * 100.0,
        verdict(p99 - 1.0 <= TARGET_P99_INCREASE),
        b.p99(),
        a.p99()
    );
    println!();
    for (round, m) in bad.iter().enumerate() {
        let bp = &m.bad;
        println!(
            "(B) round {}: when the others were done, bad partition {} had {} inputs ({} triggers), \
             committed offset {}, {} outputs, {} dead letters",
            round + 1,
            plan.bad,
            bp.inputs,
            bp.triggers,
            bp.committed,
            bp.outputs,
            bp.dead_letters
        );
    }
}

#[cfg(test)]
mod tests {
    use super::super::util::event_value;
    use super::*;

    #[test]
    fn triggers_go_to_the_bad_partition_only_and_every_nth() {
        let (events, partitions, bad, every) = (10_000, 8, 3, 100);
        let mask = poison_mask(events, partitions, bad, every);
        let share = (0..events)
            .filter(|&i| route(Some(event_key(i).as_bytes()), None, partitions) == bad)
            .count();
        assert!(share > 0);
        assert_eq!(mask.iter().filter(|&&p| p).count(), share.div_ceil(every));
        for (i, &poison) in mask.iter().enumerate() {
            if poison {
                assert_eq!(route(Some(event_key(i).as_bytes()), None, partitions), bad);
            }
        }
        // The bad partition's very first event is a trigger, so it loops from the start.
        let first =
            (0..events).find(|&i| route(Some(event_key(i).as_bytes()), None, partitions) == bad);
        assert!(matches!(first, Some(i) if mask[i]));
    }

    #[test]
    fn the_trigger_has_the_value_size_and_no_generated_value_equals_it() -> Result<(), String> {
        let trigger = trigger_value(256);
        assert_eq!(trigger.len(), 256);
        assert!(matches!(serde_json::from_str::<String>(&trigger), Ok(s) if s.len() == 254));
        assert!((0..1000).all(|i| event_value(i, 256) != trigger));
        let line = ndjson_line(7, &trigger);
        let events = crate::ingest::parse::ndjson(line.as_bytes())?;
        assert_eq!(
            events[0].value,
            crate::log::PayloadRef::Json(trigger.as_bytes())
        );
        Ok(())
    }
}
