//! One browser session: frames both ways between the browser and the
//! runtime, unchanged; the outbox of unacked frames; reconnect after the VM
//! slept; keepalive while the browser is active; closing the upstream when
//! it is idle (decision 3: an open connection keeps a VM awake).
//!
//! One task per session, one `select!` loop, no channels: the sockets' own
//! bounded buffers and the bounded outbox are the only queues, and a slow
//! side slows the other down (backpressure) instead of growing memory.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use futures::{Sink, SinkExt, Stream, StreamExt};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tracing::{debug, info, warn};

use super::Relay;
use super::error::{Error, close};
use super::metrics::{DirectionLabels, OutcomeLabels, ReasonLabels};
use super::outbox::{self, Outbox};
use super::routing::Target;
use super::upstream::Upstream;

/// How long to wait for a close handshake to finish.
const CLOSE_WAIT: Duration = Duration::from_secs(2);
/// Far enough to mean "no timer".
const NEVER: Duration = Duration::from_secs(24 * 3600);

/// Why a session ended.
enum End {
    /// The browser closed or went away.
    BrowserGone,
    /// The relay is shutting down.
    Shutdown,
    /// An error the browser is told about in the close frame.
    Refused(Error),
}

type Connecting = Pin<Box<dyn std::future::Future<Output = Result<Upstream, Error>> + Send>>;

/// The session's state besides the sockets.
struct State {
    outbox: Outbox,
    /// The browser sent a data frame since the upstream was last closed for
    /// idleness: the session is live and wants its VM.
    wanted: bool,
    last_activity: Instant,
    /// The runtime's reply to our `hello` is the next text frame: ours, not
    /// the browser's.
    swallow_hello: bool,
    retry_at: Option<Instant>,
    backoff: Option<ExponentialBackoff>,
    failing_since: Option<Instant>,
    next_keepalive: Instant,
    next_lease: Instant,
    next_browser_ping: Instant,
}

fn close_frame(code: u16, reason: &'static str) -> Message {
    Message::Close(Some(CloseFrame {
        code: CloseCode::from(code),
        reason: reason.into(),
    }))
}

/// The runtime's `hello`, naming the session so that its ids survive
/// reconnects.
pub fn hello(session: &str) -> Message {
    Message::text(serde_json::json!({"type": "hello", "payload": {"session": session}}).to_string())
}

/// Sends a refusal to a browser that was upgraded only to be told why.
pub async fn refuse<S>(browser: S, err: &Error)
where
    S: Stream<Item = Result<Message, WsError>> + Sink<Message, Error = WsError> + Unpin,
{
    let frame = close_frame(err.close_code(), err.close_reason());
    let _ = tokio::time::timeout(CLOSE_WAIT, close_and_drain(browser, frame)).await;
}

/// The closing handshake, server side: send our Close, then read until the
/// peer's Close or EOF before the socket is dropped. Dropping it with the
/// peer's frames unread makes the kernel answer with a reset, and a reset
/// discards what the peer had not read yet: our Close with its 44xx code
/// would be lost and the browser would see a broken connection instead.
/// Callers bound the wait.
async fn close_and_drain<S>(mut browser: S, frame: Message)
where
    S: Stream<Item = Result<Message, WsError>> + Sink<Message, Error = WsError> + Unpin,
{
    if browser.send(frame).await.is_err() {
        return;
    }
    if browser.close().await.is_err() {
        return;
    }
    while let Some(Ok(m)) = browser.next().await {
        if m.is_close() {
            break;
        }
    }
}

/// Writes every frame the current upstream has not seen yet.
async fn flush_outbox(up: &mut Upstream, outbox: &mut Outbox) -> Result<usize, WsError> {
    let mut n = 0;
    while let Some(m) = outbox.next_unsent() {
        up.feed(m.clone()).await?;
        outbox.mark_sent();
        n += 1;
    }
    if n > 0 {
        up.flush().await?;
    }
    Ok(n)
}

