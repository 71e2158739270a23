//! One browser session: frames both ways between the browser and the
//! runtime, unchanged; the outbox of unacked frames; reconnect after the VM
//! slept; keepalive while the browser is active; closing the upstream when
//! it is idle (decision 3: an open connection keeps a VM awake).
//!
//! One task per session, one loop over its event sources (polled only when
//! they woke: `wakeups`), no channels: the sockets' own
//! bounded buffers, a frame in part per socket and the bounded outbox are
//! the only queues. A peer that reads slowly stops the reading of what goes
//! to it (backpressure) instead of growing memory, and only that: each
//! direction waits for its own peer (docs/relay.md, session 11).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tracing::{Instrument, Span, debug, info, warn};

use super::Relay;
use super::error::{Error, close};
use super::metrics::{DirectionLabels, OutcomeLabels, ReasonLabels};
use super::outbox::{self, Outbox};
use super::routing::Target;
use super::upstream::Upstream;
use super::wakeups::Wakeups;
use super::wire::{Kind, Msg, Socket, WireError};
use crate::timers::Timers;

/// How long to wait for a close handshake to finish.
const CLOSE_WAIT: Duration = Duration::from_secs(2);
/// Far enough to mean "no timer".
const NEVER: Duration = Duration::from_secs(24 * 3600);

/// Why a session ended.
enum End {
    /// The browser went away.
    BrowserGone,
    /// The browser closed the connection (its Close was answered).
    BrowserClosed,
    /// The relay is shutting down.
    Shutdown,
    /// An error the browser is told about in the close frame.
    Refused(Error),
}

/// What woke the session loop.
enum Event {
    Shutdown,
    /// Boxed: an `Upstream` is 248 bytes, and every event, a relayed
    /// message most of the time, was moved at the size of the largest.
    Connected(Result<Box<Upstream>, Error>),
    Browser(Result<Option<Msg>, WireError>),
    Upstream(Result<Option<Msg>, WireError>),
    /// A write the poll started waits for its peer: the loop's turn arms
    /// the write timeout.
    Writing,
    /// The poll relayed its budget of messages: the loop's turn (which arms
    /// the write timeout of a write started meanwhile), then the event
    /// loop's other tasks.
    Yield,
    UpstreamWriteFailed,
    BrowserWriteFailed,
    Timer,
}

/// How many messages one poll relays in place before it lets the loop's
/// other tasks run: a session whose peers keep its sockets full must not
/// hold its event loop (tokio's cooperative budget is 128 operations).
const RELAY_BUDGET: u32 = 64;

/// The session loop's event sources (`wakeups`), in the order it polls them.
const SHUTDOWN: usize = 0;
const CONNECTING: usize = 1;
const BROWSER: usize = 2;
const UPSTREAM: usize = 3;
const TIMER: usize = 4;
/// A frame a socket took in part, finished as the socket takes more.
const UP_WRITE: usize = 5;
const DOWN_WRITE: usize = 6;
const SOURCES: usize = 7;

/// Not `Send`: it runs where it was made, on the session's event loop, and
/// the socket it makes belongs there.
type Connecting = Pin<Box<dyn Future<Output = Result<Upstream, Error>>>>;

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
    /// The outbox's next unsent frame is the upstream's pending write: it
    /// is marked sent once that write is done.
    flushing: bool,
    retry_at: Option<Instant>,
    backoff: Option<ExponentialBackoff>,
    failing_since: Option<Instant>,
    next_keepalive: Instant,
    next_lease: Instant,
    next_browser_ping: Instant,
}

/// The runtime's `hello`, naming the session so that its ids survive
/// reconnects.
pub fn hello(session: &str) -> String {
    serde_json::json!({"type": "hello", "payload": {"session": session}}).to_string()
}

/// Sends a refusal to a browser that was upgraded only to be told why.
pub async fn refuse<S: AsyncRead + AsyncWrite + Unpin>(mut browser: Socket<S>, err: &Error) {
    let timers = browser.timers().clone();
    let close = close_and_drain(&mut browser, err.close_code(), err.close_reason());
    let _ = timers.timeout(CLOSE_WAIT, close).await;
}

