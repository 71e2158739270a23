//! Every client endpoint against the in-process simulator over real sockets.

use std::time::Duration;

use sprite_operator::sprites::{CreateSprite, Error, ExecRequest, SpriteConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::sim_support::{self, TOKEN, TestSim};

fn sh(script: &str) -> ExecRequest {
    ExecRequest::new(["sh", "-c", script])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sprite_crud_labels_and_pagination() {
    let t = sim_support::start().await;
    let req = CreateSprite {
        name: "crud-a".into(),
        config: SpriteConfig {
            ram_mb: Some(2048),
            cpus: Some(2),
            region: Some("ord".into()),
            storage_gb: None,
        },
        labels: vec!["sprite-operator.dev/uid=u-1".into()],
    };
    let created = t.client.create_sprite(&req).await.expect("create");
    assert_eq!(
        (created.name.as_str(), created.status.as_str()),
        ("crud-a", "cold")
    );
    assert_eq!(created.config.ram_mb, Some(2048));
    assert!(created.id.starts_with("sprite-"));
    assert!(matches!(
        t.client.create_sprite(&req).await,
        Err(Error::AlreadyExists { .. })
    ));

    let got = t.client.get_sprite("crud-a").await.expect("get");
    assert_eq!(got.labels, vec!["sprite-operator.dev/uid=u-1"]);
    assert_eq!(got.created_at, created.created_at);
    let updated = t
        .client
        .update_labels("crud-a", vec!["x=1".into(), "y=2".into()])
        .await
        .expect("update");
    assert_eq!(updated.labels, vec!["x=1", "y=2"]);

    for i in 0..57 {
        t.create(&format!("page-{i:03}")).await;
    }
    let all = t.client.list_sprites(None).await.expect("list all");
    assert_eq!(all.len(), 58);
    let paged = t.client.list_sprites(Some("page-")).await.expect("list prefix");
    assert_eq!(paged.len(), 57);
    let first = t
        .client
        .list_sprites_page(Some("page-"), None)
        .await
        .expect("page");
    assert!(first.has_more && first.sprites.len() == 50);

    t.client.delete_sprite("crud-a").await.expect("delete");
    assert!(matches!(
        t.client.get_sprite("crud-a").await,
        Err(Error::NotFound { .. })
    ));
    assert!(matches!(
        t.client.delete_sprite("crud-a").await,
        Err(Error::NotFound { .. })
    ));
    t.handle.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_exit_codes_output_env_cwd_stdin() {
    let t = sim_support::start().await;
    t.create("exec-a").await;
    let out = t
        .client
        .exec_collect("exec-a", &sh("echo out; echo err >&2; exit 3"))
        .await
        .expect("exec");
    assert_eq!(
        (out.exit_code, out.stdout.as_slice(), out.stderr.as_slice()),
        (3, &b"out\n"[..], &b"err\n"[..])
    );

    let out = t
        .client
        .exec_collect(
            "exec-a",
            &sh("echo \"$FOO|$HOME|${SIM_TOKEN:-none}\"").env("FOO", "bar baz"),
        )
        .await
        .expect("env");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "bar baz|/workspace|none\n");

    t.client
        .mkdir_p("exec-a", "/workspace/sub/dir")
        .await
        .expect("mkdir");
    let out = t
        .client
        .exec_collect("exec-a", &ExecRequest::new(["pwd"]).dir("/workspace/sub/dir"))
        .await
        .expect("pwd");
    assert_eq!(out.stdout, b"/workspace/sub/dir\n");

    // Files written through the API are what the VM's commands see at /workspace.
    t.client
        .write_file(
            "exec-a",
            "/workspace/hello.txt",
            &b"from the fs api"[..],
            0o644,
            true,
        )
        .await
        .expect("write");
    let out = t
        .client
        .exec_collect("exec-a", &ExecRequest::new(["cat", "/workspace/hello.txt"]))
        .await
        .expect("cat");
    assert_eq!(out.stdout, b"from the fs api");
    let out = t
        .client
        .exec_collect("exec-a", &sh("echo made > /workspace/by-exec"))
        .await
        .expect("exec write");
    assert_eq!(out.exit_code, 0);
    assert_eq!(
        &t.client
            .read_file("exec-a", "/workspace/by-exec")
            .await
            .expect("read")[..],
        b"made\n"
    );

    // More than every buffer on the way (frames, channels, pipes) holds: stdin and output must flow
    // at the same time.
    let input: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let out = t
        .client
        .exec_collect("exec-a", &ExecRequest::new(["cat"]).stdin(input.clone()))
        .await
        .expect("stdin");
    assert_eq!(out.stdout, input);

    let out = t
        .client
        .exec_collect("exec-a", &ExecRequest::new(["no-such-command-xyz"]))
        .await
        .expect("runs");
    assert_eq!(out.exit_code, 127);
    assert!(!out.stderr.is_empty());

    let out = t
        .client
        .exec_collect("exec-a", &sh("head -c 100000 /dev/zero").output_limit(1000))
        .await
        .expect("cap");
    assert!(out.truncated && out.stdout.len() == 1000);

    assert!(matches!(
        t.client.exec_collect("nope", &sh("true")).await,
        Err(Error::NotFound { .. })
    ));
    t.handle.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filesystem_binary_round_trips_modes_list_delete() {
    let t = sim_support::start().await;
    t.create("fs-a").await;
    let every_byte: Vec<u8> = (0..=255u8).collect();
    t.client
        .write_file("fs-a", "/workspace/bin/all.bin", every_byte.clone(), 0o600, true)
        .await
        .expect("write");
    assert_eq!(
        t.client
            .read_file("fs-a", "/workspace/bin/all.bin")
            .await
            .expect("read")
            .to_vec(),
        every_byte
    );

    let big: Vec<u8> = (0..10 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    t.client
        .write_file("fs-a", "/workspace/big.bin", big.clone(), 0o644, false)
        .await
        .expect("write big");
    let back = t
        .client
        .read_file("fs-a", "/workspace/big.bin")
        .await
        .expect("read big");
    assert!(back.len() == big.len() && back.as_ref() == big.as_slice());

    let listed = t.client.list_dir("fs-a", "/workspace").await.expect("list");
    let names: Vec<_> = listed.iter().map(|e| (e.name.as_str(), e.is_dir)).collect();
    assert_eq!(names, vec![("big.bin", false), ("bin", true)]);
    let file = t
        .client
        .list_dir("fs-a", "/workspace/bin/all.bin")
        .await
        .expect("stat");
    assert_eq!(
        (file.len(), file[0].mode.as_str(), file[0].size),
        (1, "0600", 256)
    );

    let no_parent = t
        .client
        .write_file("fs-a", "/workspace/missing/x", &b"x"[..], 0o644, false)
        .await;
    assert!(matches!(no_parent, Err(Error::NotFound { .. })), "{no_parent:?}");
    let escape = t.client.read_file("fs-a", "/workspace/../../etc/passwd").await;
    assert!(
        matches!(escape, Err(Error::Api { status: 400, .. })),
        "{escape:?}"
    );
    let outside = t.client.read_file("fs-a", "/etc/passwd").await;
    assert!(
        matches!(outside, Err(Error::Api { status: 400, .. })),
        "{outside:?}"
    );

    let not_empty = t.client.delete_path("fs-a", "/workspace/bin", false).await;
    assert!(
        matches!(not_empty, Err(Error::Api { status: 400, .. })),
        "{not_empty:?}"
    );
    t.client
        .delete_path("fs-a", "/workspace/bin", true)
        .await
        .expect("delete -r");
    let gone = t.client.read_file("fs-a", "/workspace/bin/all.bin").await;
    assert!(matches!(gone, Err(Error::NotFound { .. })));
    t.handle.shutdown().await.expect("shutdown");
}

const ECHO_SERVER: &str = r#"
import socket, sys
prefix = sys.argv[1].encode()
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 9000))
s.listen()
while True:
    c, _ = s.accept()
    while True:
        d = c.recv(65536)
        if not d:
            break
        c.sendall(prefix + d)
    c.close()
"#;

async fn proxy_when_ready(t: &TestSim, name: &str) -> sprite_operator::sprites::ProxyStream {
    for _ in 0..100 {
        match t.client.proxy(name, "localhost", 9000).await {
            Ok(s) => return s,
            Err(Error::Stream { .. }) => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(e) => panic!("proxy: {e}"),
        }
    }
    panic!("echo server in {name} never listened");
}

async fn echo(stream: &mut sprite_operator::sprites::ProxyStream, msg: &[u8], expect: &[u8]) {
    stream.write_all(msg).await.expect("write");
    let mut got = vec![0u8; expect.len()];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut got))
        .await
        .expect("in time")
        .expect("read");
    assert_eq!(got, expect);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_echo_per_vm_network_namespaces_and_sleep_cuts() {
    let t = sim_support::start().await;
    for name in ["px-a", "px-b"] {
        t.create(name).await;
        let req =
            ExecRequest::new(["python3", "-c", ECHO_SERVER, name]).max_run_after_disconnect(Duration::ZERO);
        let id = t.client.exec_detached(name, &req).await.expect("detached");
        assert!(!id.is_empty());
    }
    // Both VMs listen on 9000: each has its own network namespace (decision 2).
    let mut a = proxy_when_ready(&t, "px-a").await;
    let mut b = proxy_when_ready(&t, "px-b").await;
    echo(&mut a, b"ping", b"px-aping").await;
    echo(&mut b, b"pong", b"px-bpong").await;
    let big = vec![7u8; 300_000];
    let mut expect = b"px-a".to_vec();
    expect.extend_from_slice(&big);
    a.write_all(&big).await.expect("write big");
    let mut got = Vec::new();
    while got.len() < big.len() {
        let mut buf = vec![0u8; 65536];
        let n = tokio::time::timeout(Duration::from_secs(5), a.read(&mut buf))
            .await
            .expect("time")
            .expect("read");
        assert!(n > 0, "early EOF");
        got.extend_from_slice(&buf[..n]);
    }
    assert!(got.iter().all(|b| *b == 7 || b"px-a".contains(b)));

    let sessions = t.client.list_sessions("px-a").await.expect("sessions");
    assert_eq!(sessions.len(), 1);
    // Sleep cuts proxied connections; the server process survives and serves after the wake.
    t.force_sleep("px-a").await;
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), a.read(&mut buf))
        .await
        .expect("cut in time")
        .unwrap_or(0);
    assert_eq!(n, 0, "connection cut by sleep");
    let mut again = proxy_when_ready(&t, "px-a").await;
    echo(&mut again, b"back", b"px-aback").await;
    let stats = t.vm_stats("px-a").await;
    assert_eq!(stats["wakes"]["proxy"], 1, "{stats}");

    let id = sessions[0].id.clone();
    t.client.kill_session("px-a", &id, "TERM").await.expect("kill");
    for _ in 0..100 {
        if t.client.list_sessions("px-a").await.expect("sessions").is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(t.client.list_sessions("px-a").await.expect("sessions").is_empty());
    t.client
        .kill_session("px-a", &id, "TERM")
        .await
        .expect("killing a gone session is fine");
    t.handle.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_then_restore_brings_back_files_and_ends_sessions() {
    let t = sim_support::start().await;
    t.create("cp-a").await;
    t.client
        .write_file("cp-a", "/workspace/state.txt", &b"version one"[..], 0o640, true)
        .await
        .expect("write");
    let id = t
        .client
        .create_checkpoint("cp-a", "before update")
        .await
        .expect("checkpoint");
    assert_eq!(id, "v1");
    let listed = t.client.list_checkpoints("cp-a").await.expect("list");
    assert_eq!(
        (listed.len(), listed[0].id.as_str(), listed[0].comment.as_str()),
        (1, "v1", "before update")
    );

    t.client
        .write_file("cp-a", "/workspace/state.txt", &b"version two"[..], 0o644, true)
        .await
        .expect("overwrite");
    t.client
        .write_file("cp-a", "/workspace/new.txt", &b"later"[..], 0o644, true)
        .await
        .expect("new file");
    t.client
        .exec_detached("cp-a", &ExecRequest::new(["sleep", "60"]))
        .await
        .expect("detached");
    assert_eq!(t.client.list_sessions("cp-a").await.expect("sessions").len(), 1);

    t.client.restore_checkpoint("cp-a", &id).await.expect("restore");
    assert_eq!(
        &t.client
            .read_file("cp-a", "/workspace/state.txt")
            .await
            .expect("read")[..],
        b"version one"
    );
    assert!(matches!(
        t.client.read_file("cp-a", "/workspace/new.txt").await,
        Err(Error::NotFound { .. })
    ));
    let mode = &t
        .client
        .list_dir("cp-a", "/workspace/state.txt")
        .await
        .expect("stat")[0]
        .mode;
    assert_eq!(mode, "0640");
    assert!(
        t.client.list_sessions("cp-a").await.expect("sessions").is_empty(),
        "restore ends sessions"
    );
    assert!(matches!(
        t.client.restore_checkpoint("cp-a", "v9").await,
        Err(Error::NotFound { .. })
    ));
    t.handle.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sleep_and_wake_counted_by_cause_metadata_never_wakes() {
    let t = sim_support::start_with(tempfile::tempdir().expect("tempdir"), |c| {
        // Long enough that a loaded machine's calls land inside the awake
        // and warm windows the assertions below rely on.
        c.idle_timeout = Duration::from_millis(1500);
        c.cold_after = Duration::from_secs(3);
    })
    .await;
    t.create("sw-a").await;
    let quiet = |s: &serde_json::Value| s["total_wakes"].as_u64();
    // Metadata calls never wake.
    t.client.get_sprite("sw-a").await.expect("get");
    t.client.list_sprites(None).await.expect("list");
    t.client
        .update_labels("sw-a", vec!["a=b".into()])
        .await
        .expect("update");
    let s = t.vm_stats("sw-a").await;
    assert_eq!((s["status"].as_str(), quiet(&s)), (Some("cold"), Some(0)), "{s}");

    t.client
        .exec_collect("sw-a", &ExecRequest::new(["true"]))
        .await
        .expect("exec");
    assert_eq!(t.client.get_sprite("sw-a").await.expect("get").status, "running");
    t.client.read_file("sw-a", "/workspace").await.ok();
    assert_eq!(
        t.vm_stats("sw-a").await["total_wakes"],
        1,
        "an awake VM is not woken again"
    );

    t.force_sleep("sw-a").await;
    assert_eq!(t.client.get_sprite("sw-a").await.expect("get").status, "warm");
    t.client.list_dir("sw-a", "/workspace").await.expect("fs");
    t.force_sleep("sw-a").await;
    t.client.list_checkpoints("sw-a").await.expect("checkpoints");
    t.force_sleep("sw-a").await;
    t.client
        .exec_collect("sw-a", &ExecRequest::new(["true"]))
        .await
        .expect("exec");
    let s = t.vm_stats("sw-a").await;
    assert_eq!(
        s["wakes"],
        serde_json::json!({"exec": 2, "fs": 1, "checkpoint": 1}),
        "{s}"
    );
    assert_eq!(s["total_wakes"], 4);

    // Idle: warm after the idle timeout, then cold (polled: metadata calls
    // do not wake, so polling does not disturb it).
    let mut seen: Vec<String> = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while seen.last().map(String::as_str) != Some("cold") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never went cold: {seen:?}"
        );
        let status = t.client.get_sprite("sw-a").await.expect("get").status;
        if seen.last() != Some(&status) {
            seen.push(status);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(seen, ["running", "warm", "cold"], "status sequence while idle");

    // The record names routes without query strings.
    let stats = t.stats().await;
    let calls = stats["calls"].as_array().expect("calls");
    let creates = calls.iter().filter(|c| c["route"] == "POST /v1/sprites").count();
    assert_eq!(creates, 1);
    assert!(
        calls
            .iter()
            .any(|c| c["route"] == "GET /v1/sprites/{name}/fs/list" && c["sprite"] == "sw-a")
    );
    assert!(
        calls
            .iter()
            .all(|c| !c["route"].as_str().unwrap_or("?").contains('?'))
    );
    assert!(
        calls
            .iter()
            .all(|c| c["unix_ms"].as_u64().is_some_and(|ms| ms > 1_600_000_000_000))
    );
    t.handle.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_vms_labels_ids_files_and_checkpoints() {
    let t = sim_support::start().await;
    let req = CreateSprite {
        name: "rs-a".into(),
        labels: vec!["keep=me".into()],
        ..Default::default()
    };
    let before = t.client.create_sprite(&req).await.expect("create");
    t.client
        .write_file("rs-a", "/workspace/f", &b"persisted"[..], 0o644, true)
        .await
        .expect("write");
    t.client.create_checkpoint("rs-a", "c").await.expect("checkpoint");
    t.client
        .exec_detached("rs-a", &ExecRequest::new(["sleep", "60"]))
        .await
        .expect("process");
    let TestSim { handle, dir, .. } = t;
    handle.shutdown().await.expect("shutdown");

    let t = sim_support::start_with(dir, |_| {}).await;
    let after = t.client.get_sprite("rs-a").await.expect("still there");
    assert_eq!(
        (&after.id, &after.labels, &after.created_at),
        (&before.id, &before.labels, &before.created_at)
    );
    assert_eq!(after.status, "cold");
    assert_eq!(
        &t.client.read_file("rs-a", "/workspace/f").await.expect("file")[..],
        b"persisted"
    );
    assert_eq!(
        t.client
            .list_checkpoints("rs-a")
            .await
            .expect("checkpoints")
            .len(),
        1
    );
    assert!(
        t.client.list_sessions("rs-a").await.expect("sessions").is_empty(),
        "processes do not survive"
    );
    assert_eq!(
        t.client
            .exec_collect("rs-a", &ExecRequest::new(["true"]))
            .await
            .expect("exec")
            .exit_code,
        0
    );
    t.handle.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_not_found_bad_name_and_control_shapes() {
    let t = sim_support::start().await;
    t.create("au-a").await;
    let http = reqwest::Client::new();
    let base = t.handle.url();
    for (method, path) in [
        (reqwest::Method::GET, "/v1/sprites"),
        (reqwest::Method::GET, "/v1/sprites/au-a"),
        (reqwest::Method::GET, "/sim/stats"),
        (reqwest::Method::GET, "/v1/nothing"),
    ] {
        let r = http
            .request(method, format!("{base}{path}"))
            .bearer_auth("wrong")
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 401, "{path}");
        let body: serde_json::Value = r.json().await.expect("json");
        assert_eq!(body["error"], "unauthorized");
        assert!(body["message"].is_string());
    }
    let r = http
        .get(format!("{base}/v1/sprites/au-a"))
        .send()
        .await
        .expect("no token");
    assert_eq!(r.status(), 401);

    let r = http
        .get(format!("{base}/v1/sprites/ghost"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("404");
    assert_eq!(r.status(), 404);
    let body: serde_json::Value = r.json().await.expect("json");
    assert_eq!(body["error"], "not_found");
    let r = http
        .get(format!("{base}/v1/sprites/Bad_Name"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("400");
    assert_eq!(r.status(), 400);
    let r = http
        .post(format!("{base}/v1/sprites"))
        .bearer_auth(TOKEN)
        .body("{")
        .send()
        .await
        .expect("400");
    assert_eq!(r.status(), 400);

    let r = http
        .get(format!("{base}/v1/sprites/au-a/control"))
        .bearer_auth(TOKEN)
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .send()
        .await
        .expect("control");
    assert_eq!(r.status(), 404);
    assert!(!r.text().await.expect("body").is_empty());

    let wrong = sprite_operator::sprites::SpritesClient::new(&base, "not-the-token").expect("client");
    assert!(matches!(
        wrong.get_sprite("au-a").await,
        Err(Error::Unauthorized { status: 401, .. })
    ));
    let exec = wrong.exec_collect("au-a", &ExecRequest::new(["true"])).await;
    assert!(matches!(exec, Err(Error::Unauthorized { .. })), "{exec:?}");
    assert!(matches!(
        t.client.read_file("ghost", "/workspace/x").await,
        Err(Error::NotFound { .. })
    ));
    assert!(matches!(
        t.client.proxy("ghost", "", 1).await,
        Err(Error::NotFound { .. })
    ));
    let nothing = t.client.proxy("au-a", "localhost", 1).await;
    assert!(
        matches!(nothing, Err(Error::Stream { .. })),
        "refused port: {nothing:?}"
    );
    t.handle.shutdown().await.expect("shutdown");
}
