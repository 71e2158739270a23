//! The User reconciler: the user's gateway token Secret, their primary
//! Sprite from the template, and the month's usage against the tier's
//! budget. Quota and suspension are enforced by the Sprite reconciler, which
//! reads the User; this one publishes what it needs.

use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{OwnerReference, Time};
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use rand::RngCore;
use serde_json::json;
use tracing::info;

use super::context::Context;
use super::error::Error;
use super::usage;
use crate::api::conditions::{DesiredCondition, remove_condition, set_condition};
use crate::api::sprite::{PAUSED_ANNOTATION, USER_LABEL};
use crate::api::user::{SecretRef, Usage, UserPhase};
use crate::api::{Sprite, User, UserStatus};
use crate::config::TierLimits;

pub const MANAGER: &str = "sprite-operator-user";
pub const TOKEN_KEY: &str = "token";

pub fn primary_sprite_name(user: &str) -> String {
    format!("{user}-primary")
}

pub fn gateway_secret_name(user: &str) -> String {
    format!("{user}-gateway")
}

/// Hex SHA-256 of a gateway token: what status publishes and the relay
/// compares (decision 8). The relay's function, so both sides hash alike.
pub fn token_sha256(token: &[u8]) -> String {
    crate::relay::gateway_token_sha256(&String::from_utf8_lossy(token))
}

/// Whether the period's usage has spent the tier's budget.
pub fn over_budget(usage: &Usage, tier: &TierLimits) -> bool {
    tier.monthly_budget_seconds()
        .is_some_and(|b| usage.runtime_seconds >= b)
}

pub fn phase(suspend: bool, over_budget: bool, ready: bool) -> UserPhase {
    if suspend {
        UserPhase::Suspended
    } else if over_budget {
        UserPhase::OverBudget
    } else if ready {
        UserPhase::Active
    } else {
        UserPhase::Pending
    }
}

/// Whether a change to `changed` can alter `other`'s DuplicateSubject
/// condition, in any watched namespace (the relay refuses a subject shared
/// anywhere it looks): they share a subject now, or `other` is flagged (the
/// flag may name `changed` under the subject it just left, or was deleted
/// with). Flagged Users are few, so re-checking all of them is cheap and
/// needs no memory of old subjects.
pub fn subject_peer(changed: &User, other: &User) -> bool {
    other.uid() != changed.uid()
        && (other.spec.subject == changed.spec.subject
            || other
                .status
                .as_ref()
                .is_some_and(|s| crate::api::conditions::is_true(&s.conditions, "DuplicateSubject")))
}

/// When to look again: at the period boundary (usage resets) or the resync.
pub fn requeue_after(now: Timestamp, resync: Duration) -> Duration {
    let to_boundary = Duration::try_from(usage::next_period_start(now).duration_since(now)).unwrap_or(resync);
    to_boundary.clamp(Duration::from_millis(100), resync)
}

fn owner_ref(user: &User) -> OwnerReference {
    user.controller_owner_ref(&())
        .expect("a User read from the API has a uid")
}

