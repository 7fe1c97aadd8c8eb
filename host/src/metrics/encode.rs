//! The exposition: a [`Snapshot`] of every series, read at scrape time, encoded by prometheus-client
//! as OpenMetrics text or the Prometheus text format (0.0.4), whichever the scraper accepts.
//!
//! The snapshot is plain data, so what is exposed and how it is encoded is tested without a server.
//! Names follow Prometheus conventions: a `procd_` prefix, the unit as a suffix (`_seconds`,
//! `_bytes`, `_ratio`), `_total` on counters (the encoder appends it).

use std::fmt::Write as _;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use super::{ErrorKind, HistogramSnapshot, HttpKey, RefusalKey};

/// The exposition format of a scrape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0 text (ends with `# EOF`).
    OpenMetrics,
    /// The Prometheus text format, version 0.0.4.
    Prometheus,
}

impl Format {
    /// OpenMetrics when the `Accept` header asks for it (as Prometheus does), the classic text
    /// format otherwise (curl, older scrapers).
    pub fn negotiate(accept: Option<&str>) -> Self {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => Self::OpenMetrics,
            _ => Self::Prometheus,
        }
    }

    /// The response's `Content-Type`.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Self::Prometheus => prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
        }
    }
}

/// One partition of one topic.
#[derive(Debug, Clone, Default)]
pub struct PartitionRow {
    /// Topic name.
    pub topic: String,
    /// Partition number.
    pub partition: u32,
    /// One past the last durable offset.
    pub end_offset: u64,
    /// Events ingest appended since the server started (duplicates excluded).
    pub ingested_events: u64,
    /// Their encoded record bytes.
    pub ingested_bytes: u64,
    /// Whether its writes are refused because its handlers lag past the high watermark.
    pub refusing_writes: bool,
}

/// One handler on one partition.
#[derive(Debug, Clone)]
pub struct TaskRow {
    /// Handler name.
    pub handler: String,
    /// Partition number.
    pub partition: u32,
    /// Next input offset to process.
    pub committed_offset: u64,
    /// Durable input events not yet processed.
    pub lag_events: u64,
    /// Age of the oldest unprocessed event (0 with none).
    pub lag_seconds: f64,
    /// `running`, `idle`, `paused`, `tripped`, `waiting` or `failed`.
    pub status: &'static str,
    /// Events processed (committed past) since the server started.
    pub events_processed: u64,
    /// Dead letters written since the server started.
    pub dead_letters: u64,
    /// See [`super::BreakerState`].
    pub breaker: u8,
    /// Failed calls by kind.
    pub errors: [(ErrorKind, u64); ErrorKind::ALL.len()],
    /// Handler call durations.
    pub batch_seconds: HistogramSnapshot,
    /// Events per call.
    pub batch_events: HistogramSnapshot,
    /// Event timestamp to durable commit.
    pub latency_seconds: HistogramSnapshot,
}

/// One cell.
#[derive(Debug, Clone)]
pub struct CellRow {
    /// Cell index.
    pub cell: u32,
    /// Requests waiting in its writer's queue.
    pub queue_depth: u64,
    /// The queue's bound.
    pub queue_capacity: u64,
    /// The queue's standing delay, in seconds.
    pub queue_delay_seconds: f64,
    /// False once it hit a storage fault.
    pub healthy: bool,
    /// Events per group commit.
    pub group_commit_events: HistogramSnapshot,
    /// Group commit write + fsync time.
    pub fsync_seconds: HistogramSnapshot,
}

/// Every series of one scrape.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Per topic partition.
    pub partitions: Vec<PartitionRow>,
    /// Per handler and partition.
    pub tasks: Vec<TaskRow>,
    /// Per cell.
    pub cells: Vec<CellRow>,
    /// HTTP request latency per (listener, route, status).
    pub http: Vec<(HttpKey, HistogramSnapshot)>,
    /// Data-plane requests refused whole, per (reason, status).
    pub refused_requests: Vec<(RefusalKey, u64)>,
    /// Events refused within appends, per (reason, status).
    pub refused_events: Vec<(RefusalKey, u64)>,
}

