//! The operator's configuration: tiers (limits and rates), pip arguments for
//! bootstrap, and accounting knobs. Loaded from a YAML file (rendered by the
//! Helm chart from its values) over built-in defaults.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::api::Tier;
use crate::money::MicroUsd;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct OperatorConfig {
    /// Limits and billing rate of each tier.
    pub tiers: BTreeMap<Tier, TierLimits>,
    /// Extra arguments of every `pip install` in a VM, e.g. `--no-index
    /// --find-links /wheels` where VMs have no package index (decision 15).
    pub pip_args: Vec<String>,
    /// Active time counted after each wake before the VM falls asleep again
    /// (Sprites.dev sleeps ~30 s after the last activity).
    #[serde(with = "humantime_serde_compat")]
    pub idle_tail: Duration,
    /// Which Secrets a Sprite's `server.env` may name.
    pub secret_references: SecretReferences,
    /// How often every VM's metadata is listed (one paginated list for the
    /// whole fleet, decision 3); a VM that changed in between is noticed
    /// within this.
    #[serde(with = "humantime_serde_compat")]
    pub vm_list_interval: Duration,
    /// A converged Sprite or User is looked at again this often without an
    /// event (its reconcile then reads caches only).
    #[serde(with = "humantime_serde_compat")]
    pub resync: Duration,
    /// Reconciles of each kind (Sprite, User) running at once.
    pub reconcile_concurrency: u16,
    /// Steps that provision (create, bootstrap, update) running at once
    /// across the fleet: a new fleet or a new runtime version moves in
    /// waves, not all at once.
    pub max_concurrent_provisioning: usize,
    /// Calls to Sprites.dev per second, and the burst allowed above it
    /// (a client-side token bucket; 429 and Retry-After are honoured besides).
    pub sprites_api_rate: u32,
    pub sprites_api_burst: u32,
}

/// The platform team's rule for Secrets that Sprites name: the controller
/// reads them on a tenant's behalf, so a tenant who may create Sprites but
/// not read Secrets must not get a Secret's value into its VM by naming it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct SecretReferences {
    /// `key=value` (or just `key`) that a named Secret must carry; empty:
    /// any Secret but those that are never allowed (a User's gateway Secret,
    /// a service-account token).
    pub required_label: String,
}

impl Default for SecretReferences {
    fn default() -> Self {
        Self {
            required_label: format!("{}=true", crate::api::sprite::SPRITE_ENV_LABEL),
        }
    }
}

