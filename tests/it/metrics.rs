//! `GET /metrics` against a real server: the exposition parses line by line, and the values are the
//! ones the test caused (events sent per partition, offsets after catch-up, refusals, routes).
//!
//! [`scrape`] and [`Metrics`] are shared with other tests that check a signal where they cause it
//! (the lag watermark's per-event refusals in `hostile`).

use serde_json::json;
use std::collections::{BTreeMap, HashMap};

use crate::handlers::{PARTITIONS, deploy_ok, post_all, wait_processed};
use crate::harness::guests::example;
use crate::harness::{TestHost, TestResult, ensure_status};

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// One sample: metric name, labels, value.
#[derive(Debug, Clone)]
pub(crate) struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed scrape.
#[derive(Debug)]
pub(crate) struct Metrics {
    pub samples: Vec<Sample>,
    /// `# TYPE` of each family.
    pub types: HashMap<String, String>,
}

impl Metrics {
    /// Every sample of `name` whose labels include `labels`.
    pub fn all(&self, name: &str, labels: &[(&str, &str)]) -> Vec<&Sample> {
        self.samples
            .iter()
            .filter(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect()
    }

    /// The value of the one sample of `name` with `labels` (None if there is none).
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let found = self.all(name, labels);
        assert!(found.len() <= 1, "{name} {labels:?} matches {found:?}");
        found.first().map(|s| s.value)
    }

    /// The sum over every sample of `name` with `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.all(name, labels).iter().map(|s| s.value).sum()
    }
}

/// Scrapes `/metrics` as Prometheus does (asking for OpenMetrics) and parses it strictly.
pub(crate) async fn scrape(host: &TestHost) -> TestResult<Metrics> {
    let resp = host
        .admin()?
        .request(
            hyper::Method::GET,
            "/metrics",
            &[(
                "accept",
                "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.2",
            )],
            Vec::new(),
        )
        .await?;
    ensure_status(&resp, 200)?;
    assert_eq!(resp.header("content-type"), Some(OPENMETRICS));
    let text = std::str::from_utf8(&resp.body)?;
    assert!(text.ends_with("# EOF\n"), "OpenMetrics ends with # EOF");
    parse(text.trim_end_matches("# EOF\n"))
}

/// Parses an exposition: `# HELP`/`# TYPE`/`# UNIT` lines, and samples `name{k="v",...} value` (or
/// `name value`) whose name belongs to the family declared last.
fn parse(text: &str) -> TestResult<Metrics> {
    let mut samples = Vec::new();
    let mut types = HashMap::new();
    let mut family = String::new();
    let valid_name = |n: &str| {
        !n.is_empty()
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
            && !n.starts_with(|c: char| c.is_ascii_digit())
    };
    for line in text.lines() {
        if let Some(meta) = line.strip_prefix("# ") {
            let mut words = meta.splitn(3, ' ');
            let (kind, name, rest) = (words.next(), words.next(), words.next());
            let (Some(kind), Some(name)) = (kind, name) else {
                return Err(format!("bad comment line {line:?}").into());
            };
            if !["HELP", "TYPE", "UNIT"].contains(&kind) || !valid_name(name) {
                return Err(format!("bad comment line {line:?}").into());
            }
            if kind == "TYPE" {
                let rest = rest.ok_or(format!("no type in {line:?}"))?;
                types.insert(name.to_string(), rest.to_string());
                family = name.to_string();
            }
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .ok_or(format!("no value in {line:?}"))?;
        let value: f64 = value
            .parse()
            .map_err(|_| format!("bad value in {line:?}"))?;
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => (
                name,
                rest.strip_suffix('}')
                    .ok_or(format!("unclosed labels in {line:?}"))?,
            ),
            None => (series, ""),
        };
        if !valid_name(name) || !name.starts_with(&family) || family.is_empty() {
            return Err(format!("sample {line:?} outside its family {family:?}").into());
        }
        let mut parsed = BTreeMap::new();
        // Label values here never hold `,` or `"` (route templates, names, numbers).
        for pair in labels.split(',').filter(|p| !p.is_empty()) {
            let (k, v) = pair
                .split_once('=')
                .ok_or(format!("bad label in {line:?}"))?;
            let v = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .ok_or(format!("unquoted label value in {line:?}"))?;
            if !valid_name(k) || parsed.insert(k.to_string(), v.to_string()).is_some() {
                return Err(format!("bad or repeated label {k:?} in {line:?}").into());
            }
        }
        samples.push(Sample {
            name: name.to_string(),
            labels: parsed,
            value,
        });
    }
    Ok(Metrics { samples, types })
}

