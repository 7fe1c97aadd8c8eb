//! A native test harness: run a handler under plain `cargo test`, no wasm, no host.
//!
//! [`TestDriver`] plays the host's part with in-memory state, in the spirit of Kafka Streams'
//! `TopologyTestDriver`: it builds columnar batches exactly as the host does, calls the same SDK code a
//! component runs (the batch loop, the lazy fetch of the values, the state cache and its single flush),
//! commits state only when a batch
//! succeeds, and captures log lines. [`TestDriver::process_batch`] also replays the host's failure
//! handling (re-run the events before a failed one, dead-letter it, go on), which catches handlers
//! that are not deterministic.
//!
//! ```
//! use procd_sdk::testing::TestDriver;
//! use procd_sdk::{Context, Event, Handler, Result};
//!
//! #[derive(Default)]
//! struct Upper;
//!
//! impl Handler for Upper {
//!     fn handle(&mut self, event: &Event<'_>, ctx: &mut Context<'_>) -> Result {
//!         ctx.emit(0, event.key(), event.value_str()?.to_uppercase());
//!         Ok(())
//!     }
//! }
//!
//! let mut driver = TestDriver::new(Upper).outputs(["shouted"]);
//! let records = driver.send("k", "hi").expect("valid UTF-8");
//! assert_eq!(records[0].value_str(), "HI");
//! assert_eq!(records[0].topic.as_deref(), Some("shouted"));
//! let failure = driver.send("k", [0xff]).expect_err("not UTF-8");
//! assert_eq!(failure.offset, 1);
//! ```

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::context::Outputs;
use crate::event::{Columns, Values, encode_headers};
use crate::handler::Runtime;
use crate::state::Backend;
use crate::{Config, Error, Handler, Level};

/// Runs a handler natively against in-memory state. See the [module docs](self).
pub struct TestDriver<H: Handler> {
    /// The handler until `init` moves it into `runtime`.
    handler: Option<H>,
    runtime: Option<Runtime<H>>,
    config: Vec<(String, String)>,
    outputs: Option<Vec<String>>,
    partition: u32,
    next_offset: u64,
    time_ms: u64,
    store: Store,
    logs: Vec<LogLine>,
}

impl<H: Handler> TestDriver<H> {
    /// A driver for `handler`, on partition 0, with offsets from 0, time 0, no configuration, empty
    /// state. The handler's `init` runs on the first send, or when [`init`](Self::init) is called.
    pub fn new(handler: H) -> Self {
        TestDriver {
            handler: Some(handler),
            runtime: None,
            config: Vec::new(),
            outputs: None,
            partition: 0,
            next_offset: 0,
            time_ms: 0,
            store: Store::default(),
            logs: Vec::new(),
        }
    }

    /// Adds a configuration pair, as given at deploy time. Call before the first send.
    #[must_use]
    pub fn config(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        assert!(
            self.runtime.is_none(),
            "TestDriver::config must be called before the handler is initialized"
        );
        self.config.push((key.into(), value.into()));
        self
    }

    /// Declares the output topics, in index order. Records then carry their topic name, and emitting to
    /// an index past the last fails the test (the host would refuse the batch). Without it, any index is
    /// accepted and records have no name.
    #[must_use]
    pub fn outputs<S: Into<String>>(mut self, names: impl IntoIterator<Item = S>) -> Self {
        self.outputs = Some(names.into_iter().map(Into::into).collect());
        self
    }

    /// The partition the events belong to (0 by default).
    #[must_use]
    pub fn partition(mut self, partition: u32) -> Self {
        self.partition = partition;
        self
    }

    /// The offset of the next event sent (0 by default); later events follow on.
    #[must_use]
    pub fn start_offset(mut self, offset: u64) -> Self {
        self.next_offset = offset;
        self
    }

    /// Refuses state values longer than `bytes`, as the host's state limit does, to test that path.
    #[must_use]
    pub fn max_state_value_bytes(mut self, bytes: usize) -> Self {
        self.store.max_value_bytes = Some(bytes);
        self
    }

