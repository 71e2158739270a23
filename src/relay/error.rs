//! The relay's one error type. Every refusal a client can see maps to both an
//! HTTP status (answered before the upgrade to clients that authenticate with
//! a header) and a WebSocket close code (sent right after the upgrade to
//! browsers, which cannot read the status of a failed handshake). Reasons are
//! fixed strings: nothing a client sent, and never a token, is echoed back.

use http::StatusCode;

/// Close codes of the relay (4000-4999 is the private-use range; the others
/// are RFC 6455 codes). `docs/relay.md` lists them for client authors.
pub mod close {
    /// A normal close: the relay let an idle upstream go.
    pub const NORMAL: u16 = 1000;
    /// The relay is shutting down (or restarting): reconnect.
    pub const GOING_AWAY: u16 = 1001;
    /// A frame was larger than `--max-message-bytes`.
    pub const TOO_BIG: u16 = 1009;
    /// The runtime misbehaved (e.g. sent a frame over the size cap).
    pub const INTERNAL: u16 = 1011;
    /// The VM could not be reached within the reconnect bound: try later.
    pub const TRY_AGAIN_LATER: u16 = 1013;
    /// No token, an unknown token, or an invalid/expired JWT.
    pub const UNAUTHORIZED: u16 = 4401;
    /// Authenticated, but not allowed: another user's Sprite, a subject shared
    /// by several Users, a suspended User or Sprite.
    pub const FORBIDDEN: u16 = 4403;
    /// The requested Sprite does not exist (or the user has no default one).
    pub const NOT_FOUND: u16 = 4404;
    /// Too many unacknowledged messages or bytes: the runtime is not keeping up.
    pub const BACKLOG_FULL: u16 = 4413;
    /// The user already has `--max-connections-per-user` sessions.
    pub const TOO_MANY_CONNECTIONS: u16 = 4429;
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("unauthorized: {0}")]
    Unauthorized(&'static str),
    #[error("forbidden: {0}")]
    Forbidden(&'static str),
    #[error("not found: {0}")]
    NotFound(&'static str),
    #[error("too many connections for this user (limit {0})")]
    TooManyConnections(usize),
    #[error("too many unacknowledged messages ({messages} messages, {bytes} bytes)")]
    BacklogFull { messages: usize, bytes: usize },
    #[error("frame larger than {0} bytes")]
    TooBig(usize),
    #[error("upstream unavailable: {0}")]
    Upstream(String),
    #[error("configuration: {0}")]
    Config(String),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
}

impl Error {
    /// The close code a browser gets for this error.
    pub fn close_code(&self) -> u16 {
        match self {
            Error::Unauthorized(_) => close::UNAUTHORIZED,
            Error::Forbidden(_) => close::FORBIDDEN,
            Error::NotFound(_) => close::NOT_FOUND,
            Error::TooManyConnections(_) => close::TOO_MANY_CONNECTIONS,
            Error::BacklogFull { .. } => close::BACKLOG_FULL,
            Error::TooBig(_) => close::TOO_BIG,
            Error::Upstream(_) => close::TRY_AGAIN_LATER,
            Error::Config(_) | Error::Io(_) | Error::Kube(_) => close::INTERNAL,
        }
    }

    /// The HTTP status for a refusal answered before the upgrade.
    pub fn http_status(&self) -> StatusCode {
        match self {
            Error::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Error::Forbidden(_) => StatusCode::FORBIDDEN,
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::TooManyConnections(_) => StatusCode::TOO_MANY_REQUESTS,
            Error::BacklogFull { .. } | Error::Upstream(_) => StatusCode::SERVICE_UNAVAILABLE,
            Error::TooBig(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Error::Config(_) | Error::Io(_) | Error::Kube(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Low-cardinality label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Unauthorized(_) => "unauthorized",
            Error::Forbidden(_) => "forbidden",
            Error::NotFound(_) => "not_found",
            Error::TooManyConnections(_) => "too_many_connections",
            Error::BacklogFull { .. } => "backlog_full",
            Error::TooBig(_) => "too_big",
            Error::Upstream(_) => "upstream",
            Error::Config(_) => "config",
            Error::Io(_) => "io",
            Error::Kube(_) => "kube",
        }
    }

    /// The close frame's reason: short (a close reason is at most 123 bytes)
    /// and free of anything the client or the upstream sent.
    pub fn close_reason(&self) -> &'static str {
        match self {
            Error::Unauthorized(r) | Error::Forbidden(r) | Error::NotFound(r) => r,
            Error::TooManyConnections(_) => "too many connections for this user",
            Error::BacklogFull { .. } => "too many unacknowledged messages",
            Error::TooBig(_) => "message too big",
            Error::Upstream(_) => "sprite unavailable, try again later",
            Error::Config(_) | Error::Io(_) | Error::Kube(_) => "internal error",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_map_to_documented_codes() {
        let cases = [
            (Error::Unauthorized("x"), 4401, 401),
            (Error::Forbidden("x"), 4403, 403),
            (Error::NotFound("x"), 4404, 404),
            (Error::TooManyConnections(8), 4429, 429),
            (
                Error::BacklogFull {
                    messages: 1,
                    bytes: 1,
                },
                4413,
                503,
            ),
            (Error::TooBig(1), 1009, 413),
            (Error::Upstream("x".into()), 1013, 503),
        ];
        for (e, code, status) in cases {
            assert_eq!(e.close_code(), code, "{e}");
            assert_eq!(e.http_status().as_u16(), status, "{e}");
            assert!(e.close_reason().len() <= 123);
        }
    }
}
