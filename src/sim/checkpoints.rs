//! Checkpoints: a recursive copy of the workspace, streamed as NDJSON; restore swaps the copy
//! back in after ending the VM's processes.

use std::path::Path as FsPath;
use std::sync::Arc;
use std::time::SystemTime;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use futures::channel::mpsc;
use serde::Deserialize;

use super::app::{ApiError, Sim, lock};
use super::state::{Cause, rfc3339};
use crate::sprites::Checkpoint;

/// Copies a tree: files with their permission bits, directories, symlinks as links; other node
/// types (sockets, FIFOs) are skipped.
pub fn copy_tree(src: &FsPath, dst: &FsPath) -> std::io::Result<()> {
    let meta = std::fs::symlink_metadata(src)?;
    std::fs::create_dir_all(dst)?;
    std::fs::set_permissions(dst, meta.permissions())?;
    for item in std::fs::read_dir(src)? {
        let item = item?;
        let (from, to) = (item.path(), dst.join(item.file_name()));
        let kind = item.file_type()?;
        if kind.is_dir() {
            copy_tree(&from, &to)?;
        } else if kind.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&from)?, &to)?;
        } else if kind.is_file() {
            std::fs::copy(&from, &to)?;
        }
    }
    Ok(())
}

fn line(kind: &str, data: &str) -> Bytes {
    let mut s =
        serde_json::json!({ "type": kind, "data": data, "time": rfc3339(SystemTime::now()) }).to_string();
    s.push('\n');
    Bytes::from(s)
}

fn error_line(message: &str) -> Bytes {
    let mut s = serde_json::json!({ "type": "error", "error": message, "time": rfc3339(SystemTime::now()) })
        .to_string();
    s.push('\n');
    Bytes::from(s)
}

