//! The SDK's batch loop, state cache and failure handling, through the native test driver (which runs
//! the same code a component runs, against in-memory state).

use procd_sdk::testing::{EventFailure, HostCalls, TestDriver, TestEvent};
use procd_sdk::{Config, Context, Event, Events, Handler, Level, Result, State, bail};
use serde::{Deserialize, Serialize};

/// Counts per key; fails events whose value is `fail`.
#[derive(Default)]
struct Counter {
    prefetch: bool,
}

impl Handler for Counter {
    fn handle(&mut self, event: &Event<'_>, ctx: &mut Context<'_>) -> Result {
        if event.value() == b"fail" {
            bail!("asked to fail at offset {}", event.offset());
        }
        let n = ctx.state().add_u64(event.key(), 1)?;
        ctx.emit_with(0, event.key(), |w| w.push_decimal(n));
        Ok(())
    }

    fn prefetch(&mut self, events: Events<'_>, state: &mut State<'_>) {
        if self.prefetch {
            state.prefetch(events.map(|e| e.key()));
        }
    }
}

fn values(records: &[procd_sdk::testing::Record]) -> Vec<&str> {
    records.iter().map(|r| r.value_str()).collect()
}

#[test]
fn state_reads_hit_the_cache_and_writes_flush_once_per_batch() {
    let mut driver = TestDriver::new(Counter::default());
    let records = driver
        .send_batch([("a", "x"), ("b", "x"), ("a", "x"), ("a", "x")])
        .expect("no failure");
    assert_eq!(values(&records), ["1", "1", "2", "3"]);
    assert_eq!(
        driver.host_calls(),
        HostCalls {
            values: 1,
            get: 2,
            set_many: 1,
            ..HostCalls::default()
        }
    );
    assert_eq!(driver.state().get_u64("a"), Some(3));

    // The next batch reads the committed state from the host again.
    let records = driver.send("a", "x").expect("no failure");
    assert_eq!(values(&records), ["4"]);
    assert_eq!(driver.host_calls().get, 3);
}

#[test]
fn prefetch_loads_a_batch_with_one_call() {
    let mut driver = TestDriver::new(Counter { prefetch: true });
    driver.state_mut().set("b", 41u64.to_le_bytes());
    let records = driver
        .send_batch([("a", "x"), ("b", "x"), ("a", "x")])
        .expect("no failure");
    assert_eq!(values(&records), ["1", "42", "2"]);
    assert_eq!(
        driver.host_calls(),
        HostCalls {
            values: 1,
            get_many: 1,
            set_many: 1,
            ..HostCalls::default()
        }
    );
}

#[test]
fn a_failed_event_discards_the_batch_and_reports_its_index_and_offset() {
    let mut driver = TestDriver::new(Counter::default()).start_offset(100);
    let failure = driver
        .send_batch([("a", "x"), ("a", "fail"), ("a", "x")])
        .expect_err("event 1 fails");
    assert_eq!(
        failure,
        EventFailure {
            index: 1,
            offset: 101,
            message: "asked to fail at offset 101".into()
        }
    );
    assert!(driver.state().is_empty(), "a failed batch commits nothing");
    assert_eq!(
        driver.host_calls().set_many,
        0,
        "a failed batch does not flush"
    );
}

#[test]
fn process_batch_reruns_the_prefix_and_dead_letters_like_the_host() {
    let mut driver = TestDriver::new(Counter::default());
    let outcome = driver.process_batch([
        ("a", "x"),
        ("a", "fail"),
        ("a", "x"),
        ("b", "fail"),
        ("b", "x"),
    ]);
    assert_eq!(values(&outcome.records), ["1", "2", "1"]);
    let dead: Vec<(u32, u64)> = outcome
        .dead_letters
        .iter()
        .map(|f| (f.index, f.offset))
        .collect();
    assert_eq!(dead, [(1, 1), (3, 3)]);
    assert_eq!(driver.state().get_u64("a"), Some(2));
    assert_eq!(driver.state().get_u64("b"), Some(1));
}

