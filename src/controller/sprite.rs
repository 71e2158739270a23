//! The Sprite reconciler: observe, decide one step ([`plan::next_step`]),
//! perform it, record it in status, come back.

use std::sync::Arc;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use serde_json::json;
use tracing::{info, warn};

use super::context::Context;
use super::error::Error;
use super::metrics::{StepLabels, WakeLabels};
use super::observe::{Observed, VmRead, elapsed, get_vm, observe, same_vm, vm_owner};
use super::plan::{self, ResetReason, Step, VmOwner};
use super::schedule::Schedule;
use super::sprite_status::{derive_status, publish_events, write_status_if_changed};
use super::usage::charge;
use super::vm_ops::{base_exec, bootstrap_step, start_server, update};
use crate::api::sprite::{
    ActiveHeartbeat, BootstrapStatus, BootstrapStep, FINALIZER, HeartbeatResult, OwnedVm, UID_LABEL_PREFIX,
    UpdateStatus,
};
use crate::api::{Sprite, SpriteStatus};
use crate::runtime;
use crate::sprites;

pub use super::sprite_status::MANAGER;
/// Come back soon after a step that made progress.
const PROGRESS: Duration = Duration::from_millis(200);
/// Failed attempts of an update to one version before that version is
/// given up (a new version is always tried).
pub(super) const UPDATE_ATTEMPTS: i32 = 3;

