//! Request bodies to events. A body is validated as a whole before anything is appended: one bad line
//! refuses the request, naming the line.
//!
//! - `application/x-ndjson`: one JSON object per line.
//! - `application/json`: one such object, or an array of them.
//! - `application/octet-stream`: the body is one event's value, byte-exact; key in `Procd-Key`, id in
//!   `Procd-Id`.
//!
//! An event object is `{"key": string?, "value": any JSON, "headers": {string: string}?, "id": string?}`.
//! The value is kept as the exact JSON text sent, so it reads back as the same JSON value.

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::log::{PayloadRef, RecordRef};

mod fast;

/// Longest accepted event id, in bytes.
pub const MAX_ID_BYTES: usize = 256;

/// One event as the producer sent it, borrowing from the request body wherever it can (a key or id
/// with JSON escapes is unescaped into its own string): the record is encoded straight from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event<'a> {
    /// Partitioning key.
    pub key: Option<Cow<'a, str>>,
    /// The value: the exact JSON text, or the raw body.
    pub value: PayloadRef<'a>,
    /// Headers, sorted by name.
    pub headers: Vec<(String, String)>,
    /// Idempotency id.
    pub id: Option<Cow<'a, str>>,
}

impl Event<'_> {
    /// The record to store, with log-append time `timestamp_ms` (the cell writer stamps the real one).
    pub fn record(&self, timestamp_ms: u64) -> RecordRef<'_> {
        RecordRef {
            timestamp_ms,
            key: self.key.as_deref().map(str::as_bytes),
            value: self.value,
            headers: self
                .headers
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_str()))
                .collect(),
            id: self.id.as_deref(),
        }
    }
}

/// The body's format, from its `Content-Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `application/x-ndjson` (also `application/jsonl`).
    Ndjson,
    /// `application/json`.
    Json,
    /// `application/octet-stream`.
    Raw,
}

impl Format {
    /// The format of a `Content-Type` value, if supported.
    pub fn from_content_type(value: &str) -> Option<Self> {
        let essence = value
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        match essence.as_str() {
            "application/x-ndjson"
            | "application/ndjson"
            | "application/jsonl"
            | "application/x-jsonlines" => Some(Self::Ndjson),
            "application/json" => Some(Self::Json),
            "application/octet-stream" => Some(Self::Raw),
            _ => None,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EventIn<'a> {
    #[serde(default, borrow)]
    key: Option<Text<'a>>,
    #[serde(borrow)]
    value: &'a RawValue,
    #[serde(default)]
    headers: Option<BTreeMap<String, String>>,
    #[serde(default, borrow)]
    id: Option<Text<'a>>,
}

/// A JSON string borrowed from the body unless it has escapes. (serde borrows a `Cow<str>` only when it
/// is a field of its own, not inside an `Option`.)
#[derive(Deserialize)]
struct Text<'a>(#[serde(borrow)] Cow<'a, str>);

fn check_id(id: Option<Cow<'_, str>>) -> Result<Option<Cow<'_, str>>, String> {
    match id {
        Some(id) if id.is_empty() => Err("`id` must not be empty".into()),
        Some(id) if id.len() > MAX_ID_BYTES => Err(format!(
            "`id` is {} bytes; the limit is {MAX_ID_BYTES}",
            id.len()
        )),
        other => Ok(other),
    }
}

fn event_from(raw: &str) -> Result<Event<'_>, String> {
    if let Some(event) = fast::event(raw) {
        return Ok(event);
    }
    serde_event(raw)
}

/// The event in `raw` through serde_json: every shape, and the error messages.
fn serde_event(raw: &str) -> Result<Event<'_>, String> {
    let e: EventIn<'_> = serde_json::from_str(raw).map_err(|e| e.to_string())?;
    Ok(Event {
        key: e.key.map(|t| t.0),
        value: PayloadRef::Json(e.value.get().as_bytes()),
        headers: e
            .headers
            .map(|h| h.into_iter().collect())
            .unwrap_or_default(),
        id: check_id(e.id.map(|t| t.0))?,
    })
}

/// Parses an NDJSON body. Blank lines are skipped; errors name the 1-based line.
pub fn ndjson(body: &[u8]) -> Result<Vec<Event<'_>>, String> {
    let text = std::str::from_utf8(body).map_err(|e| format!("body is not UTF-8: {e}"))?;
    // The fast path takes the usual body whole; from a line it cannot take, the rest goes line by line.
    let (mut events, stopped) = fast::ndjson(text);
    if let Some(fast::Stopped { at, line }) = stopped {
        by_line(text.get(at..).unwrap_or_default(), line, &mut events)?;
    }
    Ok(events)
}

