//! What every reconcile shares: clients, configuration, clock, metrics.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{ObjectRef, Store};

use kube::runtime::events::{Recorder, Reporter};

use crate::api::{Sprite, User};
use crate::config::OperatorConfig;
use crate::runtime::RuntimeBundle;
use crate::sprites::SpritesClient;

use super::metrics::Metrics;

/// The controller's notion of now. Injectable so that tests can run a
/// simulated day of heartbeats in seconds (decision 10).
pub trait Clock: Send + Sync {
    fn now(&self) -> Timestamp;

    /// Real time to wait for `d` of this clock's time to pass (requeues are
    /// real timers).
    fn to_real(&self, d: std::time::Duration) -> std::time::Duration {
        d
    }
}

/// A clock running `factor` times faster than real time from `start`: a
/// simulated hour of heartbeats passes in 3600/factor real seconds.
pub struct ScaledClock {
    real_start: Timestamp,
    sim_start: Timestamp,
    factor: u32,
}

impl ScaledClock {
    pub fn new(sim_start: Timestamp, factor: u32) -> ScaledClock {
        ScaledClock {
            real_start: Timestamp::now(),
            sim_start,
            factor: factor.max(1),
        }
    }
}

impl Clock for ScaledClock {
    fn now(&self) -> Timestamp {
        let real = Timestamp::now().duration_since(self.real_start);
        self.sim_start + real * self.factor as i32
    }

    fn to_real(&self, d: std::time::Duration) -> std::time::Duration {
        d / self.factor
    }
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
    /// VM metadata from the periodic list (decision 3).
    pub vms: super::vm_cache::VmCache,
    /// Where the relay writes session Leases; None: each Sprite's namespace.
    pub session_lease_namespace: Option<String>,
    /// The watch caches the reconcilers read instead of calling the API.
    pub stores: Stores,
    /// Permits for provisioning steps (create, bootstrap, update) across
    /// the fleet: `maxConcurrentProvisioning`.
    pub provisioning: tokio::sync::Semaphore,
    /// Users to look at again, from whichever namespace's controller holds
    /// them (a shared subject spans namespaces).
    pub user_rechecks: tokio::sync::broadcast::Sender<kube::runtime::reflector::ObjectRef<User>>,
}

/// Reflector stores that the controllers' watches fill ([`super::run`]
/// registers one of each kind per watched namespace), read instead of
/// calling the API: a converged Sprite costs no API call (issue 25).
#[derive(Default)]
pub struct Stores {
    pub users: Registry<User>,
    pub sprites: Registry<Sprite>,
    pub leases: Registry<Lease>,
    /// Metadata only: a runtime ConfigMap's resourceVersion says whether
    /// the bundle parsed from it is still current.
    pub config_maps: Registry<PartialObjectMeta<ConfigMap>>,
    /// Metadata only, of gateway Secrets and of Secrets Sprites may name.
    pub secrets: Registry<PartialObjectMeta<Secret>>,
    /// Runtime bundles by ConfigMap (namespace, name), with the
    /// resourceVersion they were parsed from.
    bundles: Mutex<HashMap<NsName, Versioned<Arc<RuntimeBundle>>>>,
    /// Gateway token hashes by Secret UID, with their resourceVersion.
    token_hashes: Mutex<HashMap<String, Versioned<String>>>,
}

/// A value derived from an object at a resourceVersion.
type Versioned<T> = (String, T);
/// An object's namespace and name.
type NsName = (String, String);

/// The stores of one kind, one per watched namespace (or one for all).
pub struct Registry<K: kube::Resource<DynamicType = ()> + Clone + 'static>(RwLock<Vec<Store<K>>>);

impl<K: kube::Resource<DynamicType = ()> + Clone + 'static> Default for Registry<K> {
    fn default() -> Self {
        Self(RwLock::new(vec![]))
    }
}