pub async fn reconcile(user: Arc<User>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.metrics
        .reconciles
        .get_or_create(&super::metrics::KindLabels { kind: "User" })
        .inc();
    let ns = user.namespace().unwrap_or_else(|| "default".into());
    let name = user.name_any();
    let now = ctx.clock.now();
    let tier = ctx.config.tier(user.spec.tier).clone();

    if user
        .annotations()
        .get(PAUSED_ANNOTATION)
        .is_some_and(|v| v == "true")
    {
        let mut status = user.status.clone().unwrap_or_default();
        set_condition(
            &mut status.conditions,
            DesiredCondition::new(
                "Paused",
                true,
                "Annotation",
                "sprite-operator.dev/paused is \"true\": nothing is done until it is removed",
            ),
            user.metadata.generation,
            Time(now),
        );
        if user.status.as_ref() != Some(&status) {
            write_status(&ctx, &user, &ns, status).await?;
        }
        return Ok(Action::await_change());
    }

    let gateway = ensure_gateway_secret(&ctx, &user, &ns).await?;
    let primary_ok = ensure_primary_sprite(&ctx, &user, &ns).await?;

    let sprites = ctx.stores.sprites.in_namespace(&ns);
    let mine: Vec<&Sprite> = sprites
        .iter()
        .map(AsRef::as_ref)
        .filter(|s| s.spec.user_ref.name == name)
        .collect();
    // The month's spend from the ledger, which keeps deleted Sprites' share.
    let seen = mine.iter().filter_map(|s| {
        let u = s.status.as_ref()?.usage.as_ref()?;
        Some((s.uid()?, s.name_any(), u))
    });
    let ledger = usage::ledger(user.status.as_ref().and_then(|s| s.ledger.as_ref()), seen, now);
    let period = usage::total(&ledger);
    let spent = over_budget(&period, &tier);

    // Across every namespace the controller watches, as the relay looks.
    let duplicates = sharers(&user, &ctx.stores.users());

    let mut status = user.status.clone().unwrap_or_default();
    status.sprites = mine.len() as i32;
    status.usage = Some(period.clone());
    status.ledger = Some(ledger);
    remove_condition(&mut status.conditions, "Paused");
    status.gateway_secret_ref = Some(SecretRef {
        name: gateway_secret_name(&name),
    });
    status.gateway_token_sha256 = gateway.as_ref().ok().cloned();
    let new_phase = phase(user.spec.suspend, spent, primary_ok);
    status.phase = Some(new_phase);
    status.observed_generation = user.metadata.generation;

    let (generation, t) = (user.metadata.generation, Time(now));
    let budget_msg = match tier.monthly_budget_seconds() {
        Some(b) => format!("{} of {} s used this month", period.runtime_seconds, b),
        None => format!(
            "{} s used this month; the tier has no budget",
            period.runtime_seconds
        ),
    };
    set_condition(
        &mut status.conditions,
        if spent {
            DesiredCondition::new("WithinBudget", false, "BudgetExhausted", budget_msg)
        } else {
            DesiredCondition::new("WithinBudget", true, "WithinBudget", budget_msg)
        },
        generation,
        t.clone(),
    );
    if duplicates.is_empty() {
        remove_condition(&mut status.conditions, "DuplicateSubject");
    } else {
        set_condition(
            &mut status.conditions,
            DesiredCondition::new(
                "DuplicateSubject",
                true,
                "SubjectShared",
                format!(
                    "subject also used by {}; the relay refuses it",
                    duplicates.join(", ")
                ),
            ),
            generation,
            t.clone(),
        );
    }
    let gateway_condition = match &gateway {
        Ok(_) => DesiredCondition::new(
            "GatewaySecret",
            true,
            "Issued",
            "the gateway token Secret is this User's",
        ),
        Err(why) => DesiredCondition::new("GatewaySecret", false, "NotOwned", why.clone()),
    };
    set_condition(&mut status.conditions, gateway_condition, generation, t.clone());
    let ready = new_phase == UserPhase::Active;
    set_condition(
        &mut status.conditions,
        DesiredCondition::new(
            "Ready",
            ready,
            match new_phase {
                UserPhase::Active => "Active",
                UserPhase::Suspended => "Suspended",
                UserPhase::OverBudget => "OverBudget",
                UserPhase::Pending => "Pending",
            },
            format!("phase {new_phase:?}"),
        ),
        generation,
        t,
    );

    if user.status.as_ref() != Some(&status) {
        let old_phase = user.status.as_ref().and_then(|s| s.phase);
        write_status(&ctx, &user, &ns, status).await?;
        if old_phase != Some(new_phase) {
            info!(user = %name, namespace = %ns, phase = ?new_phase, "user phase changed");
            let ev = kube::runtime::events::Event {
                type_: kube::runtime::events::EventType::Normal,
                reason: "PhaseChanged".into(),
                note: Some(format!("{old_phase:?} -> {new_phase:?}")),
                action: "reconcile".into(),
                secondary: None,
            };
            let _ = ctx.recorder.publish(&ev, &user.object_ref(&())).await;
        }
    }
    Ok(Action::requeue(
        ctx.clock
            .to_real(requeue_after(now, ctx.config.resync))
            .min(ctx.config.resync),
    ))
}

pub fn error_policy(_user: Arc<User>, err: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics
        .errors
        .get_or_create(&super::metrics::ErrorLabels {
            kind: "User",
            reason: err.metric_label(),
        })
        .inc();
    Action::requeue(err.backoff(2))
}

/// The other Users (as `namespace/name`, sorted) that claim `user`'s subject.
pub fn sharers(user: &User, users: &[Arc<User>]) -> Vec<String> {
    let mut v: Vec<String> = users
        .iter()
        .filter(|u| u.spec.subject == user.spec.subject && u.uid() != user.uid())
        .map(|u| format!("{}/{}", u.namespace().unwrap_or_default(), u.name_any()))
        .collect();
    v.sort();
    v.dedup();
    v
}

/// Whether an existing Secret is this User's gateway Secret: owned by the
/// User (its UID), or labelled with its name (a restore from a backup
/// changes UIDs). Anything else someone else put under that name.
pub fn gateway_secret_is_users(secret: &ObjectMeta, user: &User) -> bool {
    let uid = user.uid();
    let owned = secret
        .owner_references
        .iter()
        .flatten()
        .any(|o| o.kind == "User" && Some(&o.uid) == uid.as_ref());
    let labelled = secret
        .labels
        .as_ref()
        .and_then(|l| l.get(USER_LABEL))
        .is_some_and(|v| *v == user.name_any());
    owned || labelled
}