/// Runs a session until the browser leaves, the relay shuts down or an error
/// ends it. `session` names the runtime session (the `hello`).
pub async fn run<S>(relay: Arc<Relay>, mut browser: S, target: Target, session: String)
where
    S: Stream<Item = Result<Message, WsError>> + Sink<Message, Error = WsError> + Unpin,
{
    let cfg = &relay.config;
    let m = &relay.metrics;
    m.sessions.inc();
    m.sessions_active.inc();
    // Looked up once: a family lookup takes a lock, a counter is an atomic.
    let frames_up = m
        .frames
        .get_or_create(&DirectionLabels { direction: "up" })
        .clone();
    let frames_down = m
        .frames
        .get_or_create(&DirectionLabels { direction: "down" })
        .clone();
    let now = Instant::now();
    let mut st = State {
        outbox: Outbox::new(cfg.outbox),
        wanted: false,
        last_activity: now,
        swallow_hello: false,
        retry_at: None,
        backoff: None,
        failing_since: None,
        next_keepalive: now + NEVER,
        next_lease: now + NEVER,
        next_browser_ping: now + cfg.browser_ping_interval,
    };
    let mut up: Option<Upstream> = None;
    let mut connecting: Option<Connecting> = None;
    let sleep = tokio::time::sleep_until(now + NEVER);
    tokio::pin!(sleep);
    let mut timer_at = now + NEVER;
    // Registered once: a fresh `cancelled()` per turn would take the token's
    // lock twice for every frame.
    let shutdown = relay.shutdown.cancelled();
    tokio::pin!(shutdown);
    info!("session started");

    let end = loop {
        let now = Instant::now();
        // Connect when the session wants its VM and no attempt is waiting.
        if st.wanted && up.is_none() && connecting.is_none() && st.retry_at.is_none_or(|t| t <= now) {
            st.retry_at = None;
            let connector = relay.connector.clone();
            let t = target.clone();
            let ws_cfg = cfg.upstream_ws_config();
            let limit = cfg.connect_timeout;
            connecting = Some(Box::pin(async move {
                tokio::time::timeout(limit, connector.connect(&t, ws_cfg))
                    .await
                    .map_err(|_| Error::Upstream(format!("no connection within {limit:?}")))?
            }));
        }
        // The earliest thing a timer must do.
        let mut deadline = st.next_browser_ping;
        if let Some(t) = st.retry_at {
            deadline = deadline.min(t);
        }
        if up.is_some() {
            deadline = deadline
                .min(st.next_keepalive)
                .min(st.next_lease)
                .min(st.last_activity + cfg.idle_timeout);
        }
        if deadline < timer_at || timer_at <= now {
            timer_at = deadline;
            sleep.as_mut().reset(deadline);
        }

        tokio::select! {
            biased;
            _ = &mut shutdown => break End::Shutdown,
            r = async { connecting.as_mut().expect("guarded").await }, if connecting.is_some() => {
                connecting = None;
                match r {
                    Ok(ws) => {
                        m.upstream_connects.get_or_create(&OutcomeLabels { outcome: "ok" }).inc();
                        match on_connected(&relay, &target, &session, &mut st, ws).await {
                            Ok(ws) => up = Some(ws),
                            Err(e) => {
                                debug!(error = %e, "upstream lost right after connecting");
                                if let Err(e) = schedule_retry(&relay, &mut st) {
                                    break End::Refused(e);
                                }
                            }
                        }
                    }
                    Err(e) => {
                        m.upstream_connects.get_or_create(&OutcomeLabels { outcome: "error" }).inc();
                        warn!(vm = %target.vm, error = %e, "cannot reach the runtime");
                        if let Err(e) = schedule_retry(&relay, &mut st) {
                            break End::Refused(e);
                        }
                    }
                }
            }
            msg = browser.next() => {
                match msg {
                    Some(Ok(Message::Text(t))) => {
                        st.last_activity = Instant::now();
                        st.wanted = true;
                        let h = outbox::head(&t);
                        if h.type_.as_deref() == Some("hello") {
                            // The relay names the runtime session (the
                            // `session` query parameter); a browser hello
                            // would be refused by the runtime as not first.
                            let id = h.id.map(|c| c.into_owned());
                            if answer_hello(&mut browser, &session, id.as_deref()).await.is_err() {
                                break End::BrowserGone;
                            }
                            continue;
                        }
                        let id = h.id.map(|c| c.into_owned());
                        if let Err(e) = st.outbox.push_text(Message::Text(t), id.as_deref()) {
                            break End::Refused(e);
                        }
                    }
                    Some(Ok(Message::Binary(b))) => {
                        st.last_activity = Instant::now();
                        st.wanted = true;
                        if let Err(e) = st.outbox.push_binary(Message::Binary(b)) {
                            break End::Refused(e);
                        }
                    }
                    // Pongs to our pings, or pings tungstenite answers itself.
                    Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
                    Some(Ok(Message::Close(_))) | None => break End::BrowserGone,
                    Some(Err(WsError::Capacity(_))) => break End::Refused(Error::TooBig(cfg.max_message_bytes)),
                    Some(Err(e)) => {
                        debug!(error = %e, "browser socket error");
                        break End::BrowserGone;
                    }
                }
                frames_up.inc();
                if let Some(ws) = up.as_mut()
                    && flush_outbox(ws, &mut st.outbox).await.is_err()
                {
                    up = None;
                    on_upstream_lost(&relay, &mut st);
                }
            }
            msg = async { up.as_mut().expect("guarded").next().await }, if up.is_some() => {
                let forward = match msg {
                    Some(Ok(Message::Text(t))) => {
                        if std::mem::take(&mut st.swallow_hello)
                            && outbox::head(&t).type_.as_deref() == Some("hello")
                        {
                            continue;
                        }
                        if let Some(id) = outbox::acked_id(&t) {
                            st.outbox.ack(&id);
                        }
                        Message::Text(t)
                    }
                    Some(Ok(Message::Binary(b))) => Message::Binary(b),
                    Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
                    Some(Err(WsError::Capacity(_))) => {
                        break End::Refused(Error::Upstream("the runtime sent a frame over the size cap".into()));
                    }
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                        up = None;
                        on_upstream_lost(&relay, &mut st);
                        continue;
                    }
                };
                frames_down.inc();
                if browser.send(forward).await.is_err() {
                    break End::BrowserGone;
                }
            }
            _ = &mut sleep => {
                let now = Instant::now();
                timer_at = now; // recompute on the next turn
                if st.retry_at.is_some_and(|t| t <= now) {
                    st.retry_at = None;
                }
                if let Some(ws) = up.as_mut() {
                    if now >= st.last_activity + cfg.idle_timeout {
                        // Let the VM sleep; the next browser frame wakes it.
                        info!(idle_for = ?now.duration_since(st.last_activity), "browser idle: closing the upstream");
                        let _ = tokio::time::timeout(CLOSE_WAIT, ws.close(None)).await;
                        up = None;
                        st.wanted = false;
                        st.next_keepalive = now + NEVER;
                        st.next_lease = now + NEVER;
                    } else {
                        if now >= st.next_keepalive {
                            st.next_keepalive = now + cfg.keepalive_interval;
                            if ws.send(Message::Ping(Default::default())).await.is_err() {
                                up = None;
                                on_upstream_lost(&relay, &mut st);
                            }
                        }
                        if now >= st.next_lease {
                            st.next_lease = now + relay.leases.refresh;
                            relay.leases.touch(&target.namespace, &target.sprite);
                        }
                    }
                }
                if now >= st.next_browser_ping {
                    st.next_browser_ping = now + cfg.browser_ping_interval;
                    if browser.send(Message::Ping(Default::default())).await.is_err() {
                        break End::BrowserGone;
                    }
                }
            }
        }
    };

    let reason = match &end {
        End::BrowserGone => "browser_gone",
        End::Shutdown => "shutdown",
        End::Refused(e) => e.metric_label(),
    };
    m.session_ends.get_or_create(&ReasonLabels { reason }).inc();
    m.sessions_active.dec();
    match &end {
        End::BrowserGone => info!(pending = st.outbox.len(), "session ended by the browser"),
        End::Shutdown => info!("session closed: relay shutting down"),
        End::Refused(e) => warn!(error = %e, code = e.close_code(), "session closed"),
    }
    // Close both sides; neither wait may hold the session for long.
    let frame = match &end {
        End::BrowserGone => None,
        End::Shutdown => Some(close_frame(close::GOING_AWAY, "relay shutting down")),
        End::Refused(e) => Some(close_frame(e.close_code(), e.close_reason())),
    };
    let browser_close = async {
        match frame {
            Some(f) => close_and_drain(&mut browser, f).await,
            // The browser left: answer its Close, if it sent one, and go.
            None => {
                let _ = browser.close().await;
            }
        }
    };
    let upstream_close = async {
        if let Some(ws) = up.as_mut() {
            let _ = ws.close(None).await;
        }
    };
    let _ = tokio::time::timeout(CLOSE_WAIT, futures::future::join(browser_close, upstream_close)).await;
}