/// Parses NDJSON `lines` one line at a time onto `events`; the first is line `first + 1` of the body.
fn by_line<'a>(lines: &'a str, first: usize, events: &mut Vec<Event<'a>>) -> Result<(), String> {
    for (i, line) in lines.split('\n').enumerate() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.trim().is_empty() {
            continue;
        }
        let number = first + i + 1;
        events.push(event_from(line).map_err(|e| format!("line {number}: {e}"))?);
    }
    Ok(())
}

/// Parses a JSON body: one event object or an array of them. Errors name the 1-based array element.
pub fn json(body: &[u8]) -> Result<Vec<Event<'_>>, String> {
    let text = std::str::from_utf8(body).map_err(|e| format!("body is not UTF-8: {e}"))?;
    if text.trim_start().starts_with('[') {
        if let Some(events) = fast::array(text) {
            return Ok(events);
        }
        serde_array(text)
    } else {
        Ok(vec![event_from(text)?])
    }
}

/// A JSON array of events through serde_json; errors name the 1-based element.
fn serde_array(text: &str) -> Result<Vec<Event<'_>>, String> {
    let items: Vec<&RawValue> = serde_json::from_str(text).map_err(|e| e.to_string())?;
    items
        .iter()
        .enumerate()
        .map(|(i, raw)| event_from(raw.get()).map_err(|e| format!("element {}: {e}", i + 1)))
        .collect()
}

/// One raw event: the body is the value.
pub fn raw(body: &[u8], key: Option<String>, id: Option<String>) -> Result<Vec<Event<'_>>, String> {
    Ok(vec![Event {
        key: key.map(Cow::Owned),
        value: PayloadRef::Bytes(body),
        headers: Vec::new(),
        id: check_id(id.map(Cow::Owned))?,
    }])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ndjson_keeps_values_exact_and_names_bad_lines() {
        let body = b"{\"key\":\"a\",\"value\":{\"x\": [1, 2.50]}}\n\n{\"value\":null,\"id\":\"i\",\"headers\":{\"h\":\"v\"}}\r\n";
        let events = ndjson(body).unwrap_or_default();
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].value, PayloadRef::Json(b"{\"x\": [1, 2.50]}"));
        assert!(
            matches!(events[0].key, Some(Cow::Borrowed("a"))),
            "keys are borrowed"
        );
        let escaped = ndjson(b"{\"key\":\"a\\u0041\",\"value\":1}").unwrap_or_default();
        assert_eq!(escaped[0].key.as_deref(), Some("aA"), "escapes are decoded");
        assert_eq!(events[1].headers, vec![("h".to_string(), "v".to_string())]);
        let err = ndjson(b"{\"value\":1}\n{\"value\":1}\n{\"key\":\"k\"}\n")
            .err()
            .unwrap_or_default();
        assert!(err.starts_with("line 3: missing field `value`"), "{err}");
        let err = ndjson(b"{\"value\":1,\"bogus\":2}")
            .err()
            .unwrap_or_default();
        assert!(err.contains("unknown field `bogus`"), "{err}");
        assert!(ndjson(b"{\"value\":1,\"key\":5}").is_err());
        assert!(ndjson(b"{\"value\":1,\"id\":\"\"}").is_err());
    }

    #[test]
    fn json_takes_an_object_or_an_array() {
        assert_eq!(json(b"{\"value\":\"s\"}").map(|e| e.len()), Ok(1));
        assert_eq!(
            json(b" [{\"value\":1},{\"value\":2}]").map(|e| e.len()),
            Ok(2)
        );
        let err = json(b"[{\"value\":1},{\"nope\":2}]")
            .err()
            .unwrap_or_default();
        assert!(err.starts_with("element 2:"), "{err}");
    }

    #[test]
    fn content_types() {
        assert_eq!(
            Format::from_content_type("application/x-ndjson; charset=utf-8"),
            Some(Format::Ndjson)
        );
        assert_eq!(
            Format::from_content_type("Application/JSON"),
            Some(Format::Json)
        );
        assert_eq!(Format::from_content_type("text/plain"), None);
    }
}
