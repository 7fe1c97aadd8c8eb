//! Metrics: the golden signals served at `GET /metrics` on the control plane.
//!
//! This module owns the recording primitives and the exposition format; it depends on nothing else of
//! procd's. Who records where:
//! - [`Metrics`] (one per server): HTTP request latency by listener, route *template* and status, and
//!   refusals by reason and status. Both are lock-free [`Table`]s keyed by static strings.
//! - [`CellMetrics`] (one per cell, owned by its writer): events per group commit, commit+fsync time.
//! - [`IngestCounters`] (one per topic partition, in the cell's partition view): events and bytes
//!   appended by ingest, added once per group commit.
//! - [`TaskMetrics`] (one per handler and partition, owned by its task thread): batch duration and
//!   size, event-to-commit latency, errors by kind, breaker state.
//!
//! Nothing here is shared across cells on the data path except the server-wide tables, which are
//! touched once per request (never per event) with a relaxed atomic add. Values that other modules
//! already track (end and committed offsets, lag, queue depth, task status) are not mirrored here:
//! the admin endpoint reads them at scrape time and fills an [`encode::Snapshot`].

pub mod encode;
pub mod histogram;
pub mod table;

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

pub use encode::{Format, Snapshot};
pub use histogram::{Histogram, HistogramSnapshot, Tally};
pub use table::Table;

/// Series per server-wide table at most. Keys are (listener, method, route template, status) and
/// (reason, status): a few dozen in practice.
const TABLE_SLOTS: usize = 512;

/// The listener a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Listener {
    /// The data plane (`listen`).
    Data,
    /// The control plane (`admin_listen`).
    Admin,
}

impl Listener {
    /// The `listener` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Data => "data",
            Self::Admin => "admin",
        }
    }
}

/// A route as a label: its method and its path *template* (`/v1/topics/{topic}/events`), never the
/// raw path, so the number of series stays bounded whatever clients send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Route {
    /// HTTP method.
    pub method: &'static str,
    /// Path template.
    pub template: &'static str,
}

impl Route {
    /// A route.
    pub const fn new(method: &'static str, template: &'static str) -> Self {
        Self { method, template }
    }

    /// Requests that matched no route (any method, any path).
    pub const UNMATCHED: Route = Route::new("*", "unmatched");
}

/// Labels of one HTTP latency series.
pub type HttpKey = (Listener, Route, u16);
/// Labels of one refusal series: (reason, status).
pub type RefusalKey = (&'static str, u16);

/// The server-wide metrics: one per server, shared by both listeners.
#[derive(Debug)]
pub struct Metrics {
    http: Table<HttpKey, Histogram>,
    refused_requests: Table<RefusalKey, AtomicU64>,
    refused_events: Table<RefusalKey, AtomicU64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            http: Table::new(TABLE_SLOTS, || Histogram::new(histogram::HTTP_SECONDS)),
            refused_requests: Table::new(TABLE_SLOTS, AtomicU64::default),
            refused_events: Table::new(TABLE_SLOTS, AtomicU64::default),
        }
    }
}

impl Metrics {
    /// Records a request answered with `status` after `elapsed`.
    pub fn request(&self, listener: Listener, route: Route, status: u16, elapsed: Duration) {
        if let Some(h) = self.http.get((listener, route, status)) {
            h.observe(elapsed.as_secs_f64());
        }
    }

