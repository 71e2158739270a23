//! What the Sprite reconciler does next: a pure function of what we know.
//!
//! Each reconcile observes (the Sprite, its status, the VM as the API's
//! metadata calls report it, quota), asks [`next_step`] for one step,
//! performs it, records the result in status and comes back. Keeping the
//! decision pure makes the state machine readable in one place and testable
//! without any I/O.

use jiff::Timestamp;

use crate::api::sprite::{BootstrapStep, DeletionPolicy, UpdateType};

/// Whose a VM is, by the UID labels it carries (decision 17).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmOwner {
    /// It carries this Sprite's UID label.
    Us,
    /// It carries no Sprite's UID label: adoptable when the Sprite asks.
    Nobody,
    /// It carries another Sprite's UID label.
    Other,
}

/// The VM as a metadata call (get/list) reports it: reading it never wakes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObservedVm {
    pub owner: VmOwner,
    /// `running` on the API: awake right now, so looking inside costs nothing extra.
    pub awake: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Facts {
    pub deleting: bool,
    pub has_finalizer: bool,
    pub deletion_policy: DeletionPolicy,
    pub vm: Option<ObservedVm>,
    /// The Sprite carries the adopt annotation.
    pub adopt: bool,
    /// The User named by `userRef` does not exist.
    pub user_missing: bool,
    /// The User's quota admits this Sprite (always true without a User).
    pub quota_admits: bool,
    /// `spec.suspend`, or the owning User is suspended, over budget or missing.
    pub suspended: bool,
    pub last_bootstrap_step: Option<BootstrapStep>,
    /// What the source holds now; None when it cannot be read (a condition says why).
    pub desired_version: Option<String>,
    pub deployed_version: Option<String>,
    pub update_type: UpdateType,
    /// The relay says a browser session is live: the VM is awake anyway.
    pub session_active: bool,
    /// The runtime server's session, if one was started and not seen to die.
    pub server_session: Option<String>,
    /// When the VM is awake and we looked: is the server's session alive?
    pub server_alive: Option<bool>,
    /// A heartbeat tick is due now (already filtered by deadline and tier).
    pub heartbeat_due: Option<Timestamp>,
    /// A heartbeat is running; `Some(true)` when it has finished and can be collected.
    pub heartbeat_running: Option<bool>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    AddFinalizer,
    DeleteVm,
    RemoveFinalizer,
    /// Nothing to do until something changes (the reason goes into a condition).
    Blocked(BlockedReason),
    CreateVm,
    /// Write this Sprite's UID label on an unlabelled VM it was asked to
    /// adopt, before anything else is done to that VM.
    AdoptVm,
    Bootstrap(BootstrapStep),
    StartServer,
    StopServer,
    Update,
    CollectHeartbeat,
    StartHeartbeat(Timestamp),
    /// Converged: wait for the next tick or a change.
    Idle,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockedReason {
    QuotaExceeded,
    NameConflict,
    UserNotFound,
    RuntimeUnavailable,
}

/// Whether the deployed runtime differs from the desired one. An unknown
/// desired version (unreadable source) is not drift: we cannot act on it.
pub fn drifted(f: &Facts) -> bool {
    matches!((&f.desired_version, &f.deployed_version), (Some(d), Some(have)) if d != have)
}

/// Whether an update may run now without the operator causing a wake it is
/// not allowed to cause (decision 3: only heartbeats and `Immediate`).
pub fn may_update_now(f: &Facts) -> bool {
    match f.update_type {
        UpdateType::Manual => false,
        UpdateType::Immediate => true,
        UpdateType::OnWake => f.vm.as_ref().is_some_and(|v| v.awake) || f.session_active,
    }
}

pub fn next_step(f: &Facts) -> Step {
    if f.deleting {
        if !f.has_finalizer {
            return Step::Idle;
        }
        // Only a VM seen with our label: never one merely asked to be adopted.
        let ours = f.vm.as_ref().is_some_and(|v| v.owner == VmOwner::Us);
        return if f.deletion_policy == DeletionPolicy::Delete && ours {
            Step::DeleteVm
        } else {
            Step::RemoveFinalizer
        };
    }
    if !f.has_finalizer {
        return Step::AddFinalizer;
    }
    let Some(vm) = &f.vm else {
        if f.user_missing {
            return Step::Blocked(BlockedReason::UserNotFound);
        }
        if !f.quota_admits {
            return Step::Blocked(BlockedReason::QuotaExceeded);
        }
        if f.desired_version.is_none() {
            return Step::Blocked(BlockedReason::RuntimeUnavailable);
        }
        return Step::CreateVm;
    };
    match vm.owner {
        VmOwner::Us => {}
        VmOwner::Nobody if f.adopt => return Step::AdoptVm,
        VmOwner::Nobody | VmOwner::Other => return Step::Blocked(BlockedReason::NameConflict),
    }
    let next_bootstrap = match f.last_bootstrap_step {
        None => Some(BootstrapStep::Directories),
        Some(last) => last.next(),
    };
    if let Some(step) = next_bootstrap {
        if f.desired_version.is_none() {
            return Step::Blocked(BlockedReason::RuntimeUnavailable);
        }
        return Step::Bootstrap(step);
    }
    if f.heartbeat_running == Some(true) {
        return Step::CollectHeartbeat;
    }
    if f.suspended {
        return if f.server_session.is_some() {
            Step::StopServer
        } else {
            Step::Idle
        };
    }
    // A heartbeat wakes the VM anyway, so an OnWake update rides along.
    let awake_soon = f.heartbeat_due.is_some();
    if drifted(f) && (may_update_now(f) || (awake_soon && f.update_type == UpdateType::OnWake)) {
        return Step::Update;
    }
    let server_needed = f.server_session.is_none() || f.server_alive == Some(false);
    if server_needed && (f.server_session.is_none() || vm.awake) {
        return Step::StartServer;
    }
    if f.heartbeat_running.is_none()
        && let Some(tick) = f.heartbeat_due
    {
        return Step::StartHeartbeat(tick);
    }
    Step::Idle
}

#[cfg(test)]
mod tests {
    use super::*;

    fn converged() -> Facts {
        Facts {
            deleting: false,
            has_finalizer: true,
            deletion_policy: DeletionPolicy::Delete,
            vm: Some(ObservedVm {
                owner: VmOwner::Us,
                awake: false,
            }),
            adopt: false,
            user_missing: false,
            quota_admits: true,
            suspended: false,
            last_bootstrap_step: Some(BootstrapStep::Version),
            desired_version: Some("1.0.0".into()),
            deployed_version: Some("1.0.0".into()),
            update_type: UpdateType::OnWake,
            session_active: false,
            server_session: Some("42".into()),
            server_alive: None,
            heartbeat_due: None,
            heartbeat_running: None,
        }
    }

    #[test]
    fn a_converged_sleeping_sprite_is_left_alone() {
        assert_eq!(next_step(&converged()), Step::Idle);
    }

    #[test]
    fn a_new_sprite_gets_a_finalizer_then_a_vm() {
        let mut f = converged();
        f.has_finalizer = false;
        f.vm = None;
        f.last_bootstrap_step = None;
        assert_eq!(next_step(&f), Step::AddFinalizer);
        f.has_finalizer = true;
        assert_eq!(next_step(&f), Step::CreateVm);
    }

    #[test]
    fn bootstrap_resumes_after_the_last_completed_step() {
        let mut f = converged();
        f.last_bootstrap_step = None;
        assert_eq!(next_step(&f), Step::Bootstrap(BootstrapStep::Directories));
        f.last_bootstrap_step = Some(BootstrapStep::PipInstall);
        assert_eq!(next_step(&f), Step::Bootstrap(BootstrapStep::RuntimeFiles));
        f.last_bootstrap_step = Some(BootstrapStep::MemoryTemplates);
        assert_eq!(next_step(&f), Step::Bootstrap(BootstrapStep::Version));
    }

    #[test]
    fn after_bootstrap_the_server_starts() {
        let mut f = converged();
        f.server_session = None;
        assert_eq!(next_step(&f), Step::StartServer);
    }

    #[test]
    fn a_dead_server_is_restarted_only_when_seen_dead() {
        let mut f = converged();
        f.server_alive = Some(false);
        f.vm.as_mut().unwrap().awake = true;
        assert_eq!(next_step(&f), Step::StartServer);
        f.server_alive = None;
        assert_eq!(next_step(&f), Step::Idle);
    }

    #[test]
    fn quota_blocks_only_creation() {
        let mut f = converged();
        f.quota_admits = false;
        assert_eq!(next_step(&f), Step::Idle, "an existing VM keeps running");
        f.vm = None;
        assert_eq!(next_step(&f), Step::Blocked(BlockedReason::QuotaExceeded));
    }

    #[test]
    fn a_stranger_vm_is_never_touched() {
        let mut f = converged();
        for owner in [VmOwner::Other, VmOwner::Nobody] {
            f.deleting = false;
            f.vm = Some(ObservedVm { owner, awake: true });
            assert_eq!(next_step(&f), Step::Blocked(BlockedReason::NameConflict));
            f.deleting = true;
            assert_eq!(
                next_step(&f),
                Step::RemoveFinalizer,
                "delete must not remove someone else's VM"
            );
        }
    }

    #[test]
    fn adoption_labels_an_unlabelled_vm_first_and_never_takes_a_labelled_one() {
        let mut f = converged();
        f.adopt = true;
        f.last_bootstrap_step = None;
        f.vm = Some(ObservedVm {
            owner: VmOwner::Nobody,
            awake: false,
        });
        assert_eq!(next_step(&f), Step::AdoptVm);
        f.vm.as_mut().unwrap().owner = VmOwner::Other;
        assert_eq!(next_step(&f), Step::Blocked(BlockedReason::NameConflict));
        f.vm.as_mut().unwrap().owner = VmOwner::Us;
        assert_eq!(next_step(&f), Step::Bootstrap(BootstrapStep::Directories));
        // Asked to adopt but deleted before the label was written: not ours.
        f.vm.as_mut().unwrap().owner = VmOwner::Nobody;
        f.deleting = true;
        assert_eq!(next_step(&f), Step::RemoveFinalizer);
    }

    #[test]
    fn a_sprite_without_its_user_gets_no_vm() {
        let mut f = converged();
        f.user_missing = true;
        f.vm = None;
        assert_eq!(next_step(&f), Step::Blocked(BlockedReason::UserNotFound));
    }

    #[test]
    fn deletion_follows_the_policy() {
        let mut f = converged();
        f.deleting = true;
        assert_eq!(next_step(&f), Step::DeleteVm);
        f.vm = None;
        assert_eq!(next_step(&f), Step::RemoveFinalizer);
        f.vm = Some(ObservedVm {
            owner: VmOwner::Us,
            awake: false,
        });
        f.deletion_policy = DeletionPolicy::Retain;
        assert_eq!(next_step(&f), Step::RemoveFinalizer);
        f.has_finalizer = false;
        assert_eq!(next_step(&f), Step::Idle);
    }

    #[test]
    fn on_wake_drift_waits_for_a_wake() {
        let mut f = converged();
        f.desired_version = Some("2.0.0".into());
        assert!(drifted(&f));
        assert_eq!(next_step(&f), Step::Idle, "OnWake must not wake the VM to update");
        f.vm.as_mut().unwrap().awake = true;
        assert_eq!(next_step(&f), Step::Update);
        f.vm.as_mut().unwrap().awake = false;
        f.session_active = true;
        assert_eq!(next_step(&f), Step::Update);
        f.session_active = false;
        f.heartbeat_due = Some("2026-01-01T00:00:00Z".parse().unwrap());
        assert_eq!(next_step(&f), Step::Update, "a heartbeat wakes it anyway");
    }

    #[test]
    fn immediate_drift_updates_now_and_manual_never() {
        let mut f = converged();
        f.desired_version = Some("2.0.0".into());
        f.update_type = UpdateType::Immediate;
        assert_eq!(next_step(&f), Step::Update);
        f.update_type = UpdateType::Manual;
        f.vm.as_mut().unwrap().awake = true;
        assert_eq!(next_step(&f), Step::Idle);
    }

    #[test]
    fn heartbeats_start_then_are_collected() {
        let mut f = converged();
        let tick: Timestamp = "2026-01-01T00:15:00Z".parse().unwrap();
        f.heartbeat_due = Some(tick);
        assert_eq!(next_step(&f), Step::StartHeartbeat(tick));
        f.heartbeat_running = Some(false);
        assert_eq!(next_step(&f), Step::Idle, "one heartbeat at a time");
        f.heartbeat_running = Some(true);
        assert_eq!(next_step(&f), Step::CollectHeartbeat);
    }

    #[test]
    fn suspension_stops_the_server_and_heartbeats() {
        let mut f = converged();
        f.suspended = true;
        f.heartbeat_due = Some("2026-01-01T00:15:00Z".parse().unwrap());
        assert_eq!(next_step(&f), Step::StopServer);
        f.server_session = None;
        assert_eq!(next_step(&f), Step::Idle);
    }

    #[test]
    fn an_unreadable_runtime_source_blocks_provisioning() {
        let mut f = converged();
        f.desired_version = None;
        f.vm = None;
        assert_eq!(next_step(&f), Step::Blocked(BlockedReason::RuntimeUnavailable));
    }
}
