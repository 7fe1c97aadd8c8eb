//! Partition-local key-value state, with a batch-local cache in front of the host.
//!
//! Every host call costs a boundary crossing, so the first read of a key goes to the host and later reads
//! hit the cache; writes and deletes only touch the cache (reads see them at once) and are flushed with
//! one `set-many` and one `delete-many` when the batch succeeds. The cache is emptied after every batch:
//! the host may discard a batch's writes (when an event fails) or change the state between batches
//! (offset resets, version swaps), so nothing read in one batch is trusted in the next.
//!
//! The cache is a small open-addressing hash table of its own rather than a `HashMap<Vec<u8>, _>`: keys
//! and values live in two arenas (no allocation per key or value), a look-up hashes once and compares
//! keys word by word (see `bytes`), and entries stay in first-use order, which makes the flush order
//! deterministic.
//!
//! Most look-ups are of the handled event's own key (`state.add_u64(event.key(), 1)`), and a handler that
//! prefetches has already looked that key up once in the batch. So the cache remembers, per event, the
//! entry of the event's own key slice (recognised by address and length inside the batch's key column,
//! which cannot change during the batch): the second look-up is one load instead of a hash and a probe.
//!
//! Invariants: an entry exists iff the handler read, wrote or prefetched its key during this batch; a
//! `loaded` entry's `value` is what the handler would read now; `dirty` entries differ from what the host
//! holds; every span lies inside its arena.

use std::hash::BuildHasher;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::Error;
use crate::bytes;
use crate::collections::FixedState;

/// The host's state calls, as the SDK uses them: the wasm imports in a component, an in-memory map in the
/// test driver.
pub(crate) trait Backend {
    fn get(&mut self, key: &[u8]) -> Option<Vec<u8>>;
    /// For each key in `keys` (split by `key_ends`): `(values, value_ends, found)`, column-wise.
    fn get_many(&mut self, keys: &[u8], key_ends: &[u32]) -> (Vec<u8>, Vec<u32>, Vec<bool>);
    fn set(&mut self, key: &[u8], value: &[u8]) -> Result<(), String>;
    fn set_many(
        &mut self,
        keys: &[u8],
        key_ends: &[u32],
        values: &[u8],
        value_ends: &[u32],
    ) -> Result<(), String>;
    fn delete_many(&mut self, keys: &[u8], key_ends: &[u32]);
}

/// A range of one of the cache's arenas.
#[derive(Clone, Copy)]
struct Span {
    start: u32,
    end: u32,
}

impl Span {
    #[inline]
    fn range(self) -> std::ops::Range<usize> {
        self.start as usize..self.end as usize
    }

    #[inline]
    fn len(self) -> usize {
        (self.end - self.start) as usize
    }
}

struct Entry {
    hash: u64,
    key: Span,
    /// What a read returns now (`None`: absent or deleted), once `loaded`.
    value: Option<Span>,
    /// Whether `value` is known: false for a key whose prefetch the host did not answer.
    loaded: bool,
    /// Written or deleted in this batch, so the host must hear about it.
    dirty: bool,
    /// Index of the event that wrote it last: the one to blame if the host refuses the write.
    writer: u32,
}

/// Marks a free slot of the table.
const EMPTY: u32 = u32::MAX;

/// The batch-local cache. Kept across batches only to reuse its allocations.
#[derive(Default)]
pub(crate) struct Cache {
    /// Open addressing, linear probing: indexes into `entries`, or `EMPTY`. Its length is zero or a power
    /// of two, and at most half of it is used.
    slots: Vec<u32>,
    /// In first-use order.
    entries: Vec<Entry>,
    /// The entries' keys, concatenated.
    keys: Vec<u8>,
    /// The entries' values. A value rewritten with no more bytes than it had stays in place; a longer
    /// one moves to the end (the old bytes are reclaimed when the batch ends).
    values: Vec<u8>,
    /// Reused buffer for `set_json`.
    scratch: Vec<u8>,
    /// Per event of the batch: the entry of that event's own key, or `EMPTY` until it is looked up.
    own: Vec<u32>,
}

/// A state write the host refused when the batch was flushed.
pub(crate) struct FlushError {
    pub index: u32,
    pub message: String,
}

#[inline]
fn hash(key: &[u8]) -> u64 {
    FixedState.hash_one(key)
}

