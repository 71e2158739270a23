//! The simulated VMs: metadata that survives restarts (a JSON file), power state (running, warm,
//! cold) and wake counts, which do not.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use crate::sprites::{Checkpoint, Sprite, SpriteConfig, UrlSettings};

pub const STATE_FILE: &str = "state.json";

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("{path} is not valid state JSON: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// What is kept of a VM across restarts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmMeta {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub labels: Vec<String>,
    #[serde(default)]
    pub config: SpriteConfig,
    #[serde(default)]
    pub url_settings: UrlSettings,
    pub created_at: String,
    pub updated_at: String,
    #[serde(default)]
    pub checkpoints: Vec<Checkpoint>,
    #[serde(default = "one")]
    pub next_checkpoint: u32,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct StateFile {
    vms: Vec<VmMeta>,
}

pub fn load(data_dir: &Path) -> Result<Vec<VmMeta>, StateError> {
    let path = data_dir.join(STATE_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice::<StateFile>(&bytes)
            .map(|s| s.vms)
            .map_err(|source| StateError::Parse { path, source }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(source) => Err(StateError::Read { path, source }),
    }
}

/// Writes the state file atomically (temp file, then rename).
pub fn save(data_dir: &Path, vms: &[VmMeta]) -> Result<(), StateError> {
    let path = data_dir.join(STATE_FILE);
    let tmp = data_dir.join(format!("{STATE_FILE}.tmp"));
    let bytes =
        serde_json::to_vec_pretty(&StateFile { vms: vms.to_vec() }).map_err(|e| StateError::Write {
            path: path.clone(),
            source: std::io::Error::other(e),
        })?;
    std::fs::write(&tmp, bytes).map_err(|source| StateError::Write {
        path: tmp.clone(),
        source,
    })?;
    std::fs::rename(&tmp, &path).map_err(|source| StateError::Write { path, source })
}

/// Names as the service takes them: a DNS label.
pub fn valid_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-'
}

/// RFC 3339 with `Z` and microseconds (sprites-py on Python 3.9/3.10 rejects nanoseconds).
pub fn rfc3339(t: SystemTime) -> String {
    let ts = jiff::Timestamp::try_from(t).unwrap_or(jiff::Timestamp::UNIX_EPOCH);
    jiff::fmt::temporal::DateTimePrinter::new()
        .precision(Some(6))
        .timestamp_to_string(&ts)
}

pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Power {
    Running,
    Warm,
    Cold,
}

impl Power {
    pub fn as_str(self) -> &'static str {
        match self {
            Power::Running => "running",
            Power::Warm => "warm",
            Power::Cold => "cold",
        }
    }
}

/// Inputs of the idle check for one VM.
#[derive(Debug, Clone, Copy)]
pub struct PowerView {
    pub power: Power,
    /// When `power` was entered.
    pub since: Instant,
    pub last_activity: Instant,
    /// Live exec sockets and proxy connections.
    pub active: usize,
    /// A wake in progress completes at this instant.
    pub ready_at: Instant,
}

/// The power state a VM moves to now, if any: idle running VMs suspend (warm), long-suspended
/// ones go cold.
pub fn next_power(
    v: &PowerView,
    now: Instant,
    idle_timeout: Duration,
    cold_after: Duration,
) -> Option<Power> {
    match v.power {
        Power::Running
            if v.active == 0 && now >= v.ready_at && now.duration_since(v.last_activity) >= idle_timeout =>
        {
            Some(Power::Warm)
        }
        Power::Warm if now.duration_since(v.since) >= cold_after => Some(Power::Cold),
        _ => None,
    }
}

/// Why a VM was woken, as counted in `/sim/stats`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Cause {
    Exec,
    Fs,
    Proxy,
    Checkpoint,
}

impl Cause {
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::Exec => "exec",
            Cause::Fs => "fs",
            Cause::Proxy => "proxy",
            Cause::Checkpoint => "checkpoint",
        }
    }
}

