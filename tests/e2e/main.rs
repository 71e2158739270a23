//! The kind end-to-end test. `hack/kind/e2e.sh` (`make e2e-kind`) creates a
//! kind cluster, loads the operator and simulator images, installs the chart
//! with the simulator as a Deployment, and runs this binary against it:
//!
//! 1. apply every example into a fresh namespace;
//! 2. wait for the User and its Sprites to be Ready (on timeout: the object,
//!    the namespace's Events; the script adds the pods' logs);
//! 3. open a relay session as a browser does, through a port-forward to a
//!    relay pod, and round-trip a message to the runtime on the VM;
//! 4. delete the Sprite (`deletionPolicy: Delete`) and see its VM gone from
//!    the simulator, read through a port-forward to the sim pod.
//!
//! It is not part of `cargo test` (`test = false`): without a cluster it has
//! nothing to run against, and it is never skipped: missing settings fail.
//! Every connection goes to the kind API server on 127.0.0.1 or through it.

use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use k8s_openapi::api::core::v1::{Event, Namespace, Pod, Secret};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::{Value, json};
use sprite_operator::api::conditions::is_true;
use sprite_operator::api::{EXAMPLE_FILES, Sprite, User};
use sprite_operator::relay::SUBPROTOCOL;
use sprite_operator::sprites::{Error as SpritesError, SpritesClient};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// What the script tells this test about the installed release.
struct Release {
    namespace: String,
    instance: String,
}

impl Release {
    fn from_env() -> Release {
        let var = |k: &str| {
            std::env::var(k).unwrap_or_else(|_| panic!("{k} is not set: run this test with `make e2e-kind`"))
        };
        assert!(
            std::env::var_os("KUBECONFIG").is_some(),
            "KUBECONFIG is not set: run this test with `make e2e-kind`"
        );
        Release {
            namespace: var("E2E_RELEASE_NAMESPACE"),
            instance: var("E2E_RELEASE"),
        }
    }
}

fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "[e2e] {line}");
}

fn example_docs(file: &str) -> Vec<Value> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_saphyr::from_multiple::<Value>(&text).expect("example parses")
}

async fn apply(client: &kube::Client, ns: &str, doc: &Value) {
    sprite_operator::testenv::apply_doc(client, ns, doc, "e2e-kind")
        .await
        .unwrap_or_else(|e| panic!("apply {} {}: {e}", doc["kind"], doc["metadata"]["name"]));
}

/// Prints what an operator would look at first, then panics.
async fn fail_with_dump(client: &kube::Client, ns: &str, what: &str, object: &impl serde::Serialize) -> ! {
    say(&format!("timed out waiting for {what}; the object:"));
    say(&serde_json::to_string_pretty(object).unwrap_or_default());
    if let Ok(events) = Api::<Event>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
    {
        say(&format!("events in {ns}:"));
        for e in events.items {
            say(&format!(
                "  {} {}/{}: {} {}",
                e.type_.unwrap_or_default(),
                e.involved_object.kind.unwrap_or_default(),
                e.involved_object.name.unwrap_or_default(),
                e.reason.unwrap_or_default(),
                e.message.unwrap_or_default()
            ));
        }
    }
    panic!("timed out waiting for {what}");
}

