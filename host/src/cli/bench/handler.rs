//! `procd bench handler`: the per-event cost of running a handler through the wasm boundary, next to the
//! same logic in native Rust, in one run.
//!
//! The `passthrough` and `counter` example components are compiled with [`Runtime`] (in a temporary
//! cache directory) and instantiated once each, as the processor instantiates one per partition. Their
//! input is what the processor hands them: stored [`Record`]s (key `key-NNNNNN` from `--keys` distinct
//! keys in pseudo-random order, a `--value-bytes` JSON string value, no headers) decoded and laid out by
//! [`InputBatch`] into `--batch`-event [`Batch`]es. Eight different batches are used in turn.
//!
//! Measured, single-threaded, per event:
//!
//! - **wasm**: [`Instance::handle`] on a prepared batch (lowering the columns into guest memory, the SDK's
//!   per-event loop and the handler, lifting the output columns back; the values column is copied in
//!   only if the handler reads a value, which neither example does), then [`Instance::take_writes`]
//!   and applying those writes to a `HashMap` that stands in for the committed state, which is also
//!   what the counter's `get-many` reads. That is everything the server does per batch with a handler's
//!   result except storage (the fjall read of the input and the commit) and re-encoding the outputs.
//! - **native**: the same logic compiled into procd, over the same [`Batch`], producing the same
//!   [`OutputBatch`]: passthrough forwards each event's key and value (`key-sources`/`value-sources`,
//!   as the SDK does when a handler emits the event's own key or value); counter
//!   keeps a `u64` per key in a `HashMap<Vec<u8>, u64>` and emits the new count as decimal text. Both
//!   paths are checked to give identical outputs before anything is timed, so wasm/native is the cost
//!   of the boundary, the sandbox and the SDK for the same work.
//! - **server's work around the call**, separately: [`InputBatch::refill`] (stored records decoded into a
//!   reused batch, as the processor does before calling) and [`to_records`] (output columns to encoded
//!   records, with its JSON check of every value not forwarded, as the processor does after), so the cost of a batch
//!   in the processor minus storage can be added up.
//!
//! Time is the measuring thread's CPU time (`/proc/thread-self/schedstat`), not wall time: on a shared
//! machine another process can hold the CPU for a while, which says nothing about the code. Wall time
//! is printed too. All measurements run interleaved for `--rounds` rounds of at least `--seconds` and
//! `--batches` batches each, after a warm-up; each figure is the median round, with the spread shown.

use std::collections::HashMap;
use std::hint::black_box;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use clap::Args;

use super::util::{
    Component, Scratch, check_range, components_dir, event_value, machine_line, median,
    read_component, splitmix, thread_cpu, thread_cpu_is_exact,
};
use crate::catalog::HandlerVersion;
use crate::cell::{InputBatch, to_records};
use crate::log::{Payload, Record};
use crate::runtime::{
    Batch, HandleOutcome, Instance, Limits, LogLabel, OutputBatch, Runtime, StateStore, StateWrite,
};

/// Different batches prepared and used in turn, so no single batch's layout is what gets measured.
const DISTINCT_BATCHES: usize = 8;
/// Warm-up per measurement before the first round.
const WARM_UP: Duration = Duration::from_millis(300);
/// Acceptance targets, events per second per core.
const TARGET_PASSTHROUGH: f64 = 30e6;
const TARGET_COUNTER: f64 = 5e6;
/// Log-append time of the first generated event (any fixed value: handlers never look at it here).
const BASE_TIMESTAMP_MS: u64 = 1_760_000_000_000;

