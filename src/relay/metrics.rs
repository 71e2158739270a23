//! Prometheus metrics of the relay, served on `/metrics`. Labels are fixed
//! strings: no user, Sprite or token ever becomes a label value.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pub sessions_active: Gauge,
    pub sessions: Counter,
    pub refusals: Family<ReasonLabels, Counter>,
    pub session_ends: Family<ReasonLabels, Counter>,
    pub upstream_connects: Family<OutcomeLabels, Counter>,
    pub upstream_drops: Counter,
    pub resent_frames: Counter,
    pub frames: Family<DirectionLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("sprite_operator_relay");
        let m = Metrics {
            sessions_active: Gauge::default(),
            sessions: Counter::default(),
            refusals: Family::default(),
            session_ends: Family::default(),
            upstream_connects: Family::default(),
            upstream_drops: Counter::default(),
            resent_frames: Counter::default(),
            frames: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "sessions_active",
            "Browser sessions open now",
            m.sessions_active.clone(),
        );
        registry.register("sessions", "Browser sessions accepted", m.sessions.clone());
        registry.register(
            "refusals",
            "Connections refused before any upstream work, by reason",
            m.refusals.clone(),
        );
        registry.register(
            "session_ends",
            "Sessions ended, by reason",
            m.session_ends.clone(),
        );
        registry.register(
            "upstream_connects",
            "Connections to runtimes (each wakes a VM), by outcome",
            m.upstream_connects.clone(),
        );
        registry.register(
            "upstream_drops",
            "Upstream connections lost while the browser was active (e.g. the VM slept)",
            m.upstream_drops.clone(),
        );
        registry.register(
            "resent_frames",
            "Unacknowledged frames sent again after a reconnect",
            m.resent_frames.clone(),
        );
        registry.register("frames", "Frames relayed, by direction", m.frames.clone());
        Metrics { registry, ..m }
    }
}

impl Metrics {
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_with_prefix() {
        let m = Metrics::default();
        m.refusals
            .get_or_create(&ReasonLabels {
                reason: "unauthorized",
            })
            .inc();
        let text = m.encode();
        assert!(
            text.contains("sprite_operator_relay_refusals_total{reason=\"unauthorized\"} 1"),
            "{text}"
        );
        assert!(text.contains("sprite_operator_relay_sessions_active"));
    }
}
