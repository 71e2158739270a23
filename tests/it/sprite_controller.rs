//! The Sprite reconciler against the real apiserver and the simulator.

use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use kube::api::{DeleteParams, PostParams};
use serde_json::{Value, json};
use sprite_operator::api::Sprite;
use sprite_operator::api::conditions::is_true;
use sprite_operator::api::sprite::SpritePhase;
use sprite_operator::config::OperatorConfig;
use sprite_operator::controller::{self, Context};
use sprite_operator::runtime::EMBEDDED_VERSION;
use sprite_operator::sim::{SimConfig, SimHandle};
use sprite_operator::sprites::SpritesClient;
use tokio_util::sync::CancellationToken;

use crate::common::{TestNs, eventually, example_docs};

pub const SIM_TOKEN: &str = "sim-test-token-7f3a";

/// A namespace, a simulator and a running controller scoped to the namespace.
pub struct Env {
    pub ns: TestNs,
    pub sim: Option<SimHandle>,
    pub sprites: SpritesClient,
    // Held for its Drop: the sim's VMs live in it.
    _data_dir: tempfile::TempDir,
    controller: Option<(CancellationToken, tokio::task::JoinHandle<()>)>,
    pub config: OperatorConfig,
    pub clock: Arc<dyn controller::Clock>,
}

/// pip arguments that install from the wheelhouse `make test` prepared, so
/// VMs need no package index (decision 15).
pub fn test_config() -> OperatorConfig {
    // A resync of seconds, not minutes: what a test waits for without an
    // event (an unlabelled Secret gone, say) comes within its timeouts.
    let mut config = OperatorConfig {
        resync: Duration::from_secs(20),
        ..OperatorConfig::default()
    };
    // The enterprise tier (OWNER's) allows any schedule here: the heartbeat
    // tests tick every few seconds.
    let enterprise = config
        .tiers
        .get_mut(&sprite_operator::api::Tier::Enterprise)
        .expect("a default tier");
    enterprise.min_heartbeat_interval = Duration::from_secs(1);
    match std::env::var_os("SPRITE_WHEELHOUSE") {
        Some(w) => config.with_wheelhouse(std::path::Path::new(&w)),
        None => config,
    }
}

impl Env {
    pub async fn new(prefix: &str) -> Option<Env> {
        Self::with_sim(prefix, |c| c).await
    }

    pub async fn with_sim(prefix: &str, tune: impl FnOnce(SimConfig) -> SimConfig) -> Option<Env> {
        Self::with(prefix, tune, test_config(), Arc::new(controller::SystemClock)).await
    }

    pub async fn with(
        prefix: &str,
        tune: impl FnOnce(SimConfig) -> SimConfig,
        config: OperatorConfig,
        clock: Arc<dyn controller::Clock>,
    ) -> Option<Env> {
        let ns = TestNs::new(prefix).await?;
        let data_dir = tempfile::tempdir().unwrap();
        let mut cfg = SimConfig::new(data_dir.path(), SIM_TOKEN);
        cfg.wake_delay = Duration::from_millis(20);
        let sim = sprite_operator::sim::start(tune(cfg)).await.expect("sim starts");
        let sprites = SpritesClient::new(&sim.url(), SIM_TOKEN).unwrap();
        let mut env = Env {
            ns,
            sim: Some(sim),
            sprites,
            _data_dir: data_dir,
            controller: None,
            config,
            clock,
        };
        // Every Sprite belongs to a User: the ones that name none get this one.
        apply(&env.ns, &user_doc(OWNER, "enterprise")).await;
        env.start_controller();
        Some(env)
    }

    pub fn sim(&self) -> &SimHandle {
        self.sim.as_ref().expect("sim running")
    }

    pub fn start_controller(&mut self) {
        let client = self.ns.client.clone();
        self.start_controller_as(client, false);
    }

    /// Replaces the controller with one that watches `namespaces`.
    pub async fn start_controller_over(&mut self, namespaces: Vec<String>) {
        self.kill_controller().await;
        let ctx = Arc::new(Context::new(
            self.ns.client.clone(),
            self.sprites.clone(),
            self.config.clone(),
            self.clock.clone(),
        ));
        let token = CancellationToken::new();
        let handle = tokio::spawn(controller::run(ctx, namespaces, token.clone()));
        self.controller = Some((token, handle));
    }

    /// Runs the controller with `client`'s credentials (e.g. a
    /// ServiceAccount token), optionally behind leader election.
    pub fn start_controller_as(&mut self, client: kube::Client, leader_election: bool) {
        let ctx = Arc::new(Context::new(
            client.clone(),
            self.sprites.clone(),
            self.config.clone(),
            self.clock.clone(),
        ));
        let token = CancellationToken::new();
        let ns = self.ns.name.clone();
        let handle = if leader_election {
            let settings = controller::leader::LeaseSettings {
                namespace: ns.clone(),
                name: "sprite-operator-controller".into(),
                identity: "it-controller".into(),
                duration_secs: 15,
                grace_secs: 5,
            };
            let shutdown = token.clone();
            tokio::spawn(async move {
                controller::leader::run_as_leader(client, settings, shutdown, move |t| {
                    controller::run(ctx, Some(ns), t)
                })
                .await
                .expect("leader election");
            })
        } else {
            tokio::spawn(controller::run(ctx, Some(ns), token.clone()))
        };
        self.controller = Some((token, handle));
    }

