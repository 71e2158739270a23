//! A Sprite's status from what was observed and what the step did:
//! conditions, phase, and the write and Events that publish them.

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType};
use kube::{Resource, ResourceExt};
use serde_json::json;
use tracing::warn;

use super::context::Context;
use super::error::Error;
use super::observe::Observed;
use super::plan::{BlockedReason, ResetReason, Step, VmOwner};
use super::schedule::SkipReason;
use super::usage;
use crate::api::conditions::{DesiredCondition, remove_condition, set_condition};
use crate::api::sprite::{BootstrapStep, OwnedVm, SpritePhase, StepFailure};
use crate::api::{Sprite, SpriteStatus};

/// Field manager of the Sprite reconciler's writes.
pub const MANAGER: &str = "sprite-operator";
/// Failed attempts in a row of one step before the phase says Failed (it
/// still retries, with backoff).
pub(super) const FAILED_AFTER_ATTEMPTS: i32 = 3;

/// The whole status from what was observed and what the step did:
/// conditions, phase, failure count, session accounting. The one place
/// status is derived; `perform` only records what a step changed.
pub(super) fn derive_status(
    sprite: &Sprite,
    o: &Observed,
    step: &Step,
    error: Option<&Error>,
    status: &mut SpriteStatus,
    now: Timestamp,
) {
    let generation = sprite.metadata.generation;
    let t = Time(now);
    let set = |status: &mut SpriteStatus, c: DesiredCondition| {
        set_condition(&mut status.conditions, c, generation, t.clone());
    };
    let f = &o.facts;
    if f.paused {
        set(
            status,
            DesiredCondition::new(
                "Paused",
                true,
                "Annotation",
                "sprite-operator.dev/paused is \"true\": nothing is done until it is removed",
            ),
        );
        return;
    }
    remove_condition(&mut status.conditions, "Paused");
    record_failure(status, step, error);
    if sprite.spec.template.heartbeat.is_none() {
        status.next_heartbeat_time = None;
    }
    // What the VM says it runs, when it was read, is the truth (a VERSION
    // changed by hand, a checkpoint restored): drift follows from it.
    if let Some(Some(v)) = &o.vm_version
        && !matches!(step, Step::Update | Step::ResetBootstrap(_) | Step::Bootstrap(_))
    {
        status.deployed_version = Some(v.clone());
    }
    if let Some(live) = &o.session {
        let (seconds, connects, billing) =
            usage::session_time(status.session_billing.as_ref(), live, now, o.idle_tail);
        if seconds > 0 {
            usage::charge(status, seconds, o.rate, now);
        }
        if connects > 0 {
            status.wakes += i64::from(connects);
            *status.wakes_by_cause.entry("session".into()).or_default() += i64::from(connects);
        }
        status.session_billing = Some(billing);
    }
    let ours = f.vm.as_ref().is_some_and(|v| v.owner == VmOwner::Us);
    // The VM the relay may route to: one seen with our label, by this pass's
    // observation or by the create that just made it.
    if ours && !f.deleting {
        if let Some(vm) = &o.vm {
            status.owned_vm = Some(OwnedVm {
                name: vm.name.clone(),
                id: vm.id.clone(),
            });
        }
    } else if !(matches!(step, Step::CreateVm) && error.is_none()) {
        status.owned_vm = None;
    }
    let created = ours || status.owned_vm.is_some();
    set(
        status,
        if created {
            DesiredCondition::new("Created", true, "VmExists", "the VM exists on Sprites.dev")
        } else {
            DesiredCondition::new("Created", false, "VmMissing", "the VM has not been created yet")
        },
    );
    let last = status.bootstrap.as_ref().and_then(|b| b.last_completed_step);
    let bootstrapped = last == Some(BootstrapStep::Version);
    set(
        status,
        if bootstrapped {
            DesiredCondition::new("Bootstrapped", true, "Complete", "every bootstrap step completed")
        } else if let Some(e) = error.filter(|_| matches!(step, Step::Bootstrap(_))) {
            DesiredCondition::new("Bootstrapped", false, e.reason(), e.to_string())
        } else {
            DesiredCondition::new(
                "Bootstrapped",
                false,
                "InProgress",
                format!(
                    "last completed step: {}",
                    last.map_or("none".into(), |s| format!("{s:?}"))
                ),
            )
        },
    );
    let server_running = status.server_session_id.is_some();
    set(
        status,
        if server_running {
            DesiredCondition::new("ServerRunning", true, "Started", "the runtime server was started")
        } else if let Some(e) = error.filter(|_| matches!(step, Step::StartServer)) {
            DesiredCondition::new("ServerRunning", false, e.reason(), e.to_string())
        } else if f.suspended {
            DesiredCondition::new("ServerRunning", false, "Suspended", "the Sprite is suspended")
        } else {
            DesiredCondition::new(
                "ServerRunning",
                false,
                "NotStarted",
                "the runtime server is not running",
            )
        },
    );
    let failed_update = status.update.clone().filter(|u| u.attempts > 0);
    let up_to_date = match (&o.bundle, &status.deployed_version) {
        (None, _) => DesiredCondition::new(
            "UpToDate",
            false,
            "VersionUnavailable",
            o.bundle_error.clone().unwrap_or_default(),
        ),
        (Some(b), Some(have)) if *have == b.version => {
            DesiredCondition::new("UpToDate", true, "Current", format!("running {have}"))
        }
        // Failures of this very version (attempts in status, not a
        // message to match): retried with backoff, or given up.
        (Some(b), _) if failed_update.as_ref().is_some_and(|u| u.version == b.version) => {
            let u = failed_update.as_ref().expect("checked");
            DesiredCondition::new(
                "UpToDate",
                false,
                "UpdateFailed",
                format!(
                    "update to {} failed {} time(s){}: {}",
                    u.version,
                    u.attempts,
                    if u.failed {
                        "; given up until a new version"
                    } else {
                        "; retrying"
                    },
                    u.last_error.clone().unwrap_or_default()
                ),
            )
        }
        (Some(b), Some(have)) => DesiredCondition::new(
            "UpToDate",
            false,
            match f.update_type {
                crate::api::sprite::UpdateType::Manual => "ManualUpdate",
                crate::api::sprite::UpdateType::Immediate => "Updating",
                crate::api::sprite::UpdateType::OnWake => "AwaitingWake",
            },
            format!("running {have}, desired {}", b.version),
        ),
        (Some(b), None) => {
            DesiredCondition::new("UpToDate", false, "NotDeployed", format!("desired {}", b.version))
        }
    };
    set(status, up_to_date);

    match step {
        Step::Blocked(BlockedReason::QuotaExceeded) => set(
            status,
            DesiredCondition::new(
                "QuotaExceeded",
                true,
                "MaxSprites",
                "the User's tier allows no more Sprites; this one waits for room",
            ),
        ),
        _ if f.vm.is_some() || f.quota_admits => {
            remove_condition(&mut status.conditions, "QuotaExceeded");
        }
        _ => {}
    }
    if matches!(step, Step::Blocked(BlockedReason::LedgerPending)) {
        set(
            status,
            DesiredCondition::new(
                "DeletionPending",
                true,
                "LedgerPending",
                "waiting for the User to record this Sprite's spend of the month (a paused User records nothing)",
            ),
        );
    } else {
        remove_condition(&mut status.conditions, "DeletionPending");
    }
    if matches!(step, Step::Blocked(BlockedReason::NameConflict)) {
        let (reason, message) = match f.vm.as_ref().map(|v| v.owner) {
            Some(VmOwner::Other) => (
                "OwnedByAnother",
                "the VM of this name carries another Sprite's UID label: it is left untouched and \
                 never adopted",
            ),
            _ => (
                "NotOurs",
                "a VM with this name exists without this Sprite's UID label; it is left untouched \
                 (the sprite-operator.dev/adopt annotation adopts an unlabelled VM)",
            ),
        };
        set(
            status,
            DesiredCondition::new("NameConflict", true, reason, message),
        );
    } else {
        remove_condition(&mut status.conditions, "NameConflict");
    }
    if let Some(e) = &o.schedule_error {
        set(
            status,
            DesiredCondition::new("HeartbeatScheduled", false, "InvalidSchedule", e.clone()),
        );
    } else if o.schedule.is_some() {
        let c = if o.clamped || o.skipped == Some(SkipReason::TierInterval) {
            DesiredCondition::new(
                "HeartbeatScheduled",
                true,
                "ClampedByTier",
                "the schedule is more frequent than the tier allows: closer ticks are skipped",
            )
        } else {
            DesiredCondition::new(
                "HeartbeatScheduled",
                true,
                "Scheduled",
                "heartbeats follow the schedule",
            )
        };
        set(status, c);
    } else {
        remove_condition(&mut status.conditions, "HeartbeatScheduled");
    }

    match &o.suspend_reason {
        Some((reason, message)) => set(
            status,
            DesiredCondition::new("Suspended", true, reason, message.clone()),
        ),
        None => {
            remove_condition(&mut status.conditions, "Suspended");
        }
    }
    match step {
        Step::ResetBootstrap(reason) => set(
            status,
            DesiredCondition::new(
                "VmReset",
                true,
                match reason {
                    ResetReason::VmReplaced => "VmReplaced",
                    ResetReason::VersionMissing => "VersionMissing",
                    ResetReason::SourceChanged => "SourceChanged",
                },
                match reason {
                    ResetReason::VmReplaced => "the VM was replaced (another id): bootstrapped again",
                    ResetReason::VersionMissing => {
                        "/workspace/VERSION was gone from the VM: bootstrapped again"
                    }
                    ResetReason::SourceChanged => {
                        "the runtime source changed before the bootstrap finished: started over"
                    }
                },
            ),
        ),
        _ if bootstrapped => {
            remove_condition(&mut status.conditions, "VmReset");
        }
        _ => {}
    }
    let ready = created && bootstrapped && server_running && !f.suspended;
    let attempts = status.failure.as_ref().map_or(0, |f| f.attempts);
    let phase = if f.deleting {
        SpritePhase::Deleting
    } else if f.suspended && bootstrapped {
        SpritePhase::Suspended
    } else if error.is_some() && attempts >= FAILED_AFTER_ATTEMPTS {
        SpritePhase::Failed
    } else if matches!(step, Step::Update) {
        SpritePhase::Updating
    } else if ready {
        SpritePhase::Active
    } else if f.vm.is_none() && matches!(step, Step::Blocked(_)) {
        SpritePhase::Pending
    } else if f.vm.is_some() || matches!(step, Step::CreateVm) {
        SpritePhase::Provisioning
    } else {
        SpritePhase::Pending
    };
    status.phase = Some(phase);
    let reason = match phase {
        SpritePhase::Active => "Active",
        SpritePhase::Suspended => "Suspended",
        SpritePhase::Failed => error.map_or("Failed", Error::reason),
        _ => "NotReady",
    };
    set(
        status,
        DesiredCondition::new(
            "Ready",
            ready,
            reason,
            if ready {
                "the VM is bootstrapped and its server started".to_string()
            } else {
                format!("phase {phase:?}")
            },
        ),
    );
    status.observed_generation = generation;
}

