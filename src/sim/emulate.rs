//! Benchmark VMs (`SimConfig::bench_vms`): a command costs no process and
//! no network namespace. It is recorded and answered as the real command
//! would answer for the operator's bootstrap, server and heartbeat steps;
//! the files those steps leave behind are written for real (the filesystem
//! API works as ever). For fleet benchmarks only: never the default, never
//! what the correctness tests run on, and a VM's proxy reaches nothing.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// What an emulated command does.
#[derive(Debug, PartialEq, Eq)]
pub struct Outcome {
    pub stdout: Vec<u8>,
    /// None: it keeps running (a detached server) until killed.
    pub exit: Option<u8>,
}

impl Outcome {
    fn done() -> Self {
        Self {
            stdout: vec![],
            exit: Some(0),
        }
    }
}

/// Runs `argv` as the operator's steps expect, against `workspace` (the
/// host directory that is `/workspace` inside the VM).
pub fn run(argv: &[String], workspace: &Path) -> std::io::Result<Outcome> {
    let program = argv.first().map(String::as_str).unwrap_or_default();
    let script = match argv {
        [sh, flag, script, ..] if sh.ends_with("sh") && flag == "-c" => Some(script.as_str()),
        _ => None,
    };
    if program == "mkdir" {
        for dir in argv.iter().skip(1).filter(|a| !a.starts_with('-')) {
            std::fs::create_dir_all(inside(workspace, dir))?;
        }
        return Ok(Outcome::done());
    }
    if let Some(script) = script {
        if script.contains("-m venv") {
            // What `python3 -m venv /workspace/.venv` leaves that later steps test for.
            let bin = inside(workspace, "/workspace/.venv/bin");
            std::fs::create_dir_all(&bin)?;
            for exe in ["python3", "pip"] {
                executable(&bin.join(exe))?;
            }
            return Ok(Outcome::done());
        }
        if script.contains("exec \"$@\"") {
            // The runtime server, started detached: it runs until killed.
            return Ok(Outcome {
                stdout: vec![],
                exit: None,
            });
        }
        if script.contains("heartbeat-result") {
            return heartbeat(script, workspace);
        }
    }
    if argv.iter().any(|a| a.ends_with("db.py")) {
        std::fs::write(inside(workspace, "/workspace/agent.db"), b"")?;
    }
    // pip install, the schema, `true`, anything else: success, no output.
    Ok(Outcome::done())
}

/// The heartbeat wrapper writes `<tick> <code> <start> <end>` and the
/// runtime's summary line for the operator to collect.
fn heartbeat(script: &str, workspace: &Path) -> std::io::Result<Outcome> {
    let tick = script
        .split("printf '%s %s %s %s\\n%s\\n' ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or("0");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let dir = inside(workspace, "/workspace/.operator");
    std::fs::create_dir_all(&dir)?;
    let summary = r#"{"outcome": "idle", "emulated": true}"#;
    std::fs::write(
        dir.join("heartbeat-result"),
        format!("{tick} 0 {now} {now}\n{summary}\n"),
    )?;
    Ok(Outcome::done())
}

/// A VM path under `/workspace` as a host path; other paths land there too.
fn inside(workspace: &Path, vm_path: &str) -> PathBuf {
    let rel = vm_path.strip_prefix("/workspace").unwrap_or(vm_path);
    workspace.join(rel.trim_start_matches('/'))
}

fn executable(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, b"")?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn bootstrap_steps_leave_their_files_and_the_server_keeps_running() {
        let ws = tempfile::tempdir().unwrap();
        let w = ws.path();
        assert_eq!(
            run(&argv(&["mkdir", "-p", "/workspace/src", "/workspace/memory"]), w).unwrap(),
            Outcome::done()
        );
        assert!(w.join("src").is_dir() && w.join("memory").is_dir());
        let venv = "test -x /workspace/.venv/bin/python3 || python3 -m venv /workspace/.venv";
        run(&argv(&["sh", "-c", venv]), w).unwrap();
        assert!(w.join(".venv/bin/python3").is_file());
        run(
            &argv(&["/workspace/.venv/bin/python3", "/workspace/src/db.py", "init"]),
            w,
        )
        .unwrap();
        assert!(w.join("agent.db").is_file());
        let server = run(
            &argv(&[
                "sh",
                "-c",
                ". /workspace/.secrets/server.env && exec \"$@\"",
                "sh",
                "py",
            ]),
            w,
        )
        .unwrap();
        assert_eq!(server.exit, None);
    }

    #[test]
    fn a_heartbeat_leaves_the_result_the_operator_collects() {
        let ws = tempfile::tempdir().unwrap();
        let script = "mkdir -p /workspace/.operator; start=$(date +%s); out=$(true); code=$?; \
                      printf '%s %s %s %s\\n%s\\n' 1767225600 \"$code\" \"$start\" \"$end\" \"$out\" > \
                      /workspace/.operator/heartbeat-result.tmp && mv x /workspace/.operator/heartbeat-result";
        run(&argv(&["sh", "-c", script]), ws.path()).unwrap();
        let text = std::fs::read_to_string(ws.path().join(".operator/heartbeat-result")).unwrap();
        assert!(text.starts_with("1767225600 0 "), "{text}");
    }
}
