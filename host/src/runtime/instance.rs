//! One sandboxed handler instance: a `Store` with its limits, the instantiated component, and the
//! host side of procd's imports (state overlay, rate-limited log).
//!
//! State writes of a batch go to an overlay in the store's data, which reads consult first (so a guest
//! reads its own writes); the cell takes them after a successful batch and commits them atomically with
//! the outputs and the offset, or discards them. A trap poisons the store: the instance must be rebuilt
//! (about 60 µs), which is why the state that matters lives host-side.
//!
//! The batch's values reach the guest only if it asks (`input.values`): the store data holds the
//! caller's shared buffer during a `handle` call, and nothing outside one, so the guest gets the
//! current batch's values or a trap, and the caller's buffer is unshared again when the call returns.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::component::{HasSelf, Linker};
use wasmtime::{Engine, Store, StoreContextMut, StoreLimits, StoreLimitsBuilder, Trap};

use super::bindings::procd::handler::{log, state, types};
use super::bindings::{Batch, Handler, Level, OutputBatch, StateValues};
use super::throttle::CallClock;
use super::{Compiled, Limits, Runtime};

/// Longest state key a handler may use. Well under the storage engine's own key limit (64 KiB).
pub const MAX_STATE_KEY_BYTES: usize = 16 * 1024;

/// Committed state of one handler on one partition, as the cell stores it.
pub trait StateStore: Send {
    /// The committed value of `key`; `Err` describes a storage failure.
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, String>;

    /// The length of the committed value of `key`, if any (a blind write must know what it replaces).
    fn value_len(&self, key: &[u8]) -> Result<Option<u64>, String> {
        Ok(self.get(key)?.map(|v| v.len() as u64))
    }
}

/// One state change of a batch: a value to store, or `None` to delete.
pub type StateWrite = (Vec<u8>, Option<Vec<u8>>);

/// The state changes of a batch, for the cell to commit.
#[derive(Debug, Default)]
pub struct StateChanges {
    /// In key order.
    pub writes: Vec<StateWrite>,
    /// How much they change the partition's state bytes (see [`state_entry_bytes`]).
    pub bytes_delta: i64,
}

/// What a state entry counts against the `max_state_bytes` limit: its key's and its value's lengths.
pub fn state_entry_bytes(key_len: usize, value_len: u64) -> u64 {
    key_len as u64 + value_len
}

/// Who is logging, for log lines.
#[derive(Debug, Clone)]
pub struct LogLabel {
    /// Handler name.
    pub handler: Arc<str>,
    /// Handler version.
    pub version: u32,
    /// Partition.
    pub partition: u32,
}

struct LogLimiter {
    label: LogLabel,
    per_sec: f64,
    tokens: f64,
    last: Instant,
    dropped: u64,
}

impl LogLimiter {
    fn admit(&mut self) -> bool {
        let now = Instant::now();
        let elapsed = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.per_sec).min(self.per_sec);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            self.dropped += 1;
            false
        }
    }
}

/// The data of an instance's store.
pub struct HostState {
    limits: StoreLimits,
    committed: Box<dyn StateStore>,
    overlay: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    max_state_value_bytes: usize,
    /// State bytes the partition may hold (`max_state_bytes`).
    max_state_bytes: u64,
    /// State bytes committed before this batch, as the cell counted them.
    state_bytes: u64,
    /// How this batch's overlay changes `state_bytes` so far.
    bytes_delta: i64,
    /// Committed sizes (key + value bytes, 0 when absent) of the keys read or written in this batch
    /// and not yet in the overlay, so a write after a read costs no second storage look-up.
    /// (foldhash: keys are the guest's, so seeded, and cheap on short keys.)
    committed_sizes: foldhash::HashMap<Vec<u8>, u64>,
    log: LogLimiter,
    /// Whether the host refused a state write in the current call (a state limit).
    state_refused: bool,
    /// The SDK's panic report of the current call (its panic hook logs it just before the trap), so the
    /// trap's error says why instead of only where.
    panic: Option<String>,
    /// The values of the batch being handled, shared with the caller (`input.values` lowers them
    /// straight from here into guest memory); `None` outside a `handle` call.
    input_values: Option<Arc<Vec<u8>>>,
    /// When the call in progress started and its deadline: the epoch callback throttles a call that
    /// runs long and ends it at its deadline.
    clock: CallClock,
}