/// One VM while the simulator runs.
#[derive(Debug)]
pub struct Vm {
    pub meta: VmMeta,
    pub power: Power,
    pub since: Instant,
    pub last_activity: Instant,
    pub ready_at: Instant,
    pub active: usize,
    pub wakes: BTreeMap<&'static str, u64>,
    pub last_running_at: Option<SystemTime>,
    pub last_warming_at: Option<SystemTime>,
    /// Bumped at every sleep; proxied connections watch it and end.
    pub sleeps: tokio::sync::watch::Sender<u64>,
}

impl Vm {
    /// A VM as found after start-up or creation: cold, no processes.
    pub fn new(meta: VmMeta, now: Instant) -> Self {
        Self {
            meta,
            power: Power::Cold,
            since: now,
            last_activity: now,
            ready_at: now,
            active: 0,
            wakes: BTreeMap::new(),
            last_running_at: None,
            last_warming_at: None,
            sleeps: tokio::sync::watch::channel(0).0,
        }
    }

    pub fn view(&self) -> PowerView {
        PowerView {
            power: self.power,
            since: self.since,
            last_activity: self.last_activity,
            active: self.active,
            ready_at: self.ready_at,
        }
    }

    /// Records activity; wakes a sleeping VM and returns when it is ready.
    pub fn touch(&mut self, cause: Cause, now: Instant, wake_delay: Duration) -> Instant {
        self.last_activity = now;
        if self.power != Power::Running {
            self.power = Power::Running;
            self.since = now;
            self.ready_at = now + wake_delay;
            self.last_running_at = Some(SystemTime::now());
            *self.wakes.entry(cause.as_str()).or_insert(0) += 1;
            tracing::info!(sprite = %self.meta.name, cause = cause.as_str(), "sim VM woken");
        }
        self.ready_at
    }

    pub fn set_power(&mut self, power: Power, now: Instant) {
        if power == self.power {
            return;
        }
        if power == Power::Warm {
            self.last_warming_at = Some(SystemTime::now());
        }
        if self.power == Power::Running {
            // Cut proxied connections: on the real service they die when the VM suspends.
            self.sleeps.send_modify(|n| *n += 1);
        }
        tracing::info!(sprite = %self.meta.name, from = self.power.as_str(), to = power.as_str(), "sim VM power");
        self.power = power;
        self.since = now;
    }

    pub fn total_wakes(&self) -> u64 {
        self.wakes.values().sum()
    }

    /// The sprite object as the API shows it.
    pub fn to_sprite(&self) -> Sprite {
        let m = &self.meta;
        Sprite {
            id: m.id.clone(),
            name: m.name.clone(),
            organization: "sim".into(),
            status: self.power.as_str().into(),
            config: m.config.clone(),
            environment: BTreeMap::new(),
            created_at: Some(m.created_at.clone()),
            updated_at: Some(m.updated_at.clone()),
            url: format!("https://{}.sim.invalid", m.name),
            url_settings: m.url_settings.clone(),
            labels: m.labels.clone(),
            last_running_at: self.last_running_at.map(rfc3339),
            last_warming_at: self.last_warming_at.map(rfc3339),
        }
    }
}

/// The directories of one VM under the data dir.
#[derive(Debug, Clone)]
pub struct VmPaths {
    pub root: PathBuf,
}