impl Snapshot {
    /// Encodes every series in `format`.
    pub fn render(self, format: Format) -> Result<String, std::fmt::Error> {
        let mut registry = Registry::with_prefix("procd");
        registry.register_collector(Box::new(self));
        let mut out = String::new();
        match format {
            Format::OpenMetrics => prometheus_client::encoding::text::encode(&mut out, &registry)?,
            Format::Prometheus => {
                prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)?
            }
        }
        Ok(out)
    }
}

/// Writes one family's descriptor and hands its encoder to `samples`.
fn family(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<Unit>,
    kind: MetricType,
    samples: impl FnOnce(&mut MetricEncoder) -> std::fmt::Result,
) -> std::fmt::Result {
    let mut metric = enc.encode_descriptor(name, help, unit.as_ref(), kind)?;
    samples(&mut metric)
}

fn gauge(m: &mut MetricEncoder, labels: &impl EncodeLabelSet, v: f64) -> std::fmt::Result {
    m.encode_family(labels)?.encode_gauge(&v)
}

fn int_gauge(m: &mut MetricEncoder, labels: &impl EncodeLabelSet, v: u64) -> std::fmt::Result {
    m.encode_family(labels)?.encode_gauge(&v)
}

fn counter(m: &mut MetricEncoder, labels: &impl EncodeLabelSet, v: u64) -> std::fmt::Result {
    m.encode_family(labels)?
        .encode_counter::<NoLabelSet, _, u64>(&v, None)
}

fn histogram(
    m: &mut MetricEncoder,
    labels: &impl EncodeLabelSet,
    h: &HistogramSnapshot,
) -> std::fmt::Result {
    m.encode_family(labels)?
        .encode_histogram::<NoLabelSet>(h.sum, h.count, &h.buckets, None)
}

/// A number as a label value.
fn num(n: impl std::fmt::Display) -> String {
    let mut s = String::new();
    let _ = write!(s, "{n}");
    s
}

impl Collector for Snapshot {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        self.encode_partitions(&mut enc)?;
        self.encode_tasks(&mut enc)?;
        self.encode_cells(&mut enc)?;
        self.encode_server(&mut enc)
    }
}

impl Snapshot {
    /// Per topic partition: end offset, refusing writes, ingest events and bytes.
    fn encode_partitions(&self, e: &mut DescriptorEncoder) -> std::fmt::Result {
        use MetricType::{Counter, Gauge};
        let part_labels: Vec<String> = self.partitions.iter().map(|p| num(p.partition)).collect();
        let parts: Vec<([(&str, &str); 2], &PartitionRow)> = self
            .partitions
            .iter()
            .zip(&part_labels)
            .map(|(r, p)| ([("topic", r.topic.as_str()), ("partition", p.as_str())], r))
            .collect();
        family(
            e,
            "topic_end_offset",
            "One past the last durable offset of the partition.",
            None,
            Gauge,
            |m| {
                parts
                    .iter()
                    .try_for_each(|(l, r)| int_gauge(m, l, r.end_offset))
            },
        )?;
        family(
            e,
            "topic_refusing_writes",
            "1 while the partition refuses writes because its handlers lag past admission.lag_high_events.",
            None,
            Gauge,
            |m| {
                parts
                    .iter()
                    .try_for_each(|(l, r)| int_gauge(m, l, u64::from(r.refusing_writes)))
            },
        )?;
        family(
            e,
            "ingest_events",
            "Events appended to the partition by ingest since the server started (duplicates excluded).",
            None,
            Counter,
            |m| {
                parts
                    .iter()
                    .try_for_each(|(l, r)| counter(m, l, r.ingested_events))
            },
        )?;
        family(
            e,
            "ingest",
            "Encoded record bytes appended to the partition by ingest since the server started.",
            Some(Unit::Bytes),
            Counter,
            |m| {
                parts
                    .iter()
                    .try_for_each(|(l, r)| counter(m, l, r.ingested_bytes))
            },
        )?;
        Ok(())
    }

