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
use super::plan::{BlockedReason, Step, VmOwner};
use super::schedule::SkipReason;
use super::sprite::{FAILED_AFTER_ATTEMPTS, MANAGER, Observed, step_label};
use crate::api::conditions::{DesiredCondition, remove_condition, set_condition};
use crate::api::sprite::{BootstrapStep, OwnedVm, SpritePhase};
use crate::api::{Sprite, SpriteStatus};

/// Conditions and phase from what was observed and what the step did.
pub(super) fn derive_conditions(
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
    let previous_failure = status
        .conditions
        .iter()
        .find(|c| c.type_ == "UpToDate" && c.reason == "UpdateFailed")
        .map(|c| c.message.clone());
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
        (Some(b), _) if matches!(step, Step::Update) && error.is_some() => DesiredCondition::new(
            "UpToDate",
            false,
            "UpdateFailed",
            format!(
                "update to {} failed: {}",
                b.version,
                error.map(ToString::to_string).unwrap_or_default()
            ),
        ),
        // A failed update of this version stays reported until a new version.
        (Some(b), _) if previous_failure.as_ref().is_some_and(|m| m.contains(&b.version)) => {
            DesiredCondition::new(
                "UpToDate",
                false,
                "UpdateFailed",
                previous_failure.clone().unwrap_or_default(),
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
    let ready = created && bootstrapped && server_running && !f.suspended;
    let attempts = status.bootstrap.as_ref().map_or(0, |b| b.attempts);
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
    new_phase: Option<SpritePhase>,
) {
    let mut events = vec![];
    match (step, outcome) {
        (_, Err(e)) => events.push((EventType::Warning, e.reason(), e.to_string())),
        (Step::CreateVm, Ok(_)) => events.push((EventType::Normal, "VmCreated", sprite.vm_name())),
        (Step::Bootstrap(s), Ok(_)) => {
            events.push((EventType::Normal, "BootstrapStepCompleted", format!("{s:?}")))
        }
        (Step::StartServer, Ok(_)) => events.push((EventType::Normal, "ServerStarted", String::new())),
        (Step::StopServer, Ok(_)) => events.push((EventType::Normal, "ServerStopped", String::new())),
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
            action: step_label(step).into(),
            secondary: None,
        };
        if let Err(e) = ctx.recorder.publish(&ev, &reference).await {
            warn!(sprite = %sprite.name_any(), error = %e, "cannot publish event");
        }
    }
}