/// The gateway Secret exists (created with a fresh random token when it does
/// not: deleting it rotates the token). Returns the token's hash, or why a
/// Secret of that name is not used.
async fn ensure_gateway_secret(
    ctx: &Context,
    user: &User,
    ns: &str,
) -> Result<Result<String, String>, Error> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let name = gateway_secret_name(&user.name_any());
    // The hash computed at the resourceVersion the metadata cache holds:
    // a converged User reads no Secret.
    if let Some(meta) = ctx.stores.secrets.get(ns, &name)
        && gateway_secret_is_users(&meta.metadata, user)
        && let (Some(uid), Some(rv)) = (&meta.metadata.uid, &meta.metadata.resource_version)
        && let Some(hash) = ctx.stores.token_hash(uid, rv)
    {
        return Ok(Ok(hash));
    }
    if let Some(s) = secrets.get_opt(&name).await? {
        if !gateway_secret_is_users(&s.metadata, user) {
            return Ok(Err(format!(
                "Secret {name} exists but is not this User's (no owner reference to it, no \
                 {USER_LABEL} label naming it): it is not used; delete or rename it"
            )));
        }
        let token = s
            .data
            .as_ref()
            .and_then(|d| d.get(TOKEN_KEY))
            .ok_or_else(|| Error::Secret(format!("{name} has no key {TOKEN_KEY}")))?;
        let hash = token_sha256(&token.0);
        if let (Some(uid), Some(rv)) = (s.metadata.uid.clone(), s.metadata.resource_version.clone()) {
            ctx.stores.keep_token_hash(uid, rv, hash.clone());
        }
        return Ok(Ok(hash));
    }
    let mut raw = [0u8; 32];
    rand::rng().fill_bytes(&mut raw);
    let token = hex::encode(raw);
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {
            "name": name,
            "ownerReferences": [owner_ref(user)],
            "labels": {"app.kubernetes.io/managed-by": "sprite-operator", USER_LABEL: user.name_any()},
        },
        "type": "Opaque",
    }))
    .expect("static secret shape");
    let secret = Secret {
        data: Some([(TOKEN_KEY.to_string(), ByteString(token.clone().into_bytes()))].into()),
        ..secret
    };
    match secrets.create(&PostParams::default(), &secret).await {
        Ok(_) => {
            info!(user = %user.name_any(), secret = %name, "gateway token issued");
            Ok(Ok(token_sha256(token.as_bytes())))
        }
        // Created by a concurrent pass: read what won.
        Err(kube::Error::Api(e)) if e.code == 409 => Box::pin(ensure_gateway_secret(ctx, user, ns)).await,
        Err(e) => Err(e.into()),
    }
}

/// Applies the primary Sprite from the template. Returns whether the User's
/// Sprite side is in place (true when there is no template).
async fn ensure_primary_sprite(ctx: &Context, user: &User, ns: &str) -> Result<bool, Error> {
    let Some(template) = &user.spec.sprite else {
        return Ok(true);
    };
    let name = primary_sprite_name(&user.name_any());
    // Applied only when the cached Sprite differs: a converged User writes
    // nothing.
    if let Some(existing) = ctx.stores.sprites.get(ns, &name)
        && primary_is_current(&existing, user, template)
    {
        return Ok(true);
    }
    let mut spec = serde_json::to_value(template).expect("template serialises");
    spec["userRef"] = json!({"name": user.name_any()});
    let desired = json!({
        "apiVersion": "sprite-operator.dev/v1alpha1",
        "kind": "Sprite",
        "metadata": {
            "name": name,
            "ownerReferences": [owner_ref(user)],
            "labels": {USER_LABEL: user.name_any()},
        },
        "spec": spec,
    });
    Api::<Sprite>::namespaced(ctx.client.clone(), ns)
        .patch(
            &name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&desired),
        )
        .await?;
    Ok(true)
}

/// Whether the primary Sprite already is what the User's template says.
fn primary_is_current(
    existing: &Sprite,
    user: &User,
    template: &crate::api::sprite::SpriteTemplateSpec,
) -> bool {
    existing.spec.template == *template
        && existing.spec.user_ref.name == user.name_any()
        && existing
            .owner_references()
            .iter()
            .any(|o| Some(&o.uid) == user.uid().as_ref())
        && existing.labels().get(USER_LABEL) == Some(&user.name_any())
}

