//! The `Sprite` resource: one Sprites.dev microVM, bootstrapped with the
//! sprite runtime and kept at the desired version.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Label put on every VM the operator creates (Sprites.dev `labels`), holding
/// the Sprite's UID, so that a 409 on create can tell our VM from a stranger's.
pub const UID_LABEL_PREFIX: &str = "sprite-operator.dev/uid=";
/// Annotation that lets a Sprite adopt an existing VM that does not carry our
/// UID label (for migrating VMs created by hand).
pub const ADOPT_ANNOTATION: &str = "sprite-operator.dev/adopt";
/// Annotation the relay sets while a browser session is live: the VM is awake
/// anyway, so `OnWake` updates may run now.
/// Label of a Secret that a Sprite's `server.env` may name, under the
/// default operator config (`secretReferences.requiredLabel`).
pub const SPRITE_ENV_LABEL: &str = "sprite-operator.dev/sprite-env";
/// Label of the objects the operator makes for a User (its gateway Secret,
/// its primary Sprite); its value is the User's name.
pub const USER_LABEL: &str = "sprite-operator.dev/user";
pub const FINALIZER: &str = "sprite-operator.dev/cleanup";
/// Annotation that stops every action on a Sprite or a User while it is
/// `"true"` (status says so in a `Paused` condition); removing it resumes
/// where reconciliation stopped.
pub const PAUSED_ANNOTATION: &str = "sprite-operator.dev/paused";

pub const DEFAULT_PORT: i32 = 8765;
pub const DEFAULT_HEARTBEAT_DURATION: &str = "2m";

/// One persistent microVM on Sprites.dev, owned by a platform user.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "sprite-operator.dev",
    version = "v1alpha1",
    kind = "Sprite",
    doc = "A persistent AI-agent microVM on Sprites.dev, bootstrapped with the sprite runtime and kept at the desired version.",
    plural = "sprites",
    shortname = "spr",
    category = "sprite-operator",
    namespaced,
    status = "SpriteStatus",
    derive = "PartialEq",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Version","type":"string","jsonPath":".status.deployedVersion"}"#,
    printcolumn = r#"{"name":"User","type":"string","jsonPath":".spec.userRef.name"}"#,
    printcolumn = r#"{"name":"Last Heartbeat","type":"date","jsonPath":".status.lastHeartbeatTime"}"#,
    printcolumn = r#"{"name":"Cost","type":"string","jsonPath":".status.estimatedCost","description":"Estimated cost in USD"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(validation = Rule::new(
    "has(self.spriteName) == has(oldSelf.spriteName) && (!has(self.spriteName) || self.spriteName == oldSelf.spriteName)"
).message("spriteName is immutable: it names the VM on Sprites.dev").field_path(".spriteName"))]
#[x_kube(validation = Rule::new("has(self.userRef)").message("userRef is required: every Sprite counts against a User"))]
#[serde(rename_all = "camelCase")]
pub struct SpriteSpec {
    /// Name of the VM on Sprites.dev. Defaults to `<namespace>-<name>-<hash>`,
    /// where the hash (10 hex digits of SHA-256 over namespace and name)
    /// keeps two Sprites of different namespaces apart. Immutable: renaming
    /// would orphan the VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
    )]
    pub sprite_name: Option<String>,

    /// The User this Sprite belongs to: every Sprite counts against a User's
    /// tier, quota and budget. A Sprite whose User does not exist gets no VM.
    /// Required by a rule on the spec, not by the schema's `required`, so
    /// that a Sprite stored before it was required still reads (as naming no
    /// User) instead of breaking every list of Sprites.
    #[serde(default)]
    pub user_ref: UserRef,

    /// Stop heartbeats and the runtime server and let the VM sleep; the VM and
    /// its disk are kept. Setting it back to false resumes.
    #[serde(default)]
    pub suspend: bool,

    #[serde(flatten)]
    pub template: SpriteTemplateSpec,
}

/// The part of a Sprite's spec that a User's template may set.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct SpriteTemplateSpec {
    /// VM size and placement, passed to the Sprites.dev create call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<SpriteResources>,

    /// Which sprite runtime is deployed onto the VM.
    #[serde(default)]
    pub runtime: RuntimeSpec,

    /// The runtime's WebSocket server, started detached in the VM.
    #[serde(default)]
    pub server: ServerSpec,

    /// Scheduled wake-ups of the VM. Without it the VM only wakes for browser
    /// sessions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat: Option<HeartbeatSpec>,

    /// How a VM whose runtime version differs from the desired one is updated.
    #[serde(default)]
    pub update_policy: UpdatePolicy,

    /// What happens to the VM when the Sprite is deleted.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
