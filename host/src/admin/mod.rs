//! The control plane (`admin_listen`, default `127.0.0.1:8081`): topics and health. It runs on its own
//! listener so admin traffic and data traffic cannot starve each other.

mod handlers;
mod topics;

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use serde_json::json;

use crate::http::{ApiError, HttpResponse, json, no_route};
use crate::server::AppState;

/// Routes a control-plane request.
pub async fn handle(state: Arc<AppState>, req: Request<Incoming>) -> HttpResponse {
    let path = req.uri().path().to_string();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let result = match (req.method(), segments.as_slice()) {
        (&Method::GET, ["healthz"]) => Ok(json(StatusCode::OK, &json!({"status": "ok"}))),
        (&Method::GET, ["readyz"]) => Ok(readyz(&state)),
        (&Method::POST, ["v1", "topics"]) => topics::create(&state, req).await,
        (&Method::GET, ["v1", "topics"]) => Ok(topics::list(&state)),
        (&Method::GET, ["v1", "topics", name]) => topics::show(&state, name),
        (&Method::DELETE, ["v1", "topics", name]) => {
            let name = name.to_string();
            topics::delete(&state, &name).await
        }
        (&Method::PUT, ["v1", "handlers", name]) => {
            let name = name.to_string();
            handlers::deploy(&state, &name, req).await
        }
        (&Method::GET, ["v1", "handlers"]) => Ok(handlers::list(&state)),
        (&Method::GET, ["v1", "handlers", name]) => handlers::show(&state, name),
        (&Method::DELETE, ["v1", "handlers", name]) => {
            let name = name.to_string();
            handlers::remove(&state, &name).await
        }
        (&Method::POST, ["v1", "handlers", name, "pause"]) => {
            let name = name.to_string();
            handlers::set_paused(&state, &name, true).await
        }
        (&Method::POST, ["v1", "handlers", name, "resume"]) => {
            let name = name.to_string();
            handlers::set_paused(&state, &name, false).await
        }
        (&Method::POST, ["v1", "handlers", name, "rollback"]) => {
            let name = name.to_string();
            handlers::rollback(&state, &name, req).await
        }
        (&Method::POST, ["v1", "handlers", name, "reset"]) => {
            let name = name.to_string();
            handlers::reset(&state, &name, req).await
        }
        (&Method::GET, ["v1", "handlers", name, "dlq"]) => {
            let name = name.to_string();
            handlers::dead_letters(&state, &name, req.uri().query()).await
        }
        (&Method::POST, ["v1", "handlers", name, "dlq", "replay"]) => {
            let name = name.to_string();
            handlers::replay_dead_letters(&state, &name, req.uri().query()).await
        }
        (&Method::DELETE, ["v1", "handlers", name, "dlq"]) => {
            let name = name.to_string();
            handlers::purge_dead_letters(&state, &name, req.uri().query()).await
        }
        (&Method::POST, ["v1", "debug", "cells", cell, "fail-writes"])
            if state.config.debug.fault_injection =>
        {
            inject_fault(&state, cell)
        }
        (method, _) => Err(no_route(method, &path)),
    };
    result.unwrap_or_else(ApiError::into_response)
}

/// Test hook: cell `k`'s storage fails from now on.
fn inject_fault(state: &AppState, cell: &str) -> Result<HttpResponse, ApiError> {
    let cell = cell
        .parse::<usize>()
        .ok()
        .and_then(|k| state.cells.get(k))
        .ok_or_else(|| {
            ApiError::not_found(
                "unknown_cell",
                format!("no cell {cell:?}; cells are 0..{}", state.cells.len()),
            )
        })?;
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

/// Ready when every cell is healthy; otherwise `503` naming the failed cells and why. A cell whose
/// processing stalled (the watchdog) is listed under `stalled` without making the server unready:
/// it still takes writes, and refusing them would not help its handlers.
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
        json(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"error": "cells_failed", "detail": format!("{} of {} cells failed", failed.len(), state.cells.len()), "failed": failed, "stalled": stalled}),
        )
    }
}
