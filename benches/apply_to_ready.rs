//! Apply-to-Ready for N Sprites (default 100, `BENCH_SPRITES`), against the
//! peer the operator replaces: the same bootstrap done imperatively through
//! the same client, as a `bootstrapSprite()` in a web backend does it.
//!
//! Both run in this process on one local control plane and one simulator
//! with the same injected API latency (`BENCH_LATENCY_MS`, default 20 ms per
//! call, standing in for the real service's round trips). The operator's
//! overhead is its apply-to-Ready time minus the peer's create-to-done time:
//! what watching, deciding, recording every step in status and requeueing
//! cost on top of the Sprites.dev work itself.
//!
//! Needs `KUBEBUILDER_ASSETS` (`make bench` sets it); `SPRITE_WHEELHOUSE`
//! makes pip offline, as in the tests.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use sprite_operator::api::Sprite;
use sprite_operator::api::conditions::is_true;
use sprite_operator::api::sprite::BootstrapStep;
use sprite_operator::config::OperatorConfig;
use sprite_operator::controller::{self, Context};
use sprite_operator::runtime::RuntimeBundle;
use sprite_operator::sim::{ClassFaults, Faults, SimConfig};
use sprite_operator::sprites::{CreateSprite, ExecRequest, SpritesClient};
use sprite_operator::testenv::{self, ControlPlane};
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "bench-token";

/// A small runtime, so that the figures show orchestration rather than pip
/// building wheels: no requirements beyond the standard library.
fn small_runtime() -> BTreeMap<String, String> {
    BTreeMap::from([
        ("VERSION".into(), "bench-1".into()),
        ("requirements.txt".into(), "# standard library only\n".into()),
        (
            "src__server.py".into(),
            "import http.server, os\nhttp.server.ThreadingHTTPServer(('0.0.0.0', int(os.environ.get('SPRITE_PORT', '8765'))), http.server.SimpleHTTPRequestHandler).serve_forever()\n".into(),
        ),
    ])
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

async fn operator_run(client: &kube::Client, ctx: Arc<Context>, n: usize) -> Vec<Duration> {
    let ns = "bench-operator";
    let nsobj: Namespace = serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap();
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &nsobj)
        .await
        .unwrap();
    let cm: ConfigMap =
        serde_json::from_value(json!({"metadata": {"name": "rt"}, "data": small_runtime()})).unwrap();
    Api::<ConfigMap>::namespaced(client.clone(), ns)
        .patch("rt", &PatchParams::apply("bench"), &Patch::Apply(&cm))
        .await
        .unwrap();
    let token = CancellationToken::new();
    let controller = tokio::spawn(controller::run(ctx, Some(ns.into()), token.clone()));
    let api: Api<Sprite> = Api::namespaced(client.clone(), ns);
    let mut applied = BTreeMap::new();
    for i in 0..n {
        let name = format!("op-{i:03}");
        let s: Sprite = serde_json::from_value(json!({
            "apiVersion": "sprite-operator.dev/v1alpha1", "kind": "Sprite", "metadata": {"name": name},
            "spec": {"spriteName": format!("bench-{name}"),
                     "runtime": {"source": {"configMap": {"name": "rt"}}}}
        }))
        .unwrap();
        api.create(&PostParams::default(), &s).await.unwrap();
        applied.insert(name, Instant::now());
    }
    let mut ready: BTreeMap<String, Duration> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(1800);
    while ready.len() < n && Instant::now() < deadline {
        for s in api.list(&ListParams::default()).await.unwrap().items {
            let name = s.metadata.name.clone().unwrap_or_default();
            if !ready.contains_key(&name)
                && s.status
                    .as_ref()
                    .is_some_and(|st| is_true(&st.conditions, "Ready"))
            {
                ready.insert(name.clone(), applied[&name].elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    token.cancel();
    let _ = controller.await;
    assert_eq!(ready.len(), n, "not every Sprite became Ready");
    ready.into_values().collect()
}

/// The imperative peer: create, every bootstrap step, start the server.
async fn peer_run(ctx: &Context, n: usize) -> Vec<Duration> {
    let bundle = RuntimeBundle::from_config_map(&small_runtime()).unwrap();
    let tasks = (0..n).map(|i| {
        let bundle = bundle.clone();
        async move {
            let t0 = Instant::now();
            let vm = format!("bench-peer-{i:03}");
            ctx.sprites
                .create_sprite(&CreateSprite {
                    name: vm.clone(),
                    ..Default::default()
                })
                .await
                .unwrap();
            for step in BootstrapStep::ALL {
                controller::vm_ops::bootstrap_step(ctx, &vm, step, &bundle)
                    .await
                    .unwrap();
            }
            let req = ExecRequest::new(["/workspace/.venv/bin/python3", "/workspace/src/server.py"])
                .env("PATH", "/usr/bin:/bin")
                .max_run_after_disconnect(Duration::ZERO);
            ctx.sprites.exec_detached(&vm, &req).await.unwrap();
            t0.elapsed()
        }
    });
    futures::future::join_all(tasks).await
}

fn report(name: &str, mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort();
    let (p50, p99) = (percentile(&v, 0.5), percentile(&v, 0.99));
    println!(
        "{name:<34} n={:<4} p50 {:>9.1} ms   p99 {:>9.1} ms   max {:>9.1} ms",
        v.len(),
        ms(p50),
        ms(p99),
        ms(*v.last().unwrap_or(&Duration::ZERO))
    );
    (p50, p99)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let n: usize = std::env::var("BENCH_SPRITES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let latency: u64 = std::env::var("BENCH_LATENCY_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let Ok(opts) = testenv::Options::from_env() else {
        eprintln!("apply_to_ready: KUBEBUILDER_ASSETS is not set (run `make bench`)");
        std::process::exit(1);
    };
    let plane = ControlPlane::start(opts).await.expect("control plane");
    let client = plane.client().await.unwrap();
    testenv::install_crds(&client).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let per_call = ClassFaults {
        latency_ms: latency,
        ..Default::default()
    };
    let mut cfg = SimConfig::new(dir.path(), TOKEN);
    cfg.faults = Faults {
        rest: per_call.clone(),
        exec: per_call.clone(),
        fs: per_call.clone(),
        proxy: per_call.clone(),
        checkpoint: per_call,
        ..Default::default()
    };
    let sim = sprite_operator::sim::start(cfg).await.expect("sim");
    let sprites = SpritesClient::new(&sim.url(), TOKEN).unwrap();
    let config = match std::env::var_os("SPRITE_WHEELHOUSE") {
        Some(w) => OperatorConfig::default().with_wheelhouse(std::path::Path::new(&w)),
        None => OperatorConfig::default(),
    };
    let ctx = Arc::new(Context::new(
        client.clone(),
        sprites,
        config,
        Arc::new(controller::SystemClock),
    ));

    println!("apply-to-Ready, {n} Sprites at once, {latency} ms injected per Sprites.dev call");
    let peer = peer_run(&ctx, n).await;
    let (peer50, peer99) = report("imperative bootstrap (peer)", peer);
    let op = operator_run(&client, ctx.clone(), n).await;
    let (op50, op99) = report("operator: apply to Ready", op);
    // Signed: on a loaded 2-core machine the difference is within noise and
    // can come out negative; a clamped zero would hide that.
    println!(
        "{:<34}        p50 {:>+9.1} ms   p99 {:>+9.1} ms",
        "operator overhead (op - peer)",
        ms(op50) - ms(peer50),
        ms(op99) - ms(peer99)
    );
    let _ = sim.shutdown().await;
}