/// The closing handshake, server side: send our Close, then read until the
/// peer's Close or EOF before the socket is dropped. Dropping it with the
/// peer's frames unread makes the kernel answer with a reset, and a reset
/// discards what the peer had not read yet: our Close with its 44xx code
/// would be lost and the browser would see a broken connection instead.
/// Callers bound the wait.
async fn close_and_drain<S: AsyncRead + AsyncWrite + Unpin>(
    browser: &mut Socket<S>,
    code: u16,
    reason: &str,
) {
    if browser.close(Some(code), reason).await.is_err() {
        return;
    }
    while let Ok(Some(m)) = browser.next().await {
        if m.kind == Kind::Close {
            break;
        }
    }
}

/// A connection attempt to the runtime, bounded by the connect timeout.
///
/// Not inlined, and the attempt's future is built inside its box: that
/// future is about 13 KiB (the Sprites proxy's HTTP, TLS and WebSocket
/// handshakes), and built in `run`, its temporaries made `run`'s poll
/// function a 69 KiB stack frame, whose 17 pages the stack probes touched on
/// every poll, twice per relayed round trip (docs/relay.md, session 9).
#[inline(never)]
fn start_connect(relay: &Relay, target: &Target, timers: &Timers, span: &Span) -> Connecting {
    let connector = relay.connector.clone();
    let dial = relay.dial.clone();
    let target = target.clone();
    let limits = relay.config.socket_limits(timers.clone());
    let limit = relay.config.connect_timeout;
    let timers = timers.clone();
    Box::pin(
        async move {
            timers
                .timeout(limit, connector.connect(&target, limits, &dial))
                .await
                .map_err(|_| Error::Upstream(format!("no connection within {limit:?}")))?
        }
        .instrument(span.clone()),
    )
}

