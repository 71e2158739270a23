//! Leader election on a `coordination.k8s.io` Lease, so that two replicas
//! never reconcile at once. Reconciling starts when the Lease is ours; if it
//! is lost, the work is stopped and the caller exits, so Kubernetes restarts
//! the pod into a clean follower rather than a half-leader.

use std::future::Future;

use kube_lease_manager::LeaseManagerBuilder;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// How long shutdown waits for reconcilers, then for the lease release.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("lease: {0}")]
    Lease(#[from] kube_lease_manager::LeaseManagerError),
    #[error("lost the leader lease {0}")]
    Lost(String),
}

pub struct LeaseSettings {
    pub namespace: String,
    pub name: String,
    pub identity: String,
    /// Seconds a lease stays valid after its last renewal.
    pub duration_secs: u64,
    /// Renew this long before it expires.
    pub grace_secs: u64,
}

/// Waits for the Lease, then runs `work(token)` until `shutdown` fires (Ok)
/// or the Lease is lost (Err). `work` must return when its token is cancelled.
pub async fn run_as_leader<F, Fut>(
    client: kube::Client,
    settings: LeaseSettings,
    shutdown: CancellationToken,
    work: F,
) -> Result<(), LeaderError>
where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let manager = LeaseManagerBuilder::new(client, &settings.name)
        .with_namespace(&settings.namespace)
        .with_identity(&settings.identity)
        .with_duration(settings.duration_secs)
        .with_grace(settings.grace_secs)
        .with_field_manager("sprite-operator-leader")
        .build()
        .await?;
    let (mut leading, lease_task) = manager.watch().await;
    info!(lease = %settings.name, identity = %settings.identity, "waiting for the leader lease");
    loop {
        if *leading.borrow_and_update() {
            break;
        }
        tokio::select! {
            changed = leading.changed() => if changed.is_err() {
                return Err(LeaderError::Lost(settings.name));
            },
            _ = shutdown.cancelled() => {
                drop(leading);
                let _ = tokio::time::timeout(SHUTDOWN_GRACE, lease_task).await;
                return Ok(());
            }
        }
    }
    info!(lease = %settings.name, identity = %settings.identity, "leading");
    let work_token = shutdown.child_token();
    let worker = tokio::spawn(work(work_token.clone()));
    let result = loop {
        tokio::select! {
            changed = leading.changed() => {
                if changed.is_err() || !*leading.borrow_and_update() {
                    warn!(lease = %settings.name, "leader lease lost: stopping");
                    break Err(LeaderError::Lost(settings.name.clone()));
                }
            }
            _ = shutdown.cancelled() => break Ok(()),
        }
    };
    work_token.cancel();
    // In-flight reconciles get a grace period; past it they are abandoned
    // (each step is idempotent, so the next leader redoes what was cut).
    let mut worker = worker;
    if tokio::time::timeout(SHUTDOWN_GRACE, &mut worker).await.is_err() {
        warn!(lease = %settings.name, "reconcilers did not stop in time: aborting them");
        worker.abort();
    }
    // Closing the channel ends the manager's task, which releases the lease
    // so that a successor does not wait for it to expire.
    drop(leading);
    match tokio::time::timeout(SHUTDOWN_GRACE, lease_task).await {
        Ok(Ok(Ok(_))) => {}
        Ok(_) => warn!(lease = %settings.name, "lease manager ended with an error"),
        Err(_) => warn!(lease = %settings.name, "lease not released in time; it expires on its own"),
    }
    result
}
