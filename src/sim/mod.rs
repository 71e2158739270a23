//! `sprite-operator sim`: a Sprites.dev-compatible server for tests and the demo. Each VM is a
//! directory that commands see as `/workspace`, inside a private mount namespace and a network
//! namespace of its own; exec really runs commands, the proxy really connects, VMs sleep when
//! idle and count their wakes, and faults can be injected. See `docs/simulator.md`.

mod admin;
mod app;
mod checkpoints;
mod emulate;
mod exec;
pub mod faults;
mod fs;
mod ns;
mod proxy;
mod rest;
mod server;
mod state;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::sprites::Token;
pub use admin::{Stats, VmStats};
pub use app::CallRecord;
pub use faults::{ClassFaults, Faults};
pub use ns::WORKSPACE;

/// How to run the simulator.
#[derive(Clone)]
pub struct SimConfig {
    /// `host:port`; port 0 picks a free one (see [`SimHandle::addr`]).
    pub listen: String,
    pub data_dir: PathBuf,
    pub token: String,
    /// Without activity for this long a VM suspends (`warm`).
    pub idle_timeout: Duration,
    /// A suspended VM goes `cold` after this much longer.
    pub cold_after: Duration,
    /// Added to the first call that wakes a sleeping VM.
    pub wake_delay: Duration,
    pub faults: Faults,
    /// Benchmark VMs: commands are emulated, not run (`emulate.rs`). Never
    /// the default; correctness tests never use it.
    pub bench_vms: bool,
}

impl SimConfig {
    /// Defaults: loopback with a free port, 30 s idle timeout, 5 min to cold, 300 ms wake delay.
    pub fn new(data_dir: impl Into<PathBuf>, token: impl Into<String>) -> Self {
        Self {
            listen: "127.0.0.1:0".into(),
            data_dir: data_dir.into(),
            token: token.into(),
            idle_timeout: Duration::from_secs(30),
            cold_after: Duration::from_secs(300),
            wake_delay: Duration::from_millis(300),
            faults: Faults::default(),
            bench_vms: false,
        }
    }
}

impl fmt::Debug for SimConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimConfig")
            .field("listen", &self.listen)
            .field("data_dir", &self.data_dir)
            .field("token", &"<redacted>")
            .field("idle_timeout", &self.idle_timeout)
            .field("cold_after", &self.cold_after)
            .field("wake_delay", &self.wake_delay)
            .field("faults", &self.faults)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("cannot use data dir {path}: {source}")]
    DataDir { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    State(#[from] state::StateError),
    #[error(transparent)]
    Namespaces(#[from] ns::NsError),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
    #[error("server failed: {0}")]
    Serve(std::io::Error),
    #[error("bad configuration: {0}")]
    Config(String),
}

/// A running simulator. Dropping it stops the server and kills the VMs' processes; prefer
/// [`SimHandle::shutdown`], which also waits.
pub struct SimHandle {
    addr: SocketAddr,
    sim: Arc<app::Sim>,
    server: Option<JoinHandle<std::io::Result<()>>>,
}

impl fmt::Debug for SimHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimHandle")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl SimHandle {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://addr`, the base URL for [`crate::sprites::SpritesClient::new`].
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Calls in the record (it keeps the newest 100 000).
    pub fn stats_calls(&self) -> usize {
        app::lock(&self.sim.calls).len()
    }

    /// Stops serving, kills every VM process, unpins the network namespaces (they are made
    /// again on demand), and waits for the server to finish.
    pub async fn shutdown(mut self) -> Result<(), SimError> {
        self.stop_now();
        let names: Vec<String> = app::lock(&self.sim.vms).keys().cloned().collect();
        for name in &names {
            for s in self.sim.sessions_of(name) {
                s.wait_exit(Duration::from_secs(5)).await;
            }
        }
        if let Some(server) = self.server.take() {
            match tokio::time::timeout(Duration::from_secs(5), server).await {
                Ok(Ok(Err(e))) => return Err(SimError::Serve(e)),
                Ok(_) => {}
                Err(_) => tracing::warn!("sim server did not stop within 5s"),
            }
        }
        Ok(())
    }

    fn stop_now(&self) {
        self.sim.shutdown.cancel();
        for s in app::lock(&self.sim.sessions).values() {
            s.kill(nix::sys::signal::Signal::SIGKILL);
        }
        for name in app::lock(&self.sim.vms).keys() {
            ns::remove_netns(&self.sim.paths(name).netns());
        }
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        if self.server.is_some() {
            self.stop_now();
        }
    }
}

/// Starts the simulator in this process and returns once it listens.
pub async fn start(config: SimConfig) -> Result<SimHandle, SimError> {
    if config.token.is_empty() {
        return Err(SimError::Config("the token must not be empty".into()));
    }
    config
        .faults
        .validate()
        .map_err(|e| SimError::Config(e.to_string()))?;
    let data_dir = config.data_dir.clone();
    std::fs::create_dir_all(data_dir.join("vms")).map_err(|source| SimError::DataDir {
        path: data_dir.clone(),
        source,
    })?;
    let data_dir = data_dir.canonicalize().map_err(|source| SimError::DataDir {
        path: data_dir.clone(),
        source,
    })?;
    ns::probe(&data_dir)?;
    let now = Instant::now();
    let vms: BTreeMap<_, _> = state::load(&data_dir)?
        .into_iter()
        .map(|m| (m.name.clone(), state::Vm::new(m, now)))
        .collect();
    let sim = Arc::new(app::Sim {
        settings: app::Settings {
            data_dir,
            token: Token::new(config.token.clone()),
            idle_timeout: config.idle_timeout,
            cold_after: config.cold_after,
            wake_delay: config.wake_delay,
            bench_vms: config.bench_vms,
        },
        vms: Mutex::new(vms),
        sessions: Mutex::new(HashMap::new()),
        faults: Mutex::new(faults::Injector::new(config.faults.clone())),
        calls: Mutex::new(VecDeque::new()),
        shutdown: CancellationToken::new(),
    });
    let listener = tokio::net::TcpListener::bind(&config.listen)
        .await
        .map_err(|source| SimError::Bind {
            addr: config.listen.clone(),
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| SimError::Bind {
        addr: config.listen.clone(),
        source,
    })?;
    let app = server::router(sim.clone());
    let stop = sim.shutdown.clone();
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await
    });
    tokio::spawn(idle_loop(sim.clone()));
    tracing::info!(%addr, vms = app::lock(&sim.vms).len(), "sim listening");
    Ok(SimHandle {
        addr,
        sim,
        server: Some(server),
    })
}

async fn idle_loop(sim: Arc<app::Sim>) {
    let period =
        (sim.settings.idle_timeout / 10).clamp(Duration::from_millis(10), Duration::from_millis(500));
    let mut tick = tokio::time::interval(period);
    loop {
        tokio::select! {
            _ = tick.tick() => sim.tick(Instant::now()),
            _ = sim.shutdown.cancelled() => return,
        }
    }
}

/// `sprite-operator sim`: serves until SIGINT or SIGTERM.
pub async fn run(config: SimConfig) -> Result<(), SimError> {
    let handle = start(config).await?;
    wait_for_signal().await;
    tracing::info!("sim stopping");
    handle.shutdown().await
}

async fn wait_for_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}
