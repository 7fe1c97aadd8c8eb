//! Handlers end to end: real components deployed through the admin API, events posted and read over
//! HTTP, outputs compared with a reference computed here from the inputs.
//!
//! Covered: every guest example against its reference; hot swap and rollback while events flow (each
//! input processed by exactly one version, state carried over); refused deploys that change nothing;
//! a handler chain; pause/resume, reset, remove; restart; dead letters (an `Err` and a trap); state
//! keys the storage layer cannot take as they are (empty, longer than 64 KiB), which must cost at most
//! the event, never the cell.
//!
//! Waiting: a handler's reported lag is computed from the end offset its processor saw at its last step,
//! which can be older than the input's real end (see `wait_processed`). So these tests wait until every
//! partition's committed offset reaches the input topic's durable end as the topic API reports it,
//! rather than trusting "lag 0" alone.
//!
//! Test-only guests live in `tests/guests/` (their own workspace and target directory): a counter
//! whose outputs name their version (`tagged-counter`), and two real components of other worlds.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use procd::client::{Client, Response};
use serde_json::{Value, json};

use crate::harness::guests::example;
use crate::harness::{TestHost, TestResult, ensure_status};

pub(crate) const PARTITIONS: u32 = 8;
/// How long a handler gets to process what a test posted (debug builds on two busy cores).
const PROCESS_TIMEOUT: Duration = Duration::from_secs(60);
/// Polling interval for status endpoints.
pub(crate) const POLL: Duration = Duration::from_millis(20);
/// Pace of the hot-swap producer: a 64-event request every 10 ms (6,400 events/s) keeps events flowing
/// through every swap without burying a debug build's processor under a backlog it needs minutes for.
const PRODUCER_PERIOD: Duration = Duration::from_millis(10);

// ---------------------------------------------------------------------------------------------------
// Test-only guests

/// The component bytes of test-only guest `name` (built from `tests/guests` once per process).
pub(crate) fn test_guest(name: &str) -> TestResult<Vec<u8>> {
    Ok(crate::harness::guests::test_guest(name)?)
}

// ---------------------------------------------------------------------------------------------------
// Helpers

/// An event as posted and where the server put it.
#[derive(Debug, Clone)]
pub(crate) struct Placed {
    pub partition: u32,
    pub offset: u64,
}