/// Runs a session until the browser leaves, the relay shuts down or an error
/// ends it. `session` names the runtime session (the `hello`).
///
/// `span` is the parent of the session's events, and is entered only
/// around the rare awaits whose callees log (connecting, reconnecting). The
/// whole session instrumented with it would enter and leave it on every
/// poll, twice per relayed round trip: about 490 of the relay's 5 700
/// user-space instructions per 64 B round trip at the default `info` level
/// (callgrind), for events that come a few times per session.
pub async fn run<S>(relay: Arc<Relay>, mut browser: Socket<S>, target: Target, session: String, span: Span)
where
    S: AsyncRead + AsyncWrite + Unpin,
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
        flushing: false,
        retry_at: None,
        backoff: None,
        failing_since: None,
        next_keepalive: now + NEVER,
        next_lease: now + NEVER,
        next_browser_ping: now + cfg.browser_ping_interval,
    };
    let mut up: Option<Upstream> = None;
    let mut connecting: Option<Connecting> = None;
    // Every timer in the background runtime's wheel: the event loop has
    // none (crate::timers).
    let timers = relay.background.timers();
    let sleep = timers.sleep_until(now + NEVER);
    tokio::pin!(sleep);
    // When the sleep is set to fire; NEVER from now: it fired and is unset.
    let mut timer_at = now + NEVER;
    let mut shutdown = relay.shutdown.signal();
    let mut wake = Wakeups::<SOURCES>::new();
    info!(parent: &span, "session started");

    let end = loop {
        // Connect when the session wants its VM and no attempt is waiting.
        if st.wanted
            && up.is_none()
            && connecting.is_none()
            && st.retry_at.is_none_or(|t| t <= Instant::now())
        {
            if let Err(e) = still_allowed(&relay, &target) {
                break End::Refused(e);
            }
            st.retry_at = None;
            connecting = Some(start_connect(&relay, &target, &timers, &span));
            wake.mark(CONNECTING);
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
        // A write the poll left waiting may wait this long (as `send_wire`'s).
        for since in [
            browser.writing_since(),
            up.as_ref().and_then(|w| w.writing_since()),
        ]
        .into_iter()
        .flatten()
        {
            deadline = deadline.min(since + cfg.write_timeout);
        }
        if deadline < timer_at {
            timer_at = deadline;
            sleep.as_mut().reset(deadline);
            wake.mark(TIMER);
        }

        let event = std::future::poll_fn(|cx| {
            wake.register(cx);
            // In this order, as a biased `select!` would: shutdown first,
            // the timer last.
            if wake.take(SHUTDOWN)
                && Pin::new(&mut shutdown)
                    .poll(&mut wake.context(SHUTDOWN))
                    .is_ready()
            {
                return Poll::Ready(Event::Shutdown);
            }
            if let Some(c) = connecting.as_mut()
                && wake.take(CONNECTING)
                && let Poll::Ready(r) = c.as_mut().poll(&mut wake.context(CONNECTING))
            {
                return Poll::Ready(Event::Connected(r.map(Box::new)));
            }
            // Each side's writes go on in the poll, and a side is read only
            // while the other is not still writing: so each direction waits
            // for its own peer alone, and a runtime that stops reading
            // until its reply is taken cannot deadlock with us.
            let mut started = false;
            if let Some(ws) = up.as_mut() {
                if ws.is_writing()
                    && wake.take(UP_WRITE)
                    && let Poll::Ready(Err(_)) = ws.poll_pending(&mut wake.context(UP_WRITE))
                {
                    return Poll::Ready(Event::UpstreamWriteFailed);
                }
                // Done here or by the loop's last write.
                if st.flushing && !ws.is_writing() {
                    st.flushing = false;
                    st.outbox.mark_sent();
                }
                while !ws.is_writing()
                    && let Some(frame) = st.outbox.next_unsent()
                {
                    if ws.try_relay(frame).is_err() {
                        return Poll::Ready(Event::UpstreamWriteFailed);
                    }
                    if ws.is_writing() {
                        st.flushing = true;
                        wake.mark(UP_WRITE);
                        started = true;
                    } else {
                        st.outbox.mark_sent();
                    }
                }
            }
            if browser.is_writing()
                && wake.take(DOWN_WRITE)
                && let Poll::Ready(Err(_)) = browser.poll_pending(&mut wake.context(DOWN_WRITE))
            {
                return Poll::Ready(Event::BrowserWriteFailed);
            }
            // Messages that need nothing of the loop are relayed here, in
            // the poll (`relay_up`, `relay_down`); any other comes out as
            // an event.
            let mut relayed = 0;
            while !up.as_ref().is_some_and(Upstream::is_writing)
                && wake.take(BROWSER)
                && let Poll::Ready(r) = browser.poll_next(&mut wake.context(BROWSER))
            {
                // Not registered yet: there may be more in its buffer.
                wake.mark(BROWSER);
                let msg = match r {
                    Ok(Some(msg)) => msg,
                    r => return Poll::Ready(Event::Browser(r)),
                };
                if let Err(msg) = relay_up(msg, up.as_mut(), &mut st, &frames_up) {
                    return Poll::Ready(Event::Browser(Ok(Some(msg))));
                }
                if up.as_ref().is_some_and(Upstream::is_writing) {
                    wake.mark(UP_WRITE);
                    started = true;
                }
                relayed += 1;
                if relayed == RELAY_BUDGET {
                    return Poll::Ready(Event::Yield);
                }
            }
            while let Some(ws) = up.as_mut()
                && !browser.is_writing()
                && wake.take(UPSTREAM)
                && let Poll::Ready(r) = ws.poll_next(&mut wake.context(UPSTREAM))
            {
                wake.mark(UPSTREAM);
                let msg = match r {
                    Ok(Some(msg)) => msg,
                    r => return Poll::Ready(Event::Upstream(r)),
                };
                if let Err(msg) = relay_down(msg, &mut browser, &mut st, &frames_down) {
                    return Poll::Ready(Event::Upstream(Ok(Some(msg))));
                }
                if browser.is_writing() {
                    wake.mark(DOWN_WRITE);
                    started = true;
                }
                relayed += 1;
                if relayed == RELAY_BUDGET {
                    return Poll::Ready(Event::Yield);
                }
            }
            if started {
                return Poll::Ready(Event::Writing);
            }
            if wake.take(TIMER) && sleep.as_mut().poll(&mut wake.context(TIMER)).is_ready() {
                return Poll::Ready(Event::Timer);
            }
            Poll::Pending
        })
        .await;

        match event {
            Event::Shutdown => break End::Shutdown,
            Event::Connected(r) => {
                connecting = None;
                match r {
                    Ok(ws) => {
                        m.upstream_connects
                            .get_or_create(&OutcomeLabels { outcome: "ok" })
                            .inc();
                        match on_connected(&relay, &target, &session, &mut st, *ws)
                            .instrument(span.clone())
                            .await
                        {
                            Ok(ws) => {
                                up = Some(ws);
                                wake.mark(UPSTREAM);
                            }
                            Err(e) => {
                                debug!(parent: &span, error = %e, "upstream lost right after connecting");
                                if let Err(e) = schedule_retry(&relay, &mut st) {
                                    break End::Refused(e);
                                }
                            }
                        }
                    }
                    Err(e) => {
                        m.upstream_connects
                            .get_or_create(&OutcomeLabels { outcome: "error" })
                            .inc();
                        warn!(parent: &span, vm = %target.vm, error = %e, "cannot reach the runtime");
                        if let Err(e) = schedule_retry(&relay, &mut st) {
                            break End::Refused(e);
                        }
                    }
                }
            }
            Event::Writing => {}
            Event::Yield => {
                let mut yielded = false;
                std::future::poll_fn(|cx| {
                    if std::mem::replace(&mut yielded, true) {
                        return Poll::Ready(());
                    }
                    cx.waker().wake_by_ref();
                    Poll::Pending
                })
                .await;
            }
            Event::BrowserWriteFailed => break End::BrowserGone,
            Event::UpstreamWriteFailed => {
                if let Err(e) = on_upstream_lost(&relay, &mut st, &mut up, &span) {
                    break End::Refused(e);
                }
            }
            Event::Browser(msg) => {
                let msg = match msg {
                    Ok(Some(m)) => m,
                    Ok(None) => break End::BrowserGone,
                    Err(WireError::TooBig(_)) => break End::Refused(Error::TooBig(cfg.max_message_bytes)),
                    Err(e) => {
                        debug!(parent: &span, error = %e, "browser socket error");
                        break End::BrowserGone;
                    }
                };
                match msg.kind {
                    Kind::Text => {
                        st.last_activity = Instant::now();
                        st.wanted = true;
                        // Parsed only if it may name an id or a hello.
                        let (raw, mask) = msg.masked_payload();
                        let (hello, id) = if outbox::may_matter(raw, mask) {
                            let p = msg.payload();
                            let h = outbox::head(&p);
                            (h.type_.as_deref() == Some("hello"), h.id.map(|c| c.into_owned()))
                        } else {
                            (false, None)
                        };
                        if hello {
                            // The relay names the runtime session (the
                            // `session` query parameter); a browser hello
                            // would be refused by the runtime as not first.
                            if answer_hello(&mut browser, &session, id.as_deref()).await.is_err() {
                                break End::BrowserGone;
                            }
                            continue;
                        }
                        // Most frames carry no id: with nothing queued before
                        // one, it is written without a trip through the outbox.
                        if id.is_none()
                            && let Some(ws) = up.as_mut()
                            && st.outbox.pass_through()
                        {
                            frames_up.inc();
                            // As `relay_up` writes: the poll finishes it.
                            if ws.try_relay(&msg.wire).is_ok() {
                                if ws.is_writing() {
                                    wake.mark(UP_WRITE);
                                }
                            } else {
                                if let Err(e) = on_upstream_lost(&relay, &mut st, &mut up, &span) {
                                    break End::Refused(e);
                                }
                                // Not written: held for the next connection,
                                // as it would have been if queued.
                                let len = msg.len();
                                if let Err(e) = st.outbox.push_text(msg.wire, len, None) {
                                    break End::Refused(e);
                                }
                            }
                            continue;
                        }
                        if let Err(e) = st.outbox.push_text(msg.wire.clone(), msg.len(), id.as_deref()) {
                            break End::Refused(e);
                        }
                    }
                    Kind::Binary => {
                        st.last_activity = Instant::now();
                        st.wanted = true;
                        if let Err(e) = st.outbox.push_binary(msg.wire.clone(), msg.len()) {
                            break End::Refused(e);
                        }
                    }
                    Kind::Ping => {
                        if browser.pong(&msg).await.is_err() {
                            break End::BrowserGone;
                        }
                        continue;
                    }
                    // Answers to our pings.
                    Kind::Pong => continue,
                    Kind::Close => {
                        // Finish the closing handshake with the browser's code.
                        let _ = browser.close(msg.close_code(), "").await;
                        break End::BrowserClosed;
                    }
                }
                // Written by the poll, which flushes the outbox first.
                frames_up.inc();
            }
            Event::Upstream(msg) => {
                let msg = match msg {
                    Ok(Some(m)) => m,
                    Err(WireError::TooBig(_)) => {
                        break End::Refused(Error::Upstream(
                            "the runtime sent a frame over the size cap".into(),
                        ));
                    }
                    Ok(None) | Err(_) => {
                        if let Err(e) = on_upstream_lost(&relay, &mut st, &mut up, &span) {
                            break End::Refused(e);
                        }
                        continue;
                    }
                };
                match msg.kind {
                    Kind::Text => {
                        if std::mem::take(&mut st.swallow_hello)
                            && outbox::head(&msg.payload()).type_.as_deref() == Some("hello")
                        {
                            continue;
                        }
                    }
                    Kind::Binary => {}
                    Kind::Ping => {
                        if up.as_mut().expect("guarded").pong(&msg).await.is_err()
                            && let Err(e) = on_upstream_lost(&relay, &mut st, &mut up, &span)
                        {
                            break End::Refused(e);
                        }
                        continue;
                    }
                    Kind::Pong => continue,
                    Kind::Close => {
                        let ws = up.as_mut().expect("guarded");
                        let _ = ws.close(msg.close_code(), "").await;
                        if let Err(e) = on_upstream_lost(&relay, &mut st, &mut up, &span) {
                            break End::Refused(e);
                        }
                        continue;
                    }
                }
                frames_down.inc();
                if browser.send_wire(&msg.wire).await.is_err() {
                    break End::BrowserGone;
                }
                note_ack(&msg, &mut st.outbox);
            }
            Event::Timer => {
                let now = Instant::now();
                // Unset: the next turn sets it to the next deadline, which
                // is always sooner (the browser ping at the latest).
                timer_at = now + NEVER;
                if st.retry_at.is_some_and(|t| t <= now) {
                    st.retry_at = None;
                }
                // A peer that stopped reading must not hold the session (as
                // `send_wire`'s timeout).
                let stalled = |since: Option<Instant>| since.is_some_and(|t| now >= t + cfg.write_timeout);
                if stalled(browser.writing_since()) {
                    debug!(parent: &span, "the browser stopped reading");
                    break End::BrowserGone;
                }
                if stalled(up.as_ref().and_then(|w| w.writing_since())) {
                    debug!(parent: &span, "the runtime stopped reading");
                    if let Err(e) = on_upstream_lost(&relay, &mut st, &mut up, &span) {
                        break End::Refused(e);
                    }
                }
                if let Some(ws) = up.as_mut() {
                    if now >= st.last_activity + cfg.idle_timeout {
                        // Let the VM sleep; the next browser frame wakes it.
                        info!(parent: &span, idle_for = ?now.duration_since(st.last_activity), "browser idle: closing the upstream");
                        let _ = timers
                            .timeout(CLOSE_WAIT, ws.close(Some(close::NORMAL), ""))
                            .await;
                        up = None;
                        st.wanted = false;
                        st.next_keepalive = now + NEVER;
                        st.next_lease = now + NEVER;
                    } else {
                        if now >= st.next_keepalive {
                            st.next_keepalive = now + cfg.keepalive_interval;
                            if ws.try_ping().is_err()
                                && let Err(e) = on_upstream_lost(&relay, &mut st, &mut up, &span)
                            {
                                break End::Refused(e);
                            }
                        }
                        if now >= st.next_lease {
                            st.next_lease = now + relay.leases.refresh;
                            if let Err(e) = still_allowed(&relay, &target) {
                                break End::Refused(e);
                            }
                            relay.leases.touch(&target.namespace, &target.sprite);
                        }
                    }
                }
                if now >= st.next_browser_ping {
                    st.next_browser_ping = now + cfg.browser_ping_interval;
                    if browser.try_ping().is_err() {
                        break End::BrowserGone;
                    }
                }
                // A ping the socket took in part is finished by the poll.
                wake.mark(UP_WRITE);
                wake.mark(DOWN_WRITE);
            }
        }
    };

    let reason = match &end {
        End::BrowserGone | End::BrowserClosed => "browser_gone",
        End::Shutdown => "shutdown",
        End::Refused(e) => e.metric_label(),
    };
    m.session_ends.get_or_create(&ReasonLabels { reason }).inc();
    m.sessions_active.dec();
    match &end {
        End::BrowserGone | End::BrowserClosed => {
            info!(parent: &span, pending = st.outbox.len(), "session ended by the browser")
        }
        End::Shutdown => info!(parent: &span, "session closed: relay shutting down"),
        End::Refused(e) => warn!(parent: &span, error = %e, code = e.close_code(), "session closed"),
    }
    // Close both sides; neither wait may hold the session for long.
    let browser_close = async {
        match &end {
            End::Shutdown => close_and_drain(&mut browser, close::GOING_AWAY, "relay shutting down").await,
            End::Refused(e) => close_and_drain(&mut browser, e.close_code(), e.close_reason()).await,
            // Already answered.
            End::BrowserClosed => {}
            // The browser left without a Close: nothing to answer.
            End::BrowserGone => {}
        }
    };
    let upstream_close = async {
        if let Some(ws) = up.as_mut() {
            let _ = ws.close(Some(close::NORMAL), "").await;
        }
    };
    let _ = timers
        .timeout(CLOSE_WAIT, futures::future::join(browser_close, upstream_close))
        .await;
}

