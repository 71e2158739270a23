//! The Sprite reconciler: observe, decide one step ([`plan::next_step`]),
//! perform it, record it in status, come back.

use std::sync::Arc;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use serde_json::json;
use tracing::{info, warn};

use super::context::Context;
use super::error::Error;
use super::metrics::{StepLabels, WakeLabels};
use super::plan::{self, Facts, ObservedVm, Step, VmOwner};
use super::schedule::{Schedule, SkipReason, decide};
use super::sprite_status::{derive_conditions, publish_events, write_status_if_changed};
use super::vm_cache::Cached;
use super::vm_ops::{base_exec, bootstrap_step, start_server, update};
use crate::api::session;
use crate::api::sprite::{
    ADOPT_ANNOTATION, ActiveHeartbeat, BootstrapStatus, BootstrapStep, FINALIZER, OwnedVm, UID_LABEL_PREFIX,
};
use crate::api::user::UserPhase;
use crate::api::{Sprite, SpriteStatus, User};
use crate::money::MicroUsd;
use crate::runtime::{self, RuntimeBundle};
use crate::sprites;

pub const MANAGER: &str = "sprite-operator";
/// Re-check converged Sprites this often even without events.
const RESYNC: Duration = Duration::from_secs(300);
/// Come back soon after a step that made progress.
const PROGRESS: Duration = Duration::from_millis(200);
/// Bootstrap attempts in a row before the phase says Failed (it still retries).
pub(super) const FAILED_AFTER_ATTEMPTS: i32 = 3;

pub async fn reconcile(sprite: Arc<Sprite>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.metrics
        .reconciles
        .get_or_create(&super::metrics::KindLabels { kind: "Sprite" })
        .inc();
    let ns = sprite.namespace().unwrap_or_else(|| "default".into());
    let api: Api<Sprite> = Api::namespaced(ctx.client.clone(), &ns);
    let now = ctx.clock.now();
    let vm_name = sprite.vm_name();
    let mut base = sprite.status.clone().unwrap_or_default();
    base.sprite_name = Some(vm_name.clone());
    let mut status = base.clone();

    // Read the VM from the periodic list; a pass about to act reads it again
    // with a get, so no change is ever made on a stale list entry.
    let mut observed = observe(&sprite, &ctx, &ns, &vm_name, &mut status, now, VmRead::List).await?;
    let mut step = plan::next_step(&observed.facts);
    if observed.vm_from_list && !matches!(step, Step::Idle | Step::Blocked(_)) {
        let fresh = get_vm(&ctx, &vm_name).await?;
        if !same_vm(fresh.as_ref(), observed.vm.as_ref()) {
            status = base.clone();
            observed = observe(
                &sprite,
                &ctx,
                &ns,
                &vm_name,
                &mut status,
                now,
                VmRead::Known(fresh.map(Box::new)),
            )
            .await?;
            step = plan::next_step(&observed.facts);
        }
    }
    tracing::debug!(sprite = %sprite.name_any(), namespace = %ns, ?step, "next step");
    // A due tick is consumed by starting its heartbeat (or by suspension);
    // while another step runs first it stays planned, so it is not lost.
    if let Some(d) = &observed.tick {
        record_tick(&mut status, d, observed.facts.suspended, &step);
    }

    let t0 = Instant::now();
    let outcome = perform(&step, &sprite, &ctx, &api, &vm_name, &observed, &mut status, now).await;
    ctx.metrics
        .step_duration
        .get_or_create(&StepLabels {
            step: step_label(&step),
        })
        .observe(t0.elapsed().as_secs_f64());

    let removed_finalizer = matches!(step, Step::RemoveFinalizer | Step::DeleteVm);
    if let Err(e) = &outcome {
        status
            .bootstrap
            .get_or_insert_with(BootstrapStatus::default)
            .attempts += 1;
        if let Some(b) = status.bootstrap.as_mut() {
            b.last_error = Some(e.to_string());
        }
        warn!(sprite = %sprite.name_any(), namespace = %ns, step = step_label(&step), error = %e, "step failed");
    }
    let old_phase = sprite.status.as_ref().and_then(|s| s.phase);
    if !removed_finalizer {
        derive_conditions(
            &sprite,
            &observed,
            &step,
            outcome.as_ref().err(),
            &mut status,
            now,
        );
        write_status_if_changed(&api, &sprite, status.clone()).await?;
    }
    // Events go out after the status write: a crash in between loses an
    // Event, it never announces a step twice that status says is done.
    publish_events(&ctx, &sprite, &step, &outcome, old_phase, status.phase).await;
    outcome.map(|progress| match progress {
        true => Action::requeue(PROGRESS),
        false => Action::requeue(idle_requeue(
            &status,
            observed.schedule.as_ref(),
            now,
            ctx.clock.as_ref(),
        )),
    })
}

