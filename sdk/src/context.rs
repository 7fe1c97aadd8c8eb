//! What a handler can do while handling an event: emit records, use state, read config, log.

use std::fmt;
use std::io;

use serde::Serialize;

use crate::event::Values;
use crate::state::{State, end};
use crate::{Config, Error, Event, Level};

/// The records a batch emits, column-wise, exactly as `output-batch` in the WIT: emitting appends to
/// these vectors and nothing else, and on wasm they are handed to the host without a copy.
#[derive(Default, Debug)]
pub(crate) struct Outputs {
    pub topics: Vec<u16>,
    pub keys: Vec<u8>,
    pub key_ends: Vec<u32>,
    pub values: Vec<u8>,
    pub value_ends: Vec<u32>,
    /// Per record: 0, or 1 + the index of the input event whose value it forwards (`value-sources`).
    pub value_sources: Vec<u32>,
    /// Per record: the same for its key (`key-sources`).
    pub key_sources: Vec<u32>,
    /// The event being handled: emitting its very key or value slice forwards it instead of copying it.
    pub current: Current,
}

/// Where the event being handled lives: its key's (address, length), its value's (start, end) in the
/// batch's values column (whose address is only known once they are fetched), and its source number
/// (1 + its index in the batch; 0 before the first event).
#[derive(Default, Debug, Clone, Copy)]
pub(crate) struct Current {
    pub key: (usize, usize),
    pub value: (u32, u32),
    pub source: u32,
}

impl Current {
    /// The source number if `bytes` is exactly the slice at `at`, else 0.
    #[inline]
    fn source_of(&self, bytes: &[u8], at: (usize, usize)) -> u32 {
        if bytes.as_ptr() as usize == at.0 && bytes.len() == at.1 {
            self.source
        } else {
            0
        }
    }
}

impl Outputs {
    /// Room for one output per input event of the input's sizes: a map or passthrough handler never
    /// grows the vectors. (The canonical ABI shrinks them to size when they are returned.)
    pub fn with_capacity(events: usize, key_bytes: usize, value_bytes: usize) -> Self {
        Outputs {
            topics: Vec::with_capacity(events),
            keys: Vec::with_capacity(key_bytes),
            key_ends: Vec::with_capacity(events),
            values: Vec::with_capacity(value_bytes),
            value_ends: Vec::with_capacity(events),
            value_sources: Vec::with_capacity(events),
            key_sources: Vec::with_capacity(events),
            current: Current::default(),
        }
    }

    /// Appends a record's value: the event being handled's own value (the same memory, as in
    /// `ctx.emit(0, event.key(), event.value())`) is forwarded by reference, anything else copied.
    /// `input` is the batch's values if they were fetched: if not, `value` cannot be one of them.
    #[inline]
    fn push_value(&mut self, value: &[u8], input: Option<&[u8]>) {
        let source = match input {
            Some(input) => {
                let (start, end) = self.current.value;
                let at = input.as_ptr() as usize + start as usize;
                self.current
                    .source_of(value, (at, end.saturating_sub(start) as usize))
            }
            None => 0,
        };
        if source == 0 {
            self.values.extend_from_slice(value);
        }
        self.end_value(source);
    }

    /// Starts a record: its output and its key, forwarded like values.
    #[inline]
    fn push_key(&mut self, output: u16, key: &[u8]) {
        self.topics.push(output);
        let source = self.current.source_of(key, self.current.key);
        if source == 0 {
            self.keys.extend_from_slice(key);
        }
        self.key_ends.push(end(&self.keys));
        self.key_sources.push(source);
    }

    /// Appends a record that is input event `source - 1` itself: its key and value by reference.
    #[inline]
    fn push_forwarded(&mut self, output: u16, source: u32) {
        self.topics.push(output);
        self.key_ends.push(end(&self.keys));
        self.key_sources.push(source);
        self.end_value(source);
    }

    #[inline]
    fn end_value(&mut self, source: u32) {
        self.value_ends.push(end(&self.values));
        self.value_sources.push(source);
    }

    /// Drops a record whose key was pushed but whose value could not be written.
    fn abandon_key(&mut self) {
        self.topics.pop();
        self.key_ends.pop();
        self.key_sources.pop();
        let key_end = self.key_ends.last().map_or(0, |&e| e as usize);
        self.keys.truncate(key_end);
    }
}

