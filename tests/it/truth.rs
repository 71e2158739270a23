//! Status tells the truth about the VM and its cost, and the VM converges to
//! the spec whatever happened to it: on the real apiserver and the sim.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::events::v1::Event;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use serde_json::json;
use sprite_operator::api::conditions::find;
use sprite_operator::api::session;
use sprite_operator::api::sprite::SpritePhase;
use sprite_operator::api::user::UserPhase;
use sprite_operator::api::{Sprite, User};
use sprite_operator::config::OperatorConfig;
use sprite_operator::controller;
use sprite_operator::runtime::{EMBEDDED_VERSION, SERVER_ENV_PATH};

use crate::common::{TestNs, eventually};
use crate::sprite_controller::{
    Env, OWNER, apply, ping_runtime, sprite_doc, status_of, test_config, user_doc,
};
use crate::sprite_lifecycle::{apply_cm, put_faults, runtime_config_map, wait_deployed};

/// Waits until `check` holds for the Sprite's status; returns that status.
async fn status_where(
    ns: &TestNs,
    name: &str,
    what: &str,
    secs: u64,
    check: impl Fn(&sprite_operator::api::SpriteStatus) -> bool,
) -> sprite_operator::api::SpriteStatus {
    eventually(&format!("{name}: {what}"), secs, || async {
        let st = status_of(ns, name).await;
        if check(&st) {
            Ok(st)
        } else {
            Err(format!("{st:?}"))
        }
    })
    .await
}

/// The runtime answers through the proxy (a server just started takes a
/// moment to listen).
async fn serves(env: &Env, vm: &str) {
    eventually(&format!("{vm}'s runtime to answer"), 30, || {
        ping_runtime(&env.sprites, vm)
    })
    .await;
}

async fn env_file(env: &Env, vm: &str) -> String {
    let bytes = env
        .sprites
        .read_file(vm, SERVER_ENV_PATH)
        .await
        .expect("server.env");
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Event reasons recorded for a Sprite.
async fn event_reasons(ns: &TestNs, sprite: &str) -> Vec<String> {
    ns.api::<Event>()
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(sprite))
        .filter_map(|e| e.reason)
        .collect()
}

/// An environment whose enterprise tier allows a heartbeat every second,
/// so that `*/3 * * * * *` runs every 3 s.
async fn fast_heartbeats(prefix: &str) -> Option<Env> {
    let mut config = test_config();
    let enterprise = config
        .tiers
        .get_mut(&sprite_operator::api::Tier::Enterprise)
        .unwrap();
    enterprise.min_heartbeat_interval = Duration::from_secs(1);
    Env::with(prefix, |c| c, config, Arc::new(controller::SystemClock)).await
}

async fn has_event(ns: &TestNs, sprite: &str, reason: &str) -> bool {
    event_reasons(ns, sprite).await.iter().any(|r| r == reason)
}

/// A Secret a Sprite's server may name (it carries the allow label).
fn env_secret(name: &str, key: &str, value: &str) -> serde_json::Value {
    json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": name, "labels": {"sprite-operator.dev/sprite-env": "true"}},
        "stringData": {key: value}})
}