impl<K: kube::Resource<DynamicType = ()> + Clone + 'static> Registry<K> {
    pub(super) fn add(&self, store: Store<K>) {
        self.0.write().unwrap_or_else(|p| p.into_inner()).push(store);
    }

    /// Every object of every store.
    pub fn all(&self) -> Vec<Arc<K>> {
        let stores = self.0.read().unwrap_or_else(|p| p.into_inner());
        stores.iter().flat_map(|s| s.state()).collect()
    }

    /// The objects of one namespace.
    pub fn in_namespace(&self, ns: &str) -> Vec<Arc<K>> {
        let stores = self.0.read().unwrap_or_else(|p| p.into_inner());
        stores
            .iter()
            .flat_map(|s| s.state_filter(|o| o.meta().namespace.as_deref() == Some(ns)))
            .collect()
    }

    pub fn get(&self, ns: &str, name: &str) -> Option<Arc<K>> {
        let key = ObjectRef::new(name).within(ns);
        let stores = self.0.read().unwrap_or_else(|p| p.into_inner());
        stores.iter().find_map(|s| s.get(&key))
    }
}

impl Stores {
    /// Every User in every namespace the controller watches.
    pub fn users(&self) -> Vec<Arc<User>> {
        self.users.all()
    }

    /// A session Lease by namespace and name.
    pub fn lease(&self, namespace: &str, name: &str) -> Option<Arc<Lease>> {
        self.leases.get(namespace, name)
    }

    /// The bundle last parsed from (ns, name) if it was parsed from `rv`.
    pub fn bundle(&self, ns: &str, name: &str, rv: &str) -> Option<Arc<RuntimeBundle>> {
        let bundles = self.bundles.lock().unwrap_or_else(|p| p.into_inner());
        bundles
            .get(&(ns.to_string(), name.to_string()))
            .filter(|(v, _)| v == rv)
            .map(|(_, b)| b.clone())
    }

    pub fn keep_bundle(&self, ns: &str, name: &str, rv: String, bundle: Arc<RuntimeBundle>) {
        let mut bundles = self.bundles.lock().unwrap_or_else(|p| p.into_inner());
        bundles.insert((ns.to_string(), name.to_string()), (rv, bundle));
    }

    /// The token hash of a Secret (by UID) if computed from `rv`.
    pub fn token_hash(&self, uid: &str, rv: &str) -> Option<String> {
        let hashes = self.token_hashes.lock().unwrap_or_else(|p| p.into_inner());
        hashes.get(uid).filter(|(v, _)| v == rv).map(|(_, h)| h.clone())
    }

    pub fn keep_token_hash(&self, uid: String, rv: String, hash: String) {
        let mut hashes = self.token_hashes.lock().unwrap_or_else(|p| p.into_inner());
        hashes.insert(uid, (rv, hash));
    }
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
        // Every call this controller makes to Sprites.dev is paced.
        let sprites = sprites.with_rate_limit(config.sprites_api_rate, config.sprites_api_burst);
        Context {
            provisioning: tokio::sync::Semaphore::new(config.max_concurrent_provisioning),
            user_rechecks: tokio::sync::broadcast::channel(1024).0,
            vms: super::vm_cache::VmCache::new(config.vm_list_interval),
            recorder: Recorder::new(client.clone(), reporter),
            client,
            sprites,
            config,
            clock,
            metrics: Arc::new(Metrics::default()),
            session_lease_namespace: None,
            stores: Stores::default(),
        }
    }

    /// Reads the relay's session Leases from `namespace` (the chart's
    /// release namespace) instead of each Sprite's own.
    pub fn with_session_lease_namespace(mut self, namespace: Option<String>) -> Self {
        self.session_lease_namespace = namespace;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scaled_clock_runs_fast_and_scales_waits_back() {
        let start: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let c = ScaledClock::new(start, 120);
        std::thread::sleep(std::time::Duration::from_millis(100));
        let passed = c.now().duration_since(start);
        assert!(passed >= jiff::SignedDuration::from_secs(12), "{passed:?}");
        assert!(passed < jiff::SignedDuration::from_secs(60), "{passed:?}");
        assert_eq!(
            c.to_real(std::time::Duration::from_secs(300)),
            std::time::Duration::from_millis(2500)
        );
    }
}
