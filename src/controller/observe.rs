//! What a Sprite's reconcile observes: the VM as the API's metadata calls
//! report it (never waking it), the User, the runtime source, the schedule,
//! the relay's session Lease, and what is inside the VM only while it is
//! awake for another reason. Reads only: nothing here writes status or acts.

use std::sync::Arc;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::Api;
use kube::core::PartialObjectMeta;
use kube::{Resource, ResourceExt};
use tracing::warn;

use super::context::Context;
use super::error::Error;
use super::plan::{Facts, ObservedVm, ResetReason, VmOwner};
use super::schedule::{Schedule, SkipReason, decide};
use super::vm_cache::Cached;
use crate::api::session;
use crate::api::sprite::{
    ADOPT_ANNOTATION, BootstrapStep, DeletionPolicy, FINALIZER, PAUSED_ANNOTATION, UID_LABEL_PREFIX,
};
use crate::api::user::UserPhase;
use crate::api::{Sprite, User};
use crate::money::MicroUsd;
use crate::runtime::{self, RuntimeBundle};
use crate::sprites;

/// Everything the decision needs, plus what the steps reuse.
pub struct Observed {
    pub(super) facts: Facts,
    pub(super) vm: Option<sprites::Sprite>,
    pub(super) bundle: Option<Arc<RuntimeBundle>>,
    pub(super) bundle_error: Option<String>,
    pub(super) schedule: Option<Schedule>,
    pub(super) schedule_error: Option<String>,
    pub(super) skipped: Option<SkipReason>,
    pub(super) rate: MicroUsd,
    pub(super) clamped: bool,
    pub(super) suspend_reason: Option<(&'static str, String)>,
    pub(super) vm_from_list: bool,
    /// The heartbeat decision; status records it once the tick is consumed.
    pub(super) tick: Option<super::schedule::TickDecision>,
    /// `/workspace/VERSION` as read from an awake VM: None when not read,
    /// Some(None) when the file is missing.
    pub(super) vm_version: Option<Option<String>>,
    /// The relay's session Lease of this Sprite.
    pub(super) session: Option<session::Live>,
    pub(super) session_live_until: Option<Timestamp>,
    /// Active time counted after each wake (operator config).
    pub(super) idle_tail: Duration,
}

#[derive(Debug)]
pub(super) enum VmRead {
    /// The periodic list, when recent enough; a get otherwise.
    List,
    /// What a get just returned.
    Known(Option<Box<sprites::Sprite>>),
}

/// A metadata get (never wakes the VM), remembered in the cache.
pub(super) async fn get_vm(ctx: &Context, vm_name: &str) -> Result<Option<sprites::Sprite>, Error> {
    let vm = match ctx.sprites.get_sprite(vm_name).await {
        Ok(vm) => Some(vm),
        Err(sprites::Error::NotFound { .. }) => None,
        Err(e) => return Err(e.into()),
    };
    ctx.vms.record(vm_name, vm.clone());
    Ok(vm)
}

/// Whether two reads of a VM agree on what decisions use.
pub(super) fn same_vm(a: Option<&sprites::Sprite>, b: Option<&sprites::Sprite>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => a.status == b.status && a.labels == b.labels && a.id == b.id,
        _ => false,
    }
}