/// Posts `(key, value)` events as NDJSON until every one is accepted; returns where each went.
///
/// Like a well-behaved producer it posts again, after a short wait, the events refused for overload
/// (`429`/`503`, or per event in a `207`): a cell may shed when a slow disk (a busy CI machine) makes its
/// writes wait. Without ids that is safe, since a refused event was not appended. Any other answer
/// fails the test.
async fn post(
    client: &mut Client,
    topic: &str,
    events: &[(Option<String>, Value)],
) -> TestResult<Vec<Placed>> {
    let mut placed: Vec<Option<Placed>> = vec![None; events.len()];
    let mut pending: Vec<usize> = (0..events.len()).collect();
    for _ in 0..200 {
        let mut body = String::new();
        for &i in &pending {
            let line = match &events[i] {
                (Some(key), value) => json!({"key": key, "value": value}),
                (None, value) => json!({ "value": value }),
            };
            body.push_str(&line.to_string());
            body.push('\n');
        }
        let resp = client
            .post_ndjson(&format!("/v1/topics/{topic}/events"), body)
            .await?;
        if matches!(resp.status, 429 | 503) {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        if resp.status != 207 {
            ensure_status(&resp, 202)?;
        }
        let results = resp.json()?["results"]
            .as_array()
            .ok_or("no results")?
            .clone();
        if results.len() != pending.len() {
            return Err(format!("{} results for {} events", results.len(), pending.len()).into());
        }
        let mut refused = Vec::new();
        for (&i, r) in pending.iter().zip(&results) {
            if r.get("error").is_some() {
                refused.push(i);
                continue;
            }
            placed[i] = Some(Placed {
                partition: u32::try_from(r["partition"].as_u64().ok_or("no partition")?)?,
                offset: r["offset"].as_u64().ok_or("no offset")?,
            });
        }
        if refused.is_empty() {
            return Ok(placed.into_iter().flatten().collect());
        }
        pending = refused;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err("events still refused after 200 attempts".into())
}

/// Every partition of `topic`, read in full.
pub(crate) async fn read_topic(host: &TestHost, topic: &str) -> TestResult<Vec<Vec<Value>>> {
    let mut all = Vec::with_capacity(PARTITIONS as usize);
    for p in 0..PARTITIONS {
        all.push(host.read_all(topic, p).await?);
    }
    Ok(all)
}

/// The durable end offset of every partition of `topic`, from the control plane.
async fn end_offsets(host: &TestHost, topic: &str) -> TestResult<Vec<u64>> {
    let resp = host.admin()?.get(&format!("/v1/topics/{topic}")).await?;
    ensure_status(&resp, 200)?;
    resp.json()?["partition_offsets"]
        .as_array()
        .ok_or("no partition_offsets")?
        .iter()
        .map(|p| Ok(p["end_offset"].as_u64().ok_or("no end_offset")?))
        .collect()
}

/// `GET /v1/handlers/{name}`, which must exist.
async fn show(admin: &mut Client, name: &str) -> TestResult<Value> {
    let resp = admin.get(&format!("/v1/handlers/{name}")).await?;
    ensure_status(&resp, 200)?;
    Ok(resp.json()?)
}

/// The per-partition status entries of a handler description.
pub(crate) fn partitions(v: &Value) -> Vec<Value> {
    v["partitions"].as_array().cloned().unwrap_or_default()
}

/// Polls handler `name` until `done` holds for its description, for up to `PROCESS_TIMEOUT`.
pub(crate) async fn poll_handler(
    host: &TestHost,
    name: &str,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> TestResult<Value> {
    poll_handler_for(host, name, what, PROCESS_TIMEOUT, done).await
}

/// Polls handler `name` until `done` holds for its description, for up to `timeout`.
pub(crate) async fn poll_handler_for(
    host: &TestHost,
    name: &str,
    what: &str,
    timeout: Duration,
    done: impl Fn(&Value) -> bool,
) -> TestResult<Value> {
    let deadline = Instant::now() + timeout;
    let mut admin = host.admin()?;
    loop {
        let v = show(&mut admin, name).await?;
        if done(&v) {
            return Ok(v);
        }
        if Instant::now() > deadline {
            return Err(
                format!("handler {name}: {what} did not happen within {timeout:?}: {v}").into(),
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Waits until handler `name` has committed everything its input topic held when this was called, on
/// every partition, without a failure.
///
/// The harness's `wait_caught_up` looks at `lag`, which is `end_offset - committed_offset` as the
/// processor last saw them: right after a post it can still say 0. The committed offset compared with
/// the topic's real end has no such window.
pub(crate) async fn wait_processed(host: &TestHost, name: &str, input: &str) -> TestResult<Value> {
    let ends = end_offsets(host, input).await?;
    let v = poll_handler(host, name, "processing everything", |v| {
        let parts = partitions(v);
        parts.len() == PARTITIONS as usize
            && parts.iter().all(|p| {
                let partition = p["partition"].as_u64().unwrap_or(u64::MAX) as usize;
                p["status"] != "failed"
                    && ends.get(partition).is_some_and(|end| {
                        p["committed_offset"].as_u64().is_some_and(|c| c >= *end)
                    })
            })
    })
    .await?;
    host.wait_caught_up(name, PROCESS_TIMEOUT).await?;
    Ok(v)
}

/// Waits until `topic` holds at least `total` events over all partitions.
async fn wait_for_events(host: &TestHost, topic: &str, total: u64) -> TestResult {
    let deadline = Instant::now() + PROCESS_TIMEOUT;
    loop {
        let have: u64 = end_offsets(host, topic).await?.iter().sum();
        if have >= total {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{topic} holds {have} events after {PROCESS_TIMEOUT:?}; expected {total}"
            )
            .into());
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Deploys and expects `201` with the given version; returns the response body.
pub(crate) async fn deploy_ok(
    host: &TestHost,
    name: &str,
    bytes: Vec<u8>,
    input: &str,
    outputs: &[&str],
    extra: &[&str],
    version: u64,
) -> TestResult<Value> {
    let digest = sha256_hex(&bytes);
    let resp = host.deploy(name, bytes, input, outputs, extra).await?;
    ensure_status(&resp, 201)?;
    let v = resp.json()?;
    assert_eq!(v["name"], name, "{v}");
    assert_eq!(v["version"], version, "{v}");
    assert_eq!(v["input"], input, "{v}");
    assert_eq!(v["outputs"], json!(outputs), "{v}");
    assert_eq!(v["sha256"], digest, "{v}");
    Ok(v)
}

/// SHA-256 of `bytes` in lowercase hex, computed here rather than by procd.
pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The key of a read-back event (`None` for a keyless one).
fn key_of(event: &Value) -> Option<String> {
    event["key"].as_str().map(str::to_owned)
}

/// Running count per key of a partition's events, in offset order: what `counter` emits.
fn running_counts(events: &[Value]) -> Vec<(Option<String>, u64)> {
    let mut counts: HashMap<Option<String>, u64> = HashMap::new();
    events
        .iter()
        .map(|e| {
            let key = key_of(e);
            let n = counts.entry(key.clone()).or_default();
            *n += 1;
            (key, *n)
        })
        .collect()
}

/// A counter's outputs of one partition as (key, count).
pub(crate) fn counter_outputs(events: &[Value]) -> Vec<(Option<String>, Option<u64>)> {
    events
        .iter()
        .map(|e| (key_of(e), e["value"].as_u64()))
        .collect()
}

/// Checks a counter's output topic against the input topic: one output per input, in order, with the
/// running count per key (state is partition-local, so keyless events count per partition).
pub(crate) fn check_counter(inputs: &[Vec<Value>], outputs: &[Vec<Value>]) {
    for (p, (inp, out)) in inputs.iter().zip(outputs).enumerate() {
        let expected: Vec<(Option<String>, Option<u64>)> = running_counts(inp)
            .into_iter()
            .map(|(k, n)| (k, Some(n)))
            .collect();
        assert_eq!(
            counter_outputs(out),
            expected,
            "partition {p}: counter outputs"
        );
    }
}

/// `GET /v1/handlers` without what changes as handlers run (statuses and lag): the definitions.
async fn definitions(host: &TestHost) -> TestResult<Value> {
    let resp = host.admin()?.get("/v1/handlers").await?;
    ensure_status(&resp, 200)?;
    let mut v = resp.json()?;
    for h in v["handlers"]
        .as_array_mut()
        .ok_or("no handlers list")?
        .iter_mut()
    {
        if let Some(h) = h.as_object_mut() {
            h.remove("partitions");
            h.remove("lag");
        }
    }
    Ok(v)
}

/// Events with varied keys (37 keys over all 8 partitions, and every tenth event keyless if
/// `keyless`) and values (objects and other JSON).
fn varied_events(n: usize, keyless: bool) -> Vec<(Option<String>, Value)> {
    const COLORS: [&str; 3] = ["red", "green", "blue"];
    (0..n)
        .map(|i| {
            let key = (!keyless || i % 10 != 9).then(|| format!("user-{}", i % 37));
            let value = match i % 8 {
                0..=3 => json!({"n": i, "color": COLORS[i % 3]}),
                4 => json!({"n": i, "meta": {"color": "red"}}),
                5 => json!({"n": i, "color": "RED", "list": [1, 2.5, null]}),
                6 => json!(format!("text {i}")),
                _ => json!(i),
            };
            (key, value)
        })
        .collect()
}

/// Posts `events` in requests of at most 100; returns where each went.
pub(crate) async fn post_all(
    host: &TestHost,
    topic: &str,
    events: &[(Option<String>, Value)],
) -> TestResult<Vec<Placed>> {
    let mut client = host.data()?;
    let mut placed = Vec::with_capacity(events.len());
    for chunk in events.chunks(100) {
        placed.extend(post(&mut client, topic, chunk).await?);
    }
    Ok(placed)
}

/// Checks that the input log holds exactly `events` where they were placed, and that every partition
/// got some.
fn check_inputs(inputs: &[Vec<Value>], events: &[(Option<String>, Value)], placed: &[Placed]) {
    assert_eq!(
        inputs.iter().map(Vec::len).sum::<usize>(),
        events.len(),
        "input log holds every posted event"
    );
    for (p, events) in inputs.iter().enumerate() {
        assert!(!events.is_empty(), "partition {p} got no events");
    }
    for ((key, value), at) in events.iter().zip(placed) {
        let stored = &inputs[at.partition as usize][at.offset as usize];
        assert_eq!(
            (&key_of(stored), &stored["value"]),
            (key, value),
            "input at {at:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------------
// Tests

#[tokio::test]
async fn every_example_matches_its_reference() -> TestResult {
    let host = TestHost::start()?;
    for topic in ["in", "passed", "filtered", "enriched", "keyed", "counted"] {
        host.create_topic(topic).await?;
    }
    deploy_ok(
        &host,
        "passthrough",
        example("passthrough")?,
        "in",
        &["passed"],
        &[],
        1,
    )
    .await?;
    deploy_ok(
        &host,
        "filter",
        example("filter")?,
        "in",
        &["filtered"],
        &["config=field=color", "config=equals=red"],
        1,
    )
    .await?;
    deploy_ok(
        &host,
        "enrich",
        example("enrich")?,
        "in",
        &["enriched"],
        &["config=add.region=eu"],
        1,
    )
    .await?;
    // Keyless events make `counter` write state under the empty key, which is tested on its own
    // (`counter_counts_keyless_events_per_partition`): here it reads keyed events only.
    deploy_ok(
        &host,
        "counter",
        example("counter")?,
        "keyed",
        &["counted"],
        &[],
        1,
    )
    .await?;

    let events = varied_events(400, true);
    let placed = post_all(&host, "in", &events).await?;
    let inputs = read_topic(&host, "in").await?;
    check_inputs(&inputs, &events, &placed);
    let keyed = varied_events(400, false);
    let placed = post_all(&host, "keyed", &keyed).await?;
    let keyed_inputs = read_topic(&host, "keyed").await?;
    check_inputs(&keyed_inputs, &keyed, &placed);
    for name in ["passthrough", "filter", "enrich"] {
        wait_processed(&host, name, "in").await?;
    }
    wait_processed(&host, "counter", "keyed").await?;

    // passthrough: identical keys and values, in the input's partition and order.
    let passed = read_topic(&host, "passed").await?;
    for (p, (inp, out)) in inputs.iter().zip(&passed).enumerate() {
        let want: Vec<_> = inp.iter().map(|e| (key_of(e), &e["value"])).collect();
        let got: Vec<_> = out.iter().map(|e| (key_of(e), &e["value"])).collect();
        assert_eq!(got, want, "partition {p}: passthrough");
    }

    // filter: drops exactly the objects whose top-level `color` is the string "red".
    let filtered = read_topic(&host, "filtered").await?;
    let mut dropped = 0;
    for (p, (inp, out)) in inputs.iter().zip(&filtered).enumerate() {
        let want: Vec<_> = inp
            .iter()
            .filter(|e| e["value"].get("color") != Some(&json!("red")))
            .map(|e| (key_of(e), &e["value"]))
            .collect();
        dropped += inp.len() - want.len();
        let got: Vec<_> = out.iter().map(|e| (key_of(e), &e["value"])).collect();
        assert_eq!(got, want, "partition {p}: filter");
    }
    assert!(dropped > 0, "the filter dropped something");

    // enrich: objects get exactly the added fields; anything else is a dead letter.
    let enriched = read_topic(&host, "enriched").await?;
    let mut expected_dead = Vec::new();
    for (p, (inp, out)) in inputs.iter().zip(&enriched).enumerate() {
        let mut want = Vec::new();
        for (offset, e) in inp.iter().enumerate() {
            match e["value"].as_object() {
                Some(object) => {
                    let mut object = object.clone();
                    object.insert("enriched_by".into(), json!("procd"));
                    object.insert("partition".into(), json!(p));
                    object.insert("offset".into(), json!(offset));
                    object.insert("region".into(), json!("eu"));
                    want.push((key_of(e), Value::Object(object)));
                }
                None => expected_dead.push((p as u64, offset as u64, e["value"].clone())),
            }
        }
        let got: Vec<_> = out
            .iter()
            .map(|e| (key_of(e), e["value"].clone()))
            .collect();
        assert_eq!(got, want, "partition {p}: enrich");
    }
    let resp = host
        .admin()?
        .get("/v1/handlers/enrich/dlq?limit=10000")
        .await?;
    ensure_status(&resp, 200)?;
    let dead = resp.json()?;
    let dead: Vec<_> = dead["dead_letters"]
        .as_array()
        .ok_or("no dead_letters")?
        .iter()
        .map(|d| {
            let kind = if d["value"].is_string() {
                "a string"
            } else {
                "a number"
            };
            assert_eq!(
                d["error"],
                format!("value is not a JSON object but {kind}"),
                "{d}"
            );
            assert_eq!(d["version"], 1, "{d}");
            (
                d["partition"].as_u64().unwrap_or(u64::MAX),
                d["offset"].as_u64().unwrap_or(u64::MAX),
                d["value"].clone(),
            )
        })
        .collect();
    assert_eq!(dead, expected_dead, "enrich's dead letters");

    // counter: running count per key, per partition, in offset order.
    check_counter(&keyed_inputs, &read_topic(&host, "counted").await?);

    // Statuses agree with what happened.
    let mut admin = host.admin()?;
    for name in ["passthrough", "filter", "enrich", "counter"] {
        let v = show(&mut admin, name).await?;
        let parts = partitions(&v);
        let processed: u64 = parts
            .iter()
            .map(|p| p["events_processed"].as_u64().unwrap_or(0))
            .sum();
        assert_eq!(processed, 400, "{name}: events_processed {v}");
        let dead: u64 = parts
            .iter()
            .map(|p| p["dead_letters"].as_u64().unwrap_or(0))
            .sum();
        let want_dead = if name == "enrich" {
            expected_dead.len() as u64
        } else {
            0
        };
        assert_eq!(dead, want_dead, "{name}: dead_letters {v}");
        assert!(parts.iter().all(|p| p["version"] == 1), "{v}");
    }
    Ok(())
}

/// Posts a batch of one event per key (`key-0`, `key-1`, ...: 64 of them reach all 8 partitions) every
/// `PRODUCER_PERIOD` until stopped; returns how many events were accepted.
struct Producer {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<TestResult<u64>>,
}

impl Producer {
    fn start(host: &TestHost, topic: &str, keys: usize) -> TestResult<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut client = host.data()?;
        let topic = topic.to_string();
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let mut ticks = tokio::time::interval(PRODUCER_PERIOD);
            let mut sent = 0u64;
            let mut seq = 0u64;
            while !flag.load(Ordering::Acquire) {
                let events: Vec<_> = (0..keys)
                    .map(|k| {
                        seq += 1;
                        (Some(format!("key-{k}")), json!({ "seq": seq }))
                    })
                    .collect();
                sent += post(&mut client, &topic, &events).await?.len() as u64;
                ticks.tick().await;
            }
            Ok(sent)
        });
        Ok(Self { stop, task })
    }

    async fn stop(self) -> TestResult<u64> {
        self.stop.store(true, Ordering::Release);
        self.task.await?
    }
}

/// Every partition has a status entry and `pred` holds for all of them.
fn all_partitions(v: &Value, pred: impl Fn(&Value) -> bool) -> bool {
    let parts = partitions(v);
    parts.len() == PARTITIONS as usize && parts.iter().all(pred)
}

/// Waits (while a producer runs) until every partition of `name` runs `version` and has committed
/// input that arrived after that: so every partition has outputs of `version`.
async fn wait_switched(host: &TestHost, name: &str, input: &str, version: u64) -> TestResult {
    poll_handler(host, name, &format!("every partition on v{version}"), |v| {
        all_partitions(v, |p| p["version"] == version && p["status"] != "failed")
    })
    .await?;
    let ends = end_offsets(host, input).await?;
    poll_handler(
        host,
        name,
        &format!("v{version} processing new input"),
        |v| {
            all_partitions(v, |p| {
                let partition = p["partition"].as_u64().unwrap_or(u64::MAX) as usize;
                ends.get(partition)
                    .is_some_and(|end| p["committed_offset"].as_u64().is_some_and(|c| c > *end))
            })
        },
    )
    .await?;
    Ok(())
}

/// Checks `tagged-counter` outputs against the inputs: one output per input offset, in order, with the
/// running count per key across versions (state carried over), and per partition the tags run through
/// `phases` in order, each as one contiguous run.
fn check_tagged(inputs: &[Vec<Value>], outputs: &[Vec<Value>], phases: &[&str]) {
    for (p, (inp, out)) in inputs.iter().zip(outputs).enumerate() {
        assert_eq!(
            out.len(),
            inp.len(),
            "partition {p}: one output per input (none missing, none twice)"
        );
        let mut tags: Vec<&str> = Vec::new();
        for (offset, ((key, count), o)) in running_counts(inp).into_iter().zip(out).enumerate() {
            assert_eq!(key_of(o), key, "partition {p} output {offset}: key");
            assert_eq!(
                o["value"]["count"].as_u64(),
                Some(count),
                "partition {p} output {offset}: count of {key:?} (state must carry over)"
            );
            let tag = o["value"]["tag"].as_str().unwrap_or("?");
            if tags.last() != Some(&tag) {
                tags.push(tag);
            }
        }
        assert_eq!(tags, phases, "partition {p}: versions in order");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_swap_and_rollback_process_each_event_exactly_once_and_keep_state() -> TestResult {
    // Small batches: many batch boundaries at which a swap can happen.
    let host = TestHost::start_with(PARTITIONS, 2, &["handler.batch_max_events=16"])?;
    host.create_topics(&["in", "out"]).await?;
    let counter = test_guest("tagged-counter")?;

    // v1 is deployed while events flow.
    let producer = Producer::start(&host, "in", 64)?;
    wait_for_events(&host, "in", 256).await?;
    deploy_ok(
        &host,
        "tc",
        counter.clone(),
        "in",
        &["out"],
        &["config=tag=v1"],
        1,
    )
    .await?;
    wait_switched(&host, "tc", "in", 1).await?;

    // v2, same component and state, another tag: outputs say which version made them.
    deploy_ok(
        &host,
        "tc",
        counter.clone(),
        "in",
        &["out"],
        &["config=tag=v2"],
        2,
    )
    .await?;
    wait_switched(&host, "tc", "in", 2).await?;
    let sent = producer.stop().await?;
    let v = wait_processed(&host, "tc", "in").await?;
    assert_eq!(v["active"], 2, "{v}");
    let inputs = read_topic(&host, "in").await?;
    assert_eq!(inputs.iter().map(Vec::len).sum::<usize>() as u64, sent);
    check_tagged(&inputs, &read_topic(&host, "out").await?, &["v1", "v2"]);

    // Rollback to the previous version, again while events flow.
    let producer = Producer::start(&host, "in", 64)?;
    let mut admin = host.admin()?;
    let resp = admin
        .request(hyper::Method::POST, "/v1/handlers/tc/rollback", &[], "")
        .await?;
    ensure_status(&resp, 200)?;
    assert_eq!(resp.json()?["active"], 1);
    wait_switched(&host, "tc", "in", 1).await?;
    let sent = sent + producer.stop().await?;
    wait_processed(&host, "tc", "in").await?;
    let inputs = read_topic(&host, "in").await?;
    assert_eq!(inputs.iter().map(Vec::len).sum::<usize>() as u64, sent);
    check_tagged(
        &inputs,
        &read_topic(&host, "out").await?,
        &["v1", "v2", "v1"],
    );

    // Both versions are kept; an unknown one is refused.
    let v = show(&mut admin, "tc").await?;
    assert_eq!(v["versions"].as_array().map(Vec::len), Some(2), "{v}");
    let resp = admin
        .post_json("/v1/handlers/tc/rollback", &json!({"version": 9}))
        .await?;
    ensure_status(&resp, 404)?;
    assert_eq!(resp.json()?["error"], "unknown_version");
    Ok(())
}

/// Asserts a refused deploy: status, error code, and a detail containing `needle`.
fn assert_refused(resp: &Response, status: u16, code: &str, needle: &str) -> TestResult {
    ensure_status(resp, status)?;
    let v = resp.json()?;
    assert_eq!(v["error"], code, "{v}");
    let detail = v["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains(needle),
        "detail {detail:?} should mention {needle:?}"
    );
    Ok(())
}

#[tokio::test]
async fn refused_deploys_change_nothing() -> TestResult {
    let host = TestHost::start()?;
    host.create_topics(&["in", "out", "other"]).await?;
    deploy_ok(
        &host,
        "keep",
        example("passthrough")?,
        "in",
        &["out"],
        &[],
        1,
    )
    .await?;
    let before = definitions(&host).await?;

    let garbage = b"this is not wasm at all".to_vec();
    let core_module = b"\0asm\x01\0\0\0".to_vec();
    let other_world = test_guest("other-world")?;
    let wrong_types = test_guest("wrong-types")?;
    // Each refusal both for a new name and as a new version of the running handler.
    for name in ["fresh", "keep"] {
        let cases: [(&str, Vec<u8>, &str, &str); 4] = [
            (
                "garbage",
                garbage.clone(),
                "invalid_component",
                "not a WebAssembly binary",
            ),
            (
                "core module",
                core_module.clone(),
                "invalid_component",
                "core WebAssembly module",
            ),
            (
                "other world",
                other_world.clone(),
                "invalid_component",
                "does not export `init`",
            ),
            (
                "wrong types",
                wrong_types.clone(),
                "invalid_component",
                "procd's world",
            ),
        ];
        for (what, bytes, code, needle) in cases {
            let resp = host.deploy(name, bytes, "in", &["out"], &[]).await?;
            assert_refused(&resp, 400, code, needle).map_err(|e| format!("{name}, {what}: {e}"))?;
            assert_eq!(
                definitions(&host).await?,
                before,
                "{name}, {what}: changed something"
            );
        }
    }

    // A real handler whose `init` refuses the config (filter needs `equals`).
    let resp = host
        .deploy(
            "fresh",
            example("filter")?,
            "in",
            &["out"],
            &["config=field=x"],
        )
        .await?;
    assert_refused(
        &resp,
        400,
        "invalid_component",
        "missing config key `equals`",
    )?;
    // Unknown topics.
    let resp = host
        .deploy("fresh", example("passthrough")?, "nope", &["out"], &[])
        .await?;
    assert_refused(&resp, 404, "unknown_topic", "\"nope\"")?;
    let resp = host
        .deploy("fresh", example("passthrough")?, "in", &["gone"], &[])
        .await?;
    assert_refused(&resp, 404, "unknown_topic", "\"gone\"")?;
    let resp = host
        .deploy("keep", example("passthrough")?, "in", &["gone"], &[])
        .await?;
    assert_refused(&resp, 404, "unknown_topic", "\"gone\"")?;
    // The input of an existing handler cannot change.
    let resp = host
        .deploy("keep", example("passthrough")?, "other", &["out"], &[])
        .await?;
    assert_refused(&resp, 400, "input_changed", "\"in\"")?;
    // Nor where it started (a reset moves it), and a parameter given twice is not guessed at.
    let resp = host
        .deploy(
            "keep",
            example("passthrough")?,
            "in",
            &["out"],
            &["from=latest"],
        )
        .await?;
    assert_refused(&resp, 400, "start_changed", "reset")?;
    let resp = host
        .deploy(
            "fresh",
            example("passthrough")?,
            "in",
            &["out"],
            &["input=out"],
        )
        .await?;
    assert_refused(&resp, 400, "invalid_query", "\"input\" is given twice")?;
    assert_eq!(
        definitions(&host).await?,
        before,
        "a refusal changed something"
    );

    // The running version kept running: it processes what comes now.
    let events = varied_events(80, true);
    post_all(&host, "in", &events).await?;
    let v = wait_processed(&host, "keep", "in").await?;
    assert!(all_partitions(&v, |p| p["version"] == 1), "{v}");
    let inputs = read_topic(&host, "in").await?;
    let outputs = read_topic(&host, "out").await?;
    for (p, (inp, out)) in inputs.iter().zip(&outputs).enumerate() {
        let want: Vec<_> = inp.iter().map(|e| (key_of(e), &e["value"])).collect();
        let got: Vec<_> = out.iter().map(|e| (key_of(e), &e["value"])).collect();
        assert_eq!(got, want, "partition {p}");
    }
    Ok(())
}

#[tokio::test]
async fn oversized_component_is_413_and_changes_nothing() -> TestResult {
    let host = TestHost::start_with(PARTITIONS, 2, &["handler.max_component_bytes=2048"])?;
    host.create_topic("in").await?;
    let bytes = example("passthrough")?;
    assert!(bytes.len() > 2048);
    let resp = host.deploy("big", bytes, "in", &[], &[]).await?;
    assert_refused(
        &resp,
        413,
        "component_too_large",
        "handler.max_component_bytes",
    )?;
    assert_eq!(definitions(&host).await?, json!({"handlers": []}));
    let resp = host.admin()?.get("/v1/handlers/big").await?;
    ensure_status(&resp, 404)?;
    Ok(())
}

#[tokio::test]
async fn every_version_records_the_sha256_of_its_component() -> TestResult {
    let host = TestHost::start_with(2, 1, &[])?;
    host.create_topics(&["in", "out"]).await?;
    let (first, second) = (example("passthrough")?, example("enrich")?);
    deploy_ok(&host, "h", first.clone(), "in", &["out"], &[], 1).await?;
    deploy_ok(&host, "h", second.clone(), "in", &["out"], &[], 2).await?;
    let mut admin = host.admin()?;
    let def = show(&mut admin, "h").await?;
    let digests: Vec<&str> = def["versions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v["sha256"].as_str())
        .collect();
    assert_eq!(digests, [sha256_hex(&first), sha256_hex(&second)], "{def}");
    assert_ne!(digests[0], digests[1]);
    Ok(())
}

/// A redeploy keeps what it does not give: outputs, config and limits come from the active version,
/// and config or limits given anew replace the old ones as a whole.
#[tokio::test]
async fn a_redeploy_keeps_the_outputs_config_and_limits_it_does_not_give() -> TestResult {
    let host = TestHost::start_with(2, 1, &[])?;
    host.create_topics(&["in", "out"]).await?;
    let filter = example("filter")?;
    let first = [
        "config=field=kind",
        "config=equals=drop",
        "limit.deadline_ms=500",
    ];
    deploy_ok(&host, "f", filter.clone(), "in", &["out"], &first, 1).await?;
    let resp = host.deploy("f", filter.clone(), "in", &[], &[]).await?;
    ensure_status(&resp, 201)?;
    assert_eq!(resp.json()?["outputs"], json!(["out"]));
    let again = [
        "config=field=kind",
        "config=equals=keep",
        "limit.max_outputs_per_batch=100",
    ];
    deploy_ok(&host, "f", filter, "in", &["out"], &again, 3).await?;

    let def = show(&mut host.admin()?, "f").await?;
    let versions = def["versions"].as_array().cloned().unwrap_or_default();
    let settings: Vec<(Value, Value, Value)> = versions
        .iter()
        .map(|v| {
            (
                v["outputs"].clone(),
                v["config"].clone(),
                v["limits"].clone(),
            )
        })
        .collect();
    let kept = (
        json!(["out"]),
        json!([["field", "kind"], ["equals", "drop"]]),
        json!({"deadline_ms": 500}),
    );
    let replaced = (
        json!(["out"]),
        json!([["field", "kind"], ["equals", "keep"]]),
        json!({"max_outputs_per_batch": 100}),
    );
    assert_eq!(settings, [kept.clone(), kept, replaced], "{def}");
    Ok(())
}

#[tokio::test]
async fn a_chain_of_handlers_feeds_one_into_the_next() -> TestResult {
    let host = TestHost::start()?;
    for topic in ["in", "mid", "out"] {
        host.create_topic(topic).await?;
    }
    deploy_ok(&host, "a", example("passthrough")?, "in", &["mid"], &[], 1).await?;
    deploy_ok(&host, "b", example("counter")?, "mid", &["out"], &[], 1).await?;
    let events = varied_events(300, false);
    let placed = post_all(&host, "in", &events).await?;
    let inputs = read_topic(&host, "in").await?;
    check_inputs(&inputs, &events, &placed);
    wait_processed(&host, "a", "in").await?;
    wait_processed(&host, "b", "mid").await?;
    // b counts what a passed on, which is the input, in the same partitions.
    check_counter(&inputs, &read_topic(&host, "out").await?);
    Ok(())
}

/// Sum of `lag` over a handler's partitions.
fn total_lag(v: &Value) -> u64 {
    partitions(v)
        .iter()
        .map(|p| p["lag"].as_u64().unwrap_or(0))
        .sum()
}

#[tokio::test]
async fn paused_handler_lags_and_resumes_to_zero() -> TestResult {
    let host = TestHost::start()?;
    host.create_topics(&["in", "out"]).await?;
    deploy_ok(&host, "c", example("counter")?, "in", &["out"], &[], 1).await?;
    post_all(&host, "in", &varied_events(100, false)).await?;
    wait_processed(&host, "c", "in").await?;

    let mut admin = host.admin()?;
    let resp = admin
        .request(hyper::Method::POST, "/v1/handlers/c/pause", &[], "")
        .await?;
    ensure_status(&resp, 200)?;
    assert_eq!(resp.json()?["paused"], true);
    poll_handler(&host, "c", "every partition paused", |v| {
        all_partitions(v, |p| p["status"] == "paused")
    })
    .await?;

    post_all(&host, "in", &varied_events(120, false)).await?;
    // Paused: nothing more is processed, and the lag shows what waits. The events are durable once
    // acknowledged, so a status that reflects the input's end shows them at once; 10 s is generous.
    let v = poll_handler_for(
        &host,
        "c",
        "lag to reach 120",
        Duration::from_secs(10),
        |v| total_lag(v) == 120,
    )
    .await?;
    assert!(
        partitions(&v)
            .iter()
            .any(|p| p["lag_ms"].as_u64() > Some(0)),
        "lag_ms of a paused handler with waiting events: {v}"
    );
    let outputs: usize = read_topic(&host, "out").await?.iter().map(Vec::len).sum();
    assert_eq!(outputs, 100, "a paused handler emits nothing");

    let resp = admin
        .request(hyper::Method::POST, "/v1/handlers/c/resume", &[], "")
        .await?;
    ensure_status(&resp, 200)?;
    assert_eq!(resp.json()?["paused"], false);
    let v = wait_processed(&host, "c", "in").await?;
    assert_eq!(total_lag(&v), 0, "{v}");
    check_counter(
        &read_topic(&host, "in").await?,
        &read_topic(&host, "out").await?,
    );
    Ok(())
}

/// POST `/v1/handlers/{name}/reset` with `body`, expecting 200.
async fn reset(host: &TestHost, name: &str, body: Value) -> TestResult {
    let resp = host
        .admin()?
        .post_json(&format!("/v1/handlers/{name}/reset"), &body)
        .await?;
    ensure_status(&resp, 200)
}

#[tokio::test]
async fn reset_replays_with_or_without_state() -> TestResult {
    let host = TestHost::start()?;
    host.create_topics(&["in", "out"]).await?;
    deploy_ok(&host, "c", example("counter")?, "in", &["out"], &[], 1).await?;
    post_all(&host, "in", &varied_events(150, false)).await?;
    wait_processed(&host, "c", "in").await?;
    let inputs = read_topic(&host, "in").await?;

    // To earliest, clearing state: the counts start again from 1 and every input is re-emitted.
    reset(&host, "c", json!({"to": "earliest", "clear_state": true})).await?;
    wait_for_events(&host, "out", 300).await?;
    wait_processed(&host, "c", "in").await?;
    let outputs = read_topic(&host, "out").await?;
    for (p, (inp, out)) in inputs.iter().zip(&outputs).enumerate() {
        let once: Vec<_> = running_counts(inp)
            .into_iter()
            .map(|(k, n)| (k, Some(n)))
            .collect();
        let twice: Vec<_> = once.iter().chain(&once).cloned().collect();
        assert_eq!(
            counter_outputs(out),
            twice,
            "partition {p}: after reset with clear_state"
        );
    }

    // To earliest, keeping state: the counts go on from where they were.
    reset(&host, "c", json!({"to": "earliest"})).await?;
    wait_for_events(&host, "out", 450).await?;
    wait_processed(&host, "c", "in").await?;
    let outputs = read_topic(&host, "out").await?;
    for (p, (inp, out)) in inputs.iter().zip(&outputs).enumerate() {
        let counts = running_counts(inp);
        // The last running count of a key is its total.
        let totals: HashMap<Option<String>, u64> = counts.iter().cloned().collect();
        let once: Vec<_> = counts.iter().map(|(k, n)| (k.clone(), Some(*n))).collect();
        let third = counts
            .iter()
            .map(|(k, n)| (k.clone(), Some(n + totals.get(k).copied().unwrap_or(0))));
        let want: Vec<_> = once.iter().chain(&once).cloned().chain(third).collect();
        assert_eq!(
            counter_outputs(out),
            want,
            "partition {p}: after reset keeping state"
        );
    }

    // A reset the server cannot read is refused.
    let resp = host
        .admin()?
        .post_json("/v1/handlers/c/reset", &json!({"to": "yesterday"}))
        .await?;
    ensure_status(&resp, 400)?;
    Ok(())
}

#[tokio::test]
async fn removed_handler_is_gone_and_a_new_one_starts_from_scratch() -> TestResult {
    let host = TestHost::start()?;
    host.create_topics(&["in", "out"]).await?;
    deploy_ok(&host, "c", example("counter")?, "in", &["out"], &[], 1).await?;
    deploy_ok(&host, "c", example("counter")?, "in", &["out"], &[], 2).await?;
    post_all(&host, "in", &varied_events(100, false)).await?;
    wait_processed(&host, "c", "in").await?;

    let mut admin = host.admin()?;
    let resp = admin.delete("/v1/handlers/c").await?;
    ensure_status(&resp, 200)?;
    assert_eq!(resp.json()?["removed"], "c");
    for path in ["/v1/handlers/c", "/v1/handlers/c/dlq"] {
        let resp = admin.get(path).await?;
        assert_refused(&resp, 404, "unknown_handler", "\"c\"")?;
    }
    assert_refused(
        &admin.delete("/v1/handlers/c").await?,
        404,
        "unknown_handler",
        "\"c\"",
    )?;
    assert_eq!(definitions(&host).await?, json!({"handlers": []}));

    // Same name again: version 1, from the earliest input, with empty state.
    deploy_ok(&host, "c", example("counter")?, "in", &["out"], &[], 1).await?;
    wait_for_events(&host, "out", 200).await?;
    let v = wait_processed(&host, "c", "in").await?;
    assert_eq!(v["versions"].as_array().map(Vec::len), Some(1), "{v}");
    check_counted_twice_from_1(&host).await
}

/// Checks that `out` holds the counter's running counts of `in` twice over: the first handler's, then
/// those of a handler that started again from the earliest input with empty state.
async fn check_counted_twice_from_1(host: &TestHost) -> TestResult {
    let inputs = read_topic(host, "in").await?;
    let outputs = read_topic(host, "out").await?;
    for (p, (inp, out)) in inputs.iter().zip(&outputs).enumerate() {
        let once: Vec<_> = running_counts(inp)
            .into_iter()
            .map(|(k, n)| (k, Some(n)))
            .collect();
        let twice: Vec<_> = once.iter().chain(&once).cloned().collect();
        assert_eq!(
            counter_outputs(out),
            twice,
            "partition {p}: the second handler counts from 1, from the earliest input"
        );
    }
    Ok(())
}

#[tokio::test]
async fn storage_left_by_a_former_incarnation_is_not_taken_over() -> TestResult {
    let mut host = TestHost::start()?;
    host.create_topics(&["in", "out"]).await?;
    deploy_ok(&host, "c", example("counter")?, "in", &["out"], &[], 1).await?;
    post_all(&host, "in", &varied_events(100, false)).await?;
    wait_processed(&host, "c", "in").await?;
    assert_eq!(host.stop()?, 0, "SIGINT exits cleanly");

    // What a server stopped between removing `c`, deploying it again and deleting the old one's
    // storage leaves: position and state recorded by another incarnation of `c`.
    for cell in 0..2 {
        let dir = host
            .data_dir()
            .join("data")
            .join("cells")
            .join(cell.to_string());
        let store = procd::log::Store::open(&dir, procd::log::StoreOptions::default())?;
        for partition in (cell..PARTITIONS).step_by(2) {
            let old = store.consumer("c", partition)?.for_incarnation(1);
            let Some(committed) = old.committed()? else {
                continue;
            };
            let mut batch = store.batch();
            batch.commit_offset(&old, &committed);
            store.commit(batch, true)?;
        }
    }

    // Restarted, `c` (its own incarnation) starts from its start position with empty state.
    host.restart()?;
    wait_for_events(&host, "out", 200).await?;
    wait_processed(&host, "c", "in").await?;
    check_counted_twice_from_1(&host).await
}

#[tokio::test]
async fn storage_of_a_handler_removed_while_down_is_deleted_at_start() -> TestResult {
    let mut host = TestHost::start()?;
    host.create_topic("in").await?;
    assert_eq!(host.stop()?, 0, "SIGINT exits cleanly");
    let cell_dir = host.data_dir().join("data").join("cells").join("0");
    // What a handler `ghost` leaves when it is removed and the server stops before its tasks noticed.
    {
        let store = procd::log::Store::open(&cell_dir, procd::log::StoreOptions::default())?;
        let ghost = store.consumer("ghost", 0)?.for_incarnation(7);
        let mut batch = store.batch();
        batch.set_state(&ghost, b"k".to_vec(), Some(b"v".to_vec()));
        batch.commit_offset(
            &ghost,
            &procd::log::Committed {
                offset: 3,
                version: 1,
                reset_generation: 0,
            },
        );
        store.commit(batch, true)?;
    }
    host.restart()?;
    assert_eq!(host.stop()?, 0, "SIGINT exits cleanly");
    let store = procd::log::Store::open(&cell_dir, procd::log::StoreOptions::default())?;
    let ghost = store.consumer("ghost", 0)?;
    assert_eq!(ghost.committed()?, None);
    assert_eq!(ghost.stored_incarnation()?, None);
    assert_eq!(ghost.state_get(b"k")?, None);
    Ok(())
}

#[tokio::test]
async fn a_topic_a_handler_uses_cannot_be_deleted_under_it() -> TestResult {
    let host = TestHost::start()?;
    host.create_topics(&["in", "out", "spare"]).await?;
    deploy_ok(&host, "c", example("counter")?, "in", &["out"], &[], 1).await?;
    let mut admin = host.admin()?;
    for topic in ["in", "out"] {
        let resp = admin.delete(&format!("/v1/topics/{topic}")).await?;
        assert_refused(&resp, 409, "topic_in_use", "\"c\"")?;
        ensure_status(&admin.get(&format!("/v1/topics/{topic}")).await?, 200)?;
    }
    ensure_status(&admin.delete("/v1/topics/spare").await?, 200)?;
    ensure_status(&admin.delete("/v1/handlers/c").await?, 200)?;
    ensure_status(&admin.delete("/v1/topics/in").await?, 200)?;
    Ok(())
}

#[tokio::test]
async fn counts_continue_across_a_restart() -> TestResult {
    let mut host = TestHost::start()?;
    host.create_topics(&["in", "out"]).await?;
    deploy_ok(&host, "c", example("counter")?, "in", &["out"], &[], 1).await?;
    post_all(&host, "in", &varied_events(150, false)).await?;
    wait_processed(&host, "c", "in").await?;
    assert_eq!(host.stop()?, 0, "SIGINT exits cleanly");

    host.restart()?;
    // Every partition is reported where it stopped, by the version that committed there.
    let ends = end_offsets(&host, "in").await?;
    let v = poll_handler(&host, "c", "reporting every partition", |v| {
        partitions(v).len() == PARTITIONS as usize
    })
    .await?;
    for p in partitions(&v) {
        let partition = p["partition"].as_u64().unwrap_or(u64::MAX) as usize;
        assert_eq!(
            p["committed_offset"].as_u64(),
            ends.get(partition).copied(),
            "{p}"
        );
        assert_eq!(p["version"], 1, "{p}");
        assert_eq!(p["lag"], 0, "{p}");
    }
    // Nothing is processed twice after the restart, before or after new input.
    post_all(&host, "in", &varied_events(150, false)).await?;
    let v = wait_processed(&host, "c", "in").await?;
    assert_eq!(
        (v["active"].as_u64(), v["input"].as_str()),
        (Some(1), Some("in"))
    );
    let inputs = read_topic(&host, "in").await?;
    assert_eq!(inputs.iter().map(Vec::len).sum::<usize>(), 300);
    check_counter(&inputs, &read_topic(&host, "out").await?);
    Ok(())
}

/// `GET /v1/handlers/{name}/dlq[?query]`: the entries.
pub(crate) async fn dead_letters(
    host: &TestHost,
    name: &str,
    query: &str,
) -> TestResult<Vec<Value>> {
    let resp = host
        .admin()?
        .get(&format!("/v1/handlers/{name}/dlq{query}"))
        .await?;
    ensure_status(&resp, 200)?;
    Ok(resp.json()?["dead_letters"]
        .as_array()
        .ok_or("no dead_letters")?
        .clone())
}

#[tokio::test]
async fn a_failing_event_is_dead_lettered_and_processing_goes_on() -> TestResult {
    let host = TestHost::start()?;
    host.create_topics(&["in", "out"]).await?;
    deploy_ok(&host, "e", example("enrich")?, "in", &["out"], &[], 1).await?;
    // One key, one request: the bad events sit in the middle of one partition's batch.
    let values = [
        json!({"a": 1}),
        json!("oops"),
        json!({"a": 2}),
        json!([1, 2]),
        json!({"a": 3}),
        json!(null),
        json!({"a": 4}),
    ];
    let events: Vec<_> = values
        .iter()
        .map(|v| (Some("same".to_string()), v.clone()))
        .collect();
    let placed = post_all(&host, "in", &events).await?;
    let p = placed[0].partition;
    assert!(placed.iter().all(|at| at.partition == p));
    wait_processed(&host, "e", "in").await?;

    let out = host.read_all("out", p).await?;
    let got: Vec<_> = out
        .iter()
        .map(|e| (e["value"]["a"].as_u64(), e["value"]["offset"].as_u64()))
        .collect();
    assert_eq!(
        got,
        [
            (Some(1), Some(0)),
            (Some(2), Some(2)),
            (Some(3), Some(4)),
            (Some(4), Some(6))
        ],
        "the objects, including those after each failure"
    );
    let dead = dead_letters(&host, "e", &format!("?partition={p}")).await?;
    let got: Vec<_> = dead
        .iter()
        .map(|d| {
            (
                d["offset"].as_u64(),
                d["error"].as_str(),
                &d["value"],
                d["key"].as_str(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (
                Some(1),
                Some("value is not a JSON object but a string"),
                &json!("oops"),
                Some("same")
            ),
            (
                Some(3),
                Some("value is not a JSON object but an array"),
                &json!([1, 2]),
                Some("same")
            ),
            (
                Some(5),
                Some("value is not a JSON object but null"),
                &Value::Null,
                Some("same")
            ),
        ]
    );
    assert!(
        dead.iter()
            .all(|d| d["version"] == 1 && d["partition"] == p),
        "{dead:?}"
    );
    // The whole-handler listing holds the same; other partitions have none.
    assert_eq!(dead_letters(&host, "e", "").await?, dead);
    let other = (p + 1) % PARTITIONS;
    assert!(
        dead_letters(&host, "e", &format!("?partition={other}"))
            .await?
            .is_empty()
    );
    let resp = host.admin()?.get("/v1/handlers/e/dlq?partition=99").await?;
    ensure_status(&resp, 404)?;
    let v = show(&mut host.admin()?, "e").await?;
    let counted: u64 = partitions(&v)
        .iter()
        .map(|p| p["dead_letters"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(counted, 3, "{v}");
    Ok(())
}

#[tokio::test]
async fn a_trapping_event_is_isolated_and_dead_lettered() -> TestResult {
    let host = TestHost::start()?;
    host.create_topics(&["in", "out"]).await?;
    deploy_ok(
        &host,
        "t",
        test_guest("tagged-counter")?,
        "in",
        &["out"],
        &["config=tag=x", "config=panic_on=666"],
        1,
    )
    .await?;
    // The poison event (value 666) traps the whole batch; the host must find it and go on.
    let values = [json!(1), json!(2), json!(666), json!(3), json!(4)];
    let events: Vec<_> = values
        .iter()
        .map(|v| (Some("k".to_string()), v.clone()))
        .collect();
    let placed = post_all(&host, "in", &events).await?;
    let p = placed[0].partition;
    wait_processed(&host, "t", "in").await?;

    let out = host.read_all("out", p).await?;
    let counts: Vec<_> = out.iter().map(|e| e["value"]["count"].as_u64()).collect();
    assert_eq!(
        counts,
        [Some(1), Some(2), Some(3), Some(4)],
        "the poison event is not counted, the others are, once"
    );
    let dead = dead_letters(&host, "t", "").await?;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(
        (dead[0]["offset"].as_u64(), &dead[0]["value"]),
        (Some(2), &json!(666))
    );
    assert!(
        dead[0]["error"].as_str().is_some_and(
            |e| e.contains("handler panicked at") && e.contains("poison event at offset 2")
        ),
        "the dead letter gives the panic message, not just a wasm backtrace: {dead:?}"
    );
    Ok(())
}

#[tokio::test]
async fn a_handler_failing_every_event_trips_its_breaker_and_spares_its_neighbour() -> TestResult {
    let host = TestHost::start_with(
        PARTITIONS,
        2,
        &[
            "handler.breaker_min_events=10",
            "handler.breaker_cooldown_ms=300",
        ],
    )?;
    host.create_topics(&["in", "out", "bad-out"]).await?;
    deploy_ok(&host, "good", example("counter")?, "in", &["out"], &[], 1).await?;
    deploy_ok(
        &host,
        "bad",
        test_guest("tagged-counter")?,
        "in",
        &["bad-out"],
        &["config=tag=x", "config=panic_on=666"],
        1,
    )
    .await?;
    // Every event traps `bad`: halving isolates them one by one until 10 failed of 10 trips its
    // breaker on that partition. `good` reads the same events and must not notice.
    let events: Vec<_> = (0..40)
        .map(|_| (Some("k".to_string()), json!(666)))
        .collect();
    let placed = post_all(&host, "in", &events).await?;
    let p = placed[0].partition as usize;
    wait_processed(&host, "good", "in").await?;
    check_counter(
        &read_topic(&host, "in").await?,
        &read_topic(&host, "out").await?,
    );

    let tripped = poll_handler(&host, "bad", "tripping", |v| {
        partitions(v)
            .get(p)
            .is_some_and(|s| s["status"] == "tripped")
    })
    .await?;
    let detail = partitions(&tripped)[p]["detail"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(detail.contains("circuit breaker open"), "{detail}");
    let dead = dead_letters(&host, "bad", "").await?;
    assert!(
        (10..40).contains(&dead.len()),
        "tripped after 10 failures: {}",
        dead.len()
    );
    assert!(
        dead.iter().all(|d| d["error"]
            .as_str()
            .is_some_and(|e| e.contains("poison event"))),
        "each dead letter says why: {dead:?}"
    );
    // After each cooldown one trial batch runs; it fails at once and the breaker opens again, so the
    // failing events still all reach the dead-letter log, one trial at a time, and none is skipped.
    let more = Instant::now() + Duration::from_secs(20);
    while dead_letters(&host, "bad", "").await?.len() < 13 {
        assert!(
            Instant::now() < more,
            "trial batches after the cooldown dead-letter more events"
        );
        tokio::time::sleep(POLL).await;
    }
    assert!(
        read_topic(&host, "bad-out")
            .await?
            .iter()
            .all(Vec::is_empty)
    );
    Ok(())
}

#[tokio::test]
async fn dead_letters_are_bounded_and_can_be_purged() -> TestResult {
    let host = TestHost::start_with(PARTITIONS, 2, &["handler.dlq_max_entries=5"])?;
    host.create_topics(&["in", "out"]).await?;
    deploy_ok(
        &host,
        "t",
        test_guest("tagged-counter")?,
        "in",
        &["out"],
        &["config=tag=x", "config=panic_on=666"],
        1,
    )
    .await?;
    // Eight poison events among good ones, all on one partition.
    let events: Vec<_> = (0..24)
        .map(|i| {
            (
                Some("k".to_string()),
                json!(if i % 3 == 0 { 666 } else { i }),
            )
        })
        .collect();
    let placed = post_all(&host, "in", &events).await?;
    let p = placed[0].partition;
    wait_processed(&host, "t", "in").await?;
    let dead = dead_letters(&host, "t", "").await?;
    let seqs: Vec<_> = dead.iter().map(|d| d["seq"].as_u64()).collect();
    assert_eq!(
        seqs,
        [3, 4, 5, 6, 7].map(Some),
        "the newest five are kept: {dead:?}"
    );
    let offsets: Vec<_> = dead.iter().map(|d| d["offset"].as_u64()).collect();
    assert_eq!(offsets, [9, 12, 15, 18, 21].map(Some));

    let mut admin = host.admin()?;
    let resp = admin
        .delete(&format!("/v1/handlers/t/dlq?partition={p}&through=4"))
        .await?;
    ensure_status(&resp, 200)?;
    assert_eq!(resp.json()?["purged"], 2);
    let left = dead_letters(&host, "t", "").await?;
    assert_eq!(left.first().and_then(|d| d["seq"].as_u64()), Some(5));
    let resp = admin.delete("/v1/handlers/t/dlq").await?;
    ensure_status(&resp, 200)?;
    assert_eq!(resp.json()?["purged"], 3);
    assert!(dead_letters(&host, "t", "").await?.is_empty());
    let resp = admin.delete("/v1/handlers/t/dlq?partition=99").await?;
    ensure_status(&resp, 404)?;
    Ok(())
}

#[tokio::test]
async fn dead_letters_replay_through_the_fixed_version() -> TestResult {
    let host = TestHost::start()?;
    host.create_topics(&["in", "out"]).await?;
    let guest = test_guest("tagged-counter")?;
    let v1 = ["config=tag=a", "config=panic_on=666"];
    deploy_ok(&host, "t", guest.clone(), "in", &["out"], &v1, 1).await?;
    let events = [json!(1), json!(666), json!(2)].map(|v| (Some("k".to_string()), v));
    let placed = post_all(&host, "in", &events).await?;
    let p = placed[0].partition;
    wait_processed(&host, "t", "in").await?;
    assert_eq!(dead_letters(&host, "t", "").await?.len(), 1);

    // Still the poisoned version: the replay fails again and the dead letter stays.
    let mut admin = host.admin()?;
    let resp = admin
        .post_json("/v1/handlers/t/dlq/replay", &json!({}))
        .await?;
    ensure_status(&resp, 200)?;
    let v = resp.json()?;
    assert_eq!(
        (v["replayed"].as_u64(), v["failed"].as_array().map(Vec::len)),
        (Some(0), Some(1)),
        "{v}"
    );
    assert!(
        v["failed"][0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("poison event")),
        "{v}"
    );
    assert_eq!(dead_letters(&host, "t", "").await?.len(), 1);

    // Fixed: the replay commits its output and state, and the dead letter is gone (not while paused:
    // a paused handler processes nothing).
    deploy_ok(&host, "t", guest, "in", &["out"], &["config=tag=b"], 2).await?;
    ensure_status(
        &admin.post_json("/v1/handlers/t/pause", &json!({})).await?,
        200,
    )?;
    let resp = admin
        .post_json("/v1/handlers/t/dlq/replay", &json!({}))
        .await?;
    assert_refused(&resp, 409, "handler_paused", "resume")?;
    assert_eq!(dead_letters(&host, "t", "").await?.len(), 1);
    ensure_status(
        &admin.post_json("/v1/handlers/t/resume", &json!({})).await?,
        200,
    )?;
    let resp = admin
        .post_json(
            &format!("/v1/handlers/t/dlq/replay?partition={p}&seq=0"),
            &json!({}),
        )
        .await?;
    ensure_status(&resp, 200)?;
    assert_eq!(resp.json()?["replayed"], 1);
    assert!(dead_letters(&host, "t", "").await?.is_empty());
    let out: Vec<_> = host
        .read_all("out", p)
        .await?
        .iter()
        .map(|e| (e["value"]["tag"].clone(), e["value"]["count"].as_u64()))
        .collect();
    assert_eq!(
        out,
        [
            (json!("a"), Some(1)),
            (json!("a"), Some(2)),
            (json!("b"), Some(3))
        ],
        "the replayed event counts once, after the others, through v2"
    );
    Ok(())
}

#[tokio::test]
async fn counter_counts_keyless_events_per_partition() -> TestResult {
    // `counter` counts keyless events under the empty key (its documented behaviour), so it writes
    // state under an empty key. The handler may do that: the WIT puts no rule on state keys.
    let host = TestHost::start()?;
    host.create_topics(&["in", "out"]).await?;
    deploy_ok(&host, "c", example("counter")?, "in", &["out"], &[], 1).await?;
    let events = varied_events(200, true);
    let placed = post_all(&host, "in", &events).await?;
    let inputs = read_topic(&host, "in").await?;
    check_inputs(&inputs, &events, &placed);
    wait_processed(&host, "c", "in").await?;
    // Keyless events are spread round-robin, and state is per partition: each partition counts its own.
    check_counter(&inputs, &read_topic(&host, "out").await?);
    // The cells are still well: more events are accepted and counted.
    post_all(&host, "in", &varied_events(80, false)).await?;
    wait_processed(&host, "c", "in").await?;
    check_counter(
        &read_topic(&host, "in").await?,
        &read_topic(&host, "out").await?,
    );
    Ok(())
}

#[tokio::test]
async fn a_state_key_the_store_cannot_hold_fails_the_event_not_the_cell() -> TestResult {
    // `counter` uses the event's key as its state key; ingest puts no bound on key length. A key
    // longer than the storage can index (64 KiB) must cost that event, not the cell.
    let host = TestHost::start()?;
    host.create_topics(&["in", "out"]).await?;
    deploy_ok(&host, "c", example("counter")?, "in", &["out"], &[], 1).await?;
    let huge = "h".repeat(70_000);
    let placed = post_all(&host, "in", &[(Some(huge.clone()), json!(1))]).await?;
    let p = placed[0].partition;
    // Afterwards, events of every partition (that one's cell included) still go through.
    let events = varied_events(80, false);
    post_all(&host, "in", &events).await?;
    wait_processed(&host, "c", "in").await?;
    let inputs = read_topic(&host, "in").await?;
    let outputs = read_topic(&host, "out").await?;
    let dead = dead_letters(&host, "c", "").await?;
    let big_output = outputs[p as usize]
        .first()
        .is_some_and(|o| key_of(o).as_deref() == Some(huge.as_str()));
    let big_dead = dead.iter().any(|d| d["offset"] == 0 && d["partition"] == p);
    assert!(
        big_output ^ big_dead,
        "the big-key event is either counted or dead-lettered, once"
    );
    for (q, (inp, out)) in inputs.iter().zip(&outputs).enumerate() {
        let skip = usize::from(q == p as usize);
        let expected: Vec<_> = running_counts(&inp[skip..])
            .into_iter()
            .map(|(k, n)| (k, Some(n)))
            .collect();
        let out_skip = usize::from(q == p as usize && big_output);
        assert_eq!(counter_outputs(&out[out_skip..]), expected, "partition {q}");
    }
    Ok(())
}

#[tokio::test]
async fn a_component_without_the_exports_is_told_the_sdk_macro_that_exists() -> TestResult {
    // The refusal suggests the fix; the macro it names must be the SDK's (`procd_sdk::export!`).
    let host = TestHost::start()?;
    host.create_topic("in").await?;
    let resp = host
        .deploy("h", test_guest("other-world")?, "in", &[], &[])
        .await?;
    assert_refused(&resp, 400, "invalid_component", "`init`")?;
    let detail = resp.json()?["detail"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        detail.contains("export!`") && !detail.contains("export_handler!"),
        "the hint names a macro procd-sdk does not have: {detail}"
    );
    Ok(())
}

#[tokio::test]
async fn start_positions_latest_and_offset() -> TestResult {
    let host = TestHost::start()?;
    for topic in ["in", "from-latest", "from-offset"] {
        host.create_topic(topic).await?;
    }
    let before = varied_events(100, false);
    post_all(&host, "in", &before).await?;
    let ends_at_deploy = end_offsets(&host, "in").await?;
    deploy_ok(
        &host,
        "latest",
        example("passthrough")?,
        "in",
        &["from-latest"],
        &["from=latest"],
        1,
    )
    .await?;
    deploy_ok(
        &host,
        "offset",
        example("passthrough")?,
        "in",
        &["from-offset"],
        &["from=3"],
        1,
    )
    .await?;
    // Posted right after the deploys were acknowledged: `latest` means the end at deploy time, so a
    // handler deployed from there must see these.
    let after = varied_events(60, false);
    post_all(&host, "in", &after).await?;
    wait_processed(&host, "latest", "in").await?;
    wait_processed(&host, "offset", "in").await?;
    let inputs = read_topic(&host, "in").await?;
    let latest = read_topic(&host, "from-latest").await?;
    let offset = read_topic(&host, "from-offset").await?;
    for (p, inp) in inputs.iter().enumerate() {
        let values = |events: &[Value]| -> Vec<Value> {
            events.iter().map(|e| e["value"].clone()).collect()
        };
        let skip = usize::try_from(ends_at_deploy[p])?;
        assert_eq!(
            values(&latest[p]),
            values(&inp[skip..]),
            "partition {p}: from=latest gives everything after the deploy"
        );
        assert_eq!(
            values(&offset[p]),
            values(&inp[3.min(inp.len())..]),
            "partition {p}: from=3 starts at offset 3"
        );
    }
    Ok(())
}