    /// Per handler and partition: committed offset, lag, status, breaker state, events processed, dead
    /// letters, errors, batch duration and size, event latency.
    fn encode_tasks(&self, e: &mut DescriptorEncoder) -> std::fmt::Result {
        use MetricType::{Counter, Gauge, Histogram};
        let task_parts: Vec<String> = self.tasks.iter().map(|t| num(t.partition)).collect();
        let tasks: Vec<([(&str, &str); 2], &TaskRow)> = self
            .tasks
            .iter()
            .zip(&task_parts)
            .map(|(t, p)| {
                (
                    [("handler", t.handler.as_str()), ("partition", p.as_str())],
                    t,
                )
            })
            .collect();
        family(
            e,
            "handler_committed_offset",
            "Next input offset the handler processes on the partition.",
            None,
            Gauge,
            |m| {
                tasks
                    .iter()
                    .try_for_each(|(l, t)| int_gauge(m, l, t.committed_offset))
            },
        )?;
        family(
            e,
            "handler_lag_events",
            "Durable input events the handler has not processed yet (end offset minus committed offset).",
            None,
            Gauge,
            |m| {
                tasks
                    .iter()
                    .try_for_each(|(l, t)| int_gauge(m, l, t.lag_events))
            },
        )?;
        family(
            e,
            "handler_lag",
            "Age of the oldest unprocessed input event (now minus the log-append time of the event at the committed offset); 0 when caught up.",
            Some(Unit::Seconds),
            Gauge,
            |m| {
                tasks
                    .iter()
                    .try_for_each(|(l, t)| gauge(m, l, t.lag_seconds))
            },
        )?;
        family(
            e,
            "handler_status",
            "1 for the task's current status (running, idle, paused, tripped, waiting, failed).",
            None,
            Gauge,
            |m| {
                tasks.iter().try_for_each(|(l, t)| {
                    let labels = [l[0], l[1], ("status", t.status)];
                    int_gauge(m, &labels, 1)
                })
            },
        )?;
        family(
            e,
            "handler_breaker_state",
            "Circuit breaker: 0 closed, 1 half-open (one trial batch), 2 open (tripped).",
            None,
            Gauge,
            |m| {
                tasks
                    .iter()
                    .try_for_each(|(l, t)| int_gauge(m, l, u64::from(t.breaker)))
            },
        )?;
        family(
            e,
            "handler_events_processed",
            "Input events the handler settled on the partition since the server started (dead-lettered ones included).",
            None,
            Counter,
            |m| {
                tasks
                    .iter()
                    .try_for_each(|(l, t)| counter(m, l, t.events_processed))
            },
        )?;
        family(
            e,
            "handler_dead_letters",
            "Dead letters written since the server started.",
            None,
            Counter,
            |m| {
                tasks
                    .iter()
                    .try_for_each(|(l, t)| counter(m, l, t.dead_letters))
            },
        )?;
        family(
            e,
            "handler_errors",
            "Failed handler calls since the server started, by kind: event (the handler returned an error for one event), trap, deadline, memory, output (over the output limits or an undeclared topic).",
            None,
            Counter,
            |m| {
                tasks.iter().try_for_each(|(l, t)| {
                    t.errors.iter().try_for_each(|(kind, n)| {
                        counter(m, &[l[0], l[1], ("kind", kind.as_str())], *n)
                    })
                })
            },
        )?;
        family(
            e,
            "handler_batch_duration",
            "Duration of one handler call on a batch, failed calls included.",
            Some(Unit::Seconds),
            Histogram,
            |m| {
                tasks
                    .iter()
                    .try_for_each(|(l, t)| histogram(m, l, &t.batch_seconds))
            },
        )?;
        family(
            e,
            "handler_batch_events",
            "Events per handler call.",
            None,
            Histogram,
            |m| {
                tasks
                    .iter()
                    .try_for_each(|(l, t)| histogram(m, l, &t.batch_events))
            },
        )?;
        family(
            e,
            "handler_event_latency",
            "From an event's log-append time to the durable commit that settled it (its outputs, state and offset, or its dead letter); millisecond resolution.",
            Some(Unit::Seconds),
            Histogram,
            |m| {
                tasks
                    .iter()
                    .try_for_each(|(l, t)| histogram(m, l, &t.latency_seconds))
            },
        )?;
        Ok(())
    }

