//! The handler trait, the function form, and the batch loop both share.

use crate::context::{Current, Outputs};
use crate::event::{Columns, Events};
use crate::state::{Backend, BatchKeys, Cache};
use crate::{Config, Context, Error, Event, State};

/// A procd handler: called once per event, in offset order, with the batch's [`Context`].
///
/// Export it with [`export!`](crate::export) (which also requires `Default`: the SDK creates the value,
/// then calls [`init`](Handler::init) with the deploy-time configuration). One value lives per partition,
/// for as long as the host keeps the instance; the host may rebuild it at any time (after a trap, on a
/// redeploy), so anything that must survive belongs in [`State`], not in fields.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a procd handler",
    label = "this type does not implement `procd_sdk::Handler`",
    note = "implement it: `impl procd_sdk::Handler for {Self} {{ fn handle(&mut self, event: &procd_sdk::Event<'_>, ctx: &mut procd_sdk::Context<'_>) -> procd_sdk::Result {{ .. }} }}`",
    note = "or export a plain function with `procd_sdk::export!(fn my_function)`"
)]
pub trait Handler: 'static {
    /// Called once before the first batch with the deploy-time configuration. An error refuses the
    /// deployment; say which key is wrong and what would be right ([`Config::require`] and
    /// [`Config::parse`] do).
    fn init(&mut self, config: &Config) -> Result<(), Error> {
        let _ = config;
        Ok(())
    }

    /// Handles one event. Return `Err` to fail this event only: the host sends it to the dead-letter log
    /// with your message and carries on after it. Everything this batch emitted or wrote is discarded and
    /// the events before the failing one are handled again, so a handler must be deterministic.
    fn handle(&mut self, event: &Event<'_>, ctx: &mut Context<'_>) -> Result<(), Error>;

    /// Called once per batch before its first event, to load state in bulk: pass every key the batch will
    /// read to [`State::prefetch`] and one host call replaces one per key. Optional; the default does
    /// nothing and reads load on demand.
    fn prefetch(&mut self, events: Events<'_>, state: &mut State<'_>) {
        let _ = (events, state);
    }
}

/// The signature of a handler function exported with `export!(fn name)`:
/// `fn(&Event<'_>, &mut Context<'_>) -> procd_sdk::Result`. The macro coerces the function to this type,
/// so a wrong signature fails to compile with this signature as "expected".
pub type HandlerFn =
    for<'e, 'a, 'c, 'x> fn(&'e Event<'a>, &'c mut Context<'x>) -> Result<(), Error>;

/// One event failed (or the batch could not be committed): the `event-error` of the WIT.
#[derive(Debug)]
pub(crate) struct Failure {
    pub index: u32,
    pub message: String,
}

/// A handler with what it keeps across batches: its configuration and the (emptied) state cache.
pub(crate) struct Runtime<H> {
    pub handler: H,
    pub config: Config,
    cache: Cache,
}

impl<H: Handler> Runtime<H> {
    /// Creates the handler's runtime and runs its `init`.
    pub fn start(mut handler: H, config: Config) -> Result<Self, Error> {
        handler.init(&config)?;
        Ok(Runtime {
            handler,
            config,
            cache: Cache::default(),
        })
    }

    /// Handles one batch: every event in order, then one flush of the state writes. On the first failing
    /// event, stops and reports it; its outputs and writes are dropped (the host discards them anyway).
    pub fn handle(
        &mut self,
        batch: Columns<'_>,
        backend: &mut dyn Backend,
    ) -> Result<Outputs, Failure> {
        self.cache.clear(batch.len());
        let mut outputs =
            Outputs::with_capacity(batch.len(), batch.keys.len(), batch.value_bytes());
        let mut ctx = Context {
            outputs: &mut outputs,
            values: batch.values,
            state: State {
                cache: &mut self.cache,
                backend,
                writer: 0,
                keys: BatchKeys {
                    keys: batch.keys,
                    key_ends: batch.key_ends,
                },
                own_key: (0, 0),
            },
            config: &self.config,
            partition: batch.partition,
        };
        self.handler.prefetch(Events::new(&batch), &mut ctx.state);
        let mut cursor = batch.cursor();
        let mut index = 0usize;
        while let Some(event) = cursor.next_event() {
            let event = event.map_err(|message| failure(index, message))?;
            index += 1;
            ctx.state.writer = event.index();
            ctx.state.own_key = (event.key().as_ptr() as usize, event.key().len());
            ctx.outputs.current = Current {
                key: (event.key().as_ptr() as usize, event.key().len()),
                value: event.value_range(),
                source: event.index() + 1,
            };
            if let Err(error) = self.handler.handle(&event, &mut ctx) {
                return Err(Failure {
                    index: event.index(),
                    message: error.to_string(),
                });
            }
        }
        let Context { state, .. } = ctx;
        state.cache.flush(state.backend).map_err(|e| Failure {
            index: e.index,
            message: e.message,
        })?;
        Ok(outputs)
    }
}

/// A failure of event `index`.
fn failure(index: usize, message: String) -> Failure {
    // Batches come through `list<u64>` in 32-bit guest memory (or the test driver, which caps them).
    Failure {
        index: u32::try_from(index).unwrap_or(u32::MAX),
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Values;

    /// A partition without state.
    struct NoState;

    impl Backend for NoState {
        fn get(&mut self, _: &[u8]) -> Option<Vec<u8>> {
            None
        }
        fn get_many(&mut self, _: &[u8], ends: &[u32]) -> (Vec<u8>, Vec<u32>, Vec<bool>) {
            (Vec::new(), vec![0; ends.len()], vec![false; ends.len()])
        }
        fn set(&mut self, _: &[u8], _: &[u8]) -> Result<(), String> {
            Ok(())
        }
        fn set_many(&mut self, _: &[u8], _: &[u32], _: &[u8], _: &[u32]) -> Result<(), String> {
            Ok(())
        }
        fn delete_many(&mut self, _: &[u8], _: &[u32]) {}
    }

    /// Event 0: its own key and value. Event 1: a copy of its value. Event 2: forwarded.
    #[derive(Default)]
    struct Mixed;

    impl Handler for Mixed {
        fn handle(&mut self, event: &Event<'_>, ctx: &mut Context<'_>) -> Result<(), Error> {
            match event.index() {
                0 => ctx.emit(0, event.key(), event.value()),
                // A copy on purpose: the same bytes elsewhere are not forwarded.
                #[allow(clippy::unnecessary_to_owned)]
                1 => ctx.emit(0, event.key(), event.value().to_vec()),
                _ => ctx.forward(0, event),
            }
            Ok(())
        }
    }

    #[test]
    fn emitting_the_events_own_value_forwards_it_once_values_are_fetched() {
        let fetch = || b"aabbcc".to_vec();
        let values = Values::new(&fetch);
        let batch = Columns {
            partition: 0,
            offsets: &[0, 1, 2],
            timestamps_ms: &[0, 0, 0],
            keys: b"xyz",
            key_ends: &[1, 2, 3],
            values: &values,
            value_ends: &[2, 4, 6],
            headers: &[],
            header_ends: &[0, 0, 0],
        };
        let mut runtime = Runtime::start(Mixed, Config::new(Vec::new())).expect("no init");
        let out = runtime.handle(batch, &mut NoState).expect("no failure");
        assert_eq!(out.value_sources, [1, 0, 3]);
        assert_eq!(out.values, b"bb");
        assert_eq!(out.key_sources, [1, 2, 3]);
        assert!(out.keys.is_empty());
    }
}
