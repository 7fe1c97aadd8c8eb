//! Hostile handlers (issue: fault isolation). Each test deploys `tests/guests/hostile` in one mode beside
//! the well-behaved `counter` on the same topic, posts events of which one is the poison (value `666`),
//! and checks: the server stays up, the poison event alone lands in the dead-letter log with a reason a
//! person can read, every other event goes through the hostile handler, the breaker does not trip for
//! one bad event among many, and the counter's outputs are complete and correct.

use serde_json::{Value, json};

use crate::handlers::{
    PARTITIONS, check_counter, counter_outputs, dead_letters, deploy_ok, partitions, post_all,
    read_topic, test_guest, wait_processed,
};
use crate::harness::guests::example;
use crate::harness::{TestHost, TestResult, ensure_status};

/// Per-batch deadline of the servers here: short, so halving a looping batch takes seconds.
const DEADLINE_MS: u64 = 300;
/// Events posted per test; the one at `POISON_AT` is the trigger.
const EVENTS: usize = 40;
const POISON_AT: usize = 17;

/// Runs `mode` (with `extra` config) beside the counter on a server with `settings` (the short
/// deadline unless they say otherwise); returns the dead letters of the hostile handler.
/// [`EVENTS`] events over 5 keys; the one at [`POISON_AT`] is the hostile guest's trigger (`on=666`).
fn poisoned_events() -> Vec<(Option<String>, Value)> {
    (0..EVENTS)
        .map(|i| {
            let value = if i == POISON_AT { json!(666) } else { json!(i) };
            (Some(format!("k{}", i % 5)), value)
        })
        .collect()
}

async fn beside_counter(mode: &str, extra: &[&str], settings: &[&str]) -> TestResult<Vec<Value>> {
    let deadline = format!("handler.deadline_ms={DEADLINE_MS}");
    let mut all = vec![deadline.as_str()];
    all.extend_from_slice(settings);
    let host = TestHost::start_with(PARTITIONS, 2, &all)?;
    host.create_topics(&["in", "out", "bad-out"]).await?;
    deploy_ok(&host, "good", example("counter")?, "in", &["out"], &[], 1).await?;
    let mode_config = format!("config=mode={mode}");
    let mut config = vec![mode_config.as_str(), "config=on=666"];
    config.extend_from_slice(extra);
    deploy_ok(
        &host,
        "bad",
        test_guest("hostile")?,
        "in",
        &["bad-out"],
        &config,
        1,
    )
    .await?;

    let placed = post_all(&host, "in", &poisoned_events()).await?;
    let poison = &placed[POISON_AT];

    wait_processed(&host, "good", "in").await?;
    let inputs = read_topic(&host, "in").await?;
    check_counter(&inputs, &read_topic(&host, "out").await?);

    // The hostile handler gets past the poison event and handles everything else.
    let status = wait_processed(&host, "bad", "in").await?;
    for p in partitions(&status) {
        assert_ne!(
            p["status"], "tripped",
            "one bad event among many trips nothing: {p}"
        );
    }
    let passed: usize = read_topic(&host, "bad-out")
        .await?
        .iter()
        .map(Vec::len)
        .sum();
    let dead = dead_letters(&host, "bad", "").await?;
    let poisoned = dead.len();
    assert_eq!(
        passed,
        EVENTS - poisoned,
        "every other event went through: {dead:?}"
    );
    if let Some(d) = dead.first() {
        assert_eq!(
            (d["partition"].as_u64(), d["offset"].as_u64(), &d["value"]),
            (
                Some(u64::from(poison.partition)),
                Some(poison.offset),
                &json!(666)
            ),
            "the poison event and only it is dead-lettered: {dead:?}"
        );
    }
    // Still serving.
    let health = host.admin()?.get("/readyz").await?;
    assert_eq!(health.status, 200);
    Ok(dead)
}

