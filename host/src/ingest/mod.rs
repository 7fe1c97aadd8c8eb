//! The data plane (`listen`, default `127.0.0.1:8080`): append events, read them back.
//!
//! Ingest is dumb and fast: parse and validate the whole body, route each event with the partitioner,
//! hand each cell its share through its bounded queue, and answer once every cell has made its share
//! durable. No business logic runs here and nothing waits on handlers.
//!
//! Every event gets its own outcome in request order: its partition and offset (with `"duplicate": true`
//! if its id was seen), or its partition and why it was refused with a retry hint. `202` when all were
//! accepted, `207` when some were, and the refusal status when none were.

mod outcome;
pub mod parse;
pub mod partitioner;
mod read;

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::header::CONTENT_TYPE;
use hyper::{Method, Request, StatusCode};

use crate::cell::{AppendEvents, Appended, CellError};
use crate::http::{ApiError, HttpResponse, no_route, read_body};
use crate::metrics::{Listener, Route};
use crate::server::AppState;
use outcome::{Outcome, Refusal};

/// Route templates, the `route` label of the request metrics.
const APPEND: Route = Route::new("POST", "/v1/topics/{topic}/events");
const READ: Route = Route::new("GET", "/v1/topics/{topic}/partitions/{partition}/events");

/// Routes a data-plane request; records its latency and, if it is refused, why.
pub async fn handle(state: Arc<AppState>, req: Request<Incoming>) -> HttpResponse {
    let started = Instant::now();
    let path = req.uri().path().to_string();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (route, result) = if let Err(e) = crate::http::check_head(&req, &state.config.ingest) {
        (Route::UNMATCHED, Err(e))
    } else {
        match (req.method(), segments.as_slice()) {
            (&Method::POST, ["v1", "topics", topic, "events"]) => {
                let topic = topic.to_string();
                (APPEND, append(&state, &topic, req).await)
            }
            (&Method::GET, ["v1", "topics", topic, "partitions", partition, "events"]) => {
                let (topic, partition) = (topic.to_string(), partition.to_string());
                let query = req.uri().query();
                (READ, read::handle(&state, &topic, &partition, query).await)
            }
            (method, _) => (Route::UNMATCHED, Err(no_route(method, &path))),
        }
    };
    let response = result.unwrap_or_else(|e| {
        state.metrics.refused_request(e.code, e.status.as_u16());
        e.into_response()
    });
    let status = response.status().as_u16();
    state
        .metrics
        .request(Listener::Data, route, status, started.elapsed());
    response
}

/// A request refused before its body was read has the body read and dropped when it is at most this
/// large, so the client's connection stays usable and it reads the refusal; a larger one is left unread
/// and the connection closes after the answer.
const DISCARD_MAX_BYTES: u64 = 1024 * 1024;
/// How long that discard may take.
const DISCARD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

fn unknown_topic(topic: &str) -> ApiError {
    ApiError::not_found(
        "unknown_topic",
        format!(
            "topic {topic:?} does not exist; create it with `procd topics create {topic}` or POST /v1/topics"
        ),
    )
}

fn header_string(req: &Request<Incoming>, name: &str) -> Result<Option<String>, ApiError> {
    match req.headers().get(name) {
        None => Ok(None),
        Some(v) => v.to_str().map(|s| Some(s.to_string())).map_err(|_| {
            ApiError::bad_request("invalid_header", format!("{name} must be visible ASCII"))
        }),
    }
}