/// The handler's view of the batch being handled: emit records, read and write state, read the
/// configuration, log. One `Context` serves every event of a batch.
pub struct Context<'a> {
    pub(crate) outputs: &'a mut Outputs,
    /// The batch's values, to tell whether an emitted value is the handled event's own.
    pub(crate) values: &'a Values<'a>,
    pub(crate) state: State<'a>,
    pub(crate) config: &'a Config,
    pub(crate) partition: u32,
}

impl<'a> Context<'a> {
    /// Emits a record to output `output`: the index of a topic in the output topics declared at deploy
    /// time (0 for the first). An empty `key` means "no key". Every output goes to the same partition
    /// of its output topic as the input event (so a batch's effects commit atomically in one cell).
    ///
    /// Passing the handled event's own `event.key()` or `event.value()` (the same slice, not a copy)
    /// forwards it: the bytes do not cross the boundary again. But `event.value()` reads the value,
    /// which fetches the batch's values into the handler; to emit an event unchanged without that, use
    /// [`forward`](Context::forward).
    #[inline]
    pub fn emit(&mut self, output: u16, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) {
        self.outputs.push_key(output, key.as_ref());
        self.outputs
            .push_value(value.as_ref(), self.values.fetched());
    }

    /// Emits `event` unchanged (its key and its value) to output `output`, by reference: the host
    /// writes the input event's own key and value (and keeps the value's kind, JSON or raw). It is
    /// `emit(output, event.key(), event.value())` without reading the value, so a handler that only
    /// forwards or drops events never has the batch's values copied into its memory.
    #[inline]
    pub fn forward(&mut self, output: u16, event: &Event<'_>) {
        // Events come from a batch of at most u32::MAX events, so 1 + index does not overflow.
        self.outputs.push_forwarded(output, event.index() + 1);
    }

    /// Emits a record whose value is `value` serialized as JSON, written straight into the output column.
    /// On a serialization error nothing is emitted.
    pub fn emit_json<T: Serialize + ?Sized>(
        &mut self,
        output: u16,
        key: impl AsRef<[u8]>,
        value: &T,
    ) -> Result<(), Error> {
        self.outputs.push_key(output, key.as_ref());
        let start = self.outputs.values.len();
        match serde_json::to_writer(&mut self.outputs.values, value) {
            Ok(()) => {
                self.outputs.end_value(0);
                Ok(())
            }
            Err(e) => {
                self.outputs.values.truncate(start);
                self.outputs.abandon_key();
                Err(Error::msg(format!("cannot encode output as JSON: {e}")))
            }
        }
    }

    /// Emits a record whose value `write` appends straight into the output column through a
    /// [`ValueWriter`], with no intermediate buffer: `ctx.emit_with(0, key, |w| w.push_decimal(n))`.
    #[inline]
    pub fn emit_with(
        &mut self,
        output: u16,
        key: impl AsRef<[u8]>,
        write: impl FnOnce(&mut ValueWriter<'_>),
    ) {
        self.outputs.push_key(output, key.as_ref());
        write(&mut ValueWriter {
            values: &mut self.outputs.values,
        });
        self.outputs.end_value(0);
    }

    /// The handler's partition-local state (see [`State`]).
    #[inline]
    pub fn state(&mut self) -> &mut State<'a> {
        &mut self.state
    }

    /// The value of configuration key `key`, if it was given at deploy time.
    pub fn config(&self, key: &str) -> Option<&'a str> {
        self.config.get(key)
    }

    /// The whole deploy-time configuration.
    pub fn config_all(&self) -> &'a Config {
        self.config
    }

    /// The partition being handled (of the input topic; its state is this partition's).
    pub fn partition(&self) -> u32 {
        self.partition
    }

    /// Writes a line to the host's log (rate-limited by the host). The [`info!`](crate::info)-style
    /// macros do the same with `format!` arguments.
    pub fn log(&self, level: Level, message: &str) {
        crate::log(level, message);
    }
}

impl fmt::Debug for Context<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Context")
            .field("partition", &self.partition)
            .field("emitted", &self.outputs.topics.len())
            .finish_non_exhaustive()
    }
}