    /// Per cell: queue depth, capacity, saturation and delay, health, group-commit size, fsync latency.
    fn encode_cells(&self, e: &mut DescriptorEncoder) -> std::fmt::Result {
        use MetricType::{Gauge, Histogram};
        let cell_names: Vec<String> = self.cells.iter().map(|c| num(c.cell)).collect();
        let cells: Vec<([(&str, &str); 1], &CellRow)> = self
            .cells
            .iter()
            .zip(&cell_names)
            .map(|(c, k)| ([("cell", k.as_str())], c))
            .collect();
        family(
            e,
            "cell_queue_depth",
            "Requests (appends and processing commits) waiting in the cell writer's queue.",
            None,
            Gauge,
            |m| {
                cells
                    .iter()
                    .try_for_each(|(l, c)| int_gauge(m, l, c.queue_depth))
            },
        )?;
        family(
            e,
            "cell_queue_capacity",
            "Bound of the cell writer's queue (cell.queue_len).",
            None,
            Gauge,
            |m| {
                cells
                    .iter()
                    .try_for_each(|(l, c)| int_gauge(m, l, c.queue_capacity))
            },
        )?;
        family(
            e,
            "cell_queue_saturation",
            "Queue depth over capacity: low-priority appends are shed from 0.5, normal ones from 0.8.",
            Some(Unit::Other("ratio".into())),
            Gauge,
            |m| {
                cells.iter().try_for_each(|(l, c)| {
                    gauge(m, l, c.queue_depth as f64 / c.queue_capacity.max(1) as f64)
                })
            },
        )?;
        family(
            e,
            "cell_queue_delay",
            "How long appends wait in the cell writer's queue: the least wait over the writer's last \
             100 ms (a standing queue, not a burst); normal appends are shed past \
             cell.queue_delay_target_ms, low ones past half of it.",
            Some(Unit::Seconds),
            Gauge,
            |m| {
                cells
                    .iter()
                    .try_for_each(|(l, c)| gauge(m, l, c.queue_delay_seconds))
            },
        )?;
        family(
            e,
            "cell_healthy",
            "1 while the cell acknowledges writes; 0 after a storage fault (until restart).",
            None,
            Gauge,
            |m| {
                cells
                    .iter()
                    .try_for_each(|(l, c)| int_gauge(m, l, u64::from(c.healthy)))
            },
        )?;
        family(
            e,
            "cell_group_commit_events",
            "Events per group commit, i.e. per fsync (appends plus processing commits' outputs, at least 1 per commit).",
            None,
            Histogram,
            |m| {
                cells
                    .iter()
                    .try_for_each(|(l, c)| histogram(m, l, &c.group_commit_events))
            },
        )?;
        family(
            e,
            "cell_fsync",
            "Time of a group commit's durable write (journal write and fsync).",
            Some(Unit::Seconds),
            Histogram,
            |m| {
                cells
                    .iter()
                    .try_for_each(|(l, c)| histogram(m, l, &c.fsync_seconds))
            },
        )?;
        Ok(())
    }