/// Starts the clock of a call with `deadline` on `store`.
fn start_call(store: &mut Store<HostState>, deadline: Duration) {
    let (clock, unthrottled) = CallClock::start(deadline);
    store.data_mut().clock = clock;
    store.set_epoch_deadline(unthrottled);
}

/// What an overlay write replaced: the key's previous overlay entry, if it had one.
type Replaced = Option<Option<Vec<u8>>>;

/// How to take back one overlay write of a `set-many`: its key's index in the call, what it replaced.
struct Undo {
    index: usize,
    previous: Replaced,
    bytes: i64,
}

/// Splits a column blob by its end offsets; a guest sending inconsistent columns gets a trap.
fn columns<'a>(blob: &'a [u8], ends: &[u32]) -> wasmtime::Result<Vec<&'a [u8]>> {
    let mut out = Vec::with_capacity(ends.len());
    let mut start = 0usize;
    for &end in ends {
        let end = end as usize;
        let Some(slice) = blob.get(start..end) else {
            wasmtime::bail!(
                "column end offsets are out of range or not ascending ({start}..{end} of {})",
                blob.len()
            );
        };
        out.push(slice);
        start = end;
    }
    Ok(out)
}

impl HostState {
    fn read(&mut self, key: &[u8]) -> wasmtime::Result<Option<Vec<u8>>> {
        if let Some(v) = self.overlay.get(key) {
            return Ok(v.clone());
        }
        let value = self
            .committed
            .get(key)
            .map_err(|e| wasmtime::format_err!("state read failed: {e}"))?;
        if !self.committed_sizes.contains_key(key) {
            let size = value
                .as_ref()
                .map_or(0, |v| state_entry_bytes(key.len(), v.len() as u64));
            self.committed_sizes.insert(key.to_vec(), size);
        }
        Ok(value)
    }

    /// What `key` counts now: its overlay entry's size, else its committed size.
    fn current_size(&mut self, key: &[u8]) -> wasmtime::Result<u64> {
        if let Some(v) = self.overlay.get(key) {
            return Ok(v
                .as_ref()
                .map_or(0, |v| state_entry_bytes(key.len(), v.len() as u64)));
        }
        if let Some(&size) = self.committed_sizes.get(key) {
            return Ok(size);
        }
        let size = self
            .committed
            .value_len(key)
            .map_err(|e| wasmtime::format_err!("state read failed: {e}"))?
            .map_or(0, |len| state_entry_bytes(key.len(), len));
        self.committed_sizes.insert(key.to_vec(), size);
        Ok(size)
    }

    /// Puts one write in the overlay, unless it would grow the partition's state past
    /// `max_state_bytes` (a write that does not grow it always passes, even over the limit). Returns
    /// what it replaced in the overlay and how it changed the state's bytes, for [`HostState::undo`].
    fn write(
        &mut self,
        key: Vec<u8>,
        value: Option<Vec<u8>>,
    ) -> wasmtime::Result<Result<(Replaced, i64), String>> {
        let current = self.current_size(&key)?;
        let new = value
            .as_ref()
            .map_or(0, |v| state_entry_bytes(key.len(), v.len() as u64));
        if new > current {
            let total = self
                .state_bytes
                .saturating_add_signed(self.bytes_delta)
                .saturating_add(new - current);
            if total > self.max_state_bytes {
                self.state_refused = true;
                return Ok(Err(format!(
                    "partition state would grow to {total} bytes; the limit is {} bytes \
                     (max_state_bytes)",
                    self.max_state_bytes
                )));
            }
        }
        let bytes = new as i64 - current as i64;
        self.bytes_delta += bytes;
        Ok(Ok((self.overlay.insert(key, value), bytes)))
    }

