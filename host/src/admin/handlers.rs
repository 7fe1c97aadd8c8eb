//! Handler administration: list, show, rollback, pause/resume, reset, remove, dead letters (deploying
//! is [`deploy`](super::deploy)), and the query and time helpers they share.

use std::collections::HashMap;

use hyper::body::Incoming;
use hyper::{Request, StatusCode};
use serde::Deserialize;
use serde_json::json;

use crate::catalog::{CatalogError, HandlerDef, Reset, ResetTo};
use crate::http::{ApiError, HttpResponse, json, read_body};
use crate::server::AppState;

/// Decodes `%XX` and `+` in a query component.
fn percent_decode(s: &str) -> Result<String, ApiError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok());
                let byte = hex
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| {
                        ApiError::bad_request(
                            "invalid_query",
                            format!("bad percent-escape in {s:?}"),
                        )
                    })?;
                out.push(byte);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out)
        .map_err(|_| ApiError::bad_request("invalid_query", format!("{s:?} is not UTF-8")))
}

/// Query parameters as decoded (name, value) pairs, in order.
pub(super) fn query_pairs(query: Option<&str>) -> Result<Vec<(String, String)>, ApiError> {
    let mut out = Vec::new();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        out.push((percent_decode(name)?, percent_decode(value)?));
    }
    Ok(out)
}

/// The dead event's `key` and `value` as the read API shows them, byte-exact: a key that is not UTF-8
/// as `key_base64`, a raw value as `value_base64` (standard base64), and a record that does not decode
/// as `record_base64`.
fn dead_event_fields(fields: &mut serde_json::Map<String, serde_json::Value>, stored: &[u8]) {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let Ok(record) = crate::log::Record::decode(stored) else {
        fields.insert("record_base64".into(), b64.encode(stored).into());
        return;
    };
    let key = match record.key.as_deref().map(std::str::from_utf8) {
        None => serde_json::Value::Null,
        Some(Ok(key)) => key.into(),
        Some(Err(_)) => {
            let raw = record.key.as_deref().unwrap_or_default();
            fields.insert("key_base64".into(), b64.encode(raw).into());
            serde_json::Value::Null
        }
    };
    fields.insert("key".into(), key);
    match &record.value {
        crate::log::Payload::Json(text) => {
            let value = serde_json::from_str(text).unwrap_or(serde_json::Value::Null);
            fields.insert("value".into(), value);
        }
        crate::log::Payload::Bytes(bytes) => {
            fields.insert("value_base64".into(), b64.encode(bytes).into());
        }
    }
}

/// Refuses a parameter given twice unless it is `repeatable`.
pub(super) fn no_repeats(pairs: &[(String, String)], repeatable: &[&str]) -> Result<(), ApiError> {
    crate::http::no_repeated_params(pairs.iter().map(|(name, _)| name.as_str()), repeatable)
}

pub(super) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub(super) fn now_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The durable end offset of every partition of `topic`, indexed by partition.
pub(super) fn end_offsets(state: &AppState, topic: &str) -> Vec<u64> {
    (0..state.shape.partitions)
        .map(|p| {
            state
                .cell_for(p)
                .partition(topic, p)
                .map_or(0, |v| v.end_offset())
        })
        .collect()
}

fn not_found(name: &str) -> ApiError {
    ApiError::not_found(
        "unknown_handler",
        format!("handler {name:?} does not exist; deploy it with `procd deploy`"),
    )
}

pub(super) fn storage(e: CatalogError) -> ApiError {
    match e {
        CatalogError::InvalidName(_) => ApiError::bad_request("invalid_handler", e.to_string()),
        CatalogError::HandlerNotFound(name) => not_found(&name),
        other => ApiError::internal("control database failed", &other),
    }
}

fn describe(state: &AppState, def: &HandlerDef) -> serde_json::Value {
    let mut partitions: Vec<crate::cell::TaskReport> = state
        .cells
        .iter()
        .flat_map(|cell| cell.task_reports(&def.name, &def.input))
        .collect();
    partitions.sort_by_key(|p| p.task.partition);
    let mut value = serde_json::to_value(def).unwrap_or_default();
    value["partitions"] = serde_json::to_value(&partitions).unwrap_or_default();
    value["lag"] = partitions.iter().map(|p| p.lag).sum::<u64>().into();
    value
}

pub(super) fn list(state: &AppState) -> HttpResponse {
    let mut defs: Vec<_> = state.catalog.handlers().values().cloned().collect();
    defs.sort_by(|a, b| a.name.cmp(&b.name));
    let all: Vec<_> = defs.iter().map(|d| describe(state, d)).collect();
    json(StatusCode::OK, &json!({ "handlers": all }))
}

pub(super) fn show(state: &AppState, name: &str) -> Result<HttpResponse, ApiError> {
    let def = state.catalog.handler(name).ok_or_else(|| not_found(name))?;
    Ok(json(StatusCode::OK, &describe(state, &def)))
}

