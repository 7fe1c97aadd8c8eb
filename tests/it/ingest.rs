//! Ingest and read through the data plane: formats, routing, validation, limits, dedup, long-poll.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use procd::client::{Client, Response};
use serde_json::{Value, json};

use crate::harness::{TestHost, TestResult, ensure_status, ndjson};

const PARTITIONS: u32 = 8;

/// End offsets of every partition of a topic, from the control plane.
async fn end_offsets(host: &TestHost, topic: &str) -> TestResult<Vec<u64>> {
    let resp = host.admin()?.get(&format!("/v1/topics/{topic}")).await?;
    ensure_status(&resp, 200)?;
    let v = resp.json()?;
    let parts = v["partition_offsets"]
        .as_array()
        .ok_or("no partition_offsets")?;
    Ok(parts
        .iter()
        .map(|p| p["end_offset"].as_u64().unwrap_or(u64::MAX))
        .collect())
}

fn results(resp: &procd::client::Response) -> TestResult<Vec<Value>> {
    Ok(resp.json()?["results"]
        .as_array()
        .ok_or("no results")?
        .clone())
}

#[tokio::test]
async fn json_and_raw_events_round_trip_across_all_partitions() -> TestResult {
    let host = TestHost::start()?;
    host.create_topic("t").await?;
    let mut data = host.data()?;

    // NDJSON with varied JSON values, 200 keys so every partition gets some.
    let mut body = String::new();
    let mut sent = Vec::new();
    for i in 0..200 {
        let value = match i % 4 {
            0 => json!({"n": i, "nested": {"list": [1, 2.5, "x", null, true]}}),
            1 => json!(format!("string {i} with \"quotes\" and ünïcode")),
            2 => json!(i),
            _ => json!([i, {"a": null}]),
        };
        let event =
            json!({"key": format!("key-{i}"), "value": value, "headers": {"h": format!("{i}")}});
        body.push_str(&event.to_string());
        body.push('\n');
        sent.push(event);
    }
    let resp = data.post_ndjson("/v1/topics/t/events", body).await?;
    ensure_status(&resp, 202)?;
    let mut placed: Vec<(u64, u64)> = Vec::new();
    for r in results(&resp)? {
        placed.push((
            r["partition"].as_u64().ok_or("partition")?,
            r["offset"].as_u64().ok_or("offset")?,
        ));
    }

    // A JSON array and a single JSON object.
    let arr = json!([{"key": "arr-1", "value": {"a": 1}}, {"key": "arr-2", "value": "b"}]);
    let resp = data.post_json("/v1/topics/t/events", &arr).await?;
    ensure_status(&resp, 202)?;
    assert_eq!(results(&resp)?.len(), 2);
    let resp = data
        .post_json("/v1/topics/t/events", &json!({"value": 7}))
        .await?;
    ensure_status(&resp, 202)?;

    // Raw bytes, including bytes that are not UTF-8, come back byte-exact.
    let raw: Vec<u8> = (0..=255u8).rev().collect();
    let resp = data
        .request(
            hyper::Method::POST,
            "/v1/topics/t/events",
            &[
                ("content-type", "application/octet-stream"),
                ("procd-key", "raw-key"),
            ],
            raw.clone(),
        )
        .await?;
    ensure_status(&resp, 202)?;
    let r = &results(&resp)?[0];
    let (raw_p, raw_o) = (
        r["partition"].as_u64().ok_or("p")?,
        r["offset"].as_u64().ok_or("o")?,
    );

    // Read everything back and compare per offset.
    let mut by_place: HashMap<(u64, u64), Value> = HashMap::new();
    let mut seen_partitions = 0;
    for p in 0..PARTITIONS {
        let events = host.read_all("t", p).await?;
        if !events.is_empty() {
            seen_partitions += 1;
        }
        for (i, e) in events.iter().enumerate() {
            assert_eq!(
                e["offset"].as_u64(),
                Some(i as u64),
                "offsets are dense from 0"
            );
            assert_eq!(e["partition"].as_u64(), Some(u64::from(p)));
            by_place.insert((u64::from(p), i as u64), e.clone());
        }
    }
    assert_eq!(
        seen_partitions, PARTITIONS,
        "200 keys reach every partition"
    );
    for (event, place) in sent.iter().zip(&placed) {
        let got = by_place.get(place).ok_or("acknowledged event missing")?;
        assert_eq!(got["key"], event["key"]);
        assert_eq!(got["value"], event["value"]);
        assert_eq!(got["headers"], event["headers"]);
        assert!(
            got["timestamp_ms"]
                .as_u64()
                .is_some_and(|t| t > 1_600_000_000_000)
        );
    }
    let got_raw = by_place.get(&(raw_p, raw_o)).ok_or("raw event missing")?;
    use base64::Engine as _;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(got_raw["value_base64"].as_str().ok_or("b64")?)?;
    assert_eq!(decoded, raw);
    assert_eq!(got_raw["key"], "raw-key");
    Ok(())
}

