//! Fleet bench (issue 25, first part): Users with their primary Sprites, on
//! one local control plane and the simulator's benchmark VMs (no process
//! per VM). Prints, per fleet size (`BENCH_FLEET`, default `200,1000`):
//! time until every Sprite is Active, Sprite reconciles per second, the
//! same apiserver's ceiling in the same run (a raw loop of server-side-apply
//! status writes at concurrency 32), the bench process's resident memory
//! per Sprite (the controller and the emulated simulator together), and
//! what a converged fleet costs over a few resyncs. Figures also go to
//! `target/bench/fleet.json`.
//!
//! Not yet here (issue 25 stays open): the controller-runtime peer, 10 000
//! Sprites within the bench's time budget, the cost bench and sharding.
//!
//! Needs `KUBEBUILDER_ASSETS` (`make bench` sets it).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use sprite_operator::api::sprite::SpritePhase;
use sprite_operator::api::{Sprite, User};
use sprite_operator::config::OperatorConfig;
use sprite_operator::controller::{self, Context};
use sprite_operator::sim::SimConfig;
use sprite_operator::sprites::SpritesClient;
use sprite_operator::testenv::{self, ControlPlane};
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "fleet-bench-token";
const CONCURRENCY: usize = 32;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

async fn namespace(client: &kube::Client, name: &str) {
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
}

/// Creates `n` Users (enterprise, with a primary Sprite) in `ns`.
async fn create_users(client: &kube::Client, ns: &str, n: usize) {
    let api: Api<User> = Api::namespaced(client.clone(), ns);
    futures::stream::iter(0..n)
        .for_each_concurrent(CONCURRENCY, |i| {
            let api = api.clone();
            async move {
                let u: User = serde_json::from_value(json!({
                    "apiVersion": "sprite-operator.dev/v1alpha1", "kind": "User",
                    "metadata": {"name": format!("u{i}")},
                    "spec": {"email": format!("u{i}@example.com"), "subject": format!("{ns}|u{i}"),
                             "tier": "enterprise", "sprite": {}}
                }))
                .unwrap();
                api.create(&PostParams::default(), &u).await.unwrap();
            }
        })
        .await;
}