/// A browser's message written to the runtime inside the session's poll,
/// when it needs nothing of the loop: a text frame that is not a `hello`
/// and carries no id, with nothing queued before it. The upstream takes it
/// at once, or what it has room for, the rest finished by later polls
/// (`Socket::try_relay`). That is most messages' path, and taking it in the
/// poll spares each such message the loop's turn (its event, its match, a
/// write future): see docs/relay.md, session 11. Any other message goes
/// back, and the loop does with it what it does with every message it
/// reads.
fn relay_up(msg: Msg, up: Option<&mut Upstream>, st: &mut State, frames: &Counter) -> Result<(), Msg> {
    let Some(ws) = up else {
        return Err(msg);
    };
    if msg.kind != Kind::Text {
        return Err(msg);
    }
    // One that may name an id or a hello is read by the loop, unmasked.
    let (payload, mask) = msg.masked_payload();
    if outbox::may_matter(payload, mask) {
        return Err(msg);
    }
    st.last_activity = Instant::now();
    st.wanted = true;
    if !st.outbox.pass_through() {
        return Err(msg);
    }
    if ws.try_relay(&msg.wire).is_err() {
        // Nothing written: the loop's write meets the error and handles it.
        return Err(msg);
    }
    frames.inc();
    Ok(())
}

