//! Cells: the unit of isolation. Cell `k` owns the partitions `p` with `p % C == k` and shares nothing with
//! other cells: its own fjall Database (`DIR/cells/k`), its own writer thread, its own maintenance thread,
//! its own processor (a supervisor thread and one thread per handler and partition, see `processor`),
//! its own bounded queue and its own health.
//!
//! The writer (`writer`) is the only thread that writes to the cell's Database: it group-commits
//! appends (one fsync per group), assigns offsets, stamps log-append time and deduplicates by event id.
//! Readers read a partition directly, but only up to the offset the writer published *after* the fsync,
//! so nothing is ever served that a crash could take back.

mod append;
mod batch;
mod breaker;
mod dedup;
mod processor;
mod queue_delay;
mod retention;
mod writer;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::sync::{oneshot, watch};

use crate::catalog::{Catalog, Topic};
use crate::log::layout::Shape;
use crate::log::{Committed, ConsumerLog, DlqEntry};
use crate::log::{PartitionLog, Store, StoreError, StoreOptions};
use crate::runtime::Runtime;

pub use append::AppendEvents;
pub(crate) use batch::{InputBatch, encode_outputs, to_records};
pub use breaker::BreakerOptions;
pub use dedup::DedupIndex;
pub use processor::{ProcessorOptions, TaskStatus};

/// Settings shared by every cell.
#[derive(Debug, Clone)]
pub struct CellOptions {
    /// Database tuning.
    pub store: StoreOptions,
    /// Append requests waiting for the writer, per cell. A full queue refuses with `503` instead of
    /// buffering without bound.
    pub queue_len: usize,
    /// A group commit stops collecting requests once it holds this many appended events (a handler's
    /// processing commit counts as one, whatever its outputs).
    pub group_commit_max_events: usize,
    /// How long event ids are remembered for deduplication.
    pub dedup_window_ms: u64,
    /// At most this many ids are remembered per partition.
    pub dedup_max_ids: usize,
    /// How often retention and journal upkeep run.
    pub maintenance_interval_ms: u64,
    /// No processing progress for this long while there is work: the cell reports itself stalled.
    pub processing_stall_ms: u64,
    /// Standing queue delay (ms) past which `normal` requests are shed (`low` from half of it); 0: off.
    pub queue_delay_target_ms: u64,
    /// Handler processing.
    pub processor: ProcessorOptions,
}

impl Default for CellOptions {
    fn default() -> Self {
        Self {
            store: StoreOptions::default(),
            queue_len: 1024,
            group_commit_max_events: 1000,
            dedup_window_ms: 10 * 60 * 1000,
            dedup_max_ids: 100_000,
            maintenance_interval_ms: 10_000,
            processing_stall_ms: 60_000,
            queue_delay_target_ms: 100,
            processor: ProcessorOptions::default(),
        }
    }
}

fn overloaded(
    cell: u32,
    shed: Option<crate::backpressure::Priority>,
    queue_delay_ms: Option<u64>,
) -> String {
    match (shed, queue_delay_ms) {
        (None, _) => format!("cell {cell} is overloaded: its write queue is full"),
        (Some(p), Some(ms)) => format!(
            "cell {cell} is overloaded: its writes wait {ms} ms in its queue (cell.queue_delay_target_ms); \
             {} priority requests are shed",
            p.as_str()
        ),
        (Some(p), None) => format!(
            "cell {cell} is overloaded: its write queue is too full for {} priority requests",
            p.as_str()
        ),
    }
}