pub fn error_policy(sprite: Arc<Sprite>, err: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics
        .errors
        .get_or_create(&super::metrics::ErrorLabels {
            kind: "Sprite",
            reason: err.metric_label(),
        })
        .inc();
    let attempts = sprite
        .status
        .as_ref()
        .and_then(|s| s.bootstrap.as_ref())
        .map_or(0, |b| b.attempts.max(0) as u32);
    Action::requeue(err.backoff(attempts))
}

/// Everything the decision needs, plus what the steps reuse.
pub(super) struct Observed {
    pub(super) facts: Facts,
    pub(super) vm: Option<sprites::Sprite>,
    pub(super) bundle: Option<RuntimeBundle>,
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
}

#[derive(Debug)]
enum VmRead {
    /// The periodic list, when recent enough; a get otherwise.
    List,
    /// What a get just returned.
    Known(Option<Box<sprites::Sprite>>),
}

/// A metadata get (never wakes the VM), remembered in the cache.
async fn get_vm(ctx: &Context, vm_name: &str) -> Result<Option<sprites::Sprite>, Error> {
    let vm = match ctx.sprites.get_sprite(vm_name).await {
        Ok(vm) => Some(vm),
        Err(sprites::Error::NotFound { .. }) => None,
        Err(e) => return Err(e.into()),
    };
    ctx.vms.record(vm_name, vm.clone());
    Ok(vm)
}

/// Whether two reads of a VM agree on what decisions use.
fn same_vm(a: Option<&sprites::Sprite>, b: Option<&sprites::Sprite>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => a.status == b.status && a.labels == b.labels && a.id == b.id,
        _ => false,
    }
}

