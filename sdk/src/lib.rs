//! # procd-sdk: write procd handlers in Rust
//!
//! A procd handler reads one input topic, event by event, and emits records to the output topics it
//! declared at deploy time, keeping partition-local state on the way. It is a WebAssembly component
//! built for `wasm32-wasip2`; this SDK hides the component model behind a per-event function: you write
//! what happens to one [`Event`], the SDK runs it over the host's batches.
//!
//! ## A handler
//!
//! ```
//! use procd_sdk::{Config, Context, Event, Handler, Result};
//! use serde::Deserialize;
//!
//! /// Counts orders per customer and emits `{"customer": .., "orders": n}` for each order;
//! /// orders below the configured `min_total` are ignored.
//! #[derive(Default)]
//! struct OrderCounter {
//!     min_total: f64,
//! }
//!
//! #[derive(Deserialize)]
//! struct Order<'a> {
//!     customer: &'a str,
//!     total: f64,
//! }
//!
//! impl Handler for OrderCounter {
//!     fn init(&mut self, config: &Config) -> Result {
//!         self.min_total = config.parse("min_total")?.unwrap_or(0.0);
//!         Ok(())
//!     }
//!
//!     fn handle(&mut self, event: &Event<'_>, ctx: &mut Context<'_>) -> Result {
//!         // Zero-copy: `order.customer` borrows from the batch.
//!         let order: Order = event.json()?; // invalid JSON fails this event only
//!         if order.total < self.min_total {
//!             return Ok(());
//!         }
//!         let orders = ctx.state().add_u64(order.customer, 1)?;
//!         ctx.emit_json(0, order.customer, &serde_json::json!({"customer": order.customer, "orders": orders}))?;
//!         Ok(())
//!     }
//! }
//!
//! procd_sdk::export!(OrderCounter);
//!
//! // The same code runs natively under `cargo test`, against in-memory state:
//! use procd_sdk::testing::TestDriver;
//!
//! let mut driver = TestDriver::new(OrderCounter::default()).config("min_total", "10").outputs(["counts"]);
//! driver.send("o1", r#"{"customer":"ada","total":12.5}"#).expect("a valid order");
//! let out = driver.send("o2", r#"{"customer":"ada","total":30}"#).expect("a valid order");
//! assert_eq!(out[0].value_str(), r#"{"customer":"ada","orders":2}"#);
//! assert_eq!(driver.send("o3", r#"{"customer":"bob","total":1}"#), Ok(vec![]));
//! assert_eq!(driver.state().get_u64("ada"), Some(2));
//! let failure = driver.send("o4", "not json").expect_err("not an order");
//! assert!(failure.message.starts_with("event value is not the expected JSON"));
//! ```
//!
//! A handler without fields or `init` can be a plain function:
//!
//! ```
//! use procd_sdk::{Context, Event, Result};
//!
//! /// Emits every event unchanged (without reading its value: see `Context::forward`).
//! fn passthrough(event: &Event<'_>, ctx: &mut Context<'_>) -> Result {
//!     ctx.forward(0, event);
//!     Ok(())
//! }
//!
//! procd_sdk::export!(fn passthrough);
//! ```
//!
//! Use [`export!`] once per crate. A wrong signature is a compile error that says what to write:
//!
//! ```compile_fail
//! use procd_sdk::{Context, Event, Result};
//!
//! // error[E0308]: mismatched types
//! //   expected fn pointer `for<'a, 'c, 'e, 'x> fn(&'e Event<'a>, &'c mut Context<'x>) -> Result<_, _>`
//! //      found fn item `for<'a> fn(Event<'a>) -> Result<_, _> {passthrough}`
//! fn passthrough(event: Event<'_>) -> Result {
//!     Ok(())
//! }
//!
//! procd_sdk::export!(fn passthrough);
//! ```
//!
//! ```compile_fail
//! // error: `NotAHandler` is not a procd handler
//! #[derive(Default)]
//! struct NotAHandler;
//!
//! procd_sdk::export!(NotAHandler);
//! ```
//!
//! ## Building
//!
//! A handler crate is a `cdylib`. Its unit tests (`#[cfg(test)]` modules) still build natively; do not
//! add `rlib` to the crate types unless another crate must link the handler: it turns off LTO for the
//! component (measured: 15% more instructions per event, 30% larger).
//!
//! ```toml
//! [package]
//! name = "order-counter"
//! edition = "2024"
//!
//! [lib]
//! crate-type = ["cdylib"]
//!
//! [dependencies]
//! procd-sdk = { path = "../sdk" }
//! serde = { version = "1", features = ["derive"] }
//! serde_json = "1"
//!
//! [profile.release]
//! opt-level = 3
//! lto = true
//! codegen-units = 1
//! panic = "abort"
//! ```
//!
//! `cargo build --release --target wasm32-wasip2` writes the component to
//! `target/wasm32-wasip2/release/order_counter.wasm`, ready to deploy (`procd deploy`). `cargo test`
//! runs its tests natively.
//!
//! ## The contract, event by event
//!
//! - **Events** ([`Event`]) are views into the host's columnar batch: [`key`](Event::key),
//!   [`value`](Event::value), [`headers`](Event::headers) borrow from it, nothing is copied per event.
//!   The values are fetched from the host on the first read of any event's value in a batch (all of
//!   them, in one call), so a handler that never reads a value never pays for copying one. An event
//!   without a key has an **empty key**; there is no other "no key" marker. [`json`](Event::json) parses
//!   the value with serde (types may borrow `&str` from it).
//! - **Outputs**: [`Context::emit`] appends a record to output topic `output` (the index of the topic in
//!   the list declared at deploy time, 0 for the first), [`emit_json`](Context::emit_json) and
//!   [`emit_with`](Context::emit_with) write the value straight into the output column. An **empty key
//!   means "no key"**. Records reach the host only if the whole batch succeeds. Emitting the event's own
//!   `event.key()` or `event.value()` slice costs no copy: the SDK tells the host which input it is.
//!   [`Context::forward`] emits the event unchanged that way without reading its value at all.
//! - **State** ([`State`], from [`Context::state`]) is a key-value store per partition. The first read
//!   of a key in a batch asks the host; later reads, and every write, hit a batch-local cache; the writes
//!   reach the host in one `set-many` and one `delete-many` when the batch ends. Reads see the batch's own
//!   writes. If many keys will be read, [`Handler::prefetch`] can load them all in one call. Typed
//!   helpers store JSON ([`State::set_json`]) or `u64` counters as 8 little-endian bytes
//!   ([`State::add_u64`]).
//! - **Configuration** ([`Config`]) is the key/value list given at deploy time: passed to
//!   [`Handler::init`] and readable from [`Context::config`]. An `init` error refuses the deployment.
//! - **Logging**: [`info!`], [`warn!`], [`error!`], [`debug!`], [`trace!`] (or [`Context::log`]) write
//!   to the host's log, which rate-limits them. A panic's message is logged at error level before the
//!   instance traps.
//! - **Failing one event**: return `Err` from `handle` (any `std::error::Error` converts with `?`, or use
//!   [`Error::msg`] / [`bail!`]). The host then throws away the batch's outputs and state writes, handles
//!   the events before the failing one again, sends the failing one to the dead-letter log with your
//!   message, and goes on after it. A panic, by contrast, says nothing about which event was at fault:
//!   the instance traps and the host has to isolate the event by retrying smaller batches. Prefer `Err`.
//!
//! ## What a handler may not do
//!
//! Handlers must be **deterministic**: the same events and state must give the same outputs and state
//! writes, because the host re-runs batches after failures and replays after crashes. And a handler
//! gets **no WASI**: the host links only procd's imports, and any other import traps when called. Rust's
//! standard library imports WASI interfaces on `wasm32-wasip2`; importing is harmless, calling traps. So,
//! inside a handler, do not:
//!
//! - create a `std::collections::HashMap`/`HashSet` with `new()` or `default()`: their `RandomState`
//!   asks the OS for random keys. Use `BTreeMap`, or [`collections::HashMap`] (fixed seed, `default()`).
//!   The same goes for crates that use `RandomState` inside, e.g. `serde_json` with its
//!   `preserve_order` feature (its `Map` is then an `IndexMap` with `RandomState`);
//! - read a clock (`SystemTime::now`, `Instant::now`): use [`Event::timestamp_ms`];
//! - use randomness (`rand::thread_rng`, `getrandom`, UUID v4): derive values from the event instead;
//! - print (`println!`, `eprintln!`, `dbg!`): use [`info!`] and friends;
//! - read environment variables or arguments, open files or sockets, spawn threads or sleep;
//! - keep in fields or statics anything that changes outputs across batches: the instance can be
//!   rebuilt at any time (after a trap, on a redeploy) and batches are re-run, so it must live in
//!   [`State`]. Fields are for configuration and caches of derived data.
//!
//! ## Performance
//!
//! The boundary is cheap when a handler works on the views: building an [`Event`] copies nothing, and
//! emitting appends to the output columns that are handed to the host as they are. The batch's values,
//! usually most of its bytes, are copied in only if the handler reads one: route, count or drop events
//! on their keys, headers, offsets and timestamps, and pass them on with [`Context::forward`], and they
//! never are. Avoid allocating per
//! event where a borrow will do (`&str` fields in `#[derive(Deserialize)]` types, [`Context::emit_with`]
//! to format a value in place). State costs one host call per distinct key read per batch (or one per
//! batch with [`Handler::prefetch`]) plus one flush.
//!
//! ## Testing
//!
//! [`testing::TestDriver`] runs a handler natively, with in-memory state, like Kafka Streams'
//! `TopologyTestDriver`: send events, get the emitted records or the event's failure, inspect the state
//! and the captured log lines. It exists on native targets only.
//!
//! ## Layout
//!
//! - `handler`: the [`Handler`] trait, the function form, and the batch loop both share.
//! - `event`: [`Event`] views over the batch columns, the lazily fetched values, headers.
//! - `context`: [`Context`] (emitting, config, logging) and the output columns.
//! - `state`: [`State`] and its batch-local cache.
//! - `config`, `error`, `log`, [`collections`]: what the names say.
//! - `guest` (wasm32 only): the `wit-bindgen` bindings of `wit/procd.wit`, the component's exports and
//!   imports. Nothing outside it touches the generated code.
//! - [`testing`] (native only): the test driver and its in-memory host.

