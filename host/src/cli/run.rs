//! `procd run handler.wasm --input events.ndjson`: runs a handler over a file with no server and
//! in-memory state, printing its outputs as NDJSON (one line per output record).
//!
//! It owns one promise: the same outputs as the deployed handler for the same input. So it does what
//! the server does, with the server's own pieces and default settings: events are parsed by
//! [`ingest::parse`](crate::ingest::parse), routed by [`partitioner::route`] over `--partitions`
//! (default: the server's default), deduplicated by id like the cell writer, and given per-partition
//! offsets from 0 in file order; each partition gets its own instance and state, and batches of up to
//! `handler.batch_max_events` events built with [`build_batch`]; outputs go through [`encode_outputs`].
//! Failures are handled like the cell processor: an event the handler reports failed is printed as an
//! error (the server would dead-letter it), the events before it are run again to get their effects, and
//! the next batch starts after it; a trap makes every event of the batch run alone.
//!
//! What cannot match: events with neither key nor id are spread round-robin, from a cursor that differs
//! between processes, so their partitions (and so their offsets and per-partition state) can differ from
//! a server's. Give events a key or an id when comparing.
//!
//! The file is read twice: once to validate every line (so a bad line fails the run before any output,
//! naming the line), once to process it. Memory stays bounded: at most one batch per partition waits.

use std::collections::HashMap;
use std::io::{BufRead as _, BufReader, BufWriter, Read as _, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context as _, bail};
use base64::Engine as _;
use clap::Args;

use super::parse_config;
use crate::catalog::HandlerVersion;
use crate::cell::{DedupIndex, InputBatch, encode_outputs};
use crate::config::Config;
use crate::ingest::{parse, partitioner};
use crate::log::{Payload, Record};
use crate::runtime::{
    CallError, Compiled, HandleOutcome, Instance, Limits, LogLabel, OutputBatch, Runtime,
    StateChanges, StateStore, StateWrite,
};

/// Bytes of input per batch at most: the cell processor's bound (`MAX_BATCH_BYTES` there), counted the
/// same way (encoded record sizes, the batch closes on the event that reaches it).
const MAX_BATCH_BYTES: usize = 4 * 1024 * 1024;
/// Encoded output records with the output each goes to, as `encode_outputs` makes them.
type Records = Vec<(Arc<str>, Vec<u8>)>;
/// The most partitions a server can have (the range of its `partitions` key).
const MAX_PARTITIONS: u32 = 4096;

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The handler component (a `.wasm` built for wasm32-wasip2).
    component: PathBuf,
    /// NDJSON events, one JSON object per line, as `procd produce` takes them:
    /// {"key": ..., "value": ..., "headers": {...}, "id": ...}.
    #[arg(long, value_name = "FILE")]
    input: PathBuf,
    /// Configuration passed to the handler's `init`, as KEY=VALUE. Repeatable.
    #[arg(long = "config", value_name = "KEY=VALUE")]
    config: Vec<String>,
    /// Output names, in the order the handler refers to them by index (as `procd deploy --output`).
    /// Repeatable. Without any, every index is accepted and printed as its number.
    #[arg(long = "output", value_name = "NAME")]
    outputs: Vec<String>,
    /// Partitions to route events over; use the server's `partitions` to get its partitions and offsets.
    #[arg(long, default_value_t = Config::default().partitions)]
    partitions: u32,
}

/// Run settings, validated; limits and batching are the server's defaults.
struct Settings {
    component: PathBuf,
    input: PathBuf,
    config: Vec<(String, String)>,
    /// Declared outputs, or `None` to accept every index.
    outputs: Option<Vec<String>>,
    partitions: u32,
    limits: Limits,
    batch_max_events: usize,
    max_line_bytes: usize,
    dedup_window_ms: u64,
    dedup_max_ids: usize,
}

