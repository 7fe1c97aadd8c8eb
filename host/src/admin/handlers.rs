//! Handler administration: deploy, list, show, rollback, pause/resume, reset, remove, dead letters.
//!
//! A deploy validates everything before anything changes: the size, the component (wasm, a component,
//! procd's world), the topics it names, and its `init` with the given config. Only then is the version
//! recorded; each partition's processor swaps to it at its next batch boundary.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::{Request, StatusCode};
use serde::Deserialize;
use serde_json::json;

use crate::catalog::{
    CatalogError, HandlerDef, HandlerLimits, HandlerVersion, Reset, ResetTo, StartPosition,
};
use crate::http::{ApiError, HttpResponse, json, read_body};
use crate::runtime::{CompileError, LogLabel, StateStore};
use crate::server::AppState;

/// How long compiling a component may take before the deploy is refused.
const COMPILE_TIMEOUT: Duration = Duration::from_secs(60);

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
fn query_pairs(query: Option<&str>) -> Result<Vec<(String, String)>, ApiError> {
    let mut out = Vec::new();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        out.push((percent_decode(name)?, percent_decode(value)?));
    }
    Ok(out)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn now_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The durable end offset of every partition of `topic`, indexed by partition.
fn end_offsets(state: &AppState, topic: &str) -> Vec<u64> {
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

fn storage(e: CatalogError) -> ApiError {
    match e {
        CatalogError::InvalidName(_) => ApiError::bad_request("invalid_handler", e.to_string()),
        CatalogError::HandlerNotFound(name) => not_found(&name),
        other => ApiError::internal("control database failed", &other),
    }
}

/// No committed state: what a deploy-time `init` check reads.
struct EmptyState;

impl StateStore for EmptyState {
    fn get(&self, _key: &[u8]) -> Result<Option<Vec<u8>>, String> {
        Ok(None)
    }
}

/// `PUT /v1/handlers/{name}?input=T&output=O&config=k=v&from=earliest` with the component as the body.
pub(super) async fn deploy(
    state: &AppState,
    name: &str,
    req: Request<Incoming>,
) -> Result<HttpResponse, ApiError> {
    crate::catalog::validate_topic_name(name).map_err(|_| {
        ApiError::bad_request(
            "invalid_handler",
            format!("invalid handler name {name:?}: use 1 to 128 characters from [a-zA-Z0-9._-]"),
        )
    })?;
    let params = query_pairs(req.uri().query())?;
    let max = state.config.handler.max_component_bytes;
    let body = read_body(req, max, state.config.body_timeouts()).await.map_err(|mut e| {
        if e.status == StatusCode::PAYLOAD_TOO_LARGE {
            e.code = "component_too_large";
            e.detail = format!("the component is larger than the {max}-byte limit (handler.max_component_bytes)");
        }
        e
    })?;

    let mut input = None;
    let mut outputs = Vec::new();
    let mut config = Vec::new();
    let mut start = None;
    let mut config_given = false;
    let mut limits = HandlerLimits::default();
    let mut limits_given = false;
    let server_limits = state.config.handler_limits();
    for (key, value) in params {
        if let Some(limit) = key.strip_prefix("limit.") {
            limits_given = true;
            limits
                .set(limit, &value, &server_limits)
                .map_err(|e| ApiError::bad_request("invalid_limit", e))?;
            continue;
        }
        match key.as_str() {
            "input" => input = Some(value),
            "output" => outputs.push(value),
            "config" => {
                config_given = true;
                let (k, v) = value.split_once('=').ok_or_else(|| {
                    ApiError::bad_request(
                        "invalid_query",
                        format!("config {value:?} must be KEY=VALUE"),
                    )
                })?;
                config.push((k.to_string(), v.to_string()));
            }
            "from" => {
                start =
                    Some(value.parse::<StartPosition>().map_err(|e| {
                        ApiError::bad_request("invalid_query", format!("from: {e}"))
                    })?);
            }
            other => {
                return Err(ApiError::bad_request(
                    "invalid_query",
                    format!(
                        "unknown parameter {other:?}; use input, output (repeatable), config=KEY=VALUE (repeatable), from, limit.NAME"
                    ),
                ));
            }
        }
    }

    let _guard = state.admin_lock.lock().await;
    let existing = state.catalog.handler(name);
    let input = match (&existing, input) {
        (None, None) => {
            return Err(ApiError::bad_request(
                "invalid_query",
                "a new handler needs input=TOPIC",
            ));
        }
        (Some(def), Some(i)) if i != def.input => {
            return Err(ApiError::bad_request(
                "input_changed",
                format!(
                    "handler {name:?} reads {:?}; its input cannot change (deploy under another name)",
                    def.input
                ),
            ));
        }
        (Some(def), _) => def.input.clone(),
        (None, Some(i)) => i,
    };
    let previous = existing.as_ref().and_then(|d| d.active_version().cloned());
    if outputs.is_empty() {
        outputs = previous
            .as_ref()
            .map(|v| v.outputs.clone())
            .unwrap_or_default();
    }
    if !config_given {
        config = previous
            .as_ref()
            .map(|v| v.config.clone())
            .unwrap_or_default();
    }
    if !limits_given {
        limits = previous
            .as_ref()
            .map(|v| v.limits.clone())
            .unwrap_or_default();
    }
    for topic in std::iter::once(&input).chain(&outputs) {
        if state.catalog.get(topic).is_none() {
            return Err(ApiError::not_found(
                "unknown_topic",
                format!("topic {topic:?} does not exist; create it first"),
            ));
        }
    }
    if outputs.len() > usize::from(u16::MAX) {
        return Err(ApiError::bad_request(
            "invalid_query",
            "too many output topics",
        ));
    }

    // Compile and check `init` off the async threads, one deploy at a time: a big component takes a
    // while, and the cells' threads must keep their cores. A deploy waits for the compiler at most
    // as long as a compile may take.
    let slot =
        match tokio::time::timeout(COMPILE_TIMEOUT, state.compiler.clone().acquire_owned()).await {
            Ok(Ok(slot)) => slot,
            _ => {
                return Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "compiler_busy",
                    "other deploys are compiling; retry later",
                )
                .retry_after(COMPILE_TIMEOUT.as_secs()));
            }
        };
    let runtime = state.runtime.clone();
    let check_limits = limits.apply(&server_limits);
    let check_config = config.clone();
    let label = LogLabel {
        handler: Arc::from(name),
        version: 0,
        partition: 0,
    };
    let component = body.clone();
    let checked = tokio::time::timeout(
        COMPILE_TIMEOUT,
        tokio::task::spawn_blocking(move || {
            // Held until the compile really ends, even after the deploy gave up waiting for it.
            let _slot = slot;
            let compiled = runtime
                .compile(&component)
                .map_err(|e| (e.to_string(), matches!(e, CompileError::Invalid(_))))?;
            runtime
                .instantiate(
                    &compiled,
                    &check_limits,
                    Box::new(EmptyState),
                    &check_config,
                    label,
                )
                .map(|_| ())
                .map_err(|e| (e.to_string(), false))
        }),
    )
    .await;
    match checked {
        Err(_) => {
            return Err(ApiError::bad_request(
                "invalid_component",
                format!("compiling took longer than {} s", COMPILE_TIMEOUT.as_secs()),
            ));
        }
        Ok(Err(e)) => return Err(ApiError::internal("compile task failed", &e)),
        Ok(Ok(Err((message, _)))) => {
            return Err(ApiError::bad_request("invalid_component", message));
        }
        Ok(Ok(Ok(()))) => {}
    }

    let version_no = existing
        .as_ref()
        .and_then(|d| d.versions.iter().map(|v| v.version).max())
        .unwrap_or(0)
        + 1;
    let sha256 = crate::catalog::component_digest(&body);
    let version = HandlerVersion {
        version: version_no,
        outputs: outputs.clone(),
        config,
        size_bytes: body.len() as u64,
        sha256: sha256.clone(),
        created_ms: now_ms(),
        limits,
    };
    let def = match existing {
        Some(def) => {
            let mut def = HandlerDef::clone(&def);
            def.versions.push(version);
            def.active = version_no;
            def
        }
        None => HandlerDef {
            name: name.to_string(),
            input: input.clone(),
            start: start.unwrap_or(StartPosition::Earliest),
            versions: vec![version],
            active: version_no,
            paused: false,
            reset: None,
            created_ms: now_ms(),
            incarnation: now_nanos(),
            // Fixed now, so that events appended after this deploy answers are processed.
            start_offsets: if start == Some(StartPosition::Latest) {
                end_offsets(state, &input)
            } else {
                Vec::new()
            },
        },
    };
    state
        .catalog
        .put_handler(def, Some((version_no, &body)))
        .map_err(storage)?;
    tracing::info!(handler = name, version = version_no, "handler deployed");
    Ok(json(
        StatusCode::CREATED,
        &json!({"name": name, "version": version_no, "input": input, "outputs": outputs, "sha256": sha256}),
    ))
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
    state.catalog.handler(name).ok_or_else(|| not_found(name))?;
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
    for (key, value) in query_pairs(query)? {
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
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "cell_unavailable",
        e.to_string(),
    )
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
            let record = crate::log::Record::decode(&entry.record).ok();
            entries.push(json!({
                "partition": p,
                "seq": seq,
                "offset": entry.offset,
                "version": entry.version,
                "error": entry.error,
                "time_ms": entry.time_ms,
                "key": record.as_ref().and_then(|r| r.key.as_deref()).map(String::from_utf8_lossy),
                "value": record.as_ref().map(|r| match &r.value {
                    crate::log::Payload::Json(text) => serde_json::from_str(text).unwrap_or(serde_json::Value::Null),
                    crate::log::Payload::Bytes(b) => serde_json::Value::String(String::from_utf8_lossy(b).into_owned()),
                }),
            }));
        }
    }
    Ok(json(StatusCode::OK, &json!({ "dead_letters": entries })))
}