/// Waits until `n` Sprites in `ns` are Active; returns how long it took.
async fn wait_active(client: &kube::Client, ns: &str, n: usize, since: Instant) -> Duration {
    let api: Api<Sprite> = Api::namespaced(client.clone(), ns);
    loop {
        let list = api.list(&ListParams::default()).await.unwrap();
        let active = list
            .items
            .iter()
            .filter(|s| s.status.as_ref().and_then(|st| st.phase) == Some(SpritePhase::Active))
            .count();
        if active >= n {
            return since.elapsed();
        }
        if since.elapsed() > Duration::from_secs(1800) {
            panic!("only {active} of {n} Sprites Active after 30 minutes");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The apiserver's ceiling for what a reconcile mostly does: server-side
/// apply of a Sprite's status, 32 at a time, for `secs`, on Sprites no
/// controller watches.
async fn ceiling(client: &kube::Client, ns: &str, secs: u64) -> f64 {
    let api: Api<Sprite> = Api::namespaced(client.clone(), ns);
    for i in 0..CONCURRENCY {
        let s: Sprite = serde_json::from_value(json!({
            "apiVersion": "sprite-operator.dev/v1alpha1", "kind": "Sprite",
            "metadata": {"name": format!("c{i}")}, "spec": {"userRef": {"name": "nobody"}}
        }))
        .unwrap();
        api.create(&PostParams::default(), &s).await.unwrap();
    }
    let writes = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let t0 = Instant::now();
    futures::future::join_all((0..CONCURRENCY).map(|i| {
        let (api, writes) = (api.clone(), writes.clone());
        async move {
            let mut n = 0u64;
            while Instant::now() < deadline {
                n += 1;
                let patch = json!({"apiVersion": "sprite-operator.dev/v1alpha1", "kind": "Sprite",
                    "status": {"runtimeSeconds": n}});
                api.patch_status(
                    &format!("c{i}"),
                    &PatchParams::apply("fleet-bench").force(),
                    &Patch::Apply(&patch),
                )
                .await
                .unwrap();
                writes.fetch_add(1, Ordering::Relaxed);
            }
        }
    }))
    .await;
    writes.load(Ordering::Relaxed) as f64 / t0.elapsed().as_secs_f64()
}

fn reconciles(ctx: &Context) -> u64 {
    ctx.metrics
        .reconciles
        .get_or_create(&controller::metrics::KindLabels { kind: "Sprite" })
        .get()
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let sizes: Vec<usize> = std::env::var("BENCH_FLEET")
        .unwrap_or_else(|_| "200,1000".into())
        .split(',')
        .filter_map(|v| v.trim().parse().ok())
        .collect();
    let Ok(opts) = testenv::Options::from_env() else {
        eprintln!("fleet: KUBEBUILDER_ASSETS is not set (run `make bench`)");
        std::process::exit(1);
    };
    let plane = ControlPlane::start(opts).await.expect("control plane");
    let client = plane.client().await.unwrap();
    testenv::install_crds(&client).await.unwrap();
    namespace(&client, "ceiling").await;
    let ceiling = ceiling(&client, "ceiling", 10).await;
    println!(
        "apiserver ceiling: {ceiling:.0} status writes/s (server-side apply, concurrency {CONCURRENCY})"
    );

    let mut rows = vec![];
    for n in sizes {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = SimConfig::new(dir.path(), TOKEN);
        cfg.bench_vms = true;
        cfg.wake_delay = Duration::ZERO;
        let sim = sprite_operator::sim::start(cfg).await.expect("sim");
        let sprites = SpritesClient::new(&sim.url(), TOKEN).unwrap();
        // The simulator is local: the client-side rate limit would measure
        // itself, so it is set out of the way here.
        let config = OperatorConfig {
            sprites_api_rate: 100_000,
            sprites_api_burst: 100_000,
            max_concurrent_provisioning: 64,
            reconcile_concurrency: 32,
            resync: Duration::from_secs(10),
            ..OperatorConfig::default()
        };
        let ctx = Arc::new(Context::new(
            client.clone(),
            sprites,
            config,
            Arc::new(controller::SystemClock),
        ));
        let ns = format!("fleet-{n}");
        namespace(&client, &ns).await;
        let rss0 = rss_kib();
        let token = CancellationToken::new();
        let run = tokio::spawn(controller::run(ctx.clone(), Some(ns.clone()), token.clone()));
        let t0 = Instant::now();
        create_users(&client, &ns, n).await;
        let created = t0.elapsed();
        let took = wait_active(&client, &ns, n, t0).await;
        let recs = reconciles(&ctx);
        let rss1 = rss_kib();
        // Converged: what a few resyncs cost.
        let calls0 = sim.stats_calls();
        let recs0 = reconciles(&ctx);
        tokio::time::sleep(Duration::from_secs(30)).await;
        let idle_calls = sim.stats_calls() - calls0;
        let idle_recs = reconciles(&ctx) - recs0;
        token.cancel();
        let _ = run.await;
        let _ = sim.shutdown().await;
        let per_sprite = (rss1.saturating_sub(rss0)) as f64 / n as f64;
        println!(
            "{n:>6} Sprites: all Active in {:>6.1} s (Users created in {:.1} s); {:>6.1} Sprite reconciles/s ({:.2} x ceiling); \
             RSS +{:.1} KiB per Sprite; converged 30 s: {idle_recs} reconciles, {idle_calls} Sprites.dev calls",
            took.as_secs_f64(),
            created.as_secs_f64(),
            recs as f64 / took.as_secs_f64(),
            (recs as f64 / took.as_secs_f64()) / ceiling,
            per_sprite,
        );
        rows.push(
            json!({"sprites": n, "active_s": took.as_secs_f64(), "reconciles": recs,
            "reconciles_per_s": recs as f64 / took.as_secs_f64(), "ceiling_writes_per_s": ceiling,
            "rss_kib_per_sprite": per_sprite, "converged_30s_reconciles": idle_recs,
            "converged_30s_sprites_calls": idle_calls}),
        );
    }
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    let _ = std::fs::create_dir_all(&out);
    let _ = std::fs::write(
        out.join("fleet.json"),
        serde_json::to_string_pretty(&rows).unwrap(),
    );
}