#[tokio::test]
async fn removing_a_looping_handler_holds_up_no_other_handler() -> TestResult {
    // A 2 s deadline and 4 deadlines of cooling down after each miss: isolating the poison event
    // takes the looping task's step well over 20 s.
    let host = TestHost::start_with(PARTITIONS, 2, &["handler.deadline_ms=2000"])?;
    host.create_topics(&["in", "out", "bad-out"]).await?;
    deploy_ok(
        &host,
        "bad",
        test_guest("hostile")?,
        "in",
        &["bad-out"],
        &["config=mode=loop", "config=on=666"],
        1,
    )
    .await?;
    post_all(&host, "in", &poisoned_events()).await?;
    // Let the loop begin, then remove the handler in the middle of its step.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    ensure_status(&host.admin()?.delete("/v1/handlers/bad").await?, 200)?;

    // A handler deployed now starts on every partition at once, the looping one's cell included.
    let started = std::time::Instant::now();
    deploy_ok(&host, "good", example("counter")?, "in", &["out"], &[], 1).await?;
    wait_processed(&host, "good", "in").await?;
    check_counter(
        &read_topic(&host, "in").await?,
        &read_topic(&host, "out").await?,
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(15),
        "the new handler waited for the removed one's step: {:?}",
        started.elapsed()
    );
    Ok(())
}

fn reason(dead: &[Value]) -> String {
    assert_eq!(dead.len(), 1, "exactly the poison event: {dead:?}");
    dead[0]["error"].as_str().unwrap_or_default().to_string()
}

#[tokio::test]
async fn an_infinite_loop_is_cut_by_the_deadline() -> TestResult {
    let why = reason(&beside_counter("loop", &[], &[]).await?);
    assert!(
        why.contains(&format!("deadline of {DEADLINE_MS} ms exceeded")),
        "{why}"
    );
    Ok(())
}

#[tokio::test]
async fn a_memory_bomb_hits_the_memory_limit() -> TestResult {
    let why = reason(&beside_counter("memory", &[], &[]).await?);
    assert!(why.contains("memory limit 64 MiB exceeded"), "{why}");
    Ok(())
}

#[tokio::test]
async fn a_handler_can_ask_for_tighter_limits_than_the_server() -> TestResult {
    let why = reason(&beside_counter("memory", &["limit.max_memory_bytes=16777216"], &[]).await?);
    assert!(why.contains("memory limit 16 MiB exceeded"), "{why}");
    Ok(())
}

#[tokio::test]
async fn a_limit_above_the_servers_is_refused_at_deploy() -> TestResult {
    let host = TestHost::start()?;
    host.create_topic("in").await?;
    let too_much = "limit.deadline_ms=5000";
    let resp = host
        .deploy(
            "bad",
            test_guest("hostile")?,
            "in",
            &[],
            &["config=mode=loop", too_much],
        )
        .await?;
    ensure_status(&resp, 400)?;
    let v = resp.json()?;
    assert_eq!(v["error"], "invalid_limit", "{v}");
    assert!(
        v["detail"].as_str().is_some_and(|d| d.contains("1..=1000")),
        "names the server's maximum: {v}"
    );
    let resp = host
        .deploy(
            "bad",
            test_guest("hostile")?,
            "in",
            &[],
            &["config=mode=loop", "limit.bogus=1"],
        )
        .await?;
    ensure_status(&resp, 400)?;
    let resp = host.admin()?.get("/v1/handlers/bad").await?;
    ensure_status(&resp, 404)?;
    Ok(())
}

#[tokio::test]
async fn a_batchs_values_are_not_there_outside_a_batch() -> TestResult {
    let host = TestHost::start()?;
    host.create_topic("in").await?;
    // Deploying runs `init`, which asks for values before any batch (and after none).
    let resp = host
        .deploy(
            "bad",
            test_guest("hostile")?,
            "in",
            &[],
            &["config=mode=loop", "config=values_in_init=1"],
        )
        .await?;
    ensure_status(&resp, 400)?;
    let v = resp.json()?;
    assert_eq!(v["error"], "invalid_component", "{v}");
    assert!(
        v["detail"]
            .as_str()
            .is_some_and(|d| d.contains("input.values was called outside `handle`")),
        "the trap says why: {v}"
    );
    Ok(())
}

