//! `GET /v1/topics/{topic}/partitions/{p}/events?from=&limit=&wait_ms=`: NDJSON, one event per line.
//!
//! Only durable events are served (up to the end offset the cell writer published after its fsync).
//! With nothing at `from`, the request long-polls up to `wait_ms` and returns as soon as an event
//! arrives. `Procd-Next-Offset` tells where to continue; `Procd-End-Offset` is the durable end.
//!
//! Each line: `partition`, `offset`, `timestamp_ms`, `key` (string, or `key_base64` if not UTF-8),
//! `value` (the JSON value posted) or `value_base64` (raw bytes, standard base64), `headers`, and `id`
//! when the producer gave one.

use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, StatusCode};

use super::unknown_topic;
use crate::http::{ApiError, HttpResponse};
use crate::log::{PayloadRef, RecordRef};
use crate::server::AppState;

/// Default number of events per read.
const DEFAULT_LIMIT: usize = 100;

struct Query {
    from: u64,
    limit: usize,
    wait_ms: u64,
}

fn parse_query(query: Option<&str>, state: &AppState) -> Result<Query, ApiError> {
    let mut q = Query {
        from: 0,
        limit: DEFAULT_LIMIT,
        wait_ms: 0,
    };
    let pairs: Vec<(&str, &str)> = query
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
        .collect();
    crate::http::no_repeated_params(pairs.iter().map(|(name, _)| *name), &[])?;
    for (name, value) in pairs {
        let number = |max: u64| -> Result<u64, ApiError> {
            match value.parse::<u64>() {
                Ok(v) if v <= max => Ok(v),
                _ => Err(ApiError::bad_request(
                    "invalid_query",
                    format!("{name} must be a whole number in 0..={max}; got {value:?}"),
                )),
            }
        };
        match name {
            "from" => q.from = number(u64::MAX)?,
            "limit" => {
                let max = state.config.read.max_limit as u64;
                q.limit = match number(max)? {
                    0 => {
                        return Err(ApiError::bad_request(
                            "invalid_query",
                            format!("limit must be a whole number in 1..={max}; got 0"),
                        ));
                    }
                    n => n as usize,
                };
            }
            "wait_ms" => q.wait_ms = number(state.config.read.max_wait_ms)?,
            other => {
                return Err(ApiError::bad_request(
                    "invalid_query",
                    format!("unknown query parameter {other:?}; use from, limit, wait_ms"),
                ));
            }
        }
    }
    Ok(q)
}

pub(super) async fn handle(
    state: &AppState,
    topic: &str,
    partition: &str,
    query: Option<&str>,
) -> Result<HttpResponse, ApiError> {
    if state.catalog.get(topic).is_none() {
        return Err(unknown_topic(topic));
    }
    let partitions = state.shape.partitions;
    let partition: u32 = partition.parse().ok().filter(|p| *p < partitions).ok_or_else(|| {
        ApiError::not_found(
            "unknown_partition",
            format!("partition {partition:?} does not exist; topic {topic:?} has partitions 0..{partitions}"),
        )
    })?;
    let q = parse_query(query, state)?;
    let view = state
        .cell_for(partition)
        .partition(topic, partition)
        .ok_or_else(|| unknown_topic(topic))?;

    let mut end = view.end_offset();
    if q.from >= end && q.wait_ms > 0 {
        let mut rx = view.subscribe();
        let mut stopping = state.stopping.clone();
        let from = q.from;
        let arrived =
            tokio::time::timeout(Duration::from_millis(q.wait_ms), rx.wait_for(|e| *e > from));
        tokio::select! {
            waited = arrived => {
                if let Ok(Ok(e)) = waited {
                    end = *e;
                }
            }
            // Shutdown answers long-polls at once (empty) rather than waiting out their wait_ms.
            _ = stopping.wait_for(|stop| *stop) => {}
        }
    }
    let max_bytes = state.config.read.max_response_bytes;
    let log = view.log().clone();
    let (from, limit) = (q.from, q.limit);
    let events = tokio::task::spawn_blocking(move || log.read(from, end, limit, max_bytes))
        .await
        .map_err(|e| ApiError::internal("read task failed", &e))?
        .map_err(|e| ApiError::internal("read failed", &e))?;

    let mut body = Vec::with_capacity(events.iter().map(|(_, v)| v.len() + 96).sum());
    let mut next = q.from;
    for (offset, bytes) in &events {
        let record = RecordRef::decode(bytes)
            .map_err(|e| ApiError::internal("stored record is corrupt", &e))?;
        write_line(&mut body, partition, *offset, &record);
        next = offset + 1;
    }
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = StatusCode::OK;
    let headers = resp.headers_mut();
    headers.insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/x-ndjson"),
    );
    headers.insert("procd-next-offset", next.into());
    headers.insert("procd-end-offset", end.into());
    Ok(resp)
}

