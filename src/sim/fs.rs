//! The filesystem API over a VM's directory. Paths are VM paths under `/workspace` (absolute, or
//! relative to `workingDir`); anything that would leave the VM's directory is refused with 400.

use std::io::ErrorKind;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path as FsPath, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::app::{ApiError, Sim};
use super::ns::WORKSPACE;
use super::state::{Cause, rfc3339};
use crate::sprites::{FsEntry, FsList};

/// A VM path and where it lives on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub vm_path: String,
    pub host: PathBuf,
}

/// Lexically resolves `path` (against `working_dir` when relative) to a path under `/workspace`.
pub fn resolve(root: &FsPath, path: &str, working_dir: Option<&str>) -> Result<Resolved, String> {
    if path.is_empty() {
        return Err("path is required".into());
    }
    let joined = if path.starts_with('/') {
        PathBuf::from(path)
    } else {
        PathBuf::from(working_dir.filter(|w| !w.is_empty()).unwrap_or(WORKSPACE)).join(path)
    };
    let mut parts: Vec<String> = Vec::new();
    for c in joined.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir => {
                parts
                    .pop()
                    .ok_or_else(|| format!("{path:?} leaves the filesystem root"))?;
            }
            Component::Normal(p) => parts.push(p.to_str().ok_or("path is not UTF-8")?.to_string()),
            Component::Prefix(_) => return Err("bad path".into()),
        }
    }
    if parts.first().map(String::as_str) != Some(&WORKSPACE[1..]) {
        return Err(format!(
            "{path:?} is outside {WORKSPACE}, the only directory the simulator serves"
        ));
    }
    let rest = &parts[1..];
    let vm_path = std::iter::once(WORKSPACE.to_string())
        .chain(rest.iter().cloned())
        .collect::<Vec<_>>()
        .join("/");
    let host = rest.iter().fold(root.to_path_buf(), |p, s| p.join(s));
    Ok(Resolved { vm_path, host })
}

/// Refuses paths whose existing part resolves (through symlinks a VM made) outside the root.
pub fn check_inside(root: &FsPath, host: &FsPath) -> Result<(), String> {
    let canon_root = root.canonicalize().map_err(|e| e.to_string())?;
    let mut probe = host.to_path_buf();
    loop {
        match probe.canonicalize() {
            Ok(c) if c.starts_with(&canon_root) => return Ok(()),
            Ok(_) => return Err("path escapes the workspace through a symlink".into()),
            Err(_) => {
                if !probe.pop() {
                    return Err("path has no existing ancestor".into());
                }
            }
        }
    }
}

#[derive(Debug, Deserialize)]
pub struct PathQuery {
    path: Option<String>,
    #[serde(rename = "workingDir")]
    working_dir: Option<String>,
    mode: Option<String>,
    #[serde(rename = "mkdirParents")]
    mkdir_parents: Option<String>,
    recursive: Option<String>,
}

fn io_error(e: std::io::Error, path: &str) -> ApiError {
    let (status, code) = match e.kind() {
        ErrorKind::NotFound => (StatusCode::NOT_FOUND, "ENOENT"),
        ErrorKind::IsADirectory => (StatusCode::BAD_REQUEST, "EISDIR"),
        ErrorKind::NotADirectory => (StatusCode::BAD_REQUEST, "ENOTDIR"),
        ErrorKind::DirectoryNotEmpty => (StatusCode::BAD_REQUEST, "ENOTEMPTY"),
        ErrorKind::AlreadyExists => (StatusCode::BAD_REQUEST, "EEXIST"),
        ErrorKind::PermissionDenied => (StatusCode::FORBIDDEN, "EACCES"),
        ErrorKind::InvalidInput | ErrorKind::InvalidFilename => (StatusCode::BAD_REQUEST, "EINVAL"),
        _ => (StatusCode::INTERNAL_SERVER_ERROR, "EIO"),
    };
    ApiError::fs(status, code, format!("{path}: {e}"), path)
}

async fn prepare(sim: &Sim, name: &str, path: Option<&str>, wd: Option<&str>) -> Result<Resolved, ApiError> {
    sim.wake(name, Cause::Fs).await?;
    let root = sim.paths(name).workspace();
    let path = path.unwrap_or_default();
    let r = resolve(&root, path, wd).map_err(|m| ApiError::fs(StatusCode::BAD_REQUEST, "EINVAL", m, path))?;
    check_inside(&root, &r.host)
        .map_err(|m| ApiError::fs(StatusCode::BAD_REQUEST, "EINVAL", m, &r.vm_path))?;
    Ok(r)
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| ApiError::internal("worker failed"))?
}