pub struct UserRef {
    /// Name of a User in the same namespace.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub name: String,
}

/// VM size, as the Sprites.dev create call takes it. Unset fields take the
/// service's defaults.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SpriteResources {
    /// Memory in MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 256, max = 65536))]
    pub ram_mb: Option<i32>,
    /// Virtual CPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 16))]
    pub cpus: Option<i32>,
    /// Disk in GB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub storage_gb: Option<i32>,
    /// Region code, e.g. `ord`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-z0-9-]{2,32}$"))]
    pub region: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RuntimeSpec {
    /// Pins the runtime version. The operator deploys the version of the
    /// chosen source; when this is set and the source holds another version,
    /// the Sprite reports `UpToDate=False` (reason `VersionUnavailable`)
    /// instead of deploying something else.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64), regex(pattern = r"^[0-9A-Za-z][0-9A-Za-z.+_-]*$"))]
    pub version: Option<String>,
    /// Where the runtime files come from: the runtime embedded in the operator
    /// (default) or a ConfigMap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<RuntimeSource>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RuntimeSource {
    /// A ConfigMap in the Sprite's namespace holding the runtime: a `VERSION`
    /// key plus one key per file. Keys name the file's path below
    /// `/workspace`, with `/` written as `__` (ConfigMap keys cannot hold `/`),
    /// e.g. `src__server.py`.
    pub config_map: ConfigMapRef,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct ConfigMapRef {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

fn default_command() -> Vec<String> {
    vec![
        "/workspace/.venv/bin/python3".into(),
        "/workspace/src/server.py".into(),
    ]
}

fn default_port() -> i32 {
    DEFAULT_PORT
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServerSpec {
    /// The server's argv.
    #[serde(default = "default_command")]
    #[schemars(length(min = 1))]
    pub command: Vec<String>,
    /// Port the server listens on inside the VM; the relay connects to it
    /// through the Sprites.dev proxy.
    #[serde(default = "default_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// Environment of the server. Values from Secrets are written to a 0600
    /// file in the VM, never passed in a URL or shown in status.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<ServerEnvVar>,
}

impl Default for ServerSpec {
    fn default() -> Self {
        Self {
            command: default_command(),
            port: default_port(),
            env: vec![],
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.value) != has(self.valueFrom)").message("exactly one of value and valueFrom must be set"))]
pub struct ServerEnvVar {
    #[schemars(length(min = 1, max = 256), regex(pattern = r"^[A-Za-z_][A-Za-z0-9_]*$"))]
    pub name: String,
    /// A literal value. Use `valueFrom` for anything secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_from: Option<EnvVarSource>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EnvVarSource {
    pub secret_key_ref: SecretKeySelector,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct SecretKeySelector {
    /// Secret in the Sprite's namespace.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

fn default_heartbeat_duration() -> String {
    DEFAULT_HEARTBEAT_DURATION.into()
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HeartbeatSpec {
    /// Cron schedule, five fields (minute precision) or six (with seconds
    /// first). An invalid schedule is reported in the `HeartbeatScheduled`
    /// condition.
    #[schemars(length(min = 1, max = 256))]
    pub schedule: String,
    /// IANA time zone the schedule is read in. Defaults to UTC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub time_zone: Option<String>,
    /// How long the runtime's heartbeat entry may run, e.g. `2m` or `90s`.
    #[serde(default = "default_heartbeat_duration")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h))+$"))]
    pub duration: String,
    /// A tick missed by less than this (operator down, VM busy) still runs
    /// once; older ticks are skipped and counted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub starting_deadline_seconds: Option<i64>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UpdatePolicy {
    /// `OnWake` updates only when the VM is awake anyway (heartbeat, relay
    /// session); `Immediate` wakes it to update; `Manual` only reports drift.
    #[serde(default, rename = "type")]
    pub type_: UpdateType,
    /// Take a checkpoint before updating, so a failed update can be undone.
    #[serde(default = "default_true")]
    pub checkpoint_before_update: bool,
    /// Restore that checkpoint when an update step fails.
    #[serde(default = "default_true")]
    pub rollback_on_failure: bool,
}

fn default_true() -> bool {
    true
}

impl Default for UpdatePolicy {
    fn default() -> Self {
        Self {
            type_: UpdateType::default(),
            checkpoint_before_update: true,
            rollback_on_failure: true,
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum UpdateType {
    #[default]
    OnWake,
    Immediate,
    Manual,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum DeletionPolicy {
    /// Delete the VM when the Sprite is deleted.
    #[default]
    Delete,
    /// Keep the VM (and its disk) on Sprites.dev.
    Retain,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum SpritePhase {
    Pending,
    Provisioning,
    Active,
    Updating,
    Suspended,
    Failed,
    Deleting,
}

/// Bootstrap steps in the order they run. The order is part of the contract:
/// `VERSION` comes last, so a VERSION file means a finished bootstrap.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, JsonSchema)]
pub enum BootstrapStep {
    Directories,
    Venv,
    Requirements,
    PipInstall,
    RuntimeFiles,
    Schema,
    MemoryTemplates,
    Version,
}

impl BootstrapStep {
    pub const ALL: [BootstrapStep; 8] = [
        BootstrapStep::Directories,
        BootstrapStep::Venv,
        BootstrapStep::Requirements,
        BootstrapStep::PipInstall,
        BootstrapStep::RuntimeFiles,
        BootstrapStep::Schema,
        BootstrapStep::MemoryTemplates,
        BootstrapStep::Version,
    ];

    /// The step after `self`, or None after the last.
    pub fn next(self) -> Option<BootstrapStep> {
        let i = Self::ALL.iter().position(|s| *s == self)?;
        Self::ALL.get(i + 1).copied()
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SpriteStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<SpritePhase>,
    /// Created, Bootstrapped, ServerRunning, UpToDate, Ready (and, while they
    /// apply, NameConflict, QuotaExceeded, HeartbeatScheduled).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The VM's name on Sprites.dev.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sprite_name: Option<String>,
    /// The VM's id on Sprites.dev.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sprite_id: Option<String>,
    /// The VM the controller last saw carrying this Sprite's UID label: the
    /// only VM the relay routes this Sprite's sessions to. Absent while the
    /// VM is missing, not yet labelled, or someone else's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owned_vm: Option<OwnedVm>,
    /// The VM's public URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bootstrap: Option<BootstrapStatus>,
    /// Runtime version last deployed and confirmed in `/workspace/VERSION`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployed_version: Option<String>,
    /// Session id of the detached runtime server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_session_id: Option<String>,
    /// Hash of what the running server was started with (`spec.server` and
    /// the versions of the Secrets it names); a different desired hash
    /// restarts it under the update policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_config_hash: Option<String>,
    /// The port the running server was started on: the relay connects here,
    /// so a port change in spec reaches sessions once the server moved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_port: Option<i32>,
    /// Attempts to update to the desired version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update: Option<UpdateStatus>,
    /// The step that failed last and how often in a row; cleared when that
    /// step succeeds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<StepFailure>,
    /// The outcome of the last heartbeat collected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat_result: Option<HeartbeatResult>,
    /// What of the relay's session time has been accounted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_billing: Option<SessionBilling>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_heartbeat_time: Option<Time>,
    /// A heartbeat started and not yet collected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_heartbeat: Option<ActiveHeartbeat>,
    /// Ticks skipped because they were older than startingDeadlineSeconds or
    /// closer together than the tier allows.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub skipped_heartbeats: i64,
    /// Active VM time the operator accounted for, in seconds.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub runtime_seconds: i64,
    /// Estimated cost in USD of that time, as a decimal string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimated_cost: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_checkpoint: Option<String>,
    /// Usage in the current billing period (the UTC month); the User sums these.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<crate::api::user::Usage>,
    /// Wakes of the VM the operator caused or saw, in all.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub wakes: i64,
    /// The same wakes by cause: `heartbeat`, `update`, `bootstrap`,
    /// `server` (a start, stop or restart of the runtime server), `session`
    /// (an upstream connection of the relay, which the relay counts in its
    /// session Lease: each may have woken the VM).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub wakes_by_cause: std::collections::BTreeMap<String, i64>,
}

/// Update attempts of one version.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UpdateStatus {
    /// The version being updated to.
    pub version: String,
    /// Failed attempts of that version in a row.
    #[serde(default)]
    pub attempts: i32,
    /// True after the last allowed attempt failed: this version is not tried
    /// again; a new version is.
    #[serde(default)]
    pub failed: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// A step that failed, for backoff and the `Failed` phase.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StepFailure {
    pub step: String,
    pub attempts: i32,
    pub message: String,
}

/// A collected heartbeat.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HeartbeatResult {
    /// The tick it ran for.
    pub scheduled_for: Time,
    /// Its exit code; absent when the VM had already gone to sleep when the
    /// heartbeat was collected (reading it would have woken the VM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// The last lines it printed, shortened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<String>,
    /// How long it ran, in seconds, as accounted.
    pub seconds: i64,
}

/// The relay's session time, accounted from its session Lease.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionBilling {
    /// When the Lease being accounted was acquired (a new value is a new
    /// run of sessions).
    pub acquired: Time,
    /// Session time up to here has been accounted.
    pub billed_until: Time,
    /// The idle tail after the run ended has been accounted.
    #[serde(default)]
    pub tail_billed: bool,
    /// Upstream connects of the run counted as wakes (cause `session`).
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub connects: u32,
}

fn is_zero_u32(v: &u32) -> bool {
    *v == 0
}

fn is_zero(v: &i64) -> bool {
    *v == 0
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BootstrapStatus {
    /// The last step that completed; a restart resumes after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_completed_step: Option<BootstrapStep>,
    /// Id of the VM the completed steps ran on: another id means the VM was
    /// replaced, and bootstrap starts over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_id: Option<String>,
    /// Runtime version the completed steps installed: a source that changes
    /// before the bootstrap finished starts it over (its files and
    /// requirements are the new version's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

/// A VM seen to carry the Sprite's UID label.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct OwnedVm {
    /// Its name on Sprites.dev.
    pub name: String,
    /// Its id on Sprites.dev: a VM deleted and made again under the same
    /// name has another.
    pub id: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ActiveHeartbeat {
    pub session_id: String,
    pub started_at: Time,
    /// The tick this heartbeat runs for.
    pub scheduled_for: Time,
}

impl Sprite {
    /// The VM name on Sprites.dev: `spec.spriteName`; else the name status
    /// recorded (a VM made under an earlier default keeps its name); else
    /// [`default_vm_name`].
    pub fn vm_name(&self) -> String {
        if let Some(n) = &self.spec.sprite_name {
            return n.clone();
        }
        if let Some(n) = self.status.as_ref().and_then(|s| s.sprite_name.as_ref()) {
            return n.clone();
        }
        let ns = self.metadata.namespace.as_deref().unwrap_or("default");
        let name = self.metadata.name.as_deref().unwrap_or_default();
        default_vm_name(ns, name)
    }
}

/// Hex digits of the hash in a default VM name (40 bits).
const VM_NAME_HASH_LEN: usize = 10;
/// Sprites.dev names, like DNS labels, hold at most 63 characters.
const VM_NAME_MAX: usize = 63;

/// `<namespace>-<name>` alone is ambiguous (`acme`/`corp-alice` and
/// `acme-corp`/`alice` give the same string), so the readable part is
/// followed by a hash of the pair, whose `/` cannot occur in either half.
/// A collision of the hash still cannot hand a VM to another tenant: a VM is
/// used only when it carries the Sprite's UID label.
pub fn default_vm_name(namespace: &str, name: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = hex::encode(Sha256::digest(format!("{namespace}/{name}").as_bytes()));
    let hash = &digest[..VM_NAME_HASH_LEN];
    let readable: String = format!("{namespace}-{name}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(VM_NAME_MAX - VM_NAME_HASH_LEN - 1)
        .collect();
    let readable = readable.trim_matches('-');
    if readable.is_empty() {
        return hash.to_string();
    }
    format!("{readable}-{hash}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_vm_names_keep_namespaces_apart() {
        let a = default_vm_name("acme", "corp-alice-primary");
        let b = default_vm_name("acme-corp", "alice-primary");
        assert_ne!(a, b);
        assert!(a.starts_with("acme-corp-alice-primary-"), "{a}");
        for n in [&a, &b] {
            assert!(n.len() <= 63, "{n}");
            assert!(
                n.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
                "{n}"
            );
        }
        let long = default_vm_name(&"n".repeat(63), &format!("{}.x", "s".repeat(250)));
        assert_eq!(long.len(), 63);
        assert!(!long.contains('.') && !long.starts_with('-'));
        assert_ne!(
            long,
            default_vm_name(&"n".repeat(63), &format!("{}.y", "s".repeat(250)))
        );
    }

    #[test]
    fn an_explicit_or_recorded_name_wins() {
        let mut s: Sprite = serde_json::from_value(serde_json::json!({
            "apiVersion": "sprite-operator.dev/v1alpha1", "kind": "Sprite",
            "metadata": {"name": "x", "namespace": "ns"}, "spec": {"userRef": {"name": "u"}}
        }))
        .unwrap();
        assert_eq!(s.vm_name(), default_vm_name("ns", "x"));
        s.status = Some(SpriteStatus {
            sprite_name: Some("ns-x".into()),
            ..Default::default()
        });
        assert_eq!(s.vm_name(), "ns-x");
        s.spec.sprite_name = Some("chosen".into());
        assert_eq!(s.vm_name(), "chosen");
    }
}