#[tokio::test]
async fn unbounded_recursion_exhausts_the_stack() -> TestResult {
    let why = reason(&beside_counter("recursion", &[], &[]).await?);
    assert!(why.contains("stack overflow"), "{why}");
    Ok(())
}

#[tokio::test]
async fn a_small_wasm_stack_is_exhausted_first_and_says_so() -> TestResult {
    let settings = ["handler.max_wasm_stack_bytes=65536"];
    let why = reason(&beside_counter("recursion", &[], &settings).await?);
    assert!(
        why.starts_with("trap: stack overflow: the handler ran out of its 64 KiB wasm stack"),
        "{why}"
    );
    Ok(())
}

#[tokio::test]
async fn a_panic_on_one_key_costs_that_event_only() -> TestResult {
    let why = reason(&beside_counter("panic", &[], &[]).await?);
    assert!(why.contains("hostile panic on offset"), "{why}");
    Ok(())
}

#[tokio::test]
async fn an_output_flood_is_refused_by_a_limit() -> TestResult {
    // A debug build of the host takes a while to copy a million records out of the guest: a deadline
    // that leaves room for it, so the output limit is what stops the flood.
    let settings = [
        "handler.deadline_ms=20000",
        "handler.max_outputs_per_batch=10000",
    ];
    let why = reason(&beside_counter("flood", &[], &settings).await?);
    assert!(
        why.contains("output limit exceeded: 1000000 records in one batch; the limit is 10000"),
        "{why}"
    );
    Ok(())
}

#[tokio::test]
async fn log_spam_is_rate_limited_and_costs_nothing() -> TestResult {
    let dead = beside_counter("logspam", &[], &[]).await?;
    assert!(dead.is_empty(), "{dead:?}");
    Ok(())
}

#[tokio::test]
async fn a_slow_handler_is_slow_but_loses_nothing() -> TestResult {
    // Each trigger spins for a while; batches that run past the deadline are halved until they fit.
    let dead = beside_counter("slow", &["config=spin=3000000"], &[]).await?;
    assert!(dead.is_empty(), "{dead:?}");
    Ok(())
}

/// What the counter under a `max_state_bytes` limit should do with one partition's input: per event,
/// `Some(count)` or `None` for an event whose new key does not fit (it is dead-lettered). An entry
/// counts its key's bytes and the count's 8.
fn counts_within(events: &[Value], limit: usize) -> Vec<Option<u64>> {
    let mut counts: std::collections::HashMap<String, u64> = Default::default();
    let mut bytes = 0;
    events
        .iter()
        .map(|e| {
            let key = e["key"].as_str().unwrap_or_default().to_string();
            if let Some(n) = counts.get_mut(&key) {
                *n += 1;
                return Some(*n);
            }
            if bytes + key.len() + 8 > limit {
                return None;
            }
            bytes += key.len() + 8;
            counts.insert(key, 1);
            Some(1)
        })
        .collect()
}