/// `GET fs/read`: raw bytes.
pub async fn read(
    State(sim): State<Arc<Sim>>,
    Path(name): Path<String>,
    Query(q): Query<PathQuery>,
) -> Result<Response, ApiError> {
    let r = prepare(&sim, &name, q.path.as_deref(), q.working_dir.as_deref()).await?;
    let data = blocking(move || {
        if r.host.is_dir() {
            return Err(ApiError::fs(
                StatusCode::BAD_REQUEST,
                "EISDIR",
                format!("{} is a directory", r.vm_path),
                &r.vm_path,
            ));
        }
        std::fs::read(&r.host).map_err(|e| io_error(e, &r.vm_path))
    })
    .await?;
    Ok((
        [(header::CONTENT_TYPE, "application/octet-stream")],
        Body::from(data),
    )
        .into_response())
}

pub fn parse_mode(mode: Option<&str>) -> Result<u32, String> {
    match mode {
        None | Some("") => Ok(0o644),
        Some(m) => u32::from_str_radix(m.trim_start_matches("0o"), 8)
            .ok()
            .filter(|m| *m <= 0o7777)
            .ok_or_else(|| format!("bad mode {m:?}")),
    }
}

/// `PUT fs/write`: replaces the file; `mode` (octal) applied; parents made with `mkdirParents`.
pub async fn write(
    State(sim): State<Arc<Sim>>,
    Path(name): Path<String>,
    Query(q): Query<PathQuery>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let r = prepare(&sim, &name, q.path.as_deref(), q.working_dir.as_deref()).await?;
    let mode = parse_mode(q.mode.as_deref())
        .map_err(|m| ApiError::fs(StatusCode::BAD_REQUEST, "EINVAL", m, &r.vm_path))?;
    let parents = q.mkdir_parents.as_deref() != Some("false");
    let size = body.len();
    let vm_path = r.vm_path.clone();
    blocking(move || {
        if r.vm_path == WORKSPACE {
            return Err(ApiError::fs(
                StatusCode::BAD_REQUEST,
                "EISDIR",
                "cannot write the workspace root",
                &r.vm_path,
            ));
        }
        if let Some(parent) = r.host.parent() {
            if parents {
                std::fs::create_dir_all(parent).map_err(|e| io_error(e, &r.vm_path))?;
            } else if !parent.is_dir() {
                return Err(ApiError::fs(
                    StatusCode::NOT_FOUND,
                    "ENOENT",
                    "parent directory does not exist",
                    &r.vm_path,
                ));
            }
        }
        std::fs::write(&r.host, &body).map_err(|e| io_error(e, &r.vm_path))?;
        std::fs::set_permissions(&r.host, std::fs::Permissions::from_mode(mode))
            .map_err(|e| io_error(e, &r.vm_path))
    })
    .await?;
    Ok(
        Json(serde_json::json!({ "path": vm_path, "size": size, "mode": format!("{mode:04o}") }))
            .into_response(),
    )
}

fn entry(host: &FsPath, vm_path: &str) -> std::io::Result<FsEntry> {
    let meta = std::fs::symlink_metadata(host)?;
    let is_dir = meta.is_dir();
    let name = vm_path.rsplit('/').next().unwrap_or_default().to_string();
    Ok(FsEntry {
        name,
        path: vm_path.to_string(),
        kind: if is_dir { "directory" } else { "file" }.into(),
        size: meta.len(),
        mode: format!("{:04o}", meta.permissions().mode() & 0o7777),
        mod_time: rfc3339(meta.modified().unwrap_or(SystemTime::UNIX_EPOCH)),
        is_dir,
    })
}