/// Why a cell refused or failed a request.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CellError {
    /// The cell hit a storage fault and stopped acknowledging writes.
    #[error("cell {cell} is unavailable: {reason}")]
    Unavailable { cell: u32, reason: String },
    /// The cell's queue is full, or too full or too slow for the request's priority (`shed`).
    #[error("{}", overloaded(*cell, *shed, *queue_delay_ms))]
    Overloaded {
        cell: u32,
        /// The priority that was shed before the queue was full; `None`: the queue is full.
        shed: Option<crate::backpressure::Priority>,
        /// Set when the request was shed because requests wait this long in the queue.
        queue_delay_ms: Option<u64>,
    },
    /// The topic does not exist (it may have just been deleted).
    #[error("topic {0:?} does not exist")]
    UnknownTopic(String),
    /// The server is shutting down.
    #[error("cell {cell} is shutting down")]
    ShuttingDown { cell: u32 },
    /// The partition's handlers lag past the high watermark: its writes wait until they catch up.
    #[error(
        "partition {partition} is lagging: its handlers are {lag} events behind \
         (admission.lag_high_events); writes resume below admission.lag_low_events"
    )]
    Lagging { partition: u32, lag: u64 },
}

/// Where an appended event landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    /// Newly appended at this offset.
    New(u64),
    /// Its id was already appended at this offset; nothing was written.
    Duplicate(u64),
}

/// The outcome of an append request: one entry per event, in request order.
pub type AppendReply = Result<Vec<Appended>, CellError>;

/// What the writer thread is asked to do.
enum Command {
    Append {
        topic: Arc<str>,
        events: AppendEvents,
        reply: oneshot::Sender<AppendReply>,
        /// When it joined the queue: the writer measures the queue's delay from it.
        queued_at: Instant,
        /// The writer's group count then (see [`queue_delay`]): taken by the next group, it waited
        /// only for the commit in progress.
        queued_behind: u64,
    },
    Process(Box<ProcessCommit>),
    DropConsumer {
        consumer: ConsumerLog,
        reply: oneshot::Sender<Result<(), CellError>>,
    },
    /// Deletes a handler's dead letters on one partition up to a sequence number (all with `None`).
    PurgeDeadLetters {
        consumer: ConsumerLog,
        through: Option<u64>,
        reply: oneshot::Sender<Result<u64, CellError>>,
    },
    CreateTopic {
        topic: Arc<Topic>,
        reply: oneshot::Sender<Result<(), CellError>>,
    },
    DeleteTopic {
        name: String,
        reply: oneshot::Sender<Result<(), CellError>>,
    },
    Shutdown,
}

/// The effects of one processed batch of one handler on one partition, committed atomically.
struct ProcessCommit {
    consumer: ConsumerLog,
    partition: u32,
    /// Encoded records per output topic (all to `partition`).
    outputs: batch::EncodedOutputs,
    /// State writes (`None` deletes).
    state: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    committed: Committed,
    dead_letters: Vec<(u64, DlqEntry)>,
    /// Dead letters (by sequence number) this commit settles: a replay that succeeded.
    replayed: Vec<u64>,
    /// Clear the handler's state first (a reset).
    clear_state: bool,
    reply: oneshot::Sender<Result<(), CellError>>,
}

/// A request to run dead letters again through the handler's current version.
struct ReplayRequest {
    handler: String,
    partition: u32,
    /// Only this dead letter; every one (up to [`MAX_REPLAY`]) with `None`.
    seq: Option<u64>,
    reply: oneshot::Sender<Result<ReplayOutcome, CellError>>,
}

/// Dead letters replayed at most per request and partition.
pub const MAX_REPLAY: usize = 10_000;

/// What a replay did on one partition.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct ReplayOutcome {
    /// Dead letters that succeeded: their outputs and state writes are committed and they are gone.
    pub replayed: u64,
    /// Those that failed again, with the new error; they stay.
    pub failed: Vec<ReplayFailure>,
}

/// One dead letter that failed again.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReplayFailure {
    /// Its sequence number.
    pub seq: u64,
    /// Why it failed this time.
    pub error: String,
}

