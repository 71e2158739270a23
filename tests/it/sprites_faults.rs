//! Retries under injected faults, and the token staying out of logs and errors.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sprite_operator::sprites::{CreateSprite, Error, ExecRequest, RetryPolicy, SpritesClient, Timeouts};

use crate::sim_support::{self, TOKEN};

/// A `tracing` writer into a shared buffer.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().map(|b| b.clone()).unwrap_or_default()).into_owned()
    }
}

const SECRET_ENV: &str = "env-secret-value-93ad";

// One thread, so the sim's and the client's tasks all log into the captured subscriber.
#[tokio::test(flavor = "current_thread")]
async fn fifty_idempotent_calls_survive_503s_and_429s_and_logs_hold_no_token() {
    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let t = sim_support::start().await;
    t.create("flt-a").await;
    t.client
        .write_file("flt-a", "/workspace/f", &b"data"[..], 0o644, true)
        .await
        .expect("write");
    let fault = serde_json::json!({"error_rate": 0.2, "error_codes": [429, 503], "retry_after_secs": 0});
    t.set_faults(serde_json::json!({"seed": 42, "rest": fault, "fs": fault, "exec": fault}))
        .await;
    for i in 0..50 {
        match i % 4 {
            0 => drop(t.client.get_sprite("flt-a").await.expect("get")),
            1 => drop(t.client.list_sprites(None).await.expect("list")),
            2 => assert_eq!(
                &t.client.read_file("flt-a", "/workspace/f").await.expect("read")[..],
                b"data"
            ),
            _ => drop(t.client.list_dir("flt-a", "/workspace").await.expect("list dir")),
        }
    }
    // Exec handshakes are retried too (a refused handshake started nothing).
    for _ in 0..5 {
        let req = ExecRequest::new(["sh", "-c", "echo $X"]).env("X", SECRET_ENV);
        let out = t.client.exec_collect("flt-a", &req).await.expect("exec");
        assert_eq!(out.stdout, format!("{SECRET_ENV}\n").as_bytes());
    }
    let stats = t.stats().await;
    let injected = stats["calls"]
        .as_array()
        .expect("calls")
        .iter()
        .filter(|c| c["status"] == 503 || c["status"] == 429)
        .count();
    assert!(injected >= 5, "faults were injected: {injected}");

    // A dropped exec socket is an error, never a silent success.
    t.set_faults(serde_json::json!({"exec": {"drop_rate": 1.0}}))
        .await;
    let dropped = t
        .client
        .exec_collect("flt-a", &ExecRequest::new(["sleep", "2"]))
        .await;
    assert!(matches!(dropped, Err(Error::Stream { .. })), "{dropped:?}");
    t.handle.shutdown().await.expect("shutdown");

    let text = logs.text();
    assert!(text.contains("retrying Sprites API call"), "retries were logged");
    assert!(!text.contains(TOKEN), "token in logs");
    assert!(!text.contains(SECRET_ENV), "exec env value in logs");
}

fn assert_clean(what: &str, e: &Error) {
    for shown in [format!("{e}"), format!("{e:?}")] {
        assert!(!shown.contains(TOKEN), "{what}: token in {shown}");
        assert!(!shown.contains(SECRET_ENV), "{what}: env value in {shown}");
        for q in ["path=", "cmd=", "env=", "workingDir"] {
            assert!(!shown.contains(q), "{what}: query string in {shown}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_kind_and_the_client_debug_hide_the_token() {
    let t = sim_support::start().await;
    t.create("err-a").await;
    let no_retry = RetryPolicy {
        max_attempts: 1,
        ..sim_support::fast_retries()
    };
    let client = t.client.clone().with_retry_policy(no_retry.clone());
    assert!(!format!("{client:?}").contains(TOKEN));
    let secret_req = ExecRequest::new(["env"]).env("KEY", SECRET_ENV);
    assert!(!format!("{secret_req:?}").contains(SECRET_ENV));

    let mut errors: Vec<(&str, Error)> = Vec::new();
    let wrong = SpritesClient::new(&t.handle.url(), format!("{TOKEN}-wrong")).expect("client");
    assert!(!format!("{wrong:?}").contains(TOKEN));
    errors.push(("unauthorized", wrong.get_sprite("err-a").await.expect_err("401")));
    errors.push((
        "unauthorized exec",
        wrong.exec_collect("err-a", &secret_req).await.expect_err("401"),
    ));
    errors.push((
        "not found fs",
        client
            .read_file("err-a", "/workspace/none")
            .await
            .expect_err("404"),
    ));
    errors.push((
        "not found exec",
        client.exec_collect("ghost", &secret_req).await.expect_err("404"),
    ));
    let dup = CreateSprite {
        name: "err-a".into(),
        ..Default::default()
    };
    errors.push(("exists", client.create_sprite(&dup).await.expect_err("409")));
    errors.push((
        "bad request",
        client.read_file("err-a", "/etc/passwd").await.expect_err("400"),
    ));

    t.set_faults(
        serde_json::json!({"rest": {"error_rate": 1.0, "error_codes": [429], "retry_after_secs": 0},
                                     "fs": {"error_rate": 1.0, "error_codes": [503]}}),
    )
    .await;
    errors.push(("rate limited", client.get_sprite("err-a").await.expect_err("429")));
    errors.push((
        "api 503",
        client.read_file("err-a", "/workspace/x").await.expect_err("503"),
    ));
    t.set_faults(serde_json::json!({"fs": {"latency_ms": 400}, "exec": {"drop_rate": 1.0}}))
        .await;
    let slow = client.clone().with_timeouts(Timeouts {
        request: Duration::from_millis(100),
        ..Default::default()
    });
    errors.push((
        "timeout",
        slow.read_file("err-a", "/workspace/x")
            .await
            .expect_err("timeout"),
    ));
    let slow_exec = ExecRequest::new(["sleep", "2"]).env("KEY", SECRET_ENV);
    errors.push((
        "stream",
        client
            .exec_collect("err-a", &slow_exec)
            .await
            .expect_err("dropped"),
    ));
    t.set_faults(serde_json::json!({})).await;

    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let nowhere = SpritesClient::new(&format!("http://{closed}"), TOKEN)
        .expect("client")
        .with_retry_policy(no_retry);
    errors.push((
        "transport",
        nowhere
            .read_file("err-a", "/workspace/x")
            .await
            .expect_err("refused"),
    ));
    errors.push((
        "transport ws",
        nowhere
            .exec_collect("err-a", &secret_req)
            .await
            .expect_err("refused"),
    ));
    errors.push((
        "invalid",
        SpritesClient::new("http://h", format!("{TOKEN}\n")).expect_err("bad token"),
    ));
    errors.push((
        "decode",
        Error::Decode {
            url: "http://h/v1/sprites".into(),
            message: "bad JSON".into(),
        },
    ));
    errors.push((
        "remote",
        Error::Remote {
            message: "disk full".into(),
        },
    ));

    let kinds: std::collections::BTreeSet<_> = errors.iter().map(|(_, e)| e.metric_label()).collect();
    assert_eq!(kinds.len(), 11, "every kind covered: {kinds:?}");
    for (what, e) in &errors {
        assert_clean(what, e);
    }
    t.handle.shutdown().await.expect("shutdown");
}
