//! The HTTP side: `/ws` (admission, then the upgrade), `/healthz`,
//! `/readyz`, `/metrics`.
//!
//! Admission runs before the upgrade and does no upstream work. Refusals are
//! answered two ways: a client that offered the `sprite-relay.v1`
//! subprotocol (a browser, which cannot read the status of a failed
//! handshake) is upgraded and immediately closed with a 44xx code and a
//! reason; any other client gets the HTTP status (401, 403, 404, 429) and
//! no WebSocket at all.
//!
//! The upgrade is done here rather than with axum's extractor so that the
//! browser's socket is a [`super::wire::Socket`] like the upstream one:
//! frames pass from one to the other as bytes, unconverted, and the buffer
//! sizes are ours.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Query, Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::serve::ListenerExt;
use bytes::BytesMut;
use futures::FutureExt;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use hyper_util::rt::TokioIo;
use hyper_util::server::conn::auto::upgrade;
use serde::Deserialize;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tracing::{info, info_span, warn};

use super::auth::{self, SUBPROTOCOL};
use super::error::Error;
use super::metrics::ReasonLabels;
use super::routing::{self, Target};
use super::wire::{Role, Socket};
use super::{Relay, limits::Permit, session};
use crate::event_loop;

pub async fn serve(listener: tokio::net::TcpListener, relay: Arc<Relay>) -> std::io::Result<()> {
    let app = Router::new()
        .route("/ws", get(ws))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(relay.clone());
    // Small frames must not wait for Nagle: latency is the product here.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(async move { relay.shutdown.triggered().await })
        .await
}

async fn readyz(State(relay): State<Arc<Relay>>) -> Response {
    if relay.directory.is_ready() && !relay.shutdown.is_triggered() {
        "ok".into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "caches not synced").into_response()
    }
}

async fn metrics(State(relay): State<Arc<Relay>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        relay.metrics.encode(),
    )
        .into_response()
}

#[derive(Deserialize, Default)]
pub struct WsQuery {
    /// The Sprite to talk to (default: the user's primary or only one).
    sprite: Option<String>,
    /// Names the runtime session, so that a browser reconnecting to the relay
    /// keeps its dedup memory (default: a fresh one per connection).
    session: Option<String>,
    /// Only with `--allow-query-token`.
    token: Option<String>,
}

/// The runtime's rule for session names.
fn valid_session(s: &str) -> bool {
    (1..=128).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'@' | b'-'))
}

fn header_has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// What the client offered in `Sec-WebSocket-Protocol`.
fn offered_protocols(headers: &HeaderMap) -> Vec<&str> {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .collect()
}

/// Everything decided before the upgrade: who, where, and a slot.
fn admit(relay: &Arc<Relay>, headers: &HeaderMap, q: &WsQuery) -> Result<(Target, Permit), Error> {
    let offered = offered_protocols(headers);
    let authorization = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let creds = auth::credentials(
        &offered,
        authorization,
        q.token.as_deref(),
        relay.config.allow_query_token,
    )?;
    if !relay.directory.is_ready() {
        // Refusing beats deciding on a half-filled cache.
        return Err(Error::Upstream("relay caches not synced yet".into()));
    }
    let users = relay.directory.users();
    let user = auth::authenticate(creds.token, &relay.jwt, &users)?;
    let ns = user.metadata.namespace.clone().unwrap_or_default();
    let uname = user.metadata.name.clone().unwrap_or_default();
    let sprites = relay.directory.sprites_in(&ns);
    let target = routing::choose(&user, q.sprite.as_deref(), &sprites).inspect_err(|_| {
        if let Some(name) = q.sprite.as_deref()
            && routing::owned_by_other(&user, name, &sprites)
        {
            warn!(namespace = %ns, user = %uname, sprite = %name, "refused: the sprite belongs to another user");
        }
    })?;
    let permit = relay
        .limits
        .acquire(&ns, &uname, relay.config.max_connections_per_user)?;
    info!(namespace = %ns, user = %uname, sprite = %target.sprite, via = creds.source.as_str(), "admitted");
    Ok((target, permit))
}

