//! Per-event views over a columnar batch.
//!
//! The host hands a batch over as columns (all keys in one blob plus end offsets, and so on: see
//! `wit/procd.wit`). An [`Event`] is a handful of slices into those columns: building one copies no
//! bytes and allocates nothing, which is what makes the boundary cheap.
//!
//! The values column is the exception: it is not in the batch but fetched from the host ([`Values`])
//! the first time any event's value is read, then kept for the rest of the batch. A handler that never
//! reads a value never has one copied into its memory.
//!
//! The columns come from the host and are checked here, not trusted: an end offset out of range or going
//! backwards fails that event (it reaches the dead-letter log with a message naming the column) instead
//! of panicking inside the guest. A value's range can only be checked against the values once they are
//! fetched, inside [`Event::value`], which cannot fail: a host that sent values not matching its
//! `value-ends` gets a panic (a trap) saying so.

use std::cell::OnceCell;
use std::fmt;

use serde::Deserialize;

use crate::Error;

/// The values column of the batch being handled: fetched with `fetch` (the `input.values` import on
/// wasm, the test driver natively) on first use, then kept for the rest of the batch.
pub(crate) struct Values<'a> {
    blob: OnceCell<Vec<u8>>,
    fetch: &'a dyn Fn() -> Vec<u8>,
}

impl<'a> Values<'a> {
    /// Values that `fetch` will deliver when first needed.
    pub fn new(fetch: &'a dyn Fn() -> Vec<u8>) -> Self {
        Values {
            blob: OnceCell::new(),
            fetch,
        }
    }

    /// All values of the batch, fetching them if this is the first use.
    #[inline]
    pub fn get(&self) -> &[u8] {
        self.blob.get_or_init(self.fetch)
    }

    /// All values of the batch if they were fetched already; never fetches.
    #[inline]
    pub fn fetched(&self) -> Option<&[u8]> {
        self.blob.get().map(Vec::as_slice)
    }
}

/// The columns of one input batch, borrowed from wherever they live (the lifted WIT record on wasm, the
/// test driver natively).
#[derive(Clone, Copy)]
pub(crate) struct Columns<'a> {
    pub partition: u32,
    pub offsets: &'a [u64],
    pub timestamps_ms: &'a [u64],
    pub keys: &'a [u8],
    pub key_ends: &'a [u32],
    pub values: &'a Values<'a>,
    pub value_ends: &'a [u32],
    pub headers: &'a [u8],
    pub header_ends: &'a [u32],
}

impl<'a> Columns<'a> {
    /// How many events the batch holds: one per offset.
    pub fn len(&self) -> usize {
        self.offsets.len()
    }

    /// The size of the values column, as `value-ends` says (so without fetching it).
    pub fn value_bytes(&self) -> usize {
        self.value_ends.last().map_or(0, |&end| end as usize)
    }

    /// A cursor over the events, from the first.
    pub fn cursor(&self) -> Cursor<'a> {
        Cursor {
            columns: *self,
            index: 0,
            key_start: 0,
            value_start: 0,
            header_start: 0,
        }
    }
}

/// Walks a batch event by event, carrying each column's running start offset so every step reads one end
/// per column.
pub(crate) struct Cursor<'a> {
    columns: Columns<'a>,
    index: usize,
    key_start: u32,
    value_start: u32,
    header_start: u32,
}

impl<'a> Cursor<'a> {
    /// The next event, `None` past the last, or an error naming the column whose end offset is invalid.
    #[inline]
    pub fn next_event(&mut self) -> Option<Result<Event<'a>, String>> {
        let i = self.index;
        let offset = *self.columns.offsets.get(i)?;
        Some(self.view(i, offset))
    }

    #[inline]
    fn view(&mut self, i: usize, offset: u64) -> Result<Event<'a>, String> {
        let c = self.columns;
        let missing = |column: &str| {
            format!("malformed batch from the host: `{column}` has no entry for event {i}")
        };
        let timestamp_ms = *c
            .timestamps_ms
            .get(i)
            .ok_or_else(|| missing("timestamps-ms"))?;
        let key_end = *c.key_ends.get(i).ok_or_else(|| missing("key-ends"))?;
        let value_end = *c.value_ends.get(i).ok_or_else(|| missing("value-ends"))?;
        let header_end = *c.header_ends.get(i).ok_or_else(|| missing("header-ends"))?;
        let key = slice(c.keys, self.key_start, key_end, "key", i)?;
        let value_start = self.value_start;
        if value_end < value_start {
            return Err(format!(
                "malformed batch from the host: event {i}'s value spans {}..{value_end}, which goes backwards",
                self.value_start
            ));
        }
        let headers = slice(c.headers, self.header_start, header_end, "header", i)?;
        self.index = i + 1;
        self.key_start = key_end;
        self.value_start = value_end;
        self.header_start = header_end;
        Ok(Event {
            key,
            values: c.values,
            value_start,
            value_end,
            headers,
            offset,
            timestamp_ms,
            partition: c.partition,
            // The batch came through a `list<u64>` in 32-bit guest memory (or the test driver, which
            // caps batches), so its length fits in u32.
            index: i as u32,
        })
    }
}