/// `toPositive(murmur2(key)) % 8` for Apache Kafka's published murmur2 vectors.
fn kafka_partition(hash: i32) -> u64 {
    u64::from((hash as u32) & 0x7fff_ffff) % u64::from(PARTITIONS)
}

#[tokio::test]
async fn keys_land_where_kafka_puts_them_every_time() -> TestResult {
    let host = TestHost::start()?;
    host.create_topic("t").await?;
    let mut data = host.data()?;
    let vectors: [(&str, i32); 6] = [
        ("21", -973_932_308),
        ("foobar", -790_332_482),
        ("a-little-bit-long-string", -985_981_536),
        ("a-little-bit-longer-string", -1_486_304_829),
        (
            "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
            -58_897_971,
        ),
        ("abc", 479_470_107),
    ];
    for round in 0..3 {
        let body: String = vectors
            .iter()
            .map(|(k, _)| format!("{{\"key\":\"{k}\",\"value\":{round}}}\n"))
            .collect();
        let resp = data.post_ndjson("/v1/topics/t/events", body).await?;
        ensure_status(&resp, 202)?;
        for ((key, hash), r) in vectors.iter().zip(results(&resp)?) {
            assert_eq!(
                r["partition"].as_u64(),
                Some(kafka_partition(*hash)),
                "key {key}"
            );
        }
    }
    Ok(())
}

#[tokio::test]
async fn malformed_ndjson_is_refused_whole_and_names_the_line() -> TestResult {
    let host = TestHost::start()?;
    host.create_topic("t").await?;
    let mut data = host.data()?;
    let mut body: String = (0..16)
        .map(|i| format!("{{\"key\":\"k{i}\",\"value\":{i}}}\n"))
        .collect();
    body.push_str("{\"key\":\"k\",\"value\":\n");
    body.push_str("{\"key\":\"k\",\"value\":1}\n");
    let resp = data.post_ndjson("/v1/topics/t/events", body).await?;
    ensure_status(&resp, 400)?;
    let v = resp.json()?;
    assert_eq!(v["error"], "invalid_event");
    assert!(
        v["detail"]
            .as_str()
            .is_some_and(|d| d.starts_with("line 17:")),
        "{v}"
    );
    assert_eq!(
        end_offsets(&host, "t").await?,
        vec![0; PARTITIONS as usize],
        "nothing appended"
    );
    for p in 0..PARTITIONS {
        assert!(host.read_all("t", p).await?.is_empty());
    }

    for (bad, why) in [
        ("{\"value\":1,\"extra\":2}", "unknown field"),
        ("{\"key\":1,\"value\":1}", "key must be a string"),
        ("{\"key\":\"k\"}", "value is required"),
        ("[1,2]", "not an object"),
        (
            "{\"value\":1,\"headers\":{\"h\":1}}",
            "header values are strings",
        ),
    ] {
        let resp = data.post_ndjson("/v1/topics/t/events", bad).await?;
        assert_eq!(resp.status, 400, "{why}: {}", resp.error_line());
    }
    let resp = data
        .request(
            hyper::Method::POST,
            "/v1/topics/t/events",
            &[("content-type", "text/plain")],
            "x",
        )
        .await?;
    ensure_status(&resp, 415)?;
    assert_eq!(end_offsets(&host, "t").await?, vec![0; PARTITIONS as usize]);
    Ok(())
}

#[tokio::test]
async fn unknown_topics_and_partitions_are_404() -> TestResult {
    let host = TestHost::start()?;
    host.create_topic("t").await?;
    let mut data = host.data()?;
    let resp = data
        .post_ndjson("/v1/topics/nope/events", "{\"value\":1}")
        .await?;
    ensure_status(&resp, 404)?;
    assert_eq!(resp.json()?["error"], "unknown_topic");
    let resp = data.get("/v1/topics/nope/partitions/0/events").await?;
    ensure_status(&resp, 404)?;
    let resp = data.get("/v1/topics/t/partitions/8/events").await?;
    ensure_status(&resp, 404)?;
    assert_eq!(resp.json()?["error"], "unknown_partition");
    let resp = data.get("/v1/topics/t/partitions/0/events?from=x").await?;
    ensure_status(&resp, 400)?;
    for query in ["from=5&from=0", "limit=0"] {
        let resp = data
            .get(&format!("/v1/topics/t/partitions/0/events?{query}"))
            .await?;
        ensure_status(&resp, 400)?;
        assert_eq!(resp.json()?["error"], "invalid_query", "{query}");
    }
    Ok(())
}

