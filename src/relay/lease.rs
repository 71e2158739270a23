//! The session lease on a Sprite: while a session is live the relay keeps
//! the annotation `sprite-operator.dev/session-active-until` a short while in
//! the future, so that the controller knows the VM is awake anyway and may
//! run an `OnWake` update now. Sessions of one Sprite share one lease: the
//! annotation is patched at most once per refresh interval per Sprite, and a
//! failed patch only costs a log line (the session goes on).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kube::api::{Api, Patch, PatchParams};

use crate::api::Sprite;
use crate::api::sprite::SESSION_ANNOTATION;

pub struct Leases {
    /// With where its writes run (the relay's background runtime).
    client: Option<(kube::Client, tokio::runtime::Handle)>,
    /// How far ahead the annotation points.
    pub lease: Duration,
    /// How often a live session pushes it forward.
    pub refresh: Duration,
    written: Mutex<HashMap<(String, String), Instant>>,
}

/// The annotation's value: `now + lease` in RFC 3339 (UTC, whole seconds).
pub fn until(now: jiff::Timestamp, lease: Duration) -> String {
    let secs = i64::try_from(lease.as_secs()).unwrap_or(i64::MAX / 2);
    let t = jiff::Timestamp::from_second(now.as_second().saturating_add(secs)).unwrap_or(now);
    t.to_string()
}

/// The merge patch that sets the annotation.
pub fn patch_body(value: &str) -> serde_json::Value {
    serde_json::json!({"metadata": {"annotations": {SESSION_ANNOTATION: value}}})
}

impl Leases {
    /// Without a client (a relay without a cluster) leases are not written.
    pub fn new(
        client: Option<(kube::Client, tokio::runtime::Handle)>,
        lease: Duration,
        refresh: Duration,
    ) -> Self {
        Self {
            client,
            lease,
            refresh,
            written: Mutex::new(HashMap::new()),
        }
    }

    /// Whether the lease of (namespace, sprite) is due for a write at `now`,
    /// recording the write when it is.
    fn due(&self, namespace: &str, sprite: &str, now: Instant) -> bool {
        let mut written = self.written.lock().unwrap_or_else(|p| p.into_inner());
        let key = (namespace.to_string(), sprite.to_string());
        if written
            .get(&key)
            .is_some_and(|t| now.duration_since(*t) < self.refresh)
        {
            return false;
        }
        // Forget leases that have run out, so the map only holds live Sprites.
        if written.len() > 1024 {
            let lease = self.lease;
            written.retain(|_, t| now.duration_since(*t) < lease);
        }
        written.insert(key, now);
        true
    }

    /// Pushes the lease forward if no session of this Sprite did recently.
    /// The patch runs in the background: a session never waits for it.
    pub fn touch(&self, namespace: &str, sprite: &str) {
        let Some((client, runtime)) = self.client.clone() else {
            return;
        };
        if !self.due(namespace, sprite, Instant::now()) {
            return;
        }
        let value = until(jiff::Timestamp::now(), self.lease);
        let api: Api<Sprite> = Api::namespaced(client, namespace);
        let name = sprite.to_string();
        runtime.spawn(async move {
            match api
                .patch(&name, &PatchParams::default(), &Patch::Merge(patch_body(&value)))
                .await
            {
                Ok(_) => tracing::debug!(sprite = %name, until = %value, "session lease written"),
                Err(e) => tracing::warn!(sprite = %name, error = %e, "cannot write the session lease"),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn value_is_rfc3339_and_parses_back() {
        let now: jiff::Timestamp = "2025-03-01T10:00:00.5Z".parse().unwrap();
        let v = until(now, Duration::from_secs(120));
        assert_eq!(v, "2025-03-01T10:02:00Z");
        assert!(v.parse::<jiff::Timestamp>().unwrap() > now);
        assert_eq!(
            patch_body(&v)["metadata"]["annotations"][SESSION_ANNOTATION],
            "2025-03-01T10:02:00Z"
        );
    }

    #[test]
    fn one_write_per_refresh_interval_per_sprite() {
        let l = Leases::new(None, Duration::from_secs(120), Duration::from_secs(60));
        let t0 = Instant::now();
        assert!(l.due("ns", "a", t0));
        assert!(!l.due("ns", "a", t0 + Duration::from_secs(30)));
        assert!(l.due("ns", "b", t0 + Duration::from_secs(30)));
        assert!(l.due("ns", "a", t0 + Duration::from_secs(61)));
    }
}