impl Cache {
    /// Empties the cache for a batch of `events` events.
    pub fn clear(&mut self, events: usize) {
        if !self.entries.is_empty() {
            self.slots.fill(EMPTY);
        }
        self.entries.clear();
        self.keys.clear();
        self.values.clear();
        self.own.clear();
        self.own.resize(events, EMPTY);
    }

    /// The index of `key`'s entry, if it has one.
    #[inline]
    fn find(&self, key: &[u8], hash: u64) -> Option<usize> {
        if self.slots.is_empty() {
            return None;
        }
        let mask = self.slots.len() - 1;
        let mut at = hash as usize & mask;
        loop {
            let slot = self.slots[at];
            if slot == EMPTY {
                return None;
            }
            let entry = &self.entries[slot as usize];
            if entry.hash == hash && bytes::eq(&self.keys[entry.key.range()], key) {
                return Some(slot as usize);
            }
            at = (at + 1) & mask;
        }
    }

    /// Adds an entry for `key`, which has none, and returns its index.
    fn insert(&mut self, key: &[u8], hash: u64, value: Option<&[u8]>, loaded: bool) -> usize {
        if (self.entries.len() + 1) * 2 > self.slots.len() {
            self.grow();
        }
        let index = self.entries.len();
        let start = end(&self.keys);
        self.keys.extend_from_slice(key);
        let key = Span {
            start,
            end: end(&self.keys),
        };
        let value = value.map(|v| self.push_value(v));
        self.entries.push(Entry {
            hash,
            key,
            value,
            loaded,
            dirty: false,
            writer: 0,
        });
        let slot =
            u32::try_from(index).expect("fewer than 2^31 cached keys: each costs guest memory");
        self.place(hash, slot);
        index
    }

    fn place(&mut self, hash: u64, slot: u32) {
        let mask = self.slots.len() - 1;
        let mut at = hash as usize & mask;
        while self.slots[at] != EMPTY {
            at = (at + 1) & mask;
        }
        self.slots[at] = slot;
    }

    fn grow(&mut self) {
        let len = (self.slots.len() * 2).max(64);
        self.slots.clear();
        self.slots.resize(len, EMPTY);
        for index in 0..self.entries.len() {
            // `index` < entries.len(), which `insert` keeps below 2^31.
            self.place(self.entries[index].hash, index as u32);
        }
    }

    #[inline]
    fn push_value(&mut self, value: &[u8]) -> Span {
        let start = end(&self.values);
        self.values.extend_from_slice(value);
        Span {
            start,
            end: end(&self.values),
        }
    }

    #[inline]
    fn value(&self, index: usize) -> Option<&[u8]> {
        self.entries[index]
            .value
            .map(|span| &self.values[span.range()])
    }

    /// Replaces entry `index`'s value, in place when it fits.
    #[inline]
    fn set_value(&mut self, index: usize, value: &[u8], writer: u32) {
        let span = match self.entries[index].value {
            Some(old) if old.len() >= value.len() => {
                let span = Span {
                    start: old.start,
                    end: old.start + (value.len() as u32),
                };
                self.values[span.range()].copy_from_slice(value);
                span
            }
            _ => self.push_value(value),
        };
        let entry = &mut self.entries[index];
        entry.value = Some(span);
        entry.loaded = true;
        entry.dirty = true;
        entry.writer = writer;
    }

    fn key(&self, entry: &Entry) -> &[u8] {
        &self.keys[entry.key.range()]
    }

    /// Sends the batch's writes to the host: one `delete-many` and one `set-many` at most, each in
    /// first-use order. Deletes go first: a key is either set or deleted, so the order does not change
    /// the result, but the state the sets are checked against (the host's `max_state_bytes`) is then
    /// already without the deleted entries.
    pub fn flush(&mut self, backend: &mut dyn Backend) -> Result<(), FlushError> {
        let mut set = Columns::default();
        let mut deleted = Columns::default();
        for entry in self.entries.iter().filter(|e| e.dirty) {
            match entry.value {
                Some(value) => {
                    set.push_key(self.key(entry));
                    set.push_value(&self.values[value.range()]);
                }
                None => deleted.push_key(self.key(entry)),
            }
        }
        if !deleted.key_ends.is_empty() {
            backend.delete_many(&deleted.keys, &deleted.key_ends);
        }
        if !set.key_ends.is_empty()
            && let Err(message) =
                backend.set_many(&set.keys, &set.key_ends, &set.values, &set.value_ends)
        {
            return Err(self.blame(backend, message));
        }
        Ok(())
    }