#[tokio::test]
async fn oversize_bodies_get_413_and_append_nothing() -> TestResult {
    let host = TestHost::start_with(PARTITIONS, 2, &["ingest.max_body_bytes=4096"])?;
    host.create_topic("t").await?;
    let mut data = host.data()?;
    let big: String = (0..200)
        .map(|i| format!("{{\"key\":\"k{i}\",\"value\":{i}}}\n"))
        .collect();
    assert!(big.len() > 4096);
    let resp = data.post_ndjson("/v1/topics/t/events", big).await?;
    ensure_status(&resp, 413)?;
    assert_eq!(resp.json()?["error"], "body_too_large");
    // Still serving, nothing appended.
    let mut data = host.data()?;
    let resp = data
        .post_ndjson("/v1/topics/t/events", "{\"value\":1}")
        .await?;
    ensure_status(&resp, 202)?;
    let total: u64 = end_offsets(&host, "t").await?.iter().sum();
    assert_eq!(total, 1);
    Ok(())
}

#[tokio::test]
async fn duplicate_ids_are_not_appended_again_even_after_restart() -> TestResult {
    let mut host = TestHost::start()?;
    host.create_topic("t").await?;
    let mut data = host.data()?;
    // A retry is the same event: same key (or none), same id. Dedup is per partition, so a retry must
    // route where the original did; events without a key are routed by their id for that reason.
    let body = "{\"key\":\"a\",\"value\":1,\"id\":\"e-1\"}\n{\"value\":2,\"id\":\"e-2\"}\n{\"key\":\"a\",\"value\":3,\"id\":\"e-1\"}\n";
    let resp = data.post_ndjson("/v1/topics/t/events", body).await?;
    ensure_status(&resp, 202)?;
    let first = results(&resp)?;
    assert_eq!(
        first[2]["duplicate"], true,
        "a repeated id within one request is a duplicate"
    );
    assert_eq!(first[2]["offset"], first[0]["offset"]);
    assert_eq!(first[2]["partition"], first[0]["partition"]);

    let retry = "{\"key\":\"a\",\"value\":1,\"id\":\"e-1\"}\n{\"value\":2,\"id\":\"e-2\"}\n";
    let resp = data.post_ndjson("/v1/topics/t/events", retry).await?;
    let again = results(&resp)?;
    for (a, b) in again.iter().zip(&first) {
        assert_eq!(a["duplicate"], true);
        assert_eq!(
            (&a["partition"], &a["offset"]),
            (&b["partition"], &b["offset"])
        );
    }

    host.restart()?;
    let mut data = host.data()?;
    let resp = data.post_ndjson("/v1/topics/t/events", retry).await?;
    let after = results(&resp)?;
    for (a, b) in after.iter().zip(&first) {
        assert_eq!(a["duplicate"], true, "dedup window survives restart");
        assert_eq!(
            (&a["partition"], &a["offset"]),
            (&b["partition"], &b["offset"])
        );
    }
    let total: u64 = end_offsets(&host, "t").await?.iter().sum();
    assert_eq!(total, 2, "only the two distinct ids were appended");
    Ok(())
}

#[tokio::test]
async fn long_poll_returns_as_soon_as_data_arrives() -> TestResult {
    let host = TestHost::start()?;
    host.create_topic("t").await?;
    // Find the partition of key "k" first.
    let mut data = host.data()?;
    let resp = data
        .post_ndjson("/v1/topics/t/events", "{\"key\":\"k\",\"value\":0}")
        .await?;
    let p = results(&resp)?[0]["partition"].as_u64().ok_or("p")?;

    let url = host.url.clone();
    let started = Instant::now();
    let poll = tokio::spawn(async move {
        let mut reader = Client::new(&url)?;
        let resp = reader
            .get(&format!(
                "/v1/topics/t/partitions/{p}/events?from=1&wait_ms=20000"
            ))
            .await?;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>((resp, started.elapsed()))
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !poll.is_finished(),
        "the poll waits while there is nothing at `from`"
    );
    let resp = data
        .post_ndjson("/v1/topics/t/events", "{\"key\":\"k\",\"value\":1}")
        .await?;
    ensure_status(&resp, 202)?;
    let (got, waited) = poll.await??;
    ensure_status(&got, 200)?;
    let events = ndjson(&got)?;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["value"], 1);
    assert!(
        waited < Duration::from_secs(15),
        "returned on arrival, not at wait_ms ({waited:?})"
    );

    // With nothing arriving, it returns empty at wait_ms.
    let resp = data
        .get(&format!(
            "/v1/topics/t/partitions/{p}/events?from=2&wait_ms=100"
        ))
        .await?;
    ensure_status(&resp, 200)?;
    assert!(resp.body.is_empty());
    assert_eq!(resp.header("procd-next-offset"), Some("2"));
    Ok(())
}