/// A task's status with its live lag, for status requests and metrics.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TaskReport {
    /// The status the processor published, with the live end offset.
    #[serde(flatten)]
    pub task: TaskStatus,
    /// Durable input events not processed yet.
    pub lag: u64,
    /// Age of the oldest unprocessed event (now minus its log-append time), 0 when caught up.
    pub lag_ms: u64,
}

/// The read side of one partition: its log and the durable end offset the writer publishes.
pub struct PartitionView {
    /// Partition number.
    pub partition: u32,
    log: PartitionLog,
    durable_end: watch::Sender<u64>,
    /// Handlers' lag past the high watermark (set and cleared by the processor's supervisor, with
    /// hysteresis): ingest refuses this partition's writes while it is set.
    lagging: AtomicU64,
    /// What ingest appended here, counted by the writer after each fsync.
    ingested: crate::metrics::IngestCounters,
}

impl PartitionView {
    /// The lag that made this partition refuse writes, if it does (0: it does not).
    pub fn lagging(&self) -> Option<u64> {
        Some(self.lagging.load(Ordering::Relaxed)).filter(|&lag| lag > 0)
    }

    fn set_lagging(&self, lag: Option<u64>) {
        self.lagging.store(lag.unwrap_or(0), Ordering::Relaxed);
    }

    /// One past the last durable offset.
    pub fn end_offset(&self) -> u64 {
        *self.durable_end.borrow()
    }

    /// Watches the durable end offset (for long-polling reads).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.durable_end.subscribe()
    }

    /// The partition's storage, for reads.
    pub fn log(&self) -> &PartitionLog {
        &self.log
    }

    /// Events and bytes ingest appended to this partition since the server started.
    pub fn ingested(&self) -> (u64, u64) {
        self.ingested.get()
    }
}

/// A topic's partitions within one cell.
pub struct TopicPartitions {
    topic: Arc<Topic>,
    by_partition: HashMap<u32, Arc<PartitionView>>,
}

/// Health of a cell: healthy until its first storage fault, then failed for good (until restart).
#[derive(Default)]
struct Health {
    failed: AtomicBool,
    reason: Mutex<Option<String>>,
}

impl Health {
    fn fail(&self, cell: u32, reason: String) {
        tracing::error!(cell, %reason, "cell failed: it stops acknowledging writes; other cells go on");
        if let Ok(mut slot) = self.reason.lock() {
            slot.get_or_insert(reason);
        }
        self.failed.store(true, Ordering::Release);
    }

    fn failure(&self) -> Option<String> {
        if !self.failed.load(Ordering::Acquire) {
            return None;
        }
        let reason = self.reason.lock().ok().and_then(|r| r.clone());
        Some(reason.unwrap_or_else(|| "storage fault".into()))
    }
}

/// State shared by a cell's threads and its readers.
struct Shared {
    index: u32,
    shape: Shape,
    store: Store,
    health: Health,
    topics: ArcSwap<HashMap<Arc<str>, Arc<TopicPartitions>>>,
    /// The processor's supervisor thread (woken for dead-letter replays).
    supervisor: std::sync::OnceLock<std::thread::Thread>,
    /// The processor's task threads, which the writer wakes when a commit is durable (new input, or
    /// a task's own batch commit).
    runners: ArcSwap<Vec<std::thread::Thread>>,
    /// What each (handler, partition) task is doing; written by the processor, read by status requests.
    statuses: Mutex<HashMap<(String, u32), TaskStatus>>,
    /// Handler definitions (read-only here): retention must not drop what a handler has not processed.
    catalog: Arc<Catalog>,
    /// Dead-letter replays waiting for the processor.
    replays: Mutex<Vec<ReplayRequest>>,
    /// See [`CellOptions::processing_stall_ms`].
    processing_stall_ms: u64,
    /// Group-commit size and fsync time, recorded by the writer.
    metrics: crate::metrics::CellMetrics,
    /// How long append requests wait in the queue before the writer takes them, in µs: the least
    /// wait over the writer's last interval (a standing queue, not a burst), 0 when the queue empties.
    queue_delay_us: AtomicU64,
    /// Groups the writer has begun collecting.
    groups_begun: AtomicU64,
    /// See [`CellOptions::queue_delay_target_ms`].
    queue_delay_target: Duration,
}

