//! `sprite-operator relay`: the WebSocket relay between browsers and their
//! user's Sprite ("the Bridge"). Authenticates (auth), picks the Sprite from
//! a watch cache (routing), connects through the Sprites.dev proxy
//! (upstream), relays frames, resends unacked ones after a VM slept and
//! keeps the VM awake only while the browser is active (session). See
//! `docs/relay.md`.
//!
//! In-process use (tests, the demo, benchmarks):
//! ```no_run
//! # async fn f(client: kube::Client, sprites: sprite_operator::sprites::SpritesClient) {
//! use sprite_operator::relay::{self, Connector, Directory, JwtVerifier, RelayConfig};
//! let (directory, watch) = Directory::watch(client.clone(), None);
//! tokio::spawn(watch);
//! let handle = relay::start(relay::Parts {
//!     config: RelayConfig { listen: "127.0.0.1:0".into(), ..Default::default() },
//!     directory,
//!     jwt: JwtVerifier::none(),
//!     connector: Connector::Sprites(sprites),
//!     kube: Some(client),
//!     background: None,
//! })
//! .await
//! .unwrap();
//! println!("{}", handle.ws_url());
//! handle.shutdown().await;
//! # }
//! ```

pub mod auth;
pub mod background;
pub mod error;
pub mod lease;
pub mod limits;
pub mod metrics;
pub mod outbox;
pub mod routing;
mod server;
pub mod session;
pub mod shutdown;
pub mod upstream;
mod wakeups;
pub mod wire;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::FutureExt;
use tokio_util::task::TaskTracker;

use crate::event_loop::{EventLoop, Spawner};

pub use auth::{JwtVerifier, SUBPROTOCOL, gateway_token_sha256};
pub use error::{Error, close};
pub use routing::{Directory, Target};
pub use upstream::Connector;

/// Everything tunable; `Default` holds the documented defaults.
#[derive(Clone, Debug)]
pub struct RelayConfig {
    /// `host:port` of `/ws`, `/healthz`, `/readyz`, `/metrics` (port 0: any).
    pub listen: String,
    /// Accept `?token=` (it ends up in access logs: off by default).
    pub allow_query_token: bool,
    /// After this long without a frame from the browser the upstream is
    /// closed so the VM can sleep; the browser stays connected.
    pub idle_timeout: Duration,
    /// Upstream WebSocket pings while the browser is active; below the VM's
    /// idle timeout (30 s on Sprites.dev).
    pub keepalive_interval: Duration,
    /// Pings to the browser, so that idle connections survive proxies.
    pub browser_ping_interval: Duration,
    /// Largest message either way (frames above it: close 1009).
    pub max_message_bytes: usize,
    pub outbox: outbox::Limits,
    pub max_connections_per_user: usize,
    /// Give up reconnecting to a VM after this long (close 1013).
    pub upstream_retry_for: Duration,
    /// One connection attempt (wake + proxy + handshake).
    pub connect_timeout: Duration,
    /// How long a session Lease says the session lasts, and how often a
    /// live session renews it.
    pub lease: Duration,
    pub lease_refresh: Duration,
    /// On shutdown, how long sessions get to close before the process exits.
    pub drain_timeout: Duration,
    /// Read buffer per socket, at its idle size: most of an idle session's
    /// memory (two sockets per session). A larger message grows it while
    /// it is read. Writes are not buffered: a relayed message goes to the
    /// socket as it came.
    pub read_buffer_bytes: usize,
    /// Longest a write to either side may wait for its peer to read; then
    /// the session ends. Backpressure is kept (a slow reader slows the
    /// sender); a reader that stopped does not hold the session forever.
    pub write_timeout: Duration,
    /// Event loops relaying sessions (`crate::event_loop`), a thread each;
    /// a session stays on the one it was given. One is an nginx worker's
    /// worth: more for more than one core's worth of traffic in one
    /// process (or more replicas).
    pub threads: usize,
    /// Where session Leases are written (the chart: the release namespace,
    /// the only one where the relay may write Leases); None: in each
    /// Sprite's own namespace.
    pub session_lease_namespace: Option<String>,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:8080".into(),
            allow_query_token: false,
            idle_timeout: Duration::from_secs(300),
            keepalive_interval: Duration::from_secs(10),
            browser_ping_interval: Duration::from_secs(30),
            max_message_bytes: 1 << 20,
            outbox: outbox::Limits::default(),
            max_connections_per_user: 8,
            upstream_retry_for: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(30),
            lease: Duration::from_secs(120),
            lease_refresh: Duration::from_secs(60),
            drain_timeout: Duration::from_secs(10),
            read_buffer_bytes: 4 * 1024,
            write_timeout: Duration::from_secs(60),
            threads: 1,
            session_lease_namespace: None,
        }
    }
}

