//! What every reconcile shares: clients, configuration, clock, metrics.

use std::sync::Arc;

use jiff::Timestamp;

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
    pub sprites: SpritesClient,
    pub config: OperatorConfig,
    pub clock: Arc<dyn Clock>,
    pub metrics: Arc<Metrics>,
}