impl Shared {
    fn view(&self, topic: &str, partition: u32) -> Option<Arc<PartitionView>> {
        self.topics
            .load()
            .get(topic)?
            .by_partition
            .get(&partition)
            .cloned()
    }
}

/// A running cell.
pub struct Cell {
    shared: Arc<Shared>,
    tx: flume::Sender<Command>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    stop_maintenance: Mutex<Option<std::sync::mpsc::Sender<()>>>,
    stop_processor: Arc<AtomicBool>,
    processor_thread: Mutex<Option<JoinHandle<()>>>,
}

/// Opening a cell failed.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// Its Database could not be opened or recovered.
    #[error("cell {cell}: {cause}")]
    Store { cell: u32, cause: StoreError },
    /// Its threads could not be started.
    #[error("cell {cell}: cannot start thread: {cause}")]
    Thread { cell: u32, cause: std::io::Error },
}

impl Cell {
    /// Opens cell `index` of `shape` in `dir`, recovering the partitions of `topics`, and starts its
    /// writer, maintenance and processor threads. The processor runs the catalog's handlers on `runtime`.
    pub fn open(
        index: u32,
        dir: &std::path::Path,
        shape: Shape,
        catalog: &Arc<Catalog>,
        runtime: &Arc<Runtime>,
        options: &CellOptions,
    ) -> Result<Self, OpenError> {
        let topics = catalog.list();
        let store_err = |cause| OpenError::Store { cell: index, cause };
        let store = Store::open(dir, options.store.clone()).map_err(store_err)?;
        let known: Vec<&str> = topics.iter().map(|t| t.name.as_str()).collect();
        store.delete_orphans(&known).map_err(store_err)?;
        let handlers = catalog.handlers();
        let known_handlers: Vec<&str> = handlers.keys().map(String::as_str).collect();
        store
            .delete_orphan_consumers(&known_handlers)
            .map_err(store_err)?;
        let mut writer = writer::Writer::new(index, shape, store.clone(), options);
        let mut views = HashMap::new();
        for topic in &topics {
            let partitions = writer.open_topic(topic).map_err(store_err)?;
            views.insert(Arc::from(topic.name.as_str()), partitions);
        }
        let shared = Arc::new(Shared {
            index,
            shape,
            store,
            health: Health::default(),
            topics: ArcSwap::from_pointee(views),
            supervisor: std::sync::OnceLock::new(),
            runners: ArcSwap::from_pointee(Vec::new()),
            statuses: Mutex::new(HashMap::new()),
            catalog: catalog.clone(),
            replays: Mutex::new(Vec::new()),
            processing_stall_ms: options.processing_stall_ms,
            metrics: Default::default(),
            queue_delay_us: AtomicU64::new(0),
            groups_begun: AtomicU64::new(0),
            queue_delay_target: Duration::from_millis(options.queue_delay_target_ms),
        });
        let (tx, rx) = flume::bounded(options.queue_len.max(1));
        let thread_err = |cause| OpenError::Thread { cell: index, cause };
        let writer_thread = std::thread::Builder::new()
            .name(format!("procd-cell-{index}-writer"))
            .spawn({
                let shared = shared.clone();
                move || {
                    // A panic here is a bug; it must still fail the cell visibly rather than leave its
                    // queue without a reader.
                    let run = std::panic::AssertUnwindSafe(|| writer.run(&shared, rx));
                    if let Err(panic) = std::panic::catch_unwind(run) {
                        let what = panic_message(&*panic);
                        shared
                            .health
                            .fail(index, format!("writer thread panicked: {what}"));
                    }
                }
            })
            .map_err(thread_err)?;
        let (stop_tx, stop_rx) = std::sync::mpsc::channel();
        let interval = Duration::from_millis(options.maintenance_interval_ms.max(10));
        let maintenance_thread = std::thread::Builder::new()
            .name(format!("procd-cell-{index}-maintenance"))
            .spawn({
                let shared = shared.clone();
                move || retention::run(&shared, interval, &stop_rx)
            })
            .map_err(thread_err)?;
        let stop_processor = Arc::new(AtomicBool::new(false));
        let processor = processor::Supervisor::new(processor::ProcessorContext {
            shared: shared.clone(),
            tx: tx.clone(),
            catalog: catalog.clone(),
            runtime: runtime.clone(),
            options: options.processor.clone(),
            stop: stop_processor.clone(),
        });
        let processor_thread = std::thread::Builder::new()
            .name(format!("procd-cell-{index}-processor"))
            .spawn(move || processor.run())
            .map_err(thread_err)?;
        let _ = shared.supervisor.set(processor_thread.thread().clone());
        Ok(Self {
            shared,
            tx,
            threads: Mutex::new(vec![writer_thread, maintenance_thread]),
            stop_maintenance: Mutex::new(Some(stop_tx)),
            stop_processor,
            processor_thread: Mutex::new(Some(processor_thread)),
        })
    }