/// The relay's session Lease for `sprite`, as the relay writes it: sessions
/// live since `since` ago, renewed now, for `ttl`.
async fn session_lease(ns: &TestNs, sprite: &str, since: Duration, ttl: Duration) {
    let now = jiff::Timestamp::now();
    let acquired = now - jiff::SignedDuration::try_from(since).unwrap();
    let lease = session::lease(&ns.name, &ns.name, sprite, "it-relay", acquired, now, ttl);
    ns.api::<Lease>()
        .patch(
            &session::lease_name(&ns.name, sprite),
            &PatchParams::apply("it-relay").force(),
            &Patch::Apply(&lease),
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_deleted_out_of_band_is_made_again_bootstrapped_and_serving() {
    let config = OperatorConfig {
        vm_list_interval: Duration::from_secs(1),
        ..test_config()
    };
    let Some(env) = Env::with("vm-replaced", |c| c, config, Arc::new(controller::SystemClock)).await else {
        return;
    };
    apply(
        &env.ns,
        &sprite_doc("phoenix", json!({"spriteName": "vm-phoenix"})),
    )
    .await;
    env.wait_ready("phoenix", 180).await;
    let first = status_of(&env.ns, "phoenix").await.owned_vm.unwrap().id;

    env.sprites.delete_sprite("vm-phoenix").await.unwrap();
    // The periodic list notices; the Sprite is made again and bootstrapped
    // from the first step, not reported Active on an empty VM.
    let st = status_where(&env.ns, "phoenix", "a new VM, bootstrapped", 180, |st| {
        st.owned_vm.as_ref().is_some_and(|v| v.id != first)
            && st.bootstrap.as_ref().and_then(|b| b.vm_id.as_ref()) == st.owned_vm.as_ref().map(|v| &v.id)
            && st.phase == Some(SpritePhase::Active)
    })
    .await;
    assert_eq!(st.deployed_version.as_deref(), Some(EMBEDDED_VERSION.trim()));
    serves(&env, "vm-phoenix").await;
    assert!(has_event(&env.ns, "phoenix", "BootstrapReset").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_changed_by_hand_is_repaired_at_the_next_heartbeat() {
    let Some(env) = fast_heartbeats("vm-version").await else {
        return;
    };
    let spec = json!({"spriteName": "vm-hand", "heartbeat": {"schedule": "*/3 * * * * *", "duration": "2s"}});
    apply(&env.ns, &sprite_doc("hand", spec)).await;
    env.wait_ready("hand", 180).await;

    // Someone writes another VERSION into the VM (a checkpoint restored by
    // hand does the same): status still says the embedded version.
    env.sprites
        .write_file(
            "vm-hand",
            "/workspace/VERSION",
            b"0.0.0-by-hand\n".to_vec(),
            0o644,
            true,
        )
        .await
        .unwrap();
    // The next heartbeat wakes the VM anyway: the controller reads VERSION,
    // sees the drift and updates (OnWake) while it is awake.
    let events = eventually("the hand-made VERSION to be seen and repaired", 120, || async {
        let reasons = event_reasons(&env.ns, "hand").await;
        let v = env
            .sprites
            .read_file("vm-hand", "/workspace/VERSION")
            .await
            .map_err(|e| e.to_string())?;
        let on_vm = String::from_utf8_lossy(&v).trim().to_string();
        (reasons.iter().any(|r| r == "RuntimeUpdated") && on_vm == EMBEDDED_VERSION.trim())
            .then(|| reasons.clone())
            .ok_or(format!("VERSION {on_vm}, events {reasons:?}"))
    })
    .await;
    assert!(events.iter().any(|r| r == "HeartbeatStarted"));
    let st = status_of(&env.ns, "hand").await;
    assert_eq!(st.deployed_version.as_deref(), Some(EMBEDDED_VERSION.trim()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_sees_the_model_configuration_and_reports_its_outcome() {
    let Some(env) = fast_heartbeats("hb-model").await else {
        return;
    };
    apply(&env.ns, &env_secret("llm", "key", "sk-test-not-a-real-key")).await;
    let spec = json!({"spriteName": "vm-model",
        "heartbeat": {"schedule": "*/3 * * * * *", "duration": "2s"},
        "server": {"env": [
            {"name": "SPRITE_LLM_URL", "value": "http://127.0.0.1:9/v1/chat/completions"},
            {"name": "SPRITE_LLM_API_KEY", "valueFrom": {"secretKeyRef": {"name": "llm", "key": "key"}}}]}});
    apply(&env.ns, &sprite_doc("model", spec)).await;
    let st = status_where(
        &env.ns,
        "model",
        "a heartbeat collected with its outcome",
        180,
        |st| {
            st.last_heartbeat_result
                .as_ref()
                .is_some_and(|r| r.exit_code.is_some())
        },
    )
    .await;
    let r = st.last_heartbeat_result.unwrap();
    assert_eq!(r.exit_code, Some(0), "{r:?}");
    let summary = r.summary.unwrap_or_default();
    assert!(summary.contains("\"model_configured\": true"), "{summary}");
    // The summary never carries the key.
    assert!(!summary.contains("sk-test-not-a-real-key"));
    assert!(has_event(&env.ns, "model", "HeartbeatFinished").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_env_change_reaches_the_running_server() {
    let Some(env) = Env::new("server-env").await else {
        return;
    };
    let secret = |value: &str| env_secret("keys", "api-key", value);
    apply(&env.ns, &secret("first-key")).await;
    let spec = |greeting: &str| {
        json!({"spriteName": "vm-envy", "updatePolicy": {"type": "Immediate"},
            "server": {"env": [{"name": "GREETING", "value": greeting},
                {"name": "API_KEY", "valueFrom": {"secretKeyRef": {"name": "keys", "key": "api-key"}}}]}})
    };
    apply(&env.ns, &sprite_doc("envy", spec("hello"))).await;
    env.wait_ready("envy", 180).await;
    let first = status_of(&env.ns, "envy").await.server_session_id.unwrap();
    assert!(env_file(&env, "vm-envy").await.contains("GREETING='hello'"));

    // A literal in spec.
    apply(&env.ns, &sprite_doc("envy", spec("bonjour"))).await;
    let st = status_where(&env.ns, "envy", "the server restarted", 60, |st| {
        st.server_session_id.as_ref().is_some_and(|id| *id != first)
    })
    .await;
    assert!(env_file(&env, "vm-envy").await.contains("GREETING='bonjour'"));
    serves(&env, "vm-envy").await;

    // A Secret it names.
    apply(&env.ns, &secret("second-key")).await;
    let second = st.server_session_id.unwrap();
    status_where(&env.ns, "envy", "the server restarted for the Secret", 60, |st| {
        st.server_session_id.as_ref().is_some_and(|id| *id != second)
    })
    .await;
    assert!(env_file(&env, "vm-envy").await.contains("API_KEY='second-key'"));
    assert!(has_event(&env.ns, "envy", "ServerRestarted").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transient_update_failure_is_retried_and_succeeds() {
    let Some(env) = Env::new("update-retry").await else {
        return;
    };
    apply_cm(&env.ns, &runtime_config_map("cm-1", None)).await;
    let spec = json!({"spriteName": "vm-retry", "updatePolicy": {"type": "Immediate"},
        "runtime": {"source": {"configMap": {"name": "rt"}}}});
    apply(&env.ns, &sprite_doc("retry", spec)).await;
    env.wait_ready("retry", 180).await;

    // Every file write fails for a while: the update to cm-2 fails and is
    // rolled back...
    put_faults(&env, json!({"fs": {"error_rate": 1.0, "error_codes": [500]}})).await;
    apply_cm(&env.ns, &runtime_config_map("cm-2", None)).await;
    let st = status_where(&env.ns, "retry", "a failed attempt at cm-2", 120, |st| {
        st.update
            .as_ref()
            .is_some_and(|u| u.version == "cm-2" && u.attempts >= 1)
    })
    .await;
    assert!(
        !st.update.unwrap().failed,
        "one failure does not give the version up"
    );
    let c = find(&status_of(&env.ns, "retry").await.conditions, "UpToDate")
        .cloned()
        .unwrap();
    assert_eq!(c.reason, "UpdateFailed");
    // ...then the service recovers and the retry succeeds.
    put_faults(&env, json!({})).await;
    wait_deployed(&env.ns, "retry", "cm-2").await;
    let st = status_of(&env.ns, "retry").await;
    assert_eq!(st.update, None);
    assert_eq!(find(&st.conditions, "UpToDate").unwrap().status, "True");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_time_is_billed_and_a_deleted_sprites_spend_stays_in_the_month() {
    let Some(env) = Env::new("ledger").await else {
        return;
    };
    apply(&env.ns, &sprite_doc("keep", json!({"spriteName": "vm-keep"}))).await;
    apply(&env.ns, &sprite_doc("gone", json!({"spriteName": "vm-gone"}))).await;
    env.wait_ready("keep", 180).await;
    env.wait_ready("gone", 180).await;

    // Ten minutes of relay sessions on `gone`, ended: ten minutes and the
    // idle tail (30 s) are billed, once.
    session_lease(&env.ns, "gone", Duration::from_secs(600), Duration::from_secs(1)).await;
    let st = status_where(&env.ns, "gone", "the session billed", 60, |st| {
        st.runtime_seconds >= 630
    })
    .await;
    assert_eq!(st.runtime_seconds, 630, "billed once: {st:?}");
    assert_eq!(st.estimated_cost.as_deref(), Some("0.031500"));

    let users = env.ns.api::<User>();
    let spent = eventually("the User's month to hold it", 60, || async {
        let u = users.get(OWNER).await.map_err(|e| e.to_string())?;
        let usage = u.status.and_then(|s| s.usage).ok_or("no usage")?;
        (usage.runtime_seconds >= 630)
            .then_some(usage)
            .ok_or("not yet".to_string())
    })
    .await;

    env.ns
        .api::<Sprite>()
        .delete("gone", &DeleteParams::default())
        .await
        .unwrap();
    eventually("gone to be gone", 60, || async {
        match env.ns.api::<Sprite>().get_opt("gone").await {
            Ok(None) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    // A later pass of the User (its resync, or a change) keeps the spend.
    apply(&env.ns, &user_doc(OWNER, "enterprise")).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let u = users.get(OWNER).await.unwrap().status.unwrap();
    let after = u.usage.unwrap();
    assert!(
        after.runtime_seconds >= spent.runtime_seconds,
        "{after:?} < {spent:?}"
    );
    assert_eq!(after.estimated_cost, spent.estimated_cost);
    assert!(u.ledger.unwrap().sprites.values().any(|e| e.name == "gone"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_session_is_billed_and_ends_when_the_budget_is_spent() {
    // A ten-second budget: a live session spends it.
    let mut config = test_config();
    config.idle_tail = Duration::ZERO;
    let free = config.tiers.get_mut(&sprite_operator::api::Tier::Free).unwrap();
    free.monthly_runtime = Some(Duration::from_secs(10));
    let Some(env) = Env::with("over-budget", |c| c, config, Arc::new(controller::SystemClock)).await else {
        return;
    };
    let token = uuid::Uuid::new_v4().simple().to_string();
    let secret = json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "frugal-gateway", "labels": {"sprite-operator.dev/user": "frugal"}},
        "stringData": {"token": token}});
    apply(&env.ns, &secret).await;
    let mut user = user_doc("frugal", "free");
    user["spec"]["sprite"] = json!({});
    apply(&env.ns, &user).await;
    env.wait_ready("frugal-primary", 180).await;
    // Session Leases of 2 s, renewed every second while the session lives.
    let relay = crate::relay::start_relay_over(&env, Some(&env.ns.name), |c| {
        c.lease = Duration::from_secs(2);
        c.lease_refresh = Duration::from_secs(1);
    })
    .await;
    crate::relay::wait_cached_token(&relay, &token).await;
    let mut ws = crate::relay::connect_browser(&relay, &token, "")
        .await
        .expect("connects");
    crate::relay::ping(&mut ws, "first").await;

    // The session's time is billed from the relay's Lease as it goes; once
    // the month's budget is spent the relay ends the live session.
    let code = tokio::time::timeout(Duration::from_secs(90), async {
        use futures::StreamExt;
        loop {
            match ws.next().await {
                Some(Ok(tokio_tungstenite::tungstenite::Message::Close(Some(f)))) => {
                    return Some(u16::from(f.code));
                }
                Some(Ok(_)) => {}
                _ => return None,
            }
        }
    })
    .await
    .expect("the session was not ended");
    assert_eq!(code, Some(4403));
    let st = status_of(&env.ns, "frugal-primary").await;
    assert!(st.runtime_seconds >= 10, "{st:?}");
    assert!(st.session_billing.is_some(), "accounted from the relay's Lease");
    let u = env.ns.api::<User>().get("frugal").await.unwrap();
    assert_eq!(u.status.and_then(|s| s.phase), Some(UserPhase::OverBudget));

    // And a new session is refused at connect.
    let refused = match crate::relay::connect_browser(&relay, &token, "").await {
        Ok(mut ws) => crate::relay::close_code(&mut ws).await,
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => Some(r.status().as_u16()),
        Err(e) => panic!("{e}"),
    };
    assert!(matches!(refused, Some(403 | 4403)), "{refused:?}");
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_create_answer_yields_one_vm_and_one_bootstrap() {
    let Some(env) = Env::new("lost-create").await else {
        return;
    };
    // The create is made, its answer lost: the caller sees a 504.
    put_faults(&env, json!({"rest": {"lose_next": 1, "lost_method": "POST"}})).await;
    apply(&env.ns, &sprite_doc("once", json!({"spriteName": "vm-once"}))).await;
    let sprite = env.wait_ready("once", 180).await;
    let creates: Vec<u64> = env.stats().await["calls"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["route"] == "POST /v1/sprites")
        .map(|c| c["status"].as_u64().unwrap())
        .collect();
    assert_eq!(
        creates.first(),
        Some(&504),
        "the fault did not hit the create: {creates:?}"
    );
    assert!(creates[1..].iter().all(|s| *s == 409), "{creates:?}");
    let vms = env.sprites.list_sprites(Some("vm-once")).await.unwrap();
    assert_eq!(vms.len(), 1);
    let st = sprite.status.unwrap();
    assert_eq!(st.owned_vm.as_ref().map(|v| &v.id), Some(&vms[0].id));
    let reasons = event_reasons(&env.ns, "once").await;
    assert!(!reasons.iter().any(|r| r == "BootstrapReset"), "{reasons:?}");
    // One bootstrap: its four commands (directories, venv, pip, schema) and
    // the server's start, each once.
    assert_eq!(
        env.count_calls("GET /v1/sprites/{name}/exec", Some("vm-once"))
            .await,
        5
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_sprite_is_left_alone_and_resumes() {
    let Some(env) = Env::new("paused").await else {
        return;
    };
    apply(&env.ns, &sprite_doc("calm", json!({"spriteName": "vm-calm"}))).await;
    env.wait_ready("calm", 180).await;
    let api = env.ns.api::<Sprite>();
    let annotate = |v: Option<&str>| json!({"metadata": {"annotations": {"sprite-operator.dev/paused": v}}});
    api.patch(
        "calm",
        &PatchParams::default(),
        &Patch::Merge(annotate(Some("true"))),
    )
    .await
    .unwrap();
    status_where(&env.ns, "calm", "Paused", 30, |st| {
        find(&st.conditions, "Paused").is_some_and(|c| c.status == "True")
    })
    .await;
    let calls_before = env.stats().await["calls"].as_array().unwrap().len();

    // Suspending would stop the server: while paused, nothing happens.
    api.patch(
        "calm",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"suspend": true}})),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let st = status_of(&env.ns, "calm").await;
    assert!(st.server_session_id.is_some(), "a paused Sprite was acted on");
    let acting: Vec<String> = env.stats().await["calls"].as_array().unwrap()[calls_before..]
        .iter()
        .filter(|c| c["sprite"] == "vm-calm")
        .map(|c| c["route"].as_str().unwrap().to_string())
        .collect();
    assert!(acting.is_empty(), "calls on a paused Sprite's VM: {acting:?}");

    // Unpaused, it goes on where it stopped.
    api.patch("calm", &PatchParams::default(), &Patch::Merge(annotate(None)))
        .await
        .unwrap();
    let st = status_where(&env.ns, "calm", "suspended after the pause", 60, |st| {
        st.phase == Some(SpritePhase::Suspended)
    })
    .await;
    assert!(st.server_session_id.is_none());
    assert!(find(&st.conditions, "Paused").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retain_deletion_needs_no_sprites_api() {
    let Some(env) = Env::new("retain-offline").await else {
        return;
    };
    apply(
        &env.ns,
        &sprite_doc(
            "kept",
            json!({"spriteName": "vm-kept", "deletionPolicy": "Retain"}),
        ),
    )
    .await;
    env.wait_ready("kept", 180).await;
    // Sprites.dev answers nothing but errors now.
    put_faults(
        &env,
        json!({"rest": {"error_rate": 1.0, "error_codes": [503]},
        "exec": {"error_rate": 1.0, "error_codes": [503]}}),
    )
    .await;
    env.ns
        .api::<Sprite>()
        .delete("kept", &DeleteParams::default())
        .await
        .unwrap();
    eventually("the Retain Sprite gone without the API", 30, || async {
        match env.ns.api::<Sprite>().get_opt("kept").await {
            Ok(None) => Ok(()),
            other => Err(format!("{:?}", other.map(|s| s.map(|s| s.status)))),
        }
    })
    .await;
    put_faults(&env, json!({})).await;
    env.sprites.get_sprite("vm-kept").await.expect("the VM is kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_bootstrap_shows_provisioning_then_failed_and_comes_back() {
    let Some(env) = Env::new("failed-phase").await else {
        return;
    };
    // Requirements pip cannot satisfy from the wheelhouse.
    apply_cm(
        &env.ns,
        &runtime_config_map("bad-1", Some("no-such-package-anywhere==9.9.9")),
    )
    .await;
    let spec = json!({"spriteName": "vm-flaky", "runtime": {"source": {"configMap": {"name": "rt"}}}});
    apply(&env.ns, &sprite_doc("flaky", spec)).await;
    let seen = std::sync::Mutex::new(std::collections::BTreeSet::new());
    let st = eventually("Failed after repeated pip failures", 180, || async {
        let st = status_of(&env.ns, "flaky").await;
        if let Some(p) = st.phase {
            seen.lock().unwrap().insert(format!("{p:?}"));
        }
        (st.phase == Some(SpritePhase::Failed))
            .then_some(st)
            .ok_or("not yet".to_string())
    })
    .await;
    let seen = seen.into_inner().unwrap();
    assert!(seen.contains("Provisioning"), "{seen:?}");
    let failure = st.failure.unwrap();
    assert_eq!(failure.step, "bootstrap");
    assert!(failure.attempts >= 3, "{failure:?}");
    assert_eq!(find(&st.conditions, "Ready").unwrap().reason, "CommandFailed");

    // The way back: a runtime that installs.
    apply_cm(&env.ns, &runtime_config_map("good-1", None)).await;
    let st = env.wait_ready("flaky", 240).await.status.unwrap();
    assert_eq!(st.failure, None);
    assert_eq!(st.deployed_version.as_deref(), Some("good-1"));
}

/// Over a simulated hour (30x: two real minutes) with a relay session in
/// the middle, every wake the simulator records has a counted cause in the
/// Sprite's status: commands against `heartbeat` (and any other operator
/// step), proxy connections against `session`. Run alone (Makefile
/// TIMED_TESTS): it asserts on timing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_a_simulated_hour_with_a_session_every_wake_has_a_counted_cause() {
    let clock = Arc::new(controller::ScaledClock::new(jiff::Timestamp::now(), 30));
    let Some(env) = Env::with(
        "wake-causes",
        |mut c| {
            c.idle_timeout = Duration::from_millis(800);
            c
        },
        test_config(),
        clock.clone(),
    )
    .await
    else {
        return;
    };
    let spec = json!({"spriteName": "vm-causes",
        "heartbeat": {"schedule": "*/5 * * * *", "duration": "1m", "startingDeadlineSeconds": 240}});
    apply(&env.ns, &sprite_doc("causes", spec)).await;
    env.wait_ready("causes", 180).await;
    crate::sprite_lifecycle::force_sleep(&env, "vm-causes").await;
    let sim_wakes = |stats: serde_json::Value| stats["vms"]["vm-causes"]["wakes"].clone();
    let before = (
        sim_wakes(env.stats().await),
        status_of(&env.ns, "causes").await.wakes_by_cause,
    );

    // A third of the way in, a browser session through the relay, on a VM
    // that is asleep and runs no heartbeat.
    tokio::time::sleep(Duration::from_secs(40)).await;
    let token = crate::relay::gateway_token(&env, OWNER).await;
    let relay = crate::relay::start_relay_over(&env, Some(&env.ns.name), |c| {
        c.lease = Duration::from_secs(2);
        c.lease_refresh = Duration::from_secs(1);
    })
    .await;
    crate::relay::wait_cached_token(&relay, &token).await;
    status_where(&env.ns, "causes", "no heartbeat running", 30, |st| {
        st.active_heartbeat.is_none()
    })
    .await;
    crate::sprite_lifecycle::force_sleep(&env, "vm-causes").await;
    let mut ws = crate::relay::connect_browser(&relay, &token, "?sprite=causes")
        .await
        .expect("connects");
    crate::relay::ping(&mut ws, "one").await;
    crate::relay::ping(&mut ws, "two").await;
    drop(ws);
    relay.shutdown().await;

    tokio::time::sleep(Duration::from_secs(80)).await;
    let after = (
        sim_wakes(env.stats().await),
        status_of(&env.ns, "causes").await.wakes_by_cause,
    );
    let sim = |cause: &str| after.0[cause].as_i64().unwrap_or(0) - before.0[cause].as_i64().unwrap_or(0);
    let counted =
        |cause: &str| after.1.get(cause).copied().unwrap_or(0) - before.1.get(cause).copied().unwrap_or(0);
    let operator = ["heartbeat", "update", "bootstrap", "server"]
        .into_iter()
        .map(counted)
        .sum::<i64>();
    assert!(
        counted("heartbeat") >= 8,
        "heartbeats: {:?} -> {:?}",
        before.1,
        after.1
    );
    assert_eq!(
        sim("exec"),
        operator,
        "commands' wakes vs counted: {:?} -> {:?}",
        before,
        after
    );
    assert_eq!(
        sim("proxy"),
        counted("session"),
        "proxy wakes vs sessions: {:?} -> {:?}",
        before,
        after
    );
    assert_eq!(counted("session"), 1);
    for cause in ["fs", "checkpoint"] {
        assert_eq!(
            sim(cause),
            0,
            "a {cause} call woke the VM: {before:?} -> {after:?}"
        );
    }
}
