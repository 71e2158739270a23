//! The reconcilers and the pure decisions they are made of.

pub mod context;
pub mod error;
pub mod leader;
pub mod metrics;
mod observe;
pub mod plan;
pub mod schedule;
pub mod sprite;
mod sprite_status;
pub mod usage;
pub mod user;
pub mod vm_cache;
pub mod vm_ops;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{Controller, WatchStreamExt, watcher};
use kube::{Api, ResourceExt};
use tokio_util::sync::CancellationToken;

use crate::api::session;
use crate::api::sprite::USER_LABEL;
use crate::api::{Sprite, User};
pub use context::{Clock, Context, OffsetClock, ScaledClock, SystemClock};
pub use error::Error;

/// The namespaces the controller watches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    All,
    Namespaces(Vec<String>),
}

impl From<Option<String>> for Scope {
    fn from(ns: Option<String>) -> Scope {
        match ns {
            Some(ns) => Scope::Namespaces(vec![ns]),
            None => Scope::All,
        }
    }
}

impl From<Vec<String>> for Scope {
    /// An empty list is every namespace.
    fn from(list: Vec<String>) -> Scope {
        let list: Vec<String> = list.into_iter().filter(|n| !n.is_empty()).collect();
        if list.is_empty() {
            Scope::All
        } else {
            Scope::Namespaces(list)
        }
    }
}

/// Runs the Sprite and User controllers until `shutdown` fires: one pair per
/// watched namespace (or one for the whole cluster), sharing the context, so
/// that checks across Users (shared subjects) see every namespace watched.
pub async fn run(ctx: Arc<Context>, scope: impl Into<Scope>, shutdown: CancellationToken) {
    // Aborted on drop: when `run` itself is aborted (a crash in the tests,
    // a lost lease past its grace) the list loop must not outlive it.
    let _lister = {
        let (ctx, stop) = (ctx.clone(), shutdown.clone());
        tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
            ctx.vms
                .refresh_loop(ctx.sprites.clone(), ctx.config.vm_list_interval, stop)
                .await
        }))
    };
    let namespaces = match scope.into() {
        Scope::All => vec![None],
        Scope::Namespaces(list) => list.into_iter().map(Some).collect(),
    };
    futures::future::join_all(
        namespaces
            .into_iter()
            .map(|ns| run_in(ctx.clone(), ns, shutdown.clone())),
    )
    .await;
}

