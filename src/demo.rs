//! `sprite-operator demo`: the whole product on one machine. A local control
//! plane (unless a kubeconfig is given), the simulator as the embedded
//! Sprites.dev, the controller and the relay in this process, the examples
//! applied, and a page where a person talks to their Sprite through the
//! relay.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::response::Html;
use axum::routing::get;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{Api, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::api::conditions::is_true;
use crate::api::{EXAMPLE_FILES, Sprite, User};
use crate::config::OperatorConfig;
use crate::controller::{self, Context};
use crate::relay::{self, Connector, Directory, JwtVerifier, RelayConfig};
use crate::sim::{SimConfig, SimHandle};
use crate::sprites::SpritesClient;
use crate::testenv::{self, ControlPlane};

pub const NAMESPACE: &str = "demo";
/// The Sprite the page talks to: the primary Sprite of `examples/user.yaml`.
pub const DEMO_USER: &str = "alice";
pub const DEMO_SPRITE: &str = "alice-primary";

#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// Use this cluster instead of starting a local control plane.
    pub kubeconfig: Option<PathBuf>,
    /// Address of the page.
    pub listen: String,
    /// Where the simulator keeps its VMs (default: a temp dir).
    pub sim_dir: Option<PathBuf>,
    /// The examples folder.
    pub examples: PathBuf,
    /// pip arguments for VMs (a wheelhouse; decision 15).
    pub pip_args: Vec<String>,
}