#[tokio::test]
async fn state_bytes_per_partition_are_limited_and_the_count_survives_a_restart() -> TestResult {
    const LIMIT: usize = 55; // five 3-byte keys with their 8-byte counts per partition
    let mut host = TestHost::start()?;
    host.create_topics(&["in", "out"]).await?;
    let limit = format!("limit.max_state_bytes={LIMIT}");
    deploy_ok(
        &host,
        "c",
        example("counter")?,
        "in",
        &["out"],
        &[&limit],
        1,
    )
    .await?;
    // 40 keys, each twice: about five keys per partition, so some partitions fill up.
    let keys: Vec<String> = (0..40).map(|i| format!("k{i:02}")).collect();
    let events: Vec<(Option<String>, Value)> = keys
        .iter()
        .chain(&keys)
        .map(|k| (Some(k.clone()), json!(1)))
        .collect();
    post_all(&host, "in", &events).await?;
    wait_processed(&host, "c", "in").await?;

    let check = |inputs: &[Vec<Value>], outputs: &[Vec<Value>], dead: &[Value]| {
        let mut refused = 0;
        for (p, (inp, out)) in inputs.iter().zip(outputs).enumerate() {
            let expected = counts_within(inp, LIMIT);
            let kept: Vec<(Option<String>, Option<u64>)> = inp
                .iter()
                .zip(&expected)
                .filter_map(|(e, n)| n.map(|n| (e["key"].as_str().map(String::from), Some(n))))
                .collect();
            assert_eq!(
                counter_outputs(out),
                kept,
                "partition {p}: counts within the limit"
            );
            let refused_here: Vec<u64> = inp
                .iter()
                .zip(&expected)
                .filter(|(_, n)| n.is_none())
                .filter_map(|(e, _)| e["offset"].as_u64())
                .collect();
            let mut dead_here: Vec<u64> = dead
                .iter()
                .filter(|d| d["partition"].as_u64() == Some(p as u64))
                .filter_map(|d| d["offset"].as_u64())
                .collect();
            dead_here.sort_unstable();
            assert_eq!(
                dead_here, refused_here,
                "partition {p}: the events over the limit"
            );
            refused += refused_here.len();
        }
        refused
    };
    let dead = dead_letters(&host, "c", "?limit=1000").await?;
    let refused = check(
        &read_topic(&host, "in").await?,
        &read_topic(&host, "out").await?,
        &dead,
    );
    assert!(refused > 0, "some partition must have filled up");
    // Each refused event failed a call as a state-limit error (halving may add more calls).
    let m = crate::metrics::scrape(&host).await?;
    let state_errors = m.sum(
        "procd_handler_errors_total",
        &[("handler", "c"), ("kind", "state")],
    );
    assert!(state_errors >= refused as f64, "{state_errors} < {refused}");
    for d in &dead {
        let why = d["error"].as_str().unwrap_or_default();
        assert!(
            why.starts_with("state write refused: partition state would grow to ")
                && why.ends_with(&format!("; the limit is {LIMIT} bytes (max_state_bytes)")),
            "{why}"
        );
    }

    // After a restart the count is read back from storage: full partitions stay full.
    host.restart()?;
    post_all(&host, "in", &events).await?;
    wait_processed(&host, "c", "in").await?;
    let dead = dead_letters(&host, "c", "?limit=1000").await?;
    let refused_now = check(
        &read_topic(&host, "in").await?,
        &read_topic(&host, "out").await?,
        &dead,
    );
    assert_eq!(refused_now, refused * 2, "the same keys are refused again");
    Ok(())
}

