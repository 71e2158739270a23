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
    /// The paused annotation: nothing is done until it goes.
    pub paused: bool,
    pub deleting: bool,
    pub has_finalizer: bool,
    pub deletion_policy: DeletionPolicy,
    pub vm: Option<ObservedVm>,
    /// The Sprite carries the adopt annotation.
    pub adopt: bool,
    /// The User named by `userRef` does not exist.
    pub user_missing: bool,
    /// The User's ledger does not hold this Sprite's spend yet: deletion
    /// waits for it, so deleting a Sprite never refunds the month's budget.
    pub ledger_behind: bool,
    /// The User's quota admits this Sprite (always true without a User).
    pub quota_admits: bool,
    /// `spec.suspend`, or the owning User is suspended, over budget or missing.
    pub suspended: bool,
    pub last_bootstrap_step: Option<BootstrapStep>,
    /// Why the completed bootstrap no longer describes the VM, if it does not.
    pub reset: Option<ResetReason>,
    /// What the source holds now; None when it cannot be read (a condition
    /// says why), or when its update failed for good (only a new version is
    /// tried).
    pub desired_version: Option<String>,
    pub deployed_version: Option<String>,
    pub update_type: UpdateType,
    /// The relay says a browser session is live: the VM is awake anyway.
    pub session_active: bool,
    /// The runtime server's session, if one was started and not seen to die.
    pub server_session: Option<String>,
    /// When the VM is awake and we looked: is the server's session alive?
    pub server_alive: Option<bool>,
    /// The running server was started with another configuration than the
    /// spec and its Secrets now give (known only when it could be acted on).
    pub server_config_changed: bool,
    /// A heartbeat tick is due now (already filtered by deadline and tier).
    pub heartbeat_due: Option<Timestamp>,
    /// A heartbeat is running; `Some(true)` when it has finished and can be collected.
    pub heartbeat_running: Option<bool>,
}

/// Why bootstrap starts over on a VM that had finished it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResetReason {
    /// The VM's id is not the one the bootstrap ran on: deleted out of band
    /// and made again, so it is empty.
    VmReplaced,
    /// `/workspace/VERSION` is gone (a checkpoint from before the bootstrap
    /// was restored by hand, say).
    VersionMissing,
    /// The runtime source changed before the bootstrap finished.
    SourceChanged,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// The paused annotation is set: no action, no API call that acts.
    Paused,
    AddFinalizer,
    DeleteVm,
    RemoveFinalizer,
    /// Nothing to do until something changes (the reason goes into a condition).
    Blocked(BlockedReason),
    CreateVm,
    /// Write this Sprite's UID label on an unlabelled VM it was asked to
    /// adopt, before anything else is done to that VM.
    AdoptVm,
    /// Forget the bootstrap progress: the VM does not have it.
    ResetBootstrap(ResetReason),
    Bootstrap(BootstrapStep),
    StartServer,
    StopServer,
    /// Stop the server and start it again with the configuration of now.
    RestartServer,
    Update,
    CollectHeartbeat,
    StartHeartbeat(Timestamp),
    /// Converged: wait for the next tick or a change.
    Idle,
}

impl Step {
    /// Whether performing this step calls Sprites.dev about the VM (acts on
    /// it or inside it): such a pass first reads the VM again with a get.
    pub fn acts_on_vm(&self) -> bool {
        !matches!(
            self,
            Step::Paused
                | Step::Blocked(_)
                | Step::Idle
                | Step::AddFinalizer
                | Step::RemoveFinalizer
                | Step::ResetBootstrap(_)
        )
    }

    /// The step's name in metrics, Events and status.
    pub fn label(&self) -> &'static str {
        match self {
            Step::Paused => "paused",
            Step::AddFinalizer => "add_finalizer",
            Step::DeleteVm => "delete_vm",
            Step::RemoveFinalizer => "remove_finalizer",
            Step::Blocked(_) => "blocked",
            Step::CreateVm => "create_vm",
            Step::AdoptVm => "adopt_vm",
            Step::ResetBootstrap(_) => "reset_bootstrap",
            Step::Bootstrap(_) => "bootstrap",
            Step::StartServer => "start_server",
            Step::StopServer => "stop_server",
            Step::RestartServer => "restart_server",
            Step::Update => "update",
            Step::CollectHeartbeat => "collect_heartbeat",
            Step::StartHeartbeat(_) => "start_heartbeat",
            Step::Idle => "idle",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockedReason {
    QuotaExceeded,
    NameConflict,
    UserNotFound,
    LedgerPending,
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
    if f.paused {
        return Step::Paused;
    }
    if f.deleting {
        if !f.has_finalizer {
            return Step::Idle;
        }
        if f.ledger_behind {
            return Step::Blocked(BlockedReason::LedgerPending);
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
    if let Some(reason) = f.reset
        && f.last_bootstrap_step.is_some()
    {
        return Step::ResetBootstrap(reason);
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
    // A server started with an old configuration moves under the same
    // policy as the runtime: a heartbeat wakes the VM anyway.
    if f.server_config_changed && (may_update_now(f) || (awake_soon && f.update_type == UpdateType::OnWake)) {
        return Step::RestartServer;
    }
    if f.heartbeat_running.is_none()
        && let Some(tick) = f.heartbeat_due
    {
        return Step::StartHeartbeat(tick);
    }
    Step::Idle
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(crate) fn converged() -> Facts {
        Facts {
            paused: false,
            deleting: false,
            has_finalizer: true,
            deletion_policy: DeletionPolicy::Delete,
            vm: Some(ObservedVm {
                owner: VmOwner::Us,
                awake: false,
            }),
            adopt: false,
            user_missing: false,
            ledger_behind: false,
            quota_admits: true,
            suspended: false,
            last_bootstrap_step: Some(BootstrapStep::Version),
            reset: None,
            desired_version: Some("1.0.0".into()),
            deployed_version: Some("1.0.0".into()),
            update_type: UpdateType::OnWake,
            session_active: false,
            server_session: Some("42".into()),
            server_alive: None,
            server_config_changed: false,
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
    fn deletion_waits_for_the_users_ledger() {
        let mut f = converged();
        f.deleting = true;
        f.ledger_behind = true;
        assert_eq!(next_step(&f), Step::Blocked(BlockedReason::LedgerPending));
        f.ledger_behind = false;
        assert_eq!(next_step(&f), Step::DeleteVm);
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
    fn a_paused_sprite_is_left_alone_even_when_deleted() {
        let mut f = converged();
        f.paused = true;
        f.vm = None;
        assert_eq!(next_step(&f), Step::Paused);
        f.deleting = true;
        assert_eq!(next_step(&f), Step::Paused);
    }

    #[test]
    fn a_replaced_vm_is_bootstrapped_again() {
        let mut f = converged();
        f.reset = Some(ResetReason::VmReplaced);
        assert_eq!(next_step(&f), Step::ResetBootstrap(ResetReason::VmReplaced));
        f.last_bootstrap_step = None;
        assert_eq!(next_step(&f), Step::Bootstrap(BootstrapStep::Directories));
    }

    #[test]
    fn a_changed_server_config_restarts_under_the_update_policy() {
        let mut f = converged();
        f.server_config_changed = true;
        assert_eq!(
            next_step(&f),
            Step::Idle,
            "OnWake must not wake the VM to restart"
        );
        f.session_active = true;
        assert_eq!(next_step(&f), Step::RestartServer);
        f.session_active = false;
        f.update_type = UpdateType::Immediate;
        assert_eq!(next_step(&f), Step::RestartServer);
        f.update_type = UpdateType::Manual;
        f.vm.as_mut().unwrap().awake = true;
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