async fn write_status(ctx: &Context, user: &User, ns: &str, status: UserStatus) -> Result<(), Error> {
    let patch = json!({"apiVersion": "sprite-operator.dev/v1alpha1", "kind": "User", "status": status});
    Api::<User>::namespaced(ctx.client.clone(), ns)
        .patch_status(
            &user.name_any(),
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Tier;
    use crate::config::OperatorConfig;

    fn usage(secs: i64) -> Usage {
        Usage {
            period_start: Time("2026-11-01T00:00:00Z".parse().unwrap()),
            runtime_seconds: secs,
            estimated_cost: "0.000000".into(),
        }
    }

    #[test]
    fn budget_is_per_tier_and_enterprise_has_none() {
        let c = OperatorConfig::default();
        assert!(!over_budget(&usage(10 * 3600 - 1), c.tier(Tier::Free)));
        assert!(over_budget(&usage(10 * 3600), c.tier(Tier::Free)));
        assert!(!over_budget(&usage(i64::MAX / 2), c.tier(Tier::Enterprise)));
    }

    #[test]
    fn phase_precedence_is_suspend_then_budget() {
        assert_eq!(phase(true, true, true), UserPhase::Suspended);
        assert_eq!(phase(false, true, true), UserPhase::OverBudget);
        assert_eq!(phase(false, false, true), UserPhase::Active);
        assert_eq!(phase(false, false, false), UserPhase::Pending);
    }

    #[test]
    fn token_hash_is_hex_sha256() {
        assert_eq!(
            token_sha256(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    fn user(ns: &str, name: &str, subject: &str, flagged: bool) -> User {
        let mut u = User::new(
            name,
            serde_json::from_value(json!({"subject": subject, "email": "u@example.com", "tier": "free"}))
                .unwrap(),
        );
        u.metadata.namespace = Some(ns.into());
        u.metadata.uid = Some(format!("{ns}/{name}"));
        if flagged {
            let mut st = UserStatus::default();
            set_condition(
                &mut st.conditions,
                DesiredCondition::new("DuplicateSubject", true, "SubjectShared", "x"),
                Some(1),
                Time("2026-11-01T00:00:00Z".parse().unwrap()),
            );
            u.status = Some(st);
        }
        u
    }

    #[test]
    fn a_user_change_rechecks_sharers_and_flagged_users_of_every_namespace() {
        let moved = user("a", "dora", "dora-own", false);
        // Shares the new subject, here or in another namespace.
        assert!(subject_peer(&moved, &user("a", "x", "dora-own", false)));
        assert!(subject_peer(&moved, &user("b", "x", "dora-own", false)));
        // Flagged under the subject dora left: must be looked at again.
        assert!(subject_peer(&moved, &user("a", "dana", "shared", true)));
        assert!(subject_peer(&moved, &user("b", "dana", "shared", true)));
        // Unrelated, or itself: left alone.
        assert!(!subject_peer(&moved, &user("a", "eve", "eve", false)));
        assert!(!subject_peer(&moved, &moved.clone()));
    }

    #[test]
    fn sharers_are_named_across_namespaces() {
        let alice = user("acme", "alice", "idp|1", false);
        let all = vec![
            Arc::new(alice.clone()),
            Arc::new(user("acme-corp", "mallory", "idp|1", false)),
            Arc::new(user("acme", "bob", "idp|2", false)),
        ];
        assert_eq!(sharers(&alice, &all), vec!["acme-corp/mallory".to_string()]);
        assert!(sharers(&all[2], &all).is_empty());
    }

    #[test]
    fn a_gateway_secret_is_used_only_when_it_is_the_users() {
        let alice = user("acme", "alice", "idp|1", false);
        let s = |v: serde_json::Value| -> Secret { serde_json::from_value(v).unwrap() };
        let planted = s(json!({"metadata": {"name": "alice-gateway"}}));
        assert!(!gateway_secret_is_users(&planted.metadata, &alice));
        let other_owner = s(json!({"metadata": {"name": "alice-gateway", "ownerReferences": [{
            "apiVersion": "sprite-operator.dev/v1alpha1", "kind": "User", "name": "alice", "uid": "someone-else"}]}}));
        assert!(!gateway_secret_is_users(&other_owner.metadata, &alice));
        let owned = s(json!({"metadata": {"name": "alice-gateway", "ownerReferences": [{
            "apiVersion": "sprite-operator.dev/v1alpha1", "kind": "User", "name": "alice", "uid": "acme/alice"}]}}));
        assert!(gateway_secret_is_users(&owned.metadata, &alice));
        let labelled = s(json!({"metadata": {"name": "alice-gateway",
            "labels": {"sprite-operator.dev/user": "alice"}}}));
        assert!(gateway_secret_is_users(&labelled.metadata, &alice));
    }

    #[test]
    fn requeue_comes_back_at_the_month_boundary() {
        let now: Timestamp = "2026-11-30T23:59:50Z".parse().unwrap();
        let resync = Duration::from_secs(300);
        assert_eq!(requeue_after(now, resync), Duration::from_secs(10));
        let now: Timestamp = "2026-11-15T00:00:00Z".parse().unwrap();
        assert_eq!(requeue_after(now, resync), resync);
    }
}