/// Polls until `ready` holds for the object; `state` names it for messages.
async fn wait_for<K>(
    client: &kube::Client,
    ns: &str,
    name: &str,
    state: &str,
    secs: u64,
    ready: impl Fn(&K) -> bool,
) -> K
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
    <K as kube::Resource>::DynamicType: Default,
{
    let api = Api::<K>::namespaced(client.clone(), ns);
    let what = format!("{} {name} to be {state}", K::kind(&Default::default()));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let start = Instant::now();
    loop {
        let last = api.get_opt(name).await;
        if let Ok(Some(obj)) = &last
            && ready(obj)
        {
            say(&format!("{what}: {:.0}s", start.elapsed().as_secs_f64()));
            return obj.clone();
        }
        if Instant::now() > deadline {
            let shown = match last {
                Ok(Some(obj)) => serde_json::to_value(obj).unwrap_or_default(),
                other => json!(format!("{other:?}")),
            };
            fail_with_dump(client, ns, &what, &shown).await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// A pod of one of the release's components, Running.
async fn component_pod(client: &kube::Client, release: &Release, component: &str) -> String {
    let pods = Api::<Pod>::namespaced(client.clone(), &release.namespace);
    let selector = format!(
        "app.kubernetes.io/instance={},app.kubernetes.io/component={component}",
        release.instance
    );
    let list = pods
        .list(&ListParams::default().labels(&selector))
        .await
        .expect("list pods");
    list.items
        .into_iter()
        .find(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
        .and_then(|p| p.metadata.name)
        .unwrap_or_else(|| panic!("no Running pod matches {selector}"))
}

/// Listens on 127.0.0.1 and carries every accepted connection to `port` of
/// the pod through the API server's port-forward, as `kubectl port-forward`
/// does. Returns the local address.
async fn port_forward(client: &kube::Client, ns: &str, pod: &str, port: u16) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().unwrap();
    let pods = Api::<Pod>::namespaced(client.clone(), ns);
    let pod = pod.to_string();
    tokio::spawn(async move {
        while let Ok((mut local, _)) = listener.accept().await {
            let (pods, pod) = (pods.clone(), pod.clone());
            tokio::spawn(async move {
                let mut forwarder = match pods.portforward(&pod, &[port]).await {
                    Ok(f) => f,
                    Err(e) => return say(&format!("port-forward to {pod}:{port}: {e}")),
                };
                let Some(mut upstream) = forwarder.take_stream(port) else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut local, &mut upstream).await;
                drop(upstream);
                let _ = forwarder.join().await;
            });
        }
    });
    addr
}

/// The Secret the chart made for a component (the sim's token).
async fn component_secret(client: &kube::Client, release: &Release, component: &str) -> String {
    let selector = format!(
        "app.kubernetes.io/instance={},app.kubernetes.io/component={component}",
        release.instance
    );
    Api::<Secret>::namespaced(client.clone(), &release.namespace)
        .list(&ListParams::default().labels(&selector))
        .await
        .expect("list secrets")
        .items
        .into_iter()
        .find_map(|s| s.metadata.name)
        .unwrap_or_else(|| panic!("no Secret matches {selector}"))
}

async fn secret_value(client: &kube::Client, ns: &str, name: &str, key: &str) -> String {
    let secret = Api::<Secret>::namespaced(client.clone(), ns)
        .get(name)
        .await
        .unwrap_or_else(|e| panic!("Secret {ns}/{name}: {e}"));
    let bytes = secret
        .data
        .and_then(|d| d.get(key).cloned())
        .unwrap_or_else(|| panic!("Secret {ns}/{name} has no {key}"));
    String::from_utf8(bytes.0).expect("utf-8 secret")
}

/// Sends one message through the relay as the runtime's protocol has it and
/// returns the pong's payload (after the ack).
async fn relay_round_trip(relay: std::net::SocketAddr, token: &str, sprite: &str, id: &str) -> Value {
    let mut req = format!("ws://{relay}/ws?sprite={sprite}")
        .into_client_request()
        .unwrap();
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        format!("{SUBPROTOCOL}, {token}").parse().unwrap(),
    );
    let (mut ws, resp) = tokio_tungstenite::connect_async(req)
        .await
        .expect("the relay accepts the gateway token");
    assert_eq!(
        resp.headers()
            .get("Sec-WebSocket-Protocol")
            .and_then(|v| v.to_str().ok()),
        Some(SUBPROTOCOL)
    );
    let msg = json!({"type": "ping", "payload": {"n": id}, "id": id});
    ws.send(Message::text(msg.to_string())).await.expect("send");
    let mut acked = false;
    let deadline = Duration::from_secs(120);
    loop {
        let next = tokio::time::timeout(deadline, ws.next())
            .await
            .expect("a reply within 120s")
            .expect("the relay keeps the session open")
            .expect("websocket frame");
        let Message::Text(text) = next else { continue };
        let v: Value = serde_json::from_str(&text).expect("json frame");
        match v["type"].as_str() {
            Some("ack") if v["payload"]["id"] == id => acked = true,
            Some("pong") => {
                assert!(acked, "the runtime acks a message before answering it");
                ws.close(None).await.ok();
                return v["payload"].clone();
            }
            Some("error") => panic!("the relay or runtime answered an error: {v}"),
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn examples_become_ready_serve_through_the_relay_and_delete_their_vm() {
    let release = Release::from_env();
    let client = kube::Client::try_default()
        .await
        .expect("kube client from KUBECONFIG");
    let ns = format!("e2e-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let namespace: Namespace = serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap();
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &namespace)
        .await
        .expect("create namespace");
    say(&format!("namespace {ns}"));

    // The examples in two rounds, so that which Sprites fit alice's tier is
    // certain: her primary and `research` first, then `custom`, the third,
    // which the starter tier (two Sprites) must hold back.
    let (first, second) = EXAMPLE_FILES.split_at(3);
    assert_eq!(second, ["sprite-configmap-runtime.yaml"], "the examples changed");
    for file in first {
        for doc in example_docs(file) {
            apply(&client, &ns, &doc).await;
        }
    }
    let user_ready = |u: &User| {
        u.status
            .as_ref()
            .is_some_and(|st| is_true(&st.conditions, "Ready"))
    };
    let sprite_is =
        |t: &'static str| move |s: &Sprite| s.status.as_ref().is_some_and(|st| is_true(&st.conditions, t));
    let sprite_ready = sprite_is("Ready");
    // Two VMs bootstrap at once on the cluster's one node (venv + pip).
    wait_for::<User>(&client, &ns, "alice", "Ready", 300, user_ready).await;
    let research = wait_for::<Sprite>(&client, &ns, "research", "Ready", 600, sprite_ready).await;
    let vm = research.vm_name();
    wait_for::<Sprite>(&client, &ns, "alice-primary", "Ready", 600, sprite_ready).await;
    for doc in example_docs(second[0]) {
        apply(&client, &ns, &doc).await;
    }
    let over_quota = sprite_is("QuotaExceeded");
    let custom = wait_for::<Sprite>(&client, &ns, "custom", "over quota", 120, over_quota).await;
    assert!(
        !sprite_ready(&custom),
        "a Sprite over its User's quota is not Ready"
    );

    // The simulator, as the controller sees it.
    let sim_pod = component_pod(&client, &release, "sim").await;
    let sim_addr = port_forward(&client, &release.namespace, &sim_pod, 7070).await;
    let sim_secret = component_secret(&client, &release, "sim").await;
    let sim_token = secret_value(&client, &release.namespace, &sim_secret, "token").await;
    let sprites = SpritesClient::new(&format!("http://{sim_addr}"), sim_token).expect("sprites client");
    let before = sprites
        .get_sprite(&vm)
        .await
        .expect("the research VM exists in the sim");
    say(&format!("VM {vm} in the sim: {:?}", before.status));

    // A browser session through the relay to the runtime on that VM.
    let relay_pod = component_pod(&client, &release, "relay").await;
    let relay_addr = port_forward(&client, &release.namespace, &relay_pod, 8080).await;
    let token = secret_value(&client, &ns, "alice-gateway", "token").await;
    let started = Instant::now();
    let pong = relay_round_trip(relay_addr, &token, "research", "e2e-1").await;
    assert_eq!(
        pong["echo"],
        json!({"n": "e2e-1"}),
        "the runtime echoes the payload"
    );
    say(&format!(
        "relay round trip to {vm}: {:.2}s, pong {pong}",
        started.elapsed().as_secs_f64()
    ));

    // deletionPolicy: Delete -> the finalizer deletes the VM, then the Sprite goes.
    let api = Api::<Sprite>::namespaced(client.clone(), &ns);
    api.delete("research", &DeleteParams::default())
        .await
        .expect("delete");
    let deadline = Instant::now() + Duration::from_secs(180);
    while api.get_opt("research").await.expect("get").is_some() {
        if Instant::now() > deadline {
            let obj = api.get("research").await.ok();
            fail_with_dump(&client, &ns, "Sprite research to be deleted", &obj).await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    match sprites.get_sprite(&vm).await {
        Err(SpritesError::NotFound { .. }) => say(&format!("VM {vm} is gone from the sim")),
        other => panic!("the VM of a deleted Sprite with deletionPolicy Delete remains: {other:?}"),
    }

    Api::<Namespace>::all(client.clone())
        .delete(&ns, &DeleteParams::background())
        .await
        .expect("delete namespace");
}