    /// Takes back writes of a refused `set-many` (`keys[index]`, newest first), so that it changes
    /// nothing.
    fn undo(&mut self, undo: Vec<Undo>, keys: &[&[u8]]) {
        for u in undo.into_iter().rev() {
            self.bytes_delta -= u.bytes;
            let key = keys.get(u.index).copied().unwrap_or_default();
            match u.previous {
                Some(previous) => self.overlay.insert(key.to_vec(), previous),
                None => self.overlay.remove(key),
            };
        }
    }

    fn end_batch(&mut self) {
        self.bytes_delta = 0;
        self.committed_sizes.clear();
    }

    fn check_key(key: &[u8]) -> Result<(), String> {
        if key.len() > MAX_STATE_KEY_BYTES {
            return Err(format!(
                "state key of {} bytes exceeds the limit of {MAX_STATE_KEY_BYTES} bytes",
                key.len()
            ));
        }
        Ok(())
    }

    fn check_value(&mut self, value: &[u8]) -> Result<(), String> {
        if value.len() > self.max_state_value_bytes {
            self.state_refused = true;
            return Err(format!(
                "state value of {} bytes exceeds the limit of {} bytes",
                value.len(),
                self.max_state_value_bytes
            ));
        }
        Ok(())
    }
}

impl types::Host for HostState {}

impl state::Host for HostState {
    fn get(&mut self, key: Vec<u8>) -> wasmtime::Result<Option<Vec<u8>>> {
        self.read(&key)
    }

    fn set(&mut self, key: Vec<u8>, value: Vec<u8>) -> wasmtime::Result<Result<(), String>> {
        if let Err(e) = Self::check_key(&key).and_then(|()| self.check_value(&value)) {
            return Ok(Err(e));
        }
        Ok(self.write(key, Some(value))?.map(drop))
    }

    fn delete(&mut self, key: Vec<u8>) -> wasmtime::Result<()> {
        // A delete never grows the state, so it is never refused.
        let _ = self.write(key, None)?;
        Ok(())
    }

    fn get_many(&mut self, keys: Vec<u8>, key_ends: Vec<u32>) -> wasmtime::Result<StateValues> {
        let keys = columns(&keys, &key_ends)?;
        let mut out = StateValues {
            values: Vec::new(),
            value_ends: Vec::with_capacity(keys.len()),
            found: Vec::with_capacity(keys.len()),
        };
        for key in keys {
            let value = self.read(key)?;
            out.found.push(value.is_some());
            out.values
                .extend_from_slice(value.as_deref().unwrap_or_default());
            out.value_ends.push(
                u32::try_from(out.values.len())
                    .map_err(|_| wasmtime::format_err!("state values exceed 4 GiB"))?,
            );
        }
        Ok(out)
    }

    fn set_many(
        &mut self,
        keys: Vec<u8>,
        key_ends: Vec<u32>,
        values: Vec<u8>,
        value_ends: Vec<u32>,
    ) -> wasmtime::Result<Result<(), String>> {
        if key_ends.len() != value_ends.len() {
            wasmtime::bail!(
                "set-many got {} keys but {} values",
                key_ends.len(),
                value_ends.len()
            );
        }
        let keys = columns(&keys, &key_ends)?;
        let values = columns(&values, &value_ends)?;
        if let Some(Err(e)) = values
            .iter()
            .map(|v| self.check_value(v))
            .find(Result::is_err)
        {
            return Ok(Err(e));
        }
        if let Some(Err(e)) = keys.iter().map(|k| Self::check_key(k)).find(Result::is_err) {
            return Ok(Err(e));
        }
        // All or nothing: a refused write takes back the ones before it.
        let mut done = Vec::with_capacity(keys.len());
        for (index, (k, v)) in keys.iter().zip(values).enumerate() {
            match self.write(k.to_vec(), Some(v.to_vec()))? {
                Ok((previous, bytes)) => done.push(Undo {
                    index,
                    previous,
                    bytes,
                }),
                Err(e) => {
                    self.undo(done, &keys);
                    return Ok(Err(e));
                }
            }
        }
        Ok(Ok(()))
    }