    /// Finds the event to blame for a refused `set-many`: the host says why, not which key, so try the
    /// writes one by one and blame the earliest event whose write is refused alone (the host re-runs the
    /// events before the one blamed, which must then succeed). If every write passes alone (a limit on
    /// the batch's total), blame the last event that wrote anything. The host discards the batch's writes
    /// either way.
    fn blame(&self, backend: &mut dyn Backend, message: String) -> FlushError {
        let mut refused: Option<(u32, String)> = None;
        let mut last_writer = 0;
        for entry in self.entries.iter().filter(|e| e.dirty) {
            last_writer = last_writer.max(entry.writer);
            if let Some(value) = entry.value
                && refused
                    .as_ref()
                    .is_none_or(|(index, _)| entry.writer < *index)
                && let Err(message) = backend.set(self.key(entry), &self.values[value.range()])
            {
                refused = Some((entry.writer, message));
            }
        }
        let (index, message) = refused.unwrap_or((last_writer, message));
        FlushError {
            index,
            message: format!("state write refused: {message}"),
        }
    }
}

#[derive(Default)]
struct Columns {
    keys: Vec<u8>,
    key_ends: Vec<u32>,
    values: Vec<u8>,
    value_ends: Vec<u32>,
}

impl Columns {
    fn push_key(&mut self, key: &[u8]) {
        self.keys.extend_from_slice(key);
        self.key_ends.push(end(&self.keys));
    }

    fn push_value(&mut self, value: &[u8]) {
        self.values.extend_from_slice(value);
        self.value_ends.push(end(&self.values));
    }
}

/// The end offset of a column (or arena) as the WIT's `u32`.
#[inline]
pub(crate) fn end(column: &[u8]) -> u32 {
    u32::try_from(column.len())
        .expect("a column is under 4 GiB: guest memory is 32-bit and tests stay small")
}

/// The handler's partition-local state. Get it from [`Context::state`](crate::Context::state).
///
/// Keys and values are bytes (`&str`, `&[u8]`, `Vec<u8>`, ... all work as keys). Reads see the batch's
/// own writes. Writes become durable together with the batch's outputs and offset, or not at all: if an
/// event fails, the host discards the whole batch's writes and re-runs the events before it.
///
/// The first read of a key in a batch asks the host; everything else (later reads, all writes) stays
/// in the guest until the batch ends. [`prefetch`](State::prefetch) loads many keys with one call.
///
/// Typed helpers store JSON ([`get_json`](State::get_json)/[`set_json`](State::set_json)) or a `u64` as
/// 8 little-endian bytes ([`get_u64`](State::get_u64)/[`set_u64`](State::set_u64)/[`add_u64`](State::add_u64)).
pub struct State<'a> {
    pub(crate) cache: &'a mut Cache,
    pub(crate) backend: &'a mut dyn Backend,
    /// Index of the event being handled, recorded on every write.
    pub(crate) writer: u32,
    /// The batch's key column, to recognise the events' own key slices.
    pub(crate) keys: BatchKeys<'a>,
    /// The handled event's key as (address, length); `(0, 0)`, which no slice has, outside `handle`.
    pub(crate) own_key: (usize, usize),
}

/// The batch's keys, column-wise.
#[derive(Clone, Copy)]
pub(crate) struct BatchKeys<'a> {
    pub keys: &'a [u8],
    pub key_ends: &'a [u32],
}

impl BatchKeys<'_> {
    /// Whether `key` is exactly the key slice of event `index`.
    #[inline]
    fn is_key_of(&self, key: &[u8], index: usize, start: usize) -> bool {
        let end = self.key_ends.get(index).map_or(usize::MAX, |&e| e as usize);
        key.as_ptr() as usize == self.keys.as_ptr() as usize + start
            && key.len() == end.wrapping_sub(start)
    }
}