    /// This cell's index.
    pub fn index(&self) -> u32 {
        self.shared.index
    }

    /// `Some(reason)` once the cell has failed.
    pub fn failure(&self) -> Option<String> {
        self.shared.health.failure()
    }

    /// The watchdog: the (handler, partition, why) of every task of this cell that has events to
    /// process and has made no progress for `processing_stall_ms`.
    pub fn stalled_tasks(&self) -> Vec<(String, u32, String)> {
        let now = now_ms();
        let Ok(statuses) = self.shared.statuses.lock() else {
            return Vec::new();
        };
        let mut stalled: Vec<(String, u32, String)> = statuses
            .iter()
            .filter_map(|((handler, partition), s)| {
                let waiting = s.end_offset.saturating_sub(s.committed_offset);
                let idle_ms = now.saturating_sub(s.last_progress_ms);
                let stuck = waiting > 0
                    && idle_ms >= self.shared.processing_stall_ms
                    && !matches!(s.status, "paused" | "tripped");
                stuck.then(|| {
                    let why = format!(
                        "no progress for {} s with {waiting} events waiting",
                        idle_ms / 1000
                    );
                    (handler.clone(), *partition, why)
                })
            })
            .collect();
        stalled.sort();
        stalled
    }

    /// Makes this cell's storage fail every later write, as a failed fsync would (test hook, enabled
    /// only by `debug.fault_injection`).
    pub fn inject_write_fault(&self) {
        self.shared.store.inject_write_fault();
    }

    /// Makes this cell's every later write take `ms` longer, as on a slow disk (test hook, enabled only
    /// by `debug.fault_injection`); 0 ends it.
    pub fn inject_slow_writes(&self, ms: u64) {
        self.shared.store.inject_slow_writes(ms);
    }

    /// Requests waiting in the queue.
    pub fn queue_depth(&self) -> usize {
        self.tx.len()
    }

    /// How long appends wait in the queue now (the standing delay the writer measured last).
    pub fn queue_delay(&self) -> Duration {
        Duration::from_micros(self.shared.queue_delay_us.load(Ordering::Relaxed))
    }

    /// The queue's bound (`cell.queue_len`).
    pub fn queue_capacity(&self) -> usize {
        self.tx.capacity().unwrap_or(usize::MAX)
    }

    /// The cell's group-commit and fsync histograms.
    pub fn metrics(&self) -> &crate::metrics::CellMetrics {
        &self.shared.metrics
    }