    /// Refuses state writes that would grow the partition's state (every key's and value's bytes)
    /// past `bytes`, as the host's `max_state_bytes` limit does: a write that does not grow the state
    /// passes even over the limit, and deletes always pass.
    #[must_use]
    pub fn max_state_bytes(mut self, bytes: u64) -> Self {
        self.store.max_state_bytes = Some(bytes);
        self
    }

    /// Sets the timestamp given to the events sent from now on (unless they carry their own).
    pub fn set_time_ms(&mut self, time_ms: u64) {
        self.time_ms = time_ms;
    }

    /// Moves the clock forward by `ms`.
    pub fn advance_time_ms(&mut self, ms: u64) {
        self.time_ms = self.time_ms.saturating_add(ms);
    }

    /// Runs the handler's `init` with the configuration now, returning its error. Sending without it
    /// runs `init` first and fails the test if it fails. Calling it again does nothing.
    pub fn init(&mut self) -> Result<(), Error> {
        if self.runtime.is_some() {
            return Ok(());
        }
        let Some(handler) = self.handler.take() else {
            panic!("the handler's init already failed; build a new TestDriver");
        };
        let config = Config::new(self.config.clone());
        let runtime = self.capturing_logs(|| Runtime::start(handler, config))?;
        self.runtime = Some(runtime);
        Ok(())
    }

    /// The handler (after `init`, the one handling events).
    pub fn handler(&self) -> &H {
        match (&self.runtime, &self.handler) {
            (Some(runtime), _) => &runtime.handler,
            (None, Some(handler)) => handler,
            (None, None) => panic!("the handler's init failed; build a new TestDriver"),
        }
    }

    /// Sends one event in a batch of its own: the records it emitted, or its failure.
    pub fn send(
        &mut self,
        key: impl AsRef<[u8]>,
        value: impl AsRef<[u8]>,
    ) -> Result<Vec<Record>, EventFailure> {
        self.send_batch([TestEvent::new(key, value)])
    }

    /// Sends one event whose value is `value` as JSON.
    pub fn send_json<T: Serialize + ?Sized>(
        &mut self,
        key: impl AsRef<[u8]>,
        value: &T,
    ) -> Result<Vec<Record>, EventFailure> {
        self.send_batch([TestEvent::json(key, value)])
    }

    /// Sends one event built with [`TestEvent`] (headers, timestamp).
    pub fn send_event(&mut self, event: TestEvent) -> Result<Vec<Record>, EventFailure> {
        self.send_batch([event])
    }

    /// Sends events as ONE batch, i.e. one `handle` call: every record the batch emitted, or the first
    /// event that failed (and then, as on the host, none of the batch's records or state writes count).
    /// Accepts `(key, value)` pairs or [`TestEvent`]s.
    pub fn send_batch<E: Into<TestEvent>>(
        &mut self,
        events: impl IntoIterator<Item = E>,
    ) -> Result<Vec<Record>, EventFailure> {
        let events: Vec<TestEvent> = events.into_iter().map(Into::into).collect();
        let first_offset = self.assign_offsets(events.len());
        self.run(&events, first_offset)
    }