async fn update(
    state: &AppState,
    name: &str,
    change: impl FnOnce(&mut HandlerDef) -> Result<(), ApiError>,
) -> Result<HttpResponse, ApiError> {
    let _guard = state.admin_lock.lock().await;
    let def = state.catalog.handler(name).ok_or_else(|| not_found(name))?;
    let mut def = HandlerDef::clone(&def);
    change(&mut def)?;
    state
        .catalog
        .put_handler(def.clone(), None)
        .map_err(storage)?;
    Ok(json(StatusCode::OK, &describe(state, &def)))
}

pub(super) async fn set_paused(
    state: &AppState,
    name: &str,
    paused: bool,
) -> Result<HttpResponse, ApiError> {
    update(state, name, |def| {
        def.paused = paused;
        Ok(())
    })
    .await
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RollbackBody {
    version: Option<u32>,
}

pub(super) async fn rollback(
    state: &AppState,
    name: &str,
    req: Request<Incoming>,
) -> Result<HttpResponse, ApiError> {
    let body = read_body(req, 64 * 1024, state.config.body_timeouts()).await?;
    let spec: RollbackBody = if body.is_empty() {
        RollbackBody::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::bad_request("invalid_body", format!("{e}; expected {{\"version\": N}}"))
        })?
    };
    update(state, name, |def| {
        let target = match spec.version {
            Some(v) => def.version(v).map(|v| v.version).ok_or_else(|| {
                let known: Vec<u32> = def.versions.iter().map(|v| v.version).collect();
                ApiError::not_found(
                    "unknown_version",
                    format!("handler {name:?} has no version {v}; versions: {known:?}"),
                )
            })?,
            None => def
                .versions
                .iter()
                .map(|v| v.version)
                .filter(|v| *v < def.active)
                .max()
                .ok_or_else(|| {
                    ApiError::bad_request(
                        "no_previous_version",
                        format!("handler {name:?} v{} has no earlier version", def.active),
                    )
                })?,
        };
        def.active = target;
        Ok(())
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResetBody {
    to: ResetTo,
    #[serde(default)]
    clear_state: bool,
}

pub(super) async fn reset(
    state: &AppState,
    name: &str,
    req: Request<Incoming>,
) -> Result<HttpResponse, ApiError> {
    let body = read_body(req, 64 * 1024, state.config.body_timeouts()).await?;
    let spec: ResetBody = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(
            "invalid_body",
            format!("{e}; expected {{\"to\": \"earliest\" | \"latest\" | {{\"offset\": N}} | {{\"timestamp\": MS}}, \"clear_state\": false}}"),
        )
    })?;
    update(state, name, |def| {
        let generation = def.reset.as_ref().map_or(0, |r| r.generation) + 1;
        // `latest` means the end now, not when each partition gets to it.
        let offsets = if spec.to == ResetTo::Latest {
            end_offsets(state, &def.input)
        } else {
            Vec::new()
        };
        def.reset = Some(Reset {
            generation,
            to: spec.to,
            clear_state: spec.clear_state,
            offsets,
        });
        Ok(())
    })
    .await
}

pub(super) async fn remove(state: &AppState, name: &str) -> Result<HttpResponse, ApiError> {
    let _guard = state.admin_lock.lock().await;
    state.catalog.remove_handler(name).map_err(storage)?;
    tracing::info!(handler = name, "handler removed");
    Ok(json(StatusCode::OK, &json!({ "removed": name })))
}

/// `DELETE /v1/handlers/{name}/dlq?partition=P&through=SEQ`: deletes dead letters (of every partition
/// unless one is named; up to and including sequence `through` if given), durably.
pub(super) async fn purge_dead_letters(
    state: &AppState,
    name: &str,
    query: Option<&str>,
) -> Result<HttpResponse, ApiError> {
    state.catalog.handler(name).ok_or_else(|| not_found(name))?;
    let params = number_params(query, &["partition", "through"])?;
    let (partition, through) = (partition_param(&params), params.get("through").copied());
    let mut purged = 0;
    for p in dlq_partitions(state, partition)? {
        purged += state
            .cell_for(p)
            .purge_dead_letters(name, p, through)
            .await
            .map_err(cell_unavailable)?;
    }
    tracing::info!(
        handler = name,
        ?partition,
        ?through,
        purged,
        "dead letters purged"
    );
    Ok(json(StatusCode::OK, &json!({ "purged": purged })))
}

/// `POST /v1/handlers/{name}/dlq/replay?partition=P&seq=SEQ`: runs dead letters (of every partition
/// unless one is named; only `seq` if given) again through the handler's current version. Those that
/// succeed commit their outputs and state and leave the log; those that fail again stay.
pub(super) async fn replay_dead_letters(
    state: &AppState,
    name: &str,
    query: Option<&str>,
) -> Result<HttpResponse, ApiError> {
    let def = state.catalog.handler(name).ok_or_else(|| not_found(name))?;
    if def.paused {
        // A paused handler processes nothing, dead letters included.
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "handler_paused",
            format!("handler {name:?} is paused; resume it to replay its dead letters"),
        ));
    }
    let params = number_params(query, &["partition", "seq"])?;
    let (partition, seq) = (partition_param(&params), params.get("seq").copied());
    let (mut replayed, mut failed) = (0, Vec::new());
    for p in dlq_partitions(state, partition)? {
        let outcome = state
            .cell_for(p)
            .replay_dead_letters(name, p, seq)
            .await
            .map_err(cell_unavailable)?;
        replayed += outcome.replayed;
        failed.extend(
            outcome
                .failed
                .into_iter()
                .map(|f| json!({"partition": p, "seq": f.seq, "error": f.error})),
        );
    }
    tracing::info!(
        handler = name,
        replayed,
        failed = failed.len(),
        "dead letters replayed"
    );
    Ok(json(
        StatusCode::OK,
        &json!({ "replayed": replayed, "failed": failed }),
    ))
}