impl VmPaths {
    pub fn new(data_dir: &Path, name: &str) -> Self {
        Self {
            root: data_dir.join("vms").join(name),
        }
    }
    pub fn workspace(&self) -> PathBuf {
        self.root.join("workspace")
    }
    pub fn checkpoints(&self) -> PathBuf {
        self.root.join("checkpoints")
    }
    pub fn checkpoint(&self, id: &str) -> PathBuf {
        self.checkpoints().join(id)
    }
    pub fn netns(&self) -> PathBuf {
        self.root.join("netns")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(valid_name("a"));
        assert!(valid_name("team-a-sprite-1"));
        for bad in ["", "-a", "a-", "A", "a_b", "a/b", "a.b", &"x".repeat(64)] {
            assert!(!valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn power_transitions() {
        let t0 = Instant::now();
        let idle = Duration::from_secs(30);
        let cold = Duration::from_secs(300);
        let running = PowerView {
            power: Power::Running,
            since: t0,
            last_activity: t0,
            active: 0,
            ready_at: t0,
        };
        assert_eq!(
            next_power(&running, t0 + Duration::from_secs(29), idle, cold),
            None
        );
        assert_eq!(next_power(&running, t0 + idle, idle, cold), Some(Power::Warm));
        let busy = PowerView { active: 1, ..running };
        assert_eq!(next_power(&busy, t0 + idle * 10, idle, cold), None);
        let waking = PowerView {
            ready_at: t0 + idle * 2,
            ..running
        };
        assert_eq!(next_power(&waking, t0 + idle, idle, cold), None);
        let warm = PowerView {
            power: Power::Warm,
            ..running
        };
        assert_eq!(next_power(&warm, t0 + idle, idle, cold), None);
        assert_eq!(next_power(&warm, t0 + cold, idle, cold), Some(Power::Cold));
        let c = PowerView {
            power: Power::Cold,
            ..running
        };
        assert_eq!(next_power(&c, t0 + cold * 9, idle, cold), None);
    }

    #[test]
    fn touch_counts_wakes_once_per_sleep() {
        let t0 = Instant::now();
        let meta = VmMeta {
            id: "i".into(),
            name: "a".into(),
            labels: vec![],
            config: SpriteConfig::default(),
            url_settings: UrlSettings::default(),
            created_at: rfc3339(SystemTime::now()),
            updated_at: rfc3339(SystemTime::now()),
            checkpoints: vec![],
            next_checkpoint: 1,
        };
        let mut vm = Vm::new(meta, t0);
        let ready = vm.touch(Cause::Exec, t0, Duration::from_millis(300));
        assert_eq!(ready, t0 + Duration::from_millis(300));
        vm.touch(Cause::Fs, t0, Duration::from_millis(300));
        assert_eq!(vm.total_wakes(), 1);
        let rx = vm.sleeps.subscribe();
        vm.set_power(Power::Warm, t0);
        assert!(rx.has_changed().unwrap_or(false));
        vm.touch(Cause::Fs, t0, Duration::ZERO);
        assert_eq!(vm.wakes.get("fs"), Some(&1));
        assert_eq!(vm.to_sprite().status, "running");
    }

    #[test]
    fn state_file_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(load(dir.path()).expect("empty").is_empty());
        let meta = VmMeta {
            id: "i".into(),
            name: "a".into(),
            labels: vec!["k=v".into()],
            config: SpriteConfig::default(),
            url_settings: UrlSettings::default(),
            created_at: "2026-01-01T00:00:00.000000Z".into(),
            updated_at: "2026-01-01T00:00:00.000000Z".into(),
            checkpoints: vec![],
            next_checkpoint: 3,
        };
        save(dir.path(), std::slice::from_ref(&meta)).expect("save");
        assert_eq!(load(dir.path()).expect("load"), vec![meta]);
        std::fs::write(dir.path().join(STATE_FILE), b"{").expect("write");
        assert!(load(dir.path()).is_err());
    }

    #[test]
    fn timestamps_have_micros_and_z() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_nanos(1_500_000_123);
        assert_eq!(rfc3339(t), "1970-01-01T00:00:01.500000Z");
    }
}

#[cfg(test)]
mod rfc3339_tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn timestamps_have_exactly_microseconds_and_z() {
        let t = UNIX_EPOCH + Duration::from_nanos(1_700_000_000_123_456_789);
        assert_eq!(rfc3339(t), "2023-11-14T22:13:20.123456Z");
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000000Z");
    }
}
