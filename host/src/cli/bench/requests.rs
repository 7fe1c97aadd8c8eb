//! The requests of the load benchmarks (`surge`, `fairness`): bodies in which every event is unique and
//! can be recognised when read back, and a keep-alive connection that counts how often it had to
//! connect.
//!
//! Event `s` (a sequence number, `request × batch + index`) is the NDJSON line
//! `{"key":"k<s>","value":"e<s>-<padding>"}` with `s` in [`SEQ_DIGITS`] fixed-width digits, so every
//! body of a run has the same length (admission charges `Content-Length`) and a body is built by
//! copying a template and writing the digits: no allocation per event, no formatting. Events carry no
//! `id`: ingest would dedup by it, and the check must see a duplicate, not have it hidden.

use std::time::Duration;

use anyhow::bail;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{CONTENT_TYPE, HOST};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::util::event_value;

/// Digits of an event's sequence number in its key and value.
const SEQ_DIGITS: usize = 12;
/// The sequence numbers that fit.
const MAX_SEQ: u64 = 10u64.pow(SEQ_DIGITS as u32) - 1;
/// Where a value starts in a read-back line, up to the sequence number's first digit.
const VALUE_MARK: &str = "\"value\":\"e";
/// A request not answered within this is counted as failed; bounds a run when the server hangs.
pub(super) const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Builds request bodies of `batch` unique events.
pub(super) struct Bodies {
    template: Vec<u8>,
    /// Where each line's two digit fields start.
    digits: Vec<(usize, usize)>,
    batch: usize,
}

impl Bodies {
    /// Bodies of `batch` events whose values are JSON strings of `value_bytes` bytes (quotes included).
    pub fn new(batch: usize, value_bytes: usize) -> anyhow::Result<Self> {
        // `"e` + digits + `-` + at least one padding character + `"`.
        if value_bytes < SEQ_DIGITS + 5 {
            bail!(
                "--value-bytes must be at least {} (the event's number is part of its value); got {value_bytes}",
                SEQ_DIGITS + 5
            );
        }
        let zeros = "0".repeat(SEQ_DIGITS);
        let mut template = Vec::new();
        let mut digits = Vec::with_capacity(batch);
        for i in 0..batch {
            // Padding differs between the lines of a body, as real values would, from the same
            // generator as the other benchmarks.
            let padding = event_value(i, value_bytes - SEQ_DIGITS - 2);
            let padding = padding.trim_matches('"');
            let start = template.len();
            template.extend_from_slice(b"{\"key\":\"k");
            let key_at = template.len();
            template.extend_from_slice(zeros.as_bytes());
            template.extend_from_slice(b"\",\"value\":\"e");
            let value_at = template.len();
            template.extend_from_slice(zeros.as_bytes());
            template.push(b'-');
            template.extend_from_slice(padding.as_bytes());
            template.extend_from_slice(b"\"}\n");
            debug_assert!(template.len() > start);
            digits.push((key_at, value_at));
        }
        Ok(Self {
            template,
            digits,
            batch,
        })
    }

    /// Bytes of every body.
    pub fn len(&self) -> usize {
        self.template.len()
    }

    /// Events per body.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// The body of request `request`: events `request × batch ..` of it.
    pub fn body(&self, request: u64) -> Bytes {
        let mut body = self.template.clone();
        let first = request.saturating_mul(self.batch as u64);
        for (i, &(key_at, value_at)) in self.digits.iter().enumerate() {
            let seq = (first + i as u64).min(MAX_SEQ);
            write_digits(&mut body[key_at..key_at + SEQ_DIGITS], seq);
            write_digits(&mut body[value_at..value_at + SEQ_DIGITS], seq);
        }
        Bytes::from(body)
    }

    /// Whether `requests` requests number their events within [`SEQ_DIGITS`] digits.
    pub fn fits(&self, requests: u64) -> bool {
        requests.saturating_mul(self.batch as u64) <= MAX_SEQ
    }
}

/// `n` as fixed-width decimal digits filling `out`.
fn write_digits(out: &mut [u8], mut n: u64) {
    for d in out.iter_mut().rev() {
        *d = b'0' + (n % 10) as u8;
        n /= 10;
    }
}

