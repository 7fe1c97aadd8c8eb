//! The cell processor: runs every handler on every partition the cell owns, one batch at a time.
//!
//! Each (handler, partition) task has its own thread, started and stopped by the cell's
//! [`supervisor`] thread, so a task that is slow, loops until its deadline or is halving a poisoned
//! batch never holds up another partition or handler; no code path here waits across partitions.
//!
//! A task reads a batch from its committed offset (only durable input), calls the handler's instance
//! under its limits, and sends the cell writer ONE commit holding the output records (appended to the
//! output topics' same partition, which this cell owns), the state writes and the new committed offset.
//! The writer commits it atomically, so a crash leaves either all of a batch's effects or none:
//! processing is exactly-once within the cell. The task's next step waits for that commit, so state
//! reads always see committed state; the commits of the cell's tasks share the writer's fsyncs.
//!
//! Version swaps happen between batches: each batch runs entirely on one version (recorded with its
//! offset), state carries over because it lives host-side. Failures:
//! - the handler reports event `i` failed: the events before it are run again (handlers are deterministic)
//!   and committed together with a dead letter for event `i` and the offset after it;
//! - a trap, deadline or output limit (which does not say which event was at fault): the batch is
//!   halved until the failing event is alone, which is dead-lettered (see [`Runner::bisect`]);
//! - too many failures trip the task's circuit breaker (`super::breaker`).
//!
//! Processing never blocks ingest: it runs on its own threads and only talks to the writer through the
//! same bounded queue as ingest.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::oneshot;

use super::batch::{EncodedOutputs, InputBatch, to_records};
use super::breaker::{Admit, Breaker, BreakerOptions};
use super::{
    CellError, Command, MAX_REPLAY, PartitionView, ProcessCommit, ReplayFailure, ReplayOutcome,
    ReplayRequest, Shared, now_ms, panic_message,
};
use crate::catalog::{Catalog, HandlerDef, HandlerVersion, ResetTo, StartPosition};
use crate::log::{Committed, ConsumerLog, DlqEntry, StoreError};
use crate::metrics::{ErrorKind, Tally, TaskMetrics};
use crate::runtime::{
    CallError, Compiled, HandleOutcome, Instance, Limits, LogLabel, Runtime, StateChanges,
    StateStore,
};

mod supervisor;

pub(super) use supervisor::Supervisor;

/// Stored input events: offset and encoded record, as read from the log.
type Stored = (u64, fjall::Slice);

/// How long a task waits before retrying after a failure it cannot fix itself (bad init, missing topic).
const RETRY_AFTER: Duration = Duration::from_secs(2);
/// How long the processor sleeps when no partition has work (the writer wakes it on new input).
const IDLE_PARK: Duration = Duration::from_millis(50);
/// After a call that ran out its deadline, the task waits this many deadlines before its next call, so
/// a looping handler uses at most 1/(1 + this) of a core while its poison event is being isolated.
const DEADLINE_PENALTY: u32 = 4;
/// Bytes of input read per batch at most.
pub(crate) const MAX_BATCH_BYTES: usize = 4 * 1024 * 1024;

/// Settings of the processor.
#[derive(Debug, Clone)]
pub struct ProcessorOptions {
    /// Limits of every instance.
    pub limits: Limits,
    /// Events per batch at most.
    pub batch_max_events: usize,
    /// When a handler's breaker trips on a partition.
    pub breaker: BreakerOptions,
    /// Dead letters kept per handler and partition; beyond it the oldest are deleted.
    pub dlq_max_entries: u64,
    /// Lag watermarks (high, low) in events: a partition whose handlers lag past `high` refuses writes
    /// until they are back under `low`. `None`: off.
    pub lag_watermarks: Option<(u64, u64)>,
}

impl Default for ProcessorOptions {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            batch_max_events: 1000,
            breaker: BreakerOptions::default(),
            dlq_max_entries: 10_000,
            lag_watermarks: None,
        }
    }
}

/// What one handler is doing on one partition, for status and metrics.
#[derive(Debug, Clone, Serialize)]
pub struct TaskStatus {
    /// Partition.
    pub partition: u32,
    /// Version running; before the task's first step, the version of its last commit (0: none yet).
    pub version: u32,
    /// Next input offset to process.
    pub committed_offset: u64,
    /// One past the last durable input offset.
    pub end_offset: u64,
    /// `running`, `idle`, `paused`, `tripped` (circuit breaker open), `waiting` or `failed`.
    pub status: &'static str,
    /// Why it is waiting or failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Events processed since the server started.
    pub events_processed: u64,
    /// Dead letters written since the server started.
    pub dead_letters: u64,
    /// When the task last made progress or had nothing to do (ms since the Unix epoch). The watchdog
    /// flags a task with events waiting whose progress is older than `cell.processing_stall_ms`.
    pub last_progress_ms: u64,
    /// The task's histograms and error counts (shared with the scrape, written only by the task).
    #[serde(skip)]
    pub metrics: Arc<TaskMetrics>,
}