/// Appends one output value in place; handed out by [`Context::emit_with`]. It can only append to the
/// value being written, never touch earlier records.
pub struct ValueWriter<'a> {
    values: &'a mut Vec<u8>,
}

impl ValueWriter<'_> {
    /// Appends bytes.
    #[inline]
    pub fn extend_from_slice(&mut self, bytes: &[u8]) {
        self.values.extend_from_slice(bytes);
    }

    /// Appends one byte.
    #[inline]
    pub fn push(&mut self, byte: u8) {
        self.values.push(byte);
    }

    /// Appends the decimal digits of `n`, without going through `fmt`.
    pub fn push_decimal(&mut self, n: u64) {
        if n < 100_000_000 {
            // Up to eight digits: built in one little-endian word and appended as a fixed 8 bytes, then
            // cut to length. A copy of unknown length would be a `memory.copy`, a call into the host.
            let (mut m, mut word, mut len) = (n as u32, 0u64, 0);
            loop {
                word = (word << 8) | u64::from(b'0' + (m % 10) as u8);
                len += 1;
                m /= 10;
                if m == 0 {
                    break;
                }
            }
            let at = self.values.len();
            self.values.extend_from_slice(&word.to_le_bytes());
            self.values.truncate(at + len);
            return;
        }
        let mut digits = [0u8; 20];
        let mut start = digits.len();
        // wasm has no 128-bit multiply, so a u64 division by 10 stays a real division (tens of cycles
        // each); below 2^32, u32 arithmetic lets the compiler divide by multiplying.
        let mut n = n;
        while n > u64::from(u32::MAX) {
            start -= 1;
            digits[start] = b'0' + (n % 10) as u8;
            n /= 10;
        }
        let mut m = n as u32;
        loop {
            start -= 1;
            digits[start] = b'0' + (m % 10) as u8;
            m /= 10;
            if m == 0 {
                break;
            }
        }
        self.values.extend_from_slice(&digits[start..]);
    }
}

impl io::Write for ValueWriter<'_> {
    #[inline]
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.values.extend_from_slice(buf);
        Ok(buf.len())
    }

    #[inline]
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.values.extend_from_slice(buf);
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl fmt::Write for ValueWriter<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.values.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

impl fmt::Debug for ValueWriter<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ValueWriter").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::{Current, Outputs, ValueWriter};

    #[test]
    fn decimals_match_the_formatter_at_every_length() {
        let mut values = b"x".to_vec();
        let mut want = "x".to_string();
        let mut n = 0u64;
        for _ in 0..20 {
            for m in [n, n + 1, n.saturating_mul(10).saturating_sub(1)] {
                ValueWriter {
                    values: &mut values,
                }
                .push_decimal(m);
                want.push_str(&m.to_string());
            }
            n = n.saturating_mul(10).max(1);
        }
        ValueWriter {
            values: &mut values,
        }
        .push_decimal(u64::MAX);
        want.push_str(&u64::MAX.to_string());
        assert_eq!(String::from_utf8(values).as_deref(), Ok(want.as_str()));
    }

    #[test]
    fn the_handled_events_own_value_is_forwarded_and_anything_else_copied() {
        // The batch's values column; the handled event's value is "hello" at 2..7.
        let column = b"..hello".to_vec();
        let input = &column[2..];
        let copy = input.to_vec();
        let mut outputs = Outputs::with_capacity(3, 0, 0);
        let key = b"k".to_vec();
        outputs.current = Current {
            key: (key.as_ptr() as usize, key.len()),
            value: (2, 7),
            source: 7,
        };
        outputs.push_key(0, &key);
        outputs.push_value(input, Some(&column));
        outputs.push_key(0, b"k");
        outputs.push_value(&copy, Some(&column));
        outputs.push_key(0, &key);
        outputs.push_value(&input[1..], Some(&column));
        outputs.push_forwarded(1, 3);
        assert_eq!(outputs.topics, [0, 0, 0, 1]);
        assert_eq!(outputs.value_sources, [7, 0, 0, 3]);
        assert_eq!(outputs.values, b"helloello");
        assert_eq!(outputs.value_ends, [0, 5, 9, 9]);
        assert_eq!(outputs.key_sources, [7, 0, 7, 3]);
        assert_eq!(outputs.keys, b"k");
        assert_eq!(outputs.key_ends, [0, 1, 1, 1]);
    }
}