    /// Sends events as the host processes a batch: if an event fails, the events before it are handled
    /// again (and must succeed: a handler that fails differently the second time is not deterministic,
    /// and the test fails), their results are committed, the failed event is dead-lettered, and the
    /// events after it go on in a new batch.
    pub fn process_batch<E: Into<TestEvent>>(
        &mut self,
        events: impl IntoIterator<Item = E>,
    ) -> BatchOutcome {
        let events: Vec<TestEvent> = events.into_iter().map(Into::into).collect();
        let first_offset = self.assign_offsets(events.len());
        let mut outcome = BatchOutcome::default();
        let mut start = 0;
        while start < events.len() {
            let offset = first_offset + start as u64;
            match self.run(&events[start..], offset) {
                Ok(records) => {
                    outcome.records.extend(records);
                    break;
                }
                Err(failure) => {
                    let failed = failure.index as usize;
                    if failed > 0 {
                        match self.run(&events[start..start + failed], offset) {
                            Ok(records) => outcome.records.extend(records),
                            Err(second) => panic!(
                                "handler is not deterministic: event at offset {} failed ({}), but re-running the events \
                                 before it then failed at offset {} ({})",
                                failure.offset, failure.message, second.offset, second.message
                            ),
                        }
                    }
                    outcome.dead_letters.push(EventFailure {
                        index: (start + failed) as u32,
                        ..failure
                    });
                    start += failed + 1;
                }
            }
        }
        outcome
    }

    /// The state as committed after the last successful batch.
    pub fn state(&self) -> &StateStore {
        &self.store.committed
    }

    /// The committed state, to seed it before sending.
    pub fn state_mut(&mut self) -> &mut StateStore {
        &mut self.store.committed
    }

    /// How many host calls of each kind the SDK made so far.
    pub fn host_calls(&self) -> HostCalls {
        self.store.calls
    }

    /// The log lines written so far (by `init` and batches, including failed ones).
    pub fn logs(&self) -> &[LogLine] {
        &self.logs
    }

    /// Returns the log lines written so far and forgets them.
    pub fn take_logs(&mut self) -> Vec<LogLine> {
        std::mem::take(&mut self.logs)
    }

    fn assign_offsets(&mut self, events: usize) -> u64 {
        let first = self.next_offset;
        self.next_offset += events as u64;
        first
    }

    /// One `handle` call on `events`, committing state if it succeeds.
    fn run(
        &mut self,
        events: &[TestEvent],
        first_offset: u64,
    ) -> Result<Vec<Record>, EventFailure> {
        if let Err(e) = self.init() {
            panic!("the handler's init failed: {e} (call `TestDriver::init` to test init errors)");
        }
        let batch = TestBatch::build(events, first_offset, self.time_ms);
        // `input.values`: a copy, as the host's lowering into guest memory is.
        let fetches = Cell::new(0);
        let fetch = || {
            fetches.set(fetches.get() + 1);
            batch.values.clone()
        };
        let values = Values::new(&fetch);
        let columns = batch.columns(self.partition, &values);
        let Some(runtime) = self.runtime.as_mut() else {
            unreachable!("init succeeded above")
        };
        let store = &mut self.store;
        let result = capture(&mut self.logs, || runtime.handle(columns, store));
        self.store.calls.values += fetches.get();
        match result {
            Ok(outputs) => {
                self.store.commit();
                Ok(self.records(outputs, &batch))
            }
            Err(failure) => {
                self.store.discard();
                Err(EventFailure {
                    index: failure.index,
                    offset: first_offset + u64::from(failure.index),
                    message: failure.message,
                })
            }
        }
    }

    fn capturing_logs<T>(&mut self, f: impl FnOnce() -> T) -> T {
        capture(&mut self.logs, f)
    }

    /// Resolves the columnar outputs into records, as the host does (forwarded values included).
    fn records(&self, outputs: Outputs, input: &TestBatch) -> Vec<Record> {
        let mut records = Vec::with_capacity(outputs.topics.len());
        let (mut key_start, mut value_start) = (0, 0);
        for ((((&output, &key_end), &value_end), &source), &key_source) in outputs
            .topics
            .iter()
            .zip(&outputs.key_ends)
            .zip(&outputs.value_ends)
            .zip(&outputs.value_sources)
            .zip(&outputs.key_sources)
        {
            let topic = self.outputs.as_ref().map(|names| match names.get(usize::from(output)) {
                Some(name) => name.clone(),
                None => panic!(
                    "the handler emitted to output {output}, but the driver declares {} output topics {names:?}",
                    names.len()
                ),
            });
            records.push(Record {
                output,
                topic,
                key: match key_source.checked_sub(1) {
                    Some(event) => input.key(event as usize).to_vec(),
                    None => outputs.keys[key_start..key_end as usize].to_vec(),
                },
                value: match source.checked_sub(1) {
                    Some(event) => input.value(event as usize).to_vec(),
                    None => outputs.values[value_start..value_end as usize].to_vec(),
                },
            });
            key_start = key_end as usize;
            value_start = value_end as usize;
        }
        records
    }
}