impl SecretReferences {
    /// The label's key and, when one is required, its value.
    pub fn required(&self) -> Option<(&str, Option<&str>)> {
        let rule = self.required_label.trim();
        if rule.is_empty() {
            return None;
        }
        Some(match rule.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (rule, None),
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TierLimits {
    /// Sprites a User of this tier may have provisioned at once.
    pub max_sprites: u32,
    /// Shortest allowed time between two heartbeats; closer ticks are skipped.
    #[serde(with = "humantime_serde_compat")]
    pub min_heartbeat_interval: Duration,
    /// Active VM time a month (e.g. `100h`); absent is unlimited.
    #[serde(default, with = "humantime_serde_opt")]
    pub monthly_runtime: Option<Duration>,
    /// How long a VM may stay idle (used by the relay's keepalive).
    #[serde(with = "humantime_serde_compat")]
    pub idle_timeout: Duration,
    /// Billing rate in USD per active hour, as a decimal string.
    pub rate_per_hour_usd: String,
}

impl TierLimits {
    pub fn rate(&self) -> MicroUsd {
        // Validated when the config is loaded.
        self.rate_per_hour_usd.parse().unwrap_or(MicroUsd::ZERO)
    }

    pub fn monthly_budget_seconds(&self) -> Option<i64> {
        self.monthly_runtime.map(|d| d.as_secs() as i64)
    }
}

impl Default for OperatorConfig {
    fn default() -> Self {
        let tier = |max_sprites, interval_min: u64, hours: Option<u64>, idle_s: u64| TierLimits {
            max_sprites,
            min_heartbeat_interval: Duration::from_secs(interval_min * 60),
            monthly_runtime: hours.map(|h| Duration::from_secs(h * 3600)),
            idle_timeout: Duration::from_secs(idle_s),
            // Sprites.dev's active rate for a 4 GB VM (seed 001).
            rate_per_hour_usd: "0.18".into(),
        };
        let tiers = BTreeMap::from([
            (Tier::Free, tier(1, 60, Some(10), 30)),
            (Tier::Starter, tier(2, 15, Some(100), 60)),
            (Tier::Growth, tier(4, 5, Some(400), 300)),
            (Tier::Enterprise, tier(10, 1, None, 3600)),
        ]);
        OperatorConfig {
            tiers,
            pip_args: vec![],
            idle_tail: Duration::from_secs(30),
            secret_references: SecretReferences::default(),
            vm_list_interval: Duration::from_secs(60),
            resync: Duration::from_secs(300),
            reconcile_concurrency: 16,
            max_concurrent_provisioning: 8,
            sprites_api_rate: 20,
            sprites_api_burst: 40,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("invalid config {path}: {message}")]
    Invalid { path: String, message: String },
}

impl OperatorConfig {
    /// Reads `path` over the defaults: tiers named in the file replace the
    /// default of that tier; unnamed tiers keep their defaults.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_yaml(&text).map_err(|message| ConfigError::Invalid {
            path: path.display().to_string(),
            message,
        })
    }

    pub fn from_yaml(text: &str) -> Result<Self, String> {
        let partial: PartialConfig = serde_saphyr::from_str(text).map_err(|e| e.to_string())?;
        let mut cfg = OperatorConfig::default();
        cfg.tiers.extend(partial.tiers);
        if let Some(p) = partial.pip_args {
            cfg.pip_args = p;
        }
        if let Some(d) = partial.resync {
            cfg.resync = humantime::parse_duration(&d).map_err(|e| format!("resync: {e}"))?;
        }
        if let Some(n) = partial.reconcile_concurrency {
            cfg.reconcile_concurrency = n;
        }
        if let Some(n) = partial.max_concurrent_provisioning {
            cfg.max_concurrent_provisioning = n;
        }
        if let Some(r) = partial.sprites_api_rate {
            cfg.sprites_api_rate = r;
        }
        if let Some(b) = partial.sprites_api_burst {
            cfg.sprites_api_burst = b;
        }
        if let Some(d) = partial.vm_list_interval {
            cfg.vm_list_interval =
                humantime::parse_duration(&d).map_err(|e| format!("vmListInterval: {e}"))?;
        }
        if let Some(r) = partial.secret_references {
            cfg.secret_references = r;
        }
        if let Some(d) = partial.idle_tail {
            cfg.idle_tail = humantime::parse_duration(&d).map_err(|e| format!("idleTail: {e}"))?;
        }
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), String> {
        for (tier, limits) in &self.tiers {
            limits
                .rate_per_hour_usd
                .parse::<MicroUsd>()
                .map_err(|e| format!("tiers.{}.ratePerHourUsd: {e}", tier.as_str()))?;
        }
        if self.reconcile_concurrency == 0 || self.max_concurrent_provisioning == 0 {
            return Err("reconcileConcurrency and maxConcurrentProvisioning must be at least 1".into());
        }
        if self.sprites_api_rate == 0 || self.sprites_api_burst == 0 {
            return Err("spritesApiRate and spritesApiBurst must be at least 1".into());
        }
        if self.resync.is_zero() || self.vm_list_interval.is_zero() {
            return Err("resync and vmListInterval must be positive".into());
        }
        Ok(())
    }

    /// pip installs from a local wheelhouse only (decision 15): for VMs with
    /// no route to a package index.
    pub fn with_wheelhouse(mut self, dir: &Path) -> Self {
        self.pip_args = vec![
            "--no-index".into(),
            "--find-links".into(),
            dir.display().to_string(),
        ];
        self
    }

    pub fn tier(&self, tier: Tier) -> &TierLimits {
        // Every tier has a default entry and entries are only ever replaced.
        &self.tiers[&tier]
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PartialConfig {
    #[serde(default)]
    tiers: BTreeMap<Tier, TierLimits>,
    #[serde(default)]
    pip_args: Option<Vec<String>>,
    #[serde(default)]
    idle_tail: Option<String>,
    #[serde(default)]
    secret_references: Option<SecretReferences>,
    #[serde(default)]
    vm_list_interval: Option<String>,
    #[serde(default)]
    resync: Option<String>,
    #[serde(default)]
    reconcile_concurrency: Option<u16>,
    #[serde(default)]
    max_concurrent_provisioning: Option<usize>,
    #[serde(default)]
    sprites_api_rate: Option<u32>,
    #[serde(default)]
    sprites_api_burst: Option<u32>,
}

/// Optional durations as humantime strings.
mod humantime_serde_opt {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&humantime::format_duration(*d).to_string()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        match Option::<String>::deserialize(d)? {
            Some(s) => humantime::parse_duration(&s)
                .map(Some)
                .map_err(serde::de::Error::custom),
            None => Ok(None),
        }
    }
}

/// Durations as humantime strings (`15m`, `30s`) in the config file.
mod humantime_serde_compat {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_cover_every_tier_and_grow_with_it() {
        let c = OperatorConfig::default();
        let sprites: Vec<u32> = Tier::ALL.iter().map(|t| c.tier(*t).max_sprites).collect();
        assert_eq!(sprites, [1, 2, 4, 10]);
        assert!(c.tier(Tier::Free).min_heartbeat_interval > c.tier(Tier::Enterprise).min_heartbeat_interval);
        assert_eq!(c.tier(Tier::Enterprise).monthly_budget_seconds(), None);
        assert_eq!(c.tier(Tier::Starter).monthly_budget_seconds(), Some(100 * 3600));
        assert_eq!(c.tier(Tier::Starter).rate(), MicroUsd(180_000));
    }

    #[test]
    fn a_file_overrides_named_tiers_only() {
        let c = OperatorConfig::from_yaml(
            "tiers:\n  starter:\n    maxSprites: 3\n    minHeartbeatInterval: 10m\n    monthlyRuntime: 90m\n    idleTimeout: 45s\n    ratePerHourUsd: \"0.36\"\npipArgs: [--no-index, --find-links, /wheels]\nidleTail: 10s\n",
        )
        .unwrap();
        assert_eq!(c.tier(Tier::Starter).max_sprites, 3);
        assert_eq!(
            c.tier(Tier::Starter).min_heartbeat_interval,
            Duration::from_secs(600)
        );
        assert_eq!(c.tier(Tier::Starter).rate(), MicroUsd(360_000));
        assert_eq!(c.tier(Tier::Growth), OperatorConfig::default().tier(Tier::Growth));
        assert_eq!(c.pip_args, ["--no-index", "--find-links", "/wheels"]);
        assert_eq!(c.idle_tail, Duration::from_secs(10));
    }

    #[test]
    fn bad_files_are_clear_errors() {
        let e = OperatorConfig::from_yaml("tiers:\n  platinum: {}\n").unwrap_err();
        assert!(e.contains("platinum"), "{e}");
        let e = OperatorConfig::from_yaml(
            "tiers:\n  free:\n    maxSprites: 1\n    minHeartbeatInterval: 1h\n    idleTimeout: 30s\n    ratePerHourUsd: cheap\n",
        )
        .unwrap_err();
        assert!(e.contains("tiers.free.ratePerHourUsd"), "{e}");
        let e = OperatorConfig::from_yaml("unknownKey: 1\n").unwrap_err();
        assert!(e.contains("unknownKey"), "{e}");
    }
}
