//! The HTTP and WebSocket core of [`SpritesClient`]: URLs, auth, timeouts, retries, error mapping.

use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use bytes::Bytes;
use http::Method;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, client::IntoClientRequest};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use url::Url;

use super::error::{Error, Failure, classify};
use super::redact::{Token, url_for_log};
use crate::timers::Timers;

pub(crate) type WsStream<S = TcpStream> = WebSocketStream<MaybeTlsStream<S>>;

/// Opens the TCP connection under a Sprites WebSocket, on the runtime that
/// will drive it: tokio's ([`TokioDial`]), or the relay's own event loop,
/// whose sessions hold proxy streams (`relay::upstream`).
pub trait Dial: Sync {
    type Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static;

    /// Connects to `host` (a name or an IP address, without brackets) and
    /// `port`, with `TCP_NODELAY`.
    fn dial(&self, host: &str, port: u16) -> impl Future<Output = std::io::Result<Self::Stream>>;

    /// Runs a short task over a stream of this kind, detached (the closing
    /// handshake of a dropped proxy stream); does nothing where none can run.
    fn spawn_detached(task: futures::future::BoxFuture<'static, ()>);
}

/// Connections on the tokio runtime of the caller.
pub struct TokioDial;

impl Dial for TokioDial {
    type Stream = TcpStream;

    async fn dial(&self, host: &str, port: u16) -> std::io::Result<TcpStream> {
        let tcp = TcpStream::connect((host, port)).await?;
        tcp.set_nodelay(true)?;
        Ok(tcp)
    }

    fn spawn_detached(task: futures::future::BoxFuture<'static, ()>) {
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(task);
        }
    }
}

/// How failed calls are repeated. Only idempotent calls (GET, PUT, DELETE, WebSocket handshakes,
/// restore) are retried on 5xx, timeouts and broken connections; create is retried only on errors
/// that prove nothing was created (429, refused connection).
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub max_attempts: usize,
    pub min_delay: Duration,
    pub max_delay: Duration,
    /// A server's `Retry-After` is honoured up to this long.
    pub max_retry_after: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 6,
            min_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(5),
            max_retry_after: Duration::from_secs(60),
        }
    }
}

impl RetryPolicy {
    fn backoff(&self) -> ExponentialBuilder {
        ExponentialBuilder::default()
            .with_min_delay(self.min_delay)
            .with_max_delay(self.max_delay)
            .with_max_times(self.max_attempts.saturating_sub(1))
            .with_jitter()
    }
}

/// Timeouts per kind of call.
#[derive(Debug, Clone)]
pub struct Timeouts {
    /// REST and filesystem calls.
    pub request: Duration,
    /// WebSocket handshakes (exec, proxy).
    pub connect: Duration,
    /// Checkpoint create and restore, which stream until done.
    pub checkpoint: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            request: Duration::from_secs(30),
            connect: Duration::from_secs(30),
            checkpoint: Duration::from_secs(300),
        }
    }
}

/// Whether a call may be sent again after a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Idempotency {
    Idempotent,
    /// Repeat only when the error proves the server did nothing.
    OnlyIfNothingDone,
}

impl Idempotency {
    fn retry_on(self, e: &Error) -> bool {
        match self {
            Idempotency::Idempotent => e.is_transient(),
            Idempotency::OnlyIfNothingDone => e.proves_nothing_done(),
        }
    }
}

pub(crate) enum Body {
    Empty,
    Json(Vec<u8>),
    Octets(Bytes),
}

pub(crate) struct Call {
    pub method: Method,
    pub url: Url,
    pub body: Body,
    pub timeout: Duration,
    pub idempotency: Idempotency,
    /// Set for create, where a conflict means "already exists".
    pub create_name: Option<String>,
}

/// Async client for the Sprites.dev API (or `sprite-operator sim`). Cheap to clone.
#[derive(Clone, Debug)]
pub struct SpritesClient {
    pub(crate) inner: Arc<Inner>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub base: Url,
    pub token: Token,
    pub http: reqwest::Client,
    pub retry: RetryPolicy,
    pub timeouts: Timeouts,
    /// Where the client's own timers go: retry sleeps, connect and reply
    /// timeouts (`crate::timers`; reqwest's are its own).
    pub timers: Timers,
    /// Spreads calls out (the controller sets one; the relay does not).
    pub rate: Option<Arc<super::rate::RateLimit>>,
}