#[inline]
fn slice<'a>(
    blob: &'a [u8],
    start: u32,
    end: u32,
    column: &str,
    i: usize,
) -> Result<&'a [u8], String> {
    blob.get(start as usize..end as usize).ok_or_else(|| {
        format!(
            "malformed batch from the host: event {i}'s {column} spans {start}..{end} but `{column}s` holds {} bytes",
            blob.len()
        )
    })
}

/// One event of the batch being handled: zero-copy views into the batch's columns.
///
/// An event without a key has an empty [`key`](Event::key); there is no other marker for "no key". Its
/// value is fetched from the host, with every other value of the batch, the first time any event's
/// value is read; [`Context::forward`](crate::Context::forward) emits an event without reading it.
#[derive(Clone, Copy)]
pub struct Event<'a> {
    key: &'a [u8],
    /// The batch's values; this event's is `value_start..value_end` of them.
    values: &'a Values<'a>,
    value_start: u32,
    value_end: u32,
    headers: &'a [u8],
    offset: u64,
    timestamp_ms: u64,
    partition: u32,
    index: u32,
}

impl<'a> Event<'a> {
    /// The event's key; empty when the event has none.
    #[inline]
    pub fn key(&self) -> &'a [u8] {
        self.key
    }

    /// The key as UTF-8, or an error if it is not.
    pub fn key_str(&self) -> Result<&'a str, Error> {
        std::str::from_utf8(self.key)
            .map_err(|e| Error::msg(format!("event key is not UTF-8: {e}")))
    }

    /// The event's value (a JSON value is its UTF-8 text).
    ///
    /// The first read of any value in a batch fetches all of the batch's values from the host in one
    /// call (one copy into the handler's memory); later reads cost nothing more.
    #[inline]
    pub fn value(&self) -> &'a [u8] {
        let values = self.values.get();
        match values.get(self.value_start as usize..self.value_end as usize) {
            Some(value) => value,
            None => self.malformed_values(values.len()),
        }
    }

    /// The host sent values that do not match its `value-ends`: a broken contract, not a bad event, and
    /// [`value`](Event::value) cannot fail, so this traps with the reason (the panic hook logs it).
    #[cold]
    #[inline(never)]
    fn malformed_values(&self, len: usize) -> ! {
        panic!(
            "procd-sdk: malformed batch from the host: event {}'s value spans {}..{} but the batch's \
             values hold {len} bytes",
            self.index, self.value_start, self.value_end
        )
    }

    /// This event's value's place in the batch's values column, `(start, end)`.
    #[inline]
    pub(crate) fn value_range(&self) -> (u32, u32) {
        (self.value_start, self.value_end)
    }

    /// The value as UTF-8, or an error if it is not.
    pub fn value_str(&self) -> Result<&'a str, Error> {
        std::str::from_utf8(self.value())
            .map_err(|e| Error::msg(format!("event value is not UTF-8: {e}")))
    }

    /// The value parsed as JSON into `T` (which may borrow from the value), or an error saying why not.
    pub fn json<T: Deserialize<'a>>(&self) -> Result<T, Error> {
        serde_json::from_slice(self.value())
            .map_err(|e| Error::msg(format!("event value is not the expected JSON: {e}")))
    }

    /// The event's offset in its partition of the input topic.
    #[inline]
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Log-append time, milliseconds since the Unix epoch. Use it instead of a clock: handlers have none.
    #[inline]
    pub fn timestamp_ms(&self) -> u64 {
        self.timestamp_ms
    }

    /// The partition of the input topic the event belongs to (and whose state the handler sees).
    #[inline]
    pub fn partition(&self) -> u32 {
        self.partition
    }

    /// The event's position in the batch being handled (not its offset).
    #[inline]
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The event's headers, in the order they were given.
    pub fn headers(&self) -> Headers<'a> {
        Headers { rest: self.headers }
    }

    /// The value of the first header named `name`, compared ASCII-case-insensitively (like HTTP).
    pub fn header(&self, name: &str) -> Option<&'a str> {
        self.headers()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }
}