/// `GET fs/list`: a directory's children (sorted), or the one entry of a file.
pub async fn list(
    State(sim): State<Arc<Sim>>,
    Path(name): Path<String>,
    Query(q): Query<PathQuery>,
) -> Result<Response, ApiError> {
    let r = prepare(&sim, &name, q.path.as_deref(), q.working_dir.as_deref()).await?;
    let listing = blocking(move || {
        let err = |e| io_error(e, &r.vm_path);
        let top = entry(&r.host, &r.vm_path).map_err(err)?;
        let mut entries = Vec::new();
        if top.is_dir {
            for item in std::fs::read_dir(&r.host).map_err(err)? {
                let item = item.map_err(err)?;
                let child = item.file_name().to_string_lossy().into_owned();
                entries.push(entry(&item.path(), &format!("{}/{child}", r.vm_path)).map_err(err)?);
            }
            entries.sort_by(|a, b| a.name.cmp(&b.name));
        } else {
            entries.push(top);
        }
        Ok(FsList {
            path: r.vm_path.clone(),
            count: entries.len(),
            entries,
        })
    })
    .await?;
    Ok(Json(listing).into_response())
}

#[derive(Debug, Default, Deserialize)]
pub struct DeleteBody {
    path: Option<String>,
    #[serde(rename = "workingDir")]
    working_dir: Option<String>,
    recursive: Option<bool>,
}

/// `DELETE fs/delete`: parameters in the query (SDKs) or a JSON body (docs).
pub async fn delete(
    State(sim): State<Arc<Sim>>,
    Path(name): Path<String>,
    Query(q): Query<PathQuery>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let b: DeleteBody = serde_json::from_slice(&body).unwrap_or_default();
    let path = q.path.or(b.path);
    let wd = q.working_dir.or(b.working_dir);
    let recursive = q.recursive.map(|r| r == "true").or(b.recursive).unwrap_or(false);
    let r = prepare(&sim, &name, path.as_deref(), wd.as_deref()).await?;
    let vm_path = r.vm_path.clone();
    blocking(move || {
        if r.vm_path == WORKSPACE {
            return Err(ApiError::fs(
                StatusCode::BAD_REQUEST,
                "EINVAL",
                "cannot delete the workspace root",
                &r.vm_path,
            ));
        }
        let meta = std::fs::symlink_metadata(&r.host).map_err(|e| io_error(e, &r.vm_path))?;
        let result = match (meta.is_dir(), recursive) {
            (true, true) => std::fs::remove_dir_all(&r.host),
            (true, false) => std::fs::remove_dir(&r.host),
            (false, _) => std::fs::remove_file(&r.host),
        };
        result.map_err(|e| io_error(e, &r.vm_path))
    })
    .await?;
    Ok(Json(serde_json::json!({ "deleted": [vm_path], "count": 1 })).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_inside_workspace_only() {
        let root = FsPath::new("/data/vms/a/workspace");
        let r = resolve(root, "/workspace/x/../y.txt", Some("/")).expect("inside");
        assert_eq!(r.vm_path, "/workspace/y.txt");
        assert_eq!(r.host, root.join("y.txt"));
        let r = resolve(root, "sub/f", Some("/workspace")).expect("relative");
        assert_eq!(r.vm_path, "/workspace/sub/f");
        let r = resolve(root, "f", None).expect("default working dir");
        assert_eq!(r.vm_path, "/workspace/f");
        assert_eq!(
            resolve(root, "/workspace", None).map(|r| r.host),
            Ok(root.to_path_buf())
        );
        for bad in [
            "/etc/passwd",
            "/workspace/../etc",
            "../../x",
            "/workspacex/y",
            "/../../",
        ] {
            assert!(resolve(root, bad, Some("/workspace")).is_err(), "{bad}");
        }
        assert!(resolve(root, "f", Some("/tmp")).is_err());
        assert!(resolve(root, "", None).is_err());
    }

    #[test]
    fn symlinks_out_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("ws");
        std::fs::create_dir(&root).expect("mkdir");
        std::os::unix::fs::symlink("/etc", root.join("out")).expect("symlink");
        assert!(check_inside(&root, &root.join("out/passwd")).is_err());
        assert!(check_inside(&root, &root.join("new/deeper/file")).is_ok());
    }

    #[test]
    fn modes() {
        assert_eq!(parse_mode(None), Ok(0o644));
        assert_eq!(parse_mode(Some("0755")), Ok(0o755));
        assert_eq!(parse_mode(Some("600")), Ok(0o600));
        assert!(parse_mode(Some("99")).is_err());
        assert!(parse_mode(Some("17777")).is_err());
    }
}
