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