/// Every histogram's buckets are cumulative and its `+Inf` bucket equals its count.
fn check_histograms(m: &Metrics) {
    for (family, kind) in &m.types {
        if kind != "histogram" {
            continue;
        }
        // (labels without `le`) -> [(le, cumulative count)]
        type Buckets = Vec<(f64, f64)>;
        let mut series: BTreeMap<Vec<(String, String)>, Buckets> = BTreeMap::new();
        for s in m.all(&format!("{family}_bucket"), &[]) {
            let le: f64 = s
                .labels
                .get("le")
                .and_then(|v| v.parse().ok())
                .unwrap_or(f64::NAN);
            let key = s
                .labels
                .iter()
                .filter(|(k, _)| *k != "le")
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            series.entry(key).or_default().push((le, s.value));
        }
        for (labels, mut buckets) in series {
            buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
            assert!(
                buckets.windows(2).all(|w| w[0].1 <= w[1].1),
                "{family} {labels:?}: buckets are cumulative: {buckets:?}"
            );
            let refs: Vec<(&str, &str)> = labels
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            let count = m.get(&format!("{family}_count"), &refs);
            assert_eq!(
                buckets.last().map(|b| (b.0, b.1)),
                count.map(|c| (f64::INFINITY, c)),
                "{family} {labels:?}: +Inf bucket = count"
            );
        }
    }
}

#[tokio::test]
async fn golden_signals_are_scraped_with_the_values_the_test_caused() -> TestResult {
    let host = TestHost::start_with(
        PARTITIONS,
        2,
        &[
            "admission.tenant_bytes_per_sec=1000",
            "admission.tenant_burst_bytes=4000",
        ],
    )?;
    host.create_topics(&["in", "out", "hot"]).await?;
    let events: Vec<_> = (0..40)
        .map(|i| (Some(format!("k{i}")), json!({ "n": i })))
        .collect();
    let placed = post_all(&host, "in", &events).await?;
    let mut per_partition = [0u64; PARTITIONS as usize];
    for p in &placed {
        per_partition[p.partition as usize] += 1;
    }
    deploy_ok(
        &host,
        "pass",
        example("passthrough")?,
        "in",
        &["out"],
        &["from=earliest"],
        1,
    )
    .await?;
    wait_processed(&host, "pass", "in").await?;

    // Tenant `hot` spends most of its 4000-byte burst (to a topic of its own), then two requests the
    // bucket cannot cover (it refills 1000 bytes/s) are refused whole, before their bodies are read.
    let big: String = (0..120)
        .map(|i| format!("{{\"key\":\"k{i}\",\"value\":{i}}}\n"))
        .collect();
    assert!((2500..4000).contains(&big.len()), "{}", big.len());
    let mut data = host.data()?;
    for expected in [202, 429, 429] {
        let resp = data
            .request(
                hyper::Method::POST,
                "/v1/topics/hot/events",
                &[
                    ("content-type", "application/x-ndjson"),
                    ("procd-tenant", "hot"),
                ],
                big.clone().into_bytes(),
            )
            .await?;
        ensure_status(&resp, expected)?;
    }

    let m = scrape(&host).await?;
    check_histograms(&m);

    // Per topic partition: what ingest appended, and the durable end.
    for (p, &sent) in per_partition.iter().enumerate() {
        let p = p.to_string();
        let labels = [("topic", "in"), ("partition", p.as_str())];
        assert_eq!(
            m.get("procd_ingest_events_total", &labels),
            Some(sent as f64),
            "partition {p}"
        );
        assert_eq!(
            m.get("procd_topic_end_offset", &labels),
            Some(sent as f64),
            "partition {p}"
        );
        let bytes = m.get("procd_ingest_bytes_total", &labels).unwrap_or(-1.0);
        assert!(
            sent == 0 || bytes > sent as f64 * 10.0,
            "partition {p}: {bytes} bytes"
        );
        let handler = [("handler", "pass"), ("partition", p.as_str())];
        assert_eq!(
            m.get("procd_handler_committed_offset", &handler),
            Some(sent as f64)
        );
        assert_eq!(m.get("procd_handler_lag_events", &handler), Some(0.0));
        assert_eq!(m.get("procd_handler_lag_seconds", &handler), Some(0.0));
        assert_eq!(m.get("procd_handler_breaker_state", &handler), Some(0.0));
        assert_eq!(
            m.get("procd_handler_dead_letters_total", &handler),
            Some(0.0)
        );
        assert_eq!(m.sum("procd_handler_errors_total", &handler), 0.0);
        assert_eq!(
            m.all("procd_handler_status", &handler).len(),
            1,
            "one status per task"
        );
    }
    assert_eq!(m.sum("procd_ingest_events_total", &[("topic", "in")]), 40.0);
    // Handler outputs are appended to `out` but are not ingest.
    assert_eq!(m.sum("procd_ingest_events_total", &[("topic", "out")]), 0.0);
    assert_eq!(m.sum("procd_topic_end_offset", &[("topic", "out")]), 40.0);

    // Per handler: every event processed once, its latency recorded once, batches timed.
    let pass = [("handler", "pass")];
    assert_eq!(m.sum("procd_handler_events_processed_total", &pass), 40.0);
    assert_eq!(
        m.sum("procd_handler_event_latency_seconds_count", &pass),
        40.0
    );
    assert!(m.sum("procd_handler_batch_duration_seconds_count", &pass) > 0.0);
    assert!(m.sum("procd_handler_batch_events_sum", &pass) >= 40.0);

    // Per cell: group commits (ingest and processing commits) and their fsyncs.
    for cell in ["0", "1"] {
        let c = [("cell", cell)];
        assert!(
            m.get("procd_cell_group_commit_events_count", &c)
                .unwrap_or(0.0)
                > 0.0
        );
        assert!(m.get("procd_cell_fsync_seconds_count", &c).unwrap_or(0.0) > 0.0);
        assert_eq!(m.get("procd_cell_queue_capacity", &c), Some(1024.0));
        assert_eq!(m.get("procd_cell_healthy", &c), Some(1.0));
        let saturation = m
            .get("procd_cell_queue_saturation_ratio", &c)
            .unwrap_or(-1.0);
        assert!((0.0..=1.0).contains(&saturation));
    }

    // Refusals by reason and status.
    let quota = [("reason", "over_quota"), ("status", "429")];
    assert_eq!(
        m.get("procd_ingest_refused_requests_total", &quota),
        Some(2.0)
    );
    assert_eq!(m.sum("procd_ingest_refused_requests_total", &[]), 2.0);
    assert_eq!(m.sum("procd_ingest_refused_events_total", &[]), 0.0);

    // Request latency by route template on both listeners; raw paths never become labels.
    let append = [
        ("listener", "data"),
        ("method", "POST"),
        ("route", "/v1/topics/{topic}/events"),
    ];
    let status = |s: &'static str| [append[0], append[1], append[2], ("status", s)];
    assert_eq!(
        m.get("procd_http_request_duration_seconds_count", &status("202")),
        Some(2.0)
    );
    assert_eq!(
        m.get("procd_http_request_duration_seconds_count", &status("429")),
        Some(2.0)
    );
    let deploy = [
        ("listener", "admin"),
        ("route", "/v1/handlers/{name}"),
        ("method", "PUT"),
        ("status", "201"),
    ];
    assert_eq!(
        m.get("procd_http_request_duration_seconds_count", &deploy),
        Some(1.0)
    );
    let topics = [
        ("listener", "admin"),
        ("route", "/v1/topics"),
        ("status", "201"),
    ];
    assert_eq!(
        m.get("procd_http_request_duration_seconds_count", &topics),
        Some(3.0)
    );
    assert!(
        m.samples
            .iter()
            .filter_map(|s| s.labels.get("route"))
            .all(|r| r == "unmatched" || !r.contains("/in/") && !r.contains("/pass")),
        "routes are templates"
    );
    assert_eq!(
        m.types.get("procd_ingest_events").map(String::as_str),
        Some("counter")
    );
    Ok(())
}