/// Reads what the decision needs: the VM (metadata, which never wakes it),
/// the User, the runtime source, the schedule, the relay's session Lease,
/// and, only while the VM is awake for another reason, what is inside it.
/// Writes nothing.
pub(super) async fn observe(
    sprite: &Sprite,
    ctx: &Context,
    ns: &str,
    vm_name: &str,
    now: Timestamp,
    read: VmRead,
) -> Result<Observed, Error> {
    let status = sprite.status.clone().unwrap_or_default();
    let paused = is_paused(sprite.annotations());
    let deleting = sprite.meta().deletion_timestamp.is_some();
    let has_finalizer = sprite.finalizers().iter().any(|f| f == FINALIZER);
    let policy = sprite.spec.template.deletion_policy;
    // Paused, or deleting in a way that needs no VM (Retain keeps it, and
    // without our finalizer there is nothing to do): no Sprites.dev call.
    let needs_vm = !paused && !(deleting && (!has_finalizer || policy == DeletionPolicy::Retain));
    let (mut vm, mut vm_from_list) = match (read, needs_vm) {
        (_, false) => (None, false),
        (VmRead::Known(vm), true) => (vm.map(|b| *b), false),
        (VmRead::List, true) => match ctx.vms.lookup(vm_name, Instant::now()) {
            Cached::Present(vm) => (Some(*vm), true),
            Cached::Absent => (None, true),
            Cached::Unknown => (get_vm(ctx, vm_name).await?, false),
        },
    };
    let adopt = sprite
        .annotations()
        .get(ADOPT_ANNOTATION)
        .is_some_and(|v| v == "true");
    let observe_vm = |vm: &Option<sprites::Sprite>| {
        vm.as_ref().map(|v| ObservedVm {
            owner: vm_owner(&v.labels, &sprite.uid().unwrap_or_default()),
            awake: v.status == "running",
        })
    };
    let mut observed_vm = observe_vm(&vm);

    let (bundle, bundle_error) = match desired_bundle(sprite, ctx, ns).await {
        Ok(b) => (Some(b), None),
        Err(e) => (None, Some(e.to_string())),
    };

    let user = get_user(ctx, ns, &sprite.spec.user_ref.name).await?;
    let user_missing = user.is_none();
    let ledger_behind = deleting && user.as_ref().is_some_and(|u| ledger_behind(u, sprite, now));
    let tier = user.as_ref().map(|u| ctx.config.tier(u.spec.tier).clone());
    let quota_admits = match (&user, &tier) {
        (Some(u), Some(t)) => admitted_by_quota(
            &ctx.stores.sprites.in_namespace(ns),
            sprite,
            &u.name_any(),
            t.max_sprites,
        ),
        // Without its User a Sprite is admitted nowhere (user_missing says why).
        _ => false,
    };
    let (suspended, suspend_reason) = suspension(sprite, user.as_ref());

    let min_interval = tier.as_ref().map_or(Duration::ZERO, |t| t.min_heartbeat_interval);
    let rate = tier
        .as_ref()
        .map_or_else(|| ctx.config.tier(crate::api::Tier::Free).rate(), |t| t.rate());
    let (mut schedule, mut schedule_error, mut heartbeat_due, mut skipped, mut clamped) =
        (None, None, None, None, false);
    let mut tick = None;
    if let Some(hb) = &sprite.spec.template.heartbeat {
        match Schedule::parse(hb) {
            Ok(s) => {
                let planned = status.next_heartbeat_time.as_ref().map(|t| t.0);
                let last = status.last_heartbeat_time.as_ref().map(|t| t.0);
                let d = decide(&s, planned, last, now, min_interval);
                skipped = d.skip_reason;
                clamped = s.shortest_gap(now, 16).is_some_and(|g| g < min_interval);
                // Suspended Sprites let their ticks pass.
                heartbeat_due = if suspended { None } else { d.run };
                tick = Some(d);
                schedule = Some(s);
            }
            Err(e) => schedule_error = Some(e.to_string()),
        }
    }

    let heartbeat_running = status.active_heartbeat.as_ref().map(|h| {
        let duration = schedule.as_ref().map_or(Duration::from_secs(120), |s| s.duration);
        elapsed(h.started_at.0, now) >= duration
    });
    let session = session_lease(ctx, ns, &sprite.name_any());
    let session_live_until = session.as_ref().map(|l| l.until);
    let session_active = session_live_until.is_some_and(|until| until > now);

    // Looking inside only when the VM is awake for another reason anyway
    // (decision 3): a relay session or a running heartbeat. "Awake" then
    // comes from a get, never from the periodic list: a list a minute old
    // can say running of a VM that has gone to sleep, and a look inside
    // would wake it.
    let may_look = (session_active || heartbeat_running.is_some()) && !paused && !deleting;
    if may_look && vm_from_list && observed_vm.as_ref().is_some_and(|v| v.awake) {
        vm = get_vm(ctx, vm_name).await?;
        vm_from_list = false;
        observed_vm = observe_vm(&vm);
    }
    let ours = observed_vm.as_ref().is_some_and(|v| v.owner == VmOwner::Us);
    let awake = observed_vm.as_ref().is_some_and(|v| v.awake);
    let awake_anyway = ours && awake && may_look;
    let bootstrapped =
        status.bootstrap.as_ref().and_then(|b| b.last_completed_step) == Some(BootstrapStep::Version);
    let server_alive = match (&status.server_session_id, awake_anyway) {
        (Some(id), true) => match ctx.sprites.list_sessions(vm_name).await {
            // Listed means the process lives; `is_active` only says whether a
            // client is attached, which a detached server never has.
            Ok(sessions) => Some(sessions.iter().any(|s| &s.id == id)),
            Err(e) => {
                warn!(sprite = vm_name, error = %e, "cannot list sessions");
                None
            }
        },
        _ => None,
    };
    let vm_version = if awake_anyway && bootstrapped {
        read_vm_version(ctx, vm_name).await
    } else {
        None
    };

    // The VM's identity: bootstrap progress belongs to the VM it ran on.
    let bootstrapped_on = status.bootstrap.as_ref().and_then(|b| b.vm_id.as_deref());
    let bootstrapped_version = status.bootstrap.as_ref().and_then(|b| b.version.as_deref());
    let half_done = !bootstrapped
        && status
            .bootstrap
            .as_ref()
            .is_some_and(|b| b.last_completed_step.is_some());
    let reset = match (&vm, bootstrapped_on) {
        (Some(v), Some(id)) if ours && !v.id.is_empty() && v.id != id => Some(ResetReason::VmReplaced),
        _ if matches!(vm_version, Some(None)) => Some(ResetReason::VersionMissing),
        _ if half_done
            && bundle
                .as_ref()
                .is_some_and(|b| bootstrapped_version.is_some_and(|v| v != b.version)) =>
        {
            Some(ResetReason::SourceChanged)
        }
        _ => None,
    };

    // What the server depends on, worked out only when a restart could
    // happen now: the Secrets' versions cost an API call each.
    let restart_allowed_now = awake_anyway
        || sprite.spec.template.update_policy.type_ == crate::api::sprite::UpdateType::Immediate
        || heartbeat_due.is_some();
    let server_config_hash = if status.server_session_id.is_some() && restart_allowed_now && !paused {
        Some(server_config_hash(sprite, ctx, ns).await?)
    } else {
        None
    };
    let server_config_changed = match (&server_config_hash, &status.server_config_hash) {
        (Some(want), Some(have)) => want != have,
        // Started before the hash was kept: assume it matches.
        _ => false,
    };

    let desired_version = bundle.as_ref().map(|b| b.version.clone());
    // What the VM says wins over what status remembers.
    let deployed_version = match &vm_version {
        Some(Some(v)) => Some(v.clone()),
        _ => status.deployed_version.clone(),
    };
    // A version whose update failed for good is not tried again; a new one is.
    let given_up = status
        .update
        .as_ref()
        .is_some_and(|u| u.failed && desired_version.as_deref() == Some(u.version.as_str()));
    let facts = Facts {
        paused,
        deleting,
        has_finalizer,
        deletion_policy: policy,
        vm: observed_vm,
        adopt,
        user_missing,
        ledger_behind,
        quota_admits,
        suspended,
        last_bootstrap_step: status.bootstrap.as_ref().and_then(|b| b.last_completed_step),
        reset,
        desired_version: if given_up {
            deployed_version.clone()
        } else {
            desired_version
        },
        deployed_version,
        update_type: sprite.spec.template.update_policy.type_,
        session_active,
        server_session: status.server_session_id.clone(),
        server_alive,
        server_config_changed,
        heartbeat_due,
        heartbeat_running,
    };
    Ok(Observed {
        facts,
        vm,
        bundle,
        bundle_error,
        schedule,
        schedule_error,
        skipped,
        rate,
        clamped,
        suspend_reason,
        vm_from_list,
        tick,
        vm_version,
        session,
        session_live_until,
        idle_tail: ctx.config.idle_tail,
    })
}