    fn delete_many(&mut self, keys: Vec<u8>, key_ends: Vec<u32>) -> wasmtime::Result<()> {
        for key in columns(&keys, &key_ends)? {
            let _ = self.write(key.to_vec(), None)?;
        }
        Ok(())
    }
}

impl log::Host for HostState {
    fn log(&mut self, level: Level, message: String) {
        if matches!(level, Level::Error) && message.starts_with("handler panicked") {
            self.panic = Some(message.clone());
        }
        if !self.log.admit() {
            return;
        }
        let l = &self.log.label;
        let (handler, version, partition) = (&*l.handler, l.version, l.partition);
        match level {
            Level::Trace => {
                tracing::trace!(target: "procd::handler", handler, version, partition, "{message}")
            }
            Level::Debug => {
                tracing::debug!(target: "procd::handler", handler, version, partition, "{message}")
            }
            Level::Info => {
                tracing::info!(target: "procd::handler", handler, version, partition, "{message}")
            }
            Level::Warn => {
                tracing::warn!(target: "procd::handler", handler, version, partition, "{message}")
            }
            Level::Error => {
                tracing::error!(target: "procd::handler", handler, version, partition, "{message}")
            }
        }
    }
}

/// The import name of `input` (its version is the WIT package's).
const INPUT_INTERFACE: &str = "procd:handler/input@0.3.0";

/// Links procd's imports (and nothing else) for every instance.
pub(super) fn linker(engine: &Engine) -> wasmtime::Result<Linker<HostState>> {
    let mut linker = Linker::new(engine);
    types::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s)?;
    state::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s)?;
    log::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s)?;
    // By hand rather than through the generated `input::Host`: lowering the shared `Arc` copies the
    // values once, from the caller's buffer into guest memory, where an owned `Vec` return would copy
    // them on the host first.
    linker.instance(INPUT_INTERFACE)?.func_wrap(
        "values",
        |cx: StoreContextMut<'_, HostState>, (): ()| match &cx.data().input_values {
            Some(values) => Ok((Arc::clone(values),)),
            None => wasmtime::bail!("input.values was called outside `handle`: there is no batch"),
        },
    )?;
    Ok(linker)
}

/// An instance could not be created.
#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    /// Instantiation failed (e.g. the memory limit is below the component's minimum).
    #[error("cannot instantiate handler: {0}")]
    Instantiate(String),
    /// The handler's `init` refused its configuration.
    #[error("handler init failed: {0}")]
    Init(String),
    /// `init` trapped.
    #[error("handler init trapped: {0}")]
    Trap(String),
}

/// A `handle` call did not return normally. The instance is poisoned and must be rebuilt (except after
/// [`CallError::Outputs`], where the call itself returned).
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    /// The batch's outputs were over the output limits; they are dropped.
    #[error("output limit exceeded: {0}")]
    Outputs(String),
    /// The call ran past its deadline.
    #[error("deadline of {0} ms exceeded")]
    Deadline(u128),
    /// The guest tried to grow memory past its limit.
    #[error("memory limit {0} MiB exceeded")]
    Memory(usize),
    /// Any other trap (a panic in the guest, unreachable, stack overflow, a host-side failure).
    #[error("trap: {0}")]
    Trap(String),
}

/// What a successful `handle` call returned.
#[derive(Debug)]
pub enum HandleOutcome {
    /// Every event was processed; these are the outputs.
    Outputs(OutputBatch),
    /// Event `index` of the batch failed; nothing of the batch may be committed as is.
    EventFailed {
        /// Index in the batch.
        index: u32,
        /// The handler's message.
        message: String,
    },
}

/// An instantiated handler for one partition.
pub struct Instance {
    store: Store<HostState>,
    bindings: Handler,
    deadline: Duration,
    max_memory_bytes: usize,
    max_outputs: usize,
    max_output_bytes: usize,
    max_wasm_stack: usize,
    poisoned: bool,
}