/// `procd bench handler` flags.
#[derive(Debug, Args)]
pub struct HandlerArgs {
    /// Directory holding passthrough.wasm and counter.wasm [default:
    /// guest-examples/target/wasm32-wasip2/release].
    #[arg(long, value_name = "DIR")]
    components: Option<PathBuf>,
    /// Events per batch.
    #[arg(long, default_value_t = 1000)]
    batch: usize,
    /// Size of each event's value: a JSON string of this many bytes, quotes included.
    #[arg(long, default_value_t = 256)]
    value_bytes: usize,
    /// Distinct keys the events' keys are drawn from (the counter keeps one count per key).
    #[arg(long, default_value_t = 100)]
    keys: usize,
    /// Batches each measurement handles at least (it also runs for at least --seconds).
    #[arg(long, default_value_t = 100)]
    batches: usize,
    /// Seconds each measurement runs at least.
    #[arg(long, default_value_t = 1.0)]
    seconds: f64,
    /// Rounds of every measurement; figures are medians over rounds.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Run only this measurement (repeatable), e.g. under `perf record`.
    #[arg(long, value_enum, value_name = "MEASUREMENT")]
    only: Vec<Kind>,
}

/// Validated settings.
struct Plan {
    dir: PathBuf,
    batch: usize,
    value_bytes: usize,
    keys: usize,
    batches: usize,
    min_time: Duration,
    rounds: usize,
    kinds: Vec<Kind>,
}

impl Plan {
    fn new(args: HandlerArgs) -> anyhow::Result<Self> {
        check_range("--batch", args.batch, 1, 100_000)?;
        check_range("--value-bytes", args.value_bytes, 2, 1 << 20)?;
        check_range("--keys", args.keys, 1, 1_000_000)?;
        check_range("--batches", args.batches, 1, 100_000_000)?;
        check_range("--rounds", args.rounds, 1, 1000)?;
        if !(0.01..=3600.0).contains(&args.seconds) {
            bail!("--seconds must be in 0.01..=3600; got {}", args.seconds);
        }
        // The processor never builds a batch over 4 MiB of input; stay in the same regime.
        let bytes = args.batch.saturating_mul(args.value_bytes + 16);
        if bytes > 64 << 20 {
            bail!(
                "--batch {} of {}-byte values makes {bytes}-byte batches; keep them under 64 MiB",
                args.batch,
                args.value_bytes
            );
        }
        Ok(Self {
            dir: components_dir(args.components),
            batch: args.batch,
            value_bytes: args.value_bytes,
            keys: args.keys,
            batches: args.batches,
            min_time: Duration::from_secs_f64(args.seconds),
            rounds: args.rounds,
            kinds: if args.only.is_empty() {
                KINDS.to_vec()
            } else {
                args.only
            },
        })
    }
}

/// What one measurement saw.
#[derive(Clone, Copy)]
struct Sample {
    events: u64,
    wall: Duration,
    /// The measuring thread's CPU time; `None` where it cannot be read.
    cpu: Option<Duration>,
}

impl Sample {
    /// CPU nanoseconds per event (wall time where CPU time is unknown).
    fn ns(&self) -> f64 {
        self.cpu.unwrap_or(self.wall).as_nanos() as f64 / self.events.max(1) as f64
    }

    fn wall_ns(&self) -> f64 {
        self.wall.as_nanos() as f64 / self.events.max(1) as f64
    }
}

/// Runs `step` (one batch, given its number) until at least `min_batches` batches and `min_time` have
/// passed.
fn measure(
    events_per_batch: usize,
    min_batches: usize,
    min_time: Duration,
    mut step: impl FnMut(usize) -> anyhow::Result<()>,
) -> anyhow::Result<Sample> {
    let cpu_before = thread_cpu();
    let started = Instant::now();
    let mut batches = 0usize;
    loop {
        step(batches)?;
        batches += 1;
        if batches >= min_batches && started.elapsed() >= min_time {
            break;
        }
    }
    let wall = started.elapsed();
    let cpu = thread_cpu()
        .zip(cpu_before)
        .map(|(now, before)| now.saturating_sub(before));
    Ok(Sample {
        events: (batches * events_per_batch) as u64,
        wall,
        cpu,
    })
}

// ---------------------------------------------------------------------------------------------------
// Inputs

