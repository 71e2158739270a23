//! The reconcilers and the pure decisions they are made of.

pub mod context;
pub mod error;
pub mod leader;
pub mod metrics;
pub mod plan;
pub mod schedule;
pub mod sprite;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use futures::StreamExt;
use kube::Api;
use kube::runtime::{Controller, watcher};
use tokio_util::sync::CancellationToken;

use crate::api::Sprite;
pub use context::{Clock, Context, SystemClock};
pub use error::Error;

/// Runs the Sprite controller until `shutdown` fires.
pub async fn run(ctx: Arc<Context>, namespace: Option<String>, shutdown: CancellationToken) {
    let sprites: Api<Sprite> = match &namespace {
        Some(ns) => Api::namespaced(ctx.client.clone(), ns),
        None => Api::all(ctx.client.clone()),
    };
    Controller::new(sprites, watcher::Config::default().any_semantic())
        .graceful_shutdown_on(async move { shutdown.cancelled().await })
        .run(sprite::reconcile, sprite::error_policy, ctx)
        .for_each(|_| futures::future::ready(()))
        .await;
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
