//! `GET /metrics`: gathers a [`Snapshot`] from where each figure already lives and encodes it.
//!
//! Nothing is double-maintained for the scrape: end offsets and ingest counters come from each
//! cell's partition views, committed offsets, lag and task status from the tasks' published status
//! (the same live computation as `GET /v1/handlers/{name}`), queue depth from the cell's queue, and
//! histograms from the cells' and tasks' own metrics. Gathering reads storage (the log-append time
//! of the oldest unprocessed event), so it runs on the blocking pool, never on the reactor.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::CONTENT_TYPE;
use hyper::{Response, StatusCode};

use crate::http::{ApiError, HttpResponse};
use crate::metrics::encode::{CellRow, PartitionRow, TaskRow};
use crate::metrics::{Format, Snapshot};
use crate::server::AppState;

/// Serves one scrape in `format`.
pub(super) async fn scrape(
    state: &Arc<AppState>,
    format: Format,
) -> Result<HttpResponse, ApiError> {
    let state = state.clone();
    let body = tokio::task::spawn_blocking(move || gather(&state).render(format))
        .await
        .map_err(|e| ApiError::internal("gathering metrics failed", &e))?
        .map_err(|e| ApiError::internal("encoding metrics failed", &e))?;
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = StatusCode::OK;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(format.content_type()),
    );
    Ok(resp)
}

/// Reads every series (blocking: the lag in seconds reads one record per lagging task).
fn gather(state: &AppState) -> Snapshot {
    let mut snapshot = Snapshot::default();
    for cell in &state.cells {
        for (topic, view) in cell.partitions() {
            let (ingested_events, ingested_bytes) = view.ingested();
            snapshot.partitions.push(PartitionRow {
                topic: topic.to_string(),
                partition: view.partition,
                end_offset: view.end_offset(),
                ingested_events,
                ingested_bytes,
                refusing_writes: view.lagging().is_some(),
            });
        }
        let metrics = cell.metrics();
        snapshot.cells.push(CellRow {
            cell: cell.index(),
            queue_depth: cell.queue_depth() as u64,
            queue_capacity: cell.queue_capacity() as u64,
            queue_delay_seconds: cell.queue_delay().as_secs_f64(),
            healthy: cell.failure().is_none(),
            group_commit_events: metrics.group_commit_events.snapshot(),
            fsync_seconds: metrics.fsync_seconds.snapshot(),
        });
    }
    snapshot
        .partitions
        .sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
    for def in state.catalog.handlers().values() {
        for cell in &state.cells {
            for report in cell.task_reports(&def.name, &def.input) {
                let task = &report.task;
                let m = &task.metrics;
                snapshot.tasks.push(TaskRow {
                    handler: def.name.clone(),
                    partition: task.partition,
                    committed_offset: task.committed_offset,
                    lag_events: report.lag,
                    lag_seconds: report.lag_ms as f64 / 1000.0,
                    status: task.status,
                    events_processed: task.events_processed,
                    dead_letters: task.dead_letters,
                    breaker: m.breaker(),
                    errors: m.errors(),
                    batch_seconds: m.batch_seconds.snapshot(),
                    batch_events: m.batch_events.snapshot(),
                    latency_seconds: m.latency_seconds.snapshot(),
                });
            }
        }
    }
    snapshot
        .tasks
        .sort_by(|a, b| (&a.handler, a.partition).cmp(&(&b.handler, b.partition)));
    state.metrics.fill(&mut snapshot);
    snapshot
}