impl SpritesClient {
    /// `base_url` such as `https://api.sprites.dev`; a trailing `/` is ignored.
    pub fn new(base_url: &str, token: impl Into<String>) -> Result<Self, Error> {
        let base = Url::parse(base_url.trim_end_matches('/'))
            .map_err(|e| Error::InvalidRequest(format!("bad base URL: {e}")))?;
        if !matches!(base.scheme(), "http" | "https") || base.cannot_be_a_base() {
            return Err(Error::InvalidRequest(
                "base URL must be http(s)://host[:port][/prefix]".into(),
            ));
        }
        let token = Token::new(token);
        token
            .header_value()
            .map_err(|_| Error::InvalidRequest("token is not a valid header value".into()))?;
        let http = reqwest::Client::builder()
            .user_agent(concat!("sprite-operator/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Error::InvalidRequest(format!("http client: {e}")))?;
        let inner = Inner {
            base,
            token,
            http,
            retry: RetryPolicy::default(),
            timeouts: Timeouts::default(),
            timers: Timers::current(),
            rate: None,
        };
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    pub fn with_retry_policy(self, retry: RetryPolicy) -> Self {
        self.rebuild(|i| i.retry = retry)
    }

    pub fn with_timeouts(self, timeouts: Timeouts) -> Self {
        self.rebuild(|i| i.timeouts = timeouts)
    }

    /// For a client polled on a runtime without a time driver (the relay's
    /// event loop): its timers go to `timers` instead.
    pub fn with_timers(self, timers: Timers) -> Self {
        self.rebuild(|i| i.timers = timers)
    }

    /// At most `per_second` calls a second on average, `burst` at once.
    pub fn with_rate_limit(self, per_second: u32, burst: u32) -> Self {
        let rate = Arc::new(super::rate::RateLimit::new(per_second, burst));
        self.rebuild(|i| i.rate = Some(rate))
    }

    /// Waits for the rate limit's token, if there is a limit.
    async fn paced(&self) {
        if let Some(rate) = &self.inner.rate {
            let wait = rate.take(std::time::Instant::now());
            if !wait.is_zero() {
                self.inner.timers.sleep(wait).await;
            }
        }
    }

    pub fn base_url(&self) -> &Url {
        &self.inner.base
    }

    fn rebuild(self, change: impl FnOnce(&mut Inner)) -> Self {
        let mut inner = Inner {
            base: self.inner.base.clone(),
            token: self.inner.token.clone(),
            http: self.inner.http.clone(),
            retry: self.inner.retry.clone(),
            timeouts: self.inner.timeouts.clone(),
            timers: self.inner.timers.clone(),
            rate: self.inner.rate.clone(),
        };
        change(&mut inner);
        Self {
            inner: Arc::new(inner),
        }
    }

    /// `base/v1/<segments…>`, each segment percent-escaped.
    pub(crate) fn url(&self, segments: &[&str]) -> Url {
        endpoint(&self.inner.base, segments)
    }

    /// Sends a call, retrying per its idempotency, and returns the whole success body.
    pub(crate) async fn call(&self, call: Call) -> Result<Bytes, Error> {
        let attempt = || self.send_once(&call);
        let policy = &self.inner.retry;
        let timers = self.inner.timers.clone();
        attempt
            .retry(policy.backoff())
            .sleep(move |d| timers.sleep(d))
            .when(|e| call.idempotency.retry_on(e))
            .adjust(|e, next| next.map(|d| e.retry_after().map_or(d, |ra| ra.min(policy.max_retry_after))))
            .notify(|e, delay| {
                tracing::warn!(
                    method = %call.method,
                    url = %url_for_log(&call.url),
                    error = %e,
                    delay_ms = delay.as_millis() as u64,
                    "retrying Sprites API call"
                );
            })
            .await
    }

    async fn send_once(&self, call: &Call) -> Result<Bytes, Error> {
        self.paced().await;
        let method = method_name(&call.method);
        let log_url = url_for_log(&call.url);
        let auth = self.auth_header()?;
        let mut req = self
            .inner
            .http
            .request(call.method.clone(), call.url.clone())
            .header(http::header::AUTHORIZATION, auth)
            .timeout(call.timeout);
        req = match &call.body {
            Body::Empty => req,
            Body::Json(b) => req
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(b.clone()),
            Body::Octets(b) => req
                .header(http::header::CONTENT_TYPE, "application/octet-stream")
                .body(b.clone()),
        };
        let transport = |e: reqwest::Error| transport_error(e, method, &log_url, call.timeout);
        let response = req.send().await.map_err(transport)?;
        let status = response.status();
        let retry_after_header = header_string(response.headers(), http::header::RETRY_AFTER);
        let body = response.bytes().await.map_err(transport)?;
        tracing::debug!(method, url = %log_url, status = status.as_u16(), bytes = body.len(), "Sprites API call");
        if status.is_success() {
            return Ok(body);
        }
        let failure = Failure {
            status: status.as_u16(),
            method,
            url: log_url,
            retry_after_header,
            body: String::from_utf8_lossy(&body).into_owned(),
        };
        Err(classify(failure, call.create_name.as_deref()))
    }

    fn auth_header(&self) -> Result<http::HeaderValue, Error> {
        self.inner
            .token
            .header_value()
            .map_err(|_| Error::InvalidRequest("token is not a valid header value".into()))
    }

    /// Opens a WebSocket, retrying the handshake: a refused or failed handshake proves that the
    /// server started nothing, since commands start only after the upgrade.
    pub(crate) async fn ws_connect(&self, url: Url) -> Result<WsStream, Error> {
        self.ws_connect_with(url, None, &TokioDial).await
    }

    /// [`Self::ws_connect`] with tungstenite's buffer and size settings, over
    /// a connection from `dial`.
    pub(crate) async fn ws_connect_with<D: Dial>(
        &self,
        url: Url,
        config: Option<WebSocketConfig>,
        dial: &D,
    ) -> Result<WsStream<D::Stream>, Error> {
        let attempt = || self.ws_connect_once(&url, config, dial);
        let policy = &self.inner.retry;
        let timers = self.inner.timers.clone();
        attempt
            .retry(policy.backoff())
            .sleep(move |d| timers.sleep(d))
            .when(|e| e.is_transient())
            .adjust(|e, next| next.map(|d| e.retry_after().map_or(d, |ra| ra.min(policy.max_retry_after))))
            .notify(|e, delay| {
                tracing::warn!(
                    url = %url_for_log(&url),
                    error = %e,
                    delay_ms = delay.as_millis() as u64,
                    "retrying Sprites WebSocket handshake"
                );
            })
            .await
    }

    async fn ws_connect_once<D: Dial>(
        &self,
        url: &Url,
        config: Option<WebSocketConfig>,
        dial: &D,
    ) -> Result<WsStream<D::Stream>, Error> {
        self.paced().await;
        let log_url = url_for_log(url);
        let mut request = url
            .as_str()
            .into_client_request()
            .map_err(|e| Error::InvalidRequest(format!("websocket request for {log_url}: {e}")))?;
        request
            .headers_mut()
            .insert(http::header::AUTHORIZATION, self.auth_header()?);
        let limit = self.inner.timeouts.connect;
        // What tungstenite's `connect_async` does, over `dial`'s connection
        // (which disables Nagle: exec and proxy traffic is small writes that
        // wait for an answer, which Nagle's algorithm would hold back).
        let host = match url.host() {
            Some(url::Host::Domain(d)) => d.to_string(),
            Some(url::Host::Ipv4(ip)) => ip.to_string(),
            Some(url::Host::Ipv6(ip)) => ip.to_string(),
            None => return Err(Error::InvalidRequest(format!("no host in {log_url}"))),
        };
        let port = url.port_or_known_default().unwrap_or(443);
        let connect = async {
            let tcp = dial.dial(&host, port).await.map_err(tungstenite::Error::Io)?;
            tokio_tungstenite::client_async_tls_with_config(request, tcp, config, None).await
        };
        let connected = self.inner.timers.timeout(limit, connect).await;
        let Ok(result) = connected else {
            return Err(Error::Timeout {
                method: "GET",
                url: log_url,
                after: limit,
            });
        };
        match result {
            Ok((stream, _response)) => {
                tracing::debug!(url = %log_url, "Sprites WebSocket open");
                Ok(stream)
            }
            Err(e) => Err(ws_handshake_error(e, log_url)),
        }
    }
}

/// `ws`/`wss` twin of an `http`/`https` URL.
pub(crate) fn to_ws_url(mut url: Url) -> Url {
    let scheme = if url.scheme() == "https" { "wss" } else { "ws" };
    // Switching between these special schemes always succeeds.
    let _ = url.set_scheme(scheme);
    url
}

pub(crate) fn endpoint(base: &Url, segments: &[&str]) -> Url {
    let mut url = base.clone();
    if let Ok(mut path) = url.path_segments_mut() {
        path.pop_if_empty().push("v1").extend(segments);
    }
    url
}

fn method_name(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::PATCH => "PATCH",
        _ => "OTHER",
    }
}

fn header_string(headers: &http::HeaderMap, name: http::HeaderName) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

fn transport_error(e: reqwest::Error, method: &'static str, url: &str, limit: Duration) -> Error {
    if e.is_timeout() {
        return Error::Timeout {
            method,
            url: url.to_string(),
            after: limit,
        };
    }
    let connect = e.is_connect();
    // reqwest's own Display would print the full URL, query included.
    let message = error_chain(&e.without_url());
    Error::Transport {
        method,
        url: url.to_string(),
        message,
        connect,
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

fn ws_handshake_error(e: tungstenite::Error, url: String) -> Error {
    match e {
        tungstenite::Error::Http(response) => {
            let body = response
                .body()
                .as_deref()
                .map(String::from_utf8_lossy)
                .unwrap_or_default();
            let failure = Failure {
                status: response.status().as_u16(),
                method: "GET",
                url,
                retry_after_header: header_string(response.headers(), http::header::RETRY_AFTER),
                body: body.into_owned(),
            };
            classify(failure, None)
        }
        tungstenite::Error::Io(io) => Error::Transport {
            method: "GET",
            connect: io.kind() == std::io::ErrorKind::ConnectionRefused,
            message: io.to_string(),
            url,
        },
        tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed => Error::Transport {
            method: "GET",
            url,
            message: "connection closed".into(),
            connect: false,
        },
        other => Error::Stream {
            url,
            message: other.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_escapes_segments_and_keeps_prefix() {
        let base = Url::parse("http://h:1/api").expect("url");
        assert_eq!(
            endpoint(&base, &["sprites", "a/b"]).as_str(),
            "http://h:1/api/v1/sprites/a%2Fb"
        );
        let base = Url::parse("https://api.sprites.dev").expect("url");
        assert_eq!(
            endpoint(&base, &["sprites"]).as_str(),
            "https://api.sprites.dev/v1/sprites"
        );
    }

    #[test]
    fn ws_scheme_follows_http_scheme() {
        let u = Url::parse("https://h/v1/x").expect("url");
        assert_eq!(to_ws_url(u).scheme(), "wss");
        let u = Url::parse("http://h/v1/x").expect("url");
        assert_eq!(to_ws_url(u).scheme(), "ws");
    }

    #[test]
    fn new_rejects_bad_base_urls() {
        assert!(SpritesClient::new("ftp://x", "t").is_err());
        assert!(SpritesClient::new("not a url", "t").is_err());
        assert!(SpritesClient::new("http://x/", "t\n").is_err());
        let c = SpritesClient::new("http://x/", "t").expect("client");
        assert_eq!(c.base_url().as_str(), "http://x/");
    }

    #[test]
    fn idempotency_rules() {
        let e503 = Error::Api {
            status: 503,
            method: "POST",
            url: String::new(),
            code: String::new(),
            message: String::new(),
        };
        assert!(Idempotency::Idempotent.retry_on(&e503));
        assert!(!Idempotency::OnlyIfNothingDone.retry_on(&e503));
        let e429 = Error::RateLimited {
            method: "POST",
            url: String::new(),
            retry_after: None,
        };
        assert!(Idempotency::OnlyIfNothingDone.retry_on(&e429));
    }
}