impl<H: Handler> fmt::Debug for TestDriver<H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestDriver")
            .field("partition", &self.partition)
            .field("next_offset", &self.next_offset)
            .field("state_keys", &self.store.committed.len())
            .finish_non_exhaustive()
    }
}

/// An event to send, with optional headers and timestamp. `(key, value)` pairs convert into it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TestEvent {
    /// The key; empty for "no key".
    pub key: Vec<u8>,
    /// The value.
    pub value: Vec<u8>,
    /// Headers, in order.
    pub headers: Vec<(String, String)>,
    /// The timestamp; the driver's clock when `None`.
    pub timestamp_ms: Option<u64>,
}

impl TestEvent {
    /// An event with this key and value.
    pub fn new(key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> Self {
        TestEvent {
            key: key.as_ref().to_vec(),
            value: value.as_ref().to_vec(),
            ..TestEvent::default()
        }
    }

    /// An event whose value is `value` as JSON.
    pub fn json<T: Serialize + ?Sized>(key: impl AsRef<[u8]>, value: &T) -> Self {
        let value = match serde_json::to_vec(value) {
            Ok(json) => json,
            Err(e) => panic!("TestEvent::json: the test value does not serialize to JSON: {e}"),
        };
        TestEvent::new(key, value)
    }

    /// Adds a header.
    #[must_use]
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Sets the timestamp.
    #[must_use]
    pub fn timestamp_ms(mut self, timestamp_ms: u64) -> Self {
        self.timestamp_ms = Some(timestamp_ms);
        self
    }
}

impl<K: AsRef<[u8]>, V: AsRef<[u8]>> From<(K, V)> for TestEvent {
    fn from((key, value): (K, V)) -> Self {
        TestEvent::new(key, value)
    }
}

impl<K: AsRef<[u8]>, V: AsRef<[u8]>> From<&(K, V)> for TestEvent {
    fn from((key, value): &(K, V)) -> Self {
        TestEvent::new(key, value)
    }
}

impl From<&TestEvent> for TestEvent {
    fn from(event: &TestEvent) -> Self {
        event.clone()
    }
}

/// A record the handler emitted.
#[derive(Clone, PartialEq, Eq)]
pub struct Record {
    /// Index of the output topic.
    pub output: u16,
    /// Name of the output topic, if the driver declared [`outputs`](TestDriver::outputs).
    pub topic: Option<String>,
    /// The key; empty means "no key".
    pub key: Vec<u8>,
    /// The value.
    pub value: Vec<u8>,
}

impl Record {
    /// The key as UTF-8; fails the test if it is not.
    pub fn key_str(&self) -> &str {
        match std::str::from_utf8(&self.key) {
            Ok(s) => s,
            Err(e) => panic!("record key {:?} is not UTF-8: {e}", self.key),
        }
    }

    /// The value as UTF-8; fails the test if it is not.
    pub fn value_str(&self) -> &str {
        match std::str::from_utf8(&self.value) {
            Ok(s) => s,
            Err(e) => panic!("record value {:?} is not UTF-8: {e}", self.value),
        }
    }

    /// The value parsed as JSON; fails the test if it does not parse as `T`.
    pub fn value_json<T: DeserializeOwned>(&self) -> T {
        match serde_json::from_slice(&self.value) {
            Ok(v) => v,
            Err(e) => panic!(
                "record value {:?} is not the expected JSON: {e}",
                String::from_utf8_lossy(&self.value)
            ),
        }
    }
}

impl fmt::Debug for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Record")
            .field("output", &self.output)
            .field("topic", &self.topic)
            .field("key", &String::from_utf8_lossy(&self.key))
            .field("value", &String::from_utf8_lossy(&self.value))
            .finish()
    }
}