/// The controllers of one namespace (or of all, with None).
///
/// Besides Sprites it watches what a Sprite's decisions read: its runtime
/// ConfigMap (drift), its User (suspension, budget, quota), its sibling
/// Sprites (a deleted sibling frees quota) and the relay's session Leases.
/// ConfigMaps and Secrets are watched as metadata only (their data is read
/// on demand), Secrets only when they are gateway Secrets.
async fn run_in(ctx: Arc<Context>, namespace: Option<String>, shutdown: CancellationToken) {
    fn api<K>(client: &kube::Client, ns: &Option<String>) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        match ns {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        }
    }
    let client = &ctx.client;
    let limits = kube::runtime::controller::Config::default().concurrency(ctx.config.reconcile_concurrency);
    let controller = Controller::new(
        api::<Sprite>(client, &namespace),
        watcher::Config::default().any_semantic(),
    )
    .with_config(limits.clone());
    let store = controller.store();
    ctx.stores.sprites.add(store.clone());
    let (by_cm, by_user, by_sibling, by_vm) = (store.clone(), store.clone(), store.clone(), store.clone());
    let by_secret = store;
    // Secrets a server's environment may come from (the platform's label):
    // metadata only; a change restarts the servers that name the Secret.
    let env_secrets = match ctx.config.secret_references.required() {
        Some((key, value)) => {
            let selector = match value {
                Some(v) => format!("{key}={v}"),
                None => key.to_string(),
            };
            let (secrets, writer) = reflector::store();
            ctx.stores.secrets.add(secrets);
            let events = watcher(
                api::<PartialObjectMeta<Secret>>(client, &namespace),
                watcher::Config::default().labels(&selector),
            )
            .default_backoff();
            reflector::reflector(writer, events).touched_objects().boxed()
        }
        // Any Secret may be named: watching them all is what this controller
        // avoids; a change is then noticed at the next resync.
        None => futures::stream::pending().boxed(),
    };
    // A VM the periodic list found changed: its Sprite is looked at again.
    let vm_changes = received(ctx.vms.changes()).flat_map(move |name| {
        futures::stream::iter(
            by_vm
                .state()
                .iter()
                .filter(|s| s.vm_name() == name)
                .map(|s| ObjectRef::from_obj(s.as_ref()))
                .collect::<Vec<_>>(),
        )
    });

    // Session Leases: in the configured namespace, else in the Sprites' own.
    let lease_ns = ctx.session_lease_namespace.clone().or_else(|| namespace.clone());
    let (leases, lease_writer) = reflector::store::<Lease>();
    ctx.stores.leases.add(leases);
    let lease_events = reflector::reflector(
        lease_writer,
        watcher(
            api::<Lease>(client, &lease_ns),
            watcher::Config::default().labels(&format!("{}=true", session::SESSION_LABEL)),
        )
        .default_backoff(),
    )
    .touched_objects();
    let configured_lease_ns = ctx.session_lease_namespace.clone();
    let scope_ns = namespace.clone();
    let (config_maps, cm_writer) = reflector::store();
    ctx.stores.config_maps.add(config_maps);
    let cm_events = reflector::reflector(
        cm_writer,
        watcher(
            api::<PartialObjectMeta<ConfigMap>>(client, &namespace),
            watcher::Config::default(),
        )
        .default_backoff(),
    )
    .touched_objects();

    let user_shutdown = shutdown.clone();
    let sprites = controller
        .watches_stream(cm_events, move |cm| {
            dependents(&by_cm, cm.namespace(), |s| {
                s.spec
                    .template
                    .runtime
                    .source
                    .as_ref()
                    .is_some_and(|src| src.config_map.name == cm.name_any())
            })
        })
        .watches_stream(env_secrets, move |secret| {
            let name = secret.name_any();
            dependents(&by_secret, secret.namespace(), |s| {
                s.spec.template.server.env.iter().any(|v| {
                    v.value_from
                        .as_ref()
                        .is_some_and(|f| f.secret_key_ref.name == name)
                })
            })
        })
        .watches(
            api::<User>(client, &namespace),
            watcher::Config::default(),
            move |u| dependents(&by_user, u.namespace(), |s| s.spec.user_ref.name == u.name_any()),
        )
        .watches(
            api::<Sprite>(client, &namespace),
            watcher::Config::default(),
            move |sibling| {
                let user = sibling.spec.user_ref.name.clone();
                dependents(&by_sibling, sibling.namespace(), |s| {
                    s.spec.user_ref.name == user && s.uid() != sibling.uid()
                })
            },
        )
        .watches_stream(lease_events, move |lease| {
            session_target(&lease, configured_lease_ns.as_deref(), scope_ns.as_deref())
        })
        .reconcile_on(vm_changes)
        .graceful_shutdown_on(async move { shutdown.cancelled().await })
        .run(sprite::reconcile, sprite::error_policy, ctx.clone())
        .for_each(|_| futures::future::ready(()));

    // Users own their primary Sprite and gateway Secret, and roll up the
    // usage of every Sprite that names them.
    let users = Controller::new(
        api::<User>(client, &namespace),
        watcher::Config::default().any_semantic(),
    )
    .with_config(limits);
    ctx.stores.users.add(users.store());
    let peers_ctx = ctx.clone();
    // Users of this controller's namespace that a change elsewhere asked to
    // look at again.
    let user_scope = namespace.clone();
    let rechecks = received(ctx.user_rechecks.subscribe()).filter(move |r: &ObjectRef<User>| {
        futures::future::ready(user_scope.is_none() || r.namespace == user_scope)
    });
    let (gateways, gateway_writer) = reflector::store();
    ctx.stores.secrets.add(gateways);
    let gateway_events = reflector::reflector(
        gateway_writer,
        watcher(
            api::<PartialObjectMeta<Secret>>(client, &namespace),
            watcher::Config::default().labels(USER_LABEL),
        )
        .default_backoff(),
    )
    .touched_objects();
    let users = users
        .owns_stream(gateway_events)
        .watches(
            api::<Sprite>(client, &namespace),
            watcher::Config::default(),
            |s| {
                let ns = s.namespace()?;
                Some(ObjectRef::<User>::new(&s.spec.user_ref.name).within(&ns))
            },
        )
        // A User's DuplicateSubject condition depends on the other Users of
        // every watched namespace: re-check the ones a change can clear or
        // raise. They may be another namespace's, whose controller this is
        // not: the request goes to every controller, each takes its own.
        .watches(
            api::<User>(client, &namespace),
            watcher::Config::default(),
            move |changed| {
                for other in peers_ctx.stores.users() {
                    if user::subject_peer(&changed, &other) {
                        let _ = peers_ctx.user_rechecks.send(ObjectRef::from_obj(other.as_ref()));
                    }
                }
                Vec::<ObjectRef<User>>::new()
            },
        )
        .reconcile_on(rechecks)
        .graceful_shutdown_on(async move { user_shutdown.cancelled().await })
        .run(user::reconcile, user::error_policy, ctx.clone())
        .for_each(|_| futures::future::ready(()));
    futures::join!(sprites, users);
}