pub async fn reconcile(sprite: Arc<Sprite>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.metrics
        .reconciles
        .get_or_create(&super::metrics::KindLabels { kind: "Sprite" })
        .inc();
    let ns = sprite.namespace().unwrap_or_else(|| "default".into());
    let api: Api<Sprite> = Api::namespaced(ctx.client.clone(), &ns);
    let now = ctx.clock.now();
    let vm_name = sprite.vm_name();

    // Observe (reads only) and decide. The periodic list may be stale: a
    // pass about to act reads its VM again with a get, so no change is ever
    // made on a stale list entry.
    let mut observed = observe(&sprite, &ctx, &ns, &vm_name, now, VmRead::List).await?;
    let mut step = plan::next_step(&observed.facts);
    // Letting go of a Sprite whose VM is to be deleted with it also rests on
    // a get: a list taken before the VM was made would leak it.
    let lets_go = matches!(step, Step::RemoveFinalizer)
        && observed.facts.deletion_policy == crate::api::sprite::DeletionPolicy::Delete;
    if observed.vm_from_list && (step.acts_on_vm() || lets_go) {
        let fresh = get_vm(&ctx, &vm_name).await?;
        if !same_vm(fresh.as_ref(), observed.vm.as_ref()) {
            let read = VmRead::Known(fresh.map(Box::new));
            observed = observe(&sprite, &ctx, &ns, &vm_name, now, read).await?;
            step = plan::next_step(&observed.facts);
        }
    }
    tracing::debug!(sprite = %sprite.name_any(), namespace = %ns, ?step, "next step");

    // Perform the one step; status is derived from what was seen and done.
    let mut status = sprite.status.clone().unwrap_or_default();
    status.sprite_name = Some(vm_name.clone());
    let t0 = Instant::now();
    let outcome = perform(&step, &sprite, &ctx, &api, &vm_name, &observed, &mut status, now).await;
    // A due tick is consumed by starting its heartbeat (or by suspension);
    // while another step runs first, or the start failed, it stays planned,
    // so it is not lost.
    if let Some(d) = observed.tick.as_ref().filter(|_| !observed.facts.paused) {
        let started = !matches!(step, Step::StartHeartbeat(_)) || outcome.is_ok();
        if started {
            record_tick(&mut status, d, observed.facts.suspended, &step);
        }
    }
    // A step that acts inside a sleeping VM wakes it: counted once, by cause
    // (decision 3), when the step reached the VM (a Secret refused or a
    // runtime unreadable stops a step before any call). A fresh get
    // preceded any such step.
    let reached_vm = match &outcome {
        Ok(_) => true,
        Err(e) => matches!(e, Error::Command { .. } | Error::Sprites(_)),
    };
    if let Some(cause) = wake_cause(&step, &observed.facts).filter(|_| reached_vm) {
        count_wake(&ctx, &mut status, cause);
    }
    ctx.metrics
        .step_duration
        .get_or_create(&StepLabels { step: step.label() })
        .observe(t0.elapsed().as_secs_f64());
    if let Err(e) = &outcome {
        warn!(sprite = %sprite.name_any(), namespace = %ns, step = step.label(), error = %e, "step failed");
    }
    let removed_finalizer = matches!(step, Step::RemoveFinalizer | Step::DeleteVm) && outcome.is_ok();
    let old_phase = sprite.status.as_ref().and_then(|s| s.phase);
    if !removed_finalizer {
        derive_status(
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
    publish_events(&ctx, &sprite, &step, &outcome, old_phase, &status).await;
    outcome.map(|progress| match progress {
        true => Action::requeue(PROGRESS),
        false if observed.facts.paused => Action::await_change(),
        false => Action::requeue(idle_requeue(
            &status,
            observed.schedule.as_ref(),
            observed.session_live_until,
            now,
            ctx.clock.as_ref(),
            ctx.config.resync,
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
    // The failure the pass just recorded is not in this (older) copy yet.
    let attempts = sprite
        .status
        .as_ref()
        .and_then(|s| s.failure.as_ref())
        .map_or(0, |f| f.attempts.max(0) as u32);
    Action::requeue(err.backoff(attempts + 1))
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
    // Provisioning moves in waves across the fleet, bounded by its permits.
    let _permit = match step {
        Step::CreateVm | Step::Bootstrap(_) | Step::Update => Some(
            ctx.provisioning
                .acquire()
                .await
                .expect("the provisioning semaphore is never closed"),
        ),
        _ => None,
    };
    match step {
        Step::Paused | Step::Blocked(_) | Step::Idle => Ok(false),
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
        Step::ResetBootstrap(reason) => {
            // The VM does not have what status says was done to it: start
            // over. Every step is idempotent and memory templates only fill
            // gaps, so a VM that kept its files loses nothing. A server still
            // running there goes first, or the new one could not bind.
            if *reason != ResetReason::VmReplaced {
                stop(ctx, vm_name, status).await?;
            }
            status.bootstrap = None;
            status.deployed_version = None;
            status.server_session_id = None;
            status.server_config_hash = None;
            status.server_port = None;
            status.active_heartbeat = None;
            warn!(sprite = %sprite.name_any(), vm = vm_name, ?reason, "bootstrap starts over");
            Ok(true)
        }
        Step::Bootstrap(step) => {
            let bundle = observed.bundle.as_ref().ok_or_else(|| runtime_err(observed))?;
            bootstrap_step(ctx, vm_name, *step, bundle).await?;
            let b = status.bootstrap.get_or_insert_with(BootstrapStatus::default);
            b.last_completed_step = Some(*step);
            b.version = Some(bundle.version.clone());
            if let Some(vm) = &observed.vm {
                b.vm_id = Some(vm.id.clone()).filter(|s| !s.is_empty());
                status.sprite_id = Some(vm.id.clone()).filter(|s| !s.is_empty());
                status.url = Some(vm.url.clone()).filter(|s| !s.is_empty());
            }
            if *step == BootstrapStep::Version {
                status.deployed_version = Some(bundle.version.clone());
            }
            info!(sprite = %sprite.name_any(), step = ?step, "bootstrap step done");
            Ok(true)
        }
        Step::StartServer => {
            start(sprite, ctx, vm_name, status).await?;
            Ok(true)
        }
        Step::StopServer => {
            stop(ctx, vm_name, status).await?;
            Ok(true)
        }
        Step::RestartServer => {
            stop(ctx, vm_name, status).await?;
            start(sprite, ctx, vm_name, status).await?;
            info!(sprite = %sprite.name_any(), "server restarted with its new configuration");
            Ok(true)
        }
        Step::Update => {
            let bundle = observed.bundle.as_ref().ok_or_else(|| runtime_err(observed))?;
            // Worked out first: the update restarts the server with it.
            let hash = server_config_hash_now(sprite, ctx).await?;
            let result = update(sprite, ctx, vm_name, bundle, status).await;
            record_update(status, &bundle.version, result.as_ref().err());
            if result.is_ok() {
                status.server_config_hash = Some(hash);
                status.server_port = Some(sprite.spec.template.server.port);
            }
            result.map(|()| true)
        }
        Step::StartHeartbeat(tick) => {
            let schedule = observed.schedule.as_ref().expect("a due tick has a schedule");
            let has_entry = observed.bundle.as_ref().is_some_and(|b| b.has_heartbeat());
            let req = base_exec(heartbeat_command(has_entry, schedule.duration, *tick))
                .max_run_after_disconnect(schedule.duration + Duration::from_secs(30));
            let session = ctx.sprites.exec_detached(vm_name, &req).await?;
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
                // Its result is read only while the VM is still awake from
                // it; reading would wake a VM that fell asleep.
                let awake = observed.facts.vm.as_ref().is_some_and(|v| v.awake);
                let result = if awake {
                    read_heartbeat_result(ctx, vm_name, h.scheduled_for.0).await
                } else {
                    None
                };
                // Counted: the time it ran (the whole allowance when not
                // known) plus the idle tail before the VM sleeps again.
                let ran = result.as_ref().map_or_else(
                    || elapsed(h.started_at.0, now).min(duration),
                    |r| r.ran.min(duration),
                );
                let seconds = (ran + ctx.config.idle_tail).as_secs() as i64;
                charge(status, seconds, observed.rate, now);
                status.last_heartbeat_result = Some(HeartbeatResult {
                    scheduled_for: h.scheduled_for,
                    exit_code: result.as_ref().map(|r| r.exit_code),
                    summary: result.and_then(|r| r.summary),
                    seconds,
                });
            }
            Ok(true)
        }
    }
}

/// Which wake a step causes, if the VM is asleep and the step acts inside
/// it. An update or a restart that rides a due heartbeat is that
/// heartbeat's wake, so the heartbeat that follows finds the VM awake.
pub(super) fn wake_cause(step: &Step, f: &plan::Facts) -> Option<&'static str> {
    let awake = f.vm.as_ref().is_some_and(|v| v.awake) || f.session_active;
    if awake {
        return None;
    }
    let riding_heartbeat = f.heartbeat_due.is_some();
    Some(match step {
        Step::Bootstrap(_) => "bootstrap",
        Step::StartServer | Step::StopServer => "server",
        Step::RestartServer | Step::Update if riding_heartbeat => "heartbeat",
        Step::RestartServer => "server",
        Step::Update => "update",
        Step::StartHeartbeat(_) => "heartbeat",
        _ => return None,
    })
}

/// Starts the server and records what it was started with.
async fn start(
    sprite: &Sprite,
    ctx: &Context,
    vm_name: &str,
    status: &mut SpriteStatus,
) -> Result<(), Error> {
    let hash = server_config_hash_now(sprite, ctx).await?;
    let id = start_server(sprite, ctx, vm_name).await?;
    status.server_session_id = Some(id);
    status.server_config_hash = Some(hash);
    status.server_port = Some(sprite.spec.template.server.port);
    Ok(())
}

async fn stop(ctx: &Context, vm_name: &str, status: &mut SpriteStatus) -> Result<(), Error> {
    if let Some(id) = &status.server_session_id {
        match ctx.sprites.kill_session(vm_name, id, "SIGTERM").await {
            Ok(()) | Err(sprites::Error::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    status.server_session_id = None;
    status.server_config_hash = None;
    Ok(())
}

async fn server_config_hash_now(sprite: &Sprite, ctx: &Context) -> Result<String, Error> {
    let ns = sprite.namespace().unwrap_or_default();
    super::observe::server_config_hash(sprite, ctx, &ns).await
}

/// Update attempts by version: a failure counts against its version, which
/// is given up after [`UPDATE_ATTEMPTS`]; success, or another version,
/// starts the count again.
pub(super) fn record_update(status: &mut SpriteStatus, version: &str, error: Option<&Error>) {
    let Some(e) = error else {
        status.update = None;
        return;
    };
    let u = status.update.get_or_insert_with(Default::default);
    if u.version != version {
        *u = UpdateStatus {
            version: version.to_string(),
            ..Default::default()
        };
    }
    u.attempts += 1;
    u.failed = u.attempts >= UPDATE_ATTEMPTS;
    u.last_error = Some(e.to_string());
}

/// Where a heartbeat leaves its outcome: `<tick> <exit code> <start> <end>`
/// on the first line, its stdout (the runtime's JSON summary) after.
const HEARTBEAT_RESULT: &str = "/workspace/.operator/heartbeat-result";

/// The heartbeat's command: the runtime's entry with the server's
/// environment (the model's configuration and keys, from the 0600 file:
/// decision 6), its outcome written for collection.
fn heartbeat_command(has_entry: bool, duration: Duration, tick: Timestamp) -> Vec<String> {
    let entry = if has_entry {
        format!(
            "{} /workspace/src/heartbeat.py --duration {}",
            runtime::VENV_PYTHON,
            duration.as_secs().max(1)
        )
    } else {
        // A runtime without a heartbeat entry is still woken on schedule.
        "true".to_string()
    };
    let script = format!(
        "mkdir -p /workspace/.operator; if [ -r {env} ]; then . {env}; fi; start=$(date +%s); \
         out=$({entry}); code=$?; end=$(date +%s); \
         printf '%s %s %s %s\\n%s\\n' {tick} \"$code\" \"$start\" \"$end\" \"$out\" > {result}.tmp && \
         mv {result}.tmp {result}",
        env = runtime::SERVER_ENV_PATH,
        tick = tick.as_second(),
        result = HEARTBEAT_RESULT,
    );
    vec!["sh".into(), "-c".into(), script]
}

struct HeartbeatOutcome {
    exit_code: i32,
    ran: Duration,
    summary: Option<String>,
}

async fn read_heartbeat_result(ctx: &Context, vm_name: &str, tick: Timestamp) -> Option<HeartbeatOutcome> {
    let bytes = ctx.sprites.read_file(vm_name, HEARTBEAT_RESULT).await.ok()?;
    parse_heartbeat_result(&String::from_utf8_lossy(&bytes), tick)
}

/// The outcome of the heartbeat of `tick`, if the file holds that one.
fn parse_heartbeat_result(text: &str, tick: Timestamp) -> Option<HeartbeatOutcome> {
    let (head, out) = text.split_once('\n').unwrap_or((text, ""));
    let f: Vec<i64> = head.split_whitespace().filter_map(|x| x.parse().ok()).collect();
    let [t, code, start, end] = f.as_slice() else {
        return None;
    };
    if *t != tick.as_second() {
        return None;
    }
    let out = out.trim();
    let summary: String = out
        .chars()
        .rev()
        .take(500)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    Some(HeartbeatOutcome {
        exit_code: i32::try_from(*code).unwrap_or(-1),
        ran: Duration::from_secs(u64::try_from(end - start).unwrap_or(0)),
        summary: (!summary.is_empty()).then_some(summary),
    })
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
    *status.wakes_by_cause.entry(cause.to_string()).or_default() += 1;
    ctx.metrics
        .wakes_caused
        .get_or_create(&WakeLabels { cause })
        .inc();
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
    session_until: Option<Timestamp>,
    now: Timestamp,
    clock: &dyn super::Clock,
    resync: Duration,
) -> Duration {
    let next_tick = status.next_heartbeat_time.as_ref().map(|t| elapsed(now, t.0));
    let collect = status.active_heartbeat.as_ref().map(|h| {
        let duration = schedule.map_or(Duration::from_secs(120), |s| s.duration);
        (duration + Duration::from_secs(1)).saturating_sub(elapsed(h.started_at.0, now))
    });
    // A live session's end is accounted when its Lease runs out.
    let session_end = session_until
        .filter(|u| *u > now)
        .map(|u| elapsed(now, u) + Duration::from_secs(1));
    match next_tick.into_iter().chain(collect).chain(session_end).min() {
        Some(d) => clock.to_real(d).clamp(Duration::from_millis(10), resync),
        None => resync,
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
    fn update_failures_count_by_version_and_a_new_version_starts_over() {
        let mut s = SpriteStatus::default();
        let e = Error::Runtime("pip".into());
        record_update(&mut s, "2.0", Some(&e));
        record_update(&mut s, "2.0", Some(&e));
        assert_eq!(
            s.update.as_ref().map(|u| (u.attempts, u.failed)),
            Some((2, false))
        );
        record_update(&mut s, "2.0", Some(&e));
        assert!(
            s.update.as_ref().unwrap().failed,
            "given up after {UPDATE_ATTEMPTS}"
        );
        // A version that merely starts like the failed one is another version.
        record_update(&mut s, "2.0.1", Some(&e));
        assert_eq!(
            s.update
                .as_ref()
                .map(|u| (u.version.as_str(), u.attempts, u.failed)),
            Some(("2.0.1", 1, false))
        );
        record_update(&mut s, "2.0.1", None);
        assert_eq!(s.update, None);
    }

    #[test]
    fn a_wake_is_counted_once_by_its_cause() {
        let asleep = plan::Facts {
            vm: Some(plan::ObservedVm {
                owner: VmOwner::Us,
                awake: false,
            }),
            ..super::super::plan::tests::converged()
        };
        assert_eq!(wake_cause(&Step::Update, &asleep), Some("update"));
        assert_eq!(wake_cause(&Step::StartServer, &asleep), Some("server"));
        assert_eq!(
            wake_cause(&Step::Bootstrap(BootstrapStep::Venv), &asleep),
            Some("bootstrap")
        );
        assert_eq!(wake_cause(&Step::Idle, &asleep), None);
        // An update riding a heartbeat is that heartbeat's one wake.
        let tick: Timestamp = "2026-01-01T00:15:00Z".parse().unwrap();
        let due = plan::Facts {
            heartbeat_due: Some(tick),
            ..asleep.clone()
        };
        assert_eq!(wake_cause(&Step::Update, &due), Some("heartbeat"));
        let mut awake = asleep.clone();
        awake.vm.as_mut().unwrap().awake = true;
        assert_eq!(wake_cause(&Step::StartHeartbeat(tick), &awake), None);
        let mut session = asleep;
        session.session_active = true;
        assert_eq!(wake_cause(&Step::RestartServer, &session), None);
    }

    #[test]
    fn a_heartbeat_result_is_read_only_for_its_own_tick() {
        let tick: Timestamp = "2026-01-01T00:15:00Z".parse().unwrap();
        let text = format!("{} 0 100 107\n{{\"outcome\": \"idle\"}}\n", tick.as_second());
        let r = parse_heartbeat_result(&text, tick).unwrap();
        assert_eq!((r.exit_code, r.ran), (0, Duration::from_secs(7)));
        assert_eq!(r.summary.as_deref(), Some("{\"outcome\": \"idle\"}"));
        let older = tick - jiff::SignedDuration::from_mins(15);
        assert!(parse_heartbeat_result(&text, older).is_none());
        assert!(parse_heartbeat_result("garbage", tick).is_none());
    }

    #[test]
    fn the_heartbeat_reads_the_servers_environment_file() {
        let tick: Timestamp = "2026-01-01T00:15:00Z".parse().unwrap();
        let cmd = heartbeat_command(true, Duration::from_secs(120), tick);
        assert!(cmd[2].contains(". /workspace/.secrets/server.env"), "{}", cmd[2]);
        assert!(cmd[2].contains("heartbeat.py --duration 120"));
    }
}
