//! The session lease: while a session is live the relay keeps a
//! `coordination.k8s.io` Lease of its Sprite renewed ([`crate::api::session`]),
//! so that the controller knows the VM is awake anyway (an `OnWake` update
//! may run now). The relay needs write access to those Leases only, never
//! to Sprites. Sessions of one Sprite share one Lease: it is written at most
//! once per refresh interval per Sprite, and a failed write only costs a log
//! line (the session goes on).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, Patch, PatchParams};

use crate::api::session;

/// Field manager of the relay's Lease writes.
const MANAGER: &str = "sprite-operator-relay";

pub struct Leases {
    /// With where its writes run (the relay's background runtime).
    client: Option<(kube::Client, tokio::runtime::Handle)>,
    /// Where the Leases live; None: in each Sprite's own namespace.
    namespace: Option<String>,
    /// Who holds the Leases (the relay pod).
    holder: String,
    /// How long a written Lease says the session lasts.
    pub lease: Duration,
    /// How often a live session renews it.
    pub refresh: Duration,
    /// Per Sprite: the last write, and when its run of sessions began.
    written: Mutex<HashMap<(String, String), (Instant, jiff::Timestamp)>>,
}

impl Leases {
    /// Without a client (a relay without a cluster) leases are not written.
    pub fn new(
        client: Option<(kube::Client, tokio::runtime::Handle)>,
        namespace: Option<String>,
        lease: Duration,
        refresh: Duration,
    ) -> Self {
        let holder = std::env::var("POD_NAME").unwrap_or_else(|_| "sprite-operator-relay".into());
        Self {
            client,
            namespace,
            holder,
            lease,
            refresh,
            written: Mutex::new(HashMap::new()),
        }
    }

    /// Whether the lease of (namespace, sprite) is due for a write at `now`,
    /// recording the write when it is; with when its run of sessions began
    /// (`wall` when the last write has run out: a new run).
    fn due(
        &self,
        namespace: &str,
        sprite: &str,
        now: Instant,
        wall: jiff::Timestamp,
    ) -> Option<jiff::Timestamp> {
        let mut written = self.written.lock().unwrap_or_else(|p| p.into_inner());
        let key = (namespace.to_string(), sprite.to_string());
        let acquired = match written.get(&key) {
            Some((t, _)) if now.duration_since(*t) < self.refresh => return None,
            Some((t, acquired)) if now.duration_since(*t) < self.lease => *acquired,
            _ => wall,
        };
        // Forget leases that have run out, so the map only holds live Sprites.
        if written.len() > 1024 {
            let lease = self.lease;
            written.retain(|_, (t, _)| now.duration_since(*t) < lease);
        }
        written.insert(key, (now, acquired));
        Some(acquired)
    }

    /// Renews the Sprite's Lease if no session of it did recently. The
    /// write runs in the background: a session never waits for it.
    pub fn touch(&self, namespace: &str, sprite: &str) {
        let Some((client, runtime)) = self.client.clone() else {
            return;
        };
        let now = jiff::Timestamp::now();
        let Some(acquired) = self.due(namespace, sprite, Instant::now(), now) else {
            return;
        };
        let lease_ns = session::lease_namespace(self.namespace.as_deref(), namespace);
        let body = session::lease(
            lease_ns,
            namespace,
            sprite,
            &self.holder,
            acquired,
            now,
            self.lease,
        );
        let api: Api<Lease> = Api::namespaced(client, lease_ns);
        let name = body.metadata.name.clone().unwrap_or_default();
        let sprite = format!("{namespace}/{sprite}");
        runtime.spawn(async move {
            // Server-side apply creates the Lease or renews it in one call.
            match api
                .patch(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&body))
                .await
            {
                Ok(_) => tracing::debug!(%sprite, lease = %name, "session lease renewed"),
                Err(e) => {
                    tracing::warn!(%sprite, lease = %name, error = %e, "cannot renew the session lease")
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_write_per_refresh_interval_per_sprite() {
        let l = Leases::new(None, None, Duration::from_secs(120), Duration::from_secs(60));
        let t0 = Instant::now();
        let w0: jiff::Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let at = |s: u64| {
            (
                t0 + Duration::from_secs(s),
                w0 + jiff::SignedDuration::from_secs(s as i64),
            )
        };
        let due = |s: u64| {
            let (i, w) = at(s);
            l.due("ns", "a", i, w)
        };
        assert_eq!(due(0), Some(w0));
        assert_eq!(due(30), None);
        let (i, w) = at(30);
        assert_eq!(l.due("ns", "b", i, w), Some(w));
        // Renewed within the lease: the same run of sessions.
        assert_eq!(due(61), Some(w0));
        // Not renewed for longer than the lease: a new run.
        assert_eq!(due(61 + 121), Some(at(182).1));
    }
}