/// The committed state of one handler on one partition, read by its instance.
struct ConsumerState(ConsumerLog);

impl StateStore for ConsumerState {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, String> {
        self.0.state_get(key).map_err(|e| e.to_string())
    }

    fn value_len(&self, key: &[u8]) -> Result<Option<u64>, String> {
        self.0.state_value_len(key).map_err(|e| e.to_string())
    }
}

struct Task {
    handler: Arc<str>,
    /// Identity of the handler definition this task belongs to (a re-created handler is another).
    incarnation: u64,
    partition: u32,
    consumer: ConsumerLog,
    committed: Option<Committed>,
    instance: Option<(u32, Instance)>,
    dlq_next: Option<u64>,
    retry_at: Option<Instant>,
    status: TaskStatus,
    /// A batch commit sent to the writer and not yet answered. The task's next step waits for it, so
    /// the next batch reads the state it wrote; other tasks of the cell run meanwhile, and their
    /// commits share the writer's fsync.
    in_flight: Option<InFlight>,
    /// Key and value bytes of the committed state (the `max_state_bytes` base), counted once by reading
    /// the state, then kept up to date by each commit; unknown again after a failed commit.
    state_bytes: Option<u64>,
    breaker: Breaker,
    /// Set after a call ran out its deadline: the next call waits until then.
    cool_until: Option<Instant>,
    /// Log-append times (ms) of the input events the commit being sent (or in flight) settles;
    /// turned into event-to-commit latencies once it is durable. Reused from batch to batch.
    covered_ms: Vec<u64>,
    /// Scratch tally for those latencies.
    latency: Tally,
}

/// A commit the writer has not answered yet, with what the task records once it is durable.
struct InFlight {
    reply: oneshot::Receiver<Result<(), CellError>>,
    sent: Sent,
}

/// What a commit changes in the task once it is durable.
#[derive(Clone, Copy)]
struct Sent {
    committed: Committed,
    dead_letters: u64,
    /// How the commit changes the partition's state bytes.
    state_delta: i64,
    clear_state: bool,
}

/// What every thread of a cell's processor shares.
#[derive(Clone)]
pub(super) struct ProcessorContext {
    pub shared: Arc<Shared>,
    pub tx: flume::Sender<Command>,
    pub catalog: Arc<Catalog>,
    pub runtime: Arc<Runtime>,
    pub options: ProcessorOptions,
    /// Set when the cell shuts down.
    pub stop: Arc<AtomicBool>,
}

/// One task's thread: runs its handler on its partition, batch after batch.
struct Runner {
    ctx: ProcessorContext,
    compiled: HashMap<(Arc<str>, u32), Compiled>,
    quit: Arc<AtomicBool>,
    replays: Arc<Mutex<Vec<ReplayRequest>>>,
    /// The batch being handled; its buffers are reused from batch to batch.
    scratch: InputBatch,
}

/// A task step failed in a way the task reports and retries later.
#[derive(Debug, thiserror::Error)]
enum StepError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Cell(#[from] CellError),
    #[error("{0}")]
    Other(String),
}

impl Task {
    fn new(
        handler: Arc<str>,
        incarnation: u64,
        partition: u32,
        consumer: ConsumerLog,
        ctx: &ProcessorContext,
    ) -> Self {
        let metrics = Arc::new(TaskMetrics::default());
        Task {
            covered_ms: Vec::new(),
            latency: metrics.latency_seconds.tally(),
            handler,
            incarnation,
            partition,
            consumer,
            committed: None,
            instance: None,
            dlq_next: None,
            retry_at: None,
            in_flight: None,
            state_bytes: None,
            breaker: Breaker::new(ctx.options.breaker),
            cool_until: None,
            status: TaskStatus {
                partition,
                version: 0,
                committed_offset: 0,
                end_offset: 0,
                status: "idle",
                detail: None,
                events_processed: 0,
                dead_letters: 0,
                last_progress_ms: now_ms(),
                metrics,
            },
        }
    }
}

