//! The handler commands as a user runs them: `procd deploy`, `procd handlers ...` against a real server,
//! `procd run` against the same component deployed on a server (same input, same outputs), and their
//! errors.
//!
//! Waiting: a handler's reported lag can be stale right after a post, so these tests wait until every
//! partition's committed offset reaches the input topic's durable end as the topic API reports it.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use procd::ingest::partitioner::partition_for_key;
use serde_json::Value;

use crate::harness::guests::example_path;
use crate::harness::{TestHost, TestResult, ensure_status, procd};

/// How long a handler gets to process what a test posted (debug builds on two busy cores).
const PROCESS_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs `procd` and fails the test unless it succeeds; returns its stdout.
fn procd_ok(host: Option<&TestHost>, args: &[&str]) -> TestResult<String> {
    let out = procd(host, args, b"")?;
    if !out.status.success() {
        return Err(format!("procd {args:?} failed: {}", text(&out.stderr)).into());
    }
    Ok(text(&out.stdout))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn path_str(path: &Path) -> TestResult<&str> {
    Ok(path.to_str().ok_or("non-UTF-8 path")?)
}

/// Waits until handler `name` has committed everything `input` held when this was called.
async fn wait_processed(host: &TestHost, name: &str, input: &str) -> TestResult<Value> {
    let mut admin = host.admin()?;
    let resp = admin.get(&format!("/v1/topics/{input}")).await?;
    ensure_status(&resp, 200)?;
    let ends: BTreeMap<u64, u64> = resp.json()?["partition_offsets"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| Some((p["partition"].as_u64()?, p["end_offset"].as_u64()?)))
        .collect();
    let deadline = Instant::now() + PROCESS_TIMEOUT;
    loop {
        let resp = admin.get(&format!("/v1/handlers/{name}")).await?;
        ensure_status(&resp, 200)?;
        let v = resp.json()?;
        let parts = v["partitions"].as_array().cloned().unwrap_or_default();
        let done = parts.len() == ends.len()
            && parts.iter().all(|p| {
                p["status"] != "failed"
                    && p["partition"]
                        .as_u64()
                        .and_then(|n| ends.get(&n))
                        .zip(p["committed_offset"].as_u64())
                        .is_some_and(|(end, committed)| committed >= *end)
            });
        if done {
            return Ok(v);
        }
        if Instant::now() > deadline {
            return Err(format!("handler {name} did not process {input} in time: {v}").into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Output records as (key, value) per partition, in order.
type Outputs = BTreeMap<u64, Vec<(Value, Value)>>;

/// Every record of `topic`, as (key, value) per partition, in offset order.
async fn topic_outputs(host: &TestHost, topic: &str, partitions: u32) -> TestResult<Outputs> {
    let mut out = BTreeMap::new();
    for p in 0..partitions {
        let records: Vec<(Value, Value)> = host
            .read_all(topic, p)
            .await?
            .into_iter()
            .map(|r| (r["key"].clone(), r["value"].clone()))
            .collect();
        if !records.is_empty() {
            out.insert(u64::from(p), records);
        }
    }
    Ok(out)
}

/// `procd run`'s stdout as (key, value) per partition, in output order; checks the output name.
fn run_outputs(stdout: &str, output: &str) -> TestResult<Outputs> {
    let mut out = Outputs::new();
    for line in stdout.lines() {
        let v: Value = serde_json::from_str(line)?;
        if v["output"] != output {
            return Err(format!("unexpected output in {line}").into());
        }
        let p = v["partition"].as_u64().ok_or("no partition")?;
        out.entry(p)
            .or_default()
            .push((v["key"].clone(), v["value"].clone()));
    }
    Ok(out)
}

#[tokio::test]
async fn handlers_are_deployed_and_managed_from_the_command_line() -> TestResult {
    let host = TestHost::start()?;
    host.create_topics(&["clicks", "counts"]).await?;
    let counter = example_path("counter")?;
    let counter = path_str(&counter)?;

    let out = procd_ok(
        Some(&host),
        &[
            "deploy", counter, "--name", "hits", "--input", "clicks", "--output", "counts",
        ],
    )?;
    assert_eq!(out, "deployed hits v1 (input: clicks, outputs: counts)\n");

    let events: String = (0..40)
        .map(|i| format!("{{\"key\":\"user-{}\",\"value\":{i}}}\n", i % 5))
        .collect();
    let out = procd(Some(&host), &["produce", "clicks"], events.as_bytes())?;
    assert!(out.status.success(), "{}", text(&out.stderr));
    wait_processed(&host, "hits", "clicks").await?;

    let list = procd_ok(Some(&host), &["handlers", "list"])?;
    let mut lines = list.lines();
    let header: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        ["NAME", "INPUT", "OUTPUTS", "VERSION", "PAUSED", "LAG"]
    );
    let row: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(row, ["hits", "clicks", "counts", "v1", "no", "0"], "{list}");

    let show = procd_ok(Some(&host), &["handlers", "show", "hits"])?;
    assert!(show.contains("active:  v1"), "{show}");
    assert!(
        show.contains("PARTITION  VERSION  COMMITTED  END  LAG  LAG_MS  STATUS  DLQ"),
        "{show}"
    );
    // One row per partition, each caught up.
    let rows: Vec<Vec<&str>> = show
        .lines()
        .skip_while(|l| !l.starts_with("PARTITION"))
        .skip(1)
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows.len(), 8, "{show}");
    assert!(
        rows.iter()
            .all(|r| r.len() == 8 && r[2] == r[3] && r[4] == "0" && r[7] == "0"),
        "{show}"
    );

    // A second version, rolled back and forward again.
    let out = procd_ok(Some(&host), &["deploy", counter, "--name", "hits"])?;
    assert_eq!(out, "deployed hits v2 (input: clicks, outputs: counts)\n");
    let out = procd_ok(Some(&host), &["handlers", "rollback", "hits"])?;
    assert_eq!(out, "rolled back hits to v1\n");
    let show = procd_ok(Some(&host), &["handlers", "show", "hits"])?;
    assert!(
        show.contains("active:  v1") && show.contains("v1 (active)"),
        "{show}"
    );
    let out = procd_ok(
        Some(&host),
        &["handlers", "rollback", "hits", "--version", "2"],
    )?;
    assert_eq!(out, "rolled back hits to v2\n");

    // Pause, resume.
    assert_eq!(
        procd_ok(Some(&host), &["handlers", "pause", "hits"])?,
        "paused hits\n"
    );
    let list = procd_ok(Some(&host), &["handlers", "list"])?;
    assert!(
        list.lines()
            .any(|l| l.starts_with("hits") && l.contains(" yes ")),
        "{list}"
    );
    assert_eq!(
        procd_ok(Some(&host), &["handlers", "resume", "hits"])?,
        "resumed hits\n"
    );

    // Reset to the start: every input is counted again, continuing from the state (11, 12, ...).
    let out = procd_ok(
        Some(&host),
        &["handlers", "reset", "hits", "--to", "earliest"],
    )?;
    assert!(out.starts_with("reset hits to earliest"), "{out}");
    let deadline = Instant::now() + PROCESS_TIMEOUT;
    let counts = loop {
        let counts = topic_outputs(&host, "counts", 8).await?;
        if counts.values().map(Vec::len).sum::<usize>() >= 80 || Instant::now() > deadline {
            break counts;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut max_per_key: BTreeMap<String, u64> = BTreeMap::new();
    for (key, value) in counts.values().flatten() {
        let entry = max_per_key.entry(key.to_string()).or_default();
        *entry = (*entry).max(value.as_u64().unwrap_or(0));
    }
    assert_eq!(max_per_key.len(), 5);
    assert!(max_per_key.values().all(|n| *n == 16), "{max_per_key:?}");
    let show = procd_ok(Some(&host), &["handlers", "show", "hits"])?;
    assert!(show.contains("reset:   #1 to earliest"), "{show}");
    // The other targets parse and are accepted.
    for to in ["latest", "offset:3", "timestamp:0"] {
        procd_ok(Some(&host), &["handlers", "reset", "hits", "--to", to])?;
    }
    let out = procd_ok(
        Some(&host),
        &[
            "handlers",
            "reset",
            "hits",
            "--to",
            "offset:0",
            "--clear-state",
        ],
    )?;
    assert!(out.contains("state cleared"), "{out}");

    // Counting never fails: no dead letters.
    assert_eq!(procd_ok(Some(&host), &["handlers", "dlq", "hits"])?, "");

    assert_eq!(
        procd_ok(Some(&host), &["handlers", "remove", "hits"])?,
        "removed handler hits\n"
    );
    let list = procd_ok(Some(&host), &["handlers", "list"])?;
    assert_eq!(list.lines().count(), 1, "{list}");
    Ok(())
}

/// Deploys `example` on a server, posts `events` with `procd produce`, and runs the same component
/// with `procd run` over the same file: the outputs must be the same, partition by partition, in order.
/// Returns `procd run`'s exit status and stderr, and its outputs per partition, for further checks.
async fn compare_run_with_server(
    example: &str,
    events: &str,
    config: &[&str],
) -> TestResult<(Output, Outputs)> {
    let host = TestHost::start()?;
    let (input, output) = (format!("{example}-in"), format!("{example}-out"));
    host.create_topic(&input).await?;
    host.create_topic(&output).await?;
    let component = example_path(example)?;
    let component = path_str(&component)?;
    let mut deploy = vec!["deploy", component, "--input", &input, "--output", &output];
    for kv in config {
        deploy.extend(["--config", kv]);
    }
    procd_ok(Some(&host), &deploy)?;
    let out = procd(Some(&host), &["produce", &input], events.as_bytes())?;
    assert!(out.status.success(), "{}", text(&out.stderr));
    wait_processed(&host, example, &input).await?;
    let served = topic_outputs(&host, &output, 8).await?;

    let dir = tempfile::tempdir()?;
    let file = dir.path().join("events.ndjson");
    std::fs::write(&file, events)?;
    let mut run = vec![
        "run",
        component,
        "--input",
        path_str(&file)?,
        "--output",
        &output,
    ];
    for kv in config {
        run.extend(["--config", kv]);
    }
    let out = procd(None, &run, b"")?;
    let ran = run_outputs(&text(&out.stdout), &output)?;
    assert!(!served.is_empty());
    assert_eq!(ran, served, "procd run differs from the server");
    Ok((out, ran))
}

/// Two keys that land in the same partition (of 8), so that partition gets more than one batch
/// (1000 events) of input.
fn hot_keys() -> (String, String) {
    let p = partition_for_key(b"hot-0", 8);
    let other = (1..)
        .map(|n| format!("hot-{n}"))
        .find(|k| partition_for_key(k.as_bytes(), 8) == p)
        .unwrap_or_default();
    ("hot-0".into(), other)
}

#[tokio::test]
async fn run_gives_the_counter_outputs_a_server_gives() -> TestResult {
    // Keyed events, half of them in one partition (several batches there). Keyless events would be
    // counted under the empty state key, which the server cannot store (see the report). Two events
    // share an id: the second is a duplicate both drop.
    let (a, b) = hot_keys();
    let mut events: String = (0..2400)
        .map(|i| match i % 4 {
            0 => format!("{{\"key\":\"{a}\",\"value\":{i}}}\n"),
            2 => format!("{{\"key\":\"{b}\",\"value\":{i}}}\n"),
            _ => format!("{{\"key\":\"user-{}\",\"value\":{{\"n\":{i}}}}}\n", i % 17),
        })
        .collect();
    events.push_str("{\"key\":\"user-1\",\"id\":\"req-1\",\"value\":1}\n\n");
    events.push_str("{\"key\":\"user-1\",\"id\":\"req-1\",\"value\":1}\n");
    let (out, ran) = compare_run_with_server("counter", &events, &[]).await?;
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("line 2403: event id \"req-1\" is a duplicate"),
        "{stderr}"
    );
    let hot = u64::from(partition_for_key(a.as_bytes(), 8));
    assert!(ran.get(&hot).map_or(0, Vec::len) > 1000);
    Ok(())
}

#[tokio::test]
async fn run_gives_the_enrich_outputs_a_server_gives_and_reports_failed_events() -> TestResult {
    let (a, b) = hot_keys();
    let mut lines: Vec<String> = (0..2500)
        .map(|i| match (i % 13, i % 3) {
            // Keyless events with an id are placed by their id, the same way in both.
            (0, _) => format!("{{\"id\":\"req-{i}\",\"value\":{{\"n\":{i}}}}}"),
            (_, 0) => format!(
                "{{\"key\":\"k{}\",\"value\":{{\"n\":{i},\"s\":2.50}}}}",
                i % 11
            ),
            (_, 1) => format!("{{\"key\":\"{a}\",\"value\":{{\"n\":{i}}}}}"),
            _ => format!("{{\"key\":\"{b}\",\"value\":{{\"n\":{i}}}}}"),
        })
        .collect();
    // Values the handler refuses: in the hot partition's first and second batch, and elsewhere.
    lines[499] = format!("{{\"key\":\"{a}\",\"value\":[1,2]}}");
    lines[1799] = format!("{{\"key\":\"{b}\",\"value\":\"text\"}}");
    lines[2400] = "{\"key\":\"k3\",\"value\":null}".into();
    let events = lines.join("\n") + "\n";
    let (out, ran) = compare_run_with_server("enrich", &events, &["add.region=eu"]).await?;
    assert!(!out.status.success(), "failed events must fail the run");
    let stderr = text(&out.stderr);
    let mut failed: Vec<(u64, String)> = stderr
        .lines()
        .filter_map(|l| l.strip_prefix("error: event at line "))
        .filter_map(|l| {
            let (n, rest) = l.split_once(' ')?;
            Some((n.parse().ok()?, rest.to_string()))
        })
        .collect();
    failed.sort();
    let lines: Vec<u64> = failed.iter().map(|(n, _)| *n).collect();
    assert_eq!(lines, [500, 1800, 2401], "{stderr}");
    assert!(
        failed[0]
            .1
            .ends_with("): value is not a JSON object but an array"),
        "{stderr}"
    );
    assert!(
        stderr
            .trim_end()
            .ends_with("error: 3 of 2500 events failed (see the errors above); a deployed handler would dead-letter them"),
        "{stderr}"
    );
    let hot = u64::from(partition_for_key(a.as_bytes(), 8));
    assert!(ran.get(&hot).map_or(0, Vec::len) > 1000);
    let first: Value = serde_json::from_str(text(&out.stdout).lines().next().unwrap_or("{}"))?;
    assert_eq!(first["value"]["region"], "eu");
    Ok(())
}

#[tokio::test]
async fn dead_letters_print_as_ndjson() -> TestResult {
    let host = TestHost::start()?;
    host.create_topics(&["in", "out"]).await?;
    let enrich = example_path("enrich")?;
    procd_ok(
        Some(&host),
        &[
            "deploy",
            path_str(&enrich)?,
            "--input",
            "in",
            "--output",
            "out",
        ],
    )?;
    let events = "{\"key\":\"a\",\"value\":{}}\n{\"key\":\"a\",\"value\":[1]}\n";
    let out = procd(Some(&host), &["produce", "in"], events.as_bytes())?;
    assert!(out.status.success(), "{}", text(&out.stderr));
    wait_processed(&host, "enrich", "in").await?;
    let dlq = procd_ok(Some(&host), &["handlers", "dlq", "enrich"])?;
    let entries: Vec<Value> = dlq
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    assert_eq!(entries.len(), 1, "{dlq}");
    assert_eq!(entries[0]["offset"], 1);
    assert_eq!(entries[0]["key"], "a");
    assert_eq!(
        entries[0]["error"],
        "value is not a JSON object but an array"
    );
    let p = entries[0]["partition"].to_string();
    let dlq = procd_ok(
        Some(&host),
        &[
            "handlers",
            "dlq",
            "enrich",
            "--partition",
            &p,
            "--limit",
            "1",
        ],
    )?;
    assert_eq!(dlq.lines().count(), 1, "{dlq}");
    let show = procd_ok(Some(&host), &["handlers", "show", "enrich"])?;
    assert!(
        show.contains("(new partitions start at earliest)"),
        "{show}"
    );
    Ok(())
}

#[tokio::test]
async fn handler_cli_errors_are_one_line_with_a_non_zero_exit() -> TestResult {
    let host = TestHost::start()?;
    host.create_topic("t").await?;
    let counter = example_path("counter")?;
    let counter = path_str(&counter)?;
    let dir = tempfile::tempdir()?;
    let not_wasm = dir.path().join("notes.wasm");
    std::fs::write(&not_wasm, "hello")?;
    let bad_events = dir.path().join("bad.ndjson");
    std::fs::write(&bad_events, "{\"value\":1}\n\n{\"value\":\n")?;
    let events = dir.path().join("events.ndjson");
    std::fs::write(&events, "{\"value\":1}\n")?;
    let (not_wasm, bad_events, events) = (
        path_str(&not_wasm)?,
        path_str(&bad_events)?,
        path_str(&events)?,
    );

    // (server, args, expected in the error line)
    type Case<'a> = (Option<&'a TestHost>, Vec<&'a str>, &'a str);
    let cases: Vec<Case<'_>> = vec![
        (
            Some(&host),
            vec!["deploy", "/no/such/handler.wasm", "--input", "t"],
            "cannot read /no/such/handler.wasm",
        ),
        (
            Some(&host),
            vec!["deploy", not_wasm, "--input", "t"],
            "not a WebAssembly binary",
        ),
        (
            Some(&host),
            vec!["deploy", counter, "--input", "missing"],
            "unknown_topic",
        ),
        (
            Some(&host),
            vec!["deploy", counter, "--input", "t", "--from", "tomorrow"],
            "--from",
        ),
        (
            Some(&host),
            vec!["deploy", counter, "--input", "t", "--config", "novalue"],
            "KEY=VALUE",
        ),
        (
            None,
            vec![
                "--admin-url",
                "http://127.0.0.1:1",
                "deploy",
                counter,
                "--input",
                "t",
            ],
            "cannot reach procd",
        ),
        (
            None,
            vec!["--admin-url", "http://127.0.0.1:1", "handlers", "list"],
            "cannot reach procd",
        ),
        (
            Some(&host),
            vec!["deploy", counter],
            "handler \"counter\" does not exist yet: pass --input TOPIC",
        ),
        (
            Some(&host),
            vec!["handlers", "show", "nope"],
            "unknown_handler",
        ),
        (
            Some(&host),
            vec!["handlers", "pause", "nope"],
            "unknown_handler",
        ),
        (
            Some(&host),
            vec!["handlers", "dlq", "nope"],
            "unknown_handler",
        ),
        (
            Some(&host),
            vec!["handlers", "reset", "nope", "--to", "sideways"],
            "invalid --to \"sideways\": use earliest, latest, offset:N or timestamp:MS",
        ),
        (
            Some(&host),
            vec!["handlers", "reset", "nope", "--to", "offset:x"],
            "offset must be a whole number",
        ),
        (
            None,
            vec!["run", "/no/such/handler.wasm", "--input", events],
            "cannot read /no/such/handler.wasm",
        ),
        (
            None,
            vec!["run", counter, "--input", "/no/such/events.ndjson"],
            "cannot open /no/such/events.ndjson",
        ),
        (
            None,
            vec!["run", counter, "--input", bad_events],
            "bad.ndjson line 3: EOF while parsing",
        ),
        (
            None,
            vec!["run", not_wasm, "--input", events],
            "not a WebAssembly binary",
        ),
        (
            None,
            vec!["run", counter, "--input", events, "--partitions", "0"],
            "--partitions must be in 1..=4096",
        ),
    ];
    for (h, args, expect) in cases {
        let out = procd(h, &args, b"")?;
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(out.stdout.is_empty(), "{args:?}: {}", text(&out.stdout));
        assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: {stderr}");
        assert!(
            stderr.starts_with("error: ") && stderr.contains(expect),
            "{args:?}: {stderr}"
        );
        assert!(
            !stderr.contains("panicked") && !stderr.contains("{ "),
            "{args:?}: {stderr}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn an_oversized_component_is_refused_in_one_line() -> TestResult {
    let host = TestHost::start_with(8, 2, &["handler.max_component_bytes=4096"])?;
    host.create_topic("t").await?;
    let counter = example_path("counter")?;
    let out = procd(
        Some(&host),
        &["deploy", path_str(&counter)?, "--input", "t"],
        b"",
    )?;
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("error: HTTP 413 component_too_large"),
        "{stderr}"
    );
    Ok(())
}