/// Appends one NDJSON line. The stored JSON value is embedded as is: it was validated at ingest.
fn write_line(out: &mut Vec<u8>, partition: u32, offset: u64, record: &RecordRef<'_>) {
    use std::io::Write as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    // Writing into a Vec cannot fail.
    let _ = write!(
        out,
        "{{\"partition\":{partition},\"offset\":{offset},\"timestamp_ms\":{},",
        record.timestamp_ms
    );
    match record.key.map(std::str::from_utf8) {
        None => out.extend_from_slice(b"\"key\":null,"),
        Some(Ok(key)) => {
            out.extend_from_slice(b"\"key\":");
            let _ = serde_json::to_writer(&mut *out, key);
            out.push(b',');
        }
        Some(Err(_)) => {
            let key = record.key.unwrap_or_default();
            let _ = write!(out, "\"key\":null,\"key_base64\":\"{}\",", b64.encode(key));
        }
    }
    match record.value {
        PayloadRef::Json(text) => {
            out.extend_from_slice(b"\"value\":");
            write_json_one_line(out, text);
        }
        PayloadRef::Bytes(bytes) => {
            let _ = write!(out, "\"value_base64\":\"{}\"", b64.encode(bytes));
        }
    }
    out.extend_from_slice(b",\"headers\":{");
    for (i, (name, value)) in record.headers.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        let _ = serde_json::to_writer(&mut *out, name);
        out.push(b':');
        let _ = serde_json::to_writer(&mut *out, value);
    }
    out.push(b'}');
    if let Some(id) = record.id {
        out.extend_from_slice(b",\"id\":");
        let _ = serde_json::to_writer(&mut *out, id);
    }
    out.extend_from_slice(b"}\n");
}

/// Writes valid JSON text on one line: whitespace outside strings is dropped only when the text spans
/// lines (pretty-printed values), so numbers and strings stay exactly as stored.
fn write_json_one_line(out: &mut Vec<u8>, text: &[u8]) {
    if !text.iter().any(|&b| b == b'\n' || b == b'\r') {
        out.extend_from_slice(text);
        return;
    }
    let (mut in_string, mut escaped) = (false, false);
    for &b in text {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
        } else if b == b'"' {
            in_string = true;
        } else if matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
            continue;
        }
        out.push(b);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pretty_values_are_written_on_one_line_unchanged() -> Result<(), serde_json::Error> {
        let text = "{\n  \"a b\": [1.50, \"x\\\" \\n y\"],\r\n  \"c\": {}\n}";
        let mut out = Vec::new();
        write_json_one_line(&mut out, text.as_bytes());
        assert!(!out.contains(&b'\n'));
        assert_eq!(
            String::from_utf8_lossy(&out),
            "{\"a b\":[1.50,\"x\\\" \\n y\"],\"c\":{}}"
        );
        let again: serde_json::Value = serde_json::from_slice(&out)?;
        assert_eq!(again, serde_json::from_str::<serde_json::Value>(text)?);
        Ok(())
    }

    #[test]
    fn lines_are_valid_json_with_exact_values() -> Result<(), serde_json::Error> {
        let mut out = Vec::new();
        let record = RecordRef {
            timestamp_ms: 5,
            key: Some(&[0xff, 0x00]),
            value: PayloadRef::Json(b"{\"a\": [1, 2.50]}"),
            headers: vec![("x\"y", "v")],
            id: Some("i"),
        };
        write_line(&mut out, 3, 9, &record);
        let v: serde_json::Value = serde_json::from_slice(&out)?;
        assert_eq!(v["offset"], 9);
        assert_eq!(v["key_base64"], "/wA=");
        assert_eq!(v["value"]["a"][1], 2.5);
        assert_eq!(v["headers"]["x\"y"], "v");
        let raw = RecordRef {
            value: PayloadRef::Bytes(&[1, 2, 3]),
            key: None,
            id: None,
            ..record
        };
        out.clear();
        write_line(&mut out, 0, 0, &raw);
        let v: serde_json::Value = serde_json::from_slice(&out)?;
        assert_eq!(v["value_base64"], "AQID");
        assert!(v["key"].is_null());
        Ok(())
    }
}