    /// Kills the controller as a crash would: no graceful shutdown.
    pub async fn kill_controller(&mut self) {
        if let Some((_, handle)) = self.controller.take() {
            handle.abort();
            let _ = handle.await;
        }
    }

    pub async fn stats(&self) -> Value {
        reqwest::Client::new()
            .get(format!("{}/sim/stats", self.sim().url()))
            .bearer_auth(SIM_TOKEN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Calls the sim recorded for `vm` matching `route` (e.g. `POST /v1/sprites`).
    pub async fn count_calls(&self, route: &str, vm: Option<&str>) -> usize {
        let stats = self.stats().await;
        stats["calls"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["route"] == route && vm.is_none_or(|v| c["sprite"] == v))
            .count()
    }

    pub async fn wakes(&self, vm: &str) -> u64 {
        self.stats().await["vms"][vm]["total_wakes"].as_u64().unwrap_or(0)
    }

    pub async fn apply_example(&self, file: &str) {
        for doc in example_docs(file) {
            apply(&self.ns, &doc).await;
        }
    }

    pub async fn wait_ready(&self, name: &str, secs: u64) -> Sprite {
        let api = self.ns.api::<Sprite>();
        eventually(&format!("Sprite {name} to be Ready"), secs, || async {
            let s = api.get(name).await.map_err(|e| e.to_string())?;
            let status = s.status.clone().unwrap_or_default();
            if is_true(&status.conditions, "Ready") && status.phase == Some(SpritePhase::Active) {
                Ok(s)
            } else {
                Err(format!("{status:?}"))
            }
        })
        .await
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some((token, handle)) = self.controller.take() {
            token.cancel();
            handle.abort();
        }
    }
}

/// A Sprite's status (the default while it has none).
pub async fn status_of(ns: &TestNs, name: &str) -> sprite_operator::api::SpriteStatus {
    ns.api::<Sprite>()
        .get(name)
        .await
        .unwrap()
        .status
        .unwrap_or_default()
}

pub async fn apply(ns: &TestNs, doc: &Value) {
    sprite_operator::testenv::apply_doc(&ns.client, &ns.name, doc, "it-test")
        .await
        .unwrap_or_else(|e| panic!("apply {}: {e}", doc["kind"]));
}

/// The User that [`Env`] makes in every namespace, and that [`sprite_doc`]
/// names when the spec names none.
pub const OWNER: &str = "owner";

/// A Sprite; without a `userRef` in `spec` it belongs to [`OWNER`].
pub fn sprite_doc(name: &str, mut spec: Value) -> Value {
    if spec.get("userRef").is_none() {
        spec["userRef"] = json!({"name": OWNER});
    }
    json!({"apiVersion": "sprite-operator.dev/v1alpha1", "kind": "Sprite", "metadata": {"name": name}, "spec": spec})
}

/// A User without a primary Sprite template.
pub fn user_doc(name: &str, tier: &str) -> Value {
    json!({"apiVersion": "sprite-operator.dev/v1alpha1", "kind": "User", "metadata": {"name": name},
        "spec": {"email": format!("{name}@example.com"), "subject": format!("it|{name}|{}", uuid::Uuid::new_v4().simple()), "tier": tier}})
}

/// Opens a WebSocket to the runtime server through the sim's TCP proxy and
/// returns the pong's payload.
pub async fn ping_runtime(sprites: &SpritesClient, vm: &str) -> Result<Value, String> {
    use tokio_tungstenite::tungstenite::Message;
    let stream = sprites
        .proxy(vm, "localhost", 8765)
        .await
        .map_err(|e| e.to_string())?;
    let (mut ws, _) = tokio_tungstenite::client_async("ws://localhost:8765/", stream)
        .await
        .map_err(|e| format!("websocket handshake through the proxy: {e}"))?;
    let ping = json!({"type": "ping", "payload": {"n": 1}, "id": "p1"});
    ws.send(Message::Text(ping.to_string().into()))
        .await
        .map_err(|e| e.to_string())?;
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .map_err(|_| "no reply in 10s".to_string())?
            .ok_or("socket closed")?
            .map_err(|e| e.to_string())?;
        if let Message::Text(t) = msg {
            let v: Value = serde_json::from_str(&t).map_err(|e| e.to_string())?;
            if v["type"] == "pong" {
                return Ok(v["payload"].clone());
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_sprite_becomes_ready_with_the_documented_layout() {
    let Some(env) = Env::new("sprite-ready").await else {
        return;
    };
    // The example's Sprite names alice; she comes without a primary Sprite here.
    apply(&env.ns, &user_doc("alice", "enterprise")).await;
    env.apply_example("secret-api-keys.yaml").await;
    env.apply_example("sprite.yaml").await;
    let s = env.wait_ready("research", 180).await;
    let status = s.status.unwrap();
    assert_eq!(status.deployed_version.as_deref(), Some(EMBEDDED_VERSION.trim()));
    assert!(is_true(&status.conditions, "Bootstrapped"));
    assert!(is_true(&status.conditions, "UpToDate"));
    assert_eq!(status.observed_generation, s.metadata.generation);

    // The documented layout, read back through the filesystem API.
    let entries: Vec<String> = env
        .sprites
        .list_dir("alice-research", "/workspace")
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    for want in [
        "documents",
        "ocr",
        "artifacts",
        "memory",
        "transcripts",
        "src",
        ".venv",
        "requirements.txt",
        "VERSION",
        "agent.db",
    ] {
        assert!(
            entries.iter().any(|e| e == want),
            "{want} missing from /workspace: {entries:?}"
        );
    }
    let version = env
        .sprites
        .read_file("alice-research", "/workspace/VERSION")
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&version).trim(), EMBEDDED_VERSION.trim());

    // The secret reached the server through a 0600 file, not the exec URL.
    let env_file = env
        .sprites
        .list_dir("alice-research", "/workspace/.secrets")
        .await
        .unwrap();
    let f = env_file
        .iter()
        .find(|e| e.name == "server.env")
        .expect("server.env written");
    assert_eq!(
        f.mode.trim_start_matches('0'),
        "600",
        "server.env mode {}",
        f.mode
    );

    // The runtime answers on 8765 through the sim's proxy with the embedded version.
    let pong = eventually("the runtime server to answer a ping", 30, || {
        ping_runtime(&env.sprites, "alice-research")
    })
    .await;
    assert_eq!(
        pong["version"].as_str().map(str::trim),
        Some(EMBEDDED_VERSION.trim())
    );

    // One VM, created once.
    assert_eq!(env.count_calls("POST /v1/sprites", None).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletion_follows_the_deletion_policy() {
    let Some(env) = Env::new("sprite-delete").await else {
        return;
    };
    let api = env.ns.api::<Sprite>();
    for (name, policy) in [("doomed", "Delete"), ("kept", "Retain")] {
        let doc = sprite_doc(
            name,
            json!({"spriteName": format!("vm-{name}"), "deletionPolicy": policy}),
        );
        api.create(&PostParams::default(), &serde_json::from_value(doc).unwrap())
            .await
            .unwrap();
    }
    env.wait_ready("doomed", 180).await;
    env.wait_ready("kept", 180).await;
    for name in ["doomed", "kept"] {
        api.delete(name, &DeleteParams::default()).await.unwrap();
    }
    for name in ["doomed", "kept"] {
        eventually(&format!("Sprite {name} to be gone"), 60, || async {
            match api.get_opt(name).await {
                Ok(None) => Ok(()),
                Ok(Some(s)) => Err(format!("still there: finalizers {:?}", s.metadata.finalizers)),
                Err(e) => Err(e.to_string()),
            }
        })
        .await;
    }
    assert!(
        matches!(
            env.sprites.get_sprite("vm-doomed").await,
            Err(sprite_operator::sprites::Error::NotFound { .. })
        ),
        "Delete policy must delete the VM"
    );
    assert!(
        env.sprites.get_sprite("vm-kept").await.is_ok(),
        "Retain policy must keep the VM"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_vm_with_our_name_is_left_untouched() {
    let Some(env) = Env::new("sprite-conflict").await else {
        return;
    };
    env.sprites
        .create_sprite(&sprite_operator::sprites::CreateSprite {
            name: "taken".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let api = env.ns.api::<Sprite>();
    let doc = sprite_doc("mine", json!({"spriteName": "taken"}));
    api.create(&PostParams::default(), &serde_json::from_value(doc).unwrap())
        .await
        .unwrap();
    eventually("a NameConflict condition", 60, || async {
        let s = api.get("mine").await.map_err(|e| e.to_string())?;
        let st = s.status.unwrap_or_default();
        if is_true(&st.conditions, "NameConflict") {
            Ok(())
        } else {
            Err(format!("{st:?}"))
        }
    })
    .await;
    api.delete("mine", &DeleteParams::default()).await.unwrap();
    eventually("the Sprite to be gone", 60, || async {
        match api.get_opt("mine").await {
            Ok(None) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert!(
        env.sprites.get_sprite("taken").await.is_ok(),
        "someone else's VM was deleted"
    );
    // Nothing ever ran inside it.
    assert_eq!(env.wakes("taken").await, 0);
}