/// The prepared input: the same events as stored records and as batches.
struct Inputs {
    /// Per batch, `(offset, encoded record)` as the processor reads them from the log.
    stored: Vec<Vec<(u64, Vec<u8>)>>,
    /// Per batch, what [`InputBatch`] makes of them.
    batches: Vec<InputBatch>,
}

fn event_key(j: u64) -> String {
    format!("key-{j:06}")
}

fn inputs(plan: &Plan) -> anyhow::Result<Inputs> {
    let mut seed = 0x5eed_u64;
    let mut stored = Vec::with_capacity(DISTINCT_BATCHES);
    let mut batches = Vec::with_capacity(DISTINCT_BATCHES);
    for b in 0..DISTINCT_BATCHES {
        let mut records = Vec::with_capacity(plan.batch);
        for i in 0..plan.batch {
            let n = b * plan.batch + i;
            let record = Record {
                timestamp_ms: BASE_TIMESTAMP_MS + n as u64,
                key: Some(event_key(splitmix(&mut seed) % plan.keys as u64).into_bytes()),
                value: Payload::Json(event_value(n, plan.value_bytes)),
                headers: Vec::new(),
                id: None,
            };
            records.push((n as u64, record.encode()));
        }
        batches.push(InputBatch::decode(0, &records)?);
        stored.push(records);
    }
    Ok(Inputs { stored, batches })
}

// ---------------------------------------------------------------------------------------------------
// The wasm path

/// The committed state of the benchmark's partition: the map the server's storage stands for.
#[derive(Clone, Default)]
struct Committed(Arc<Mutex<HashMap<Vec<u8>, Vec<u8>>>>);

impl StateStore for Committed {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, String> {
        Ok(self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key)
            .cloned())
    }
}

impl Committed {
    /// Commits a batch's state writes.
    fn apply(&self, writes: Vec<StateWrite>) {
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        for (key, value) in writes {
            match value {
                Some(value) => map.insert(key, value),
                None => map.remove(&key),
            };
        }
    }

    /// The sum of all stored counts (8-byte little-endian values).
    fn total_count(&self) -> u64 {
        let map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        map.values()
            .filter_map(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
            .map(u64::from_le_bytes)
            .sum()
    }
}

/// One instantiated example with its committed state.
struct Wasm {
    name: &'static str,
    instance: Instance,
    committed: Committed,
    compile_time: Duration,
    size: usize,
}

impl Wasm {
    fn start(runtime: &Runtime, component: &Component) -> anyhow::Result<Self> {
        let started = Instant::now();
        let compiled = runtime
            .compile(&component.bytes)
            .with_context(|| format!("cannot compile {}", component.path.display()))?;
        let compile_time = started.elapsed();
        let committed = Committed::default();
        let label = LogLabel {
            handler: Arc::from(component.name),
            version: 1,
            partition: 0,
        };
        let instance = runtime
            .instantiate(
                &compiled,
                &Limits::default(),
                Box::new(committed.clone()),
                &[],
                label,
            )
            .with_context(|| format!("cannot instantiate {}", component.path.display()))?;
        Ok(Self {
            name: component.name,
            instance,
            committed,
            compile_time,
            size: component.bytes.len(),
        })
    }

