//! `tagged-counter`: guest-examples' `counter` with a version tag, for the hot-swap tests.
//!
//! It keeps the same state as `counter` (a u64 per key, 8 bytes LE, under the event's key) and emits,
//! for every event, `{"tag": <config tag>, "count": n}` with the event's key. Deploying it twice with
//! different tags makes every output say which version produced it, while the counts show whether
//! state carried over.
//!
//! Config: `tag` (required); `panic_on` (optional): an event whose value is exactly this text makes the
//! handler panic (a trap, which does not say which event was at fault), to exercise the host's isolation
//! of a poison event.

use procd_sdk::{Config, Context, Event, Handler, Result};

/// Counts events per key and tags every output.
#[derive(Default)]
pub struct TaggedCounter {
    tag: String,
    panic_on: Option<Vec<u8>>,
}

impl Handler for TaggedCounter {
    fn init(&mut self, config: &Config) -> Result {
        self.tag = config.require("tag")?.to_owned();
        self.panic_on = config.get("panic_on").map(|v| v.as_bytes().to_vec());
        Ok(())
    }

    fn handle(&mut self, event: &Event<'_>, ctx: &mut Context<'_>) -> Result {
        if self.panic_on.as_deref() == Some(event.value()) {
            panic!("poison event at offset {}", event.offset());
        }
        let count = ctx.state().add_u64(event.key(), 1)?;
        ctx.emit_json(
            0,
            event.key(),
            &serde_json::json!({"tag": self.tag, "count": count}),
        )
    }
}

procd_sdk::export!(TaggedCounter);
