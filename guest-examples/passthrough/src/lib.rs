//! `passthrough`: emits every event unchanged (same key, same value) to output 0.
//!
//! The cheapest possible handler, used to measure the boundary: per event it forwards the event with
//! `Context::forward`, which names the input event instead of copying its key and value (the host
//! writes the input's own bytes), and nothing else. It never reads a value, so the batch's values are
//! never fetched into the component. Headers and timestamps are not carried over (an output record has
//! only a topic, a key and a value).

use procd_sdk::{Context, Event, Result};

/// Emits `event` to output 0 as it is.
pub fn passthrough(event: &Event<'_>, ctx: &mut Context<'_>) -> Result {
    ctx.forward(0, event);
    Ok(())
}

procd_sdk::export!(fn passthrough);

#[cfg(test)]
mod tests {
    use procd_sdk::testing::{HostCalls, TestDriver};

    use super::*;

    #[derive(Default)]
    struct Passthrough;

    impl procd_sdk::Handler for Passthrough {
        fn handle(&mut self, event: &Event<'_>, ctx: &mut Context<'_>) -> Result {
            passthrough(event, ctx)
        }
    }

    #[test]
    fn emits_every_event_unchanged_in_order() {
        let mut driver = TestDriver::new(Passthrough).outputs(["out"]);
        let records = driver
            .send_batch([("a", "1"), ("", "no key"), ("b", "")])
            .expect("passthrough never fails");
        let got: Vec<(u16, &str, &str)> = records
            .iter()
            .map(|r| (r.output, r.key_str(), r.value_str()))
            .collect();
        assert_eq!(got, [(0, "a", "1"), (0, "", "no key"), (0, "b", "")]);
        assert!(driver.state().is_empty());
        assert_eq!(
            driver.host_calls(),
            HostCalls::default(),
            "no state, and the values are never fetched"
        );
    }

    #[test]
    fn binary_values_pass_untouched() {
        let mut driver = TestDriver::new(Passthrough);
        let value = [0u8, 255, 10, 13];
        let records = driver
            .send([1u8, 2], value)
            .expect("passthrough never fails");
        assert_eq!(
            (records[0].key.as_slice(), records[0].value.as_slice()),
            (&[1u8, 2][..], &value[..])
        );
    }
}
