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
    /// Per Sprite: the last write and its run of sessions.
    written: Mutex<HashMap<(String, String), Written>>,
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

    /// Whether the lease of (namespace, sprite) is due for a write at `now`
    /// (always, after an upstream connect: `connected`), recording the write
    /// when it is; with when its run of sessions began (`wall` when the last
    /// write has run out: a new run) and the upstream connects of the run.
    fn due(&self, key: (&str, &str), now: Instant, wall: jiff::Timestamp, connected: bool) -> Option<Run> {
        let mut written = self.written.lock().unwrap_or_else(|p| p.into_inner());
        let key = (key.0.to_string(), key.1.to_string());
        let run = match written.get(&key) {
            Some(w) if !connected && now.duration_since(w.at) < self.refresh => return None,
            Some(w) if now.duration_since(w.at) < self.lease => w.run,
            _ => Run {
                acquired: wall,
                connects: 0,
            },
        };
        let run = Run {
            connects: run.connects + u32::from(connected),
            ..run
        };
        // Forget leases that have run out, so the map only holds live Sprites.
        if written.len() > 1024 {
            let lease = self.lease;
            written.retain(|_, w| now.duration_since(w.at) < lease);
        }
        written.insert(key, Written { at: now, run });
        Some(run)
    }

    /// Renews the Sprite's Lease if no session of it did recently. The
    /// write runs in the background: a session never waits for it.
    pub fn touch(&self, namespace: &str, sprite: &str) {
        self.write(namespace, sprite, false);
    }

    /// An upstream connection to the Sprite's VM was made (it may have woken
    /// the VM): counted in the Lease, written now.
    pub fn connected(&self, namespace: &str, sprite: &str) {
        self.write(namespace, sprite, true);
    }

    fn write(&self, namespace: &str, sprite: &str, connected: bool) {
        let Some((client, runtime)) = self.client.clone() else {
            return;
        };
        let now = jiff::Timestamp::now();
        let Some(run) = self.due((namespace, sprite), Instant::now(), now, connected) else {
            return;
        };
        let lease_ns = session::lease_namespace(self.namespace.as_deref(), namespace);
        let mut body = session::lease(
            lease_ns,
            namespace,
            sprite,
            &self.holder,
            run.acquired,
            now,
            self.lease,
        );
        session::set_connects(&mut body, run.connects);
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

/// A run of sessions of one Sprite, as this relay has seen it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Run {
    acquired: jiff::Timestamp,
    connects: u32,
}

struct Written {
    at: Instant,
    run: Run,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_write_per_refresh_interval_per_sprite_and_at_once_per_connect() {
        let l = Leases::new(None, None, Duration::from_secs(120), Duration::from_secs(60));
        let t0 = Instant::now();
        let w0: jiff::Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let at = |s: u64| {
            (
                t0 + Duration::from_secs(s),
                w0 + jiff::SignedDuration::from_secs(s as i64),
            )
        };
        let due = |s: u64, connected: bool| {
            let (i, w) = at(s);
            l.due(("ns", "a"), i, w, connected)
        };
        let run = |acquired, connects| Some(Run { acquired, connects });
        assert_eq!(due(0, true), run(w0, 1));
        assert_eq!(due(30, false), None);
        // A reconnect is written at once and counted.
        assert_eq!(due(31, true), run(w0, 2));
        let (i, w) = at(30);
        assert_eq!(l.due(("ns", "b"), i, w, false), run(w, 0));
        // Renewed within the lease: the same run of sessions.
        assert_eq!(due(92, false), run(w0, 2));
        // Not renewed for longer than the lease: a new run.
        assert_eq!(due(92 + 121, false), run(at(213).1, 0));
    }
}
