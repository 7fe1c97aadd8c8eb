//! The wasm side: the generated bindings, the component's exports and the host's imports.
//!
//! Compiled only for `wasm32`: on native targets (tests) nothing here exists, so the SDK never
//! references the imports there. The handler value lives in a thread-local slot (wasm has one thread)
//! between `init` and the batches that follow; `handle` reaches it with one downcast per batch, and the
//! per-event loop inside is monomorphic.

// The generated code is all `unsafe` glue for the canonical ABI; the workspace denies `unsafe_code` for
// code we write by hand.
#[allow(unsafe_code, missing_docs, clippy::all, clippy::unwrap_used)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "handler",
        pub_export_macro: true,
        export_macro_name: "__export_procd_handler",
    });
}

use std::any::Any;
use std::cell::RefCell;
use std::marker::PhantomData;
use std::sync::Once;

use bindings::procd::handler::types::{Batch, EventError, Level as WitLevel, OutputBatch};
use bindings::procd::handler::{input as wit_input, log as wit_log, state as wit_state};

use crate::event::{Columns, Values};
use crate::handler::Runtime;
use crate::state::Backend;
use crate::{Config, Handler, Level};

thread_local! {
    /// The `Runtime<H>` of the exported handler, set by `init`.
    static SLOT: RefCell<Option<Box<dyn Any>>> = const { RefCell::new(None) };
}

/// Implements the generated `Guest` trait for the handler type `H`; `export!` names it.
pub struct Guest<H>(PhantomData<H>);

impl<H: Handler + Default> bindings::Guest for Guest<H> {
    fn init(config: Vec<(String, String)>) -> Result<(), String> {
        install_panic_hook();
        let runtime =
            Runtime::start(H::default(), Config::new(config)).map_err(|e| e.to_string())?;
        SLOT.with(|slot| *slot.borrow_mut() = Some(Box::new(runtime)));
        Ok(())
    }

    fn handle(batch: Batch) -> Result<OutputBatch, EventError> {
        install_panic_hook();
        // The values stay on the host until an event's value is read.
        let fetch = wit_input::values;
        let values = Values::new(&fetch);
        let columns = Columns {
            partition: batch.partition,
            offsets: &batch.offsets,
            timestamps_ms: &batch.timestamps_ms,
            keys: &batch.keys,
            key_ends: &batch.key_ends,
            values: &values,
            value_ends: &batch.value_ends,
            headers: &batch.headers,
            header_ends: &batch.header_ends,
        };
        SLOT.with(|slot| {
            let mut slot = slot.borrow_mut();
            let Some(runtime) = slot.as_mut().and_then(|r| r.downcast_mut::<Runtime<H>>()) else {
                // A broken host contract, not a bad event: trap rather than blame one.
                panic!("procd-sdk: `handle` was called before `init` succeeded");
            };
            match runtime.handle(columns, &mut Imports) {
                Ok(out) => Ok(OutputBatch {
                    topics: out.topics,
                    keys: out.keys,
                    key_ends: out.key_ends,
                    values: out.values,
                    value_ends: out.value_ends,
                    value_sources: out.value_sources,
                    key_sources: out.key_sources,
                }),
                Err(failure) => Err(EventError {
                    index: failure.index,
                    message: failure.message,
                }),
            }
        })
    }
}

/// Replaces std's panic hook, which would print to stderr: a WASI call, which traps here before the
/// message gets out. This one sends the message through the `log` import instead; the panic then
/// aborts (traps) as usual.
fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            let payload = info.payload();
            let message = payload
                .downcast_ref::<&str>()
                .copied()
                .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
                .unwrap_or("(a panic payload that is not a string)");
            let line = match info.location() {
                Some(at) => format!(
                    "handler panicked at {}:{}:{}: {message}",
                    at.file(),
                    at.line(),
                    at.column()
                ),
                None => format!("handler panicked: {message}"),
            };
            wit_log::log(WitLevel::Error, &line);
        }));
    });
}

/// `log` import, for `crate::log`.
pub(crate) fn log(level: Level, message: &str) {
    let level = match level {
        Level::Trace => WitLevel::Trace,
        Level::Debug => WitLevel::Debug,
        Level::Info => WitLevel::Info,
        Level::Warn => WitLevel::Warn,
        Level::Error => WitLevel::Error,
    };
    wit_log::log(level, message);
}

/// The state imports.
struct Imports;

impl Backend for Imports {
    fn get(&mut self, key: &[u8]) -> Option<Vec<u8>> {
        wit_state::get(key)
    }

    fn get_many(&mut self, keys: &[u8], key_ends: &[u32]) -> (Vec<u8>, Vec<u32>, Vec<bool>) {
        let found = wit_state::get_many(keys, key_ends);
        (found.values, found.value_ends, found.found)
    }

    fn set(&mut self, key: &[u8], value: &[u8]) -> Result<(), String> {
        wit_state::set(key, value)
    }

    fn set_many(
        &mut self,
        keys: &[u8],
        key_ends: &[u32],
        values: &[u8],
        value_ends: &[u32],
    ) -> Result<(), String> {
        wit_state::set_many(keys, key_ends, values, value_ends)
    }

    fn delete_many(&mut self, keys: &[u8], key_ends: &[u32]) {
        wit_state::delete_many(keys, key_ends);
    }
}
