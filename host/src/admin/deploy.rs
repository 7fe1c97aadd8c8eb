//! `PUT /v1/handlers/{name}?input=T&output=O&config=k=v&from=earliest&limit.NAME=N`, the component as
//! the body: deploying a handler version.
//!
//! Everything is checked before anything changes: the name, the parameters, the topics they name, the
//! component (wasm, a component, procd's world) and its `init` with the given config. Only then is the
//! version recorded; each partition's processor swaps to it at its next batch boundary. What a deploy
//! of an existing handler leaves out (outputs, config, limits) is taken from its active version.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::{Request, StatusCode};
use serde_json::json;

use super::handlers::{end_offsets, no_repeats, now_ms, now_nanos, query_pairs, storage};
use crate::catalog::{HandlerDef, HandlerLimits, HandlerVersion, StartPosition};
use crate::http::{ApiError, HttpResponse, json, read_body};
use crate::runtime::{CompileError, Limits, LogLabel, StateStore};
use crate::server::AppState;

/// How long compiling a component may take before the deploy is refused.
const COMPILE_TIMEOUT: Duration = Duration::from_secs(60);

/// Deploys the request's component as the next version of handler `name`.
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
    let server_limits = state.config.handler_limits();
    let params = Params::parse(query_pairs(req.uri().query())?, &server_limits)?;
    let max = state.config.handler.max_component_bytes;
    let body = read_body(req, max, state.config.body_timeouts()).await.map_err(|mut e| {
        if e.status == StatusCode::PAYLOAD_TOO_LARGE {
            e.code = "component_too_large";
            e.detail = format!("the component is larger than the {max}-byte limit (handler.max_component_bytes)");
        }
        e
    })?;

    let _guard = lock_within(&state.admin_lock, COMPILE_TIMEOUT).await?;
    let existing = state.catalog.handler(name);
    let settings = params.settle(state, name, existing.as_deref())?;
    check_component(state, name, &body, &settings, &server_limits).await?;

    let version_no = existing
        .as_ref()
        .and_then(|d| d.versions.iter().map(|v| v.version).max())
        .unwrap_or(0)
        + 1;
    let sha256 = crate::catalog::component_digest(&body);
    let (input, outputs) = (settings.input.clone(), settings.outputs.clone());
    let version = HandlerVersion {
        version: version_no,
        outputs: settings.outputs,
        config: settings.config,
        size_bytes: body.len() as u64,
        sha256: sha256.clone(),
        created_ms: now_ms(),
        limits: settings.limits,
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
            start: settings.start.unwrap_or(StartPosition::Earliest),
            versions: vec![version],
            active: version_no,
            paused: false,
            reset: None,
            created_ms: now_ms(),
            incarnation: now_nanos(),
            // Fixed now, so that events appended after this deploy answers are processed.
            start_offsets: if settings.start == Some(StartPosition::Latest) {
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

/// What a deploy's query asks for; `None` (and no outputs) means "as the active version has it".
#[derive(Default)]
struct Params {
    input: Option<String>,
    outputs: Vec<String>,
    config: Option<Vec<(String, String)>>,
    limits: Option<HandlerLimits>,
    start: Option<StartPosition>,
}

/// A new version's settings, every one decided.
struct Settings {
    input: String,
    outputs: Vec<String>,
    config: Vec<(String, String)>,
    limits: HandlerLimits,
    start: Option<StartPosition>,
}

impl Params {
    /// Reads the decoded query pairs; limits are checked against the server's.
    fn parse(pairs: Vec<(String, String)>, server_limits: &Limits) -> Result<Self, ApiError> {
        no_repeats(&pairs, &["output", "config"])?;
        let mut params = Self::default();
        for (key, value) in pairs {
            if let Some(limit) = key.strip_prefix("limit.") {
                params
                    .limits
                    .get_or_insert_with(HandlerLimits::default)
                    .set(limit, &value, server_limits)
                    .map_err(|e| ApiError::bad_request("invalid_limit", e))?;
                continue;
            }
            match key.as_str() {
                "input" => params.input = Some(value),
                "output" => params.outputs.push(value),
                "config" => {
                    let (k, v) = value.split_once('=').ok_or_else(|| {
                        ApiError::bad_request(
                            "invalid_query",
                            format!("config {value:?} must be KEY=VALUE"),
                        )
                    })?;
                    params
                        .config
                        .get_or_insert_with(Vec::new)
                        .push((k.to_string(), v.to_string()));
                }
                "from" => {
                    params.start = Some(value.parse::<StartPosition>().map_err(|e| {
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
        Ok(params)
    }

    /// The settings of handler `name`'s next version, given its current definition (if it exists): a
    /// new handler needs an input, an existing one keeps its own, and every topic named must exist.
    fn settle(
        self,
        state: &AppState,
        name: &str,
        existing: Option<&HandlerDef>,
    ) -> Result<Settings, ApiError> {
        let input = match (existing, self.input) {
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
        if let (Some(def), Some(start)) = (existing, &self.start)
            && *start != def.start
        {
            return Err(ApiError::bad_request(
                "start_changed",
                format!(
                    "handler {name:?} started from {}; a new version goes on where the last one stopped \
                     (to move it, POST /v1/handlers/{name}/reset)",
                    def.start
                ),
            ));
        }
        let previous = existing.and_then(HandlerDef::active_version);
        let outputs = if self.outputs.is_empty() {
            previous.map(|v| v.outputs.clone()).unwrap_or_default()
        } else {
            self.outputs
        };
        let config = self
            .config
            .or_else(|| previous.map(|v| v.config.clone()))
            .unwrap_or_default();
        let limits = self
            .limits
            .or_else(|| previous.map(|v| v.limits.clone()))
            .unwrap_or_default();
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
        Ok(Settings {
            input,
            outputs,
            config,
            limits,
            start: self.start,
        })
    }
}

/// Takes the control plane's lock, waiting at most `wait`: its holder may be another deploy, compiling
/// for up to [`COMPILE_TIMEOUT`], with more queued behind it. Past `wait`, `503 admin_busy` with a
/// `Retry-After` of as long again, as for the compiler's slot.
async fn lock_within(
    lock: &tokio::sync::Mutex<()>,
    wait: Duration,
) -> Result<tokio::sync::MutexGuard<'_, ()>, ApiError> {
    tokio::time::timeout(wait, lock.lock()).await.map_err(|_| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "admin_busy",
            format!(
                "other deploys or topic and handler changes held the control plane for {} s; retry later",
                wait.as_secs()
            ),
        )
        .retry_after(wait.as_secs().max(1))
    })
}

/// No committed state: what a deploy-time `init` check reads.
struct EmptyState;

impl StateStore for EmptyState {
    fn get(&self, _key: &[u8]) -> Result<Option<Vec<u8>>, String> {
        Ok(None)
    }
}

/// Compiles `component` and runs its `init` with the settings' config and limits.
///
/// Off the async threads and one deploy at a time: a big component takes a while, and the cells'
/// threads must keep their cores. A deploy waits for the compiler at most as long as a compile may take.
async fn check_component(
    state: &AppState,
    name: &str,
    component: &Bytes,
    settings: &Settings,
    server_limits: &Limits,
) -> Result<(), ApiError> {
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
    let limits = settings.limits.apply(server_limits);
    let config = settings.config.clone();
    let label = LogLabel {
        handler: Arc::from(name),
        version: 0,
        partition: 0,
    };
    let component = component.clone();
    let checked = tokio::time::timeout(
        COMPILE_TIMEOUT,
        tokio::task::spawn_blocking(move || {
            // Held until the compile really ends, even after the deploy gave up waiting for it.
            let _slot = slot;
            let compiled = runtime
                .compile(&component)
                .map_err(|e| (e.to_string(), matches!(e, CompileError::Invalid(_))))?;
            runtime
                .instantiate(&compiled, &limits, Box::new(EmptyState), &config, label)
                .map(|_| ())
                .map_err(|e| (e.to_string(), false))
        }),
    )
    .await;
    match checked {
        Err(_) => Err(ApiError::bad_request(
            "invalid_component",
            format!("compiling took longer than {} s", COMPILE_TIMEOUT.as_secs()),
        )),
        Ok(Err(e)) => Err(ApiError::internal("compile task failed", &e)),
        Ok(Ok(Err((message, _)))) => Err(ApiError::bad_request("invalid_component", message)),
        Ok(Ok(Ok(()))) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_deploy_waits_for_the_admin_lock_a_bounded_time_then_gets_503() {
        let lock = tokio::sync::Mutex::new(());
        let held = lock.lock().await;
        // A short wait stands in for COMPILE_TIMEOUT (tokio's paused clock is not enabled here).
        let refused = lock_within(&lock, Duration::from_millis(50)).await.err();
        assert_eq!(
            refused.map(|e| (e.status, e.code, e.retry_after_secs)),
            Some((StatusCode::SERVICE_UNAVAILABLE, "admin_busy", Some(1)))
        );
        drop(held);
        assert!(lock_within(&lock, Duration::from_millis(50)).await.is_ok());
    }
}
