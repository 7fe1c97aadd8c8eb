//! What the data-plane and control-plane listeners share: the JSON error body, body reading under a size
//! and time limit, and the connection loop (bounded connections, header timeout, graceful shutdown).

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Response type of every route.
pub type HttpResponse = Response<Full<Bytes>>;

/// An error answered as `{"error": code, "detail": ...}` with a status (and `Retry-After` when set).
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable, machine-readable code (`invalid_event`, `unknown_topic`, ...).
    pub code: &'static str,
    /// What happened and how to fix it, for people.
    pub detail: String,
    /// Seconds after which a retry may succeed (`429`/`503`).
    pub retry_after_secs: Option<u64>,
}

impl ApiError {
    /// An error with no retry hint.
    pub fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Self {
        Self {
            status,
            code,
            detail: detail.into(),
            retry_after_secs: None,
        }
    }

    /// `400 Bad Request`.
    pub fn bad_request(code: &'static str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, detail)
    }

    /// `404 Not Found`.
    pub fn not_found(code: &'static str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, detail)
    }

    /// A server-side failure: logged in full here, answered with a generic body.
    pub fn internal(context: &str, error: &dyn std::fmt::Display) -> Self {
        tracing::error!(%error, "{context}");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("{context}; see the server log"),
        )
    }

    /// Adds a `Retry-After` hint.
    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after_secs = Some(secs);
        self
    }

    /// The JSON error response.
    pub fn into_response(self) -> HttpResponse {
        #[derive(Serialize)]
        struct Body<'a> {
            error: &'a str,
            detail: &'a str,
        }
        let mut resp = json(
            self.status,
            &Body {
                error: self.code,
                detail: &self.detail,
            },
        );
        if let Some(secs) = self.retry_after_secs {
            resp.headers_mut().insert(RETRY_AFTER, secs.into());
        }
        resp
    }
}

/// A JSON response.
pub fn json<T: Serialize + ?Sized>(status: StatusCode, value: &T) -> HttpResponse {
    json_body(
        status,
        serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec()),
    )
}

/// A response with a JSON body already written.
pub fn json_body(status: StatusCode, body: Vec<u8>) -> HttpResponse {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

/// The route was not found.
pub fn no_route(method: &hyper::Method, path: &str) -> ApiError {
    ApiError::not_found("not_found", format!("no route for {method} {path}"))
}

/// How long a request body may take: in all, and between two of its pieces.
#[derive(Debug, Clone, Copy)]
pub struct BodyTimeouts {
    /// The whole body.
    pub total: Duration,
    /// The longest pause between two pieces.
    pub idle: Duration,
}

/// Reads a whole request body, refusing it with `413` past `max_bytes` (before reading anything when
/// `Content-Length` already says so) and with `408` if it does not arrive within `timeouts.total` or
/// pauses longer than `timeouts.idle`. hyper has no body timeout of its own.
pub async fn read_body(
    req: Request<Incoming>,
    max_bytes: usize,
    timeouts: BodyTimeouts,
) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!(
                "request body is larger than the {max_bytes}-byte limit (ingest.max_body_bytes); split it"
            ),
        )
    };
    if declared_length(&req).is_some_and(|len| len > max_bytes as u64) {
        return Err(too_large());
    }
    let mut body = req.into_body();
    let mut pieces: Vec<Bytes> = Vec::new();
    let mut len = 0usize;
    let deadline = tokio::time::Instant::now() + timeouts.total;
    loop {
        let wait = timeouts
            .idle
            .min(deadline.saturating_duration_since(tokio::time::Instant::now()));
        let frame = match tokio::time::timeout(wait, body.frame()).await {
            Err(_) => {
                let (what, limit, key) = if tokio::time::Instant::now() >= deadline {
                    (
                        "did not arrive within",
                        timeouts.total,
                        "ingest.body_timeout_ms",
                    )
                } else {
                    (
                        "paused for more than",
                        timeouts.idle,
                        "ingest.body_idle_timeout_ms",
                    )
                };
                return Err(ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "body_timeout",
                    format!("request body {what} {} ms ({key})", limit.as_millis()),
                ));
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                return Err(ApiError::bad_request(
                    "bad_body",
                    format!("request body could not be read: {e}"),
                ));
            }
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        len += data.len();
        if len > max_bytes {
            return Err(too_large());
        }
        pieces.push(data);
    }
    // The body usually arrives in one piece: kept as is, without a copy.
    Ok(match pieces.len() {
        0 => Bytes::new(),
        1 => pieces.swap_remove(0),
        _ => Bytes::from(pieces.concat()),
    })
}

/// Refuses a query parameter given twice unless it is `repeatable`: which one should win is a guess.
pub fn no_repeated_params<'a>(
    names: impl IntoIterator<Item = &'a str>,
    repeatable: &[&str],
) -> Result<(), ApiError> {
    let mut seen: Vec<&str> = Vec::new();
    for name in names {
        if !repeatable.contains(&name) && seen.contains(&name) {
            return Err(ApiError::bad_request(
                "invalid_query",
                format!("parameter {name:?} is given twice"),
            ));
        }
        seen.push(name);
    }
    Ok(())
}

/// The request's declared body length (`Content-Length`), if it has a valid one.
pub fn declared_length<B>(req: &Request<B>) -> Option<u64> {
    req.headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
}

