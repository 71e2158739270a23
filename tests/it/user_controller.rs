//! The User reconciler: primary Sprite, gateway token, quota, budget.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{DeleteParams, PostParams};
use serde_json::json;
use sprite_operator::api::conditions::{find, is_true};
use sprite_operator::api::user::UserPhase;
use sprite_operator::api::{Sprite, Tier, User};
use sprite_operator::controller::OffsetClock;
use sprite_operator::controller::user::token_sha256;

use crate::common::eventually;
use crate::sprite_controller::{Env, sprite_doc, status_of, test_config};

fn user_doc(name: &str, tier: &str, extra: serde_json::Value) -> User {
    let mut spec =
        json!({"email": format!("{name}@example.com"), "subject": format!("sub-{name}"), "tier": tier});
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
        spec.extend(extra.clone());
    }
    serde_json::from_value(json!({
        "apiVersion": "sprite-operator.dev/v1alpha1", "kind": "User", "metadata": {"name": name}, "spec": spec
    }))
    .unwrap()
}

async fn user_status(env: &Env, name: &str) -> sprite_operator::api::UserStatus {
    env.ns
        .api::<User>()
        .get(name)
        .await
        .unwrap()
        .status
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_user_gets_a_primary_sprite_and_a_gateway_token() {
    let Some(env) = Env::new("user-example").await else {
        return;
    };
    env.apply_example("user.yaml").await;
    let sprite = env.wait_ready("alice-primary", 180).await;
    // The template flowed into the Sprite, owned by the User.
    assert_eq!(sprite.spec.user_ref.name, "alice");
    assert_eq!(
        sprite.spec.template.resources.as_ref().unwrap().ram_mb,
        Some(4096)
    );
    let owner = &sprite.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str(), owner.controller),
        ("User", "alice", Some(true))
    );

    let st = eventually("the User to be Active", 60, || async {
        let st = user_status(&env, "alice").await;
        if st.phase == Some(UserPhase::Active) && st.sprites == 1 {
            Ok(st)
        } else {
            Err(format!("{st:?}"))
        }
    })
    .await;
    let secret = env.ns.api::<Secret>().get("alice-gateway").await.unwrap();
    let token = &secret.data.as_ref().unwrap()["token"].0;
    assert_eq!(token.len(), 64, "32 random bytes, hex");
    assert_eq!(
        st.gateway_token_sha256.as_deref(),
        Some(token_sha256(token).as_str())
    );
    assert_eq!(st.gateway_secret_ref.unwrap().name, "alice-gateway");
    assert!(is_true(&st.conditions, "Ready"));

    // Rotating is deleting the Secret: a new token, a new hash.
    env.ns
        .api::<Secret>()
        .delete("alice-gateway", &DeleteParams::default())
        .await
        .unwrap();
    let old_hash = st.gateway_token_sha256.clone().unwrap();
    eventually("a rotated token", 60, || async {
        let h = user_status(&env, "alice").await.gateway_token_sha256;
        if h.as_ref().is_some_and(|h| *h != old_hash) {
            Ok(())
        } else {
            Err(format!("{h:?}"))
        }
    })
    .await;

    // Template changes flow into the Sprite.
    env.ns
        .api::<User>()
        .patch(
            "alice",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"spec": {"sprite": {"resources": {"ramMb": 8192}}}})),
        )
        .await
        .unwrap();
    eventually("the template change in the Sprite", 30, || async {
        let s = env
            .ns
            .api::<Sprite>()
            .get("alice-primary")
            .await
            .map_err(|e| e.to_string())?;
        match s.spec.template.resources.and_then(|r| r.ram_mb) {
            Some(8192) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;

    // Deleting the User removes its Sprite, the VM (finalizer ran) and the Secret.
    let vm = sprite.status.unwrap().sprite_name.unwrap();
    env.ns
        .api::<User>()
        .delete("alice", &DeleteParams::background())
        .await
        .unwrap();
    eventually("the User's Sprite, VM and Secret to be gone", 120, || async {
        let sprite = env
            .ns
            .api::<Sprite>()
            .get_opt("alice-primary")
            .await
            .map_err(|e| e.to_string())?;
        let secret = env
            .ns
            .api::<Secret>()
            .get_opt("alice-gateway")
            .await
            .map_err(|e| e.to_string())?;
        let vm_gone = matches!(
            env.sprites.get_sprite(&vm).await,
            Err(sprite_operator::sprites::Error::NotFound { .. })
        );
        if sprite.is_none() && secret.is_none() && vm_gone {
            Ok(())
        } else {
            Err(format!(
                "sprite {} secret {} vm_gone {vm_gone}",
                sprite.is_some(),
                secret.is_some()
            ))
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sprite_over_the_tier_quota_waits_without_a_vm() {
    let Some(env) = Env::new("user-quota").await else {
        return;
    };
    env.ns
        .api::<User>()
        .create(&PostParams::default(), &user_doc("sam", "starter", json!({})))
        .await
        .unwrap();
    let sprites = env.ns.api::<Sprite>();
    // Starter allows two Sprites; the third by age waits.
    for name in ["one", "two", "three"] {
        let doc = sprite_doc(
            name,
            json!({"spriteName": format!("vm-{name}"), "userRef": {"name": "sam"}}),
        );
        sprites
            .create(&PostParams::default(), &serde_json::from_value(doc).unwrap())
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(1100)).await; // distinct creationTimestamps
    }
    env.wait_ready("one", 180).await;
    env.wait_ready("two", 180).await;
    let st = eventually("QuotaExceeded on the third", 60, || async {
        let st = sprites.get("three").await.unwrap().status.unwrap_or_default();
        if is_true(&st.conditions, "QuotaExceeded") {
            Ok(st)
        } else {
            Err(format!("{st:?}"))
        }
    })
    .await;
    assert_eq!(st.phase, Some(sprite_operator::api::sprite::SpritePhase::Pending));
    assert!(matches!(
        env.sprites.get_sprite("vm-three").await,
        Err(sprite_operator::sprites::Error::NotFound { .. })
    ));
    let creates = env.stats().await["calls"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["route"] == "POST /v1/sprites")
        .count();
    assert_eq!(creates, 2, "the sim saw a create for the Sprite over quota");
    eventually("sam's status to count 3 Sprites", 30, || async {
        match user_status(&env, "sam").await.sprites {
            3 => Ok(()),
            n => Err(format!("{n} Sprites")),
        }
    })
    .await;

    // Room frees up: the waiting Sprite goes through.
    sprites.delete("one", &DeleteParams::default()).await.unwrap();
    env.wait_ready("three", 180).await;
    assert!(
        find(
            &sprites.get("three").await.unwrap().status.unwrap().conditions,
            "QuotaExceeded"
        )
        .is_none()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_budget_stops_heartbeats_until_next_month() {
    let mut config = test_config();
    config.idle_tail = Duration::from_secs(1);
    let tier = config.tiers.get_mut(&Tier::Growth).unwrap();
    tier.monthly_runtime = Some(Duration::from_secs(3));
    tier.min_heartbeat_interval = Duration::from_secs(1);
    let clock = Arc::new(OffsetClock::default());
    let Some(env) = Env::with(
        "user-budget",
        |mut c| {
            c.idle_timeout = Duration::from_secs(1);
            c
        },
        config,
        clock.clone(),
    )
    .await
    else {
        return;
    };
    env.ns
        .api::<User>()
        .create(&PostParams::default(), &user_doc("bea", "growth", json!({})))
        .await
        .unwrap();
    let doc = sprite_doc(
        "busy",
        json!({"spriteName": "vm-busy", "userRef": {"name": "bea"},
               "heartbeat": {"schedule": "*/3 * * * * *", "duration": "1s", "startingDeadlineSeconds": 2}}),
    );
    env.ns
        .api::<Sprite>()
        .create(&PostParams::default(), &serde_json::from_value(doc).unwrap())
        .await
        .unwrap();
    // Bootstrapped, not Ready: Ready lasts only until the second heartbeat
    // spends the budget (a few seconds), which a slow poll can miss.
    eventually("busy to be bootstrapped", 180, || async {
        let st = status_of(&env.ns, "busy").await;
        if is_true(&st.conditions, "Bootstrapped") {
            Ok(())
        } else {
            Err(format!("{st:?}"))
        }
    })
    .await;

    // Each heartbeat counts 1 s + the 1 s idle tail: two spend the 3 s budget.
    eventually("the User to go OverBudget", 60, || async {
        let st = user_status(&env, "bea").await;
        if st.phase == Some(UserPhase::OverBudget) {
            Ok(())
        } else {
            Err(format!("{st:?}"))
        }
    })
    .await;
    let sprite_st = eventually("the Sprite to say why it is suspended", 30, || async {
        let st = env
            .ns
            .api::<Sprite>()
            .get("busy")
            .await
            .unwrap()
            .status
            .unwrap_or_default();
        match find(&st.conditions, "Suspended") {
            Some(c) if c.reason == "UserOverBudget" => Ok(st),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert_eq!(
        sprite_st.phase,
        Some(sprite_operator::api::sprite::SpritePhase::Suspended)
    );
    // Give an in-flight heartbeat time to finish, then no more wakes.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let wakes = env.wakes("vm-busy").await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert_eq!(
        env.wakes("vm-busy").await,
        wakes,
        "a heartbeat woke the VM of a User over budget"
    );

    // Next month: usage resets and heartbeats resume.
    let now = jiff::Timestamp::now();
    let next = sprite_operator::controller::usage::next_period_start(now);
    clock.set_offset(next.duration_since(now) + jiff::SignedDuration::from_secs(5));
    eventually("the User to be Active again next month", 90, || async {
        let st = user_status(&env, "bea").await;
        if st.phase == Some(UserPhase::Active) {
            Ok(())
        } else {
            Err(format!("{st:?}"))
        }
    })
    .await;
    eventually("heartbeats to wake the VM again", 60, || async {
        let w = env.wakes("vm-busy").await;
        if w > wakes {
            Ok(())
        } else {
            Err(format!("{w} wakes"))
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_sharing_a_subject_are_both_flagged() {
    let Some(env) = Env::new("user-dup").await else {
        return;
    };
    let users = env.ns.api::<User>();
    for name in ["dana", "dora"] {
        let mut u = user_doc(name, "free", json!({}));
        u.spec.subject = "shared-subject".into();
        users.create(&PostParams::default(), &u).await.unwrap();
    }
    for name in ["dana", "dora"] {
        let st = eventually(&format!("{name} flagged"), 60, || async {
            let st = user_status(&env, name).await;
            if is_true(&st.conditions, "DuplicateSubject") {
                Ok(st)
            } else {
                Err(format!("{st:?}"))
            }
        })
        .await;
        let c = find(&st.conditions, "DuplicateSubject").unwrap();
        assert!(
            c.message.contains(if name == "dana" { "dora" } else { "dana" }),
            "{}",
            c.message
        );
    }
    // One of them moves to its own subject: both are clear again.
    users
        .patch(
            "dora",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"spec": {"subject": "dora-own"}})),
        )
        .await
        .unwrap();
    eventually("the flag to clear on dana", 60, || async {
        let st = user_status(&env, "dana").await;
        if find(&st.conditions, "DuplicateSubject").is_none() {
            Ok(())
        } else {
            Err(format!("{st:?}"))
        }
    })
    .await;
}