    /// Everything the server does with one batch between reading and committing it, but re-encoding the
    /// outputs: the call, then taking the state writes and applying them to the committed state.
    fn step(&mut self, input: &InputBatch) -> anyhow::Result<OutputBatch> {
        match self.instance.handle(&input.batch, input.values()) {
            Ok(HandleOutcome::Outputs(outputs)) => {
                self.committed.apply(self.instance.take_writes().writes);
                Ok(outputs)
            }
            Ok(HandleOutcome::EventFailed { index, message }) => {
                bail!("{} failed event {index}: {message}", self.name)
            }
            Err(e) => bail!("{} trapped: {e}", self.name),
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// The native path

fn output_batch(events: usize, key_bytes: usize, value_bytes: usize) -> OutputBatch {
    OutputBatch {
        topics: Vec::with_capacity(events),
        keys: Vec::with_capacity(key_bytes),
        key_ends: Vec::with_capacity(events),
        values: Vec::with_capacity(value_bytes),
        value_ends: Vec::with_capacity(events),
        value_sources: Vec::with_capacity(events),
        key_sources: Vec::with_capacity(events),
    }
}

/// The end of a column, as the WIT's `u32` (the benchmark's batches are far smaller).
fn end(column: &[u8]) -> u32 {
    u32::try_from(column.len()).unwrap_or(u32::MAX)
}

/// Each event's key, in order, as the SDK's cursor reads them (a bad end gives an empty slice).
fn keys(batch: &Batch) -> impl Iterator<Item = &[u8]> {
    let mut key_start = 0usize;
    batch.key_ends.iter().map(move |&key_end| {
        let key_end = key_end as usize;
        let key = batch.keys.get(key_start..key_end).unwrap_or_default();
        key_start = key_end;
        key
    })
}

/// `passthrough` in native Rust: every event, key and value forwarded, to output 0.
fn native_passthrough(batch: &Batch) -> OutputBatch {
    let mut out = output_batch(batch.key_ends.len(), 0, 0);
    for source in (1u32..).take(batch.key_ends.len()) {
        out.topics.push(0);
        out.key_ends.push(0);
        out.key_sources.push(source);
        out.value_ends.push(0);
        out.value_sources.push(source);
    }
    out
}

/// `counter` in native Rust: count per key, emit the key and the new count in decimal to output 0.
fn native_counter(counts: &mut HashMap<Vec<u8>, u64>, batch: &Batch) -> OutputBatch {
    let n = batch.key_ends.len();
    let mut out = output_batch(n, 0, n * 4);
    for (source, key) in (1u32..).zip(keys(batch)) {
        let count = match counts.get_mut(key) {
            Some(count) => {
                *count += 1;
                *count
            }
            None => {
                counts.insert(key.to_vec(), 1);
                1
            }
        };
        out.topics.push(0);
        out.key_ends.push(0);
        out.key_sources.push(source);
        push_decimal(&mut out.values, count);
        out.value_ends.push(end(&out.values));
        out.value_sources.push(0);
    }
    out
}

/// Appends the decimal digits of `n`, as the SDK's `ValueWriter::push_decimal` does.
fn push_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[start..]);
}

fn same_outputs(a: &OutputBatch, b: &OutputBatch) -> bool {
    a.topics == b.topics
        && a.keys == b.keys
        && a.key_ends == b.key_ends
        && a.values == b.values
        && a.value_ends == b.value_ends
        && a.value_sources == b.value_sources
        && a.key_sources == b.key_sources
}

// ---------------------------------------------------------------------------------------------------
// The run

/// Every measurement, in the order each round runs them.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, clap::ValueEnum)]
enum Kind {
    WasmPassthrough,
    NativePassthrough,
    WasmCounter,
    NativeCounter,
    DecodeBuild,
    ToRecordsPassthrough,
    ToRecordsCounter,
}

const KINDS: [Kind; 7] = [
    Kind::WasmPassthrough,
    Kind::NativePassthrough,
    Kind::WasmCounter,
    Kind::NativeCounter,
    Kind::DecodeBuild,
    Kind::ToRecordsPassthrough,
    Kind::ToRecordsCounter,
];

/// Everything a measurement may touch.
struct Bench {
    inputs: Inputs,
    passthrough: Wasm,
    counter: Wasm,
    native_counts: HashMap<Vec<u8>, u64>,
    /// Per distinct batch, what each handler emitted for it (input of the `to_records` measurements).
    passthrough_outputs: Vec<OutputBatch>,
    counter_outputs: Vec<OutputBatch>,
    version: HandlerVersion,
    /// The reused batch the decode measurement fills, as the processor reuses one.
    scratch: InputBatch,
    /// Events each path has counted so far, to check the final counts.
    wasm_counted: u64,
    native_counted: u64,
}

impl Bench {
    /// Runs one batch of measurement `kind`.
    fn step(&mut self, kind: Kind, n: usize) -> anyhow::Result<()> {
        let i = n % self.inputs.batches.len();
        match kind {
            Kind::WasmPassthrough => {
                black_box(self.passthrough.step(&self.inputs.batches[i])?);
            }
            Kind::NativePassthrough => {
                black_box(native_passthrough(black_box(&self.inputs.batches[i].batch)));
            }
            Kind::WasmCounter => {
                let input = &self.inputs.batches[i];
                black_box(self.counter.step(input)?);
                self.wasm_counted += input.len() as u64;
            }
            Kind::NativeCounter => {
                let batch = &self.inputs.batches[i].batch;
                black_box(native_counter(&mut self.native_counts, black_box(batch)));
                self.native_counted += batch.key_ends.len() as u64;
            }
            Kind::DecodeBuild => {
                self.scratch.refill(0, black_box(&self.inputs.stored[i]))?;
                black_box(&self.scratch);
            }
            Kind::ToRecordsPassthrough => {
                let records = to_records(
                    black_box(&self.passthrough_outputs[i]),
                    &self.inputs.batches[i],
                    &self.version,
                )
                .map_err(|e| anyhow!("to_records: {e}"))?;
                black_box(records);
            }
            Kind::ToRecordsCounter => {
                let records = to_records(
                    black_box(&self.counter_outputs[i]),
                    &self.inputs.batches[i],
                    &self.version,
                )
                .map_err(|e| anyhow!("to_records: {e}"))?;
                black_box(records);
            }
        }
        Ok(())
    }