async fn append(
    state: &AppState,
    topic: &str,
    req: Request<Incoming>,
) -> Result<HttpResponse, ApiError> {
    if state.catalog.get(topic).is_none() {
        return Err(unknown_topic(topic));
    }
    let content_type = header_string(&req, CONTENT_TYPE.as_str())?;
    let format = content_type.as_deref().and_then(parse::Format::from_content_type).ok_or_else(|| {
        ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!(
                "Content-Type {:?} is not supported; use application/x-ndjson, application/json or \
                 application/octet-stream",
                content_type.as_deref().unwrap_or("")
            ),
        )
    })?;
    let raw_key = header_string(&req, "procd-key")?;
    let raw_id = header_string(&req, "procd-id")?;
    // Admission before the body is read when its length is declared: a refusal then costs nothing.
    let tenant = header_string(&req, "procd-tenant")?.unwrap_or_else(|| "default".into());
    if tenant.len() > crate::backpressure::MAX_TENANT_BYTES {
        return Err(ApiError::bad_request(
            "invalid_header",
            format!(
                "Procd-Tenant is {} bytes long; the limit is {}",
                tenant.len(),
                crate::backpressure::MAX_TENANT_BYTES
            ),
        ));
    }
    let priority = match header_string(&req, "procd-priority")? {
        Some(p) => crate::backpressure::Priority::parse(&p)
            .map_err(|e| ApiError::bad_request("invalid_header", e))?,
        None => crate::backpressure::Priority::default(),
    };
    let max_body_bytes = state.config.ingest.max_body_bytes;
    let declared = crate::http::declared_length(&req);
    // Held until the answer: the request's bytes count in the server's in-flight budget. A body without
    // a declared length holds the most it may be while it is read (only in flight: the buckets charge
    // what it turns out to be), so slow undeclared uploads cannot hold more than the budget.
    let held = match declared {
        // `read_body` refuses it with 413 before reading it.
        Some(bytes) if bytes > max_body_bytes as u64 => None,
        Some(bytes) => Some(state.admission.admit(&tenant, bytes)),
        None => Some(state.admission.hold(max_body_bytes as u64)),
    };
    let held = match held.transpose() {
        Ok(held) => held,
        Err(refused) => {
            crate::http::discard_body(req, DISCARD_MAX_BYTES, DISCARD_TIMEOUT).await;
            return Err(refused);
        }
    };
    let body: Bytes = read_body(req, max_body_bytes, state.config.body_timeouts()).await?;
    let _in_flight = match (declared, held) {
        (Some(_), Some(admitted)) => admitted,
        (_, held) => {
            drop(held);
            state.admission.admit(&tenant, body.len() as u64)?
        }
    };
    // Parsing a large body holds this worker for a while; let the requests already waiting (under
    // overload, mostly refusals that cost microseconds) go first.
    tokio::task::yield_now().await;
    let events = match format {
        parse::Format::Ndjson => parse::ndjson(&body),
        parse::Format::Json => parse::json(&body),
        parse::Format::Raw => parse::raw(&body, raw_key, raw_id),
    }
    .map_err(|detail| ApiError::bad_request("invalid_event", detail))?;
    if events.is_empty() {
        return Err(ApiError::bad_request(
            "invalid_event",
            "the request holds no events",
        ));
    }

    let routed = route(state, topic, events, body.len());
    // The events borrowed from the body: both go before waiting on the cells.
    drop(body);
    let results = append_routed(state, topic, routed, priority).await;
    Ok(outcome::answer(state, results))
}

/// A request's events routed: each event's partition in request order, and per cell the events it is
/// to append (in request order). Events of partitions whose handlers lag are refused here.
struct Routed {
    placed: Vec<u32>,
    per_cell: Vec<AppendEvents>,
    /// Indexes of the events refused here, ascending, and why.
    refused: Vec<(usize, Arc<Refusal>)>,
}