impl Runtime {
    /// Instantiates `compiled` under `limits`, reading committed state from `committed`, and calls its
    /// `init` with `config`.
    pub fn instantiate(
        &self,
        compiled: &Compiled,
        limits: &Limits,
        committed: Box<dyn StateStore>,
        config: &[(String, String)],
        label: LogLabel,
    ) -> Result<Instance, InstanceError> {
        let store_limits = StoreLimitsBuilder::new()
            .memory_size(limits.max_memory_bytes)
            .instances(16)
            .tables(16)
            .table_elements(1 << 20)
            .memories(4)
            .trap_on_grow_failure(true)
            .build();
        let per_sec = f64::from(limits.log_lines_per_sec.max(1));
        let data = HostState {
            limits: store_limits,
            committed,
            overlay: BTreeMap::new(),
            max_state_value_bytes: limits.max_state_value_bytes,
            max_state_bytes: limits.max_state_bytes,
            state_bytes: 0,
            bytes_delta: 0,
            committed_sizes: Default::default(),
            log: LogLimiter {
                label,
                per_sec,
                tokens: per_sec,
                last: Instant::now(),
                dropped: 0,
            },
            state_refused: false,
            panic: None,
            input_values: None,
            clock: CallClock::start(limits.deadline).0,
        };
        let mut store = Store::new(&self.engine, data);
        store.limiter(|s| &mut s.limits);
        store.epoch_deadline_callback(|store| Ok(store.data().clock.on_epoch()));
        start_call(&mut store, limits.deadline);
        let bindings = compiled
            .pre
            .instantiate(&mut store)
            .map_err(|e| InstanceError::Instantiate(format!("{e:#}")))?;
        let mut instance = Instance {
            store,
            bindings,
            deadline: limits.deadline,
            max_memory_bytes: limits.max_memory_bytes,
            max_outputs: limits.max_outputs_per_batch,
            max_output_bytes: limits.max_output_bytes_per_batch,
            max_wasm_stack: self.max_wasm_stack,
            poisoned: false,
        };
        start_call(&mut instance.store, limits.deadline);
        match instance.bindings.call_init(&mut instance.store, config) {
            Ok(Ok(())) => Ok(instance),
            Ok(Err(message)) => Err(InstanceError::Init(message)),
            Err(e) => Err(InstanceError::Trap(instance.describe(&e).to_string())),
        }
    }
}

/// Rust (and C) guests keep their stack in linear memory, below the data, growing down from a fixed
/// address; running out wraps the stack pointer below zero, so the trap is a memory fault just under
/// 4 GiB. Says so, instead of a bare "out of bounds memory access".
fn shadow_stack_overflow(trap: &str) -> Option<String> {
    let hex = trap.split("memory fault at wasm address 0x").nth(1)?;
    let hex: String = hex.chars().take_while(char::is_ascii_hexdigit).collect();
    let address = u64::from_str_radix(&hex, 16).ok()?;
    (address >= 0xffff_0000).then(|| {
        format!(
            "stack overflow: the handler ran out of stack (unbounded recursion?); memory fault at \
             wasm address {address:#x}"
        )
    })
}

impl Instance {
    fn describe(&self, e: &wasmtime::Error) -> CallError {
        match e.downcast_ref::<Trap>() {
            Some(Trap::Interrupt) => CallError::Deadline(self.deadline.as_millis()),
            Some(Trap::StackOverflow) => CallError::Trap(format!(
                "stack overflow: the handler ran out of its {} KiB wasm stack \
                 (handler.max_wasm_stack_bytes; unbounded recursion?)",
                self.max_wasm_stack / 1024
            )),
            _ => {
                let text = format!("{e:#}");
                if text.contains("forcing a memory growth failure to be a trap")
                    || text.contains("forcing trap when growing memory")
                {
                    CallError::Memory(self.max_memory_bytes / (1024 * 1024))
                } else if let Some(overflow) = shadow_stack_overflow(&text) {
                    CallError::Trap(overflow)
                } else if let Some(panic) = self.store.data().panic.clone() {
                    // The panic message says why; the trap itself is always `unreachable` in abort.
                    CallError::Trap(panic)
                } else {
                    CallError::Trap(text)
                }
            }
        }
    }