/// An event the handler failed: what `handle` returned as `event-error`, plus the event's offset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventFailure {
    /// Index of the event in the batch sent (for [`process_batch`](TestDriver::process_batch): in the
    /// whole batch given).
    pub index: u32,
    /// The event's offset.
    pub offset: u64,
    /// The handler's message.
    pub message: String,
}

impl fmt::Display for EventFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "event {} (offset {}) failed: {}",
            self.index, self.offset, self.message
        )
    }
}

impl std::error::Error for EventFailure {}

/// What [`TestDriver::process_batch`] committed and dead-lettered.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BatchOutcome {
    /// Records of every event that succeeded, in order.
    pub records: Vec<Record>,
    /// Events that failed, in order.
    pub dead_letters: Vec<EventFailure>,
}

/// One log line the handler wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogLine {
    /// Its level.
    pub level: Level,
    /// Its text.
    pub message: String,
}

/// Counts of the host calls the SDK made: the cost model of the boundary.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostCalls {
    /// `input.values`: the batch's values fetched, at most once per batch and only if the handler read
    /// a value (each one copies all of them into the handler's memory).
    pub values: u64,
    /// `state.get`.
    pub get: u64,
    /// `state.get-many`.
    pub get_many: u64,
    /// `state.set`.
    pub set: u64,
    /// `state.set-many`.
    pub set_many: u64,
    /// `state.delete-many`.
    pub delete_many: u64,
}

/// The committed state of the driver's partition.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StateStore {
    entries: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl StateStore {
    /// The value under `key`.
    pub fn get(&self, key: impl AsRef<[u8]>) -> Option<&[u8]> {
        self.entries.get(key.as_ref()).map(Vec::as_slice)
    }

    /// The `u64` under `key` (as [`State::set_u64`](crate::State::set_u64) stores it); fails the test if
    /// the value is not 8 bytes.
    pub fn get_u64(&self, key: impl AsRef<[u8]>) -> Option<u64> {
        let value = self.get(key.as_ref())?;
        match <[u8; 8]>::try_from(value) {
            Ok(bytes) => Some(u64::from_le_bytes(bytes)),
            Err(_) => panic!(
                "state under {:?} is {} bytes, not a u64",
                String::from_utf8_lossy(key.as_ref()),
                value.len()
            ),
        }
    }

    /// The JSON value under `key`; fails the test if it does not parse as `T`.
    pub fn get_json<T: DeserializeOwned>(&self, key: impl AsRef<[u8]>) -> Option<T> {
        let value = self.get(key.as_ref())?;
        match serde_json::from_slice(value) {
            Ok(v) => Some(v),
            Err(e) => panic!(
                "state under {:?} is not the expected JSON: {e}",
                String::from_utf8_lossy(key.as_ref())
            ),
        }
    }

    /// Stores `value` under `key`, as if an earlier batch had.
    pub fn set(&mut self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) {
        self.entries
            .insert(key.as_ref().to_vec(), value.as_ref().to_vec());
    }

    /// Every entry, in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.entries
            .iter()
            .map(|(k, v)| (k.as_slice(), v.as_slice()))
    }

    /// How many keys hold a value.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no key holds a value.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// The in-memory host state: committed entries plus the current batch's writes, which commit or vanish
/// with the batch, as on the host.
#[derive(Default)]
struct Store {
    committed: StateStore,
    pending: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    max_value_bytes: Option<usize>,
    max_state_bytes: Option<u64>,
    calls: HostCalls,
}

impl Store {
    fn commit(&mut self) {
        for (key, value) in std::mem::take(&mut self.pending) {
            match value {
                Some(value) => self.committed.entries.insert(key, value),
                None => self.committed.entries.remove(&key),
            };
        }
    }