/// The sequence number of the event on one line of the read API, if it is one of ours.
pub(super) fn seq_of_line(line: &str) -> Option<u64> {
    let at = line.find(VALUE_MARK)? + VALUE_MARK.len();
    let digits = line.get(at..at + SEQ_DIGITS)?;
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// `POST path` of an NDJSON `body`, as `tenant` when given.
pub(super) fn append_request(
    path: &str,
    host: &str,
    tenant: Option<&str>,
    body: Bytes,
) -> Result<Request<Full<Bytes>>, hyper::http::Error> {
    let mut builder = Request::builder()
        .method(Method::POST)
        .uri(path)
        .header(HOST, host)
        .header(CONTENT_TYPE, "application/x-ndjson");
    if let Some(tenant) = tenant {
        builder = builder.header("procd-tenant", tenant);
    }
    builder.body(Full::new(body))
}

/// One keep-alive HTTP/1.1 connection that reconnects when the server closed it, counting connects.
pub(super) struct Conn {
    addr: String,
    sender: Option<SendRequest<Full<Bytes>>>,
    /// TCP connections opened so far.
    pub connects: u64,
}

/// What a request got.
pub(super) enum Sent {
    /// A response: its status and body.
    Answered(u16, Bytes),
    /// The exchange failed after the request may have reached the server: its outcome is unknown.
    Failed(String),
}

impl Conn {
    /// A connection to `addr` (`host:port`), opened on first use.
    pub fn new(addr: &str) -> Self {
        Self {
            addr: addr.to_string(),
            sender: None,
            connects: 0,
        }
    }

    async fn ready(&mut self) -> Result<&mut SendRequest<Full<Bytes>>, String> {
        if self.sender.as_ref().is_none_or(|s| s.is_closed()) {
            self.sender = None;
            let stream = TcpStream::connect(&self.addr)
                .await
                .map_err(|e| format!("cannot connect to {}: {e}", self.addr))?;
            let _ = stream.set_nodelay(true);
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| format!("handshake with {}: {e}", self.addr))?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            self.connects += 1;
            self.sender = Some(sender);
        }
        match self.sender.as_mut() {
            Some(sender) => Ok(sender),
            None => unreachable!("the sender was set just above"),
        }
    }

    /// Sends `request` and reads the whole answer. A request the connection did not send (the server
    /// had closed it, e.g. after refusing a body it did not read) is sent again on a new connection,
    /// once: that retry cannot duplicate anything.
    pub async fn send(&mut self, request: Request<Full<Bytes>>) -> Sent {
        match tokio::time::timeout(REQUEST_TIMEOUT, self.send_inner(request)).await {
            Ok(sent) => sent,
            Err(_) => {
                self.sender = None;
                Sent::Failed(format!("no answer within {} s", REQUEST_TIMEOUT.as_secs()))
            }
        }
    }

    async fn send_inner(&mut self, request: Request<Full<Bytes>>) -> Sent {
        let mut request = Some(request);
        for _ in 0..2 {
            let Some(req) = request.take() else { break };
            let sender = match self.ready().await {
                Ok(s) => s,
                Err(e) => return Sent::Failed(e),
            };
            if sender.ready().await.is_err() {
                // Nothing was sent on it: a fresh connection may carry this request.
                self.sender = None;
                request = Some(req);
                continue;
            }
            match sender.try_send_request(req).await {
                Ok(response) => {
                    let (parts, body) = response.into_parts();
                    return match body.collect().await {
                        Ok(body) => Sent::Answered(parts.status.as_u16(), body.to_bytes()),
                        Err(e) => {
                            self.sender = None;
                            Sent::Failed(format!("reading the answer: {e}"))
                        }
                    };
                }
                Err(mut e) => {
                    self.sender = None;
                    request = e.take_message();
                    if request.is_none() {
                        return Sent::Failed(e.into_error().to_string());
                    }
                }
            }
        }
        Sent::Failed("the connection closed twice before the request could be sent".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_event_is_unique_and_recognised_in_a_body_of_fixed_length() -> Result<(), String> {
        let bodies = Bodies::new(3, 40).map_err(|e| e.to_string())?;
        let a = bodies.body(0);
        let b = bodies.body(41);
        assert_eq!(a.len(), bodies.len());
        assert_eq!(b.len(), bodies.len());
        let events = crate::ingest::parse::ndjson(&b)?;
        assert_eq!(events.len(), 3);
        let text = std::str::from_utf8(&b).map_err(|e| e.to_string())?;
        let seqs: Vec<Option<u64>> = text.lines().map(seq_of_line).collect();
        assert_eq!(seqs, [Some(123), Some(124), Some(125)]);
        for event in &events {
            assert!(matches!(event.value, crate::log::PayloadRef::Json(v) if v.len() == 40));
        }
        assert!(Bodies::new(1, 10).is_err());
        Ok(())
    }

    #[test]
    fn a_read_back_line_gives_its_number() {
        let line = r#"{"partition":3,"offset":7,"timestamp_ms":1,"key":"k000000000042","value":"e000000000042-xyz","headers":{}}"#;
        assert_eq!(seq_of_line(line), Some(42));
        assert_eq!(seq_of_line(r#"{"value":"other"}"#), None);
        assert_eq!(seq_of_line(r#"{"value":"e12"}"#), None);
    }
}