/// Fails every event it sees for the second time: the host's prefix re-run exposes it.
#[derive(Default)]
struct Forgetful {
    seen: u64,
}

impl Handler for Forgetful {
    fn handle(&mut self, event: &Event<'_>, _ctx: &mut Context<'_>) -> Result {
        self.seen += 1;
        if self.seen > 2 {
            bail!("seen {} events", self.seen);
        }
        let _ = event;
        Ok(())
    }
}

#[test]
#[should_panic(expected = "handler is not deterministic")]
fn process_batch_catches_nondeterminism() {
    let mut driver = TestDriver::new(Forgetful::default());
    let _ = driver.process_batch([("a", "1"), ("a", "2"), ("a", "3")]);
}

/// Writes, deletes and reads back within one batch.
#[derive(Default)]
struct Scratch;

#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct Doc {
    n: u32,
}

impl Handler for Scratch {
    fn handle(&mut self, event: &Event<'_>, ctx: &mut Context<'_>) -> Result {
        let state = ctx.state();
        match event.value() {
            b"set" => state.set_json(event.key(), &Doc { n: 7 })?,
            b"delete" => state.delete(event.key()),
            b"big" => {
                state.set(event.key(), [0u8; 100]);
                return Ok(());
            }
            _ => {}
        }
        let seen: Option<Doc> = state.get_json(event.key())?;
        ctx.emit_json(0, event.key(), &seen)?;
        Ok(())
    }
}

#[test]
fn reads_see_the_batchs_own_writes_and_deletes() {
    let mut driver = TestDriver::new(Scratch);
    driver.state_mut().set("gone", br#"{"n":1}"#);
    let records = driver
        .send_batch([
            ("k", "get"),
            ("k", "set"),
            ("k", "get"),
            ("gone", "get"),
            ("gone", "delete"),
            ("gone", "get"),
        ])
        .expect("no failure");
    assert_eq!(
        values(&records),
        [
            "null",
            r#"{"n":7}"#,
            r#"{"n":7}"#,
            r#"{"n":1}"#,
            "null",
            "null"
        ]
    );
    assert_eq!(driver.state().get_json::<Doc>("k"), Some(Doc { n: 7 }));
    assert_eq!(driver.state().get("gone"), None);
    assert_eq!(
        driver.host_calls(),
        HostCalls {
            values: 1,
            get: 2,
            set_many: 1,
            delete_many: 1,
            ..HostCalls::default()
        }
    );
}

#[test]
fn a_refused_state_write_blames_the_event_that_wrote_it() {
    let mut driver = TestDriver::new(Scratch).max_state_value_bytes(50);
    let failure = driver
        .send_batch([("a", "set"), ("b", "big"), ("c", "set")])
        .expect_err("b's value is too big");
    assert_eq!(failure.index, 1);
    assert!(
        failure
            .message
            .starts_with("state write refused: a state value of 100 bytes"),
        "{failure}"
    );
    assert!(driver.state().is_empty());
}

#[test]
fn a_wrongly_typed_state_value_fails_the_event() {
    let mut driver = TestDriver::new(Counter::default());
    driver.state_mut().set("k", "not eight bytes");
    let failure = driver.send("k", "x").expect_err("not a u64");
    assert_eq!(
        failure.message,
        r#"state under "k" is not a u64: 15 bytes instead of 8"#
    );
}

/// Reports what it sees of the event and the context.
#[derive(Default)]
struct Echo {
    prefix: String,
}

impl Handler for Echo {
    fn init(&mut self, config: &Config) -> Result {
        self.prefix = config.require("prefix")?.to_owned();
        procd_sdk::info!("started with prefix {}", self.prefix);
        Ok(())
    }

    fn handle(&mut self, event: &Event<'_>, ctx: &mut Context<'_>) -> Result {
        let out = serde_json::json!({
            "prefix": self.prefix,
            "extra": ctx.config("extra"),
            "partition": ctx.partition(),
            "event_partition": event.partition(),
            "offset": event.offset(),
            "timestamp_ms": event.timestamp_ms(),
            "headers": event.headers().collect::<Vec<_>>(),
            "trace": event.header("TRACE-ID"),
        });
        ctx.log(Level::Debug, "echoing");
        ctx.emit_json(1, b"", &out)?;
        Ok(())
    }
}

#[test]
fn events_carry_offsets_timestamps_headers_and_the_context_config() {
    let mut driver = TestDriver::new(Echo::default())
        .config("prefix", "p")
        .config("extra", "e")
        .partition(7)
        .start_offset(5)
        .outputs(["first", "second"]);
    driver.set_time_ms(1_000);
    let records = driver
        .send_event(
            TestEvent::new("k", "v")
                .header("trace-id", "abc")
                .header("x", "y"),
        )
        .expect("no failure");
    assert_eq!(records.len(), 1);
    assert_eq!(
        (
            records[0].output,
            records[0].topic.as_deref(),
            records[0].key.as_slice()
        ),
        (1, Some("second"), &b""[..])
    );
    let out: serde_json::Value = records[0].value_json();
    assert_eq!(
        out,
        serde_json::json!({
            "prefix": "p", "extra": "e", "partition": 7, "event_partition": 7, "offset": 5, "timestamp_ms": 1000,
            "headers": [["trace-id", "abc"], ["x", "y"]], "trace": "abc",
        })
    );
    let logs: Vec<(Level, &str)> = driver
        .logs()
        .iter()
        .map(|l| (l.level, l.message.as_str()))
        .collect();
    assert_eq!(
        logs,
        [
            (Level::Info, "started with prefix p"),
            (Level::Debug, "echoing")
        ]
    );
}

#[test]
fn init_errors_name_the_missing_key() {
    let mut driver = TestDriver::new(Echo::default());
    let err = driver.init().expect_err("prefix is required");
    assert_eq!(err.message(), "missing config key `prefix`");
}

#[test]
#[should_panic(
    expected = "the handler emitted to output 1, but the driver declares 1 output topics"
)]
fn emitting_past_the_declared_outputs_fails_the_test() {
    let mut driver = TestDriver::new(Echo::default())
        .config("prefix", "p")
        .outputs(["only"]);
    let _ = driver.send("k", "v");
}