/// A request body of 100 small events, about 2.9 KB.
fn hundred_events() -> String {
    (0..100)
        .map(|i| format!("{{\"key\":\"k{i}\",\"value\":{i}}}\n"))
        .collect()
}

/// Posts `body` to topic `t` as `tenant`.
async fn post_as(data: &mut Client, tenant: &str, body: &str) -> TestResult<Response> {
    let resp = data
        .request(
            hyper::Method::POST,
            "/v1/topics/t/events",
            &[
                ("content-type", "application/x-ndjson"),
                ("procd-tenant", tenant),
            ],
            body.to_string().into_bytes(),
        )
        .await?;
    Ok(resp)
}

#[tokio::test]
async fn a_tenant_over_its_quota_gets_429_while_another_is_served() -> TestResult {
    let host = TestHost::start_with(
        PARTITIONS,
        2,
        &[
            "admission.tenant_bytes_per_sec=2000",
            "admission.tenant_burst_bytes=4000",
        ],
    )?;
    host.create_topic("t").await?;
    let body = hundred_events();
    assert!(body.len() > 2000 && body.len() < 4000);
    let mut data = host.data()?;
    // The first request fits the burst; the second, right after, does not.
    ensure_status(&post_as(&mut data, "hot", &body).await?, 202)?;
    let refused = post_as(&mut data, "hot", &body).await?;
    ensure_status(&refused, 429)?;
    let retry: u64 = refused
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .ok_or("a 429 has a Retry-After")?;
    assert!(
        (1..=2).contains(&retry),
        "about a second at 2000 B/s: {retry}"
    );
    assert_eq!(refused.json()?["error"], "over_quota");
    // Another tenant is untouched, and the refused request appended nothing.
    ensure_status(&post_as(&mut data, "calm", &body).await?, 202)?;
    let total: u64 = end_offsets(&host, "t").await?.iter().sum();
    assert_eq!(total, 200);
    // After the advertised wait, the hot tenant is served again.
    tokio::time::sleep(Duration::from_secs(retry)).await;
    ensure_status(&post_as(&mut data, "hot", &body).await?, 202)?;
    Ok(())
}

/// Reads one HTTP/1.1 response (head and a `Content-Length` body) from `stream`.
fn read_response(stream: &mut std::net::TcpStream) -> TestResult<String> {
    use std::io::Read;
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte)? == 0 {
            return Err(format!(
                "connection closed after {:?}",
                String::from_utf8_lossy(&buf)
            )
            .into());
        }
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let length: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().to_string())
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body)?;
    Ok(head + &String::from_utf8_lossy(&body))
}

#[tokio::test]
async fn a_request_refused_before_its_body_keeps_the_connection_usable() -> TestResult {
    use std::io::Write;
    let host = TestHost::start_with(
        PARTITIONS,
        2,
        &[
            "admission.tenant_bytes_per_sec=1000",
            "admission.tenant_burst_bytes=100000",
        ],
    )?;
    host.create_topic("t").await?;
    let addr = host.url.trim_start_matches("http://").to_string();
    let answers = tokio::task::spawn_blocking(move || -> TestResult<Vec<String>> {
        let mut stream = std::net::TcpStream::connect(&addr)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let line = format!("{{\"key\":\"k\",\"value\":\"{}\"}}\n", "x".repeat(900));
        let body: String = line.repeat(60); // ~55 KB: the first fits the burst, the second does not
        let head = |tenant: &str, len: usize| {
            format!(
                "POST /v1/topics/t/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-ndjson\r\n\
                 Procd-Tenant: {tenant}\r\nContent-Length: {len}\r\n\r\n"
            )
        };
        let mut answers = Vec::new();
        for tenant in ["hot", "hot", "calm"] {
            // The head, then the body in two parts: the refusal comes before the body is all there.
            stream.write_all(head(tenant, body.len()).as_bytes())?;
            let (first, rest) = body.split_at(body.len() / 2);
            stream.write_all(first.as_bytes())?;
            std::thread::sleep(Duration::from_millis(100));
            stream.write_all(rest.as_bytes())?;
            answers.push(read_response(&mut stream)?);
        }
        Ok(answers)
    })
    .await??;
    assert!(answers[0].starts_with("HTTP/1.1 202"), "{}", answers[0]);
    assert!(answers[1].starts_with("HTTP/1.1 429"), "{}", answers[1]);
    assert!(answers[1].contains("over_quota"), "{}", answers[1]);
    // The same connection serves the next request.
    assert!(answers[2].starts_with("HTTP/1.1 202"), "{}", answers[2]);
    let total: u64 = end_offsets(&host, "t").await?.iter().sum();
    assert_eq!(total, 120);
    Ok(())
}