impl RelayConfig {
    /// Both sockets of a session have the same limits; their timers go to
    /// `timers`.
    pub(crate) fn socket_limits(&self, timers: crate::timers::Timers) -> wire::Limits {
        wire::Limits {
            read_buffer: self.read_buffer_bytes,
            max_message: self.max_message_bytes,
            write_timeout: self.write_timeout,
            timers,
        }
    }

    fn validate(&self) -> Result<(), Error> {
        let bad = |m: &str| Err(Error::Config(m.into()));
        if self.outbox.max_bytes < self.max_message_bytes {
            return bad("the outbox byte bound must hold at least one message of the maximum size");
        }
        if self.keepalive_interval.is_zero() || self.browser_ping_interval.is_zero() {
            return bad("ping intervals must be positive");
        }
        if self.write_timeout.is_zero() {
            return bad("the write timeout must be positive");
        }
        if self.lease_refresh >= self.lease {
            return bad("the lease must be refreshed before it runs out");
        }
        if self.max_connections_per_user == 0 || self.read_buffer_bytes == 0 || self.threads == 0 {
            return bad("limits and buffers must be positive");
        }
        Ok(())
    }
}

/// State shared by the server and every session.
pub struct Relay {
    pub config: RelayConfig,
    pub directory: Directory,
    pub jwt: JwtVerifier,
    pub connector: Connector,
    pub metrics: metrics::Metrics,
    pub limits: Arc<limits::ConnectionLimits>,
    pub leases: lease::Leases,
    pub shutdown: shutdown::Shutdown,
    /// Timers, watch and lease writes, off the event loop.
    pub background: background::Background,
    /// Where sessions run, in turn. Spawners only: the loops stop with the
    /// [`RelayHandle`], not with this (which every session holds).
    loops: Vec<Spawner>,
    next_loop: AtomicUsize,
    /// Upstream connections on those loops.
    dial: upstream::LoopDial,
    sessions: TaskTracker,
}

impl Relay {
    /// Runs the session `make` builds on one of the relay's event loops,
    /// counted among its sessions until it ends. `make` runs there: the
    /// sockets it takes over belong to that loop.
    pub(crate) fn spawn_session<F, Fut>(&self, make: F)
    where
        F: FnOnce() -> Option<Fut> + Send + 'static,
        Fut: std::future::Future<Output = ()> + 'static,
    {
        let i = self.next_loop.fetch_add(1, Ordering::Relaxed) % self.loops.len();
        let token = self.sessions.token();
        // `map`, not `async move { session.await; drop(token) }`: an async
        // block keeps what it captured apart from what it awaits, so the
        // session's future would be stored twice (7.3 KiB per session
        // where one copy is 3.6; massif).
        self.loops[i].spawn_with(move || Some(make()?.map(move |()| drop(token))));
    }
}

/// What [`start`] needs.
pub struct Parts {
    pub config: RelayConfig,
    pub directory: Directory,
    pub jwt: JwtVerifier,
    pub connector: Connector,
    /// For the session Leases; None: no Lease is written.
    pub kube: Option<kube::Client>,
    /// Where the sessions' timers and the lease writes run; None: a new
    /// one. `sprite-operator relay` passes the one its cache watch and kube
    /// client already run on.
    pub background: Option<background::Background>,
}

/// A running relay.
pub struct RelayHandle {
    addr: SocketAddr,
    relay: Arc<Relay>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    /// The relay's event loops: dropped with the handle, they stop and drop
    /// the sessions they still have.
    _loops: Vec<EventLoop>,
    /// Set by [`start_on_event_loop`]: dropped with the handle, it ends the
    /// relay's own front runtime.
    _front: Option<tokio::sync::oneshot::Sender<()>>,
}

