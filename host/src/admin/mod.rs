//! The control plane (`admin_listen`, default `127.0.0.1:8081`): topics, handlers, health and
//! `/metrics`. It runs on its own listener so admin traffic and data traffic cannot starve each
//! other. Every request's latency is recorded by route template (never the raw path).

mod deploy;
mod handlers;
mod metrics;
mod topics;

use std::sync::Arc;
use std::time::Instant;

use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use serde_json::json;

use crate::http::{ApiError, HttpResponse, json, no_route};
use crate::metrics::{Listener, Route};
use crate::server::AppState;

/// Routes a control-plane request and records its latency by route template.
pub async fn handle(state: Arc<AppState>, req: Request<Incoming>) -> HttpResponse {
    let started = Instant::now();
    let path = req.uri().path().to_string();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let r = |method, template| Route::new(method, template);
    let (route, result) = if let Err(e) = crate::http::check_head(&req, &state.config.ingest) {
        (Route::UNMATCHED, Err(e))
    } else {
        match (req.method(), segments.as_slice()) {
            (&Method::GET, ["healthz"]) => (
                r("GET", "/healthz"),
                Ok(json(StatusCode::OK, &json!({"status": "ok"}))),
            ),
            (&Method::GET, ["readyz"]) => (r("GET", "/readyz"), Ok(readyz(&state))),
            (&Method::GET, ["metrics"]) => {
                let accept = req
                    .headers()
                    .get(hyper::header::ACCEPT)
                    .and_then(|v| v.to_str().ok());
                let format = crate::metrics::Format::negotiate(accept);
                (r("GET", "/metrics"), metrics::scrape(&state, format).await)
            }
            (&Method::POST, ["v1", "topics"]) => {
                (r("POST", "/v1/topics"), topics::create(&state, req).await)
            }
            (&Method::GET, ["v1", "topics"]) => (r("GET", "/v1/topics"), Ok(topics::list(&state))),
            (&Method::GET, ["v1", "topics", name]) => {
                (r("GET", "/v1/topics/{topic}"), topics::show(&state, name))
            }
            (&Method::DELETE, ["v1", "topics", name]) => {
                let name = name.to_string();
                let result = topics::delete(&state, &name).await;
                (r("DELETE", "/v1/topics/{topic}"), result)
            }
            (&Method::PUT, ["v1", "handlers", name]) => {
                let name = name.to_string();
                let result = deploy::deploy(&state, &name, req).await;
                (r("PUT", "/v1/handlers/{name}"), result)
            }
            (&Method::GET, ["v1", "handlers"]) => {
                (r("GET", "/v1/handlers"), Ok(handlers::list(&state)))
            }
            (&Method::GET, ["v1", "handlers", name]) => (
                r("GET", "/v1/handlers/{name}"),
                handlers::show(&state, name),
            ),
            (&Method::DELETE, ["v1", "handlers", name]) => {
                let name = name.to_string();
                let result = handlers::remove(&state, &name).await;
                (r("DELETE", "/v1/handlers/{name}"), result)
            }
            (&Method::POST, ["v1", "handlers", name, "pause"]) => {
                let name = name.to_string();
                let result = handlers::set_paused(&state, &name, true).await;
                (r("POST", "/v1/handlers/{name}/pause"), result)
            }
            (&Method::POST, ["v1", "handlers", name, "resume"]) => {
                let name = name.to_string();
                let result = handlers::set_paused(&state, &name, false).await;
                (r("POST", "/v1/handlers/{name}/resume"), result)
            }
            (&Method::POST, ["v1", "handlers", name, "rollback"]) => {
                let name = name.to_string();
                let result = handlers::rollback(&state, &name, req).await;
                (r("POST", "/v1/handlers/{name}/rollback"), result)
            }
            (&Method::POST, ["v1", "handlers", name, "reset"]) => {
                let name = name.to_string();
                let result = handlers::reset(&state, &name, req).await;
                (r("POST", "/v1/handlers/{name}/reset"), result)
            }
            (&Method::GET, ["v1", "handlers", name, "dlq"]) => {
                let name = name.to_string();
                let result = handlers::dead_letters(&state, &name, req.uri().query()).await;
                (r("GET", "/v1/handlers/{name}/dlq"), result)
            }
            (&Method::POST, ["v1", "handlers", name, "dlq", "replay"]) => {
                let name = name.to_string();
                let result = handlers::replay_dead_letters(&state, &name, req.uri().query()).await;
                (r("POST", "/v1/handlers/{name}/dlq/replay"), result)
            }
            (&Method::DELETE, ["v1", "handlers", name, "dlq"]) => {
                let name = name.to_string();
                let result = handlers::purge_dead_letters(&state, &name, req.uri().query()).await;
                (r("DELETE", "/v1/handlers/{name}/dlq"), result)
            }
            (&Method::POST, ["v1", "debug", "cells", cell, "fail-writes"])
                if state.config.debug.fault_injection =>
            {
                (
                    r("POST", "/v1/debug/cells/{cell}/fail-writes"),
                    inject_fault(&state, cell),
                )
            }
            (&Method::POST, ["v1", "debug", "cells", cell, "slow-writes"])
                if state.config.debug.fault_injection =>
            {
                (
                    r("POST", "/v1/debug/cells/{cell}/slow-writes"),
                    slow_writes(&state, cell, req.uri().query()),
                )
            }
            (method, _) => (Route::UNMATCHED, Err(no_route(method, &path))),
        }
    };
    let response = result.unwrap_or_else(ApiError::into_response);
    let status = response.status().as_u16();
    state
        .metrics
        .request(Listener::Admin, route, status, started.elapsed());
    response
}