impl fmt::Debug for Event<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Event")
            .field("offset", &self.offset)
            .field("partition", &self.partition)
            .field("timestamp_ms", &self.timestamp_ms)
            .field("key", &String::from_utf8_lossy(self.key))
            .field("value", &String::from_utf8_lossy(self.value()))
            .field("headers", &self.headers().collect::<Vec<_>>())
            .finish()
    }
}

/// Iterator over an event's headers as `(name, value)`, parsed lazily from the batch's header column.
///
/// Iteration stops early at a malformed entry (which the host never produces).
#[derive(Clone)]
pub struct Headers<'a> {
    rest: &'a [u8],
}

impl<'a> Headers<'a> {
    fn take_str(&mut self) -> Option<&'a str> {
        let (len, rest) = self.rest.split_first_chunk::<4>()?;
        let len = u32::from_le_bytes(*len) as usize;
        if rest.len() < len {
            return None;
        }
        let (bytes, rest) = rest.split_at(len);
        self.rest = rest;
        std::str::from_utf8(bytes).ok()
    }
}

impl<'a> Iterator for Headers<'a> {
    type Item = (&'a str, &'a str);

    fn next(&mut self) -> Option<Self::Item> {
        let pair = self.take_str().zip(self.take_str());
        if pair.is_none() {
            self.rest = &[];
        }
        pair
    }
}

impl fmt::Debug for Headers<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.clone()).finish()
    }
}

/// The events of the batch about to be handled, for [`Handler::prefetch`](crate::Handler::prefetch).
///
/// Stops at the first malformed event (which the host never produces).
pub struct Events<'a> {
    cursor: Cursor<'a>,
}

impl<'a> Events<'a> {
    pub(crate) fn new(columns: &Columns<'a>) -> Self {
        Events {
            cursor: columns.cursor(),
        }
    }
}

impl<'a> Iterator for Events<'a> {
    type Item = Event<'a>;

    fn next(&mut self) -> Option<Event<'a>> {
        self.cursor.next_event()?.ok()
    }
}

