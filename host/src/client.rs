//! A small HTTP/1.1 client for procd's own APIs, used by the CLI, `procd bench` and the tests.
//!
//! It keeps one connection open and reconnects when the server closed it. Only `http://host:port` URLs
//! are supported: procd listens on plain HTTP (put TLS in front of it).

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{HeaderMap, Method, Request};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// A request could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The URL is not `http://host:port[/]`.
    #[error("invalid URL {0:?}: expected http://HOST:PORT")]
    InvalidUrl(String),
    /// The server could not be reached.
    #[error("cannot reach procd at {addr}: {cause} (is `procd serve` running there?)")]
    Connect { addr: String, cause: std::io::Error },
    /// The exchange failed mid-way.
    #[error("request to {addr} failed: {cause}")]
    Http { addr: String, cause: hyper::Error },
}

/// A response, fully read.
#[derive(Debug, Clone)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Headers.
    pub headers: HeaderMap,
    /// Body.
    pub body: Bytes,
}

impl Response {
    /// Whether the status is 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The body as JSON.
    pub fn json(&self) -> Result<serde_json::Value, serde_json::Error> {
        serde_json::from_slice(&self.body)
    }

    /// A one-line description of an error response: `HTTP 404 unknown_topic: detail`.
    pub fn error_line(&self) -> String {
        match self.json() {
            Ok(v) if v.get("error").is_some() => format!(
                "HTTP {} {}: {}",
                self.status,
                v["error"].as_str().unwrap_or("error"),
                v["detail"].as_str().unwrap_or("")
            ),
            _ => format!(
                "HTTP {}: {}",
                self.status,
                String::from_utf8_lossy(&self.body).trim()
            ),
        }
    }

    /// A header as a string.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// A client bound to one server address.
pub struct Client {
    addr: String,
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl Client {
    /// A client for `url` (`http://host:port`, a trailing slash allowed). Connects lazily.
    pub fn new(url: &str) -> Result<Self, ClientError> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| ClientError::InvalidUrl(url.to_string()))?;
        let addr = rest.trim_end_matches('/');
        if addr.is_empty() || addr.contains('/') || !addr.contains(':') {
            return Err(ClientError::InvalidUrl(url.to_string()));
        }
        Ok(Self {
            addr: addr.to_string(),
            sender: None,
        })
    }

    /// The `host:port` this client talks to.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    async fn connect(&mut self) -> Result<&mut SendRequest<Full<Bytes>>, ClientError> {
        if self.sender.as_ref().is_none_or(|s| s.is_closed()) {
            let stream =
                TcpStream::connect(&self.addr)
                    .await
                    .map_err(|cause| ClientError::Connect {
                        addr: self.addr.clone(),
                        cause,
                    })?;
            let _ = stream.set_nodelay(true);
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|cause| ClientError::Http {
                    addr: self.addr.clone(),
                    cause,
                })?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            self.sender = Some(sender);
        }
        match self.sender.as_mut() {
            Some(sender) => Ok(sender),
            None => unreachable!("sender was set just above"),
        }
    }

    /// Sends a request and reads the whole response.
    pub async fn request(
        &mut self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Result<Response, ClientError> {
        let addr = self.addr.clone();
        let http_err = |cause| ClientError::Http {
            addr: addr.clone(),
            cause,
        };
        let mut builder = Request::builder()
            .method(method)
            .uri(path)
            .header("host", self.addr.as_str());
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let request = match builder.body(Full::new(body.into())) {
            Ok(r) => r,
            Err(e) => return Err(ClientError::InvalidUrl(format!("{path}: {e}"))),
        };
        let sender = self.connect().await?;
        sender.ready().await.map_err(http_err)?;
        let response = sender.send_request(request).await.map_err(http_err)?;
        let (parts, body) = response.into_parts();
        let body = body.collect().await.map_err(http_err)?.to_bytes();
        Ok(Response {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
        })
    }

    /// `GET path`.
    pub async fn get(&mut self, path: &str) -> Result<Response, ClientError> {
        self.request(Method::GET, path, &[], Bytes::new()).await
    }

    /// `POST path` with a JSON body.
    pub async fn post_json(
        &mut self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<Response, ClientError> {
        let bytes = serde_json::to_vec(body).unwrap_or_default();
        self.request(
            Method::POST,
            path,
            &[("content-type", "application/json")],
            bytes,
        )
        .await
    }

    /// `POST path` with an NDJSON body.
    pub async fn post_ndjson(
        &mut self,
        path: &str,
        body: impl Into<Bytes>,
    ) -> Result<Response, ClientError> {
        self.request(
            Method::POST,
            path,
            &[("content-type", "application/x-ndjson")],
            body,
        )
        .await
    }

    /// `DELETE path`.
    pub async fn delete(&mut self, path: &str) -> Result<Response, ClientError> {
        self.request(Method::DELETE, path, &[], Bytes::new()).await
    }
}