    /// Every partition of every topic this cell holds, by topic name.
    pub fn partitions(&self) -> Vec<(Arc<str>, Arc<PartitionView>)> {
        let topics = self.shared.topics.load();
        let mut out: Vec<(Arc<str>, Arc<PartitionView>)> = topics
            .iter()
            .flat_map(|(name, t)| t.by_partition.values().map(|v| (name.clone(), v.clone())))
            .collect();
        out.sort_by(|a, b| (&a.0, a.1.partition).cmp(&(&b.0, b.1.partition)));
        out
    }

    /// Queues events of one topic for appending, without waiting. The receiver resolves once they are
    /// durable (or refused). A full queue is refused at once: the caller answers `503`.
    pub fn append(
        &self,
        topic: Arc<str>,
        events: AppendEvents,
        priority: crate::backpressure::Priority,
    ) -> Result<oneshot::Receiver<AppendReply>, CellError> {
        let cell = self.shared.index;
        if let Some(reason) = self.failure() {
            return Err(CellError::Unavailable { cell, reason });
        }
        if !priority.admits(self.tx.len(), self.queue_capacity()) {
            return Err(CellError::Overloaded {
                cell,
                shed: Some(priority),
                queue_delay_ms: None,
            });
        }
        let delay = self.queue_delay();
        if !priority.admits_delay(delay, self.shared.queue_delay_target, fastrand::f64()) {
            return Err(CellError::Overloaded {
                cell,
                shed: Some(priority),
                queue_delay_ms: Some(delay.as_millis() as u64),
            });
        }
        let (reply, rx) = oneshot::channel();
        match self.tx.try_send(Command::Append {
            topic,
            events,
            reply,
            queued_at: Instant::now(),
            queued_behind: self.shared.groups_begun.load(Ordering::Relaxed),
        }) {
            Ok(()) => Ok(rx),
            Err(flume::TrySendError::Full(_)) => Err(CellError::Overloaded {
                cell,
                shed: None,
                queue_delay_ms: None,
            }),
            Err(flume::TrySendError::Disconnected(_)) => Err(CellError::ShuttingDown { cell }),
        }
    }

    /// Creates the cell's partitions of a topic (idempotent).
    pub async fn create_topic(&self, topic: Arc<Topic>) -> Result<(), CellError> {
        self.control(|reply| Command::CreateTopic { topic, reply })
            .await
    }

    /// Deletes the cell's partitions of a topic and their data.
    pub async fn delete_topic(&self, name: &str) -> Result<(), CellError> {
        let name = name.to_string();
        self.control(|reply| Command::DeleteTopic { name, reply })
            .await
    }

    /// Deletes handler `handler`'s dead letters on `partition` up to sequence `through` (all with
    /// `None`), durably, through the writer. Returns how many were deleted.
    pub async fn purge_dead_letters(
        &self,
        handler: &str,
        partition: u32,
        through: Option<u64>,
    ) -> Result<u64, CellError> {
        let cell = self.shared.index;
        let consumer = self
            .consumer(handler, partition)
            .map_err(|e| CellError::Unavailable {
                cell,
                reason: e.to_string(),
            })?;
        self.control(|reply| Command::PurgeDeadLetters {
            consumer,
            through,
            reply,
        })
        .await
    }

    /// Runs handler `handler`'s dead letters on `partition` (one, or all) again through its current
    /// version, on the processor; those that succeed commit like a batch and leave the dead-letter log.
    pub async fn replay_dead_letters(
        &self,
        handler: &str,
        partition: u32,
        seq: Option<u64>,
    ) -> Result<ReplayOutcome, CellError> {
        let cell = self.shared.index;
        if let Some(reason) = self.failure() {
            return Err(CellError::Unavailable { cell, reason });
        }
        let (reply, rx) = oneshot::channel();
        let request = ReplayRequest {
            handler: handler.to_string(),
            partition,
            seq,
            reply,
        };
        match self.shared.replays.lock() {
            Ok(mut replays) => replays.push(request),
            Err(_) => return Err(CellError::ShuttingDown { cell }),
        }
        if let Some(supervisor) = self.shared.supervisor.get() {
            supervisor.unpark();
        }
        rx.await.map_err(|_| CellError::ShuttingDown { cell })?
    }

