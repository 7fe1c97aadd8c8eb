//! What an append answers: each event's outcome in request order (its partition and offset, or why it
//! was refused and when to retry), the codes, statuses and metric reasons of refusals, and the answer's
//! JSON.

use std::sync::Arc;

use hyper::StatusCode;

use crate::cell::{Appended, CellError};
use crate::http::{HttpResponse, json_body};
use crate::server::AppState;

/// The answer to an append whose events ended as `results` (in request order), with the refusals
/// counted in the metrics: `202` when every event was accepted, `207` when some were, and when none
/// was, the first refusal's status, code, detail and `Retry-After`.
pub(super) fn answer(state: &AppState, results: Vec<Outcome>) -> HttpResponse {
    count_refused(state, &results);
    let refused = results.iter().filter(|o| o.refusal().is_some()).count();
    if refused < results.len() {
        let status = if refused == 0 {
            StatusCode::ACCEPTED
        } else {
            StatusCode::MULTI_STATUS
        };
        let answer = AppendResponse {
            error: None,
            detail: None,
            results,
        };
        return json_body(status, answer.to_json());
    }
    let first = results.first().and_then(Outcome::refusal);
    let code = first.map_or("refused", |r| r.code);
    let retry_ms = first.map_or(1_000, |r| r.retry_after_ms);
    let detail = first.map(|r| r.detail.clone()).unwrap_or_default();
    let status = refusal_status(code);
    state.metrics.refused_request(code, status.as_u16());
    let answer = AppendResponse {
        error: Some(code),
        detail: Some(&detail),
        results,
    };
    let mut resp = json_body(status, answer.to_json());
    resp.headers_mut().insert(
        hyper::header::RETRY_AFTER,
        retry_ms.div_ceil(1000).max(1).into(),
    );
    resp
}

/// Why events were refused: made once per error and shared by the events it refuses, so that a
/// refused 1000-event request formats its detail once, not 1000 times.
#[derive(Debug)]
pub(super) struct Refusal {
    code: &'static str,
    detail: String,
    retry_after_ms: u64,
    /// Finer than `code` (shed by priority or a full queue): the `reason` label of
    /// `procd_ingest_refused_events_total`. Not in the JSON.
    reason: &'static str,
}

impl Refusal {
    /// The refusal of events for `err`.
    pub fn of(err: &CellError) -> Arc<Self> {
        let (code, retry_after_ms) = code_and_retry(err);
        Arc::new(Self {
            code,
            detail: err.to_string(),
            retry_after_ms,
            reason: reason(err),
        })
    }
}

/// One event's outcome in the answer: its partition and offset (`duplicate` when its id was appended
/// before), or why it was refused and when to retry.
pub(super) enum Outcome {
    Accepted {
        partition: u32,
        appended: Appended,
    },
    Refused {
        partition: u32,
        refusal: Arc<Refusal>,
    },
}

impl Outcome {
    /// An event the cell appended (or had appended before: a duplicate id).
    pub fn accepted(partition: u32, appended: Appended) -> Self {
        Self::Accepted {
            partition,
            appended,
        }
    }

    /// An event refused as `refusal` says.
    pub fn refused(partition: u32, refusal: &Arc<Refusal>) -> Self {
        Self::Refused {
            partition,
            refusal: refusal.clone(),
        }
    }

    fn refusal(&self) -> Option<&Refusal> {
        match self {
            Self::Accepted { .. } => None,
            Self::Refused { refusal, .. } => Some(refusal),
        }
    }
}

/// The metrics' reason for a refused event.
fn reason(err: &CellError) -> &'static str {
    use crate::backpressure::Priority;
    match err {
        CellError::Unavailable { .. } => "cell_unavailable",
        CellError::Overloaded {
            shed: Some(Priority::Low),
            ..
        } => "shed_low",
        CellError::Overloaded {
            shed: Some(Priority::Normal),
            ..
        } => "shed_normal",
        CellError::Overloaded { .. } => "queue_full",
        CellError::UnknownTopic(_) => "unknown_topic",
        CellError::ShuttingDown { .. } => "shutting_down",
        CellError::Lagging { .. } => "partition_lagging",
    }
}

/// The status a refusal code is answered with when it refuses a whole request.
fn refusal_status(code: &str) -> StatusCode {
    match code {
        "unknown_topic" => StatusCode::NOT_FOUND,
        "partition_lagging" => StatusCode::TOO_MANY_REQUESTS,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    }
}

/// Counts the refused events of an append, once per reason (not per event).
fn count_refused(state: &AppState, results: &[Outcome]) {
    let mut by_reason: Vec<(&'static str, &'static str, u64)> = Vec::new();
    for refusal in results.iter().filter_map(Outcome::refusal) {
        match by_reason.iter_mut().find(|(r, _, _)| *r == refusal.reason) {
            Some((_, _, n)) => *n += 1,
            None => by_reason.push((refusal.reason, refusal.code, 1)),
        }
    }
    for (reason, code, n) in by_reason {
        let status = refusal_status(code).as_u16();
        state.metrics.refused_events(reason, status, n);
    }
}

/// The code and retry hint a refusal is reported with.
fn code_and_retry(err: &CellError) -> (&'static str, u64) {
    match err {
        CellError::Unavailable { .. } => ("cell_unavailable", 5_000),
        CellError::Overloaded { .. } => ("cell_overloaded", 100),
        CellError::UnknownTopic(_) => ("unknown_topic", 1_000),
        CellError::ShuttingDown { .. } => ("shutting_down", 1_000),
        CellError::Lagging { .. } => ("partition_lagging", 1_000),
    }
}

