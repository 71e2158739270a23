//! What a converged fleet costs: counted on the controller's own kube
//! client and in the simulator's call record.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::config::{KubeConfigOptions, Kubeconfig};
use serde_json::json;
use sprite_operator::config::OperatorConfig;
use sprite_operator::controller;

use crate::sprite_controller::{Env, apply, sprite_doc, test_config};

/// Every request the client sends, as `METHOD path?query`.
type Log = Arc<Mutex<Vec<String>>>;

/// An admin client whose requests are logged.
async fn counted_client(env: &Env, log: Log) -> kube::Client {
    let kc = Kubeconfig::read_from(env.ns.plane.kubeconfig_path()).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .unwrap();
    let layer = tower::util::MapRequestLayer::new(move |req: http::Request<kube::client::Body>| {
        let line = format!("{} {}", req.method(), req.uri());
        log.lock().unwrap().push(line);
        req
    });
    kube::client::ClientBuilder::try_from(config)
        .unwrap()
        .with_layer(&layer)
        .build()
}

/// A watch is one long request; lists and watches keep the caches.
fn is_cache_traffic(line: &str) -> bool {
    line.starts_with("GET ")
        && (line.contains("watch=true") || !line.contains("/namespaces/") || is_list(line))
}

/// `GET .../namespaces/<ns>/<resource>` without a name: a list.
fn is_list(line: &str) -> bool {
    let path = line.split_whitespace().nth(1).unwrap_or_default();
    let path = path.split('?').next().unwrap_or_default();
    let after_ns = path.split("/namespaces/").nth(1).unwrap_or_default();
    after_ns.split('/').count() == 2
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_converged_fleet_makes_no_api_calls_but_its_caches() {
    let resync = Duration::from_secs(2);
    let config = OperatorConfig {
        resync,
        ..test_config()
    };
    let Some(mut env) = Env::with("converged", |c| c, config, Arc::new(controller::SystemClock)).await else {
        return;
    };
    let names: Vec<String> = (0..4).map(|i| format!("fleet-{i}")).collect();
    for n in &names {
        apply(&env.ns, &sprite_doc(n, json!({"spriteName": format!("vm-{n}")}))).await;
    }
    for n in &names {
        env.wait_ready(n, 240).await;
    }

    // The controller again, on a client that logs every request.
    let log: Log = Arc::default();
    let client = counted_client(&env, log.clone()).await;
    env.kill_controller().await;
    env.start_controller_as(client, false);
    // Its start: the caches fill and every Sprite and User is looked at once.
    tokio::time::sleep(resync * 3).await;
    let calls_before = env.stats().await["calls"].as_array().unwrap().len();
    let started = std::mem::take(&mut *log.lock().unwrap());
    assert!(
        started.iter().any(|l| l.contains("watch=true")),
        "the log saw no watch: {started:#?}"
    );

    // Five resync periods of a converged fleet.
    tokio::time::sleep(resync * 5).await;
    let requests = log.lock().unwrap().clone();
    let not_cache: Vec<&String> = requests.iter().filter(|l| !is_cache_traffic(l)).collect();
    assert!(
        not_cache.is_empty(),
        "a converged fleet called the apiserver beyond its watches: {not_cache:#?}"
    );
    // And Sprites.dev: at most the shared VM list.
    let calls = env.stats().await["calls"].as_array().unwrap()[calls_before..].to_vec();
    let other: Vec<_> = calls.iter().filter(|c| c["route"] != "GET /v1/sprites").collect();
    assert!(
        other.is_empty(),
        "Sprites.dev calls of a converged fleet: {other:#?}"
    );
}

#[test]
fn cache_traffic_is_told_from_object_calls() {
    assert!(is_cache_traffic(
        "GET /apis/x/v1/namespaces/n/sprites?watch=true&resourceVersion=1"
    ));
    assert!(is_cache_traffic("GET /apis/x/v1/namespaces/n/sprites?limit=500"));
    assert!(is_cache_traffic("GET /apis/x/v1/sprites?watch=true"));
    assert!(!is_cache_traffic("GET /apis/x/v1/namespaces/n/users/alice"));
    assert!(!is_cache_traffic(
        "PATCH /apis/x/v1/namespaces/n/sprites/a/status?fieldManager=m"
    ));
}

/// The simulator's benchmark VMs (`bench_vms`): the controller bootstraps a
/// Sprite to Active on them with no process run (the server's session is an
/// emulated one), and the steps' files are there for real. For fleet
/// benchmarks; this checks the mode itself, no correctness test runs on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sprite_becomes_active_on_benchmark_vms_without_processes() {
    let Some(env) = Env::with(
        "bench-vms",
        |mut c| {
            c.bench_vms = true;
            c
        },
        test_config(),
        Arc::new(controller::SystemClock),
    )
    .await
    else {
        return;
    };
    apply(
        &env.ns,
        &sprite_doc("emulated", json!({"spriteName": "vm-emulated"})),
    )
    .await;
    let st = env.wait_ready("emulated", 60).await.status.unwrap();
    let server = st.server_session_id.expect("a server session");
    assert!(server.starts_with('e'), "a real process ran the server: {server}");
    let sessions = env.sprites.list_sessions("vm-emulated").await.unwrap();
    assert!(
        sessions.iter().any(|s| s.id == server),
        "the emulated server is listed: {sessions:?}"
    );
    let venv = env
        .sprites
        .list_dir("vm-emulated", "/workspace/.venv/bin")
        .await
        .unwrap();
    assert!(venv.iter().any(|e| e.name == "python3"), "{venv:?}");
    let version = env
        .sprites
        .read_file("vm-emulated", "/workspace/VERSION")
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&version).trim(),
        sprite_operator::runtime::EMBEDDED_VERSION.trim()
    );
}