    /// Counts a data-plane request refused as a whole, by its error code and status.
    pub fn refused_request(&self, reason: &'static str, status: u16) {
        if let Some(c) = self.refused_requests.get((reason, status)) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts `events` refused for `reason` within an append (per-event outcomes).
    pub fn refused_events(&self, reason: &'static str, status: u16, events: u64) {
        if let Some(c) = self.refused_events.get((reason, status)) {
            c.fetch_add(events, Ordering::Relaxed);
        }
    }

    /// Copies the server-wide series into `snapshot`.
    pub fn fill(&self, snapshot: &mut Snapshot) {
        snapshot.http = self
            .http
            .entries()
            .map(|(k, h)| (k, h.snapshot()))
            .collect();
        snapshot.http.sort_by_key(|a| a.0);
        let counts = |t: &Table<RefusalKey, AtomicU64>| {
            let mut v: Vec<(RefusalKey, u64)> = t
                .entries()
                .map(|(k, c)| (k, c.load(Ordering::Relaxed)))
                .collect();
            v.sort();
            v
        };
        snapshot.refused_requests = counts(&self.refused_requests);
        snapshot.refused_events = counts(&self.refused_events);
    }
}

/// A cell's own metrics, recorded by its writer once per group commit.
#[derive(Debug)]
pub struct CellMetrics {
    /// Events (appends plus processing commits' outputs, at least 1 per commit) per group commit,
    /// i.e. per fsync.
    pub group_commit_events: Histogram,
    /// Time of a group commit's durable write: journal write plus fsync.
    pub fsync_seconds: Histogram,
}

impl Default for CellMetrics {
    fn default() -> Self {
        Self {
            group_commit_events: Histogram::new(histogram::EVENT_COUNTS),
            fsync_seconds: Histogram::new(histogram::FSYNC_SECONDS),
        }
    }
}

/// What ingest appended to one partition of one topic (duplicates excluded), added by the cell's
/// writer once per group commit, after the fsync.
#[derive(Debug, Default)]
pub struct IngestCounters {
    events: AtomicU64,
    bytes: AtomicU64,
}

impl IngestCounters {
    /// Adds a group commit's share.
    pub fn add(&self, events: u64, bytes: u64) {
        self.events.fetch_add(events, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// (events, bytes) so far.
    pub fn get(&self) -> (u64, u64) {
        (
            self.events.load(Ordering::Relaxed),
            self.bytes.load(Ordering::Relaxed),
        )
    }
}

/// Why a handler call failed, for `procd_handler_errors_total{kind}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The handler returned an error for one event (`Err` in the SDK).
    Event,
    /// A trap: a panic in the guest, `unreachable`, a stack overflow, a host-side failure.
    Trap,
    /// The call ran past its deadline.
    Deadline,
    /// The guest hit its memory limit.
    Memory,
    /// Outputs over the output limits, or naming an undeclared topic.
    Output,
    /// The handler failed an event after the host refused its state write (a value over
    /// `max_state_value_bytes`, or the partition's state over `max_state_bytes`).
    State,
}

impl ErrorKind {
    /// Every kind, in label order.
    pub const ALL: [ErrorKind; 6] = [
        Self::Event,
        Self::Trap,
        Self::Deadline,
        Self::Memory,
        Self::Output,
        Self::State,
    ];

    /// The `kind` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Event => "event",
            Self::Trap => "trap",
            Self::Deadline => "deadline",
            Self::Memory => "memory",
            Self::Output => "output",
            Self::State => "state",
        }
    }
}

/// The circuit breaker's state as a gauge value: 0 closed, 1 half-open (one trial batch), 2 open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum BreakerState {
    /// The handler runs.
    Closed = 0,
    /// One trial batch runs; its outcome closes or re-opens the breaker.
    HalfOpen = 1,
    /// Tripped: the handler waits for its cool-down.
    Open = 2,
}

/// One handler's metrics on one partition, recorded by its task thread.
#[derive(Debug)]
pub struct TaskMetrics {
    /// Duration of each handler call on a batch (failed calls included).
    pub batch_seconds: Histogram,
    /// Events per handler call.
    pub batch_events: Histogram,
    /// From each event's log-append timestamp to the durable commit that settled it (its outputs,
    /// state and offset, or its dead letter).
    pub latency_seconds: Histogram,
    errors: [AtomicU64; ErrorKind::ALL.len()],
    breaker: AtomicU8,
}

impl Default for TaskMetrics {
    fn default() -> Self {
        Self {
            batch_seconds: Histogram::new(histogram::BATCH_SECONDS),
            batch_events: Histogram::new(histogram::EVENT_COUNTS),
            latency_seconds: Histogram::new(histogram::LATENCY_SECONDS),
            errors: Default::default(),
            breaker: AtomicU8::new(BreakerState::Closed as u8),
        }
    }
}

impl TaskMetrics {
    /// Counts a failed call.
    pub fn error(&self, kind: ErrorKind) {
        self.errors[kind as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Failed calls of each kind so far, in [`ErrorKind::ALL`] order.
    pub fn errors(&self) -> [(ErrorKind, u64); ErrorKind::ALL.len()] {
        ErrorKind::ALL.map(|k| (k, self.errors[k as usize].load(Ordering::Relaxed)))
    }

    /// Publishes the breaker's state.
    pub fn set_breaker(&self, state: BreakerState) {
        self.breaker.store(state as u8, Ordering::Relaxed);
    }

    /// The breaker's state as its gauge value.
    pub fn breaker(&self) -> u8 {
        self.breaker.load(Ordering::Relaxed)
    }
}