impl RelayHandle {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `ws://addr/ws`.
    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    pub fn relay(&self) -> &Arc<Relay> {
        &self.relay
    }

    /// Stops accepting, closes every session with 1001 and waits (up to the
    /// drain timeout) for them to finish.
    pub async fn shutdown(self) {
        self.relay.shutdown.trigger();
        let _ = self.server.await;
        self.relay.sessions.close();
        let drain = self.relay.sessions.wait();
        if self
            .relay
            .background
            .timers()
            .timeout(self.relay.config.drain_timeout, drain)
            .await
            .is_err()
        {
            tracing::warn!(
                left = self.relay.sessions.len(),
                "sessions still open after the drain timeout"
            );
        }
    }

    /// Resolves when the relay has been asked to stop.
    pub async fn stopped(&self) {
        self.relay.shutdown.triggered().await
    }
}

/// The runtime of the relay's HTTP side, as `sprite-operator relay` builds
/// it: the listener, admission and the upgrade, `/metrics` and the probes.
/// Frames are relayed on the relay's own event loops instead
/// ([`crate::event_loop`], `RelayConfig::threads`), and its timers live on
/// its background runtime ([`crate::timers`]), so this one needs neither
/// more than one thread nor a time driver.
pub fn front_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_io().build()
}

/// Binds and serves; returns once listening.
pub async fn start(parts: Parts) -> Result<RelayHandle, Error> {
    parts.config.validate()?;
    let listener = tokio::net::TcpListener::bind(&parts.config.listen).await?;
    let addr = listener.local_addr()?;
    let background = match parts.background {
        Some(b) => b,
        None => background::Background::start()?,
    };
    // The upstream's timers (connect retries and timeouts) too.
    let connector = parts.connector.with_timers(background.timers());
    let loops = (0..parts.config.threads)
        .map(|i| EventLoop::start(&format!("relay-loop-{i}")))
        .collect::<std::io::Result<Vec<_>>>()?;
    let dial = upstream::LoopDial {
        dns: background.handle().clone(),
    };
    let relay = Arc::new(Relay {
        leases: lease::Leases::new(
            parts.kube.map(|c| (c, background.handle().clone())),
            parts.config.session_lease_namespace.clone(),
            parts.config.lease,
            parts.config.lease_refresh,
        ),
        background,
        config: parts.config,
        directory: parts.directory,
        jwt: parts.jwt,
        connector,
        metrics: metrics::Metrics::default(),
        limits: Arc::new(limits::ConnectionLimits::default()),
        shutdown: shutdown::Shutdown::default(),
        loops: loops.iter().map(EventLoop::spawner).collect(),
        next_loop: AtomicUsize::new(0),
        dial,
        sessions: TaskTracker::new(),
    });
    let server = tokio::spawn(server::serve(listener, relay.clone()));
    tracing::info!(%addr, "relay listening");
    Ok(RelayHandle {
        addr,
        relay,
        server,
        _loops: loops,
        _front: None,
    })
}

/// [`start`] on a front runtime of its own, on a new thread, built as
/// `sprite-operator relay` builds it ([`front_runtime`]), with `threads`
/// event loops. Nothing of the relay then runs on the caller's runtime, and
/// a tokio timer or socket made where the relay has no runtime for it
/// panics here as it would in production. For in-process use (the tests).
/// The front runtime ends with the handle (dropped, or after
/// [`RelayHandle::shutdown`]).
pub async fn start_on_event_loop(mut parts: Parts, threads: usize) -> Result<RelayHandle, Error> {
    let rt = front_runtime()?;
    parts.config.threads = threads;
    let (started_tx, started) = tokio::sync::oneshot::channel();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    std::thread::Builder::new()
        .name("relay-front".into())
        .spawn(move || {
            rt.block_on(async move {
                let _ = started_tx.send(start(parts).await);
                // Until the handle drops its sender.
                let _ = stopped.await;
            })
        })?;
    let mut handle = started
        .await
        .map_err(|_| Error::Config("the relay's front runtime ended before it started".into()))??;
    handle._front = Some(stop);
    Ok(handle)
}
