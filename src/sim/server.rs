//! The router and its layers: call record, bearer auth, fault injection, `Sprite-Version`.

use std::sync::Arc;
use std::time::SystemTime;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post, put};
use axum::{Json, Router};

use super::app::{ApiError, CallRecord, Sim, lock};
use super::faults::Class;
use super::state::unix_ms;
use super::{admin, checkpoints, exec, fs, proxy, rest};

/// Version reported in `Sprite-Version` (a release-style version: the Go SDK then uses the
/// `/exec/{id}` attach form).
pub const SIM_VERSION: &str = "0.1.0";
const MAX_BODY: usize = 1 << 30;

pub fn router(sim: Arc<Sim>) -> Router {
    let v1 = Router::new()
        .route("/v1/sprites", post(rest::create).get(rest::list))
        .route(
            "/v1/sprites/{name}",
            get(rest::get).put(rest::update).delete(rest::delete),
        )
        .route("/v1/sprites/{name}/control", any(rest::control))
        .route("/v1/sprites/{name}/exec", get(exec::exec_root))
        .route("/v1/sprites/{name}/exec/{id}", get(exec::exec_attach))
        .route("/v1/sprites/{name}/exec/{id}/kill", post(exec::exec_kill))
        .route("/v1/sprites/{name}/fs/read", get(fs::read))
        .route("/v1/sprites/{name}/fs/write", put(fs::write))
        .route("/v1/sprites/{name}/fs/list", get(fs::list))
        .route("/v1/sprites/{name}/fs/delete", axum::routing::delete(fs::delete))
        .route("/v1/sprites/{name}/proxy", get(proxy::proxy))
        .route("/v1/sprites/{name}/checkpoint", post(checkpoints::create))
        .route("/v1/sprites/{name}/checkpoints", get(checkpoints::list))
        .route("/v1/sprites/{name}/checkpoints/{id}", get(checkpoints::get))
        .route(
            "/v1/sprites/{name}/checkpoints/{id}/restore",
            post(checkpoints::restore),
        )
        .route("/sim/stats", get(admin::stats))
        .route("/sim/sprites/{name}/sleep", post(admin::force_sleep))
        .route("/sim/faults", get(admin::get_faults).put(admin::put_faults))
        .fallback(not_found);
    v1.layer(middleware::from_fn_with_state(sim.clone(), faults))
        .layer(middleware::from_fn_with_state(sim.clone(), auth))
        .layer(middleware::from_fn_with_state(sim.clone(), record))
        .layer(middleware::from_fn(version))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(sim)
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such endpoint")
}

/// Compares without an early exit, so timing does not tell how much of a guess was right.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn authorized(sim: &Sim, req: &Request) -> bool {
    let expected = format!("Bearer {}", sim.settings.token.expose());
    req.headers()
        .get(header::AUTHORIZATION)
        .is_some_and(|v| constant_time_eq(v.as_bytes(), expected.as_bytes()))
}

async fn auth(State(sim): State<Arc<Sim>>, req: Request, next: Next) -> Response {
    if !authorized(&sim, &req) {
        let body =
            serde_json::json!({ "error": "unauthorized", "message": "missing or invalid bearer token" });
        return (StatusCode::UNAUTHORIZED, Json(body)).into_response();
    }
    next.run(req).await
}

async fn faults(State(sim): State<Arc<Sim>>, req: Request, next: Next) -> Response {
    let Some(class) = Class::of_path(req.uri().path()) else {
        return next.run(req).await;
    };
    let decision = lock(&sim.faults).decide(class, req.method().as_str());
    if !decision.latency.is_zero() {
        tokio::time::sleep(decision.latency).await;
    }
    if decision.lose_answer {
        let path = req.uri().path().to_string();
        let served = next.run(req).await;
        tracing::info!(
            path,
            status = served.status().as_u16(),
            "fault: served, answer lost"
        );
        return ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "gateway_timeout",
            "upstream timed out",
        )
        .into_response();
    }
    let Some((code, retry_after)) = decision.error else {
        return next.run(req).await;
    };
    tracing::info!(path = req.uri().path(), status = code, "fault: injected error");
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    if code == 429 {
        let body = serde_json::json!({
            "error": "rate_limited", "message": "injected fault", "retry_after_seconds": retry_after
        });
        let mut resp = (status, Json(body)).into_response();
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
        return resp;
    }
    ApiError::new(status, "injected_fault", "injected fault").into_response()
}

/// Method-less route pattern and sprite name of a request path, e.g.
/// `/v1/sprites/a/exec/12/kill` → (`/v1/sprites/{name}/exec/{id}/kill`, `a`).
pub fn route_pattern(path: &str) -> (String, Option<String>) {
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    if segs.len() < 3 || segs[0] != "v1" || segs[1] != "sprites" || segs[2].is_empty() {
        return (path.to_string(), None);
    }
    let mut out = vec!["v1", "sprites", "{name}"];
    let mut prev = "";
    for s in &segs[3..] {
        out.push(if matches!(prev, "exec" | "checkpoints") {
            "{id}"
        } else {
            s
        });
        prev = s;
    }
    (format!("/{}", out.join("/")), Some(segs[2].to_string()))
}

async fn record(State(sim): State<Arc<Sim>>, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    if !path.starts_with("/v1/") && path != "/v1" {
        return next.run(req).await;
    }
    let method = req.method().to_string();
    let response = next.run(req).await;
    let (pattern, sprite) = route_pattern(&path);
    sim.record(CallRecord {
        route: format!("{method} {pattern}"),
        method,
        sprite,
        status: response.status().as_u16(),
        unix_ms: unix_ms(SystemTime::now()),
    });
    response
}

async fn version(req: Request, next: Next) -> Response {
    let mut response = next.run(req).await;
    response
        .headers_mut()
        .insert("sprite-version", HeaderValue::from_static(SIM_VERSION));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        assert_eq!(route_pattern("/v1/sprites"), ("/v1/sprites".into(), None));
        assert_eq!(
            route_pattern("/v1/sprites/a"),
            ("/v1/sprites/{name}".into(), Some("a".into()))
        );
        assert_eq!(
            route_pattern("/v1/sprites/a/exec"),
            ("/v1/sprites/{name}/exec".into(), Some("a".into()))
        );
        assert_eq!(
            route_pattern("/v1/sprites/a/exec/12/kill"),
            ("/v1/sprites/{name}/exec/{id}/kill".into(), Some("a".into()))
        );
        assert_eq!(
            route_pattern("/v1/sprites/b/checkpoints/v3/restore"),
            (
                "/v1/sprites/{name}/checkpoints/{id}/restore".into(),
                Some("b".into())
            )
        );
        assert_eq!(
            route_pattern("/v1/sprites/b/fs/read").0,
            "/v1/sprites/{name}/fs/read"
        );
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"Bearer t", b"Bearer t"));
        assert!(!constant_time_eq(b"Bearer t", b"Bearer u"));
        assert!(!constant_time_eq(b"Bearer t", b"Bearer tt"));
    }
}
