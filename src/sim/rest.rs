//! Sprite metadata endpoints. None of them wakes a VM (decision 3).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::app::{ApiError, Sim, lock};
use super::ns;
use super::state::{Power, Vm, VmMeta, rfc3339, valid_name};
use crate::sprites::{CreateSprite, UpdateSprite};

const MAX_PAGE: usize = 50;

fn json_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))
}

/// `POST /v1/sprites` → 201 with the sprite (status `cold`); 409 when the name is taken.
pub async fn create(State(sim): State<Arc<Sim>>, body: Bytes) -> Result<Response, ApiError> {
    let req: CreateSprite = json_body(&body)?;
    if !valid_name(&req.name) {
        return Err(ApiError::bad_request(format!(
            "invalid sprite name {:?}: 1-63 lowercase letters, digits and '-'",
            req.name
        )));
    }
    let paths = sim.paths(&req.name);
    let now = rfc3339(SystemTime::now());
    let sprite = {
        let mut vms = lock(&sim.vms);
        if vms.contains_key(&req.name) {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "already_exists",
                "sprite name already exists",
            ));
        }
        std::fs::create_dir_all(paths.workspace())
            .and_then(|()| std::fs::create_dir_all(paths.checkpoints()))
            .map_err(|e| ApiError::internal(format!("cannot create the VM directory: {e}")))?;
        let meta = VmMeta {
            id: format!("sprite-{}", uuid::Uuid::new_v4()),
            name: req.name.clone(),
            labels: req.labels,
            config: req.config,
            url_settings: Default::default(),
            created_at: now.clone(),
            updated_at: now,
            checkpoints: Vec::new(),
            next_checkpoint: 1,
        };
        let vm = Vm::new(meta, Instant::now());
        let sprite = vm.to_sprite();
        vms.insert(req.name.clone(), vm);
        sprite
    };
    sim.persist()?;
    tracing::info!(sprite = %sprite.name, "sim VM created");
    Ok((StatusCode::CREATED, Json(sprite)).into_response())
}

pub async fn get(State(sim): State<Arc<Sim>>, Path(name): Path<String>) -> Result<Response, ApiError> {
    sim.check_vm(&name)?;
    let vms = lock(&sim.vms);
    let vm = vms
        .get(&name)
        .ok_or_else(|| ApiError::not_found(format!("sprite not found: {name}")))?;
    Ok(Json(vm.to_sprite()).into_response())
}

/// `GET /v1/sprites?prefix=&max_results=&continuation_token=`: names in order; the token is the
/// last name of the previous page. `max_results` is clamped to 1–50, never rejected.
pub async fn list(
    State(sim): State<Arc<Sim>>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let prefix = q.get("prefix").cloned().unwrap_or_default();
    let limit = q
        .get("max_results")
        .and_then(|m| m.parse::<usize>().ok())
        .unwrap_or(MAX_PAGE)
        .clamp(1, MAX_PAGE);
    let after = q.get("continuation_token").filter(|t| !t.is_empty()).cloned();
    let vms = lock(&sim.vms);
    let count = |p: Power| vms.values().filter(|v| v.power == p).count();
    let (running, warm, cold) = (count(Power::Running), count(Power::Warm), count(Power::Cold));
    let mut matching = vms
        .values()
        .filter(|v| v.meta.name.starts_with(&prefix))
        .filter(|v| after.as_ref().is_none_or(|a| v.meta.name.as_str() > a.as_str()));
    let page: Vec<_> = matching.by_ref().take(limit).map(Vm::to_sprite).collect();
    let has_more = matching.next().is_some();
    let next = if has_more {
        page.last().map(|s| s.name.clone())
    } else {
        None
    };
    Ok(Json(serde_json::json!({
        "sprites": page,
        "has_more": has_more,
        "next_continuation_token": next,
        "org": { "name": "sim", "running": running, "warm": warm, "cold": cold,
                 "running_limit": 1000, "warm_limit": 1000 },
        "running": running,
        "warm": warm,
        "cold": cold,
    }))
    .into_response())
}

/// `PUT /v1/sprites/{name}` with `labels`, `clear_labels`, `url_settings`.
pub async fn update(
    State(sim): State<Arc<Sim>>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    sim.check_vm(&name)?;
    let req: UpdateSprite = json_body(&body)?;
    let sprite = {
        let mut vms = lock(&sim.vms);
        let vm = vms
            .get_mut(&name)
            .ok_or_else(|| ApiError::not_found(format!("sprite not found: {name}")))?;
        if req.clear_labels == Some(true) {
            vm.meta.labels.clear();
        }
        if let Some(labels) = req.labels {
            vm.meta.labels = labels;
        }
        if let Some(u) = req.url_settings {
            vm.meta.url_settings = u;
        }
        vm.meta.updated_at = rfc3339(SystemTime::now());
        vm.to_sprite()
    };
    sim.persist()?;
    Ok(Json(sprite).into_response())
}

/// `DELETE /v1/sprites/{name}` → 204; ends processes, drops the namespace and the files.
pub async fn delete(State(sim): State<Arc<Sim>>, Path(name): Path<String>) -> Result<Response, ApiError> {
    sim.check_vm(&name)?;
    sim.end_sessions(&name).await;
    let removed = lock(&sim.vms).remove(&name);
    if let Some(mut vm) = removed {
        // Cuts proxied connections.
        vm.set_power(Power::Cold, Instant::now());
    }
    sim.persist()?;
    let paths = sim.paths(&name);
    ns::remove_netns(&paths.netns());
    let root = paths.root.clone();
    let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(root)).await;
    tracing::info!(sprite = %name, "sim VM deleted");
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `/v1/sprites/{name}/control`: this server does not speak the control protocol. A plain 404
/// (never an upgrade) makes the Go SDK fall back to direct exec and proxy sockets.
pub async fn control() -> Response {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "control connections are not supported",
    )
    .into_response()
}