fn upper(event: &Event<'_>, ctx: &mut Context<'_>) -> Result {
    ctx.emit(0, event.key(), event.value_str()?.to_uppercase());
    Ok(())
}

// The function form, exported from a module as users may.
mod exported {
    procd_sdk::export!(fn super::upper);
}

#[test]
fn emit_json_failure_emits_nothing() {
    struct Bad;
    impl Serialize for Bad {
        fn serialize<S: serde::Serializer>(&self, _: S) -> std::result::Result<S::Ok, S::Error> {
            Err(serde::ser::Error::custom("no"))
        }
    }
    #[derive(Default)]
    struct Emitter;
    impl Handler for Emitter {
        fn handle(&mut self, event: &Event<'_>, ctx: &mut Context<'_>) -> Result {
            ctx.emit(0, "before", "1");
            assert!(ctx.emit_json(0, "bad", &Bad).is_err());
            ctx.emit(0, event.key(), "2");
            Ok(())
        }
    }
    let records = TestDriver::new(Emitter)
        .send("after", "")
        .expect("no failure");
    let pairs: Vec<(&str, &str)> = records
        .iter()
        .map(|r| (r.key_str(), r.value_str()))
        .collect();
    assert_eq!(pairs, [("before", "1"), ("after", "2")]);
}

/// Writes `value` repeated `n` times under the key (n from the value's length), then reads it back.
#[derive(Default)]
struct Grower;

impl Handler for Grower {
    fn handle(&mut self, event: &Event<'_>, ctx: &mut Context<'_>) -> Result {
        let state = ctx.state();
        let before = state.get(event.key()).map_or(0, <[u8]>::len);
        let len = event.value().len();
        state.set(event.key(), vec![b'x'; len]);
        let after = state.get(event.key()).map(<[u8]>::to_vec);
        if after.as_deref() != Some(&vec![b'x'; len][..]) {
            bail!("read back {after:?} after writing {len} bytes");
        }
        ctx.emit(0, event.key(), format!("{before}->{len}"));
        Ok(())
    }
}