/// A fresh upstream: name the session, resend what was never acked, start
/// keepalive and the lease.
async fn on_connected(
    relay: &Relay,
    target: &Target,
    session: &str,
    st: &mut State,
    mut ws: Upstream,
) -> Result<Upstream, WsError> {
    ws.feed(hello(session)).await?;
    let resent = st.outbox.rewind();
    if resent > 0 {
        relay.metrics.resent_frames.inc_by(resent as u64);
        info!(resent, "upstream reconnected: resending unacknowledged frames");
    } else {
        debug!("upstream connected");
    }
    st.swallow_hello = true;
    flush_outbox(&mut ws, &mut st.outbox).await?;
    ws.flush().await?;
    st.failing_since = None;
    st.backoff = None;
    let now = Instant::now();
    st.next_keepalive = now + relay.config.keepalive_interval;
    st.next_lease = now + relay.leases.refresh;
    relay.leases.touch(&target.namespace, &target.sprite);
    Ok(ws)
}

/// The upstream went away under a live session (the VM slept, the runtime
/// restarted for an update): reconnect at once.
fn on_upstream_lost(relay: &Relay, st: &mut State) {
    relay.metrics.upstream_drops.inc();
    info!(unacked = st.outbox.unacked(), "upstream closed: reconnecting");
    st.swallow_hello = false;
    st.retry_at = Some(Instant::now());
    st.next_keepalive = Instant::now() + NEVER;
    st.next_lease = Instant::now() + NEVER;
}