    fn discard(&mut self) {
        self.pending.clear();
    }

    fn read(&self, key: &[u8]) -> Option<Vec<u8>> {
        match self.pending.get(key) {
            Some(value) => value.clone(),
            None => self.committed.entries.get(key).cloned(),
        }
    }

    fn check(&self, value: &[u8]) -> Result<(), String> {
        match self.max_value_bytes {
            Some(max) if value.len() > max => Err(format!(
                "a state value of {} bytes exceeds the limit of {max}",
                value.len()
            )),
            _ => Ok(()),
        }
    }

    /// The state's bytes as the handler sees it now (committed, then this batch's writes).
    fn state_bytes(&self) -> u64 {
        let mut keys: std::collections::BTreeSet<&[u8]> =
            self.committed.entries.keys().map(Vec::as_slice).collect();
        keys.extend(self.pending.keys().map(Vec::as_slice));
        keys.into_iter().map(|key| self.entry_bytes(key)).sum()
    }

    /// What `key`'s entry counts against `max_state_bytes`: its key's and value's lengths, or 0.
    fn entry_bytes(&self, key: &[u8]) -> u64 {
        self.read(key)
            .map_or(0, |value| (key.len() + value.len()) as u64)
    }

    /// Puts the writes in the batch's pending state, all or none: refused if one of them, in order,
    /// would grow the state past `max_state_bytes` (the host's rule and message).
    fn put(&mut self, writes: Vec<(&[u8], &[u8])>) -> Result<(), String> {
        if let Some(max) = self.max_state_bytes {
            let before = self.pending.clone();
            let mut total = self.state_bytes();
            for &(key, value) in &writes {
                let current = self.entry_bytes(key);
                let new = (key.len() + value.len()) as u64;
                if new > current && total - current + new > max {
                    self.pending = before;
                    return Err(format!(
                        "partition state would grow to {} bytes; the limit is {max} bytes \
                         (max_state_bytes)",
                        total - current + new
                    ));
                }
                total = total - current + new;
                self.pending.insert(key.to_vec(), Some(value.to_vec()));
            }
            return Ok(());
        }
        for (key, value) in writes {
            self.pending.insert(key.to_vec(), Some(value.to_vec()));
        }
        Ok(())
    }
}

impl Backend for Store {
    fn get(&mut self, key: &[u8]) -> Option<Vec<u8>> {
        self.calls.get += 1;
        self.read(key)
    }

    fn get_many(&mut self, keys: &[u8], key_ends: &[u32]) -> (Vec<u8>, Vec<u32>, Vec<bool>) {
        self.calls.get_many += 1;
        let (mut values, mut value_ends, mut found) = (Vec::new(), Vec::new(), Vec::new());
        for key in split(keys, key_ends) {
            let value = self.read(key);
            found.push(value.is_some());
            values.extend_from_slice(value.as_deref().unwrap_or_default());
            value_ends.push(crate::state::end(&values));
        }
        (values, value_ends, found)
    }

    fn set(&mut self, key: &[u8], value: &[u8]) -> Result<(), String> {
        self.calls.set += 1;
        self.check(value)?;
        self.put(vec![(key, value)])
    }

    fn set_many(
        &mut self,
        keys: &[u8],
        key_ends: &[u32],
        values: &[u8],
        value_ends: &[u32],
    ) -> Result<(), String> {
        self.calls.set_many += 1;
        let values: Vec<&[u8]> = split(values, value_ends).collect();
        values.iter().try_for_each(|value| self.check(value))?;
        self.put(split(keys, key_ends).zip(values).collect())
    }

    fn delete_many(&mut self, keys: &[u8], key_ends: &[u32]) {
        self.calls.delete_many += 1;
        for key in split(keys, key_ends) {
            self.pending.insert(key.to_vec(), None);
        }
    }
}