/// Reads and drops the body of a request that was refused before its body was read, if its declared
/// length is at most `max_bytes` and it arrives within `timeout`. hyper closes a connection whose request
/// body was left unread; a client still writing that body may then see the connection reset instead
/// of the refusal and its `Retry-After`, and must reconnect. Draining a small body avoids both.
pub async fn discard_body(req: Request<Incoming>, max_bytes: u64, timeout: Duration) {
    let declared = declared_length(&req);
    // A client that asked `Expect: 100-continue` sends no body unless told to: leave it unsent.
    let expects = req.headers().contains_key(hyper::header::EXPECT);
    if expects || declared.is_none_or(|len| len > max_bytes) {
        return;
    }
    let mut body = req.into_body();
    let _ = tokio::time::timeout(timeout, async {
        while let Some(Ok(_)) = body.frame().await {}
    })
    .await;
}

/// Connection limits of one listener.
#[derive(Debug, Clone)]
pub struct ListenerLimits {
    /// Connections served at once; further ones wait in the kernel's accept backlog.
    pub max_connections: usize,
    /// Time allowed to send the request head.
    pub header_read_timeout: Duration,
    /// Header fields a request may have ([`check_head`] answers `431` above; hyper, twice above).
    pub max_headers: usize,
    /// Bytes of header fields a request may have (as `max_headers`).
    pub max_header_bytes: usize,
    /// How long an answer may wait for the client to read it before the connection is closed.
    pub write_stall_timeout: Duration,
}

/// A connection whose writes must make progress: a write (or flush) that has waited `limit` for the
/// peer to take bytes fails with `TimedOut`, and hyper closes the connection. Without it, a client that
/// stops reading its answers (a slow-reader attack, or a stuck client) holds its connection slot, and a
/// graceful shutdown, forever.
struct WriteDeadline<S> {
    inner: S,
    limit: Duration,
    /// Started when a write first found the socket full; cleared by any progress.
    stalled: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl<S> WriteDeadline<S> {
    fn new(inner: S, limit: Duration) -> Self {
        Self {
            inner,
            limit,
            stalled: None,
        }
    }

    /// Passes on what the inner write returned, unless it has been pending for `limit`.
    fn check<T>(
        &mut self,
        cx: &mut std::task::Context<'_>,
        polled: std::task::Poll<std::io::Result<T>>,
    ) -> std::task::Poll<std::io::Result<T>> {
        use std::task::Poll;
        if polled.is_ready() {
            self.stalled = None;
            return polled;
        }
        let limit = self.limit;
        let timer = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the client read nothing of its answer for {limit:?}"),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for WriteDeadline<S> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for WriteDeadline<S> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = std::pin::Pin::new(&mut this.inner).poll_write(cx, buf);
        this.check(cx, polled)
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = std::pin::Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.check(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let polled = std::pin::Pin::new(&mut this.inner).poll_flush(cx);
        this.check(cx, polled)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let polled = std::pin::Pin::new(&mut this.inner).poll_shutdown(cx);
        this.check(cx, polled)
    }
}

/// Refuses a request whose head is over the header limits (`ingest.max_headers`,
/// `ingest.max_header_bytes`) with a JSON `431`; each listener's router calls it first. hyper itself is
/// set to twice the limits ([`serve`]), so only a head far over them gets hyper's bare `431`.
pub fn check_head(
    req: &Request<Incoming>,
    limits: &crate::config::IngestConfig,
) -> Result<(), ApiError> {
    let (max_headers, max_header_bytes) = (limits.max_headers, limits.max_header_bytes);
    let headers = req.headers();
    if headers.len() > max_headers {
        return Err(ApiError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers_too_large",
            format!(
                "the request has {} header fields; the limit is {} (ingest.max_headers)",
                headers.len(),
                max_headers
            ),
        ));
    }
    // As sent: `name: value\r\n`.
    let bytes: usize = headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    if bytes > max_header_bytes {
        return Err(ApiError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers_too_large",
            format!(
                "the request's header fields take {bytes} bytes; the limit is {} \
                 (ingest.max_header_bytes)",
                max_header_bytes
            ),
        ));
    }
    Ok(())
}

/// Serves HTTP/1.1 on `listener` with `handler` until `shutdown` resolves, then stops accepting and waits
/// for in-flight requests to be answered.
pub async fn serve<H, F>(
    name: &'static str,
    listener: TcpListener,
    limits: ListenerLimits,
    handler: H,
    shutdown: impl Future<Output = ()>,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = HttpResponse> + Send + 'static,
{
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true)
        .max_headers(limits.max_headers.saturating_mul(2).max(1))
        .max_header_size(limits.max_header_bytes.saturating_mul(2));
    tokio::pin!(shutdown);
    loop {
        // Take a connection slot first, so the accept backlog absorbs the excess instead of our memory.
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => match permit { Ok(p) => p, Err(_) => break },
            () = &mut shutdown => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(listener = name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let service = hyper::service::service_fn(move |req| {
            let handler = handler.clone();
            async move { Ok::<_, Infallible>(handler(req).await) }
        });
        let stream = WriteDeadline::new(stream, limits.write_stall_timeout);
        let conn = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(listener = name, error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}
