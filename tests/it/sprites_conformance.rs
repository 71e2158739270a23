//! Drives the simulator with the official Python SDK (decision 13): starts a sim, then runs
//! `$SPRITE_PYTHON -m pytest tests/conformance` with SIM_URL and SIM_TOKEN.

use std::time::Duration;

use crate::sim_support::{self, TOKEN};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sprites_py_sdk_conforms() {
    let Some(python) = std::env::var_os("SPRITE_PYTHON") else {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("SPRITE_PYTHON is not set: CI must run the sprites-py conformance suite");
        }
        eprintln!(
            "skipping the sprites-py conformance suite: SPRITE_PYTHON is not set (make test sets it to a venv \
             with tests/conformance/requirements.txt)"
        );
        return;
    };
    let t = sim_support::start().await;
    let suite = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/conformance");
    let mut cmd = tokio::process::Command::new(python);
    cmd.args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
        .arg(&suite)
        .env("SIM_URL", t.handle.url())
        .env("SIM_TOKEN", TOKEN)
        .env("SPRITES_CLIENT_SIGNALS", "0")
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(300), cmd.output())
        .await
        .expect("pytest finished in time")
        .expect("pytest started");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "sprites-py conformance failed:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("passed") && !stdout.contains("skipped"),
        "{stdout}"
    );
    t.handle.shutdown().await.expect("shutdown");
}