impl State<'_> {
    /// Whether `key` is the handled event's own key slice.
    #[inline]
    fn is_own(&self, key: &[u8]) -> bool {
        (key.as_ptr() as usize, key.len()) == self.own_key
    }

    /// The entry of `key` remembered for the handled event, if `key` is its own key and it was looked up.
    #[inline]
    fn remembered(&self, own: bool) -> Option<usize> {
        if !own {
            return None;
        }
        match self.cache.own.get(self.writer as usize) {
            Some(&index) if index != EMPTY => Some(index as usize),
            _ => None,
        }
    }

    /// Remembers `index` as the handled event's own key's entry, if `key` was its own key.
    #[inline]
    fn remember(&mut self, own: bool, index: usize) -> usize {
        if own && let Some(slot) = self.cache.own.get_mut(self.writer as usize) {
            // `index` < entries.len(), which `insert` keeps below 2^31.
            *slot = index as u32;
        }
        index
    }

    /// The index of `key`'s entry (remembered, or found by hash), or the hash to insert it with.
    #[inline]
    fn find(&self, key: &[u8], own: bool) -> Result<usize, u64> {
        if let Some(index) = self.remembered(own) {
            return Ok(index);
        }
        let hash = hash(key);
        self.cache.find(key, hash).ok_or(hash)
    }

    /// The index of `key`'s entry, asking the host for its value if this batch has not seen it yet.
    #[inline]
    fn load(&mut self, key: &[u8]) -> usize {
        let own = self.is_own(key);
        let index = match self.find(key, own) {
            Ok(index) if self.cache.entries[index].loaded => index,
            Ok(index) => {
                let value = self.backend.get(key);
                let value = value.as_deref().map(|v| self.cache.push_value(v));
                let entry = &mut self.cache.entries[index];
                entry.value = value;
                entry.loaded = true;
                index
            }
            Err(hash) => {
                let value = self.backend.get(key);
                self.cache.insert(key, hash, value.as_deref(), true)
            }
        };
        self.remember(own, index)
    }

    /// The index of `key`'s entry, creating an empty one without asking the host (for blind writes).
    #[inline]
    fn entry(&mut self, key: &[u8]) -> usize {
        let own = self.is_own(key);
        let index = match self.find(key, own) {
            Ok(index) => index,
            Err(hash) => self.cache.insert(key, hash, None, false),
        };
        self.remember(own, index)
    }

    /// The value stored under `key`, if any.
    pub fn get(&mut self, key: impl AsRef<[u8]>) -> Option<&[u8]> {
        let index = self.load(key.as_ref());
        self.cache.value(index)
    }

    /// Whether a value is stored under `key`.
    pub fn contains(&mut self, key: impl AsRef<[u8]>) -> bool {
        self.get(key).is_some()
    }

    /// Stores `value` under `key`.
    pub fn set(&mut self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) {
        let index = self.entry(key.as_ref());
        self.cache.set_value(index, value.as_ref(), self.writer);
    }

    /// Removes `key` (a no-op if it is absent).
    pub fn delete(&mut self, key: impl AsRef<[u8]>) {
        let index = self.entry(key.as_ref());
        let entry = &mut self.cache.entries[index];
        entry.value = None;
        entry.loaded = true;
        entry.dirty = true;
        entry.writer = self.writer;
    }

    /// The JSON value under `key` parsed into `T`; `None` if absent, an error if it does not parse.
    pub fn get_json<T: DeserializeOwned>(
        &mut self,
        key: impl AsRef<[u8]>,
    ) -> Result<Option<T>, Error> {
        let key = key.as_ref();
        match self.get(key) {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice(bytes).map(Some).map_err(|e| {
                Error::msg(format!(
                    "state under {:?} is not the expected JSON: {e}",
                    String::from_utf8_lossy(key)
                ))
            }),
        }
    }

    /// Stores `value` as JSON under `key`.
    pub fn set_json<T: Serialize + ?Sized>(
        &mut self,
        key: impl AsRef<[u8]>,
        value: &T,
    ) -> Result<(), Error> {
        let mut scratch = std::mem::take(&mut self.cache.scratch);
        scratch.clear();
        let result = serde_json::to_writer(&mut scratch, value);
        if result.is_ok() {
            self.set(key, &scratch);
        }
        self.cache.scratch = scratch;
        result.map_err(|e| Error::msg(format!("cannot encode state as JSON: {e}")))
    }

    /// The `u64` under `key` (8 little-endian bytes); `None` if absent, an error if the value is not 8
    /// bytes long.
    pub fn get_u64(&mut self, key: impl AsRef<[u8]>) -> Result<Option<u64>, Error> {
        let key = key.as_ref();
        match self.get(key) {
            None => Ok(None),
            Some(bytes) => decode_u64(bytes)
                .map(Some)
                .ok_or_else(|| not_u64(key, bytes)),
        }
    }

    /// Stores `value` under `key` as 8 little-endian bytes.
    pub fn set_u64(&mut self, key: impl AsRef<[u8]>, value: u64) {
        self.set(key, value.to_le_bytes());
    }

    /// Adds `delta` to the `u64` counter under `key` (absent counts as 0) and returns the new count; an
    /// error if the value is not a `u64` or the sum overflows.
    pub fn add_u64(&mut self, key: impl AsRef<[u8]>, delta: u64) -> Result<u64, Error> {
        let key = key.as_ref();
        let index = self.load(key);
        let current = match self.cache.value(index) {
            None => 0,
            Some(bytes) => decode_u64(bytes).ok_or_else(|| not_u64(key, bytes))?,
        };
        let next = current.checked_add(delta).ok_or_else(|| {
            Error::msg(format!(
                "counter under {:?} would overflow u64",
                String::from_utf8_lossy(key)
            ))
        })?;
        self.cache
            .set_value(index, &next.to_le_bytes(), self.writer);
        Ok(next)
    }

    /// Loads every key of `keys` that this batch has not seen yet with one `get-many` host call, so that
    /// the reads that follow stay in the guest. Call it from
    /// [`Handler::prefetch`](crate::Handler::prefetch).
    pub fn prefetch<K: AsRef<[u8]>>(&mut self, keys: impl IntoIterator<Item = K>) {
        // Placeholders enter the cache at once, which also drops duplicate keys from the request.
        let mut wanted = Columns::default();
        let mut indexes = Vec::new();
        // The usual argument is every event's key in order (`events.map(|e| e.key())`): while the
        // n-th key is event n's own, its entry is remembered for the event's `handle`.
        let mut in_order = true;
        let mut start = 0;
        for (n, key) in keys.into_iter().enumerate() {
            let key = key.as_ref();
            let hash = hash(key);
            let index = match self.cache.find(key, hash) {
                Some(index) => index,
                None => {
                    wanted.push_key(key);
                    let index = self.cache.insert(key, hash, None, false);
                    indexes.push(index);
                    index
                }
            };
            in_order = in_order && self.keys.is_key_of(key, n, start);
            if in_order && let Some(slot) = self.cache.own.get_mut(n) {
                // `index` < entries.len(), which `insert` keeps below 2^31.
                *slot = index as u32;
            }
            start = start.saturating_add(key.len());
        }
        if indexes.is_empty() {
            return;
        }
        let (values, value_ends, found) = self.backend.get_many(&wanted.keys, &wanted.key_ends);
        // A short or inconsistent answer (a host bug) leaves the keys it does not cover unloaded: a later
        // read asks for them one by one.
        let mut start = 0;
        for ((&index, &end), &found) in indexes.iter().zip(&value_ends).zip(&found) {
            let Some(value) = values.get(start as usize..end as usize) else {
                break;
            };
            start = end;
            let value = found.then(|| self.cache.push_value(value));
            let entry = &mut self.cache.entries[index];
            entry.value = value;
            entry.loaded = true;
        }
    }
}