/// The runtime's message written to the browser inside the session's poll
/// (as [`relay_up`]): a text or binary frame, unless it may be the reply to
/// our `hello`.
fn relay_down<S>(msg: Msg, browser: &mut Socket<S>, st: &mut State, frames: &Counter) -> Result<(), Msg>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match msg.kind {
        Kind::Binary => {}
        Kind::Text if !st.swallow_hello => {}
        _ => return Err(msg),
    }
    if browser.try_relay(&msg.wire).is_err() {
        return Err(msg);
    }
    frames.inc();
    note_ack(&msg, &mut st.outbox);
    Ok(())
}

/// Acks are read after the frame is forwarded: off its path to the
/// browser. Only a frame written and not yet acked can be acked: with none,
/// the reply is not looked into.
fn note_ack(msg: &Msg, outbox: &mut Outbox) {
    if msg.kind == Kind::Text
        && outbox.unacked() > 0
        && let Some(id) = outbox::acked_id(&msg.payload())
    {
        outbox.ack(&id);
    }
}

/// A fresh upstream: name the session, rewind the outbox (what was never
/// acked goes again, written by the session's poll), start
/// keepalive and the lease.
/// A live session ends when its User is suspended or spends its budget
/// meanwhile: checked before each upstream connect and at each renewal of
/// the session Lease, from the relay's cache.
fn still_allowed(relay: &Relay, target: &Target) -> Result<(), Error> {
    match relay.directory.user(&target.namespace, &target.user) {
        Some(user) => super::auth::may_have_session(&user),
        None => Err(Error::Forbidden("user gone")),
    }
}