impl Settings {
    fn from_args(args: RunArgs) -> anyhow::Result<Self> {
        if !(1..=MAX_PARTITIONS).contains(&args.partitions) {
            bail!(
                "--partitions must be in 1..={MAX_PARTITIONS}; got {}",
                args.partitions
            );
        }
        let config = args
            .config
            .iter()
            .map(|kv| parse_config(kv))
            .collect::<anyhow::Result<_>>()?;
        let server = Config::default();
        Ok(Self {
            component: args.component,
            input: args.input,
            config,
            outputs: (!args.outputs.is_empty()).then_some(args.outputs),
            partitions: args.partitions,
            limits: server.handler_limits(),
            batch_max_events: server.handler.batch_max_events,
            // No event can be larger than the request body that carries it.
            max_line_bytes: server.ingest.max_body_bytes,
            dedup_window_ms: server.dedup.window_ms,
            dedup_max_ids: server.dedup.max_ids,
        })
    }
}

pub(super) async fn run(args: RunArgs) -> anyhow::Result<()> {
    let settings = Settings::from_args(args)?;
    // Compiling and running wasm blocks: keep it off the async threads.
    let result = tokio::task::spawn_blocking(move || execute(&settings))
        .await
        .context("run task failed")?;
    match result {
        // The reader of the output went away (`procd run ... | head`): nothing more to do.
        Err(e) if is_broken_pipe(&e) => Ok(()),
        other => other,
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

fn execute(settings: &Settings) -> anyhow::Result<()> {
    let component = std::fs::read(&settings.component)
        .with_context(|| format!("cannot read {}", settings.component.display()))?;
    let mut events = 0u64;
    for_each_line(settings, |line_no, line| {
        parse_line(settings, line_no, line).map(|_| events += 1)
    })?;

    let cache = CacheDir::create()?;
    let runtime = Runtime::new(cache.path(), Config::default().handler.max_wasm_stack_bytes)?;
    let compiled = runtime
        .compile(&component)
        .with_context(|| settings.component.display().to_string())?;
    let name: Arc<str> = Arc::from(
        settings
            .component
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "handler".into()),
    );
    // Like a deploy: refuse a configuration `init` refuses, before any output.
    runtime
        .instantiate(
            &compiled,
            &settings.limits,
            Box::new(MemoryState::default()),
            &settings.config,
            LogLabel {
                handler: name.clone(),
                version: 0,
                partition: 0,
            },
        )
        .with_context(|| settings.component.display().to_string())?;

    let stdout = std::io::stdout();
    let mut runner = Runner {
        ctx: Ctx {
            runtime: &runtime,
            compiled: &compiled,
            settings,
            name,
            out: BufWriter::new(stdout.lock()),
            failed: 0,
        },
        partitions: (0..settings.partitions)
            .map(|index| Partition::new(index, settings))
            .collect(),
    };
    for_each_line(settings, |line_no, line| {
        let event = parse_line(settings, line_no, line)?;
        runner.push(line_no, event)
    })?;
    runner.finish()?;
    let failed = runner.ctx.failed;
    if failed > 0 {
        bail!(
            "{failed} of {events} events failed (see the errors above); a deployed handler would \
             dead-letter them"
        );
    }
    Ok(())
}

/// Calls `f` with each non-blank line of the input and its 1-based number.
fn for_each_line(
    settings: &Settings,
    mut f: impl FnMut(usize, &str) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let path = &settings.input;
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut reader = BufReader::new(file);
    let max = settings.max_line_bytes;
    let mut buf = Vec::new();
    let mut line_no = 0usize;
    loop {
        buf.clear();
        line_no += 1;
        let n = (&mut reader)
            .take(max as u64 + 1)
            .read_until(b'\n', &mut buf)
            .with_context(|| format!("cannot read {} line {line_no}", path.display()))?;
        if n == 0 {
            return Ok(());
        }
        if buf.len() > max && buf.last() != Some(&b'\n') {
            bail!(
                "{} line {line_no} is longer than {max} bytes, the largest event a server accepts \
                 (ingest.max_body_bytes)",
                path.display()
            );
        }
        let line = buf.strip_suffix(b"\n").unwrap_or(&buf);
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let line = std::str::from_utf8(line)
            .with_context(|| format!("{} line {line_no} is not UTF-8", path.display()))?;
        if !line.trim().is_empty() {
            f(line_no, line)?;
        }
    }
}

/// Parses one line exactly as ingest parses an NDJSON body.
fn parse_line<'a>(
    settings: &Settings,
    line_no: usize,
    line: &'a str,
) -> anyhow::Result<parse::Event<'a>> {
    let file = settings.input.display();
    match parse::ndjson(line.as_bytes()) {
        Ok(events) => events
            .into_iter()
            .next()
            .with_context(|| format!("{file} line {line_no}: no event")),
        Err(e) => {
            // The parser numbers lines within the body it was given: here, this one line.
            let detail = e.strip_prefix("line 1: ").unwrap_or(&e);
            bail!("{file} line {line_no}: {detail}")
        }
    }
}