/// The query's parameters, each a whole number and one of `allowed`.
fn number_params(query: Option<&str>, allowed: &[&str]) -> Result<HashMap<String, u64>, ApiError> {
    let mut out = HashMap::new();
    let pairs = query_pairs(query)?;
    no_repeats(&pairs, &[])?;
    for (key, value) in pairs {
        if !allowed.contains(&key.as_str()) {
            return Err(ApiError::bad_request(
                "invalid_query",
                format!("unknown parameter {key:?}; use {}", allowed.join(", ")),
            ));
        }
        let n = value.parse::<u64>().map_err(|_| {
            ApiError::bad_request("invalid_query", format!("{key} must be a whole number"))
        })?;
        out.insert(key, n);
    }
    Ok(out)
}

/// The `partition` parameter, if given.
fn partition_param(params: &HashMap<String, u64>) -> Option<u32> {
    params
        .get("partition")
        .map(|&n| u32::try_from(n).unwrap_or(u32::MAX))
}

fn cell_unavailable(e: crate::cell::CellError) -> ApiError {
    // As the data plane says for a failed cell.
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "cell_unavailable",
        e.to_string(),
    )
    .retry_after(5)
}

/// The partitions a dead-letter request is about: `partition` if given (which must exist), else all.
fn dlq_partitions(state: &AppState, partition: Option<u32>) -> Result<Vec<u32>, ApiError> {
    match partition {
        Some(p) if p < state.shape.partitions => Ok(vec![p]),
        Some(p) => Err(ApiError::not_found(
            "unknown_partition",
            format!("partition {p} does not exist"),
        )),
        None => Ok((0..state.shape.partitions).collect()),
    }
}

/// `GET /v1/handlers/{name}/dlq?partition=P&from=SEQ&limit=N`
pub(super) async fn dead_letters(
    state: &AppState,
    name: &str,
    query: Option<&str>,
) -> Result<HttpResponse, ApiError> {
    state.catalog.handler(name).ok_or_else(|| not_found(name))?;
    let params = number_params(query, &["partition", "from", "limit"])?;
    let partition = partition_param(&params);
    let from = params.get("from").copied().unwrap_or(0);
    let limit = params.get("limit").map_or(100, |&n| {
        usize::try_from(n).unwrap_or(usize::MAX).clamp(1, 10_000)
    });
    let mut entries = Vec::new();
    for p in dlq_partitions(state, partition)? {
        let consumer = state
            .cell_for(p)
            .consumer(name, p)
            .map_err(|e| ApiError::internal("cannot open dead letters", &e))?;
        let list = tokio::task::spawn_blocking(move || consumer.dlq_list(from, limit))
            .await
            .map_err(|e| ApiError::internal("dead-letter task failed", &e))?
            .map_err(|e| ApiError::internal("cannot read dead letters", &e))?;
        for (seq, entry) in list {
            let mut item = json!({
                "partition": p,
                "seq": seq,
                "offset": entry.offset,
                "version": entry.version,
                "error": entry.error,
                "time_ms": entry.time_ms,
            });
            if let Some(fields) = item.as_object_mut() {
                dead_event_fields(fields, &entry.record);
            }
            entries.push(item);
        }
    }
    Ok(json(StatusCode::OK, &json!({ "dead_letters": entries })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::{Payload, Record};

    fn fields_of(stored: &[u8]) -> serde_json::Value {
        let mut fields = serde_json::Map::new();
        dead_event_fields(&mut fields, stored);
        serde_json::Value::Object(fields)
    }

    #[test]
    fn a_dead_event_is_shown_byte_exact() {
        let record = |key: Option<&[u8]>, value: Payload| Record {
            timestamp_ms: 1,
            key: key.map(<[u8]>::to_vec),
            value,
            headers: Vec::new(),
            id: None,
        };
        let json = fields_of(&record(Some(b"k"), Payload::Json("{\"a\":1}".into())).encode());
        assert_eq!(json, json!({"key": "k", "value": {"a": 1}}));
        let raw = fields_of(&record(Some(&[0xff, 0]), Payload::Bytes(vec![1, 2, 3])).encode());
        assert_eq!(
            raw,
            json!({"key": null, "key_base64": "/wA=", "value_base64": "AQID"})
        );
        assert_eq!(fields_of(&[9, 9]), json!({"record_base64": "CQk="}));
    }
}