    /// Server-wide: HTTP requests and refusals.
    fn encode_server(&self, e: &mut DescriptorEncoder) -> std::fmt::Result {
        use MetricType::{Counter, Histogram};
        family(
            e,
            "http_request_duration",
            "HTTP request latency by listener, method, route template and status.",
            Some(Unit::Seconds),
            Histogram,
            |m| {
                self.http
                    .iter()
                    .try_for_each(|((listener, route, status), h)| {
                        let status = num(status);
                        let labels = [
                            ("listener", listener.as_str()),
                            ("method", route.method),
                            ("route", route.template),
                            ("status", status.as_str()),
                        ];
                        histogram(m, &labels, h)
                    })
            },
        )?;
        family(
            e,
            "ingest_refused_requests",
            "Data-plane requests refused whole, by reason (the error code) and status.",
            None,
            Counter,
            |m| {
                self.refused_requests
                    .iter()
                    .try_for_each(|((reason, status), n)| {
                        let status = num(status);
                        counter(m, &[("reason", *reason), ("status", status.as_str())], *n)
                    })
            },
        )?;
        family(
            e,
            "ingest_refused_events",
            "Events refused within an append (per-event outcomes: partition_lagging, shed_low, shed_normal, queue_full, cell_unavailable, ...), by reason and the status they are refused with.",
            None,
            Counter,
            |m| {
                self.refused_events
                    .iter()
                    .try_for_each(|((reason, status), n)| {
                        let status = num(status);
                        counter(m, &[("reason", *reason), ("status", status.as_str())], *n)
                    })
            },
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{Histogram as Hist, Listener, Route, histogram};

    fn snapshot() -> Snapshot {
        let h = Hist::new(histogram::FSYNC_SECONDS);
        h.observe(0.002);
        h.observe(0.2);
        let hs = h.snapshot();
        Snapshot {
            partitions: vec![PartitionRow {
                topic: "orders".into(),
                partition: 3,
                end_offset: 42,
                ingested_events: 40,
                ingested_bytes: 4000,
                refusing_writes: false,
            }],
            tasks: vec![TaskRow {
                handler: "enrich".into(),
                partition: 3,
                committed_offset: 40,
                lag_events: 2,
                lag_seconds: 1.5,
                status: "running",
                events_processed: 40,
                dead_letters: 1,
                breaker: 0,
                errors: ErrorKind::ALL.map(|k| (k, u64::from(k == ErrorKind::Event))),
                batch_seconds: hs.clone(),
                batch_events: hs.clone(),
                latency_seconds: hs.clone(),
            }],
            cells: vec![CellRow {
                cell: 1,
                queue_depth: 256,
                queue_capacity: 1024,
                queue_delay_seconds: 0.0,
                healthy: true,
                group_commit_events: hs.clone(),
                fsync_seconds: hs.clone(),
            }],
            http: vec![(
                (
                    Listener::Data,
                    Route::new("POST", "/v1/topics/{topic}/events"),
                    202,
                ),
                hs,
            )],
            refused_requests: vec![(("over_quota", 429), 2)],
            refused_events: vec![(("shed_low", 503), 7)],
        }
    }

    type Sample = (String, std::collections::BTreeMap<String, String>, f64);

    /// Parses every sample line (`name{k="v",...} value`), with `le` normalised to a number so
    /// that both formats compare equal.
    fn samples(text: &str) -> Vec<Sample> {
        let mut out: Vec<Sample> = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| {
                let (series, value) = l
                    .rsplit_once(' ')
                    .unwrap_or_else(|| panic!("no value: {l}"));
                let value: f64 = value.parse().unwrap_or_else(|_| panic!("bad value: {l}"));
                let (name, labels) = match series.split_once('{') {
                    Some((name, rest)) => (
                        name,
                        rest.strip_suffix('}').unwrap_or_else(|| panic!("{l}")),
                    ),
                    None => (series, ""),
                };
                let labels = labels
                    .split(',')
                    .filter(|p| !p.is_empty())
                    .map(|p| {
                        let (k, v) = p
                            .split_once('=')
                            .unwrap_or_else(|| panic!("bad label: {l}"));
                        let v = v.trim_matches('"').to_string();
                        let v = match (k, v.parse::<f64>()) {
                            ("le", Ok(n)) => format!("{n}"),
                            _ => v,
                        };
                        (k.to_string(), v)
                    })
                    .collect();
                (name.to_string(), labels, value)
            })
            .collect();
        out.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        out
    }

    /// The value of the sample `name` whose labels include `labels`.
    fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        samples
            .iter()
            .find(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, _, v)| *v)
    }

    #[test]
    fn openmetrics_names_carry_units_and_total_and_end_with_eof() {
        let text = snapshot().render(Format::OpenMetrics).unwrap_or_default();
        assert!(text.ends_with("# EOF\n"), "{text}");
        let s = samples(&text);
        let orders = [("topic", "orders"), ("partition", "3")];
        let enrich = [("handler", "enrich"), ("partition", "3")];
        let cell = [("cell", "1")];
        assert_eq!(value(&s, "procd_topic_end_offset", &orders), Some(42.0));
        assert_eq!(value(&s, "procd_ingest_events_total", &orders), Some(40.0));
        assert_eq!(value(&s, "procd_ingest_bytes_total", &orders), Some(4000.0));
        assert_eq!(value(&s, "procd_handler_lag_seconds", &enrich), Some(1.5));
        let event = [enrich[0], enrich[1], ("kind", "event")];
        assert_eq!(value(&s, "procd_handler_errors_total", &event), Some(1.0));
        let running = [enrich[0], enrich[1], ("status", "running")];
        assert_eq!(value(&s, "procd_handler_status", &running), Some(1.0));
        assert_eq!(
            value(&s, "procd_cell_queue_saturation_ratio", &cell),
            Some(0.25)
        );
        assert_eq!(
            value(&s, "procd_cell_fsync_seconds_count", &cell),
            Some(2.0)
        );
        let le = |b: &'static str| [("cell", "1"), ("le", b)];
        assert_eq!(
            value(&s, "procd_cell_fsync_seconds_bucket", &le("0.0025")),
            Some(1.0),
            "buckets are cumulative"
        );
        assert_eq!(
            value(&s, "procd_cell_fsync_seconds_bucket", &le("inf")),
            Some(2.0)
        );
        let route = [
            ("listener", "data"),
            ("method", "POST"),
            ("route", "/v1/topics/{topic}/events"),
            ("status", "202"),
        ];
        assert_eq!(
            value(&s, "procd_http_request_duration_seconds_count", &route),
            Some(2.0)
        );
        let quota = [("reason", "over_quota"), ("status", "429")];
        assert_eq!(
            value(&s, "procd_ingest_refused_requests_total", &quota),
            Some(2.0)
        );
        assert!(
            text.contains("# TYPE procd_ingest_bytes counter\n# UNIT procd_ingest_bytes bytes\n")
        );
        assert!(text.contains("# TYPE procd_handler_event_latency_seconds histogram\n"));
    }

    #[test]
    fn the_prometheus_text_format_has_the_same_samples() {
        let open = samples(&snapshot().render(Format::OpenMetrics).unwrap_or_default());
        let text = snapshot().render(Format::Prometheus).unwrap_or_default();
        assert!(!text.contains("# EOF"));
        assert!(text.contains("# TYPE procd_ingest_events_total counter\n"));
        assert_eq!(samples(&text), open);
    }

    #[test]
    fn the_format_follows_the_accept_header() {
        let prometheus =
            "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.2";
        assert_eq!(Format::negotiate(Some(prometheus)), Format::OpenMetrics);
        assert_eq!(Format::negotiate(Some("*/*")), Format::Prometheus);
        assert_eq!(Format::negotiate(None), Format::Prometheus);
        assert!(
            Format::OpenMetrics
                .content_type()
                .starts_with("application/openmetrics-text")
        );
        assert!(
            Format::Prometheus
                .content_type()
                .starts_with("text/plain; version=0.0.4")
        );
    }
}
