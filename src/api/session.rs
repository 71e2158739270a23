//! The session Lease: how the relay tells the controller that a browser
//! session keeps a Sprite's VM awake, without any write access to Sprites.
//!
//! While a session is live the relay keeps one `coordination.k8s.io/v1`
//! Lease per Sprite renewed. The Lease lives in the relay's lease namespace
//! (the chart's release namespace) or, without one, in the Sprite's own; its
//! name is derived from the Sprite, so the controller reads exactly the
//! Lease that can speak for a Sprite and nothing a tenant labelled alike.

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::ObjectMeta;
use sha2::{Digest, Sha256};

/// Label on every session Lease: the controller watches only these.
pub const SESSION_LABEL: &str = "sprite-operator.dev/session";
/// Annotation counting the upstream connections the relay made in this run
/// of sessions: each may have woken the VM (decision 3).
pub const CONNECTS_ANNOTATION: &str = "sprite-operator.dev/upstream-connects";
/// Annotation naming the Sprite as `<namespace>/<name>`, for mapping a
/// Lease event to its Sprite (a Sprite's name may be longer than a label).
pub const SPRITE_ANNOTATION: &str = "sprite-operator.dev/sprite";

/// `sprite-session-` and 20 hex digits of SHA-256 over `<namespace>/<name>`:
/// short, valid whatever the Sprite's name, and different for
/// `acme`/`corp-x` and `acme-corp`/`x`.
pub fn lease_name(namespace: &str, sprite: &str) -> String {
    let digest = hex::encode(Sha256::digest(format!("{namespace}/{sprite}").as_bytes()));
    format!("sprite-session-{}", &digest[..20])
}

/// The namespace the Lease of a Sprite in `sprite_namespace` lives in.
pub fn lease_namespace<'a>(configured: Option<&'a str>, sprite_namespace: &'a str) -> &'a str {
    configured.unwrap_or(sprite_namespace)
}

/// The Lease that says sessions of (namespace, sprite) have been live since
/// `acquired` and are until `now + duration`. The controller bills the time
/// between `acquired` and the last renewal.
pub fn lease(
    lease_namespace: &str,
    namespace: &str,
    sprite: &str,
    holder: &str,
    acquired: Timestamp,
    now: Timestamp,
    duration: std::time::Duration,
) -> Lease {
    Lease {
        metadata: ObjectMeta {
            name: Some(lease_name(namespace, sprite)),
            namespace: Some(lease_namespace.into()),
            labels: Some([(SESSION_LABEL.to_string(), "true".to_string())].into()),
            annotations: Some([(SPRITE_ANNOTATION.to_string(), format!("{namespace}/{sprite}"))].into()),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(i32::try_from(duration.as_secs()).unwrap_or(i32::MAX)),
            acquire_time: Some(MicroTime(acquired)),
            renew_time: Some(MicroTime(now)),
            ..Default::default()
        }),
    }
}

/// Records the run's upstream connects on a Lease.
pub fn set_connects(lease: &mut Lease, connects: u32) {
    lease
        .metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert(CONNECTS_ANNOTATION.to_string(), connects.to_string());
}

/// The Sprite a session Lease speaks for, from its annotation.
pub fn sprite_of(lease: &Lease) -> Option<(String, String)> {
    let value = lease.metadata.annotations.as_ref()?.get(SPRITE_ANNOTATION)?;
    let (ns, name) = value.split_once('/')?;
    Some((ns.to_string(), name.to_string()))
}

/// What a session Lease says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Live {
    /// Start of this run of sessions.
    pub acquired: Timestamp,
    /// Sessions were live at least until here.
    pub renewed: Timestamp,
    /// They may be live until here; after it, the run has ended.
    pub until: Timestamp,
    /// Upstream connections made in the run (each may have woken the VM).
    pub connects: u32,
}

/// What the Lease says, if it says anything.
pub fn live(lease: &Lease) -> Option<Live> {
    let spec = lease.spec.as_ref()?;
    // Whole seconds: what accounting records of them goes through status's
    // `Time`, which keeps no more, and a run is recognised by its start.
    let second = |t: Timestamp| Timestamp::from_second(t.as_second()).unwrap_or(t);
    let renewed = second(spec.renew_time.as_ref()?.0);
    let acquired = second(spec.acquire_time.as_ref().map_or(renewed, |t| t.0)).min(renewed);
    let secs = i64::from(spec.lease_duration_seconds?.max(0));
    let until = renewed.checked_add(jiff::SignedDuration::from_secs(secs)).ok()?;
    let connects = lease
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(CONNECTS_ANNOTATION))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Some(Live {
        acquired,
        renewed,
        until,
        connects,
    })
}

/// Until when the Lease says a session is live, if it says so at all.
pub fn live_until(lease: &Lease) -> Option<Timestamp> {
    live(lease).map(|l| l.until)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_differ_where_dash_joined_names_collide() {
        assert_ne!(lease_name("acme", "corp-x"), lease_name("acme-corp", "x"));
        assert_eq!(lease_name("a", "b").len(), "sprite-session-".len() + 20);
    }

    #[test]
    fn a_lease_round_trips_its_sprite_and_expiry() {
        let now: Timestamp = "2026-03-01T10:00:00Z".parse().unwrap();
        let start: Timestamp = "2026-03-01T09:30:00Z".parse().unwrap();
        let l = lease(
            "ops",
            "acme",
            "alice.primary",
            "relay-0",
            start,
            now,
            std::time::Duration::from_secs(120),
        );
        assert_eq!(live(&l).unwrap().acquired, start);
        // Accounting keys a run by its start in whole seconds.
        let fine = lease(
            "ops",
            "a",
            "b",
            "r",
            start + jiff::SignedDuration::from_millis(250),
            now,
            std::time::Duration::from_secs(1),
        );
        assert_eq!(live(&fine).unwrap().acquired, start);
        assert_eq!(l.metadata.namespace.as_deref(), Some("ops"));
        assert_eq!(sprite_of(&l), Some(("acme".into(), "alice.primary".into())));
        assert_eq!(live_until(&l), Some("2026-03-01T10:02:00Z".parse().unwrap()));
        let mut stale = l.clone();
        stale.spec.as_mut().unwrap().renew_time = None;
        assert_eq!(live_until(&stale), None);
        // The API's wire form of renewTime is RFC 3339 with microseconds.
        let json = serde_json::to_value(&l).unwrap();
        assert_eq!(json["spec"]["renewTime"], "2026-03-01T10:00:00.000000Z");
    }
}