#[tokio::test]
async fn without_an_openmetrics_accept_header_the_prometheus_text_format_is_served() -> TestResult {
    let host = TestHost::start_with(2, 1, &[])?;
    host.create_topic("t").await?;
    // Requests that match no route are recorded under one label, whatever their path.
    let mut data = host.data()?;
    for path in ["/nope", "/v1/topics/t/nope", "/x/y/z"] {
        ensure_status(&data.get(path).await?, 404)?;
    }
    let resp = host.admin()?.get("/metrics").await?;
    ensure_status(&resp, 200)?;
    assert_eq!(
        resp.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let text = std::str::from_utf8(&resp.body)?;
    assert!(!text.contains("# EOF"));
    let m = parse(text)?;
    check_histograms(&m);
    assert_eq!(
        m.types.get("procd_ingest_events_total").map(String::as_str),
        Some("counter")
    );
    let unmatched = [
        ("listener", "data"),
        ("route", "unmatched"),
        ("status", "404"),
    ];
    assert_eq!(
        m.get("procd_http_request_duration_seconds_count", &unmatched),
        Some(3.0)
    );
    let not_found = [("reason", "not_found"), ("status", "404")];
    assert_eq!(
        m.get("procd_ingest_refused_requests_total", &not_found),
        Some(3.0)
    );
    assert_eq!(m.sum("procd_topic_end_offset", &[("topic", "t")]), 0.0);
    assert_eq!(m.all("procd_topic_end_offset", &[("topic", "t")]).len(), 2);
    Ok(())
}
