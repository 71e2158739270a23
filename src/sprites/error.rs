//! The client's one error type. No variant carries the token or a query string: URLs are stored
//! already passed through [`super::redact::url_for_log`].

use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// 404: the sprite (or the file, session, checkpoint) does not exist.
    #[error("not found: {method} {url}: {message}")]
    NotFound {
        method: &'static str,
        url: String,
        message: String,
    },

    /// Create answered 409, or 400 saying the name already exists.
    #[error("sprite {name:?} already exists")]
    AlreadyExists { name: String },

    /// 401 or 403: the token was refused.
    #[error("unauthorized ({status}): {method} {url}")]
    Unauthorized {
        status: u16,
        method: &'static str,
        url: String,
    },

    /// 429 after the retries were used up.
    #[error("rate limited: {method} {url} (retry after {retry_after:?})")]
    RateLimited {
        method: &'static str,
        url: String,
        retry_after: Option<Duration>,
    },

    /// Any other non-success status.
    #[error("API error {status} on {method} {url}: {code}: {message}")]
    Api {
        status: u16,
        method: &'static str,
        url: String,
        code: String,
        message: String,
    },

    /// The connection failed or broke before an answer (DNS, refused, reset, TLS).
    #[error("transport error on {method} {url}: {message}")]
    Transport {
        method: &'static str,
        url: String,
        message: String,
        connect: bool,
    },

    /// The call's own deadline passed.
    #[error("timed out after {after:?}: {method} {url}")]
    Timeout {
        method: &'static str,
        url: String,
        after: Duration,
    },

    /// The answer was not what the API documents.
    #[error("unexpected response from {url}: {message}")]
    Decode { url: String, message: String },

    /// A WebSocket ended or misbehaved mid-stream (e.g. closed before the exit frame).
    #[error("websocket {url}: {message}")]
    Stream { url: String, message: String },

    /// A checkpoint or restore stream reported an error line.
    #[error("operation failed on the server: {message}")]
    Remote { message: String },

    /// The request could not be built (bad name, bad header value, bad base URL).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
}

impl Error {
    /// Whether an idempotent call may be repeated after this error.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Api { status, .. } => *status >= 500,
            Error::RateLimited { .. } | Error::Transport { .. } | Error::Timeout { .. } => true,
            _ => false,
        }
    }

    /// Whether the error proves the server did not act on the request, so that even a
    /// non-idempotent call (create) may be repeated: rate limiting rejects before acting, and a
    /// refused connection never carried the request.
    pub fn proves_nothing_done(&self) -> bool {
        matches!(
            self,
            Error::RateLimited { .. } | Error::Transport { connect: true, .. }
        )
    }

    /// How long the server asked us to wait, if it did.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Error::RateLimited { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// A short stable label for metrics (`outcome` of a call).
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::NotFound { .. } => "not_found",
            Error::AlreadyExists { .. } => "already_exists",
            Error::Unauthorized { .. } => "unauthorized",
            Error::RateLimited { .. } => "rate_limited",
            Error::Api { .. } => "api_error",
            Error::Transport { .. } => "transport",
            Error::Timeout { .. } => "timeout",
            Error::Decode { .. } => "decode",
            Error::Stream { .. } => "stream",
            Error::Remote { .. } => "remote",
            Error::InvalidRequest(_) => "invalid_request",
        }
    }
}

/// The parts of an error body the API documents: `{"error": code, "message": text, ...}`.
#[derive(Debug, Default, serde::Deserialize)]
pub(crate) struct ErrorBody {
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    pub retry_after_seconds: Option<u64>,
}

/// Everything a failed HTTP answer tells us, gathered before classification.
#[derive(Debug, Clone)]
pub(crate) struct Failure {
    pub status: u16,
    pub method: &'static str,
    pub url: String,
    pub retry_after_header: Option<String>,
    pub body: String,
}

/// Maps a non-success answer to an error. `create_name` is set for the create call, where 409
/// and the documented 400 "name already exists" mean [`Error::AlreadyExists`].
pub(crate) fn classify(failure: Failure, create_name: Option<&str>) -> Error {
    let parsed: ErrorBody = serde_json::from_str(&failure.body).unwrap_or_default();
    let code = parsed.error.clone().unwrap_or_default();
    let message = parsed
        .message
        .clone()
        .unwrap_or_else(|| truncate(&failure.body, 300));
    let Failure {
        status, method, url, ..
    } = failure;
    if let Some(name) = create_name {
        let says_exists = format!("{code} {message}")
            .to_ascii_lowercase()
            .contains("already exist");
        if status == 409 || (status == 400 && says_exists) {
            return Error::AlreadyExists {
                name: name.to_string(),
            };
        }
    }
    match status {
        401 | 403 => Error::Unauthorized { status, method, url },
        404 => Error::NotFound { method, url, message },
        429 => {
            let retry_after = failure
                .retry_after_header
                .as_deref()
                .and_then(parse_retry_after)
                .or(parsed.retry_after_seconds.map(Duration::from_secs));
            Error::RateLimited {
                method,
                url,
                retry_after,
            }
        }
        _ => Error::Api {
            status,
            method,
            url,
            code,
            message,
        },
    }
}

/// `Retry-After` in its integer-seconds form (the only form the API sends).
pub(crate) fn parse_retry_after(value: &str) -> Option<Duration> {
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(status: u16, body: &str, retry_after: Option<&str>) -> Failure {
        Failure {
            status,
            method: "POST",
            url: "http://h/v1/sprites".into(),
            retry_after_header: retry_after.map(String::from),
            body: body.into(),
        }
    }

    #[test]
    fn create_conflicts_are_already_exists() {
        let e = classify(failure(409, r#"{"error":"conflict"}"#, None), Some("a"));
        assert!(matches!(e, Error::AlreadyExists { .. }));
        let body = r#"{"error":"invalid_request","message":"name already exists"}"#;
        assert!(matches!(
            classify(failure(400, body, None), Some("a")),
            Error::AlreadyExists { .. }
        ));
        let other = r#"{"error":"invalid_request","message":"bad ram"}"#;
        assert!(matches!(
            classify(failure(400, other, None), Some("a")),
            Error::Api { status: 400, .. }
        ));
        assert!(matches!(
            classify(failure(409, "", None), None),
            Error::Api { status: 409, .. }
        ));
    }

    #[test]
    fn statuses_map_to_kinds() {
        assert!(matches!(
            classify(failure(401, "", None), None),
            Error::Unauthorized { .. }
        ));
        assert!(matches!(
            classify(failure(404, "{}", None), None),
            Error::NotFound { .. }
        ));
        let e = classify(failure(503, "oops", None), None);
        assert!(e.is_transient() && !e.proves_nothing_done());
        assert!(!classify(failure(400, "", None), None).is_transient());
    }

    #[test]
    fn retry_after_prefers_the_header() {
        let e = classify(failure(429, r#"{"retry_after_seconds":9}"#, Some("2")), None);
        assert_eq!(e.retry_after(), Some(Duration::from_secs(2)));
        let e = classify(failure(429, r#"{"retry_after_seconds":9}"#, None), None);
        assert_eq!(e.retry_after(), Some(Duration::from_secs(9)));
        assert!(e.proves_nothing_done());
        assert_eq!(parse_retry_after("soon"), None);
    }

    #[test]
    fn long_bodies_are_cut_on_char_boundaries() {
        let long = "é".repeat(400);
        assert!(truncate(&long, 301).chars().count() <= 151);
    }
}