#[inline]
fn decode_u64(bytes: &[u8]) -> Option<u64> {
    bytes.try_into().ok().map(u64::from_le_bytes)
}

fn not_u64(key: &[u8], bytes: &[u8]) -> Error {
    Error::msg(format!(
        "state under {:?} is not a u64: {} bytes instead of 8",
        String::from_utf8_lossy(key),
        bytes.len()
    ))
}

#[cfg(test)]
mod tests {
    use crate::testing::TestDriver;
    use crate::{Context, Event, Events, Handler, Result, State};

    /// Counts under each event's key and, separately, under a copy of it; prefetches the keys in the
    /// given order, or a copy of each.
    struct Twice {
        order: Order,
    }

    #[derive(Clone, Copy)]
    enum Order {
        Events,
        Reversed,
        Copies,
    }

    impl Handler for Twice {
        fn prefetch(&mut self, events: Events<'_>, state: &mut State<'_>) {
            let keys: Vec<&[u8]> = events.map(|e| e.key()).collect();
            match self.order {
                Order::Events => state.prefetch(keys.iter().copied()),
                Order::Reversed => state.prefetch(keys.iter().rev().copied()),
                Order::Copies => state.prefetch(keys.iter().map(|k| k.to_vec())),
            }
        }

        fn handle(&mut self, event: &Event<'_>, ctx: &mut Context<'_>) -> Result {
            let own = ctx.state().add_u64(event.key(), 1)?;
            let mut copy = b"copy-".to_vec();
            copy.extend_from_slice(event.key());
            let copied = ctx.state().add_u64(&copy, 10)?;
            // The own key again, through a copy of the slice: the same entry either way.
            #[allow(clippy::unnecessary_to_owned)]
            let again = ctx.state().get_u64(event.key().to_vec())?;
            ctx.emit_with(0, event.key(), |w| {
                w.push_decimal(own);
                w.push(b'/');
                w.push_decimal(copied);
                w.push(b'/');
                w.push_decimal(again.unwrap_or(0));
            });
            Ok(())
        }
    }