/// The cell a debug route names.
fn debug_cell<'a>(state: &'a AppState, cell: &str) -> Result<&'a crate::cell::Cell, ApiError> {
    cell.parse::<usize>()
        .ok()
        .and_then(|k| state.cells.get(k))
        .ok_or_else(|| {
            ApiError::not_found(
                "unknown_cell",
                format!("no cell {cell:?}; cells are 0..{}", state.cells.len()),
            )
        })
}

/// Test hook: cell `k`'s writes take `ms` (query) longer from now on, as on a slow disk.
fn slow_writes(
    state: &AppState,
    cell: &str,
    query: Option<&str>,
) -> Result<HttpResponse, ApiError> {
    let cell = debug_cell(state, cell)?;
    let ms = query
        .unwrap_or_default()
        .split('&')
        .find_map(|kv| kv.strip_prefix("ms="))
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|&ms| ms <= 60_000)
        .ok_or_else(|| {
            ApiError::bad_request(
                "invalid_query",
                "give ms=N, 0 to 60000 milliseconds per write",
            )
        })?;
    tracing::warn!(
        cell = cell.index(),
        ms,
        "slowing writes down (debug.fault_injection)"
    );
    cell.inject_slow_writes(ms);
    Ok(json(
        StatusCode::OK,
        &json!({"cell": cell.index(), "slow_write_ms": ms}),
    ))
}

/// Test hook: cell `k`'s storage fails from now on.
fn inject_fault(state: &AppState, cell: &str) -> Result<HttpResponse, ApiError> {
    let cell = debug_cell(state, cell)?;
    tracing::warn!(
        cell = cell.index(),
        "injecting a write fault (debug.fault_injection)"
    );
    cell.inject_write_fault();
    Ok(json(
        StatusCode::OK,
        &json!({"cell": cell.index(), "fault": "writes fail"}),
    ))
}

/// How long an unready server tells its prober to wait: a failed cell stays failed until the server
/// restarts, so asking sooner only adds load; the data plane's `cell_unavailable` says the same 5 s.
const UNREADY_RETRY_AFTER_SECS: u64 = 5;

/// Ready when every cell is healthy; otherwise `503` naming the failed cells and why, with
/// `Retry-After`. A cell whose processing stalled (the watchdog) is listed under `stalled` without
/// making the server unready: it still takes writes, and refusing them would not help its handlers.
fn readyz(state: &AppState) -> HttpResponse {
    let stalled: Vec<_> = state
        .cells
        .iter()
        .flat_map(|c| {
            c.stalled_tasks().into_iter().map(|(handler, partition, reason)| {
                json!({"cell": c.index(), "handler": handler, "partition": partition, "reason": reason})
            })
        })
        .collect();
    let failed: Vec<_> = state
        .cells
        .iter()
        .filter_map(|c| {
            c.failure()
                .map(|reason| json!({"cell": c.index(), "reason": reason}))
        })
        .collect();
    if failed.is_empty() {
        json(
            StatusCode::OK,
            &json!({"status": "ready", "cells": state.cells.len(), "stalled": stalled}),
        )
    } else {
        let mut resp = json(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"error": "cells_failed", "detail": format!("{} of {} cells failed", failed.len(), state.cells.len()), "failed": failed, "stalled": stalled}),
        );
        resp.headers_mut()
            .insert(hyper::header::RETRY_AFTER, UNREADY_RETRY_AFTER_SECS.into());
        resp
    }
}