/// Splits a column the SDK built (so its ends are in range and ascending).
fn split<'a>(blob: &'a [u8], ends: &'a [u32]) -> impl Iterator<Item = &'a [u8]> + 'a {
    let mut start = 0;
    ends.iter().map(move |&end| {
        let item = &blob[start..end as usize];
        start = end as usize;
        item
    })
}

/// A batch in the WIT's columnar layout, built as the host builds it.
struct TestBatch {
    offsets: Vec<u64>,
    timestamps_ms: Vec<u64>,
    keys: Vec<u8>,
    key_ends: Vec<u32>,
    values: Vec<u8>,
    value_ends: Vec<u32>,
    headers: Vec<u8>,
    header_ends: Vec<u32>,
}

impl TestBatch {
    fn build(events: &[TestEvent], first_offset: u64, time_ms: u64) -> Self {
        let mut batch = TestBatch {
            offsets: Vec::new(),
            timestamps_ms: Vec::new(),
            keys: Vec::new(),
            key_ends: Vec::new(),
            values: Vec::new(),
            value_ends: Vec::new(),
            headers: Vec::new(),
            header_ends: Vec::new(),
        };
        for (event, offset) in events.iter().zip(first_offset..) {
            batch.offsets.push(offset);
            batch
                .timestamps_ms
                .push(event.timestamp_ms.unwrap_or(time_ms));
            batch.keys.extend_from_slice(&event.key);
            batch.key_ends.push(crate::state::end(&batch.keys));
            batch.values.extend_from_slice(&event.value);
            batch.value_ends.push(crate::state::end(&batch.values));
            encode_headers(
                &mut batch.headers,
                event.headers.iter().map(|(n, v)| (n.as_str(), v.as_str())),
            );
            batch.header_ends.push(crate::state::end(&batch.headers));
        }
        batch
    }

    /// Event `i`'s key.
    fn key(&self, i: usize) -> &[u8] {
        let start = i.checked_sub(1).map_or(0, |p| self.key_ends[p] as usize);
        &self.keys[start..self.key_ends[i] as usize]
    }

    /// Event `i`'s value.
    fn value(&self, i: usize) -> &[u8] {
        let start = i.checked_sub(1).map_or(0, |p| self.value_ends[p] as usize);
        &self.values[start..self.value_ends[i] as usize]
    }

    fn columns<'a>(&'a self, partition: u32, values: &'a Values<'a>) -> Columns<'a> {
        Columns {
            partition,
            offsets: &self.offsets,
            timestamps_ms: &self.timestamps_ms,
            keys: &self.keys,
            key_ends: &self.key_ends,
            values,
            value_ends: &self.value_ends,
            headers: &self.headers,
            header_ends: &self.header_ends,
        }
    }
}

thread_local! {
    /// Where `log` writes while a driver runs the handler on this thread.
    static CAPTURE: RefCell<Option<Vec<LogLine>>> = const { RefCell::new(None) };
}

/// Runs `f` with this thread's log lines captured into `logs`.
fn capture<T>(logs: &mut Vec<LogLine>, f: impl FnOnce() -> T) -> T {
    /// Stops capturing even if `f` panics, so a failed test does not leave the thread capturing.
    struct Stop;
    impl Drop for Stop {
        fn drop(&mut self) {
            CAPTURE.with(|c| c.borrow_mut().take());
        }
    }
    CAPTURE.with(|c| *c.borrow_mut() = Some(Vec::new()));
    let stop = Stop;
    let result = f();
    logs.extend(CAPTURE.with(|c| c.borrow_mut().take()).unwrap_or_default());
    drop(stop);
    result
}

/// `log` on native targets: into the running driver's capture, or stderr outside one.
pub(crate) fn capture_log(level: Level, message: &str) {
    let captured = CAPTURE.with(|c| match c.borrow_mut().as_mut() {
        Some(lines) => {
            lines.push(LogLine {
                level,
                message: message.to_owned(),
            });
            true
        }
        None => false,
    });
    if !captured {
        eprintln!("[{level}] {message}");
    }
}