async fn observe(
    sprite: &Sprite,
    ctx: &Context,
    ns: &str,
    vm_name: &str,
    status: &mut SpriteStatus,
    now: Timestamp,
    read: VmRead,
) -> Result<Observed, Error> {
    // Metadata calls: they report status without waking the VM (decision 3).
    let (vm, vm_from_list) = match read {
        VmRead::Known(vm) => (vm.map(|b| *b), false),
        VmRead::List => match ctx.vms.lookup(vm_name, Instant::now()) {
            Cached::Present(vm) => (Some(*vm), true),
            Cached::Absent => (None, true),
            Cached::Unknown => (get_vm(ctx, vm_name).await?, false),
        },
    };
    let adopt = sprite
        .annotations()
        .get(ADOPT_ANNOTATION)
        .is_some_and(|v| v == "true");
    let observed_vm = vm.as_ref().map(|v| ObservedVm {
        owner: vm_owner(&v.labels, &sprite.uid().unwrap_or_default()),
        awake: v.status == "running",
    });

    let (bundle, bundle_error) = match desired_bundle(sprite, ctx, ns).await {
        Ok(b) => (Some(b), None),
        Err(e) => (None, Some(e.to_string())),
    };

    let user = Api::<User>::namespaced(ctx.client.clone(), ns)
        .get_opt(&sprite.spec.user_ref.name)
        .await?;
    let user_missing = user.is_none();
    let tier = user.as_ref().map(|u| ctx.config.tier(u.spec.tier).clone());
    let quota_admits = match (&user, &tier) {
        (Some(u), Some(t)) => admitted_by_quota(ctx, ns, sprite, &u.name_any(), t.max_sprites).await?,
        // Without its User a Sprite is admitted nowhere (user_missing says why).
        _ => false,
    };
    let user_suspended = user.as_ref().is_some_and(|u| {
        u.spec.suspend || u.status.as_ref().and_then(|s| s.phase) == Some(UserPhase::OverBudget)
    });
    let suspended = sprite.spec.suspend || user_suspended || user_missing;
    let suspend_reason = if sprite.spec.suspend {
        Some(("SpecSuspend", "spec.suspend is true".to_string()))
    } else if user_missing {
        Some((
            "UserNotFound",
            format!(
                "User {} does not exist in this namespace: the Sprite runs on no one's plan",
                sprite.spec.user_ref.name
            ),
        ))
    } else if user.as_ref().is_some_and(|u| u.spec.suspend) {
        Some(("UserSuspended", "the User is suspended".to_string()))
    } else if user_suspended {
        Some((
            "UserOverBudget",
            "the User's monthly runtime budget is spent; heartbeats resume next month".to_string(),
        ))
    } else {
        None
    };

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
    } else {
        status.next_heartbeat_time = None;
    }

    let heartbeat_running = status.active_heartbeat.as_ref().map(|h| {
        let duration = schedule.as_ref().map_or(Duration::from_secs(120), |s| s.duration);
        elapsed(h.started_at.0, now) >= duration
    });
    let session_active = session_live_until(ctx, ns, &sprite.name_any()).is_some_and(|until| until > now);

    // Looking inside only when the VM is awake for another reason anyway.
    let awake = observed_vm.as_ref().is_some_and(|v| v.awake);
    let server_alive = match (
        &status.server_session_id,
        awake && (session_active || heartbeat_running.is_some()),
    ) {
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

    let desired_version = bundle.as_ref().map(|b| b.version.clone());
    let failed_again = is_update_failure_for(status, desired_version.as_deref());
    let facts = Facts {
        deleting: sprite.meta().deletion_timestamp.is_some(),
        has_finalizer: sprite.finalizers().iter().any(|f| f == FINALIZER),
        deletion_policy: sprite.spec.template.deletion_policy,
        vm: observed_vm,
        adopt,
        user_missing,
        quota_admits,
        suspended,
        last_bootstrap_step: status.bootstrap.as_ref().and_then(|b| b.last_completed_step),
        // After a failed, rolled-back update of this very version, wait for a
        // new version rather than retrying the same failure forever.
        desired_version: if failed_again {
            status.deployed_version.clone()
        } else {
            desired_version
        },
        deployed_version: status.deployed_version.clone(),
        update_type: sprite.spec.template.update_policy.type_,
        session_active,
        server_session: status.server_session_id.clone(),
        server_alive,
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
    })
}

/// Whose a VM is, from its labels: ours, nobody's (no UID label at all), or
/// another Sprite's.
fn vm_owner(labels: &[String], uid: &str) -> VmOwner {
    let ours = format!("{UID_LABEL_PREFIX}{uid}");
    if !uid.is_empty() && labels.contains(&ours) {
        VmOwner::Us
    } else if labels.iter().any(|l| l.starts_with(UID_LABEL_PREFIX)) {
        VmOwner::Other
    } else {
        VmOwner::Nobody
    }
}

/// Until when the relay's session Lease says a browser keeps the VM awake.
fn session_live_until(ctx: &Context, ns: &str, sprite: &str) -> Option<Timestamp> {
    let lease_ns = session::lease_namespace(ctx.session_lease_namespace.as_deref(), ns);
    let lease = ctx.stores.lease(lease_ns, &session::lease_name(ns, sprite))?;
    session::live_until(&lease)
}

fn is_update_failure_for(status: &SpriteStatus, desired: Option<&str>) -> bool {
    status.conditions.iter().any(|c| {
        c.type_ == "UpToDate" && c.reason == "UpdateFailed" && desired.is_some_and(|d| c.message.contains(d))
    })
}

fn elapsed(from: Timestamp, to: Timestamp) -> Duration {
    Duration::try_from(to.duration_since(from)).unwrap_or(Duration::ZERO)
}