    #[test]
    fn remembered_entries_give_the_same_counts_whatever_the_prefetch_order() {
        let events = ["a", "b", "", "a", "", "b", "a", "c"];
        for order in [Order::Events, Order::Reversed, Order::Copies] {
            let mut driver = TestDriver::new(Twice { order });
            // The reference: a plain map of counts.
            let mut counts = std::collections::BTreeMap::<&str, u64>::new();
            for _ in 0..2 {
                let batch: Vec<(&str, &str)> = events.iter().map(|&k| (k, "v")).collect();
                let records = driver.send_batch(batch).expect("counting never fails");
                let got: Vec<&str> = records.iter().map(|r| r.value_str()).collect();
                let want: Vec<String> = events
                    .iter()
                    .map(|&k| {
                        let n = counts.entry(k).or_default();
                        *n += 1;
                        format!("{n}/{}/{n}", *n * 10)
                    })
                    .collect();
                assert_eq!(got, want);
            }
            assert_eq!(driver.state().get_u64("a"), Some(6));
            assert_eq!(driver.state().get_u64("copy-a"), Some(60));
            assert_eq!(driver.state().get_u64(""), Some(4));
        }
    }

    /// Stores each event's value under its key, or deletes the key when the value is `-`.
    #[derive(Default)]
    struct Put;

    impl Handler for Put {
        fn handle(&mut self, event: &Event<'_>, ctx: &mut Context<'_>) -> Result {
            if event.value() == b"-" {
                ctx.state().delete(event.key());
            } else {
                ctx.state().set(event.key(), event.value());
            }
            Ok(())
        }
    }

    #[test]
    fn the_test_driver_refuses_writes_that_grow_the_state_past_max_state_bytes() {
        const REFUSED: &str = "state write refused: partition state would grow to";
        // One event per batch: each write is checked against the state before it.
        let mut driver = TestDriver::new(Put).max_state_bytes(10);
        assert!(driver.send("a", "1234").is_ok()); // 5 bytes
        let refused = driver.send("b", "12345").expect_err("11 bytes");
        assert_eq!(
            refused.message,
            format!("{REFUSED} 11 bytes; the limit is 10 bytes (max_state_bytes)")
        );
        assert!(driver.send("a", "123").is_ok()); // shrinks: 4
        assert!(driver.send("c", "12").is_ok()); // 7
        assert!(driver.send("a", "-").is_ok()); // a delete always passes: 3
        assert!(driver.send("d", "1234").is_ok()); // 8
        assert_eq!(driver.state().get("b"), None);

        // A batch is checked by its net writes, deletes first: dropping `a` makes room for `e`.
        let mut driver = TestDriver::new(Put).max_state_bytes(8);
        driver.state_mut().set("a", "1234");
        let outcome = driver.process_batch([("a", "-"), ("e", "1234")]);
        assert!(
            outcome.dead_letters.is_empty(),
            "{:?}",
            outcome.dead_letters
        );
        // Its net state over the limit: the earliest event whose write is refused alone is blamed,
        // and the events before it are committed without it.
        let outcome = driver.process_batch([("f", "1"), ("g", "1"), ("h", "1")]);
        let dead: Vec<u32> = outcome.dead_letters.iter().map(|d| d.index).collect();
        // (`e` holds 5 bytes; `f` makes 7 of 8; `g` and then `h` would each make 9.)
        assert_eq!(dead, [1, 2], "{:?}", outcome.dead_letters);
        assert_eq!(driver.state().get("f"), Some(b"1".as_slice()));
        assert_eq!(driver.state().get("g"), None);

        // Over the limit already (as after lowering it), a write that does not grow the state passes.
        let mut driver = TestDriver::new(Put).max_state_bytes(4);
        driver.state_mut().set("k", "123456");
        assert!(driver.send("k", "12345").is_ok());
        assert!(driver.send("k", "1234567").is_err());
    }
}
