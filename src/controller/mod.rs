//! The reconcilers and the pure decisions they are made of.

pub mod context;
pub mod error;
pub mod leader;
pub mod metrics;
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
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{Controller, watcher};
use kube::{Api, ResourceExt};
use tokio_util::sync::CancellationToken;

use crate::api::{Sprite, User};
pub use context::{Clock, Context, OffsetClock, ScaledClock, SystemClock};
pub use error::Error;

/// How often every VM's metadata is listed for steady-state reconciles.
pub const VM_LIST_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

/// Runs the Sprite and User controllers until `shutdown` fires.
///
/// Besides Sprites it watches what a Sprite's decisions read: its runtime
/// ConfigMap (drift), its User (suspension, budget, quota) and its sibling
/// Sprites (a deleted sibling frees quota). Users watch each other for
/// shared subjects.
pub async fn run(ctx: Arc<Context>, namespace: Option<String>, shutdown: CancellationToken) {
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
    // Aborted on drop: when `run` itself is aborted (a crash in the tests,
    // a lost lease past its grace) the list loop must not outlive it.
    let _lister = {
        let (ctx, stop) = (ctx.clone(), shutdown.clone());
        tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
            ctx.vms
                .refresh_loop(ctx.sprites.clone(), VM_LIST_INTERVAL, stop)
                .await
        }))
    };
    let client = &ctx.client;
    let controller = Controller::new(
        api::<Sprite>(client, &namespace),
        watcher::Config::default().any_semantic(),
    );
    let store = controller.store();
    let (by_cm, by_user, by_sibling) = (store.clone(), store.clone(), store);
    let user_shutdown = shutdown.clone();
    let sprites = controller
        .watches(
            api::<ConfigMap>(client, &namespace),
            watcher::Config::default(),
            move |cm| {
                dependents(&by_cm, cm.namespace(), |s| {
                    s.spec
                        .template
                        .runtime
                        .source
                        .as_ref()
                        .is_some_and(|src| src.config_map.name == cm.name_any())
                })
            },
        )
        .watches(
            api::<User>(client, &namespace),
            watcher::Config::default(),
            move |u| {
                dependents(&by_user, u.namespace(), |s| {
                    s.spec.user_ref.as_ref().is_some_and(|r| r.name == u.name_any())
                })
            },
        )
        .watches(
            api::<Sprite>(client, &namespace),
            watcher::Config::default(),
            move |sibling| {
                let Some(user) = sibling.spec.user_ref.clone() else {
                    return vec![];
                };
                dependents(&by_sibling, sibling.namespace(), |s| {
                    s.spec.user_ref.as_ref().is_some_and(|r| r.name == user.name) && s.uid() != sibling.uid()
                })
            },
        )
        .graceful_shutdown_on(async move { shutdown.cancelled().await })
        .run(sprite::reconcile, sprite::error_policy, ctx.clone())
        .for_each(|_| futures::future::ready(()));

    // Users own their primary Sprite and gateway Secret, and roll up the
    // usage of every Sprite that names them.
    let users = Controller::new(
        api::<User>(client, &namespace),
        watcher::Config::default().any_semantic(),
    );
    let user_store = users.store();
    let users = users
        .owns(api::<Secret>(client, &namespace), watcher::Config::default())
        .watches(
            api::<Sprite>(client, &namespace),
            watcher::Config::default(),
            |s| {
                let ns = s.namespace()?;
                s.spec
                    .user_ref
                    .as_ref()
                    .map(|r| ObjectRef::<User>::new(&r.name).within(&ns))
            },
        )
        // A User's DuplicateSubject condition depends on the other Users of its
        // namespace: re-check the ones a change can clear or raise.
        .watches(
            api::<User>(client, &namespace),
            watcher::Config::default(),
            move |changed| {
                user_store
                    .state()
                    .iter()
                    .filter(|other| user::subject_peer(&changed, other))
                    .map(|other| ObjectRef::from_obj(other.as_ref()))
                    .collect::<Vec<_>>()
            },
        )
        .graceful_shutdown_on(async move { user_shutdown.cancelled().await })
        .run(user::reconcile, user::error_policy, ctx.clone())
        .for_each(|_| futures::future::ready(()));
    futures::join!(sprites, users);
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