/// What a broadcast channel delivers, as a stream; messages missed by a slow
/// reader are skipped (their objects come back at their resync).
fn received<T: Clone + Send + 'static>(
    rx: tokio::sync::broadcast::Receiver<T>,
) -> impl futures::Stream<Item = T> + Send + 'static {
    futures::stream::unfold(rx, |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok(v) => return Some((v, rx)),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    })
}

/// The Sprite a session Lease speaks for, if it may speak for it: a Lease
/// in the configured lease namespace for any Sprite, or (without one) a
/// Lease in a Sprite's own namespace; always under the name derived from
/// that Sprite, so a Lease that merely copies the label and annotation
/// reaches nothing.
fn session_target(lease: &Lease, configured: Option<&str>, scope: Option<&str>) -> Option<ObjectRef<Sprite>> {
    let (ns, name) = session::sprite_of(lease)?;
    let lease_ns = lease.metadata.namespace.as_deref()?;
    let expected_ns = session::lease_namespace(configured, &ns);
    let named_right = lease.metadata.name.as_deref() == Some(session::lease_name(&ns, &name).as_str());
    let in_scope = scope.is_none_or(|s| s == ns);
    (lease_ns == expected_ns && named_right && in_scope).then(|| ObjectRef::new(&name).within(&ns))
}

/// Sprites in `ns` (from the controller's own cache) for which `pred` holds.
fn dependents(
    store: &kube::runtime::reflector::Store<Sprite>,
    ns: Option<String>,
    pred: impl Fn(&Sprite) -> bool,
) -> Vec<ObjectRef<Sprite>> {
    store
        .state()
        .iter()
        .filter(|s| s.namespace() == ns && pred(s))
        .map(|s| ObjectRef::from_obj(s.as_ref()))
        .collect()
}

/// `/metrics`, `/healthz` and `/readyz`.
pub async fn serve_metrics(
    addr: SocketAddr,
    ctx: Arc<Context>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route(
            "/metrics",
            get(|State(ctx): State<Arc<Context>>| async move { ctx.metrics.encode() }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(|| async { "ok" }))
        .with_state(ctx);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_lease_reaches_only_the_sprite_its_name_and_place_speak_for() {
        let now: jiff::Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let ttl = std::time::Duration::from_secs(60);
        let ok = session::lease("ops", "acme", "alice", "relay", now, now, ttl);
        assert_eq!(
            session_target(&ok, Some("ops"), None),
            Some(ObjectRef::new("alice").within("acme"))
        );
        // Outside the controller's namespaces, or in the wrong namespace.
        assert_eq!(session_target(&ok, Some("ops"), Some("other")), None);
        assert_eq!(session_target(&ok, None, None), None);
        // Without a configured namespace, only in the Sprite's own.
        let own = session::lease("acme", "acme", "alice", "relay", now, now, ttl);
        assert!(session_target(&own, None, Some("acme")).is_some());
        // A tenant's Lease that names another namespace's Sprite.
        let forged = session::lease("evil", "acme", "alice", "relay", now, now, ttl);
        assert_eq!(session_target(&forged, None, None), None);
        // The right label and annotation under another name.
        let mut renamed = ok.clone();
        renamed.metadata.name = Some("sprite-session-0000".into());
        assert_eq!(session_target(&renamed, Some("ops"), None), None);
    }
}