#[tokio::test]
async fn the_watchdog_reports_a_cell_whose_processing_is_stuck() -> TestResult {
    // A deadline far longer than the watchdog's threshold: the loop holds the cell's processor.
    let host = TestHost::start_with(
        PARTITIONS,
        2,
        &["handler.deadline_ms=60000", "cell.processing_stall_ms=500"],
    )?;
    host.create_topics(&["in", "bad-out"]).await?;
    let config = ["config=mode=loop", "config=on=666"];
    deploy_ok(
        &host,
        "bad",
        test_guest("hostile")?,
        "in",
        &["bad-out"],
        &config,
        1,
    )
    .await?;
    let mut admin = host.admin()?;
    let ready = admin.get("/readyz").await?;
    assert_eq!(ready.status, 200);
    assert_eq!(
        ready.json()?["stalled"],
        json!([]),
        "nothing stalls while idle"
    );

    let placed = post_all(&host, "in", &[(Some("k".to_string()), json!(666))]).await?;
    let cell = u64::from(placed[0].partition % 2);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let ready = admin.get("/readyz").await?;
        assert_eq!(
            ready.status, 200,
            "a stalled processor does not make the server unready"
        );
        let v = ready.json()?;
        if let Some(stalled) = v["stalled"].as_array().and_then(|s| s.first()) {
            assert_eq!(stalled["cell"].as_u64(), Some(cell), "{v}");
            assert_eq!(
                (stalled["handler"].as_str(), stalled["partition"].as_u64()),
                (Some("bad"), Some(u64::from(placed[0].partition))),
                "{v}"
            );
            assert!(
                stalled["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("1 events wait")),
                "{v}"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the watchdog never noticed: {v}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    Ok(())
}

#[tokio::test]
async fn a_lagging_partition_refuses_only_its_own_writes_until_it_catches_up() -> TestResult {
    let host = TestHost::start_with(
        PARTITIONS,
        2,
        &[
            "handler.deadline_ms=500",
            "admission.lag_high_events=5",
            "admission.lag_low_events=2",
        ],
    )?;
    host.create_topics(&["in", "bad-out"]).await?;
    let config = ["config=mode=loop", "config=on=666"];
    deploy_ok(
        &host,
        "bad",
        test_guest("hostile")?,
        "in",
        &["bad-out"],
        &config,
        1,
    )
    .await?;
    // The trigger holds partition p's handler for a deadline or more; events keep arriving behind it.
    let key = |k: &str| Some(k.to_string());
    let first = post_all(&host, "in", &[(key("k"), json!(666))]).await?;
    let p = first[0].partition;
    let behind: Vec<_> = (0..10).map(|i| (key("k"), json!(i))).collect();
    post_all(&host, "in", &behind).await?;
    let other = (0..100)
        .map(|i| format!("o{i}"))
        .find(|k| procd::ingest::partitioner::route(Some(k.as_bytes()), None, PARTITIONS) != p)
        .ok_or("no key for another partition")?;

    let mut data = host.data()?;
    let body = |keys: &[&str]| -> String {
        keys.iter()
            .map(|k| format!("{{\"key\":\"{k}\",\"value\":1}}\n"))
            .collect()
    };
    // Lag 11 > 5: p refuses, another partition does not; a mixed request says which, per event.
    let mut refusals = 0;
    let refused = {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let resp = data
                .post_ndjson("/v1/topics/in/events", body(&["k"]))
                .await?;
            if resp.status == 429 {
                refusals += 1;
                break resp;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "p never refused: {}",
                resp.status
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    };
    assert_eq!(refused.json()?["error"], "partition_lagging");
    assert!(refused.header("retry-after").is_some());
    let mixed = data
        .post_ndjson("/v1/topics/in/events", body(&["k", &other]))
        .await?;
    ensure_status(&mixed, 207)?;
    let results = mixed.json()?["results"].clone();
    assert_eq!(results[0]["error"], "partition_lagging", "{results}");
    assert!(results[1]["offset"].is_u64(), "{results}");
    // The metrics count each refusal by reason and status: the refused request, and its event plus
    // the mixed request's refused event.
    let m = crate::metrics::scrape(&host).await?;
    let lagging = [("reason", "partition_lagging"), ("status", "429")];
    assert_eq!(
        m.get("procd_ingest_refused_requests_total", &lagging),
        Some(f64::from(refusals))
    );
    assert_eq!(
        m.get("procd_ingest_refused_events_total", &lagging),
        Some(f64::from(refusals + 1))
    );
    let p_label = p.to_string();
    let in_p = [("topic", "in"), ("partition", p_label.as_str())];
    assert_eq!(m.get("procd_topic_refusing_writes", &in_p), Some(1.0));
    assert_eq!(
        m.sum("procd_topic_refusing_writes", &[]),
        1.0,
        "only p refuses"
    );
    let bad_p = [("handler", "bad"), ("partition", p_label.as_str())];
    assert!(m.get("procd_handler_lag_events", &bad_p).unwrap_or(0.0) > 5.0);
    assert!(m.get("procd_handler_lag_seconds", &bad_p).unwrap_or(0.0) > 0.0);

    // The poison event is dead-lettered after its deadlines, the handler catches up, p accepts again.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let resp = data
            .post_ndjson("/v1/topics/in/events", body(&["k"]))
            .await?;
        if resp.status == 202 {
            break;
        }
        assert_eq!(resp.status, 429);
        assert!(std::time::Instant::now() < deadline, "p never recovered");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // The poison event cost deadlines (found by halving) and one dead letter.
    let m = crate::metrics::scrape(&host).await?;
    let deadlines = [bad_p[0], bad_p[1], ("kind", "deadline")];
    assert!(
        m.get("procd_handler_errors_total", &deadlines)
            .unwrap_or(0.0)
            >= 1.0
    );
    assert_eq!(m.get("procd_handler_dead_letters_total", &bad_p), Some(1.0));
    Ok(())
}