/// Failures count per step: another step's failure starts a new count, and
/// the step's success (or a converged pass) clears it.
fn record_failure(status: &mut SpriteStatus, step: &Step, error: Option<&Error>) {
    let label = step.label();
    match error {
        Some(e) => {
            let f = status.failure.get_or_insert_with(StepFailure::default);
            if f.step != label {
                *f = StepFailure {
                    step: label.to_string(),
                    ..Default::default()
                };
            }
            f.attempts += 1;
            f.message = e.to_string();
        }
        None if matches!(step, Step::Idle) || status.failure.as_ref().is_some_and(|f| f.step == label) => {
            status.failure = None;
        }
        None => {}
    }
}

pub(super) async fn write_status_if_changed(
    api: &Api<Sprite>,
    sprite: &Sprite,
    status: SpriteStatus,
) -> Result<(), Error> {
    if sprite.status.as_ref() == Some(&status) {
        return Ok(());
    }
    let patch = json!({
        "apiVersion": "sprite-operator.dev/v1alpha1",
        "kind": "Sprite",
        "status": status,
    });
    api.patch_status(
        &sprite.name_any(),
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

pub(super) async fn publish_events(
    ctx: &Context,
    sprite: &Sprite,
    step: &Step,
    outcome: &Result<bool, Error>,
    old_phase: Option<SpritePhase>,
    status: &SpriteStatus,
) {
    let new_phase = status.phase;
    let mut events = vec![];
    match (step, outcome) {
        (_, Err(e)) => events.push((EventType::Warning, e.reason(), e.to_string())),
        (Step::CreateVm, Ok(_)) => events.push((EventType::Normal, "VmCreated", sprite.vm_name())),
        (Step::Bootstrap(s), Ok(_)) => {
            events.push((EventType::Normal, "BootstrapStepCompleted", format!("{s:?}")))
        }
        (Step::StartServer, Ok(_)) => events.push((EventType::Normal, "ServerStarted", String::new())),
        (Step::StopServer, Ok(_)) => events.push((EventType::Normal, "ServerStopped", String::new())),
        (Step::RestartServer, Ok(_)) => events.push((
            EventType::Normal,
            "ServerRestarted",
            "its configuration (spec.server or a Secret it names) changed".into(),
        )),
        (Step::ResetBootstrap(reason), Ok(_)) => events.push((
            EventType::Warning,
            "BootstrapReset",
            format!("{reason:?}: the VM does not have the bootstrap status recorded; starting over"),
        )),
        (Step::CollectHeartbeat, Ok(_)) => {
            if let Some(r) = &status.last_heartbeat_result {
                let (type_, reason) = match r.exit_code {
                    Some(0) => (EventType::Normal, "HeartbeatFinished"),
                    Some(_) => (EventType::Warning, "HeartbeatFailed"),
                    None => (EventType::Normal, "HeartbeatCollected"),
                };
                let note = match (r.exit_code, &r.summary) {
                    (Some(code), Some(summary)) => format!("exit {code}: {summary}"),
                    (Some(code), None) => format!("exit {code}"),
                    (None, _) => "the VM was asleep again: outcome not read".to_string(),
                };
                events.push((type_, reason, note));
            }
        }
        (Step::Update, Ok(_)) => events.push((EventType::Normal, "RuntimeUpdated", String::new())),
        (Step::StartHeartbeat(t), Ok(_)) => {
            events.push((EventType::Normal, "HeartbeatStarted", t.to_string()))
        }
        (Step::DeleteVm, Ok(_)) => events.push((EventType::Normal, "VmDeleted", sprite.vm_name())),
        _ => {}
    }
    if old_phase != new_phase
        && let Some(p) = new_phase
    {
        events.push((
            EventType::Normal,
            "PhaseChanged",
            format!("{old_phase:?} -> {p:?}"),
        ));
    }
    let reference = sprite.object_ref(&());
    for (type_, reason, note) in events {
        let ev = Event {
            type_,
            reason: reason.into(),
            note: (!note.is_empty()).then_some(note),
            action: step.label().into(),
            secondary: None,
        };
        if let Err(e) = ctx.recorder.publish(&ev, &reference).await {
            warn!(sprite = %sprite.name_any(), error = %e, "cannot publish event");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::conditions::find;
    use crate::money::MicroUsd;
    use std::time::Duration;

    fn sprite() -> Sprite {
        serde_json::from_value(json!({
            "apiVersion": "sprite-operator.dev/v1alpha1", "kind": "Sprite",
            "metadata": {"name": "s", "namespace": "n", "generation": 3},
            "spec": {"userRef": {"name": "u"}}
        }))
        .unwrap()
    }

    fn observed(facts: super::super::plan::Facts) -> Observed {
        Observed {
            facts,
            vm: None,
            bundle: None,
            bundle_error: Some("no source".into()),
            schedule: None,
            schedule_error: None,
            skipped: None,
            rate: MicroUsd(180_000),
            clamped: false,
            suspend_reason: None,
            vm_from_list: false,
            tick: None,
            vm_version: None,
            session: None,
            session_live_until: None,
            idle_tail: Duration::from_secs(30),
        }
    }

    fn now() -> Timestamp {
        "2026-11-20T10:00:00Z".parse().unwrap()
    }

    #[test]
    fn a_paused_sprite_gets_its_condition_and_nothing_else_changes() {
        let mut f = super::super::plan::tests::converged();
        f.paused = true;
        let mut st = SpriteStatus {
            phase: Some(SpritePhase::Active),
            ..Default::default()
        };
        derive_status(&sprite(), &observed(f), &Step::Paused, None, &mut st, now());
        assert_eq!(find(&st.conditions, "Paused").unwrap().status, "True");
        assert_eq!(st.conditions.len(), 1);
        assert_eq!(st.phase, Some(SpritePhase::Active));
    }

    #[test]
    fn failures_count_per_step_and_clear_on_its_success() {
        let f = super::super::plan::tests::converged();
        let o = observed(f);
        let e = Error::Command {
            step: "pip".into(),
            code: 1,
            stderr: String::new(),
        };
        let mut st = SpriteStatus::default();
        let step = Step::Bootstrap(BootstrapStep::PipInstall);
        for _ in 0..FAILED_AFTER_ATTEMPTS {
            derive_status(&sprite(), &o, &step, Some(&e), &mut st, now());
        }
        assert_eq!(
            st.failure.as_ref().map(|f| f.attempts),
            Some(FAILED_AFTER_ATTEMPTS)
        );
        assert_eq!(st.phase, Some(SpritePhase::Failed));
        assert_eq!(find(&st.conditions, "Ready").unwrap().reason, "CommandFailed");
        // Another step's failure starts its own count.
        derive_status(&sprite(), &o, &Step::StartServer, Some(&e), &mut st, now());
        assert_eq!(
            st.failure.as_ref().map(|f| (f.step.as_str(), f.attempts)),
            Some(("start_server", 1))
        );
        assert_ne!(st.phase, Some(SpritePhase::Failed));
        // Its success clears it.
        derive_status(&sprite(), &o, &Step::StartServer, None, &mut st, now());
        assert_eq!(st.failure, None);
    }

    #[test]
    fn a_reset_says_why_until_the_bootstrap_is_done_again() {
        let f = super::super::plan::tests::converged();
        let mut st = SpriteStatus::default();
        let reset = Step::ResetBootstrap(ResetReason::VmReplaced);
        derive_status(&sprite(), &observed(f.clone()), &reset, None, &mut st, now());
        assert_eq!(find(&st.conditions, "VmReset").unwrap().reason, "VmReplaced");
        st.bootstrap = Some(crate::api::sprite::BootstrapStatus {
            last_completed_step: Some(BootstrapStep::Version),
            ..Default::default()
        });
        derive_status(&sprite(), &observed(f), &Step::Idle, None, &mut st, now());
        assert!(find(&st.conditions, "VmReset").is_none());
    }

    #[test]
    fn the_vm_version_read_from_the_vm_wins_over_status() {
        let f = super::super::plan::tests::converged();
        let mut o = observed(f);
        o.vm_version = Some(Some("0.0.0-by-hand".into()));
        let mut st = SpriteStatus {
            deployed_version: Some("1.0.0".into()),
            ..Default::default()
        };
        derive_status(&sprite(), &o, &Step::Idle, None, &mut st, now());
        assert_eq!(st.deployed_version.as_deref(), Some("0.0.0-by-hand"));
    }
}