/// Routes and encodes each event and splits them by cell. Offsets and timestamps are assigned by each
/// cell's writer.
fn route(state: &AppState, topic: &str, events: Vec<parse::Event<'_>>, body_len: usize) -> Routed {
    let partitions = state.shape.partitions;
    let cells = state.cells.len().max(1);
    // A cell's share is sized when it gets its first event, for an even split with a quarter to spare,
    // so that it rarely regrows (a record is about as long as its line, plus a header that matters only
    // for tiny events); a lone event is all of the body.
    let share = events.len() / cells + events.len() / (4 * cells) + 1;
    let share_bytes = match events.len() {
        1 => body_len + 64,
        _ => body_len / cells + body_len / (4 * cells) + 64 * share,
    };
    let mut routed = Routed {
        placed: Vec::with_capacity(events.len()),
        per_cell: (0..cells).map(|_| AppendEvents::default()).collect(),
        refused: Vec::new(),
    };
    // Whether each partition refuses writes because its handlers lag (and the refusal), looked up
    // once per partition.
    let mut lagging: Vec<Option<Option<Arc<Refusal>>>> = vec![None; partitions as usize];
    for (index, event) in events.into_iter().enumerate() {
        let partition = partitioner::route(
            event.key.as_deref().map(str::as_bytes),
            event.id.as_deref(),
            partitions,
        );
        routed.placed.push(partition);
        let refusal = lagging[partition as usize].get_or_insert_with(|| {
            let lag = state
                .cell_for(partition)
                .partition(topic, partition)
                .and_then(|v| v.lagging())?;
            Some(Refusal::of(&CellError::Lagging { partition, lag }))
        });
        if let Some(refusal) = refusal {
            routed.refused.push((index, refusal.clone()));
            continue;
        }
        if let Some(events) = routed
            .per_cell
            .get_mut(state.shape.cell_of(partition) as usize)
        {
            if events.is_empty() {
                events.reserve(share, share_bytes);
            }
            events.push(
                partition,
                &event.record(0),
                event.id.as_deref().map(str::to_owned),
            );
        }
    }
    routed
}

/// What one cell did with its share of a request.
enum CellAnswer {
    Appended(std::vec::IntoIter<Appended>),
    Refused(Arc<Refusal>),
}

/// Hands each cell its share of `routed` and waits for their answers: each event's outcome, in request
/// order.
async fn append_routed(
    state: &AppState,
    topic: &str,
    routed: Routed,
    priority: crate::backpressure::Priority,
) -> Vec<Outcome> {
    let Routed {
        placed,
        per_cell,
        refused,
    } = routed;
    let topic: Arc<str> = Arc::from(topic);
    let mut pending = Vec::with_capacity(per_cell.len());
    for (cell, events) in per_cell.into_iter().enumerate() {
        if events.is_empty() {
            pending.push(None);
            continue;
        }
        pending.push(Some(
            state.cells[cell]
                .append(topic.clone(), events, priority)
                .map_err(|err| Refusal::of(&err)),
        ));
    }
    let mut answers = Vec::with_capacity(pending.len());
    for (cell, appending) in pending.into_iter().enumerate() {
        answers.push(match appending {
            None => CellAnswer::Appended(Vec::new().into_iter()),
            Some(Err(refusal)) => CellAnswer::Refused(refusal),
            // A dropped reply means the writer is gone: the server is shutting down.
            Some(Ok(rx)) => match rx
                .await
                .unwrap_or(Err(CellError::ShuttingDown { cell: cell as u32 }))
            {
                Ok(appended) => CellAnswer::Appended(appended.into_iter()),
                Err(err) => CellAnswer::Refused(Refusal::of(&err)),
            },
        });
    }
    // Each cell answered for its events in request order: take them back in that order.
    let mut refused = refused.into_iter().peekable();
    let mut missing = None;
    let mut outcomes = Vec::with_capacity(placed.len());
    for (index, &partition) in placed.iter().enumerate() {
        if let Some((_, refusal)) = refused.next_if(|(i, _)| *i == index) {
            outcomes.push(Outcome::refused(partition, &refusal));
            continue;
        }
        let answered = match answers.get_mut(state.shape.cell_of(partition) as usize) {
            Some(CellAnswer::Appended(appended)) => {
                appended.next().map(|a| Outcome::accepted(partition, a))
            }
            Some(CellAnswer::Refused(refusal)) => Some(Outcome::refused(partition, refusal)),
            None => None,
        };
        // Not answered for: only if a writer stopped part way.
        outcomes.push(answered.unwrap_or_else(|| {
            let shutting_down = CellError::ShuttingDown {
                cell: state.shape.cell_of(partition),
            };
            Outcome::refused(
                partition,
                missing.get_or_insert_with(|| Refusal::of(&shutting_down)),
            )
        }));
    }
    outcomes
}