fn ndjson(rx: mpsc::UnboundedReceiver<Bytes>) -> Response {
    let stream = futures::StreamExt::map(rx, Ok::<_, std::convert::Infallible>);
    (
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response()
}

#[derive(Debug, Default, Deserialize)]
struct CreateBody {
    #[serde(default)]
    comment: Option<String>,
}

/// `POST /v1/sprites/{name}/checkpoint`.
pub async fn create(
    State(sim): State<Arc<Sim>>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    sim.wake(&name, Cause::Checkpoint).await?;
    let comment = serde_json::from_slice::<CreateBody>(&body)
        .unwrap_or_default()
        .comment
        .unwrap_or_default();
    let id = {
        let mut vms = lock(&sim.vms);
        let vm = vms
            .get_mut(&name)
            .ok_or_else(|| ApiError::not_found("sprite not found"))?;
        let id = format!("v{}", vm.meta.next_checkpoint);
        vm.meta.next_checkpoint += 1;
        id
    };
    let (tx, rx) = mpsc::unbounded();
    let _ = tx.unbounded_send(line("info", "Creating checkpoint..."));
    tokio::spawn(async move {
        let _guard = sim.active_guard(&name);
        let paths = sim.paths(&name);
        let (src, dst) = (paths.workspace(), paths.checkpoint(&id));
        let copied = tokio::task::spawn_blocking(move || {
            let _ = std::fs::remove_dir_all(&dst);
            copy_tree(&src, &dst)
        })
        .await;
        match copied {
            Ok(Ok(())) => {
                let cp = Checkpoint {
                    id: id.clone(),
                    create_time: rfc3339(SystemTime::now()),
                    comment,
                    is_auto: false,
                    history: Vec::new(),
                };
                if let Some(vm) = lock(&sim.vms).get_mut(&name) {
                    vm.meta.checkpoints.push(cp);
                }
                match sim.persist() {
                    Ok(()) => {
                        tracing::info!(sprite = %name, checkpoint = %id, "sim checkpoint created");
                        let _ = tx.unbounded_send(line("complete", &format!("Checkpoint {id} created")));
                    }
                    Err(e) => drop(tx.unbounded_send(error_line(&e.message))),
                }
            }
            Ok(Err(e)) => drop(tx.unbounded_send(error_line(&format!("copy failed: {e}")))),
            Err(_) => drop(tx.unbounded_send(error_line("copy worker failed"))),
        }
    });
    Ok(ndjson(rx))
}

fn listed(sim: &Sim, name: &str) -> Result<Vec<Checkpoint>, ApiError> {
    sim.check_vm(name)?;
    let vms = lock(&sim.vms);
    let vm = vms
        .get(name)
        .ok_or_else(|| ApiError::not_found("sprite not found"))?;
    // Newest first, as the docs' example lists them.
    Ok(vm.meta.checkpoints.iter().rev().cloned().collect())
}

/// `GET /v1/sprites/{name}/checkpoints`: a bare JSON array. Listing reads metadata only, but it is
/// a checkpoint call, and checkpoint calls wake the VM (decision 3).
pub async fn list(State(sim): State<Arc<Sim>>, Path(name): Path<String>) -> Result<Response, ApiError> {
    sim.wake(&name, Cause::Checkpoint).await?;
    Ok(Json(listed(&sim, &name)?).into_response())
}

/// `GET /v1/sprites/{name}/checkpoints/{id}`.
pub async fn get(
    State(sim): State<Arc<Sim>>,
    Path((name, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    sim.wake(&name, Cause::Checkpoint).await?;
    let cp = listed(&sim, &name)?.into_iter().find(|c| c.id == id);
    cp.map(|c| Json(c).into_response())
        .ok_or_else(|| ApiError::not_found(format!("no checkpoint {id}")))
}

/// `POST /v1/sprites/{name}/checkpoints/{id}/restore`: ends the VM's sessions, swaps the
/// workspace, and ends the stream only once the restored files are in place.
pub async fn restore(
    State(sim): State<Arc<Sim>>,
    Path((name, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    sim.wake(&name, Cause::Checkpoint).await?;
    if !listed(&sim, &name)?.iter().any(|c| c.id == id) {
        return Err(ApiError::not_found(format!("no checkpoint {id}")));
    }
    let (tx, rx) = mpsc::unbounded();
    let _ = tx.unbounded_send(line("info", &format!("Restoring checkpoint {id}...")));
    tokio::spawn(async move {
        let _guard = sim.active_guard(&name);
        sim.end_sessions(&name).await;
        let paths = sim.paths(&name);
        let id2 = id.clone();
        let swapped = tokio::task::spawn_blocking(move || {
            let ws = paths.workspace();
            let fresh = paths.root.join("workspace.restoring");
            let old = paths.root.join("workspace.old");
            let _ = std::fs::remove_dir_all(&fresh);
            let _ = std::fs::remove_dir_all(&old);
            copy_tree(&paths.checkpoint(&id2), &fresh)?;
            std::fs::rename(&ws, &old)?;
            std::fs::rename(&fresh, &ws)?;
            std::fs::remove_dir_all(&old)
        })
        .await;
        match swapped {
            Ok(Ok(())) => {
                tracing::info!(sprite = %name, checkpoint = %id, "sim checkpoint restored");
                let _ = tx.unbounded_send(line("complete", &format!("Restored to checkpoint {id}")));
            }
            Ok(Err(e)) => drop(tx.unbounded_send(error_line(&format!("restore failed: {e}")))),
            Err(_) => drop(tx.unbounded_send(error_line("restore worker failed"))),
        }
    });
    Ok(ndjson(rx))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn copies_files_dirs_modes_and_links() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("src");
        std::fs::create_dir_all(src.join("a/b")).expect("mkdir");
        std::fs::write(src.join("a/b/f"), b"\x00\xff").expect("write");
        std::fs::set_permissions(src.join("a/b/f"), std::fs::Permissions::from_mode(0o751)).expect("chmod");
        std::os::unix::fs::symlink("a/b/f", src.join("link")).expect("symlink");
        let dst = dir.path().join("dst");
        copy_tree(&src, &dst).expect("copy");
        assert_eq!(std::fs::read(dst.join("a/b/f")).expect("read"), b"\x00\xff");
        let mode = std::fs::metadata(dst.join("a/b/f"))
            .expect("meta")
            .permissions()
            .mode()
            & 0o7777;
        assert_eq!(mode, 0o751);
        assert_eq!(
            std::fs::read_link(dst.join("link")).expect("link"),
            FsPath::new("a/b/f")
        );
    }

    #[test]
    fn lines_are_ndjson() {
        let l = line("complete", "Checkpoint v1 created");
        assert!(l.ends_with(b"\n"));
        let v: serde_json::Value = serde_json::from_slice(&l).expect("json");
        assert_eq!(v["type"], "complete");
        let e: serde_json::Value = serde_json::from_slice(&error_line("x")).expect("json");
        assert_eq!(
            (e["type"].as_str(), e["error"].as_str()),
            (Some("error"), Some("x"))
        );
    }
}
