//! Test endpoints under `/sim/`: stats and call record, forced sleep, fault settings.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::app::{ApiError, CallRecord, Sim, lock};
use super::faults::Faults;
use super::state::Power;

#[derive(Debug, Serialize)]
pub struct VmStats {
    pub status: &'static str,
    pub wakes: BTreeMap<&'static str, u64>,
    pub total_wakes: u64,
    pub active_connections: usize,
    pub sessions: usize,
}

#[derive(Debug, Serialize)]
pub struct Stats {
    pub vms: BTreeMap<String, VmStats>,
    pub calls: Vec<CallRecord>,
}

/// `GET /sim/stats`.
pub async fn stats(State(sim): State<Arc<Sim>>) -> Json<Stats> {
    let vms = lock(&sim.vms)
        .values()
        .map(|vm| {
            let s = VmStats {
                status: vm.power.as_str(),
                wakes: vm.wakes.clone(),
                total_wakes: vm.total_wakes(),
                active_connections: vm.active,
                sessions: 0,
            };
            (vm.meta.name.clone(), s)
        })
        .collect::<BTreeMap<_, _>>();
    let mut vms = vms;
    for s in lock(&sim.sessions).values() {
        if let Some(v) = vms.get_mut(&s.vm) {
            v.sessions += 1;
        }
    }
    let calls = lock(&sim.calls).iter().cloned().collect();
    Json(Stats { vms, calls })
}

/// `POST /sim/sprites/{name}/sleep`: suspend now (status `warm`), cutting proxied connections.
pub async fn force_sleep(
    State(sim): State<Arc<Sim>>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    sim.check_vm(&name)?;
    if let Some(vm) = lock(&sim.vms).get_mut(&name) {
        vm.set_power(Power::Warm, Instant::now());
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `GET /sim/faults`.
pub async fn get_faults(State(sim): State<Arc<Sim>>) -> Json<Faults> {
    Json(lock(&sim.faults).faults().clone())
}

/// `PUT /sim/faults`: replaces every fault setting (`{}` clears them).
pub async fn put_faults(State(sim): State<Arc<Sim>>, body: Bytes) -> Result<Response, ApiError> {
    let faults: Faults =
        serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(format!("bad faults JSON: {e}")))?;
    faults
        .validate()
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    tracing::info!(faults = ?faults, "sim faults set");
    lock(&sim.faults).set(faults.clone());
    Ok(Json(faults).into_response())
}