#![deny(missing_docs)]

mod bytes;
pub mod collections;
mod config;
mod context;
mod error;
mod event;
mod handler;
mod log;
mod state;

#[cfg(target_arch = "wasm32")]
mod guest;
// Native only (tests run on the host), but documented whatever the target.
#[cfg(any(not(target_arch = "wasm32"), doc))]
pub mod testing;

pub use config::Config;
pub use context::{Context, ValueWriter};
pub use error::{Error, Result};
pub use event::{Event, Events, Headers};
pub use handler::{Handler, HandlerFn};
pub use log::{Level, log};
pub use state::State;

/// Exports a handler as the component's `init` and `handle`. Use it once per crate.
///
/// - `export!(MyHandler)`: a type implementing [`Handler`] and `Default` (the SDK creates it with
///   `Default`, then calls [`Handler::init`]).
/// - `export!(fn my_function)`: a function of type [`HandlerFn`],
///   `fn(&Event<'_>, &mut Context<'_>) -> procd_sdk::Result`.
///
/// On native targets it only checks the handler's type (so a wrong signature fails `cargo test` too);
/// on wasm it also emits the component's exports.
#[macro_export]
macro_rules! export {
    (fn $function:expr) => {
        const _: () = {
            #[derive(Default)]
            struct __ProcdFnHandler;

            impl $crate::Handler for __ProcdFnHandler {
                #[inline(always)]
                fn handle(
                    &mut self,
                    event: &$crate::Event<'_>,
                    ctx: &mut $crate::Context<'_>,
                ) -> $crate::Result {
                    // A wrong signature fails here, with the right one as "expected fn pointer". The call
                    // through the constant is a direct call once compiled.
                    const FUNCTION: $crate::HandlerFn = $function;
                    FUNCTION(event, ctx)
                }
            }

            $crate::export!(__ProcdFnHandler);
        };
    };
    ($handler:ty) => {
        const _: fn() = $crate::__private::assert_exportable::<$handler>;

        #[cfg(target_arch = "wasm32")]
        #[allow(unsafe_code)]
        const _: () = {
            type __ProcdGuest = $crate::__private::Guest<$handler>;
            $crate::__private::bindings::__export_procd_handler!(
                __ProcdGuest with_types_in $crate::__private::bindings
            );
        };
    };
}

/// Used by [`export!`]; not part of the API.
#[doc(hidden)]
pub mod __private {
    use crate::Handler;
    #[cfg(target_arch = "wasm32")]
    pub use crate::guest::{Guest, bindings};

    /// Fails to compile, with `Handler`'s message, unless `H` can be exported.
    pub fn assert_exportable<H: Handler + Default>() {}
}