/// A private, empty directory for the compiled-component cache, removed when the run ends. Private so
/// nobody else can plant compiled code in it (the cache loads it as trusted machine code).
struct CacheDir(PathBuf);

impl CacheDir {
    fn create() -> anyhow::Result<Self> {
        let base = std::env::temp_dir();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let mut last = None;
        for attempt in 0..16u32 {
            let dir = base.join(format!(
                "procd-run-{}-{}",
                std::process::id(),
                nanos.wrapping_add(attempt)
            ));
            // `create_dir` (not `_all`) fails if the directory exists, so it is ours alone.
            match std::fs::create_dir(&dir) {
                Ok(()) => return Ok(Self(dir)),
                Err(e) => last = Some(e),
            }
        }
        let cause = last.map_or_else(|| "unknown error".to_string(), |e| e.to_string());
        bail!(
            "cannot create a temporary directory in {}: {cause} (set TMPDIR to a writable directory)",
            base.display()
        )
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for CacheDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Committed state of one partition, in memory.
#[derive(Default, Clone)]
struct MemoryState(Arc<Mutex<HashMap<Vec<u8>, Vec<u8>>>>);

impl StateStore for MemoryState {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, String> {
        let map = self
            .0
            .lock()
            .map_err(|_| "in-memory state lock poisoned".to_string())?;
        Ok(map.get(key).cloned())
    }
}

impl MemoryState {
    /// Commits a batch's writes.
    fn apply(&self, writes: Vec<StateWrite>) -> anyhow::Result<()> {
        let mut map = self
            .0
            .lock()
            .map_err(|_| anyhow::anyhow!("in-memory state lock poisoned"))?;
        for (key, value) in writes {
            match value {
                Some(value) => map.insert(key, value),
                None => map.remove(&key),
            };
        }
        Ok(())
    }
}

/// One partition: its next offset, the events waiting for a batch, its state and its instance.
struct Partition {
    index: u32,
    next_offset: u64,
    last_timestamp_ms: u64,
    /// Waiting events as the processor reads them: (offset, encoded record).
    pending: Vec<(u64, Vec<u8>)>,
    /// For each waiting event: its input line and its encoded size.
    meta: Vec<(usize, usize)>,
    pending_bytes: usize,
    state: MemoryState,
    /// Key and value bytes in `state`, for the `max_state_bytes` limit.
    state_bytes: u64,
    instance: Option<Instance>,
    dedup: DedupIndex,
}

impl Partition {
    fn new(index: u32, settings: &Settings) -> Self {
        Self {
            index,
            next_offset: 0,
            last_timestamp_ms: 0,
            pending: Vec::new(),
            meta: Vec::new(),
            pending_bytes: 0,
            state: MemoryState::default(),
            state_bytes: 0,
            instance: None,
            dedup: DedupIndex::new(settings.dedup_window_ms, settings.dedup_max_ids),
        }
    }

    /// Events in the next batch: up to `max_events`, closing on the event that reaches `MAX_BATCH_BYTES`
    /// (like the log read that feeds the processor).
    fn batch_len(&self, max_events: usize) -> usize {
        let mut bytes = 0usize;
        for (i, (_, size)) in self.meta.iter().enumerate() {
            bytes += size;
            if i + 1 >= max_events || bytes >= MAX_BATCH_BYTES {
                return i + 1;
            }
        }
        self.meta.len()
    }

    fn has_full_batch(&self, max_events: usize) -> bool {
        self.pending.len() >= max_events || self.pending_bytes >= MAX_BATCH_BYTES
    }

    fn consume(&mut self, n: usize) {
        self.pending.drain(..n);
        for (_, size) in self.meta.drain(..n) {
            self.pending_bytes -= size;
        }
    }

    fn take_writes(&mut self) -> StateChanges {
        self.instance
            .as_mut()
            .map(Instance::take_writes)
            .unwrap_or_default()
    }

    /// Commits a batch's state changes.
    fn commit_state(&mut self, changes: StateChanges) -> anyhow::Result<()> {
        self.state_bytes = self.state_bytes.saturating_add_signed(changes.bytes_delta);
        self.state.apply(changes.writes)
    }

    fn discard_writes(&mut self) {
        if let Some(i) = self.instance.as_mut() {
            i.discard_writes();
        }
    }
}

struct Runner<'a, W: Write> {
    ctx: Ctx<'a, W>,
    partitions: Vec<Partition>,
}

impl<W: Write> Runner<'_, W> {
    /// Routes, deduplicates and stamps one event like ingest and the cell writer, then runs every full
    /// batch of its partition.
    fn push(&mut self, line_no: usize, event: parse::Event) -> anyhow::Result<()> {
        let settings = self.ctx.settings;
        let p = partitioner::route(
            event.key.as_deref().map(str::as_bytes),
            event.id.as_deref(),
            settings.partitions,
        );
        let Some(part) = self.partitions.get_mut(p as usize) else {
            bail!(
                "partitioner placed an event in partition {p} of {}",
                settings.partitions
            );
        };
        let now = now_ms().max(part.last_timestamp_ms);
        part.last_timestamp_ms = now;
        if let Some(id) = &event.id {
            part.dedup.evict(now);
            if let Some(offset) = part.dedup.lookup(id) {
                self.ctx.stderr_line(&format!(
                    "warning: {} line {line_no}: event id {id:?} is a duplicate of partition {p} offset \
                     {offset}; skipped, as the server would",
                    settings.input.display()
                ))?;
                return Ok(());
            }
            part.dedup.insert(id, part.next_offset, now);
        }
        let encoded = event.record(now).encode();
        let size = encoded.len();
        part.pending.push((part.next_offset, encoded));
        part.meta.push((line_no, size));
        part.pending_bytes += size;
        part.next_offset += 1;
        while part.has_full_batch(settings.batch_max_events) {
            self.ctx.step(part)?;
        }
        Ok(())
    }