/// Whether the User's ledger lacks some of this Sprite's spend this month.
fn ledger_behind(user: &User, sprite: &Sprite, now: Timestamp) -> bool {
    let Some(u) = sprite.status.as_ref().and_then(|s| s.usage.as_ref()) else {
        return false;
    };
    if u.period_start.0 != super::usage::period_start(now) || u.runtime_seconds == 0 {
        return false;
    }
    let entry = user
        .status
        .as_ref()
        .and_then(|s| s.ledger.as_ref())
        .and_then(|l| l.sprites.get(sprite.uid().as_deref().unwrap_or_default()));
    entry.is_none_or(|e| e.runtime_seconds < u.runtime_seconds)
}

pub(super) fn is_paused(annotations: &std::collections::BTreeMap<String, String>) -> bool {
    annotations.get(PAUSED_ANNOTATION).is_some_and(|v| v == "true")
}

/// Whether the Sprite is suspended, and why: its own spec, its User's, the
/// User's spent budget, or a User that does not exist.
fn suspension(sprite: &Sprite, user: Option<&User>) -> (bool, Option<(&'static str, String)>) {
    let reason = if sprite.spec.suspend {
        Some(("SpecSuspend", "spec.suspend is true".to_string()))
    } else if let Some(u) = user {
        if u.spec.suspend {
            Some(("UserSuspended", "the User is suspended".to_string()))
        } else if u.status.as_ref().and_then(|s| s.phase) == Some(UserPhase::OverBudget) {
            Some((
                "UserOverBudget",
                "the User's monthly runtime budget is spent; heartbeats resume next month".to_string(),
            ))
        } else {
            None
        }
    } else {
        Some((
            "UserNotFound",
            format!(
                "User {} does not exist in this namespace: the Sprite runs on no one's plan",
                sprite.spec.user_ref.name
            ),
        ))
    };
    (reason.is_some(), reason)
}

/// `/workspace/VERSION` of an awake VM: Some(None) when it is missing.
async fn read_vm_version(ctx: &Context, vm_name: &str) -> Option<Option<String>> {
    match ctx.sprites.read_file(vm_name, runtime::VERSION_PATH).await {
        Ok(bytes) => Some(Some(String::from_utf8_lossy(&bytes).trim().to_string())),
        Err(sprites::Error::NotFound { .. }) => Some(None),
        Err(e) => {
            warn!(sprite = vm_name, error = %e, "cannot read VERSION");
            None
        }
    }
}

/// A hash of everything the running server depends on: `spec.server` and
/// the resourceVersion of each Secret it names (metadata only).
pub(super) async fn server_config_hash(sprite: &Sprite, ctx: &Context, ns: &str) -> Result<String, Error> {
    let server = &sprite.spec.template.server;
    let metas: Api<PartialObjectMeta<Secret>> = Api::namespaced(ctx.client.clone(), ns);
    let mut versions = std::collections::BTreeMap::new();
    for var in &server.env {
        if let Some(from) = &var.value_from {
            let name = &from.secret_key_ref.name;
            // The metadata cache holds the Secrets Sprites may name; ask the
            // API only for one it does not hold.
            let rv = match ctx.stores.secrets.get(ns, name) {
                Some(m) => m.metadata.resource_version.clone(),
                None => metas
                    .get_metadata_opt(name)
                    .await?
                    .and_then(|m| m.metadata.resource_version),
            };
            versions.insert(name.clone(), rv);
        }
    }
    Ok(config_hash(server, &versions))
}

/// Pure part of [`server_config_hash`].
pub(super) fn config_hash(
    server: &crate::api::sprite::ServerSpec,
    secret_versions: &std::collections::BTreeMap<String, Option<String>>,
) -> String {
    use sha2::{Digest, Sha256};
    let doc = serde_json::json!({"server": server, "secrets": secret_versions});
    hex::encode(&Sha256::digest(doc.to_string().as_bytes())[..12])
}

/// The relay's session Lease of a Sprite, from the watch cache.
fn session_lease(ctx: &Context, ns: &str, sprite: &str) -> Option<session::Live> {
    let lease_ns = session::lease_namespace(ctx.session_lease_namespace.as_deref(), ns);
    let lease = ctx.stores.lease(lease_ns, &session::lease_name(ns, sprite))?;
    session::live(&lease)
}

/// Whose a VM is, from its labels: ours, nobody's (no UID label at all), or
/// another Sprite's.
pub(super) fn vm_owner(labels: &[String], uid: &str) -> VmOwner {
    let ours = format!("{UID_LABEL_PREFIX}{uid}");
    if !uid.is_empty() && labels.contains(&ours) {
        VmOwner::Us
    } else if labels.iter().any(|l| l.starts_with(UID_LABEL_PREFIX)) {
        VmOwner::Other
    } else {
        VmOwner::Nobody
    }
}

pub(super) fn elapsed(from: Timestamp, to: Timestamp) -> Duration {
    Duration::try_from(to.duration_since(from)).unwrap_or(Duration::ZERO)
}

/// The runtime this Sprite should run: the embedded one or its ConfigMap's.
/// A pinned `runtime.version` that the source does not hold is an error. A
/// ConfigMap is read (and parsed) again only when its resourceVersion in the
/// metadata cache moved.
async fn desired_bundle(sprite: &Sprite, ctx: &Context, ns: &str) -> Result<Arc<RuntimeBundle>, Error> {
    let bundle = match &sprite.spec.template.runtime.source {
        None => embedded_bundle(),
        Some(src) => {
            let name = &src.config_map.name;
            let cached = ctx
                .stores
                .config_maps
                .get(ns, name)
                .and_then(|m| m.metadata.resource_version.clone())
                .and_then(|rv| ctx.stores.bundle(ns, name, &rv));
            match cached {
                Some(b) => b,
                None => {
                    let cm = Api::<ConfigMap>::namespaced(ctx.client.clone(), ns)
                        .get_opt(name)
                        .await?
                        .ok_or_else(|| Error::Runtime(format!("ConfigMap {name} not found")))?;
                    let b = Arc::new(
                        RuntimeBundle::from_config_map(&cm.data.unwrap_or_default())
                            .map_err(|e| Error::Runtime(format!("ConfigMap {name}: {e}")))?,
                    );
                    if let Some(rv) = cm.metadata.resource_version {
                        ctx.stores.keep_bundle(ns, name, rv, b.clone());
                    }
                    b
                }
            }
        }
    };
    if let Some(pin) = &sprite.spec.template.runtime.version
        && pin != &bundle.version
    {
        return Err(Error::Runtime(format!(
            "runtime.version {pin} is pinned but the source holds {}",
            bundle.version
        )));
    }
    Ok(bundle)
}

/// The embedded runtime, parsed once.
fn embedded_bundle() -> Arc<RuntimeBundle> {
    static EMBEDDED: std::sync::OnceLock<Arc<RuntimeBundle>> = std::sync::OnceLock::new();
    EMBEDDED
        .get_or_init(|| Arc::new(RuntimeBundle::embedded()))
        .clone()
}

/// A User from the watch cache; from the API when the cache has none (not
/// synced yet, or truly gone: a get tells which, so a cache that lags never
/// suspends a Sprite).
async fn get_user(ctx: &Context, ns: &str, name: &str) -> Result<Option<User>, Error> {
    // A Sprite stored before userRef was required names no User.
    if name.is_empty() {
        return Ok(None);
    }
    if let Some(u) = ctx.stores.users.get(ns, name) {
        return Ok(Some((*u).clone()));
    }
    Ok(Api::<User>::namespaced(ctx.client.clone(), ns)
        .get_opt(name)
        .await?)
}

/// The oldest Sprites of a User (by creation, then name) fit in its quota.
fn admitted_by_quota(siblings: &[Arc<Sprite>], sprite: &Sprite, user: &str, max: u32) -> bool {
    let mut mine: Vec<&Sprite> = siblings
        .iter()
        .map(AsRef::as_ref)
        .filter(|s| s.spec.user_ref.name == user && s.meta().deletion_timestamp.is_none())
        .collect();
    mine.sort_by_key(|s| (s.meta().creation_timestamp.as_ref().map(|t| t.0), s.name_any()));
    mine.iter()
        .position(|s| s.uid() == sprite.uid())
        .is_some_and(|i| (i as u32) < max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vm_is_ours_only_with_our_own_uid_label() {
        let l = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            vm_owner(&l(&["sprite-operator.dev/uid=u1", "x"]), "u1"),
            VmOwner::Us
        );
        assert_eq!(
            vm_owner(&l(&["sprite-operator.dev/uid=u2"]), "u1"),
            VmOwner::Other
        );
        assert_eq!(vm_owner(&l(&["team=a"]), "u1"), VmOwner::Nobody);
        assert_eq!(vm_owner(&l(&["sprite-operator.dev/uid="]), ""), VmOwner::Other);
    }

    #[test]
    fn the_server_hash_moves_with_the_spec_and_each_secret_version() {
        let server = crate::api::sprite::ServerSpec::default();
        let v = |rv: &str| std::collections::BTreeMap::from([("keys".to_string(), Some(rv.to_string()))]);
        let base = config_hash(&server, &v("1"));
        assert_eq!(base, config_hash(&server, &v("1")));
        assert_ne!(base, config_hash(&server, &v("2")), "a Secret changed");
        let mut moved = server.clone();
        moved.port = 9000;
        assert_ne!(base, config_hash(&moved, &v("1")), "the port changed");
    }

    #[test]
    fn suspension_says_why() {
        let s: Sprite = serde_json::from_value(serde_json::json!({
            "apiVersion": "sprite-operator.dev/v1alpha1", "kind": "Sprite",
            "metadata": {"name": "x", "namespace": "n"}, "spec": {"userRef": {"name": "u"}}
        }))
        .unwrap();
        assert_eq!(suspension(&s, None).1.unwrap().0, "UserNotFound");
        let u: User = serde_json::from_value(serde_json::json!({
            "apiVersion": "sprite-operator.dev/v1alpha1", "kind": "User",
            "metadata": {"name": "u", "namespace": "n"},
            "spec": {"email": "u@e.co", "subject": "s", "tier": "free"},
            "status": {"phase": "OverBudget"}
        }))
        .unwrap();
        assert_eq!(suspension(&s, Some(&u)).1.unwrap().0, "UserOverBudget");
        let mut ok = u.clone();
        ok.status = None;
        assert_eq!(suspension(&s, Some(&ok)), (false, None));
    }
}