    async fn control<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, CellError>>) -> Command,
    ) -> Result<T, CellError> {
        let cell = self.shared.index;
        let (reply, rx) = oneshot::channel();
        // Control commands wait for room rather than being refused: they are rare and must not be lost.
        self.tx
            .send_async(make(reply))
            .await
            .map_err(|_| CellError::ShuttingDown { cell })?;
        rx.await.map_err(|_| CellError::ShuttingDown { cell })?
    }

    /// What handler `handler` (reading `input`) is doing on this cell's partitions, with live
    /// figures: the processor refreshes its status only when it steps the partition, so the end
    /// offset, and the committed offset of a task not stepped since the start, are read here. Reads
    /// storage (blocking).
    pub fn task_reports(&self, handler: &str, input: &str) -> Vec<TaskReport> {
        let now = now_ms();
        let mut out = Vec::new();
        for mut task in self.task_statuses(handler) {
            let view = self.partition(input, task.partition);
            if let Some(v) = &view {
                task.end_offset = v.end_offset();
            }
            let lag = task.end_offset.saturating_sub(task.committed_offset);
            // Lag in time: how old the oldest unprocessed event is (its log-append time).
            let lag_ms = if lag == 0 {
                0
            } else {
                view.as_ref()
                    .and_then(|v| v.log().timestamp_at(task.committed_offset).ok().flatten())
                    .map_or(0, |ts| now.saturating_sub(ts))
            };
            out.push(TaskReport { task, lag, lag_ms });
        }
        out
    }

    /// What each handler is doing on this cell's partitions.
    pub fn task_statuses(&self, handler: &str) -> Vec<TaskStatus> {
        let statuses = self
            .shared
            .statuses
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default();
        let mut out: Vec<TaskStatus> = statuses
            .into_iter()
            .filter(|((h, _), _)| h == handler)
            .map(|(_, s)| s)
            .collect();
        out.sort_by_key(|s| s.partition);
        out
    }

    /// Storage of a handler on one of this cell's partitions (dead letters, committed offset).
    pub fn consumer(&self, handler: &str, partition: u32) -> Result<ConsumerLog, StoreError> {
        self.shared.store.consumer(handler, partition)
    }

    /// The read side of a partition of a topic, if this cell has it.
    pub fn partition(&self, topic: &str, partition: u32) -> Option<Arc<PartitionView>> {
        self.shared
            .topics
            .load()
            .get(topic)?
            .by_partition
            .get(&partition)
            .cloned()
    }

    /// Stops the cell: the writer finishes every request already queued, then the threads exit and the
    /// Database is closed when the last handle is dropped.
    pub fn shutdown(&self) {
        // The processor first: it commits through the writer, which must still be running.
        self.stop_processor.store(true, Ordering::Release);
        if let Some(thread) = self.processor_thread.lock().ok().and_then(|mut t| t.take()) {
            thread.thread().unpark();
            if thread.join().is_err() {
                tracing::error!(cell = self.shared.index, "the processor thread panicked");
            }
        }
        if let Ok(mut stop) = self.stop_maintenance.lock() {
            stop.take();
        }
        // A full queue must not block shutdown forever: the writer drains it, so this send completes.
        let _ = self.tx.send(Command::Shutdown);
        let threads = self
            .threads
            .lock()
            .map(|mut t| std::mem::take(&mut *t))
            .unwrap_or_default();
        for thread in threads {
            if thread.join().is_err() {
                tracing::error!(
                    cell = self.shared.index,
                    "a cell thread panicked during shutdown"
                );
            }
        }
    }
}

impl Drop for Cell {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The message of a caught panic, if it carried one.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// Wall-clock time in Unix milliseconds: what the writer stamps as log-append time.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