/// The runtime this Sprite should run: the embedded one or its ConfigMap's.
/// A pinned `runtime.version` that the source does not hold is an error.
async fn desired_bundle(sprite: &Sprite, ctx: &Context, ns: &str) -> Result<RuntimeBundle, Error> {
    let bundle = match &sprite.spec.template.runtime.source {
        None => RuntimeBundle::embedded(),
        Some(src) => {
            let cms: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), ns);
            let cm = cms
                .get_opt(&src.config_map.name)
                .await?
                .ok_or_else(|| Error::Runtime(format!("ConfigMap {} not found", src.config_map.name)))?;
            RuntimeBundle::from_config_map(&cm.data.unwrap_or_default())
                .map_err(|e| Error::Runtime(format!("ConfigMap {}: {e}", src.config_map.name)))?
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

/// The oldest Sprites of a User (by creation, then name) fit in its quota.
async fn admitted_by_quota(
    ctx: &Context,
    ns: &str,
    sprite: &Sprite,
    user: &str,
    max: u32,
) -> Result<bool, Error> {
    let all = Api::<Sprite>::namespaced(ctx.client.clone(), ns)
        .list(&ListParams::default())
        .await?;
    let mut mine: Vec<&Sprite> = all
        .items
        .iter()
        .filter(|s| s.spec.user_ref.name == user && s.meta().deletion_timestamp.is_none())
        .collect();
    mine.sort_by_key(|s| (s.meta().creation_timestamp.as_ref().map(|t| t.0), s.name_any()));
    Ok(mine
        .iter()
        .position(|s| s.uid() == sprite.uid())
        .is_some_and(|i| (i as u32) < max))
}

/// Performs one step. Ok(true) means progress: come back soon.
#[allow(clippy::too_many_arguments)]
async fn perform(
    step: &Step,
    sprite: &Sprite,
    ctx: &Context,
    api: &Api<Sprite>,
    vm_name: &str,
    observed: &Observed,
    status: &mut SpriteStatus,
    now: Timestamp,
) -> Result<bool, Error> {
    match step {
        Step::AddFinalizer => {
            let mut finalizers = sprite.finalizers().to_vec();
            finalizers.push(FINALIZER.to_string());
            patch_finalizers(api, sprite, finalizers).await?;
            Ok(true)
        }
        Step::DeleteVm => {
            match ctx.sprites.delete_sprite(vm_name).await {
                Ok(()) | Err(sprites::Error::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
            ctx.vms.record(vm_name, None);
            info!(sprite = %sprite.name_any(), vm = vm_name, "deleted VM");
            remove_finalizer(api, sprite).await?;
            Ok(true)
        }
        Step::RemoveFinalizer => {
            remove_finalizer(api, sprite).await?;
            Ok(true)
        }
        Step::Blocked(_) | Step::Idle => Ok(false),
        Step::CreateVm => {
            let res = sprite.spec.template.resources.clone().unwrap_or_default();
            let request = sprites::CreateSprite {
                name: vm_name.to_string(),
                config: sprites::SpriteConfig {
                    ram_mb: res.ram_mb.map(|v| v as u32),
                    cpus: res.cpus.map(|v| v as u32),
                    region: res.region.clone(),
                    storage_gb: res.storage_gb.map(|v| v as u32),
                },
                labels: vec![format!("{UID_LABEL_PREFIX}{}", sprite.uid().unwrap_or_default())],
            };
            match ctx.sprites.create_sprite(&request).await {
                Ok(vm) => {
                    ctx.vms.record(vm_name, Some(vm.clone()));
                    if vm_owner(&vm.labels, &sprite.uid().unwrap_or_default()) == VmOwner::Us {
                        status.owned_vm = Some(OwnedVm {
                            name: vm_name.to_string(),
                            id: vm.id.clone(),
                        });
                    }
                    status.sprite_id = Some(vm.id).filter(|s| !s.is_empty());
                    status.url = Some(vm.url).filter(|s| !s.is_empty());
                    info!(sprite = %sprite.name_any(), vm = vm_name, "created VM");
                }
                // Ours from an earlier pass whose answer was lost, or a
                // stranger's: the next observation tells them apart by label.
                Err(sprites::Error::AlreadyExists { .. }) => {}
                Err(e) => return Err(e.into()),
            }
            Ok(true)
        }
        Step::AdoptVm => {
            // The label goes on first: until it is seen on the VM nothing
            // else is done to it, and a concurrent adopter's write of its
            // own label leaves exactly one of us owning it.
            let mut labels = observed.vm.as_ref().map(|v| v.labels.clone()).unwrap_or_default();
            labels.push(format!("{UID_LABEL_PREFIX}{}", sprite.uid().unwrap_or_default()));
            let vm = ctx.sprites.update_labels(vm_name, labels).await?;
            // The next pass that acts reads the VM again with a get anyway.
            ctx.vms.record(vm_name, Some(vm));
            status.bootstrap = None;
            info!(sprite = %sprite.name_any(), vm = vm_name, "adopted VM: labelled it ours");
            Ok(true)
        }
        Step::Bootstrap(step) => {
            let bundle = observed.bundle.as_ref().ok_or_else(|| runtime_err(observed))?;
            bootstrap_step(ctx, vm_name, *step, bundle).await?;
            let b = status.bootstrap.get_or_insert_with(BootstrapStatus::default);
            b.last_completed_step = Some(*step);
            b.attempts = 0;
            b.last_error = None;
            if *step == BootstrapStep::Version {
                status.deployed_version = Some(bundle.version.clone());
            }
            if let Some(vm) = &observed.vm {
                status.sprite_id = Some(vm.id.clone()).filter(|s| !s.is_empty());
                status.url = Some(vm.url.clone()).filter(|s| !s.is_empty());
            }
            info!(sprite = %sprite.name_any(), step = ?step, "bootstrap step done");
            Ok(true)
        }
        Step::StartServer => {
            let id = start_server(sprite, ctx, vm_name).await?;
            status.server_session_id = Some(id);
            Ok(true)
        }
        Step::StopServer => {
            if let Some(id) = &status.server_session_id {
                match ctx.sprites.kill_session(vm_name, id, "SIGTERM").await {
                    Ok(()) | Err(sprites::Error::NotFound { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            status.server_session_id = None;
            Ok(true)
        }
        Step::Update => {
            let bundle = observed.bundle.as_ref().ok_or_else(|| runtime_err(observed))?;
            if !observed.facts.vm.as_ref().is_some_and(|v| v.awake) && !observed.facts.session_active {
                count_wake(ctx, status, "update");
            }
            update(sprite, ctx, vm_name, bundle, status).await?;
            Ok(true)
        }
        Step::StartHeartbeat(tick) => {
            let schedule = observed.schedule.as_ref().expect("a due tick has a schedule");
            let cmd: Vec<String> = if observed.bundle.as_ref().is_some_and(RuntimeBundle::has_heartbeat) {
                vec![
                    runtime::VENV_PYTHON.into(),
                    "/workspace/src/heartbeat.py".into(),
                    "--duration".into(),
                    schedule.duration.as_secs().max(1).to_string(),
                ]
            } else {
                // A runtime without a heartbeat entry is still woken on schedule.
                vec!["true".into()]
            };
            let req = base_exec(cmd).max_run_after_disconnect(schedule.duration + Duration::from_secs(30));
            let session = ctx.sprites.exec_detached(vm_name, &req).await?;
            count_wake(ctx, status, "heartbeat");
            status.active_heartbeat = Some(ActiveHeartbeat {
                session_id: session,
                started_at: Time(now),
                scheduled_for: Time(*tick),
            });
            status.last_heartbeat_time = Some(Time(*tick));
            info!(sprite = %sprite.name_any(), tick = %tick, "heartbeat started");
            Ok(true)
        }
        Step::CollectHeartbeat => {
            if let Some(h) = status.active_heartbeat.take() {
                let duration = observed
                    .schedule
                    .as_ref()
                    .map_or(Duration::from_secs(120), |s| s.duration);
                let ran = elapsed(h.started_at.0, now).min(duration);
                // Counted: the heartbeat's time plus the idle tail before the
                // VM sleeps again (decision 9). An upper bound: the entry may
                // have finished early.
                let seconds = (ran + ctx.config.idle_tail).as_secs() as i64;
                account(status, seconds, observed.rate, now);
            }
            Ok(true)
        }
    }
}

fn runtime_err(observed: &Observed) -> Error {
    Error::Runtime(
        observed
            .bundle_error
            .clone()
            .unwrap_or_else(|| "unavailable".into()),
    )
}

fn count_wake(ctx: &Context, status: &mut SpriteStatus, cause: &'static str) {
    status.wakes += 1;
    ctx.metrics
        .wakes_caused
        .get_or_create(&WakeLabels { cause })
        .inc();
}

fn account(status: &mut SpriteStatus, seconds: i64, rate: MicroUsd, now: Timestamp) {
    status.usage = Some(super::usage::add(status.usage.as_ref(), now, seconds, rate));
    status.runtime_seconds += seconds;
    let before: MicroUsd = status
        .estimated_cost
        .as_deref()
        .and_then(|s| s.parse().ok())
        .unwrap_or(MicroUsd::ZERO);
    status.estimated_cost = Some(
        before
            .saturating_add(MicroUsd::for_seconds(rate, seconds))
            .to_string(),
    );
}

async fn patch_finalizers(api: &Api<Sprite>, sprite: &Sprite, finalizers: Vec<String>) -> Result<(), Error> {
    // The resourceVersion makes this a compare-and-swap with other writers.
    let patch = json!({"metadata": {"finalizers": finalizers, "resourceVersion": sprite.resource_version()}});
    api.patch(&sprite.name_any(), &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(())
}

async fn remove_finalizer(api: &Api<Sprite>, sprite: &Sprite) -> Result<(), Error> {
    let rest: Vec<String> = sprite
        .finalizers()
        .iter()
        .filter(|f| *f != FINALIZER)
        .cloned()
        .collect();
    patch_finalizers(api, sprite, rest).await
}

/// Converged: come back at the next heartbeat tick, or for the resync.
/// Records a heartbeat decision in status once its tick is consumed: by
/// starting the heartbeat, by suspension, or because nothing was due.
/// Otherwise the tick stays planned for the next pass.
fn record_tick(status: &mut SpriteStatus, d: &super::schedule::TickDecision, suspended: bool, step: &Step) {
    if d.run.is_none() || suspended || matches!(step, Step::StartHeartbeat(_)) {
        status.skipped_heartbeats += d.skipped as i64;
        status.next_heartbeat_time = d.next.map(Time);
    }
}

/// Converged: come back at the next tick, when the running heartbeat is due
/// for collection, or for the resync.
fn idle_requeue(
    status: &SpriteStatus,
    schedule: Option<&Schedule>,
    now: Timestamp,
    clock: &dyn super::Clock,
) -> Duration {
    let next_tick = status.next_heartbeat_time.as_ref().map(|t| elapsed(now, t.0));
    let collect = status.active_heartbeat.as_ref().map(|h| {
        let duration = schedule.map_or(Duration::from_secs(120), |s| s.duration);
        (duration + Duration::from_secs(1)).saturating_sub(elapsed(h.started_at.0, now))
    });
    match next_tick.into_iter().chain(collect).min() {
        Some(d) => clock.to_real(d).clamp(Duration::from_millis(10), RESYNC),
        None => RESYNC,
    }
}

pub(super) fn step_label(step: &Step) -> &'static str {
    match step {
        Step::AddFinalizer => "add_finalizer",
        Step::DeleteVm => "delete_vm",
        Step::RemoveFinalizer => "remove_finalizer",
        Step::Blocked(_) => "blocked",
        Step::CreateVm => "create_vm",
        Step::AdoptVm => "adopt_vm",
        Step::Bootstrap(_) => "bootstrap",
        Step::StartServer => "start_server",
        Step::StopServer => "stop_server",
        Step::Update => "update",
        Step::CollectHeartbeat => "collect_heartbeat",
        Step::StartHeartbeat(_) => "start_heartbeat",
        Step::Idle => "idle",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_due_tick_survives_a_pass_that_does_something_else() {
        let tick: Timestamp = "2026-01-01T00:05:00Z".parse().unwrap();
        let next: Timestamp = "2026-01-01T00:10:00Z".parse().unwrap();
        let d = super::super::schedule::TickDecision {
            run: Some(tick),
            skipped: 0,
            skip_reason: None,
            next: Some(next),
        };
        let mut s = SpriteStatus {
            next_heartbeat_time: Some(Time(tick)),
            ..Default::default()
        };
        record_tick(&mut s, &d, false, &Step::CollectHeartbeat);
        assert_eq!(
            s.next_heartbeat_time,
            Some(Time(tick)),
            "the due tick was dropped"
        );
        record_tick(&mut s, &d, false, &Step::StartHeartbeat(tick));
        assert_eq!(s.next_heartbeat_time, Some(Time(next)));
    }

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
    fn accounting_adds_exact_money() {
        let mut s = SpriteStatus::default();
        let now: Timestamp = "2026-11-23T10:00:00Z".parse().unwrap();
        account(&mut s, 150, MicroUsd(180_000), now);
        account(&mut s, 150, MicroUsd(180_000), now);
        assert_eq!(s.usage.as_ref().unwrap().runtime_seconds, 300);
        assert_eq!(s.runtime_seconds, 300);
        assert_eq!(s.estimated_cost.as_deref(), Some("0.015000"));
    }
}
