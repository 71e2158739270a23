//! The simulator's shared state and the pieces every handler uses: errors, VM lookup, wake,
//! activity guards.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::exec::Session;
use super::faults::Injector;
use super::state::{self, Cause, Vm, VmPaths};
use crate::sprites::Token;

/// Calls kept in the record; older ones are dropped.
const MAX_CALLS: usize = 100_000;

#[derive(Debug, Clone, Serialize)]
pub struct CallRecord {
    pub method: String,
    /// Method and route pattern, e.g. `POST /v1/sprites` or `GET /v1/sprites/{name}/fs/read`.
    pub route: String,
    pub sprite: Option<String>,
    pub status: u16,
    pub unix_ms: u64,
}

#[derive(Debug)]
pub struct Settings {
    pub data_dir: PathBuf,
    pub token: Token,
    pub idle_timeout: Duration,
    pub cold_after: Duration,
    pub wake_delay: Duration,
    /// Commands are emulated, not run (benchmarks only).
    pub bench_vms: bool,
}

#[derive(Debug)]
pub struct Sim {
    pub settings: Settings,
    pub vms: Mutex<BTreeMap<String, Vm>>,
    pub sessions: Mutex<HashMap<String, Arc<Session>>>,
    pub faults: Mutex<Injector>,
    pub calls: Mutex<VecDeque<CallRecord>>,
    pub shutdown: CancellationToken,
}

/// Locks a mutex even if a panicking thread poisoned it: the data are plain maps that stay
/// consistent between statements.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// An error answer: `{"error": code, "message": text}`; filesystem errors follow the SDKs'
/// `{"error": text, "code": "ENOENT", "path": ...}` and also carry `message`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: String,
    pub message: String,
    pub fs_path: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        Self {
            status,
            code: code.into(),
            message: message.into(),
            fs_path: None,
        }
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", message)
    }
    pub fn fs(status: StatusCode, errno: &str, message: impl Into<String>, path: &str) -> Self {
        Self {
            status,
            code: errno.into(),
            message: message.into(),
            fs_path: Some(path.into()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = match &self.fs_path {
            None => serde_json::json!({ "error": self.code, "message": self.message }),
            Some(path) => serde_json::json!({
                "error": self.message, "code": self.code, "message": self.message, "path": path
            }),
        };
        (self.status, Json(body)).into_response()
    }
}

/// Keeps a VM awake while a socket or proxied connection is open.
pub struct ActiveGuard {
    sim: Arc<Sim>,
    name: String,
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        if let Some(vm) = lock(&self.sim.vms).get_mut(&self.name) {
            vm.active = vm.active.saturating_sub(1);
            vm.last_activity = Instant::now();
        }
    }
}

impl Sim {
    pub fn paths(&self, name: &str) -> VmPaths {
        VmPaths::new(&self.settings.data_dir, name)
    }

    /// 400 for a malformed name, 404 for an unknown one.
    pub fn check_vm(&self, name: &str) -> Result<(), ApiError> {
        if !state::valid_name(name) {
            return Err(ApiError::bad_request(format!("invalid sprite name {name:?}")));
        }
        if lock(&self.vms).contains_key(name) {
            Ok(())
        } else {
            Err(ApiError::not_found(format!("sprite not found: {name}")))
        }
    }

    /// Marks activity that reaches inside the VM, waking it (after the wake delay) if asleep.
    pub async fn wake(&self, name: &str, cause: Cause) -> Result<(), ApiError> {
        self.check_vm(name)?;
        let ready_at = {
            let mut vms = lock(&self.vms);
            let vm = vms
                .get_mut(name)
                .ok_or_else(|| ApiError::not_found(format!("sprite not found: {name}")))?;
            vm.touch(cause, Instant::now(), self.settings.wake_delay)
        };
        tokio::time::sleep_until(ready_at.into()).await;
        Ok(())
    }

    pub fn active_guard(self: &Arc<Self>, name: &str) -> ActiveGuard {
        if let Some(vm) = lock(&self.vms).get_mut(name) {
            vm.active += 1;
            vm.last_activity = Instant::now();
        }
        ActiveGuard {
            sim: self.clone(),
            name: name.to_string(),
        }
    }

    pub fn sleep_watch(&self, name: &str) -> Option<tokio::sync::watch::Receiver<u64>> {
        lock(&self.vms).get(name).map(|vm| vm.sleeps.subscribe())
    }

    /// Writes the state file from the current VMs.
    pub fn persist(&self) -> Result<(), ApiError> {
        let vms = lock(&self.vms);
        let metas: Vec<_> = vms.values().map(|v| v.meta.clone()).collect();
        state::save(&self.settings.data_dir, &metas).map_err(|e| {
            tracing::error!(error = %e, "cannot save sim state");
            ApiError::internal("cannot save state")
        })
    }

    pub fn record(&self, call: CallRecord) {
        let mut calls = lock(&self.calls);
        if calls.len() >= MAX_CALLS {
            calls.pop_front();
        }
        calls.push_back(call);
    }

    /// The VM's sessions.
    pub fn sessions_of(&self, name: &str) -> Vec<Arc<Session>> {
        lock(&self.sessions)
            .values()
            .filter(|s| s.vm == name)
            .cloned()
            .collect()
    }

    /// Kills every process of a VM and waits (bounded) for them to be gone.
    pub async fn end_sessions(&self, name: &str) {
        let sessions = self.sessions_of(name);
        for s in &sessions {
            s.kill(nix::sys::signal::Signal::SIGKILL);
        }
        for s in sessions {
            s.wait_exit(Duration::from_secs(5)).await;
        }
    }

    /// Idle check for every VM; run periodically.
    pub fn tick(&self, now: Instant) {
        let mut vms = lock(&self.vms);
        for vm in vms.values_mut() {
            if let Some(p) = state::next_power(
                &vm.view(),
                now,
                self.settings.idle_timeout,
                self.settings.cold_after,
            ) {
                vm.set_power(p, now);
            }
        }
    }
}