/// A connection attempt failed: try again after a jittered backoff, until
/// `--upstream-retry-for` has passed since the first failure.
fn schedule_retry(relay: &Relay, st: &mut State) -> Result<(), Error> {
    let cfg = &relay.config;
    let now = Instant::now();
    let since = *st.failing_since.get_or_insert(now);
    if now.duration_since(since) >= cfg.upstream_retry_for {
        return Err(Error::Upstream(format!(
            "runtime unreachable for {:?}",
            now.duration_since(since)
        )));
    }
    let delay = st
        .backoff
        .get_or_insert_with(|| {
            ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(100))
                .with_max_delay(Duration::from_secs(5))
                .with_jitter()
                .without_max_times()
                .build()
        })
        .next()
        .unwrap_or(Duration::from_secs(5));
    st.retry_at = Some(now + delay);
    Ok(())
}

/// Answers a browser `hello` as the runtime would: the session it is in.
async fn answer_hello<S>(browser: &mut S, session: &str, id: Option<&str>) -> Result<(), WsError>
where
    S: Sink<Message, Error = WsError> + Unpin,
{
    if let Some(id) = id {
        let ack = serde_json::json!({"type": "ack", "payload": {"id": id, "status": "processed"}});
        browser.feed(Message::text(ack.to_string())).await?;
    }
    let reply = serde_json::json!({"type": "hello", "payload": {"session": session}});
    browser.send(Message::text(reply.to_string())).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_names_the_session() {
        let Message::Text(t) = hello("s-1") else { panic!() };
        let v: serde_json::Value = serde_json::from_str(&t).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type": "hello", "payload": {"session": "s-1"}})
        );
    }
}