impl Runner {
    fn new(
        ctx: ProcessorContext,
        quit: Arc<AtomicBool>,
        replays: Arc<Mutex<Vec<ReplayRequest>>>,
        partition: u32,
    ) -> Self {
        Self {
            ctx,
            compiled: HashMap::new(),
            quit,
            replays,
            scratch: InputBatch::new(partition),
        }
    }

    /// The task's loop, until its handler is removed (or re-created) or the cell stops. Returns the
    /// task's storage for the supervisor to delete when the handler is gone.
    fn run(mut self, mut task: Task) -> Option<ConsumerLog> {
        let _span = tracing::info_span!(
            "procd.cell.task",
            cell = self.ctx.shared.index,
            handler = %task.handler,
            partition = task.partition
        )
        .entered();
        // Reported at once, from what is on disk: where the task stands until its first step.
        if let Ok(Some(committed)) = task.consumer.committed() {
            task.committed = Some(committed);
            task.status.committed_offset = committed.offset;
            task.status.version = committed.version;
        }
        self.publish(&task);
        loop {
            if self.quit.load(Ordering::Acquire) || self.ctx.stop.load(Ordering::Acquire) {
                break;
            }
            let def = match self.ctx.catalog.handler(&task.handler) {
                Some(def) if def.incarnation == task.incarnation => def,
                // Removed or re-created: the supervisor stops this thread.
                _ => {
                    std::thread::park_timeout(IDLE_PARK);
                    continue;
                }
            };
            self.run_replays(&mut task, &def);
            if self.ctx.shared.health.failure().is_some() {
                std::thread::park_timeout(IDLE_PARK);
                continue;
            }
            // A panic in a step (a bug) must not end the task: it is reported like any failure of the
            // task, which is retried later.
            let stepped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.step(&mut task, &def)
            }))
            .unwrap_or_else(|panic| {
                let what = panic_message(&*panic);
                Err(StepError::Other(format!("processor panicked: {what}")))
            });
            let worked = match stepped {
                Ok(did) => did,
                Err(e) => {
                    tracing::warn!(error = %e, "handler task failed; retrying");
                    task.status.status = "failed";
                    task.status.detail = Some(e.to_string());
                    task.retry_at = Some(Instant::now() + RETRY_AFTER);
                    task.instance = None;
                    false
                }
            };
            self.publish(&task);
            if !worked {
                std::thread::park_timeout(IDLE_PARK);
            }
        }
        // The last commit sent must be answered before the storage may go.
        if let Some(in_flight) = task.in_flight.take() {
            let _ = in_flight.reply.blocking_recv();
        }
        Some(task.consumer)
    }

    /// Makes sure the task has a healthy instance of `version`.
    fn ensure_instance(
        &mut self,
        task: &mut Task,
        version: &HandlerVersion,
    ) -> Result<(), StepError> {
        if task
            .instance
            .as_ref()
            .is_none_or(|(v, i)| *v != version.version || i.is_poisoned())
        {
            task.instance = None;
            let instance = self.instantiate(task, version)?;
            task.instance = Some((version.version, instance));
        }
        Ok(())
    }

    /// Answers the dead-letter replays waiting for this task.
    fn run_replays(&mut self, task: &mut Task, def: &HandlerDef) {
        let requests = match self.replays.lock() {
            Ok(mut replays) => std::mem::take(&mut *replays),
            Err(_) => return,
        };
        for request in requests {
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.replay(task, def, request.seq)
            }))
            .unwrap_or_else(|panic| {
                Err(StepError::Other(format!(
                    "processor panicked: {}",
                    panic_message(&*panic)
                )))
            })
            .map_err(|e| CellError::Unavailable {
                cell: self.ctx.shared.index,
                reason: e.to_string(),
            });
            self.publish(task);
            let _ = request.reply.send(outcome);
        }
    }

    /// Runs dead letters of `task` (one, or every one) through the handler's current version. Each
    /// that succeeds commits its outputs and state writes and leaves the dead-letter log, atomically;
    /// the committed offset does not move (these events are behind it).
    fn replay(
        &mut self,
        task: &mut Task,
        def: &HandlerDef,
        seq: Option<u64>,
    ) -> Result<ReplayOutcome, StepError> {
        // The task's last batch commit must be durable first: the replay reads the state it wrote.
        if let Some(in_flight) = task.in_flight.take() {
            let answer = in_flight.reply.blocking_recv().ok();
            self.settle(task, in_flight.sent, answer)?;
        }
        let version = def.active_version().ok_or_else(|| {
            StepError::Other(format!("active version v{} is missing", def.active))
        })?;
        self.ensure_instance(task, version)?;
        let committed = match task.committed.or(task.consumer.committed()?) {
            Some(c) => c,
            None => return Ok(ReplayOutcome::default()),
        };
        let entries = match seq {
            Some(seq) => task
                .consumer
                .dlq_get(seq)?
                .map(|e| vec![(seq, e)])
                .unwrap_or_default(),
            None => task.consumer.dlq_list(0, MAX_REPLAY)?,
        };
        let mut outcome = ReplayOutcome::default();
        for (seq, entry) in entries {
            let events = [(entry.offset, entry.record.as_slice())];
            let batch = InputBatch::decode(task.partition, &events)
                .map_err(|e| StepError::Other(e.to_string()))?;
            let failure = match self.call(task, version, &batch)? {
                Ok(HandleOutcome::Outputs(outputs)) => {
                    match to_records(&outputs, &batch, version) {
                        Ok(outputs) => {
                            let state = self.take_writes(task);
                            self.commit(
                                task,
                                PendingCommit {
                                    replayed: vec![seq],
                                    ..PendingCommit::batch(outputs, state, committed)
                                },
                            )?;
                            outcome.replayed += 1;
                            continue;
                        }
                        Err(message) => message,
                    }
                }
                Ok(HandleOutcome::EventFailed { message, .. }) => message,
                Err(e) => e.to_string(),
            };
            self.discard_writes(task);
            outcome.failed.push(ReplayFailure {
                seq,
                error: failure,
            });
        }
        Ok(outcome)
    }

    fn publish(&self, task: &Task) {
        task.status.metrics.set_breaker(task.breaker.state());
        if let Ok(mut statuses) = self.ctx.shared.statuses.lock() {
            statuses.insert(
                (task.handler.to_string(), task.partition),
                task.status.clone(),
            );
        }
    }

    fn compiled(&mut self, name: &Arc<str>, version: u32) -> Result<Compiled, StepError> {
        if let Some(c) = self.compiled.get(&(name.clone(), version)) {
            return Ok(c.clone());
        }
        let bytes = self
            .ctx
            .catalog
            .component(name, version)
            .map_err(|e| StepError::Other(e.to_string()))?
            .ok_or_else(|| {
                StepError::Other(format!("component of {name} v{version} is missing"))
            })?;
        let compiled = self
            .ctx
            .runtime
            .compile(&bytes)
            .map_err(|e| StepError::Other(e.to_string()))?;
        // A task runs one version at a time: keeping the ones it left would hold their code for every
        // deploy the handler ever had (a rollback loads from the compiled-code cache on disk).
        self.compiled.clear();
        self.compiled
            .insert((name.clone(), version), compiled.clone());
        Ok(compiled)
    }

    fn instantiate(
        &mut self,
        task: &Task,
        version: &HandlerVersion,
    ) -> Result<Instance, StepError> {
        let compiled = self.compiled(&task.handler, version.version)?;
        let label = LogLabel {
            handler: task.handler.clone(),
            version: version.version,
            partition: task.partition,
        };
        self.ctx
            .runtime
            .instantiate(
                &compiled,
                &version.limits.apply(&self.ctx.options.limits),
                Box::new(ConsumerState(task.consumer.clone())),
                &version.config,
                label,
            )
            .map_err(|e| StepError::Other(e.to_string()))
    }

    /// Sends a commit to the writer and waits until it is durable.
    fn commit(&self, task: &mut Task, commit: PendingCommit) -> Result<(), StepError> {
        let in_flight = self.send_commit(task, commit)?;
        let answer = in_flight.reply.blocking_recv().ok();
        self.settle(task, in_flight.sent, answer)
    }

    /// Sends a commit to the writer without waiting: the task's next step settles it.
    fn commit_later(&self, task: &mut Task, commit: PendingCommit) -> Result<(), StepError> {
        task.in_flight = Some(self.send_commit(task, commit)?);
        Ok(())
    }

    /// Settles the task's commit in flight, if any. Returns false while the writer has not answered.
    fn settle_in_flight(&self, task: &mut Task) -> Result<bool, StepError> {
        let Some(mut in_flight) = task.in_flight.take() else {
            return Ok(true);
        };
        let answer = match in_flight.reply.try_recv() {
            Err(oneshot::error::TryRecvError::Empty) => {
                task.in_flight = Some(in_flight);
                return Ok(false);
            }
            Err(oneshot::error::TryRecvError::Closed) => None,
            Ok(answer) => Some(answer),
        };
        self.settle(task, in_flight.sent, answer)?;
        Ok(true)
    }

    fn send_commit(&self, task: &Task, commit: PendingCommit) -> Result<InFlight, StepError> {
        let (reply, rx) = oneshot::channel();
        let committed = commit.committed;
        let dead_letters = commit.dead_letters.len() as u64;
        let (state_delta, clear_state) = (commit.state.bytes_delta, commit.clear_state);
        let command = Command::Process(Box::new(ProcessCommit {
            consumer: task.consumer.clone(),
            partition: task.partition,
            outputs: commit.outputs,
            state: commit.state.writes,
            committed,
            dead_letters: commit.dead_letters,
            replayed: commit.replayed,
            clear_state: commit.clear_state,
            reply,
        }));
        self.ctx
            .tx
            .send(command)
            .map_err(|_| CellError::ShuttingDown {
                cell: self.ctx.shared.index,
            })?;
        Ok(InFlight {
            reply: rx,
            sent: Sent {
                committed,
                dead_letters,
                state_delta,
                clear_state,
            },
        })
    }

    /// Records a commit's answer: on success, the task's offset, counters and DLQ sequence move on.
    fn settle(
        &self,
        task: &mut Task,
        sent: Sent,
        answer: Option<Result<(), CellError>>,
    ) -> Result<(), StepError> {
        let (committed, dead) = (sent.committed, sent.dead_letters);
        // No answer: the writer is gone, which only happens when the cell shuts down.
        let answer = answer.unwrap_or(Err(CellError::ShuttingDown {
            cell: self.ctx.shared.index,
        }));
        let now = now_ms();
        if answer.is_ok() {
            // Durable now: each covered event's latency ends here (ms resolution, as timestamps).
            for &ts in &task.covered_ms {
                task.latency.observe(now.saturating_sub(ts) as f64 / 1000.0);
            }
            task.status.metrics.latency_seconds.merge(&task.latency);
            task.latency.clear();
        }
        task.covered_ms.clear();
        if let Err(e) = answer {
            // Whether the state changed is unknown: count it again before the next call.
            task.state_bytes = None;
            return Err(e.into());
        }
        task.state_bytes = if sent.clear_state {
            Some(0)
        } else {
            task.state_bytes
                .map(|b| b.saturating_add_signed(sent.state_delta))
        };
        task.status.events_processed += committed
            .offset
            .saturating_sub(task.committed.map_or(committed.offset, |c| c.offset));
        task.status.dead_letters += dead;
        if let Some(next) = task.dlq_next.as_mut() {
            *next += dead;
        }
        task.committed = Some(committed);
        task.status.committed_offset = committed.offset;
        task.status.last_progress_ms = now;
        // Published at once: a long halving commits many times within one step.
        self.publish(task);
        Ok(())
    }

    /// The task's input and its durable end, unless the task is to wait this round: its input topic
    /// is gone, it is paused, it is backing off after a failure, or its circuit breaker is open (each
    /// shown in its status).
    fn ready(&self, task: &mut Task, def: &HandlerDef) -> Option<(Arc<PartitionView>, u64)> {
        let Some(view) = self.ctx.shared.view(&def.input, task.partition) else {
            task.status.status = "waiting";
            task.status.last_progress_ms = now_ms();
            task.status.detail = Some(format!("input topic {:?} does not exist", def.input));
            return None;
        };
        let end = view.end_offset();
        task.status.end_offset = end;
        if def.paused {
            task.status.status = "paused";
            task.status.last_progress_ms = now_ms();
            task.status.detail = None;
            task.instance = None;
            return None;
        }
        if task.retry_at.is_some_and(|t| Instant::now() < t) {
            return None;
        }
        if let Admit::Wait { reason, retry_in } = task.breaker.admit() {
            task.status.status = "tripped";
            task.status.last_progress_ms = now_ms();
            task.status.detail = Some(format!(
                "circuit breaker open: {reason}; one trial batch in {} s",
                retry_in.as_secs().max(1)
            ));
            return None;
        }
        task.retry_at = None;
        Some((view, end))
    }

    /// Where the task reads next: its committed position, once it has one and any reset asked since has
    /// been applied. `None` when this call committed a new position instead (the first run on the
    /// partition, from the handler's start position, or a reset), which is this step's work.
    fn position(
        &mut self,
        task: &mut Task,
        def: &HandlerDef,
        view: &PartitionView,
        end: u64,
    ) -> Result<Option<Committed>, StepError> {
        let generation = def.reset.as_ref().map_or(0, |r| r.generation);
        let at = |offsets: &[u64]| offsets.get(task.partition as usize).copied();

        // First run on this partition: start where the handler asked, and record it.
        if task.committed.is_none() {
            task.committed = task.consumer.committed()?;
            task.status.committed_offset = task.committed.map_or(0, |c| c.offset);
        }
        let committed = match task.committed {
            Some(c) => c,
            None => {
                let offset = match def.start {
                    StartPosition::Earliest => view.log().first_offset()?.unwrap_or(end),
                    StartPosition::Latest => at(&def.start_offsets).unwrap_or(end),
                    StartPosition::Offset(n) => n,
                };
                let committed = Committed {
                    offset,
                    version: def.active,
                    reset_generation: generation,
                };
                self.commit(task, PendingCommit::offset_only(committed))?;
                return Ok(None);
            }
        };
        if let Some(reset) = def
            .reset
            .as_ref()
            .filter(|r| r.generation > committed.reset_generation)
        {
            let offset = match reset.to {
                ResetTo::Earliest => view.log().first_offset()?.unwrap_or(end),
                ResetTo::Latest => end,
                ResetTo::Offset(n) => n,
                ResetTo::Timestamp(ts) => {
                    let first = view.log().first_offset()?.unwrap_or(end);
                    super::retention::first_at_or_after(view, first, end, ts)?
                }
            };
            let committed = Committed {
                offset,
                version: committed.version,
                reset_generation: reset.generation,
            };
            let mut commit = PendingCommit::offset_only(committed);
            commit.clear_state = reset.clear_state;
            task.instance = None;
            self.commit(task, commit)?;
            tracing::info!(handler = %task.handler, partition = task.partition, offset, "handler reset");
            return Ok(None);
        }
        Ok(Some(committed))
    }

    /// One batch of one task. Returns whether it did any work.
    fn step(&mut self, task: &mut Task, def: &HandlerDef) -> Result<bool, StepError> {
        if !self.settle_in_flight(task)? {
            return Ok(false);
        }
        let Some((view, end)) = self.ready(task, def) else {
            return Ok(false);
        };
        let Some(committed) = self.position(task, def, &view, end)? else {
            return Ok(true);
        };

        let version = def.active_version().ok_or_else(|| {
            StepError::Other(format!("active version v{} is missing", def.active))
        })?;
        self.ensure_instance(task, version)?;
        task.status.version = version.version;
        if committed.offset >= end {
            task.status.status = "idle";
            task.status.last_progress_ms = now_ms();
            task.status.detail = None;
            return Ok(false);
        }
        if task.status.status != "running" {
            // Published at once: the watchdog must see the events waiting even if this very batch is
            // the one that never returns.
            task.status.status = "running";
            task.status.detail = None;
            task.status.last_progress_ms = now_ms();
            self.publish(task);
        }

        let records = view.log().read(
            committed.offset,
            end,
            self.ctx.options.batch_max_events,
            MAX_BATCH_BYTES,
        )?;
        let Some(&(last, _)) = records.last() else {
            // Nothing stored at or after the committed offset below `end`: it was dropped by retention.
            let first = view.log().first_offset()?.unwrap_or(end);
            self.commit(
                task,
                PendingCommit::offset_only(Committed {
                    offset: first.max(committed.offset),
                    ..committed
                }),
            )?;
            return Ok(true);
        };
        let base = Committed {
            offset: last + 1,
            version: version.version,
            reset_generation: committed.reset_generation,
        };
        let mut batch = std::mem::replace(&mut self.scratch, InputBatch::new(0));
        let result = match batch.refill(task.partition, &records) {
            Ok(()) => self
                .process(task, version, &records, &batch, base, false)
                .map(|_| ()),
            Err(e) => Err(StepError::Other(e.to_string())),
        };
        self.scratch = batch;
        result?;
        Ok(true)
    }

    /// Runs the handler over `events` (laid out in `batch`) and commits the result, isolating failing
    /// events. `after` is what commits once every event is settled. The commit is sent without waiting
    /// unless `wait` (bisection needs each part durable before the next reads state). Returns whether
    /// every event was settled; false means the committed offset stopped inside the range (after a
    /// dead letter, or because the breaker opened) and the next step goes on from there.
    fn process(
        &mut self,
        task: &mut Task,
        version: &HandlerVersion,
        events: &[Stored],
        batch: &InputBatch,
        after: Committed,
        wait: bool,
    ) -> Result<bool, StepError> {
        let outcome = self.call(task, version, batch)?;
        match outcome {
            Ok(HandleOutcome::Outputs(outputs)) => {
                let state = self.take_writes(task);
                match to_records(&outputs, batch, version) {
                    Ok(outputs) => {
                        let commit = PendingCommit::batch(outputs, state, after);
                        cover(task, events);
                        if wait {
                            self.commit(task, commit)?;
                        } else {
                            self.commit_later(task, commit)?;
                        }
                        task.breaker.record(events.len() as u64, 0);
                        Ok(true)
                    }
                    // The handler named an output it did not declare: some event's doing, found by halving.
                    Err(message) => {
                        task.status.metrics.error(ErrorKind::Output);
                        self.discard_writes(task);
                        self.bisect(task, version, events, after, message)
                    }
                }
            }
            Ok(HandleOutcome::EventFailed { index, message }) => {
                self.discard_writes(task);
                let index = index as usize;
                let Some((failed_offset, failed_bytes)) = events.get(index) else {
                    let message = format!(
                        "handler reported event index {index} of a {}-event batch",
                        events.len()
                    );
                    return self.bisect(task, version, events, after, message);
                };
                // Re-run the events before the failing one: a deterministic handler gives their effects.
                let (outputs, state) = if index == 0 {
                    (vec![], StateChanges::default())
                } else {
                    let prefix = InputBatch::decode(task.partition, &events[..index])
                        .map_err(|e| StepError::Other(e.to_string()))?;
                    let rerun = match self.call(task, version, &prefix)? {
                        Ok(HandleOutcome::Outputs(out)) => to_records(&out, &prefix, version),
                        _ => Err(
                            "running the events before the failed one again gave another \
                                  result (is the handler deterministic?)"
                                .to_string(),
                        ),
                    };
                    match rerun {
                        Ok(records) => (records, self.take_writes(task)),
                        Err(message) => {
                            self.discard_writes(task);
                            return self.bisect(task, version, events, after, message);
                        }
                    }
                };
                let seq = self.dlq_seq(task)?;
                let entry = dead_letter(*failed_offset, version.version, message, failed_bytes);
                let committed = Committed {
                    offset: failed_offset + 1,
                    ..after
                };
                cover(task, &events[..=index]);
                self.commit(
                    task,
                    PendingCommit {
                        dead_letters: vec![(seq, entry)],
                        ..PendingCommit::batch(outputs, state, committed)
                    },
                )?;
                task.breaker.record(index as u64 + 1, 1);
                Ok(index + 1 == events.len())
            }
            Err(trap) => {
                // An instance that trapped is rebuilt anyway; one over its output limits is kept, so
                // the writes of the failed call must go.
                self.discard_writes(task);
                tracing::warn!(handler = %task.handler, partition = task.partition, events = events.len(), error = %trap, "batch failed; halving it to find the event at fault");
                self.bisect(task, version, events, after, trap.to_string())
            }
        }
    }

    /// Isolates the events at fault in a batch that failed as a whole (a trap or deadline does not say
    /// which event caused it): each half is processed on its own, halving again where it fails, until
    /// a failing event is alone; it goes to the dead-letter log with `error` and processing continues.
    /// Sound because handlers are deterministic: a half without the poison event succeeds.
    fn bisect(
        &mut self,
        task: &mut Task,
        version: &HandlerVersion,
        events: &[Stored],
        after: Committed,
        error: String,
    ) -> Result<bool, StepError> {
        if let [(offset, bytes)] = events {
            let seq = self.dlq_seq(task)?;
            let entry = dead_letter(*offset, version.version, error, bytes);
            cover(task, events);
            self.commit(
                task,
                PendingCommit {
                    dead_letters: vec![(seq, entry)],
                    ..PendingCommit::offset_only(Committed {
                        offset: offset + 1,
                        ..after
                    })
                },
            )?;
            task.breaker.record(1, 1);
            return Ok(true);
        }
        let (left, right) = events.split_at(events.len() / 2);
        for (part, part_after) in [(left, None), (right, Some(after))] {
            let (Some(&(last, _)), false) = (part.last(), task.breaker.is_open()) else {
                // Nothing to do, or the breaker opened: stop here, the rest waits for it to close.
                return Ok(part.is_empty());
            };
            let part_after = part_after.unwrap_or(Committed {
                offset: last + 1,
                ..after
            });
            let batch = InputBatch::decode(task.partition, part)
                .map_err(|e| StepError::Other(e.to_string()))?;
            if !self.process(task, version, part, &batch, part_after, true)? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Calls the task's instance, rebuilding it first if an earlier trap poisoned it. What fails around
    /// the call (rebuilding the instance, reading the state's size) is the task's failure, not the
    /// events': it comes back as a [`StepError`], so the step is retried instead of dead-lettering
    /// events that did nothing wrong.
    fn call(
        &mut self,
        task: &mut Task,
        version: &HandlerVersion,
        batch: &InputBatch,
    ) -> Result<Result<HandleOutcome, CallError>, StepError> {
        if task.instance.as_ref().is_none_or(|(_, i)| i.is_poisoned()) {
            task.instance = None;
            let instance = self.instantiate(task, version)?;
            task.instance = Some((version.version, instance));
        }
        // A task whose last call ran out its deadline waits before the next one: a handler that loops
        // burns a core for each deadline, and on a small machine that core is its neighbours'.
        if let Some(until) = task.cool_until.take() {
            std::thread::sleep(until.saturating_duration_since(Instant::now()));
        }
        let state_bytes = match task.state_bytes {
            Some(bytes) => bytes,
            None => {
                let bytes = task.consumer.state_bytes()?;
                task.state_bytes = Some(bytes);
                bytes
            }
        };
        let started = Instant::now();
        let outcome = match task.instance.as_mut() {
            Some((_, instance)) => {
                instance.set_state_bytes(state_bytes);
                instance.handle(&batch.batch, batch.values())
            }
            None => Err(CallError::Trap("no instance".into())),
        };
        let metrics = &task.status.metrics;
        metrics
            .batch_seconds
            .observe(started.elapsed().as_secs_f64());
        metrics.batch_events.observe(batch.len() as f64);
        match &outcome {
            Ok(HandleOutcome::Outputs(_)) => {}
            Ok(HandleOutcome::EventFailed { .. }) => {
                let refused = task
                    .instance
                    .as_ref()
                    .is_some_and(|(_, i)| i.state_write_refused());
                metrics.error(if refused {
                    ErrorKind::State
                } else {
                    ErrorKind::Event
                });
            }
            Err(CallError::Trap(_)) => metrics.error(ErrorKind::Trap),
            Err(CallError::Deadline(_)) => metrics.error(ErrorKind::Deadline),
            Err(CallError::Memory(_)) => metrics.error(ErrorKind::Memory),
            Err(CallError::Outputs(_)) => metrics.error(ErrorKind::Output),
        }
        if let Err(CallError::Deadline(_)) = outcome {
            let deadline = version.limits.apply(&self.ctx.options.limits).deadline;
            task.cool_until = Some(Instant::now() + deadline * DEADLINE_PENALTY);
        }
        Ok(outcome)
    }

    fn take_writes(&mut self, task: &mut Task) -> StateChanges {
        task.instance
            .as_mut()
            .map(|(_, i)| i.take_writes())
            .unwrap_or_default()
    }

    fn discard_writes(&mut self, task: &mut Task) {
        if let Some((_, i)) = task.instance.as_mut() {
            i.discard_writes();
        }
    }

    fn dlq_seq(&self, task: &mut Task) -> Result<u64, StepError> {
        match task.dlq_next {
            Some(seq) => Ok(seq),
            None => {
                let seq = task.consumer.dlq_next_seq()?;
                task.dlq_next = Some(seq);
                Ok(seq)
            }
        }
    }
}

/// What a batch commits, before it is sent to the writer.
struct PendingCommit {
    outputs: EncodedOutputs,
    state: StateChanges,
    committed: Committed,
    dead_letters: Vec<(u64, DlqEntry)>,
    replayed: Vec<u64>,
    clear_state: bool,
}

impl PendingCommit {
    /// A batch's outputs and state writes, with the offset after it.
    fn batch(outputs: EncodedOutputs, state: StateChanges, committed: Committed) -> Self {
        Self {
            outputs,
            state,
            ..Self::offset_only(committed)
        }
    }

    /// Only a new committed offset.
    fn offset_only(committed: Committed) -> Self {
        Self {
            outputs: vec![],
            state: StateChanges::default(),
            committed,
            dead_letters: vec![],
            replayed: vec![],
            clear_state: false,
        }
    }
}

/// Notes the log-append times of the events the next commit settles, for the latency histogram.
fn cover(task: &mut Task, events: &[Stored]) {
    task.covered_ms.clear();
    task.covered_ms.extend(
        events
            .iter()
            .filter_map(|(_, record)| crate::log::record::timestamp_of(record)),
    );
}

fn dead_letter(offset: u64, version: u32, error: String, record: &[u8]) -> DlqEntry {
    DlqEntry {
        offset,
        version,
        error,
        time_ms: now_ms(),
        record: record.to_vec(),
    }
}