/// Appends one event's headers to a header column in the WIT encoding
/// (`name-len: u32 LE, name, value-len: u32 LE, value` per pair).
#[cfg(any(not(target_arch = "wasm32"), doc))]
pub(crate) fn encode_headers<'h>(
    out: &mut Vec<u8>,
    headers: impl IntoIterator<Item = (&'h str, &'h str)>,
) {
    for (name, value) in headers {
        for s in [name, value] {
            let len = u32::try_from(s.len()).expect("a test header is under 4 GiB");
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::cell::Cell;

    /// Fetches `blob`, counting how often.
    struct Host {
        blob: &'static [u8],
        fetches: Cell<u32>,
    }

    impl Host {
        fn new(blob: &'static [u8]) -> Self {
            Host {
                blob,
                fetches: Cell::new(0),
            }
        }

        fn fetch(&self) -> Vec<u8> {
            self.fetches.set(self.fetches.get() + 1);
            self.blob.to_vec()
        }
    }

    /// Binds `$name` to [`Values`] that `$host` (a [`Host`]) serves on first use.
    macro_rules! lazy {
        ($name:ident, $host:expr) => {
            let fetch = || $host.fetch();
            let $name = Values::new(&fetch);
        };
    }

    fn columns<'a>(
        keys: &'a [u8],
        key_ends: &'a [u32],
        values: &'a Values<'a>,
        value_ends: &'a [u32],
    ) -> Columns<'a> {
        Columns {
            partition: 3,
            offsets: &[10, 11],
            timestamps_ms: &[100, 101],
            keys,
            key_ends,
            values,
            value_ends,
            headers: &[],
            header_ends: &[0, 0],
        }
    }

    #[test]
    fn views_slice_the_columns() {
        let host = Host::new(b"xyz");
        lazy!(values, host);
        let c = columns(b"ab", &[1, 1], &values, &[2, 3]);
        let mut cursor = c.cursor();
        let e = cursor
            .next_event()
            .expect("two events")
            .expect("well formed");
        assert_eq!(
            (
                e.key(),
                e.value(),
                e.offset(),
                e.timestamp_ms(),
                e.partition(),
                e.index()
            ),
            (&b"a"[..], &b"xy"[..], 10, 100, 3, 0)
        );
        let e = cursor
            .next_event()
            .expect("two events")
            .expect("well formed");
        assert_eq!(
            (e.key(), e.value(), e.offset(), e.index()),
            (&b""[..], &b"z"[..], 11, 1)
        );
        assert!(cursor.next_event().is_none());
    }

    #[test]
    fn bad_ends_fail_the_event_instead_of_panicking() {
        let host = Host::new(b"xyz");
        lazy!(values, host);
        let c = columns(b"ab", &[1, 9], &values, &[2, 3]);
        let mut cursor = c.cursor();
        assert!(matches!(cursor.next_event(), Some(Ok(_))));
        let err = cursor
            .next_event()
            .expect("second event")
            .expect_err("key end 9 is past the blob");
        assert!(err.contains("event 1's key spans 1..9"), "{err}");

        let host = Host::new(b"xyz");
        lazy!(values, host);
        let backwards = columns(b"ab", &[2, 1], &values, &[2, 3]);
        let mut cursor = backwards.cursor();
        assert!(matches!(cursor.next_event(), Some(Ok(_))));
        assert!(matches!(cursor.next_event(), Some(Err(_))));

        let host = Host::new(b"xyz");
        lazy!(values, host);
        let short = Columns {
            value_ends: &[2],
            ..columns(b"ab", &[1, 2], &values, &[2, 3])
        };
        let mut cursor = short.cursor();
        assert!(matches!(cursor.next_event(), Some(Ok(_))));
        let err = cursor
            .next_event()
            .expect("second event")
            .expect_err("no value end for event 1");
        assert!(
            err.contains("`value-ends` has no entry for event 1"),
            "{err}"
        );
    }

    #[test]
    fn headers_parse_lazily_and_match_case_insensitively() {
        let mut blob = Vec::new();
        encode_headers(
            &mut blob,
            [("Content-Type", "application/json"), ("x-a", "1")],
        );
        let end = u32::try_from(blob.len()).expect("small");
        let host = Host::new(b"");
        lazy!(values, host);
        let c = Columns {
            headers: &blob,
            header_ends: &[end, end],
            ..columns(b"", &[0, 0], &values, &[0, 0])
        };
        let e = c
            .cursor()
            .next_event()
            .expect("one event")
            .expect("well formed");
        assert_eq!(
            e.headers().collect::<Vec<_>>(),
            [("Content-Type", "application/json"), ("x-a", "1")]
        );
        assert_eq!(e.header("content-type"), Some("application/json"));
        assert_eq!(e.header("missing"), None);

        let truncated = Headers {
            rest: &blob[..blob.len() - 1],
        };
        assert_eq!(truncated.count(), 1);
    }

    #[test]
    fn json_errors_say_what_was_expected() {
        let host = Host::new(b"{\"a\":1}x");
        lazy!(values, host);
        let c = columns(b"", &[0, 0], &values, &[7, 8]);
        let mut cursor = c.cursor();
        let e = cursor.next_event().expect("event").expect("well formed");
        let v: serde_json::Value = e.json().expect("valid JSON");
        assert_eq!(v["a"], 1);
        let e = cursor.next_event().expect("event").expect("well formed");
        let err = e.json::<serde_json::Value>().expect_err("`x` is not JSON");
        assert!(
            err.message()
                .starts_with("event value is not the expected JSON"),
            "{err}"
        );
    }

    #[test]
    fn values_are_fetched_once_on_first_read_and_never_without_one() {
        let host = Host::new(b"xyz");
        lazy!(values, host);
        let c = columns(b"ab", &[1, 2], &values, &[2, 3]);
        let mut cursor = c.cursor();
        let first = cursor.next_event().expect("event").expect("well formed");
        let second = cursor.next_event().expect("event").expect("well formed");
        assert_eq!((first.key(), second.key()), (&b"a"[..], &b"b"[..]));
        assert_eq!(host.fetches.get(), 0, "keys and views need no values");
        assert!(values.fetched().is_none());
        assert_eq!(second.value(), b"z");
        assert_eq!(first.value_str().ok(), Some("xy"));
        assert_eq!(host.fetches.get(), 1, "one fetch serves the whole batch");
        assert_eq!(first.value_range(), (0, 2));
    }

    #[test]
    fn value_ends_going_backwards_fail_the_event_without_a_fetch() {
        let host = Host::new(b"xyz");
        lazy!(values, host);
        let c = columns(b"", &[0, 0], &values, &[2, 1]);
        let mut cursor = c.cursor();
        assert!(matches!(cursor.next_event(), Some(Ok(_))));
        let err = cursor
            .next_event()
            .expect("second event")
            .expect_err("value end 1 is before 2");
        assert!(err.contains("event 1's value spans 2..1"), "{err}");
        assert_eq!(host.fetches.get(), 0);
    }

    #[test]
    #[should_panic(expected = "event 1's value spans 2..9 but the batch's values hold 3 bytes")]
    fn values_shorter_than_their_ends_trap_on_read() {
        let host = Host::new(b"xyz");
        lazy!(values, host);
        let c = columns(b"", &[0, 0], &values, &[2, 9]);
        let mut cursor = c.cursor();
        let _ = cursor.next_event();
        let e = cursor.next_event().expect("event").expect("ends ascend");
        let _ = e.value();
    }
}