#[tokio::test]
async fn tenant_overrides_give_a_tenant_its_own_quota() -> TestResult {
    let host = TestHost::start_with(
        PARTITIONS,
        2,
        &[
            "admission.tenant_bytes_per_sec=2000",
            "admission.tenant_burst_bytes=4000",
            "admission.tenant_overrides=vip=0,big=100000/50000",
        ],
    )?;
    host.create_topic("t").await?;
    let body = hundred_events();
    let mut data = host.data()?;
    async fn statuses(
        data: &mut Client,
        body: &str,
        tenant: &str,
        n: usize,
    ) -> TestResult<Vec<u16>> {
        let mut out = Vec::new();
        for _ in 0..n {
            out.push(post_as(data, tenant, body).await?.status);
        }
        Ok(out)
    }
    // ~2.9 KB per request: the default quota's burst takes one, "big" about seventeen, "vip" all.
    assert_eq!(statuses(&mut data, &body, "vip", 30).await?, vec![202; 30]);
    assert_eq!(statuses(&mut data, &body, "big", 10).await?, vec![202; 10]);
    assert_eq!(
        statuses(&mut data, &body, "plain", 2).await?,
        vec![202, 429]
    );
    Ok(())
}

#[tokio::test]
async fn requests_over_the_in_flight_budget_get_503_until_it_frees_up() -> TestResult {
    let host = TestHost::start_with(
        PARTITIONS,
        2,
        &[
            "admission.max_in_flight_bytes=1000",
            "ingest.body_idle_timeout_ms=1500",
        ],
    )?;
    host.create_topic("t").await?;
    let addr = host.url.trim_start_matches("http://").to_string();
    // A request that declares 900 bytes and sends none holds them until its body times out.
    let stalled = tokio::task::spawn_blocking(move || {
        raw_exchange(
            &addr,
            b"POST /v1/topics/t/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-ndjson\r\n\
              Connection: close\r\nContent-Length: 900\r\n\r\n",
            false,
        )
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut data = host.data()?;
    let line = "{\"key\":\"k\",\"value\":\"".to_string() + &"x".repeat(200) + "\"}\n";
    let refused = data
        .post_ndjson("/v1/topics/t/events", line.clone())
        .await?;
    ensure_status(&refused, 503)?;
    assert_eq!(refused.json()?["error"], "overloaded");
    assert!(refused.header("retry-after").is_some());
    let (answer, _) = stalled.await??;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    // The stalled request's bytes are released with its answer.
    ensure_status(
        &data
            .post_ndjson("/v1/topics/t/events", line.clone())
            .await?,
        202,
    )?;
    Ok(())
}

/// A chunked request head (no `Content-Length`) for topic `t`.
const CHUNKED_HEAD: &str = "POST /v1/topics/t/events HTTP/1.1\r\nHost: x\r\n\
    Content-Type: application/x-ndjson\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n";

/// `data` as one chunk of a chunked body.
fn chunk(data: &str) -> String {
    format!("{:x}\r\n{data}\r\n", data.len())
}

#[tokio::test]
async fn a_body_without_a_length_holds_the_largest_body_of_the_in_flight_budget() -> TestResult {
    let host = TestHost::start_with(
        PARTITIONS,
        2,
        &[
            "admission.max_in_flight_bytes=8192",
            "ingest.max_body_bytes=4096",
            "ingest.body_idle_timeout_ms=1500",
        ],
    )?;
    host.create_topic("t").await?;
    let addr = host.url.trim_start_matches("http://").to_string();
    let line = "{\"key\":\"k\",\"value\":1}\n";
    let raw = |bytes: String| {
        let addr = addr.clone();
        tokio::task::spawn_blocking(move || raw_exchange(&addr, bytes.as_bytes(), false))
    };
    // Two chunked uploads that send one small chunk and stall: each holds 4096 bytes (the most its
    // body may be), so together they fill the 8192-byte budget although they sent 44 bytes.
    let stalled = [
        raw(format!("{CHUNKED_HEAD}{}", chunk(line))),
        raw(format!("{CHUNKED_HEAD}{}", chunk(line))),
    ];
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut data = host.data()?;
    let refused = data.post_ndjson("/v1/topics/t/events", line).await?;
    ensure_status(&refused, 503)?;
    assert_eq!(refused.json()?["error"], "overloaded");
    assert_eq!(refused.header("retry-after"), Some("1"));
    // A third chunked upload is refused before its body is read, the same way (its head alone is
    // sent, so the server's close cannot reset the connection before the answer is read).
    let (third, _) = raw(CHUNKED_HEAD.to_string()).await??;
    assert!(third.starts_with("HTTP/1.1 503"), "{third}");
    assert!(
        third.to_ascii_lowercase().contains("retry-after: 1"),
        "{third}"
    );
    for upload in stalled {
        let (answer, _) = upload.await??;
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    }
    // With the holds released, a chunked upload is read and admitted at its real size.
    let (answer, _) = raw(format!(
        "{CHUNKED_HEAD}{}{}0\r\n\r\n",
        chunk(line),
        chunk(line)
    ))
    .await??;
    assert!(answer.starts_with("HTTP/1.1 202"), "{answer}");
    let total: u64 = end_offsets(&host, "t").await?.iter().sum();
    assert_eq!(total, 2, "only the complete upload appended");
    Ok(())
}

#[tokio::test]
async fn a_request_larger_than_a_burst_gets_413_not_a_retry_that_cannot_succeed() -> TestResult {
    let host = TestHost::start_with(
        PARTITIONS,
        2,
        &[
            "admission.tenant_bytes_per_sec=1000",
            "admission.tenant_burst_bytes=2000",
            "admission.tenant_overrides=wide=100000/100000",
            "admission.global_bytes_per_sec=100000",
            "admission.global_burst_bytes=3500",
        ],
    )?;
    host.create_topic("t").await?;
    let body = hundred_events(); // about 2.9 KB
    assert!(body.len() > 2000 && body.len() < 3500);
    let mut data = host.data()?;
    // Larger than the tenant's burst, and larger than the server's: 413 naming the setting.
    let big = body.repeat(2);
    for (tenant, body, setting) in [
        ("plain", &body, "admission.tenant_burst_bytes"),
        ("wide", &big, "admission.global_burst_bytes"),
    ] {
        let resp = post_as(&mut data, tenant, body).await?;
        ensure_status(&resp, 413)?;
        assert_eq!(resp.json()?["error"], "larger_than_burst");
        let detail = resp.json()?["detail"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(detail.contains(setting), "{detail}");
        assert_eq!(
            resp.header("retry-after"),
            None,
            "{tenant}: waiting cannot help"
        );
    }
    // What fits is served.
    ensure_status(&post_as(&mut data, "wide", &body).await?, 202)?;
    Ok(())
}

#[tokio::test]
async fn a_tenant_name_over_128_bytes_is_refused_with_400() -> TestResult {
    let host = TestHost::start()?;
    host.create_topic("t").await?;
    let mut data = host.data()?;
    let longest = "t".repeat(128);
    ensure_status(&post_as(&mut data, &longest, "{\"value\":1}").await?, 202)?;
    let resp = post_as(&mut data, &format!("{longest}x"), "{\"value\":1}").await?;
    ensure_status(&resp, 400)?;
    let v = resp.json()?;
    assert_eq!(v["error"], "invalid_header");
    assert!(
        v["detail"]
            .as_str()
            .is_some_and(|d| d.contains("Procd-Tenant")),
        "{v}"
    );
    Ok(())
}

#[tokio::test]
async fn priorities_are_read_and_a_bad_one_is_refused() -> TestResult {
    let host = TestHost::start()?;
    host.create_topic("t").await?;
    let mut data = host.data()?;
    for (priority, status) in [
        ("critical", 202),
        ("low", 202),
        ("Normal", 202),
        ("urgent", 400),
    ] {
        let resp = data
            .request(
                hyper::Method::POST,
                "/v1/topics/t/events",
                &[
                    ("content-type", "application/x-ndjson"),
                    ("procd-priority", priority),
                ],
                b"{\"value\":1}".to_vec(),
            )
            .await?;
        ensure_status(&resp, status)?;
    }
    let total: u64 = end_offsets(&host, "t").await?.iter().sum();
    assert_eq!(total, 3);
    Ok(())
}

#[tokio::test]
async fn heads_over_the_header_limits_get_431() -> TestResult {
    let host = TestHost::start_with(
        PARTITIONS,
        2,
        &["ingest.max_headers=20", "ingest.max_header_bytes=2048"],
    )?;
    host.create_topic("t").await?;
    let addr = host.url.trim_start_matches("http://").to_string();
    let request = |headers: usize, filler: usize| {
        let mut head = String::from("GET /v1/topics/t/partitions/0/events HTTP/1.1\r\nHost: x\r\n");
        for i in 0..headers {
            head.push_str(&format!("X-Filler-{i}: {i}\r\n"));
        }
        head.push_str(&format!("X-Big: {}\r\n", "b".repeat(filler)));
        head.push_str("Connection: close\r\n\r\n");
        let addr = addr.clone();
        tokio::task::spawn_blocking(move || raw_exchange(&addr, head.as_bytes(), false))
    };
    // Over the limits: a JSON 431 that says which limit.
    let (many, _) = request(25, 1).await??;
    assert!(many.starts_with("HTTP/1.1 431"), "{many}");
    assert!(
        many.contains("\"error\":\"headers_too_large\"") && many.contains("ingest.max_headers"),
        "{many}"
    );
    let (big, _) = request(1, 3000).await??;
    assert!(big.starts_with("HTTP/1.1 431"), "{big}");
    assert!(big.contains("ingest.max_header_bytes"), "{big}");
    // Far over them, hyper refuses before the request is parsed: still a 431.
    let (huge, _) = request(100, 1).await??;
    assert!(huge.starts_with("HTTP/1.1 431"), "{huge}");
    // Within them: served.
    let (few, _) = request(5, 1000).await??;
    assert!(few.starts_with("HTTP/1.1 200"), "{few}");
    Ok(())
}

#[tokio::test]
async fn a_paused_body_and_an_idle_keep_alive_connection_are_cut_off() -> TestResult {
    let host = TestHost::start_with(
        PARTITIONS,
        2,
        &[
            "ingest.header_read_timeout_ms=500",
            "ingest.body_timeout_ms=20000",
            "ingest.body_idle_timeout_ms=300",
        ],
    )?;
    host.create_topic("t").await?;
    let addr = host.url.trim_start_matches("http://").to_string();
    let line = "{\"key\":\"k\",\"value\":1}\n";
    let head = |length: usize, close: bool| {
        format!(
            "POST /v1/topics/t/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-ndjson\r\n\
             {}Content-Length: {length}\r\n\r\n",
            if close { "Connection: close\r\n" } else { "" }
        )
    };
    // A body that stops half-way: 408 at the idle timeout, long before the total one.
    let request = format!("{}{line}", head(line.len() * 2, true));
    let (answer, took) = tokio::task::spawn_blocking({
        let addr = addr.clone();
        move || raw_exchange(&addr, request.as_bytes(), false)
    })
    .await??;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("ingest.body_idle_timeout_ms"), "{answer}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    // A keep-alive connection that sends nothing after its answer is closed at the header timeout.
    let request = format!("{}{line}", head(line.len(), false));
    let (answer, took) = tokio::task::spawn_blocking({
        let addr = addr.clone();
        move || raw_exchange(&addr, request.as_bytes(), false)
    })
    .await??;
    assert!(answer.starts_with("HTTP/1.1 202"), "{answer}");
    assert!(
        took < Duration::from_secs(5),
        "the idle connection was closed after {took:?}"
    );
    let total: u64 = end_offsets(&host, "t").await?.iter().sum();
    assert_eq!(total, 1, "only the complete request appended");
    Ok(())
}

/// Writes `bytes` on a fresh connection to `addr`, optionally half-closes, and reads what comes back
/// (until the server closes or 10 s pass).
fn raw_exchange(addr: &str, bytes: &[u8], half_close: bool) -> TestResult<(String, Duration)> {
    use std::io::{Read, Write};
    let started = Instant::now();
    let mut stream = std::net::TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(bytes)?;
    if half_close {
        stream.shutdown(std::net::Shutdown::Write)?;
    }
    let mut answer = Vec::new();
    // A reset after the answer is fine: what matters is what arrived before it.
    let _ = stream.read_to_end(&mut answer);
    Ok((
        String::from_utf8_lossy(&answer).into_owned(),
        started.elapsed(),
    ))
}

#[tokio::test]
async fn a_client_that_stops_reading_its_answers_loses_its_connection() -> TestResult {
    // One connection slot: while a client holds it, every other connection waits in the backlog.
    let host = TestHost::start_with(
        1,
        1,
        &[
            "ingest.max_connections=1",
            "ingest.body_idle_timeout_ms=1000",
        ],
    )?;
    host.create_topic("t").await?;
    let mut data = host.data()?;
    let value = "x".repeat(4000);
    for _ in 0..2 {
        let body: String = (0..500)
            .map(|i| format!("{{\"key\":\"k{i}\",\"value\":\"{value}\"}}\n"))
            .collect();
        ensure_status(&data.post_ndjson("/v1/topics/t/events", body).await?, 202)?;
    }
    drop(data);

    // Asks for ~4 MB answers, many times over, and reads none of them.
    let addr: std::net::SocketAddr = host.url.trim_start_matches("http://").parse()?;
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_recv_buffer_size(4096)?;
    let mut stalled = socket.connect(addr).await?;
    let get = "GET /v1/topics/t/partitions/0/events?limit=10000 HTTP/1.1\r\nHost: x\r\n\r\n";
    tokio::io::AsyncWriteExt::write_all(&mut stalled, get.repeat(8).as_bytes()).await?;

    // Another client is served once the server gives up on the stalled one's answers.
    let mut data = host.data()?;
    let served = tokio::time::timeout(
        Duration::from_secs(20),
        data.get("/v1/topics/t/partitions/0/events?limit=1"),
    )
    .await;
    let resp: Response = match served {
        Ok(resp) => resp?,
        Err(_) => return Err("a client that reads nothing kept the only connection slot".into()),
    };
    ensure_status(&resp, 200)?;
    drop(stalled);
    Ok(())
}

#[tokio::test]
async fn slow_or_lying_requests_are_cut_off_and_append_nothing() -> TestResult {
    let host = TestHost::start_with(
        PARTITIONS,
        2,
        &[
            "ingest.header_read_timeout_ms=500",
            "ingest.body_timeout_ms=500",
        ],
    )?;
    host.create_topic("t").await?;
    let addr = host.url.trim_start_matches("http://").to_string();
    let head = |length: usize| {
        format!(
            "POST /v1/topics/t/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-ndjson\r\n\
             Connection: close\r\nContent-Length: {length}\r\n\r\n"
        )
    };
    let line = "{\"key\":\"k\",\"value\":1}\n";

    // Slow headers (slowloris): the head never ends; the connection is closed at the timeout.
    let (answer, took) = tokio::task::spawn_blocking({
        let addr = addr.clone();
        move || {
            raw_exchange(
                &addr,
                b"POST /v1/topics/t/events HTTP/1.1\r\nHost: x\r\n",
                false,
            )
        }
    })
    .await??;
    assert!(
        took < Duration::from_secs(5),
        "closed after {took:?}: {answer:?}"
    );
    assert!(!answer.contains(" 202 "), "{answer}");

    // Slow body: the head promises 1000 bytes, 22 arrive, then nothing: 408 at the body timeout.
    let request = format!("{}{line}", head(1000));
    let (answer, took) = tokio::task::spawn_blocking({
        let addr = addr.clone();
        move || raw_exchange(&addr, request.as_bytes(), false)
    })
    .await??;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(took < Duration::from_secs(5), "{took:?}");

    // A body shorter than its Content-Length (the client gives up): an error, never a partial append.
    let request = format!("{}{line}", head(1000));
    let (answer, _) = tokio::task::spawn_blocking({
        let addr = addr.clone();
        move || raw_exchange(&addr, request.as_bytes(), true)
    })
    .await??;
    assert!(!answer.contains(" 202 "), "{answer}");

    let total: u64 = end_offsets(&host, "t").await?.iter().sum();
    assert_eq!(total, 0, "nothing of any of them was appended");
    // And the server still serves a well-formed request.
    let request = format!("{}{line}", head(line.len()));
    let (answer, _) =
        tokio::task::spawn_blocking(move || raw_exchange(&addr, request.as_bytes(), false))
            .await??;
    assert!(answer.starts_with("HTTP/1.1 202"), "{answer}");
    Ok(())
}