    /// Runs what is left, partition by partition, and flushes the output.
    fn finish(&mut self) -> anyhow::Result<()> {
        for part in &mut self.partitions {
            while !part.pending.is_empty() {
                self.ctx.step(part)?;
            }
        }
        self.ctx.out.flush().context("cannot write the output")
    }
}

/// What every partition shares: the runtime, the component, the settings and the output.
struct Ctx<'a, W: Write> {
    runtime: &'a Runtime,
    compiled: &'a Compiled,
    settings: &'a Settings,
    name: Arc<str>,
    out: W,
    /// Events that failed (the server would have dead-lettered them).
    failed: u64,
}

impl<W: Write> Ctx<'_, W> {
    /// Runs the next batch of `part` and drops the events it settled.
    fn step(&mut self, part: &mut Partition) -> anyhow::Result<()> {
        let n = part.batch_len(self.settings.batch_max_events);
        let done = self.process(part, n)?;
        part.consume(done);
        Ok(())
    }

    /// Runs the handler over the first `n` waiting events like the cell processor; returns how many of
    /// them are settled (all, or up to and including the one the handler reported failed).
    fn process(&mut self, part: &mut Partition, n: usize) -> anyhow::Result<usize> {
        let batch = InputBatch::decode(part.index, &part.pending[..n])?;
        match self.call(part, &batch) {
            Ok(HandleOutcome::Outputs(outputs)) => {
                let writes = part.take_writes();
                match self.records(&outputs, &batch) {
                    Ok(records) => {
                        part.commit_state(writes)?;
                        self.emit(part.index, records)?;
                        Ok(n)
                    }
                    // The handler named an output it did not declare: a fault of the whole batch.
                    Err(message) => {
                        self.batch_failed(part, n, &message)?;
                        self.one_by_one(part, n)
                    }
                }
            }
            Ok(HandleOutcome::EventFailed { index, message }) => {
                part.discard_writes();
                let index = index as usize;
                if index >= n {
                    let message =
                        format!("handler reported event index {index} of a {n}-event batch");
                    self.batch_failed(part, n, &message)?;
                    return self.one_by_one(part, n);
                }
                // Run the events before the failing one again: a deterministic handler gives their
                // effects.
                let (records, writes) = if index == 0 {
                    (vec![], StateChanges::default())
                } else {
                    let prefix = InputBatch::decode(part.index, &part.pending[..index])?;
                    let outcome = self.call(part, &prefix);
                    let rerun = match outcome {
                        Ok(HandleOutcome::Outputs(out)) => self.records(&out, &prefix),
                        _ => Err(
                            "running the events before the failed one again gave another result \
                             (is the handler deterministic?)"
                                .to_string(),
                        ),
                    };
                    match rerun {
                        Ok(records) => (records, part.take_writes()),
                        Err(message) => {
                            part.discard_writes();
                            self.batch_failed(part, n, &message)?;
                            return self.one_by_one(part, n);
                        }
                    }
                };
                part.commit_state(writes)?;
                self.emit(part.index, records)?;
                self.event_failed(part, index, &message)?;
                Ok(index + 1)
            }
            Err(trap) => {
                part.discard_writes();
                self.batch_failed(part, n, &trap.to_string())?;
                self.one_by_one(part, n)
            }
        }
    }

    /// Runs each of the first `n` waiting events alone; an event that fails alone is reported.
    fn one_by_one(&mut self, part: &mut Partition, n: usize) -> anyhow::Result<usize> {
        for i in 0..n {
            let single = InputBatch::decode(part.index, &part.pending[i..=i])?;
            let failure = match self.call(part, &single) {
                Ok(HandleOutcome::Outputs(outputs)) => match self.records(&outputs, &single) {
                    Ok(records) => {
                        let writes = part.take_writes();
                        part.commit_state(writes)?;
                        self.emit(part.index, records)?;
                        continue;
                    }
                    Err(message) => message,
                },
                Ok(HandleOutcome::EventFailed { message, .. }) => message,
                Err(trap) => trap.to_string(),
            };
            part.discard_writes();
            self.event_failed(part, i, &failure)?;
        }
        Ok(n)
    }

    /// Calls the partition's instance, (re)building it first if there is none or a trap poisoned it.
    fn call(
        &mut self,
        part: &mut Partition,
        batch: &InputBatch,
    ) -> Result<HandleOutcome, CallError> {
        if part.instance.as_ref().is_none_or(Instance::is_poisoned) {
            part.instance = None;
            let label = LogLabel {
                handler: self.name.clone(),
                version: 0,
                partition: part.index,
            };
            let instance = self
                .runtime
                .instantiate(
                    self.compiled,
                    &self.settings.limits,
                    Box::new(part.state.clone()),
                    &self.settings.config,
                    label,
                )
                .map_err(|e| CallError::Trap(e.to_string()))?;
            part.instance = Some(instance);
        }
        match part.instance.as_mut() {
            Some(instance) => {
                instance.set_state_bytes(part.state_bytes);
                instance.handle(&batch.batch, batch.values())
            }
            None => Err(CallError::Trap("no instance".into())),
        }
    }

    /// The handler's outputs as encoded records, named by `--output` or by index.
    fn records(&self, outputs: &OutputBatch, input: &InputBatch) -> Result<Records, String> {
        let names = match &self.settings.outputs {
            Some(names) => names.clone(),
            None => {
                let count = outputs
                    .topics
                    .iter()
                    .max()
                    .map_or(0, |m| usize::from(*m) + 1);
                (0..count).map(|i| i.to_string()).collect()
            }
        };
        let version = HandlerVersion {
            version: 0,
            outputs: names,
            config: vec![],
            size_bytes: 0,
            sha256: String::new(),
            created_ms: 0,
            limits: Default::default(),
        };
        let names: Vec<Arc<str>> = version
            .outputs
            .iter()
            .map(|n| Arc::from(n.as_str()))
            .collect();
        let mut records = Records::new();
        encode_outputs(outputs, input, &version, |topic, record| {
            if let Some(name) = names.get(topic) {
                records.push((name.clone(), record.encode()));
            }
        })?;
        Ok(records)
    }

    fn emit(&mut self, partition: u32, records: Records) -> anyhow::Result<()> {
        for (output, bytes) in records {
            let record = Record::decode(&bytes).context("an output record does not decode")?;
            self.out
                .write_all(&output_line(&output, partition, &record))
                .context("cannot write the output")?;
        }
        Ok(())
    }

    /// Reports event `i` of the waiting events as failed.
    fn event_failed(&mut self, part: &Partition, i: usize, message: &str) -> anyhow::Result<()> {
        self.failed += 1;
        let line = part.meta.get(i).map_or(0, |(line, _)| *line);
        let offset = part.pending.get(i).map_or(0, |(offset, _)| *offset);
        self.stderr_line(&format!(
            "error: event at line {line} (partition {}, offset {offset}): {}",
            part.index,
            one_line(message)
        ))
    }

    /// Reports that a batch failed as a whole and is retried one event at a time.
    fn batch_failed(&mut self, part: &Partition, n: usize, message: &str) -> anyhow::Result<()> {
        let first = |v: Option<&(usize, usize)>| v.map_or(0, |(line, _)| *line);
        let offsets = part
            .pending
            .first()
            .map(|e| e.0)
            .zip(part.pending.get(n - 1).map(|e| e.0));
        let (from, to) = offsets.unwrap_or((0, 0));
        self.stderr_line(&format!(
            "warning: batch of {n} events (partition {}, offsets {from}-{to}, lines {}-{}) failed: {}; \
             running its events one by one",
            part.index,
            first(part.meta.first()),
            first(part.meta.get(n - 1)),
            one_line(message)
        ))
    }

    /// Writes one line to stderr after the outputs so far, so the two streams interleave in order.
    fn stderr_line(&mut self, line: &str) -> anyhow::Result<()> {
        self.out.flush().context("cannot write the output")?;
        eprintln!("{line}");
        Ok(())
    }
}