async fn on_connected(
    relay: &Relay,
    target: &Target,
    session: &str,
    st: &mut State,
    mut ws: Upstream,
) -> std::io::Result<Upstream> {
    ws.send_text(hello(session)).await?;
    let resent = st.outbox.rewind();
    if resent > 0 {
        relay.metrics.resent_frames.inc_by(resent as u64);
        info!(resent, "upstream reconnected: resending unacknowledged frames");
    } else {
        debug!("upstream connected");
    }
    st.swallow_hello = true;
    st.failing_since = None;
    st.backoff = None;
    let now = Instant::now();
    st.next_keepalive = now + relay.config.keepalive_interval;
    st.next_lease = now + relay.leases.refresh;
    relay.leases.connected(&target.namespace, &target.sprite);
    Ok(ws)
}

/// The upstream went away under a live session (the VM slept, the runtime
/// restarted for an update): drop it and reconnect at once. A frame it was
/// still writing goes again on the next connection: an outbox frame is
/// still there, unsent; a passed-through one is queued (and the outbox may
/// be full: the session's error).
fn on_upstream_lost(
    relay: &Relay,
    st: &mut State,
    up: &mut Option<Upstream>,
    span: &Span,
) -> Result<(), Error> {
    if let Some(wire) = up.take().and_then(|mut ws| ws.take_pending())
        && !std::mem::take(&mut st.flushing)
    {
        let len = wire.len();
        st.outbox.push_text(wire, len, None)?;
    }
    st.flushing = false;
    relay.metrics.upstream_drops.inc();
    info!(parent: span, unacked = st.outbox.unacked(), "upstream closed: reconnecting");
    st.swallow_hello = false;
    st.retry_at = Some(Instant::now());
    st.next_keepalive = Instant::now() + NEVER;
    st.next_lease = Instant::now() + NEVER;
    Ok(())
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
async fn answer_hello<S>(browser: &mut Socket<S>, session: &str, id: Option<&str>) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if let Some(id) = id {
        let ack = serde_json::json!({"type": "ack", "payload": {"id": id, "status": "processed"}});
        browser.send_text(ack.to_string()).await?;
    }
    browser.send_text(hello(session)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_names_the_session() {
        let v: serde_json::Value = serde_json::from_str(&hello("s-1")).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type": "hello", "payload": {"session": "s-1"}})
        );
    }
}
