//! Crash-resume, drift with each update policy, heartbeats and leader
//! election: the Sprite reconciler over time, on the real apiserver and sim.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::events::v1::Event;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use sprite_operator::api::Sprite;
use sprite_operator::api::conditions::find;
use sprite_operator::api::session;
use sprite_operator::api::sprite::BootstrapStep;
use sprite_operator::runtime::RuntimeBundle;

use crate::common::{TestNs, eventually};
use crate::sprite_controller::{Env, SIM_TOKEN, sprite_doc, status_of};

pub(crate) async fn put_faults(env: &Env, faults: Value) {
    let r = reqwest::Client::new()
        .put(format!("{}/sim/faults", env.sim().url()))
        .bearer_auth(SIM_TOKEN)
        .json(&faults)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
}

pub(crate) async fn force_sleep(env: &Env, vm: &str) {
    let r = reqwest::Client::new()
        .post(format!("{}/sim/sprites/{vm}/sleep", env.sim().url()))
        .bearer_auth(SIM_TOKEN)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
}

/// One consistent view of a VM in the sim: wakes by cause and the number of
/// commands run (exec WebSocket upgrades), from the same stats snapshot.
async fn sim_snapshot(env: &Env, vm: &str) -> (Value, usize) {
    let stats = env.stats().await;
    let execs = stats["calls"]
        .as_array()
        .unwrap()
        .iter()
        // The same route lists sessions (200); commands are upgrades (101).
        .filter(|c| c["route"] == "GET /v1/sprites/{name}/exec" && c["sprite"] == vm && c["status"] == 101)
        .count();
    (stats["vms"][vm]["wakes"].clone(), execs)
}

fn delta(before: &Value, after: &Value, cause: &str) -> i64 {
    after[cause].as_i64().unwrap_or(0) - before[cause].as_i64().unwrap_or(0)
}

/// Between two snapshots: `beats` heartbeats (from status) in `range`, as
/// many commands run, every wake one of those commands, and no wake by any
/// other cause.
///
/// Not every command has to be a wake: a tick served late under a loaded run
/// can find the VM still awake from the previous heartbeat (a CI run saw 4
/// commands and 3 wakes). That is timing, not a stray wake; a stray command
/// would push the command count out of `range`.
fn assert_only_heartbeat_wakes(
    before: &(Value, usize),
    after: &(Value, usize),
    beats: i64,
    range: std::ops::RangeInclusive<i64>,
) {
    let ((wakes0, execs0), (wakes1, execs1)) = (before, after);
    assert!(range.contains(&beats), "{beats} heartbeats, expected {range:?}");
    let execs = (execs1 - execs0) as i64;
    assert!(
        range.contains(&execs),
        "{execs} heartbeat commands, expected {range:?}"
    );
    let exec_wakes = delta(wakes0, wakes1, "exec");
    assert!(
        (1..=execs).contains(&exec_wakes),
        "{exec_wakes} wakes by command for {execs} commands: {wakes0} -> {wakes1}"
    );
    for cause in ["fs", "proxy", "checkpoint"] {
        assert_eq!(
            delta(wakes0, wakes1, cause),
            0,
            "a {cause} call woke the VM: {wakes0} -> {wakes1}"
        );
    }
}

pub(crate) async fn create_sprite(ns: &TestNs, name: &str, spec: Value) {
    ns.api::<Sprite>()
        .create(
            &PostParams::default(),
            &serde_json::from_value(sprite_doc(name, spec)).unwrap(),
        )
        .await
        .unwrap();
}