#[test]
fn the_cache_grows_and_rewrites_values_of_any_length() {
    let mut driver = TestDriver::new(Grower);
    // 500 distinct keys (the table starts at 64 slots), each rewritten shorter, then longer.
    let mut events = Vec::new();
    for round in [40usize, 3, 90] {
        for i in 0..500 {
            events.push((format!("key-{i}"), "v".repeat(round + i % 7)));
        }
    }
    let records = driver.send_batch(&events).expect("no failure");
    assert_eq!(records.len(), 1500);
    assert_eq!(records[0].value_str(), "0->40");
    assert_eq!(records[500].value_str(), "40->3");
    assert_eq!(records[1000].value_str(), "3->90");
    assert_eq!(records[1499].value_str(), "5->92");
    assert_eq!(driver.state().len(), 500);
    assert_eq!(driver.state().get("key-499"), Some(&vec![b'x'; 92][..]));
    assert_eq!(
        driver.host_calls(),
        HostCalls {
            values: 1,
            get: 500,
            set_many: 1,
            ..HostCalls::default()
        }
    );
}

#[test]
fn prefetched_missing_keys_are_not_asked_again_and_blind_writes_ask_nothing() {
    let mut driver = TestDriver::new(Counter { prefetch: true });
    driver
        .send_batch([("a", "x"), ("a", "x")])
        .expect("no failure");
    assert_eq!(
        driver.host_calls(),
        HostCalls {
            values: 1,
            get_many: 1,
            set_many: 1,
            ..HostCalls::default()
        }
    );

    let mut driver = TestDriver::new(Scratch);
    driver
        .send_batch([("k", "delete"), ("k", "set")])
        .expect("no failure");
    assert_eq!(
        driver.host_calls().get,
        0,
        "a delete and a set need no read"
    );
    assert_eq!(driver.state().get_json::<Doc>("k"), Some(Doc { n: 7 }));
}

/// Forwards events to output 1 if their key starts with `fwd`, else emits them with `emit` (reading the
/// value) to output 0.
#[derive(Default)]
struct Router;

impl Handler for Router {
    fn handle(&mut self, event: &Event<'_>, ctx: &mut Context<'_>) -> Result {
        if event.key().starts_with(b"fwd") {
            ctx.forward(1, event);
        } else {
            ctx.emit(0, event.key(), event.value());
        }
        Ok(())
    }
}

#[test]
fn forward_emits_the_event_itself_without_fetching_values() {
    let mut driver = TestDriver::new(Router).outputs(["emitted", "forwarded"]);
    let records = driver
        .send_batch([("fwd-1", r#"{"a":1}"#), ("fwd-2", "raw"), ("", "x")])
        .expect("no failure");
    let got: Vec<(&str, &str, &str)> = records
        .iter()
        .map(|r| {
            (
                r.topic.as_deref().unwrap_or("?"),
                r.key_str(),
                r.value_str(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("forwarded", "fwd-1", r#"{"a":1}"#),
            ("forwarded", "fwd-2", "raw"),
            ("emitted", "", "x"),
        ]
    );
    assert_eq!(
        driver.host_calls().values,
        1,
        "the last event read its value"
    );

    driver
        .send_batch([("fwd-a", "1"), ("fwd-b", "2")])
        .expect("no failure");
    assert_eq!(
        driver.host_calls().values,
        1,
        "a batch only forwarded fetches no values"
    );
}

#[test]
fn values_are_fetched_once_per_batch_that_reads_one() {
    let mut driver = TestDriver::new(Router);
    let records = driver
        .send_batch([("a", "1"), ("b", "22"), ("c", "333")])
        .expect("no failure");
    assert_eq!(values(&records), ["1", "22", "333"]);
    assert_eq!(driver.host_calls().values, 1);
    driver.send("d", "4").expect("no failure");
    assert_eq!(driver.host_calls().values, 2);
}