/// An append's answer: every event's outcome in request order, after the request's own refusal when
/// none was accepted.
struct AppendResponse<'a> {
    error: Option<&'static str>,
    detail: Option<&'a str>,
    results: Vec<Outcome>,
}

impl AppendResponse<'_> {
    /// The answer as compact JSON, written by hand: serde_json's derived serializer escapes every field
    /// name of every outcome, and a 1000-event answer has 2000 of them (about 2 % of the server's CPU in
    /// `procd bench ingest`). The bytes are those serde_json wrote (a test holds them to it).
    fn to_json(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + 36 * self.results.len());
        out.push(b'{');
        if let Some(error) = self.error {
            out.extend_from_slice(b"\"error\":");
            put_str(&mut out, error);
            out.push(b',');
        }
        if let Some(detail) = self.detail {
            out.extend_from_slice(b"\"detail\":");
            put_str(&mut out, detail);
            out.push(b',');
        }
        out.extend_from_slice(b"\"results\":[");
        for (i, outcome) in self.results.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            outcome.put_json(&mut out);
        }
        out.extend_from_slice(b"]}");
        out
    }
}

impl Outcome {
    /// The outcome as JSON: `offset` and `duplicate` (when true) if accepted, else `error`, `detail`
    /// and `retry_after_ms`.
    fn put_json(&self, out: &mut Vec<u8>) {
        let mut digits = itoa::Buffer::new();
        out.extend_from_slice(b"{\"partition\":");
        match self {
            Self::Accepted {
                partition,
                appended,
            } => {
                out.extend_from_slice(digits.format(*partition).as_bytes());
                let (offset, duplicate) = match *appended {
                    Appended::New(o) => (o, false),
                    Appended::Duplicate(o) => (o, true),
                };
                out.extend_from_slice(b",\"offset\":");
                out.extend_from_slice(digits.format(offset).as_bytes());
                if duplicate {
                    out.extend_from_slice(b",\"duplicate\":true");
                }
            }
            Self::Refused { partition, refusal } => {
                out.extend_from_slice(digits.format(*partition).as_bytes());
                out.extend_from_slice(b",\"error\":");
                put_str(out, refusal.code);
                out.extend_from_slice(b",\"detail\":");
                put_str(out, &refusal.detail);
                out.extend_from_slice(b",\"retry_after_ms\":");
                out.extend_from_slice(digits.format(refusal.retry_after_ms).as_bytes());
            }
        }
        out.push(b'}');
    }
}

/// A JSON string, quoted and escaped.
fn put_str(out: &mut Vec<u8>, s: &str) {
    // Writing a string into a Vec cannot fail.
    let _ = serde_json::to_writer(out, s);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backpressure::Priority;
    use serde_json::json;

    #[test]
    fn answers_are_the_json_serde_would_write() {
        let overloaded = CellError::Overloaded {
            cell: 1,
            shed: None,
            queue_delay_ms: Some(120),
        };
        let results = vec![
            Outcome::accepted(5, Appended::New(0)),
            Outcome::accepted(6, Appended::Duplicate(18_446_744_073_709_551_615)),
            Outcome::refused(7, &Refusal::of(&overloaded)),
        ];
        let detail = overloaded.to_string();
        let answer = AppendResponse {
            error: None,
            detail: None,
            results,
        };
        let expected = format!(
            "{{\"results\":[{{\"partition\":5,\"offset\":0}},\
             {{\"partition\":6,\"offset\":18446744073709551615,\"duplicate\":true}},\
             {{\"partition\":7,\"error\":\"cell_overloaded\",\"detail\":{},\"retry_after_ms\":100}}]}}",
            serde_json::to_string(&detail).unwrap_or_default()
        );
        // Byte for byte what the derived serializer wrote (fields in declaration order, compact).
        assert_eq!(String::from_utf8_lossy(&answer.to_json()), expected);

        let quoted = "a \"quoted\"\nline\\";
        let refused = AppendResponse {
            error: Some("cell_unavailable"),
            detail: Some(quoted),
            results: vec![],
        };
        let parsed: serde_json::Value =
            serde_json::from_slice(&refused.to_json()).unwrap_or_default();
        assert_eq!(
            parsed,
            json!({"error": "cell_unavailable", "detail": quoted, "results": []})
        );
    }

    #[test]
    fn refused_events_are_counted_by_a_finer_reason_than_their_code() {
        let shed = |p| CellError::Overloaded {
            cell: 0,
            shed: Some(p),
            queue_delay_ms: None,
        };
        let full = CellError::Overloaded {
            cell: 0,
            shed: None,
            queue_delay_ms: None,
        };
        assert_eq!(reason(&shed(Priority::Low)), "shed_low");
        assert_eq!(reason(&shed(Priority::Normal)), "shed_normal");
        assert_eq!(reason(&full), "queue_full");
        // Clients still see one code for all three, with the same status.
        for err in [shed(Priority::Low), shed(Priority::Normal), full] {
            let (code, _) = code_and_retry(&err);
            assert_eq!(code, "cell_overloaded");
            assert_eq!(refusal_status(code), StatusCode::SERVICE_UNAVAILABLE);
        }
        let lagging = CellError::Lagging {
            partition: 1,
            lag: 9,
        };
        assert_eq!(reason(&lagging), "partition_lagging");
        assert_eq!(
            refusal_status(code_and_retry(&lagging).0),
            StatusCode::TOO_MANY_REQUESTS
        );
    }
}
