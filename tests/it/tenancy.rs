//! Two tenants who do not trust each other, in namespaces chosen so that
//! names joined with a dash collide (`x`/`corp-alice` and `x-corp`/`alice`),
//! one controller watching both, one simulator and one relay. Each attack is
//! refused with a condition or a close code, and the simulator's call record
//! shows that the victim's VM received nothing from it (docs/tenancy.md).

use k8s_openapi::api::core::v1::Secret;
use kube::api::DeleteParams;
use serde_json::{Value, json};
use sprite_operator::api::conditions::is_true;
use sprite_operator::api::sprite::SpritePhase;
use sprite_operator::api::{Sprite, User};
use sprite_operator::runtime;

use crate::common::{TestNs, eventually};
use crate::relay::{close_code, connect_browser, ping, start_relay_over, wait_cached_token};
use crate::sprite_controller::{Env, apply, sprite_doc};

/// A fresh gateway token: the relay below watches every namespace, and a
/// token that another test's User also holds is refused as ambiguous.
fn token() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// Calls that act on or inside a VM; metadata reads (get, list) are not.
fn acts_on_vm(route: &str) -> bool {
    route != "GET /v1/sprites/{name}" && route != "GET /v1/sprites"
}

/// The calls recorded on `vm` that act on it, as `route` strings.
async fn calls_on(env: &Env, vm: &str) -> Vec<String> {
    env.stats().await["calls"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["sprite"] == vm && c["route"].as_str().is_some_and(acts_on_vm))
        .map(|c| c["route"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// A User in `ns` whose gateway token is `token` (its Secret, labelled as
/// the User's, comes first), with a primary Sprite when `primary`.
async fn tenant(ns: &TestNs, name: &str, subject: &str, token: &str, primary: bool) {
    let secret = json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": format!("{name}-gateway"), "labels": {"sprite-operator.dev/user": name}},
        "stringData": {"token": token}});
    apply(ns, &secret).await;
    let mut spec = json!({"email": format!("{name}@example.com"), "subject": subject, "tier": "enterprise"});
    if primary {
        spec["sprite"] = json!({});
    }
    apply(
        ns,
        &json!({"apiVersion": "sprite-operator.dev/v1alpha1", "kind": "User", "metadata": {"name": name}, "spec": spec}),
    )
    .await;
}

fn unique(subject: &str) -> String {
    format!("{subject}|{}", uuid::Uuid::new_v4().simple())
}

/// Waits for a Sprite in `ns` to be Active, returning its confirmed VM name.
async fn active_vm(ns: &TestNs, name: &str, secs: u64) -> String {
    let api = ns.api::<Sprite>();
    eventually(&format!("{}/{name} Active", ns.name), secs, || async {
        let s = api.get(name).await.map_err(|e| e.to_string())?;
        let st = s.status.clone().unwrap_or_default();
        match (&st.phase, &st.owned_vm) {
            (Some(SpritePhase::Active), Some(vm)) => Ok(vm.name.clone()),
            _ => Err(format!("{st:?}")),
        }
    })
    .await
}

/// Waits for condition `type_` of Sprite `name` to have `reason`.
async fn condition(ns: &TestNs, name: &str, type_: &str, reason: &str, secs: u64) -> Value {
    let api = ns.api::<Sprite>();
    eventually(&format!("{name}: {type_} {reason}"), secs, || async {
        let s = api.get(name).await.map_err(|e| e.to_string())?;
        let st = s.status.unwrap_or_default();
        st.conditions
            .iter()
            .find(|c| c.type_ == type_ && c.reason == reason)
            .map(|c| serde_json::to_value(c).unwrap())
            .ok_or_else(|| format!("{:?}", st.conditions))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_in_colliding_namespaces_never_reach_each_others_vms() {
    let Some(mut env) = Env::new("tenancy").await else {
        return;
    };
    let attacker_ns = TestNs::named(&format!("{}-corp", env.ns.name))
        .await
        .expect("same plane");
    env.start_controller_over(vec![env.ns.name.clone(), attacker_ns.name.clone()])
        .await;
    let victim_ns = &env.ns;

    // `<x>-corp-alice-primary` under the old dash-joined default, for both.
    let (victim_token, attacker_token, bob_token) = (token(), token(), token());
    tenant(
        victim_ns,
        "corp-alice",
        &unique("idp|victim"),
        &victim_token,
        true,
    )
    .await;
    tenant(
        &attacker_ns,
        "alice",
        &unique("idp|attacker"),
        &attacker_token,
        true,
    )
    .await;
    // Another User in the attacker's namespace, whose gateway Secret the
    // attacker's Sprite will name.
    tenant(&attacker_ns, "bob", &unique("idp|bob"), &bob_token, false).await;

    let victim_vm = active_vm(victim_ns, "corp-alice-primary", 240).await;
    let attacker_vm = active_vm(&attacker_ns, "alice-primary", 240).await;
    assert_ne!(victim_vm, attacker_vm, "two tenants share one VM");
    let dash_joined = format!("{}-corp-alice-primary", victim_ns.name);
    assert!(victim_vm.starts_with(&dash_joined) && attacker_vm.starts_with(&dash_joined));
    let before = calls_on(&env, &victim_vm).await;

    // The attacker names the victim's VM: plainly, and with the adopt
    // annotation; a Secret of another User; a User that does not exist.
    let attacks = [
        sprite_doc(
            "squat",
            json!({"spriteName": victim_vm, "userRef": {"name": "alice"}}),
        ),
        {
            let mut d = sprite_doc(
                "grab",
                json!({"spriteName": victim_vm, "userRef": {"name": "alice"}}),
            );
            d["metadata"]["annotations"] = json!({"sprite-operator.dev/adopt": "true"});
            d
        },
        sprite_doc(
            "deputy",
            json!({"userRef": {"name": "alice"}, "server": {"env": [{"name": "STOLEN",
                "valueFrom": {"secretKeyRef": {"name": "bob-gateway", "key": "token"}}}]}}),
        ),
        sprite_doc("ghost", json!({"userRef": {"name": "nobody-here"}})),
    ];
    for doc in &attacks {
        apply(&attacker_ns, doc).await;
    }
    for name in ["squat", "grab"] {
        let c = condition(&attacker_ns, name, "NameConflict", "OwnedByAnother", 60).await;
        assert_eq!(c["status"], "True");
    }
    let c = condition(&attacker_ns, "deputy", "ServerRunning", "SecretRefused", 240).await;
    assert!(c["message"].as_str().unwrap().contains("bob-gateway"), "{c}");
    condition(&attacker_ns, "ghost", "Suspended", "UserNotFound", 60).await;

    // The relay watches every namespace, as a cluster-wide install does.
    let relay = start_relay_over(&env, None, |_| {}).await;
    for t in [&victim_token, &attacker_token] {
        wait_cached_token(&relay, t).await;
    }

    // The attacker's own session reaches the attacker's runtime.
    let mut ws = connect_browser(&relay, &attacker_token, "")
        .await
        .expect("upgrade");
    assert_eq!(ping(&mut ws, "mine").await["echo"], json!({"n": "mine"}));
    drop(ws);
    assert!(
        calls_on(&env, &attacker_vm)
            .await
            .iter()
            .any(|r| r == "GET /v1/sprites/{name}/proxy"),
        "the attacker's session went elsewhere"
    );
    // Sprites that name the victim's VM are refused as a missing one is.
    let mut missing = connect_browser(&relay, &attacker_token, "?sprite=no-such-sprite")
        .await
        .expect("upgrade");
    let missing_code = close_code(&mut missing).await;
    assert!(missing_code.is_some());
    for name in ["squat", "grab"] {
        let mut ws = connect_browser(&relay, &attacker_token, &format!("?sprite={name}"))
            .await
            .expect("upgrade");
        assert_eq!(close_code(&mut ws).await, missing_code, "{name}");
    }

    // Deleting the Sprites that named the victim's VM leaves that VM alone.
    let sprites = attacker_ns.api::<Sprite>();
    for name in ["squat", "grab"] {
        sprites.delete(name, &DeleteParams::default()).await.unwrap();
    }
    eventually("the attackers' Sprites gone", 60, || async {
        let left = sprites
            .list(&Default::default())
            .await
            .map_err(|e| e.to_string())?
            .items
            .into_iter()
            .filter(|s| {
                s.metadata
                    .name
                    .as_deref()
                    .is_some_and(|n| n == "squat" || n == "grab")
            })
            .count();
        (left == 0).then_some(()).ok_or(format!("{left} left"))
    })
    .await;
    env.sprites
        .get_sprite(&victim_vm)
        .await
        .expect("the victim's VM survives");

    // Nothing of all that reached the victim's VM: no exec, file, proxy,
    // label or delete call since it converged.
    assert_eq!(
        calls_on(&env, &victim_vm).await,
        before,
        "calls on the victim's VM during the attacks"
    );

    // The deputy's VM never got bob's token: its server was not started and
    // its env file holds no value of that Secret.
    let deputy = sprites.get("deputy").await.unwrap();
    let deputy_vm = deputy
        .status
        .as_ref()
        .and_then(|s| s.owned_vm.clone())
        .expect("deputy VM")
        .name;
    if let Ok(env_file) = env.sprites.read_file(&deputy_vm, runtime::SERVER_ENV_PATH).await {
        assert!(!String::from_utf8_lossy(&env_file).contains(&bob_token));
    }
    assert!(deputy.status.unwrap().server_session_id.is_none());

    // A Sprite whose User does not exist got no VM at all.
    let ghost = sprites.get("ghost").await.unwrap();
    assert!(ghost.status.as_ref().and_then(|s| s.owned_vm.as_ref()).is_none());
    let vms = env.sprites.list_sprites(None).await.unwrap();
    assert!(
        !vms.iter().any(|v| v.name == ghost.vm_name()),
        "a VM was made for a Sprite without a User"
    );

    // The victim's sessions keep working, on the victim's own VM.
    let mut ws = connect_browser(&relay, &victim_token, "").await.expect("upgrade");
    assert_eq!(
        ping(&mut ws, "still-mine").await["echo"],
        json!({"n": "still-mine"})
    );
    assert!(
        calls_on(&env, &victim_vm)
            .await
            .iter()
            .any(|r| r == "GET /v1/sprites/{name}/proxy"),
        "the victim's session went elsewhere"
    );
    drop(ws);
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_subject_is_flagged_on_every_user_in_every_namespace() {
    let Some(mut env) = Env::new("subjects").await else {
        return;
    };
    let other_ns = TestNs::named(&format!("{}-corp", env.ns.name))
        .await
        .expect("same plane");
    env.start_controller_over(vec![env.ns.name.clone(), other_ns.name.clone()])
        .await;
    let victim_ns = &env.ns;
    let subject = unique("idp|shared");
    tenant(victim_ns, "corp-alice", &subject, &token(), false).await;
    tenant(&other_ns, "alice", &subject, &token(), false).await;

    let flagged = |ns: &TestNs, name: &'static str, names: String| {
        let api = ns.api::<User>();
        async move {
            eventually(&format!("{name} flagged naming {names}"), 60, || async {
                let u = api.get(name).await.map_err(|e| e.to_string())?;
                let st = u.status.unwrap_or_default();
                st.conditions
                    .iter()
                    .find(|c| {
                        c.type_ == "DuplicateSubject" && c.status == "True" && c.message.contains(&names)
                    })
                    .map(|_| ())
                    .ok_or_else(|| format!("{:?}", st.conditions))
            })
            .await
        }
    };
    flagged(victim_ns, "corp-alice", format!("{}/alice", other_ns.name)).await;
    flagged(&other_ns, "alice", format!("{}/corp-alice", victim_ns.name)).await;

    // The other User takes a subject of its own: both flags go.
    apply(
        &other_ns,
        &json!({"apiVersion": "sprite-operator.dev/v1alpha1", "kind": "User", "metadata": {"name": "alice"},
            "spec": {"email": "alice@example.com", "subject": unique("idp|own"), "tier": "enterprise"}}),
    )
    .await;
    for (ns, name) in [(victim_ns, "corp-alice"), (&other_ns, "alice")] {
        let api = ns.api::<User>();
        eventually(&format!("{name} no longer flagged"), 60, || async {
            let u = api.get(name).await.map_err(|e| e.to_string())?;
            let st = u.status.unwrap_or_default();
            (!is_true(&st.conditions, "DuplicateSubject"))
                .then_some(())
                .ok_or_else(|| format!("{:?}", st.conditions))
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_secret_someone_else_planted_is_not_used() {
    let Some(env) = Env::new("planted").await else {
        return;
    };
    // Planted before the User exists, under the name its gateway Secret takes.
    let planted = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "carol-gateway"},
        "stringData": {"token": "5eeded0000aaaabbbbccccddddeeeeff"}});
    apply(&env.ns, &planted).await;
    apply(
        &env.ns,
        &json!({"apiVersion": "sprite-operator.dev/v1alpha1", "kind": "User", "metadata": {"name": "carol"},
            "spec": {"email": "carol@example.com", "subject": unique("idp|carol"), "tier": "free"}}),
    )
    .await;
    let users = env.ns.api::<User>();
    let st = eventually("carol's GatewaySecret condition", 60, || async {
        let u = users.get("carol").await.map_err(|e| e.to_string())?;
        let st = u.status.unwrap_or_default();
        st.conditions
            .iter()
            .any(|c| c.type_ == "GatewaySecret" && c.status == "False" && c.reason == "NotOwned")
            .then_some(st.clone())
            .ok_or_else(|| format!("{:?}", st.conditions))
    })
    .await;
    assert_eq!(st.gateway_token_sha256, None, "a planted token was published");
    // The planted Secret is left as it was: not the operator's to change.
    let s = env.ns.api::<Secret>().get("carol-gateway").await.unwrap();
    assert!(s.metadata.owner_references.is_none());

    // Deleting it lets the operator issue the User's own.
    env.ns
        .api::<Secret>()
        .delete("carol-gateway", &DeleteParams::default())
        .await
        .unwrap();
    // Nothing watches unlabelled Secrets: the User's resync (a minute) finds it.
    eventually("carol's own token", 90, || async {
        let u = users.get("carol").await.map_err(|e| e.to_string())?;
        u.status
            .and_then(|s| s.gateway_token_sha256)
            .map(|_| ())
            .ok_or_else(|| "no hash yet".to_string())
    })
    .await;
}
