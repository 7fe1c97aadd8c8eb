//! `counter`: a running count of events per key.
//!
//! State: one entry per distinct key, the count as a `u64` in 8 little-endian bytes (the SDK's
//! `State::add_u64` encoding), stored under the event's key as it is. Keyless events (empty key) are
//! counted together under the empty key.
//!
//! Output: for every event, one record to output 0 with the event's key and the new count as **plain
//! decimal ASCII** (`1`, `2`, ... — also a valid JSON number), e.g. key `user-7`, value `3`.
//!
//! Before each batch it loads the counts of all the batch's keys with one `get-many` host call; the
//! batch's new counts go back with one `set-many`. It never reads a value, so the batch's values are
//! never fetched into the component.

use procd_sdk::{Context, Event, Events, Handler, Result, State};

/// Counts events per key.
#[derive(Default)]
pub struct Counter;

impl Handler for Counter {
    fn prefetch(&mut self, events: Events<'_>, state: &mut State<'_>) {
        state.prefetch(events.map(|event| event.key()));
    }

    fn handle(&mut self, event: &Event<'_>, ctx: &mut Context<'_>) -> Result {
        let count = ctx.state().add_u64(event.key(), 1)?;
        ctx.emit_with(0, event.key(), |value| value.push_decimal(count));
        Ok(())
    }
}

procd_sdk::export!(Counter);

#[cfg(test)]
mod tests {
    use procd_sdk::testing::{HostCalls, TestDriver};

    use super::*;

    #[test]
    fn counts_per_key_across_batches() {
        let mut driver = TestDriver::new(Counter).outputs(["counts"]);
        let records = driver
            .send_batch([("a", "x"), ("b", "x"), ("a", "x"), ("", "x")])
            .expect("counting never fails");
        let got: Vec<(&str, &str)> = records
            .iter()
            .map(|r| (r.key_str(), r.value_str()))
            .collect();
        assert_eq!(got, [("a", "1"), ("b", "1"), ("a", "2"), ("", "1")]);

        let records = driver.send("a", "x").expect("counting never fails");
        assert_eq!(records[0].value_str(), "3");
        assert_eq!(driver.state().get_u64("a"), Some(3));
        assert_eq!(driver.state().get_u64("b"), Some(1));
        assert_eq!(driver.state().get_u64(""), Some(1));
    }

    #[test]
    fn one_bulk_read_and_one_bulk_write_per_batch_and_no_values() {
        let mut driver = TestDriver::new(Counter);
        let events: Vec<(String, &str)> = (0..100).map(|i| (format!("k{}", i % 7), "x")).collect();
        driver.send_batch(events).expect("counting never fails");
        assert_eq!(
            driver.host_calls(),
            HostCalls {
                get_many: 1,
                set_many: 1,
                ..HostCalls::default()
            }
        );
        assert_eq!(driver.state().len(), 7);
    }

    #[test]
    fn continues_from_existing_state_and_rejects_foreign_values() {
        let mut driver = TestDriver::new(Counter);
        driver.state_mut().set("seeded", 41u64.to_le_bytes());
        driver.state_mut().set("text", "41");
        assert_eq!(
            driver.send("seeded", "").expect("a u64 count")[0].value_str(),
            "42"
        );
        let failure = driver.send("text", "").expect_err("not a u64");
        assert_eq!(
            failure.message,
            r#"state under "text" is not a u64: 2 bytes instead of 8"#
        );
    }
}
