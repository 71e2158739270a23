//! What every reconcile shares: clients, configuration, clock, metrics.

use std::sync::Arc;

use jiff::Timestamp;

use kube::runtime::events::{Recorder, Reporter};

use crate::config::OperatorConfig;
use crate::sprites::SpritesClient;

use super::metrics::Metrics;

/// The controller's notion of now. Injectable so that tests can run a
/// simulated day of heartbeats in seconds (decision 10).
pub trait Clock: Send + Sync {
    fn now(&self) -> Timestamp;
}

pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::now()
    }
}

/// The system clock moved by an adjustable offset: lets a test (or a demo)
/// jump to the end of the month while everything else keeps real pace.
#[derive(Default)]
pub struct OffsetClock {
    offset_secs: std::sync::atomic::AtomicI64,
}

impl OffsetClock {
    pub fn set_offset(&self, offset: jiff::SignedDuration) {
        self.offset_secs
            .store(offset.as_secs(), std::sync::atomic::Ordering::SeqCst);
    }
}

impl Clock for OffsetClock {
    fn now(&self) -> Timestamp {
        let secs = self.offset_secs.load(std::sync::atomic::Ordering::SeqCst);
        Timestamp::now() + jiff::SignedDuration::from_secs(secs)
    }
}

pub struct Context {
    pub client: kube::Client,
    /// Publishes an Event for each transition (`kubectl describe sprite`).
    pub recorder: kube::runtime::events::Recorder,
    pub sprites: SpritesClient,
    pub config: OperatorConfig,
    pub clock: Arc<dyn Clock>,
    pub metrics: Arc<Metrics>,
}

impl Context {
    pub fn new(
        client: kube::Client,
        sprites: SpritesClient,
        config: OperatorConfig,
        clock: Arc<dyn Clock>,
    ) -> Context {
        let reporter = Reporter {
            controller: "sprite-operator".into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            sprites,
            config,
            clock,
            metrics: Arc::new(Metrics::default()),
        }
    }
}