    /// Runs the handler over one batch, whose values (split by `batch.value_ends`) are `values`: the
    /// guest fetches them if it reads one. State writes stay in the overlay until
    /// [`Instance::take_writes`] or [`Instance::discard_writes`].
    ///
    /// The instance holds a clone of `values` only during the call, so a caller that reuses the buffer
    /// finds it unshared again afterwards.
    pub fn handle(
        &mut self,
        batch: &Batch,
        values: &Arc<Vec<u8>>,
    ) -> Result<HandleOutcome, CallError> {
        if self.poisoned {
            return Err(CallError::Trap(
                "instance was poisoned by an earlier trap".into(),
            ));
        }
        start_call(&mut self.store, self.deadline);
        self.store.data_mut().panic = None;
        self.store.data_mut().state_refused = false;
        self.store.data_mut().input_values = Some(Arc::clone(values));
        let result = self.bindings.call_handle(&mut self.store, batch);
        self.store.data_mut().input_values = None;
        match result {
            Ok(Ok(outputs)) => {
                let (count, bytes) = (
                    outputs.topics.len(),
                    outputs.keys.len() + outputs.values.len(),
                );
                if count > self.max_outputs {
                    return Err(CallError::Outputs(format!(
                        "{count} records in one batch; the limit is {} (handler.max_outputs_per_batch)",
                        self.max_outputs
                    )));
                }
                if bytes > self.max_output_bytes {
                    return Err(CallError::Outputs(format!(
                        "{bytes} bytes of keys and values in one batch; the limit is {} \
                         (handler.max_output_bytes_per_batch)",
                        self.max_output_bytes
                    )));
                }
                Ok(HandleOutcome::Outputs(outputs))
            }
            Ok(Err(e)) => Ok(HandleOutcome::EventFailed {
                index: e.index,
                message: e.message,
            }),
            Err(e) => {
                self.poisoned = true;
                Err(self.describe(&e))
            }
        }
    }

    /// Whether the host refused a state write (a state limit) during the last call.
    pub fn state_write_refused(&self) -> bool {
        self.store.data().state_refused
    }

    /// Whether a trap made this instance unusable.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    /// Tells the instance how many state bytes its partition holds before the next batch: the base its
    /// `max_state_bytes` limit is checked against.
    pub fn set_state_bytes(&mut self, bytes: u64) {
        self.store.data_mut().state_bytes = bytes;
    }

    /// Takes the state writes of the batch just handled.
    pub fn take_writes(&mut self) -> StateChanges {
        let data = self.store.data_mut();
        let changes = StateChanges {
            writes: std::mem::take(&mut data.overlay).into_iter().collect(),
            bytes_delta: data.bytes_delta,
        };
        data.end_batch();
        changes
    }

    /// Drops the state writes of the batch just handled.
    pub fn discard_writes(&mut self) {
        let data = self.store.data_mut();
        data.overlay.clear();
        data.end_batch();
    }

    /// Log lines dropped by the rate limit so far.
    pub fn dropped_log_lines(&self) -> u64 {
        self.store.data().log.dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hand_linked_import_has_the_wit_packages_version() {
        // Linked under another version, `input.values` would be an unknown import: a trap at first use.
        let wit = include_str!("../../../wit/procd.wit");
        let version = INPUT_INTERFACE.rsplit_once('@').map(|(_, v)| v);
        assert!(
            version.is_some_and(|v| wit.contains(&format!("package procd:handler@{v};"))),
            "{INPUT_INTERFACE} does not match the WIT package"
        );
        assert!(wit.contains("interface input {") && wit.contains("values: func() -> list<u8>;"));
    }
}