    /// Runs every batch through both paths once, checks they agree, and keeps the outputs.
    fn check_and_collect(&mut self) -> anyhow::Result<()> {
        for i in 0..self.inputs.batches.len() {
            let input = &self.inputs.batches[i];
            let batch = &input.batch;
            let wasm = self.passthrough.step(input)?;
            if !same_outputs(&wasm, &native_passthrough(batch)) {
                bail!("passthrough.wasm and the native passthrough disagree on batch {i}");
            }
            self.passthrough_outputs.push(wasm);
            let wasm = self.counter.step(input)?;
            let native = native_counter(&mut self.native_counts, batch);
            if !same_outputs(&wasm, &native) {
                bail!("counter.wasm and the native counter disagree on batch {i}");
            }
            self.counter_outputs.push(wasm);
            self.wasm_counted += batch.key_ends.len() as u64;
            self.native_counted += batch.key_ends.len() as u64;
        }
        Ok(())
    }

    /// Both counters' state must hold exactly the events they were given.
    fn check_counts(&self) -> anyhow::Result<()> {
        let wasm = self.counter.committed.total_count();
        let native: u64 = self.native_counts.values().sum();
        if wasm != self.wasm_counted || native != self.native_counted {
            bail!(
                "counts are off: wasm state holds {wasm} of {} events, native {native} of {}",
                self.wasm_counted,
                self.native_counted
            );
        }
        Ok(())
    }
}

pub(super) fn run(args: HandlerArgs) -> anyhow::Result<()> {
    let plan = Plan::new(args)?;
    let passthrough = read_component(&plan.dir, "passthrough")?;
    let counter = read_component(&plan.dir, "counter")?;
    // Declared before the runtime, so it is removed after the runtime is gone.
    let cache = Scratch::create(&std::env::temp_dir())?;
    let runtime = Runtime::new(cache.path(), crate::runtime::DEFAULT_MAX_WASM_STACK)
        .context("cannot start the wasm runtime")?;
    let inputs = inputs(&plan)?;
    let mut bench = Bench {
        inputs,
        passthrough: Wasm::start(&runtime, &passthrough)?,
        counter: Wasm::start(&runtime, &counter)?,
        native_counts: HashMap::new(),
        passthrough_outputs: Vec::new(),
        counter_outputs: Vec::new(),
        version: HandlerVersion {
            version: 1,
            outputs: vec!["out".into()],
            config: Vec::new(),
            size_bytes: 0,
            sha256: String::new(),
            created_ms: 0,
            limits: Default::default(),
        },
        scratch: InputBatch::new(0),
        wasm_counted: 0,
        native_counted: 0,
    };
    print_parameters(&plan, &bench, cache.path());
    bench.check_and_collect()?;

    for &kind in &plan.kinds {
        measure(plan.batch, 1, WARM_UP, |n| bench.step(kind, n))?;
    }
    let mut samples: HashMap<Kind, Vec<Sample>> = HashMap::new();
    for _ in 0..plan.rounds {
        for &kind in &plan.kinds {
            let sample = measure(plan.batch, plan.batches, plan.min_time, |n| {
                bench.step(kind, n)
            })?;
            samples.entry(kind).or_default().push(sample);
        }
    }
    bench.check_counts()?;
    print_results(&plan, &samples);
    drop(bench);
    drop(runtime);
    drop(cache);
    Ok(())
}

// ---------------------------------------------------------------------------------------------------
// Output

fn print_parameters(plan: &Plan, bench: &Bench, cache: &std::path::Path) {
    let avg_record = bench
        .inputs
        .stored
        .iter()
        .flatten()
        .map(|(_, r)| r.len())
        .sum::<usize>()
        / (DISTINCT_BATCHES * plan.batch).max(1);
    println!("procd bench handler");
    println!(
        "  components    {}: passthrough.wasm ({} B, compiled in {} ms), counter.wasm ({} B, {} ms); \
         procd::runtime, cache in {} (removed afterwards)",
        plan.dir.display(),
        bench.passthrough.size,
        bench.passthrough.compile_time.as_millis(),
        bench.counter.size,
        bench.counter.compile_time.as_millis(),
        cache.display()
    );
    println!(
        "  batch         {} events of one partition, decoded by the processor's InputBatch from stored records \
         (~{avg_record} B each); {DISTINCT_BATCHES} different batches used in turn",
        plan.batch
    );
    println!(
        "  event         key \"key-NNNNNN\" drawn pseudo-randomly from {} distinct keys, value a {}-byte JSON \
         string, no headers",
        plan.keys, plan.value_bytes
    );
    println!(
        "  wasm          Instance::handle(&batch, &values) [lower batch, SDK loop + handler, lift outputs; \
         values are fetched lazily, on a handler's first read, and neither handler reads one], then \
         take_writes() applied to a HashMap standing in for committed state (counter's get-many reads it)"
    );
    println!(
        "  native        same logic in procd's Rust on the same Batch into an OutputBatch: passthrough forwards \
         each event's key and value; counter: HashMap<Vec<u8>, u64> per key, count as decimal; outputs checked equal"
    );
    println!(
        "  not included  reading input from fjall, re-encoding outputs (to_records, measured below), commit"
    );
    let clock = if thread_cpu_is_exact() {
        "the thread's CPU time (schedstat)"
    } else {
        "the thread's CPU time in 10 ms ticks (no schedstat)"
    };
    println!(
        "  timing        one thread; {} interleaved rounds, each measurement >= {:.1} s and >= {} batches, \
         after a {} ms warm-up; ns/event is {clock}; figures are the median round",
        plan.rounds,
        plan.min_time.as_secs_f64(),
        plan.batches,
        WARM_UP.as_millis()
    );
    println!("  machine       {}", machine_line());
    println!();
}

fn print_results(plan: &Plan, samples: &HashMap<Kind, Vec<Sample>>) {
    let ns = |kind: Kind| -> f64 {
        let values: Vec<f64> = samples
            .get(&kind)
            .into_iter()
            .flatten()
            .map(Sample::ns)
            .collect();
        median(&values)
    };
    let wall = |kind: Kind| -> f64 {
        let values: Vec<f64> = samples
            .get(&kind)
            .into_iter()
            .flatten()
            .map(Sample::wall_ns)
            .collect();
        median(&values)
    };
    let spread = |kind: Kind| -> String {
        let values: Vec<f64> = samples
            .get(&kind)
            .into_iter()
            .flatten()
            .map(Sample::ns)
            .collect();
        let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = values.iter().copied().fold(0.0, f64::max);
        format!("{lo:.1}-{hi:.1}")
    };
    let best = |kind: Kind| -> f64 {
        samples
            .get(&kind)
            .into_iter()
            .flatten()
            .map(Sample::ns)
            .fold(f64::INFINITY, f64::min)
    };
    let rate = |ns: f64| 1e3 / ns.max(f64::MIN_POSITIVE);
    if plan.kinds.len() < KINDS.len() {
        for &kind in &plan.kinds {
            println!(
                "{kind:?}: {:.1} ns/event ({:.1} M events/s per core; rounds {}; wall-clock {:.1})",
                ns(kind),
                rate(ns(kind)),
                spread(kind),
                wall(kind)
            );
        }
        return;
    }

    println!(
        "{:<12} {:>12} {:>12} {:>14} {:>14} {:>12}",
        "handler", "wasm ns/ev", "wasm M ev/s", "native ns/ev", "native M ev/s", "wasm/native"
    );
    let rows = [
        (
            "passthrough",
            Kind::WasmPassthrough,
            Kind::NativePassthrough,
        ),
        ("counter", Kind::WasmCounter, Kind::NativeCounter),
    ];
    for (name, w, n) in rows {
        let (wn, nn) = (ns(w), ns(n));
        println!(
            "{name:<12} {wn:>12.1} {:>12.1} {nn:>14.1} {:>14.1} {:>11.1}x",
            rate(wn),
            rate(nn),
            wn / nn.max(f64::MIN_POSITIVE)
        );
    }
    println!(
        "(ns/event: CPU time of the measuring thread; M ev/s = events per second on one core)"
    );
    for (name, w, n) in rows {
        println!(
            "  {name:<11} ns/event over {} rounds: wasm {}, native {}; wall-clock median: wasm {:.1}, native {:.1}",
            plan.rounds,
            spread(w),
            spread(n),
            wall(w),
            wall(n)
        );
    }
    println!();
    for (name, kind, target) in [
        ("passthrough", Kind::WasmPassthrough, TARGET_PASSTHROUGH),
        ("counter", Kind::WasmCounter, TARGET_COUNTER),
    ] {
        let verdict = |ns: f64| {
            if rate(ns) * 1e6 >= target {
                "met"
            } else {
                "NOT met"
            }
        };
        let (typical, best) = (ns(kind), best(kind));
        println!(
            "target {name:<11} >= {:.0} M events/s per core (<= {:.1} ns/event): {} at the median round \
             ({:.1} M events/s), {} in the best round ({:.1} M events/s)",
            target / 1e6,
            1e9 / target,
            verdict(typical),
            rate(typical),
            verdict(best),
            rate(best)
        );
    }
    println!();

    let build = ns(Kind::DecodeBuild);
    println!(
        "{:<58} {:>12} {:>12}",
        "processor's work per event, storage excluded (ns/event)", "passthrough", "counter"
    );
    let line = |label: &str, p: f64, c: f64| println!("{label:<58} {p:>12.1} {c:>12.1}");
    line(
        "  InputBatch::refill (stored records -> Batch)",
        build,
        build,
    );
    line(
        "  handle + take_writes + apply (the wasm column above)",
        ns(Kind::WasmPassthrough),
        ns(Kind::WasmCounter),
    );
    line(
        "  to_records (JSON check unless forwarded, encode records)",
        ns(Kind::ToRecordsPassthrough),
        ns(Kind::ToRecordsCounter),
    );
    let total_p = build + ns(Kind::WasmPassthrough) + ns(Kind::ToRecordsPassthrough);
    let total_c = build + ns(Kind::WasmCounter) + ns(Kind::ToRecordsCounter);
    line("  total", total_p, total_c);
    println!(
        "{:<58} {:>12.1} {:>12.1}",
        "  = M events/s per core",
        rate(total_p),
        rate(total_c)
    );
    println!(
        "  spread over rounds: decode+build {}, to_records {} / {}",
        spread(Kind::DecodeBuild),
        spread(Kind::ToRecordsPassthrough),
        spread(Kind::ToRecordsCounter)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch_of(events: &[(&str, &str)]) -> Batch {
        let stored: Vec<(u64, Vec<u8>)> = events
            .iter()
            .enumerate()
            .map(|(i, (k, v))| {
                let record = Record {
                    timestamp_ms: 0,
                    key: Some(k.as_bytes().to_vec()),
                    value: Payload::Json((*v).to_string()),
                    headers: Vec::new(),
                    id: None,
                };
                (i as u64, record.encode())
            })
            .collect();
        match InputBatch::decode(0, &stored) {
            Ok(batch) => batch.batch,
            Err(e) => panic!("generated records decode: {e}"),
        }
    }

    #[test]
    fn native_passthrough_forwards_every_event() {
        let batch = batch_of(&[("a", "1"), ("bb", "\"x\""), ("", "2")]);
        let out = native_passthrough(&batch);
        assert_eq!(out.topics, [0, 0, 0]);
        assert!(out.keys.is_empty());
        assert_eq!(out.key_sources, [1, 2, 3]);
        assert!(out.values.is_empty());
        assert_eq!(out.value_ends, [0, 0, 0]);
        assert_eq!(out.value_sources, [1, 2, 3]);
    }

    #[test]
    fn native_counter_counts_per_key_in_decimal() {
        let mut counts = HashMap::new();
        let batch = batch_of(&[("a", "1"), ("b", "1"), ("a", "1")]);
        native_counter(&mut counts, &batch);
        let out = native_counter(&mut counts, &batch);
        assert_eq!(out.values, b"324");
        assert_eq!(out.value_ends, [1, 2, 3]);
        assert_eq!(counts.get(b"a".as_slice()), Some(&4));
        let mut big = Vec::new();
        push_decimal(&mut big, u64::MAX);
        assert_eq!(big, u64::MAX.to_string().as_bytes());
    }

    #[test]
    fn inputs_have_the_requested_shape() -> anyhow::Result<()> {
        let plan = Plan::new(HandlerArgs {
            components: None,
            batch: 50,
            value_bytes: 64,
            keys: 7,
            batches: 1,
            seconds: 1.0,
            rounds: 1,
            only: vec![],
        })?;
        let inputs = inputs(&plan)?;
        assert_eq!(inputs.batches.len(), DISTINCT_BATCHES);
        let batch = &inputs.batches[0];
        assert_eq!(batch.batch.key_ends.len(), 50);
        assert_eq!(batch.values().len(), 50 * 64);
        let keys: std::collections::HashSet<&[u8]> =
            inputs.batches.iter().flat_map(|b| keys(&b.batch)).collect();
        assert_eq!(keys.len(), 7);
        Ok(())
    }

    #[test]
    fn committed_state_applies_writes_and_deletes() {
        let state = Committed::default();
        state.apply(vec![
            (b"a".to_vec(), Some(3u64.to_le_bytes().to_vec())),
            (b"b".to_vec(), Some(4u64.to_le_bytes().to_vec())),
        ]);
        state.apply(vec![(b"b".to_vec(), None)]);
        assert_eq!(state.total_count(), 3);
        assert_eq!(state.get(b"a"), Ok(Some(3u64.to_le_bytes().to_vec())));
    }
}