/// How many times each bootstrap step was announced as completed.
async fn step_completions(ns: &TestNs, sprite: &str) -> BTreeMap<String, i32> {
    let events = kube::Api::<Event>::namespaced(ns.client.clone(), &ns.name)
        .list(&ListParams::default())
        .await
        .unwrap();
    let mut out = BTreeMap::new();
    for e in events.items {
        if e.reason.as_deref() == Some("BootstrapStepCompleted")
            && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(sprite)
        {
            let n = e.series.as_ref().map_or(1, |s| s.count);
            *out.entry(e.note.unwrap_or_default()).or_insert(0) += n;
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_each_bootstrap_step_resumes_at_the_next() {
    let Some(mut env) = Env::new("crash").await else {
        return;
    };
    // Slow every call inside the VM, so the test can stop the controller
    // between two steps: the delay comes before the call takes effect, so
    // it is the test's window to see a step done and kill before the next
    // one acts (1.5 s: a loaded CI machine can stall a poll for 0.5 s).
    put_faults(
        &env,
        json!({"exec": {"latency_ms": 1500}, "fs": {"latency_ms": 1500}}),
    )
    .await;
    env.kill_controller().await;
    create_sprite(&env.ns, "crashy", json!({"spriteName": "vm-crashy"})).await;

    let mut killed_after = vec![];
    for step in BootstrapStep::ALL {
        env.start_controller();
        let reached = eventually(&format!("bootstrap to pass {step:?}"), 120, || async {
            let st = status_of(&env.ns, "crashy").await;
            match st.bootstrap.and_then(|b| b.last_completed_step) {
                Some(done) if done >= step => Ok(done),
                other => Err(format!("{other:?}")),
            }
        })
        .await;
        env.kill_controller().await;
        killed_after.push(reached);
    }
    put_faults(&env, json!({})).await;
    env.start_controller();
    let s = env.wait_ready("crashy", 120).await;
    assert!(s.status.unwrap().deployed_version.is_some());
    // Every step was seen as the last completed one when the controller died.
    assert_eq!(
        killed_after,
        BootstrapStep::ALL.to_vec(),
        "the test did not stop after every step"
    );
    // One VM, created once, across nine controller lives.
    assert_eq!(env.count_calls("POST /v1/sprites", None).await, 1);
    // A step announced twice would have run twice (an Event can be lost to a
    // kill between the status write and the Event, never duplicated).
    let completions = step_completions(&env.ns, "crashy").await;
    for (step, n) in &completions {
        assert_eq!(*n, 1, "step {step} completed {n} times: {completions:?}");
    }
    // The proof that no completed step ran again: the calls that act inside
    // the VM are exactly those of an uninterrupted bootstrap.
    create_sprite(&env.ns, "reference", json!({"spriteName": "vm-reference"})).await;
    env.wait_ready("reference", 180).await;
    for route in ["GET /v1/sprites/{name}/exec", "PUT /v1/sprites/{name}/fs/write"] {
        let crashed = env.count_calls(route, Some("vm-crashy")).await;
        let reference = env.count_calls(route, Some("vm-reference")).await;
        assert!(
            reference >= 4,
            "{route}: the reference bootstrap made only {reference} calls"
        );
        assert_eq!(
            crashed, reference,
            "{route}: {crashed} calls after nine crashes, {reference} without"
        );
    }
}

/// A ConfigMap runtime made from the embedded one, under another version.
pub(crate) fn runtime_config_map(version: &str, extra_requirement: Option<&str>) -> ConfigMap {
    let bundle = RuntimeBundle::embedded();
    let mut data = BTreeMap::new();
    data.insert("VERSION".to_string(), version.to_string());
    for f in &bundle.files {
        let key = f.path.trim_start_matches("/workspace/").replace('/', "__");
        let mut text = String::from_utf8(f.contents.clone()).unwrap();
        if key == "requirements.txt"
            && let Some(extra) = extra_requirement
        {
            text.push_str(extra);
            text.push('\n');
        }
        data.insert(key, text);
    }
    serde_json::from_value(json!({"metadata": {"name": "rt"}, "data": data})).unwrap()
}

pub(crate) async fn apply_cm(ns: &TestNs, cm: &ConfigMap) {
    ns.api::<ConfigMap>()
        .patch("rt", &PatchParams::apply("it-test").force(), &Patch::Apply(cm))
        .await
        .unwrap();
}

pub(crate) async fn wait_deployed(ns: &TestNs, name: &str, version: &str) {
    eventually(&format!("{name} to run {version}"), 120, || async {
        let st = status_of(ns, name).await;
        if st.deployed_version.as_deref() == Some(version) {
            Ok(())
        } else {
            Err(format!("{st:?}"))
        }
    })
    .await;
}

pub(crate) async fn vm_version(env: &Env, vm: &str) -> String {
    let v = env.sprites.read_file(vm, "/workspace/VERSION").await.unwrap();
    String::from_utf8_lossy(&v).trim().to_string()
}

/// The drift tests' starting point: a Sprite on ConfigMap runtime `cm-1`,
/// Ready, then put to sleep (the sim's VMs doze after 2 s idle). Returns the
/// environment and the VM's wake count at that point. `policy` goes into the
/// Sprite's spec as its `updatePolicy` when given.
async fn sprite_asleep_on_cm1(
    prefix: &str,
    sprite: &str,
    vm: &str,
    policy: Option<Value>,
) -> Option<(Env, u64)> {
    let env = Env::with_sim(prefix, |mut c| {
        c.idle_timeout = Duration::from_secs(2);
        c
    })
    .await?;
    apply_cm(&env.ns, &runtime_config_map("cm-1", None)).await;
    let mut spec = json!({"spriteName": vm, "runtime": {"source": {"configMap": {"name": "rt"}}}});
    if let Some(p) = policy {
        spec["updatePolicy"] = p;
    }
    create_sprite(&env.ns, sprite, spec).await;
    env.wait_ready(sprite, 180).await;
    force_sleep(&env, vm).await;
    let wakes = env.wakes(vm).await;
    Some((env, wakes))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_wake_drift_waits_for_a_wake_and_never_causes_one() {
    let Some((env, wakes_before)) = sprite_asleep_on_cm1("drift-onwake", "lazy", "vm-lazy", None).await
    else {
        return;
    };

    apply_cm(&env.ns, &runtime_config_map("cm-2", None)).await;
    let st = eventually("drift to be reported", 30, || async {
        let st = status_of(&env.ns, "lazy").await;
        match find(&st.conditions, "UpToDate") {
            Some(c) if c.status == "False" && c.reason == "AwaitingWake" => Ok(st),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert_eq!(st.deployed_version.as_deref(), Some("cm-1"));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        env.wakes("vm-lazy").await,
        wakes_before,
        "OnWake drift woke the VM"
    );
    assert_eq!(
        status_of(&env.ns, "lazy").await.deployed_version.as_deref(),
        Some("cm-1")
    );

    // A live relay session (its Lease, as the relay writes it) means the VM
    // is awake anyway: now it updates.
    let lease = session::lease(
        &env.ns.name,
        &env.ns.name,
        "lazy",
        "it-relay",
        jiff::Timestamp::now(),
        jiff::Timestamp::now(),
        Duration::from_secs(120),
    );
    env.ns
        .api::<k8s_openapi::api::coordination::v1::Lease>()
        .create(&kube::api::PostParams::default(), &lease)
        .await
        .unwrap();
    wait_deployed(&env.ns, "lazy", "cm-2").await;
    assert_eq!(vm_version(&env, "vm-lazy").await, "cm-2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn immediate_updates_now_and_a_failed_update_rolls_back() {
    let policy = json!({"type": "Immediate"});
    let Some((env, wakes_before)) =
        sprite_asleep_on_cm1("drift-immediate", "eager", "vm-eager", Some(policy)).await
    else {
        return;
    };

    apply_cm(&env.ns, &runtime_config_map("cm-2", None)).await;
    wait_deployed(&env.ns, "eager", "cm-2").await;
    assert!(
        env.wakes("vm-eager").await > wakes_before,
        "Immediate must wake the VM to update"
    );
    assert_eq!(vm_version(&env, "vm-eager").await, "cm-2");

    // cm-3 cannot install: the update fails, the checkpoint comes back.
    apply_cm(
        &env.ns,
        &runtime_config_map("cm-3", Some("no-such-package-sprite-operator==9.9.9")),
    )
    .await;
    // Retried with backoff, then given up (until a new version): the files
    // are checked once no retry is under way.
    let st = eventually("the failed update to be given up", 180, || async {
        let st = status_of(&env.ns, "eager").await;
        match (find(&st.conditions, "UpToDate"), &st.update) {
            (Some(c), Some(u)) if c.reason == "UpdateFailed" && u.failed => Ok(st),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let c = find(&st.conditions, "UpToDate").unwrap();
    assert_eq!(c.status, "False");
    assert!(c.message.contains("cm-3"), "{}", c.message);
    assert_eq!(st.deployed_version.as_deref(), Some("cm-2"));
    assert!(st.last_checkpoint.is_some());
    // The restored checkpoint holds cm-2's files, not cm-3's requirements.
    assert_eq!(vm_version(&env, "vm-eager").await, "cm-2");
    let req = env
        .sprites
        .read_file("vm-eager", "/workspace/requirements.txt")
        .await
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&req).contains("no-such-package"),
        "rollback did not restore files"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_run_on_schedule_and_are_the_only_wakes() {
    let Some(env) = Env::with_sim("heartbeat", |mut c| {
        c.idle_timeout = Duration::from_secs(1);
        c
    })
    .await
    else {
        return;
    };
    create_sprite(
        &env.ns,
        "beat",
        json!({"spriteName": "vm-beat",
               "heartbeat": {"schedule": "*/4 * * * * *", "duration": "1s", "startingDeadlineSeconds": 2}}),
    )
    .await;
    env.wait_ready("beat", 180).await;
    // Let the bootstrap's activity end and the VM fall asleep.
    force_sleep(&env, "vm-beat").await;
    let start = status_of(&env.ns, "beat").await;
    let before = sim_snapshot(&env, "vm-beat").await;
    tokio::time::sleep(Duration::from_secs(14)).await;
    let after = sim_snapshot(&env, "vm-beat").await;
    let end = status_of(&env.ns, "beat").await;

    // In one snapshot: every wake was a command, and every command was a
    // heartbeat (nothing else runs one in a converged Sprite).
    assert_only_heartbeat_wakes(&before, &after, end.wakes - start.wakes, 2..=5);
    assert!(end.last_heartbeat_time > start.last_heartbeat_time);
    assert!(end.next_heartbeat_time.as_ref().unwrap().0 > end.last_heartbeat_time.as_ref().unwrap().0);
    assert!(end.runtime_seconds > start.runtime_seconds);
    let cost: sprite_operator::money::MicroUsd = end.estimated_cost.as_deref().unwrap().parse().unwrap();
    assert!(cost.0 > 0);
    // The heartbeat entry really ran and wrote its transcript.
    let transcripts = env
        .sprites
        .list_dir("vm-beat", "/workspace/transcripts")
        .await
        .unwrap();
    assert!(
        transcripts.iter().any(|e| e.name.starts_with("heartbeat-")),
        "{transcripts:?}"
    );
}

fn reconciles(ctx: &sprite_operator::controller::Context) -> u64 {
    ctx.metrics
        .reconciles
        .get_or_create(&sprite_operator::controller::metrics::KindLabels { kind: "Sprite" })
        .get()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_never_both_reconcile() {
    use sprite_operator::controller::leader::{LeaseSettings, run_as_leader};
    use sprite_operator::controller::{self, Context};
    use std::sync::Arc;
    use tokio_util::sync::CancellationToken;

    let Some(mut env) = Env::new("leader").await else {
        return;
    };
    env.kill_controller().await;
    let replica = |identity: &str| {
        let ctx = Arc::new(Context::new(
            env.ns.client.clone(),
            env.sprites.clone(),
            env.config.clone(),
            Arc::new(controller::SystemClock),
        ));
        let shutdown = CancellationToken::new();
        let settings = LeaseSettings {
            namespace: env.ns.name.clone(),
            name: "sprite-operator-controller".into(),
            identity: identity.into(),
            // As the chart's defaults scaled down: a lease of 4 s with 1 s
            // of grace needs every renewal within a second, which a loaded
            // CI machine misses (the follower then takes over mid-test).
            // The release on stop keeps the takeover quick.
            duration_secs: 15,
            grace_secs: 5,
        };
        let (work_ctx, ns, client) = (ctx.clone(), env.ns.name.clone(), env.ns.client.clone());
        let task = tokio::spawn(run_as_leader(client, settings, shutdown.clone(), move |token| {
            controller::run(work_ctx, Some(ns), token)
        }));
        (ctx, shutdown, task)
    };
    let (ctx_a, stop_a, task_a) = replica("replica-a");
    // Let A take the lease before B starts, so the roles are known.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (ctx_b, stop_b, task_b) = replica("replica-b");

    create_sprite(&env.ns, "led", json!({"spriteName": "vm-led"})).await;
    env.wait_ready("led", 180).await;
    assert!(reconciles(&ctx_a) > 0, "the leader did not reconcile");
    assert_eq!(
        reconciles(&ctx_b),
        0,
        "the follower reconciled while another replica led"
    );

    // The leader stops; the follower takes over and reconciles.
    stop_a.cancel();
    tokio::time::timeout(Duration::from_secs(60), task_a)
        .await
        .expect("replica A did not stop within 60 s")
        .unwrap()
        .unwrap();
    let before = reconciles(&ctx_a);
    env.ns
        .api::<Sprite>()
        .patch(
            "led",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"poke": "1"}}})),
        )
        .await
        .unwrap();
    eventually("the follower to lead and reconcile", 60, || async {
        if reconciles(&ctx_b) > 0 {
            Ok(())
        } else {
            Err("follower idle".to_string())
        }
    })
    .await;
    assert_eq!(reconciles(&ctx_a), before, "a stopped replica reconciled");
    stop_b.cancel();
    tokio::time::timeout(Duration::from_secs(60), task_b)
        .await
        .expect("replica B did not stop within 60 s")
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_a_simulated_hour_the_only_wakes_are_heartbeats() {
    use std::sync::Arc;
    // 30x: a simulated hour in 120 real seconds, a tick every 10 s, each
    // heartbeat 2 s, then 0.8 s to doze. At 60x (5 s ticks) a tick fired
    // late under a loaded CI run found the VM still awake from the one
    // before, and the command was not a wake.
    let clock = Arc::new(sprite_operator::controller::ScaledClock::new(
        jiff::Timestamp::now(),
        30,
    ));
    let Some(env) = Env::with(
        "sim-hour",
        |mut c| {
            c.idle_timeout = Duration::from_millis(800);
            c
        },
        crate::sprite_controller::test_config(),
        clock.clone(),
    )
    .await
    else {
        return;
    };
    create_sprite(
        &env.ns,
        "hourly",
        json!({"spriteName": "vm-hourly",
               "heartbeat": {"schedule": "*/5 * * * *", "duration": "1m", "startingDeadlineSeconds": 240}}),
    )
    .await;
    env.wait_ready("hourly", 180).await;
    force_sleep(&env, "vm-hourly").await;
    let start = status_of(&env.ns, "hourly").await;
    let before = sim_snapshot(&env, "vm-hourly").await;
    let t0 = sprite_operator::controller::Clock::now(clock.as_ref());
    // One simulated hour.
    tokio::time::sleep(Duration::from_secs(120)).await;
    let t1 = sprite_operator::controller::Clock::now(clock.as_ref());
    let after = sim_snapshot(&env, "vm-hourly").await;
    let end = status_of(&env.ns, "hourly").await;

    let hours = t1.duration_since(t0).as_secs_f64() / 3600.0;
    assert!((0.9..1.3).contains(&hours), "simulated {hours} h");
    // In one snapshot: every wake was a command, and every command was a
    // heartbeat (nothing else runs one in a converged Sprite).
    assert_only_heartbeat_wakes(&before, &after, end.wakes - start.wakes, 11..=13);
    assert_eq!(
        end.skipped_heartbeats, start.skipped_heartbeats,
        "ticks were missed"
    );
}
