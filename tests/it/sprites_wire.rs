//! Golden wire tests: what the client puts on the wire, captured by a bare TCP server.

use sprite_operator::sprites::{CreateSprite, SpriteConfig, SpritesClient};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Accepts one HTTP/1.1 request, answers `status` with `body`, returns the raw request.
async fn capture_one(listener: tokio::net::TcpListener, status: &str, body: &str) -> String {
    let (mut conn, _) = listener.accept().await.expect("accept");
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = conn.read(&mut buf).await.expect("read");
        raw.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&raw).to_string();
        if let Some(head_end) = text.find("\r\n\r\n") {
            let len = text[..head_end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().to_string())
                })
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(0);
            if raw.len() >= head_end + 4 + len {
                break;
            }
        }
        if n == 0 {
            break;
        }
    }
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(response.as_bytes()).await.expect("answer");
    String::from_utf8_lossy(&raw).into_owned()
}

#[tokio::test]
async fn create_request_golden() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = tokio::spawn(capture_one(
        listener,
        "201 Created",
        r#"{"name":"w-a","status":"cold"}"#,
    ));
    let client = SpritesClient::new(&format!("http://{addr}/"), "wire-token").expect("client");
    let req = CreateSprite {
        name: "w-a".into(),
        config: SpriteConfig {
            ram_mb: Some(1024),
            cpus: Some(2),
            region: None,
            storage_gb: Some(100),
        },
        labels: vec!["sprite-operator.dev/uid=u1".into()],
    };
    let sprite = client.create_sprite(&req).await.expect("create");
    assert_eq!(sprite.name, "w-a");
    let raw = server.await.expect("server");
    let (head, body) = raw.split_once("\r\n\r\n").expect("head and body");
    assert!(head.starts_with("POST /v1/sprites HTTP/1.1\r\n"), "{head}");
    let lower = head.to_ascii_lowercase();
    assert!(lower.contains("authorization: bearer wire-token\r\n"));
    assert!(lower.contains("content-type: application/json\r\n"));
    assert_eq!(
        body,
        r#"{"name":"w-a","config":{"ram_mb":1024,"cpus":2,"storage_gb":100},"labels":["sprite-operator.dev/uid=u1"]}"#
    );
}

#[tokio::test]
async fn list_fs_and_checkpoint_requests_golden() {
    let cases: Vec<(&str, &str, &str)> = vec![
        (
            "list",
            "200 OK",
            r#"{"sprites":[],"has_more":false,"next_continuation_token":null}"#,
        ),
        ("fs", "200 OK", ""),
        ("checkpoints", "200 OK", "[]"),
        ("kill", "410 Gone", r#"{"error":"gone"}"#),
    ];
    for (case, status, body) in cases {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(capture_one(listener, status, body));
        let client = SpritesClient::new(&format!("http://{addr}"), "t").expect("client");
        let expected_line = match case {
            "list" => {
                client.list_sprites(Some("ns-")).await.expect("list");
                "GET /v1/sprites?max_results=50&prefix=ns- HTTP/1.1"
            }
            "fs" => {
                client
                    .write_file("a", "/workspace/x y", &b"z"[..], 0o755, true)
                    .await
                    .expect("write");
                "PUT /v1/sprites/a/fs/write?path=%2Fworkspace%2Fx+y&workingDir=%2F&mode=0755&mkdirParents=true HTTP/1.1"
            }
            "checkpoints" => {
                client.list_checkpoints("a").await.expect("list");
                "GET /v1/sprites/a/checkpoints HTTP/1.1"
            }
            _ => {
                client
                    .kill_session("a", "42", "TERM")
                    .await
                    .expect("410 is success");
                "POST /v1/sprites/a/exec/42/kill?signal=TERM&timeout=0s HTTP/1.1"
            }
        };
        let raw = server.await.expect("server");
        assert_eq!(raw.lines().next(), Some(expected_line), "{case}");
    }
}