async fn ws(
    State(relay): State<Arc<Relay>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Query(q): Query<WsQuery>,
    mut req: Request,
) -> Response {
    let headers = req.headers();
    let is_upgrade = header_has_token(headers, header::CONNECTION, "upgrade")
        && header_has_token(headers, header::UPGRADE, "websocket")
        && headers
            .get(header::SEC_WEBSOCKET_VERSION)
            .is_some_and(|v| v == "13");
    let Some(key) = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .cloned()
        .filter(|_| is_upgrade)
    else {
        return (
            StatusCode::UPGRADE_REQUIRED,
            [(header::UPGRADE, "websocket")],
            "WebSocket only",
        )
            .into_response();
    };
    let browser = offered_protocols(headers).contains(&SUBPROTOCOL);
    let session_id = match q.session.as_deref() {
        Some(s) if valid_session(s) => Ok(s.to_string()),
        Some(_) => Err(()),
        None => Ok(format!("relay-{}", uuid::Uuid::new_v4().simple())),
    };
    let admitted = match session_id {
        Err(()) => Err(Error::Forbidden("invalid session name")),
        Ok(sid) => admit(&relay, headers, &q).map(|(t, p)| (t, p, sid)),
    };
    if let Err(e) = &admitted {
        relay
            .metrics
            .refusals
            .get_or_create(&ReasonLabels {
                reason: e.metric_label(),
            })
            .inc();
        // No token and no query string in this line: only the reason.
        info!(%peer, reason = %e, code = e.close_code(), "connection refused");
        if !browser {
            return (e.http_status(), e.close_reason()).into_response();
        }
    }
    let Some(on_upgrade) = req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>() else {
        return (StatusCode::BAD_REQUEST, "connection cannot be upgraded").into_response();
    };
    let limits = relay.config.socket_limits(relay.background.timers());
    let task_relay = relay.clone();
    let task = async move {
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                warn!(error = %e, "upgrade failed");
                return;
            }
        };
        // The TCP stream itself rather than hyper's wrappers around it:
        // they would sit on every read of the session, and the session's
        // event loop takes over the socket.
        let (tcp, early) = match upgrade::downcast::<TokioIo<TcpStream>>(upgraded) {
            Ok(parts) => (parts.io.into_inner(), BytesMut::from(parts.read_buf)),
            Err(_) => {
                warn!("upgraded connection is not a TCP stream: closed");
                return;
            }
        };
        let (target, permit, sid) = match admitted {
            // Refused here, on this runtime: no session, no event loop.
            Err(e) => return session::refuse(Socket::new(tcp, Role::Server, early, limits), &e).await,
            Ok(admitted) => admitted,
        };
        let tcp = match tcp.into_std() {
            Ok(tcp) => tcp,
            Err(e) => {
                warn!(error = %e, "cannot take the browser's socket from the HTTP runtime");
                return;
            }
        };
        let relay = task_relay.clone();
        task_relay.spawn_session(move || {
            let tcp = event_loop::TcpStream::from_std(tcp)
                .inspect_err(|e| warn!(error = %e, "cannot register the browser's socket"))
                .ok()?;
            let socket = Socket::new(tcp, Role::Server, early, limits);
            let span = info_span!("session", namespace = %target.namespace, user = %target.user,
                sprite = %target.sprite, vm = %target.vm, session = %sid, %peer);
            // The permit goes with the session (`map`: no second copy of
            // the session's future, as an async block around it would keep).
            Some(session::run(relay, socket, target, sid, span).map(move |()| drop(permit)))
        });
    };
    relay.sessions.spawn(task);

    let mut response = Response::new(Body::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = response.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(v) = HeaderValue::from_str(&derive_accept_key(key.as_bytes())) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    if browser {
        // Never the token: only our protocol name goes back.
        h.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(SUBPROTOCOL),
        );
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_names_follow_the_runtime() {
        assert!(valid_session("tab-1:abc@x.y_z"));
        assert!(!valid_session(""));
        assert!(!valid_session("a b"));
        assert!(!valid_session(&"a".repeat(129)));
    }

    #[test]
    fn protocols_are_split_and_trimmed() {
        let mut h = HeaderMap::new();
        h.append(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("sprite-relay.v1, tok"),
        );
        h.append(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static("other"));
        assert_eq!(offered_protocols(&h), vec!["sprite-relay.v1", "tok", "other"]);
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        assert!(header_has_token(&h, header::CONNECTION, "upgrade"));
    }
}