/// Joins a multi-line message into one line. A trap's wasm backtrace is dropped (its frames say little
/// on a terminal) but not the error chain wasmtime appends to its last frame (`<frame>: wasm trap: ...`).
fn one_line(message: &str) -> String {
    let is_frame = |line: &str| {
        line.split_once(':').is_some_and(|(n, rest)| {
            !n.is_empty()
                && n.bytes().all(|b| b.is_ascii_digit())
                && rest.trim_start().starts_with("0x")
        })
    };
    let mut parts = Vec::new();
    for line in message.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if is_frame(line) {
            if let Some((_, cause)) = line
                .split_once(" - ")
                .and_then(|(_, frame)| frame.split_once(": "))
            {
                parts.push(cause.to_string());
            }
        } else {
            parts.push(line.replace(" at wasm backtrace:", ":"));
        }
    }
    parts.join(" ")
}

/// One output record as an NDJSON line: `output`, `partition`, `key` (or `key_base64` when not
/// UTF-8), and `value` when the bytes are JSON (as the read API returns them) or `value_base64`.
fn output_line(output: &str, partition: u32, record: &Record) -> Vec<u8> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let string = |s: &str| serde_json::Value::from(s).to_string();
    let mut line = format!("{{\"output\":{},\"partition\":{partition},", string(output));
    match record.key.as_deref().map(std::str::from_utf8) {
        None => line.push_str("\"key\":null,"),
        Some(Ok(key)) => line.push_str(&format!("\"key\":{},", string(key))),
        Some(Err(_)) => {
            let key = record.key.as_deref().unwrap_or_default();
            line.push_str(&format!(
                "\"key\":null,\"key_base64\":\"{}\",",
                b64.encode(key)
            ));
        }
    }
    match &record.value {
        // Embedded as the handler wrote it (so `2.50` stays `2.50`), unless a line break inside it
        // would split the NDJSON line: then re-serialized compactly.
        Payload::Json(text) if !text.contains(['\n', '\r']) => {
            line.push_str("\"value\":");
            line.push_str(text.trim());
        }
        Payload::Json(text) => {
            let value: serde_json::Value = serde_json::from_str(text).unwrap_or_default();
            line.push_str(&format!("\"value\":{value}"));
        }
        Payload::Bytes(bytes) => {
            line.push_str(&format!("\"value_base64\":\"{}\"", b64.encode(bytes)));
        }
    }
    line.push_str("}\n");
    line.into_bytes()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(key: Option<&[u8]>, value: Payload) -> Record {
        Record {
            timestamp_ms: 1,
            key: key.map(<[u8]>::to_vec),
            value,
            headers: vec![],
            id: None,
        }
    }

    fn parsed(line: &[u8]) -> serde_json::Value {
        serde_json::from_slice(line).unwrap_or_default()
    }

    #[test]
    fn output_lines_are_one_json_object_each() {
        let line = output_line(
            "counts",
            3,
            &record(Some(b"k\"1"), Payload::Json("2.50".into())),
        );
        assert_eq!(
            String::from_utf8_lossy(&line),
            "{\"output\":\"counts\",\"partition\":3,\"key\":\"k\\\"1\",\"value\":2.50}\n"
        );
        let line = output_line(
            "0",
            0,
            &record(Some(&[0xff]), Payload::Bytes(vec![1, 2, 3])),
        );
        let v = parsed(&line);
        assert_eq!(v["key_base64"], "/w==");
        assert_eq!(v["value_base64"], "AQID");
        assert!(v["key"].is_null());
        let line = output_line(
            "o",
            1,
            &record(None, Payload::Json("{\n \"a\": [1,\n2]\n}".into())),
        );
        assert_eq!(line.iter().filter(|b| **b == b'\n').count(), 1);
        assert_eq!(parsed(&line)["value"]["a"][1], 2);
    }

    #[test]
    fn batches_close_on_count_or_bytes() {
        let settings = Settings::from_args(RunArgs {
            component: "h.wasm".into(),
            input: "in.ndjson".into(),
            config: vec![],
            outputs: vec![],
            partitions: 8,
        });
        let Ok(settings) = settings else {
            panic!("default settings are valid");
        };
        let mut part = Partition::new(0, &settings);
        for i in 0..5u64 {
            part.pending
                .push((i, record(None, Payload::Json("1".into())).encode()));
            part.meta.push((i as usize + 1, 10));
            part.pending_bytes += 10;
        }
        assert_eq!(part.batch_len(1000), 5);
        assert_eq!(part.batch_len(2), 2);
        assert!(!part.has_full_batch(1000));
        part.meta[1].1 = MAX_BATCH_BYTES;
        part.pending_bytes += MAX_BATCH_BYTES - 10;
        assert!(part.has_full_batch(1000));
        assert_eq!(part.batch_len(1000), 2);
        part.consume(2);
        assert_eq!((part.pending.len(), part.pending[0].0), (3, 2));
        assert_eq!(part.pending_bytes, 30);
    }

    #[test]
    fn multi_line_messages_become_one_line() {
        assert_eq!(one_line("a\n\n  b  \n"), "a b");
        let trap = "trap: error while executing at wasm backtrace:\n    0:   0xbf41 - h.wasm!abort\n   \
                    11:   0x4339 - h.wasm!handle: wasm trap: wasm `unreachable` instruction executed";
        assert_eq!(
            one_line(trap),
            "trap: error while executing: wasm trap: wasm `unreachable` instruction executed"
        );
    }

    #[test]
    fn partitions_are_range_checked() {
        let args = |partitions| RunArgs {
            component: "h.wasm".into(),
            input: "in.ndjson".into(),
            config: vec![],
            outputs: vec![],
            partitions,
        };
        assert!(Settings::from_args(args(0)).is_err());
        assert!(Settings::from_args(args(MAX_PARTITIONS + 1)).is_err());
        assert!(Settings::from_args(args(1)).is_ok());
    }
}