/// What the page needs to connect; served as `/config.json`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PageConfig {
    pub ws_url: String,
    pub token: String,
    pub sprite: String,
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("control plane: {0}")]
    ControlPlane(#[from] testenv::Error),
    #[error("kubernetes: {0}")]
    Kube(#[from] kube::Error),
    #[error("kubeconfig: {0}")]
    Kubeconfig(String),
    #[error("simulator: {0}")]
    Sim(#[from] crate::sim::SimError),
    #[error("relay: {0}")]
    Relay(#[from] crate::relay::Error),
    #[error("examples: {0}")]
    Examples(String),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, String),
}

/// A running demo; `shutdown` stops everything in reverse order.
pub struct Demo {
    pub page_url: String,
    pub page: PageConfig,
    pub kubeconfig: Option<PathBuf>,
    pub client: kube::Client,
    shutdown: CancellationToken,
    controller: tokio::task::JoinHandle<()>,
    page_server: tokio::task::JoinHandle<std::io::Result<()>>,
    relay: Option<relay::RelayHandle>,
    sim: Option<SimHandle>,
    _sim_dir: Option<tempfile::TempDir>,
    plane: Option<ControlPlane>,
}

fn say(line: &str) {
    println!("[demo] {line}");
}

/// Starts every part, applies the examples and waits until the demo Sprite
/// is Ready and its gateway token issued.
pub async fn start(opts: DemoOptions) -> Result<Demo, DemoError> {
    let t0 = Instant::now();
    let (plane, client, kubeconfig) = match &opts.kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path).map_err(|e| DemoError::Kubeconfig(e.to_string()))?;
            let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|e| DemoError::Kubeconfig(e.to_string()))?;
            say(&format!("using the cluster of {}", path.display()));
            (None, kube::Client::try_from(config)?, Some(path.clone()))
        }
        None => {
            say("starting a local control plane (etcd, kube-apiserver, kube-controller-manager)");
            let plane = ControlPlane::start(testenv::Options::from_env()?).await?;
            say(&format!(
                "control plane ready in {:.1}s",
                plane.startup.as_secs_f64()
            ));
            let client = plane.client().await?;
            let path = plane.kubeconfig_path().to_path_buf();
            (Some(plane), client, Some(path))
        }
    };
    testenv::install_crds(&client).await?;

    let (sim_tmp, sim_dir) = match &opts.sim_dir {
        Some(d) => (None, d.clone()),
        None => {
            let t = tempfile::Builder::new()
                .prefix("sprite-operator-demo-sim-")
                .tempdir()?;
            let p = t.path().to_path_buf();
            (Some(t), p)
        }
    };
    let sim_token = hex::encode(rand::random::<[u8; 16]>());
    let sim = crate::sim::start(SimConfig::new(&sim_dir, sim_token.clone())).await?;
    say(&format!("simulated Sprites.dev at {}", sim.url()));
    let sprites =
        SpritesClient::new(&sim.url(), sim_token).map_err(|e| DemoError::Examples(e.to_string()))?;

    let config = OperatorConfig {
        pip_args: opts.pip_args.clone(),
        ..OperatorConfig::default()
    };
    let ctx = Arc::new(Context::new(
        client.clone(),
        sprites.clone(),
        config,
        Arc::new(controller::SystemClock),
    ));
    let shutdown = CancellationToken::new();
    let controller = tokio::spawn(controller::run(
        ctx,
        Some(NAMESPACE.into()),
        shutdown.child_token(),
    ));

    let (directory, watch) = Directory::watch(client.clone(), Some(NAMESPACE));
    tokio::spawn(watch);
    let relay = relay::start(relay::Parts {
        config: RelayConfig {
            listen: "127.0.0.1:0".into(),
            ..RelayConfig::default()
        },
        directory,
        jwt: JwtVerifier::none(),
        connector: Connector::Sprites(sprites.clone()),
        kube: Some(client.clone()),
        background: None,
    })
    .await?;
    say(&format!("relay at {}", relay.ws_url()));

    apply_examples(&client, &opts.examples).await?;
    wait_ready(&client, Duration::from_secs(600)).await?;
    wait_listening(&client, &sprites).await?;
    let token = gateway_token(&client).await?;
    // The relay authenticates from its own watch cache: hand out the token
    // only once the relay knows it, or the first connect is refused.
    let want = crate::relay::gateway_token_sha256(&token);
    let t_cache = Instant::now();
    while !relay
        .relay()
        .directory
        .users()
        .iter()
        .any(|u| u.status.as_ref().and_then(|s| s.gateway_token_sha256.as_deref()) == Some(want.as_str()))
    {
        if t_cache.elapsed() > Duration::from_secs(60) {
            return Err(DemoError::Timeout(
                t_cache.elapsed(),
                "the relay to learn the gateway token".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let page = PageConfig {
        ws_url: format!("{}?sprite={DEMO_SPRITE}", relay.ws_url()),
        token,
        sprite: DEMO_SPRITE.into(),
    };
    let listener = tokio::net::TcpListener::bind(&opts.listen).await?;
    let addr: SocketAddr = listener.local_addr()?;
    let app = Router::new()
        .route("/", get(|| async { Html(PAGE) }))
        .route(
            "/config.json",
            get(|State(p): State<PageConfig>| async move { axum::Json(p) }),
        )
        .with_state(page.clone());
    let stop = shutdown.child_token();
    let page_server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await
    });
    say(&format!("everything up in {:.1}s", t0.elapsed().as_secs_f64()));
    Ok(Demo {
        page_url: format!("http://{addr}/"),
        page,
        kubeconfig,
        client,
        shutdown,
        controller,
        page_server,
        relay: Some(relay),
        sim: Some(sim),
        _sim_dir: sim_tmp,
        plane,
    })
}

impl Demo {
    pub async fn shutdown(mut self) {
        if let Some(r) = self.relay.take() {
            r.shutdown().await;
        }
        self.shutdown.cancel();
        let _ = (&mut self.controller).await;
        let _ = (&mut self.page_server).await;
        if let Some(sim) = self.sim.take() {
            let _ = sim.shutdown().await;
        }
        drop(self.plane.take());
    }
}

async fn apply_examples(client: &kube::Client, dir: &std::path::Path) -> Result<(), DemoError> {
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": NAMESPACE}})).expect("static");
    match Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => return Err(e.into()),
    }
    for file in EXAMPLE_FILES {
        let path = dir.join(file);
        let text = std::fs::read_to_string(&path)
            .map_err(|e| DemoError::Examples(format!("{}: {e}", path.display())))?;
        let docs = serde_saphyr::from_multiple::<serde_json::Value>(&text)
            .map_err(|e| DemoError::Examples(format!("{file}: {e}")))?;
        for doc in docs {
            let obj = crate::testenv::apply_doc(client, NAMESPACE, &doc, "sprite-operator-demo").await?;
            let name = obj.metadata.name.unwrap_or_default();
            let kind = doc["kind"].as_str().unwrap_or_default();
            say(&format!("applied {file}: {kind} {name}"));
        }
        if file == "user.yaml" {
            // The User's primary Sprite must be its oldest, so that the
            // tier's quota admits it before the standalone examples.
            let sprites: Api<Sprite> = Api::namespaced(client.clone(), NAMESPACE);
            let t0 = Instant::now();
            while sprites.get_opt(DEMO_SPRITE).await?.is_none() {
                if t0.elapsed() > Duration::from_secs(60) {
                    return Err(DemoError::Timeout(
                        t0.elapsed(),
                        format!("the User to create {DEMO_SPRITE}"),
                    ));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    Ok(())
}

/// Waits for the demo Sprite, printing progress as phases change.
async fn wait_ready(client: &kube::Client, limit: Duration) -> Result<(), DemoError> {
    let sprites: Api<Sprite> = Api::namespaced(client.clone(), NAMESPACE);
    let t0 = Instant::now();
    let mut last = String::new();
    while t0.elapsed() < limit {
        let list = sprites.list(&Default::default()).await?;
        let line = list
            .items
            .iter()
            .map(|s| {
                let st = s.status.clone().unwrap_or_default();
                let step = st
                    .bootstrap
                    .and_then(|b| b.last_completed_step)
                    .map(|s| format!(" (bootstrap: {s:?} done)"))
                    .unwrap_or_default();
                format!(
                    "{}={}{}",
                    s.metadata.name.as_deref().unwrap_or("?"),
                    st.phase.map(|p| format!("{p:?}")).unwrap_or_else(|| "-".into()),
                    step
                )
            })
            .collect::<Vec<_>>()
            .join("  ");
        if line != last {
            say(&format!("{:>5.1}s  {line}", t0.elapsed().as_secs_f64()));
            last = line;
        }
        if let Some(s) = list
            .items
            .iter()
            .find(|s| s.metadata.name.as_deref() == Some(DEMO_SPRITE))
            && s.status
                .as_ref()
                .is_some_and(|st| is_true(&st.conditions, "Ready"))
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Err(DemoError::Timeout(
        limit,
        format!("Sprite {DEMO_SPRITE} to be Ready"),
    ))
}

/// Ready means the server was started; the page works once it listens.
async fn wait_listening(client: &kube::Client, sprites: &SpritesClient) -> Result<(), DemoError> {
    let vm = Api::<Sprite>::namespaced(client.clone(), NAMESPACE)
        .get(DEMO_SPRITE)
        .await?
        .status
        .and_then(|s| s.sprite_name)
        .unwrap_or_else(|| format!("{NAMESPACE}-{DEMO_SPRITE}"));
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(60) {
        if sprites
            .proxy(&vm, "localhost", crate::api::sprite::DEFAULT_PORT as u16)
            .await
            .is_ok()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Err(DemoError::Timeout(
        t0.elapsed(),
        format!("the runtime of {DEMO_SPRITE} to listen on 8765"),
    ))
}

async fn gateway_token(client: &kube::Client) -> Result<String, DemoError> {
    let users: Api<User> = Api::namespaced(client.clone(), NAMESPACE);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NAMESPACE);
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(60) {
        let has_hash = users
            .get_opt(DEMO_USER)
            .await?
            .and_then(|u| u.status)
            .and_then(|s| s.gateway_token_sha256)
            .is_some();
        if has_hash
            && let Some(s) = secrets
                .get_opt(&controller::user::gateway_secret_name(DEMO_USER))
                .await?
            && let Some(t) = s.data.as_ref().and_then(|d| d.get(controller::user::TOKEN_KEY))
        {
            return Ok(String::from_utf8_lossy(&t.0).into_owned());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Err(DemoError::Timeout(
        Duration::from_secs(60),
        "the gateway token".into(),
    ))
}

/// The demo page: one text box, messages out, replies in. It fetches the
/// relay URL and the user's gateway token from the demo (loopback only) and
/// offers the token as a WebSocket subprotocol, as a real front end would.
const PAGE: &str = include_str!("demo.html");
