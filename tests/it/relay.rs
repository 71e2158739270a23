//! The relay end to end: the real apiserver, the Sprite controller, the
//! simulator and the runtime, with the relay in-process on 127.0.0.1:0, on
//! an event loop of its own built as `sprite-operator relay` builds it (no
//! time driver: a timer that would land there panics, as in production).
//!
//! Each User's gateway token is provisioned by creating its `<user>-gateway`
//! Secret before the User; the User reconciler adopts it and publishes its
//! hash, which is what the relay checks.

use std::collections::HashMap;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use sprite_operator::api::User;
use sprite_operator::api::session;
use sprite_operator::api::sprite::default_vm_name;
use sprite_operator::relay::{
    self, Connector, Directory, JwtVerifier, RelayConfig, RelayHandle, SUBPROTOCOL, gateway_token_sha256,
};
use sprite_operator::sprites::ExecRequest;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::common::{eventually, say};
use crate::sprite_controller::{Env, SIM_TOKEN, apply, sprite_doc};

pub(crate) type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;

const HS_SECRET: &[u8] = b"relay-it-shared-secret-0123456789abcdef";
const ALICE_TOKEN: &str = "a1ce0000111122223333444455556666";
const BOB_TOKEN: &str = "b0b00000111122223333444455556666";
const PROXY_ROUTE: &str = "GET /v1/sprites/{name}/proxy";

fn fixture(name: &str) -> String {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/relay")
        .join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

fn hs256(claims: Value, secret: &[u8]) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret),
    )
    .unwrap()
}

/// A User with a subject whose gateway token is `token`: its Secret exists
/// first, so the User reconciler publishes that token's hash.
async fn create_user(env: &Env, name: &str, subject: &str, token: &str) {
    // Labelled with the User's name: a gateway Secret that nothing marks as
    // the User's is not used (docs/tenancy.md).
    let secret = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": format!("{name}-gateway"),
        "labels": {"sprite-operator.dev/user": name}}, "stringData": {"token": token}});
    apply(&env.ns, &secret).await;
    let doc = json!({"apiVersion": "sprite-operator.dev/v1alpha1", "kind": "User",
        "metadata": {"name": name}, "spec": {"email": format!("{name}@example.com"), "subject": subject, "tier": "free"}});
    apply(&env.ns, &doc).await;
    let want = gateway_token_sha256(token);
    eventually(&format!("{name}'s token hash in status"), 60, || async {
        let u = env.ns.api::<User>().get(name).await.map_err(|e| e.to_string())?;
        match u.status.and_then(|s| s.gateway_token_sha256) {
            Some(h) if h == want => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
}

/// A Sprite owned by `user`, with a short VM name.
async fn create_sprite(env: &Env, name: &str, user: &str) {
    apply(&env.ns, &sprite_doc(name, json!({"userRef": {"name": user}}))).await;
}

async fn start_relay(env: &Env, tune: impl FnOnce(&mut RelayConfig)) -> RelayHandle {
    start_relay_over(env, Some(&env.ns.name), tune).await
}

/// A relay watching `namespace`, or every namespace with None.
pub(crate) async fn start_relay_over(
    env: &Env,
    namespace: Option<&str>,
    tune: impl FnOnce(&mut RelayConfig),
) -> RelayHandle {
    let (directory, watch) = Directory::watch(env.ns.client.clone(), namespace);
    tokio::spawn(watch);
    let jwt = JwtVerifier::none()
        .with_hs256_secret(HS_SECRET)
        .unwrap()
        .with_jwks(&fixture("rsa-test-jwks.json"))
        .unwrap();
    let mut config = RelayConfig {
        listen: "127.0.0.1:0".into(),
        ..Default::default()
    };
    tune(&mut config);
    let handle = relay::start_on_event_loop(
        relay::Parts {
            config,
            directory: directory.clone(),
            jwt,
            connector: Connector::Sprites(env.sprites.clone()),
            kube: Some(env.ns.client.clone()),
            background: None,
        },
        1,
    )
    .await
    .expect("relay starts");
    eventually("relay caches synced", 30, || async {
        if directory.is_ready() {
            Ok(())
        } else {
            Err("not yet".into())
        }
    })
    .await;
    handle
}

/// The gateway token the controller issued to `user`.
pub(crate) async fn gateway_token(env: &Env, user: &str) -> String {
    let secrets = env.ns.api::<k8s_openapi::api::core::v1::Secret>();
    let name = format!("{user}-gateway");
    let s = eventually(&name, 60, || async {
        secrets.get(&name).await.map_err(|e| e.to_string())
    })
    .await;
    let token = s.data.unwrap_or_default().remove("token").expect("token key");
    String::from_utf8(token.0).expect("utf-8 token")
}

/// Waits until the relay's cache holds `user` with a token hash.
async fn wait_cached(handle: &RelayHandle, user: &str) {
    wait_cached_where(handle, user, |u| {
        u.metadata.name.as_deref() == Some(user)
            && u.status
                .as_ref()
                .is_some_and(|s| s.gateway_token_sha256.is_some())
    })
    .await
}

/// Waits until the relay's cache holds a User whose token is `token`.
pub(crate) async fn wait_cached_token(handle: &RelayHandle, token: &str) {
    let want = gateway_token_sha256(token);
    wait_cached_where(handle, "a User with the token", |u| {
        u.status.as_ref().and_then(|s| s.gateway_token_sha256.as_deref()) == Some(want.as_str())
    })
    .await
}

async fn wait_cached_where(handle: &RelayHandle, what: &str, pred: impl Fn(&User) -> bool) {
    let dir = handle.relay().directory.clone();
    eventually(&format!("{what} in the relay's cache"), 30, || {
        let found = dir.users().iter().any(|u| pred(u));
        async move { found.then_some(()).ok_or_else(|| "not cached".to_string()) }
    })
    .await
}

/// Connects as a browser does: our subprotocol and the token.
pub(crate) async fn connect_browser(
    handle: &RelayHandle,
    token: &str,
    query: &str,
) -> Result<Client, tungstenite::Error> {
    let mut req = format!("{}{query}", handle.ws_url())
        .into_client_request()
        .unwrap();
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        format!("{SUBPROTOCOL}, {token}").parse().unwrap(),
    );
    let (ws, resp) = tokio_tungstenite::connect_async(req).await?;
    assert_eq!(
        resp.headers()
            .get("Sec-WebSocket-Protocol")
            .map(|v| v.to_str().unwrap()),
        Some(SUBPROTOCOL),
        "the relay answers our subprotocol, never the token"
    );
    Ok(ws)
}

/// Connects as a non-browser client: `Authorization: Bearer`.
async fn connect_bearer(
    handle: &RelayHandle,
    token: &str,
    query: &str,
) -> Result<Client, tungstenite::Error> {
    let mut req = format!("{}{query}", handle.ws_url())
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("Authorization", format!("Bearer {token}").parse().unwrap());
    tokio_tungstenite::connect_async(req).await.map(|(ws, _)| ws)
}

pub(crate) async fn next_json(ws: &mut Client, secs: u64) -> Result<Value, String> {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(secs), ws.next())
            .await
            .map_err(|_| format!("nothing within {secs}s"))?
            .ok_or("closed")?
            .map_err(|e| e.to_string())?;
        match msg {
            Message::Text(t) => return serde_json::from_str(&t).map_err(|e| e.to_string()),
            Message::Close(f) => return Err(format!("closed: {f:?}")),
            _ => {}
        }
    }
}

/// The close code the relay ends this connection with.
pub(crate) async fn close_code(ws: &mut Client) -> Option<u16> {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .ok()??
        {
            Ok(Message::Close(Some(f))) => return Some(f.code.into()),
            Ok(Message::Close(None)) | Err(_) => return None,
            Ok(_) => {}
        }
    }
}

async fn send(ws: &mut Client, v: Value) {
    ws.send(Message::text(v.to_string())).await.expect("send");
}

/// Sends a ping with `id` and returns the pong's payload (the ack first).
pub(crate) async fn ping(ws: &mut Client, id: &str) -> Value {
    send(ws, json!({"type": "ping", "payload": {"n": id}, "id": id})).await;
    let mut acked = false;
    loop {
        let v = next_json(ws, 60).await.expect("reply");
        match v["type"].as_str() {
            Some("ack") if v["payload"]["id"] == id => acked = true,
            Some("pong") => {
                assert!(acked, "the ack comes before the pong");
                return v["payload"].clone();
            }
            _ => {}
        }
    }
}

async fn proxy_calls(env: &Env, vm: &str) -> usize {
    env.count_calls(PROXY_ROUTE, Some(vm)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_authenticates_routes_and_refuses_before_any_upstream_work() {
    let Some(env) = Env::new("relay-auth").await else {
        return;
    };
    create_user(&env, "alice", "sub-alice", ALICE_TOKEN).await;
    create_user(&env, "bob", "sub-bob", BOB_TOKEN).await;
    create_sprite(&env, "alice-primary", "alice").await;
    create_sprite(&env, "bob-primary", "bob").await;
    let relay = start_relay(&env, |_| {}).await;
    wait_cached(&relay, "alice").await;
    wait_cached(&relay, "bob").await;
    let alice_vm = default_vm_name(&env.ns.name, "alice-primary");
    let bob_vm = default_vm_name(&env.ns.name, "bob-primary");
    env.wait_ready("alice-primary", 240).await;

    // The gateway token in the subprotocol reaches alice's runtime.
    let mut ws = connect_browser(&relay, ALICE_TOKEN, "")
        .await
        .expect("alice connects");
    let pong = ping(&mut ws, "g-1").await;
    assert_eq!(pong["echo"], json!({"n": "g-1"}));
    ws.close(None).await.ok();

    // An HS256 JWT naming alice's subject, in the header this time.
    let jwt = hs256(json!({"sub": "sub-alice", "exp": now() + 600}), HS_SECRET);
    let mut ws = connect_bearer(&relay, &jwt, "?sprite=alice-primary")
        .await
        .expect("JWT connects");
    ping(&mut ws, "j-1").await;
    ws.close(None).await.ok();

    // An RS256 JWT from the JWKS, in the subprotocol.
    let mut h = Header::new(Algorithm::RS256);
    h.kid = Some("test-rsa".into());
    let rs = jsonwebtoken::encode(
        &h,
        &json!({"sub": "sub-alice", "exp": now() + 600}),
        &EncodingKey::from_rsa_pem(fixture("rsa-test-key.pem").as_bytes()).unwrap(),
    )
    .unwrap();
    let mut rs_ws = connect_browser(&relay, &rs, "").await.expect("RS256 connects");
    ping(&mut rs_ws, "r-1").await;

    // Refusals: none of them may open a proxy to any VM.
    let before = (
        proxy_calls(&env, &alice_vm).await,
        proxy_calls(&env, &bob_vm).await,
    );
    let b64 = |v: &Value| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let none_alg = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT"})),
        b64(&json!({"sub": "sub-alice", "exp": now() + 600}))
    );
    let confused = hs256(
        json!({"sub": "sub-alice", "exp": now() + 600}),
        fixture("rsa-test-pub.pem").as_bytes(),
    );
    let cases: Vec<(&str, String, &str, u16)> = vec![
        (
            "wrong gateway token",
            "ffff0000111122223333444455556666".into(),
            "",
            4401,
        ),
        (
            "expired JWT",
            hs256(json!({"sub": "sub-alice", "exp": now() - 3600}), HS_SECRET),
            "",
            4401,
        ),
        (
            "JWT signed with another secret",
            hs256(
                json!({"sub": "sub-alice", "exp": now() + 600}),
                b"not-the-relay-secret-but-long-enough!",
            ),
            "",
            4401,
        ),
        (
            "JWT for a subject no User has",
            hs256(json!({"sub": "sub-mallory", "exp": now() + 600}), HS_SECRET),
            "",
            4403,
        ),
        ("alg=none", none_alg, "", 4401),
        (
            "key confusion (HS256 keyed with the RSA public key)",
            confused,
            "",
            4401,
        ),
        (
            "alice asks for bob's sprite",
            ALICE_TOKEN.into(),
            "?sprite=bob-primary",
            4403,
        ),
        (
            "bob's JWT asks for alice's sprite",
            hs256(json!({"sub": "sub-bob", "exp": now() + 600}), HS_SECRET),
            "?sprite=alice-primary",
            4403,
        ),
    ];
    for (what, token, query, code) in &cases {
        let mut ws = connect_browser(&relay, token, query)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(close_code(&mut ws).await, Some(*code), "{what}");
        // The same token in a header gets an HTTP status instead.
        match connect_bearer(&relay, token, query).await {
            Err(tungstenite::Error::Http(resp)) => {
                assert_eq!(resp.status().as_u16(), code - 4000, "{what} (header)")
            }
            other => panic!(
                "{what} (header): expected an HTTP refusal, got {:?}",
                other.map(|_| ())
            ),
        }
    }
    // A browser that sends before it reads (a page busy elsewhere) still gets
    // the refusal's code: the relay reads through the closing handshake
    // instead of dropping the socket under unread frames (the kernel then
    // resets the connection, which can discard the Close before the browser
    // reads it).
    for attempt in 0..5 {
        let mut ws = connect_browser(&relay, "deadbeef00001111222233334444ffff", "")
            .await
            .expect("upgraded to be told why");
        tokio::time::sleep(Duration::from_millis(200)).await;
        for n in 0..3 {
            let _ = ws
                .send(Message::text(
                    json!({"type": "ping", "id": format!("early-{n}")}).to_string(),
                ))
                .await;
        }
        assert_eq!(
            close_code(&mut ws).await,
            Some(4401),
            "early sender, attempt {attempt}"
        );
        // ... and the closing handshake completes: our Close reply reaches a
        // relay still reading, which then ends the connection cleanly.
        let end = tokio::time::timeout(Duration::from_secs(5), ws.next()).await;
        assert!(
            matches!(
                end,
                Ok(None) | Ok(Some(Err(tungstenite::Error::ConnectionClosed)))
            ),
            "early sender, attempt {attempt}: the connection ended with {end:?}"
        );
    }
    // No token at all; a query token without --allow-query-token.
    match tokio_tungstenite::connect_async(relay.ws_url()).await {
        Err(tungstenite::Error::Http(resp)) => assert_eq!(resp.status().as_u16(), 401),
        other => panic!("no token: {:?}", other.map(|_| ())),
    }
    match tokio_tungstenite::connect_async(format!("{}?token={ALICE_TOKEN}", relay.ws_url())).await {
        Err(tungstenite::Error::Http(resp)) => assert_eq!(resp.status().as_u16(), 401),
        other => panic!("query token: {:?}", other.map(|_| ())),
    }
    // An oversized first frame from an authenticated browser: 1009, and the
    // VM is not woken for it.
    let mut ws = connect_browser(&relay, ALICE_TOKEN, "").await.unwrap();
    let big = "x".repeat((1 << 20) + 1);
    let _ = ws.send(Message::text(big)).await;
    assert_eq!(close_code(&mut ws).await, Some(1009), "oversized frame");

    let after = (
        proxy_calls(&env, &alice_vm).await,
        proxy_calls(&env, &bob_vm).await,
    );
    assert_eq!(before, after, "a refused connection reached a VM");
    let metrics = relay.relay().metrics.encode();
    say(&format!(
        "relay refusals: {}",
        metrics
            .lines()
            .filter(|l| l.contains("refusals_total{"))
            .collect::<Vec<_>>()
            .join("; ")
    ));

    // Users sharing a subject: both are refused from then on.
    create_user(
        &env,
        "alice-twin",
        "sub-alice",
        "7777000011112222333344445555aaaa",
    )
    .await;
    wait_cached(&relay, "alice-twin").await;
    let mut ws = connect_browser(&relay, ALICE_TOKEN, "").await.unwrap();
    assert_eq!(close_code(&mut ws).await, Some(4403), "shared subject");

    // The session that is still open (RS256) ends with 1001 on shutdown.
    let ((), code) = tokio::join!(relay.shutdown(), close_code(&mut rs_ws));
    assert_eq!(code, Some(1001), "shutdown closes sessions with 1001");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_resends_unacked_messages_after_the_vm_sleeps() {
    let Some(env) = Env::new("relay-sleep").await else {
        return;
    };
    create_user(&env, "carol", "sub-carol", ALICE_TOKEN).await;
    create_sprite(&env, "carol-primary", "carol").await;
    let relay = start_relay(&env, |c| c.idle_timeout = Duration::from_secs(4)).await;
    wait_cached(&relay, "carol").await;
    let vm = default_vm_name(&env.ns.name, "carol-primary");
    env.wait_ready("carol-primary", 240).await;

    let mut ws = connect_browser(&relay, ALICE_TOKEN, "?session=tab-1")
        .await
        .expect("connects");
    ping(&mut ws, "p-0").await;
    let wakes_before = env.wakes(&vm).await;

    // Missions in flight when the VM is put to sleep (its proxied TCP
    // connections are cut), then more after it.
    let ids: Vec<String> = (1..=20).map(|i| format!("m-{i:02}")).collect();
    for id in &ids[..10] {
        send(
            &mut ws,
            json!({"type": "mission", "payload": {"text": format!("task {id}")}, "id": id}),
        )
        .await;
    }
    let slept = reqwest::Client::new()
        .post(format!("{}/sim/sprites/{vm}/sleep", env.sim().url()))
        .bearer_auth(SIM_TOKEN)
        .send()
        .await
        .unwrap();
    assert!(slept.status().is_success(), "force sleep: {}", slept.status());
    for id in &ids[10..] {
        send(
            &mut ws,
            json!({"type": "mission", "payload": {"text": format!("task {id}")}, "id": id}),
        )
        .await;
    }

    // Every id is acked exactly once, in order.
    let mut acks: Vec<(String, String)> = vec![];
    while acks.len() < ids.len() {
        let v = next_json(&mut ws, 60)
            .await
            .unwrap_or_else(|e| panic!("acks so far {acks:?}: {e}"));
        if v["type"] == "ack" {
            acks.push((
                v["payload"]["id"].as_str().unwrap().to_string(),
                v["payload"]["status"].as_str().unwrap().to_string(),
            ));
        }
    }
    let acked: Vec<&String> = acks.iter().map(|(id, _)| id).collect();
    assert_eq!(
        acked,
        ids.iter().collect::<Vec<_>>(),
        "acks in order, none missing or repeated"
    );
    assert!(
        acks.iter().all(|(_, s)| s == "processed" || s == "duplicate"),
        "{acks:?}"
    );
    let resent = relay.relay().metrics.encode();
    say(&format!(
        "sleep test: acks {:?}; {}",
        acks.iter().fold(HashMap::<&str, usize>::new(), |mut m, (_, s)| {
            *m.entry(s.as_str()).or_default() += 1;
            m
        }),
        resent
            .lines()
            .filter(|l| l.starts_with("sprite_operator_relay_resent_frames_total")
                || l.starts_with("sprite_operator_relay_upstream_drops_total"))
            .collect::<Vec<_>>()
            .join("; ")
    ));
    assert!(env.wakes(&vm).await > wakes_before, "the reconnect woke the VM");

    // Exactly one mission row per id in the runtime's database.
    let script = "import sqlite3; c = sqlite3.connect('/workspace/agent.db'); \
        print(c.execute(\"select count(*), count(distinct text) from missions where session = 'tab-1'\").fetchone())";
    let out = env
        .sprites
        .exec_collect(
            &vm,
            &ExecRequest::new(["/workspace/.venv/bin/python3", "-c", script])
                .timeout(Duration::from_secs(30)),
        )
        .await
        .expect("exec");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "(20, 20)",
        "missions stored once each; stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // While the session is live the relay keeps the Sprite's Lease renewed.
    let leases = env.ns.api::<k8s_openapi::api::coordination::v1::Lease>();
    let lease_name = session::lease_name(&env.ns.name, "carol-primary");
    eventually("the session Lease", 30, || async {
        let l = leases.get(&lease_name).await.map_err(|e| e.to_string())?;
        let until = session::live_until(&l).ok_or("no renewTime")?;
        (until > jiff::Timestamp::now())
            .then_some(())
            .ok_or(format!("stale: {until}"))
    })
    .await;

    // Idle browser: the relay closes its upstream so the VM may sleep; the
    // browser stays connected and its next message wakes the VM again.
    eventually("the relay to let go of the VM", 30, || async {
        let n = env.stats().await["vms"][&vm]["active_connections"]
            .as_u64()
            .unwrap_or(99);
        (n == 0).then_some(()).ok_or(format!("{n} connections"))
    })
    .await;
    let pong = ping(&mut ws, "after-idle").await;
    assert_eq!(pong["echo"], json!({"n": "after-idle"}));

    let ((), code) = tokio::join!(relay.shutdown(), close_code(&mut ws));
    assert_eq!(code, Some(1001), "shutdown closes sessions with 1001");
}

/// One User with `token` and its Sprite, without a cluster.
fn fixed_directory(user: &str, token: &str) -> Directory {
    Directory::fixed_from_yaml(&format!(
        "apiVersion: sprite-operator.dev/v1alpha1\nkind: User\nmetadata: {{name: {user}, namespace: ns}}\n\
         spec: {{email: {user}@example.com, subject: {user}, tier: free}}\nstatus: {{gatewayTokenSha256: \"{}\"}}\n---\n\
         apiVersion: sprite-operator.dev/v1alpha1\nkind: Sprite\nmetadata: {{name: {user}-primary, namespace: ns}}\n\
         spec: {{userRef: {{name: {user}}}}}\nstatus: {{ownedVm: {{name: vm-{user}, id: vm-{user}}}}}\n",
        gateway_token_sha256(token)
    ))
    .unwrap()
}

/// The relay without a cluster: `directory` fixed, every session to the
/// WebSocket at `upstream`, on the production event loop.
async fn start_fixed_relay(
    directory: Directory,
    upstream: std::net::SocketAddr,
    tune: impl FnOnce(&mut RelayConfig),
) -> RelayHandle {
    let mut config = RelayConfig {
        listen: "127.0.0.1:0".into(),
        ..Default::default()
    };
    tune(&mut config);
    let threads = config.threads;
    let parts = relay::Parts {
        config,
        directory,
        jwt: JwtVerifier::none(),
        connector: Connector::Fixed(format!("ws://{upstream}/").parse().unwrap()),
        kube: None,
        background: None,
    };
    relay::start_on_event_loop(parts, threads)
        .await
        .expect("relay starts")
}

/// How many times this process's thread named `name` went to sleep
/// (`voluntary_ctxt_switches`), if there is one: an event loop's thread
/// sleeps in `epoll_wait` after each turn, so this counts the turns it had.
fn sleeps_of_thread(name: &str) -> Option<u64> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .flatten()
        .find_map(|t| {
            let comm = std::fs::read_to_string(t.path().join("comm")).ok()?;
            if comm.trim() != name {
                return None;
            }
            let status = std::fs::read_to_string(t.path().join("status")).ok()?;
            status
                .lines()
                .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                .and_then(|v| v.trim().parse().ok())
        })
}

/// With `threads: 2` the relay runs two event loops and gives sessions to
/// them in turn; each session's sockets live on its own loop, so sessions
/// on either loop relay both ways, interleaved, each only its own frames.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_on_several_event_loops_each_relay_their_own_frames() {
    let token = "10095e5510001111222233334444aaaa";
    // The runtime's stand-in: echoes every text frame on every connection.
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_addr = upstream.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = upstream.accept().await {
            tokio::spawn(async move {
                let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
                while let Some(Ok(m)) = ws.next().await {
                    if m.is_text() && ws.send(m).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    let handle = start_fixed_relay(fixed_directory("loops", token), upstream_addr, |c| c.threads = 2).await;
    // The second loop's thread (no other test runs two). A new thread names
    // itself once it runs: until then it has its creator's name.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while sleeps_of_thread("relay-loop-1").is_none() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = sleeps_of_thread("relay-loop-1").expect("a second event loop");
    let mut browsers = Vec::new();
    for _ in 0..4 {
        browsers.push(connect_browser(&handle, token, "").await.unwrap());
    }
    for round in 0..3 {
        for (i, b) in browsers.iter_mut().enumerate() {
            send(b, json!({"type": "note", "payload": format!("{i}-{round}")})).await;
        }
        for (i, b) in browsers.iter_mut().enumerate() {
            let v = next_json(b, 5).await.unwrap();
            assert_eq!(
                v["payload"],
                json!(format!("{i}-{round}")),
                "session {i}'s own echo"
            );
        }
    }
    // Half the sessions are the second loop's: it woke for their frames
    // (six relayed each way at least), where an idle loop sleeps on.
    let turns = sleeps_of_thread("relay-loop-1").unwrap() - before;
    assert!(turns >= 6, "the second loop relayed: {turns} turns");
    for mut b in browsers {
        b.close(None).await.unwrap();
    }
    handle.shutdown().await;
}

/// A text frame as it is on the wire, masked as a client sends it or not.
fn text_frame(text: &str, masked: bool) -> Vec<u8> {
    use tungstenite::protocol::frame::Frame;
    use tungstenite::protocol::frame::coding::{Data, OpCode};
    let mut frame = Frame::message(text.to_string(), OpCode::Data(Data::Text), true);
    if masked {
        frame.header_mut().mask = Some([1, 2, 3, 4]);
    }
    let mut out = Vec::new();
    frame.format(&mut out).unwrap();
    out
}

/// Frames that arrive in one TCP segment are all relayed, both ways, at
/// once: the session loop polls a socket again after it gave a message,
/// since the rest of the segment is already in the relay's buffer and no
/// wake-up will come for it (`src/relay/wakeups.rs`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_that_arrive_together_are_all_relayed_at_once() {
    use tokio::io::AsyncWriteExt;
    let token = "c0a1e5ce11112222333344445555aaaa";
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_addr = upstream.local_addr().unwrap();
    // The runtime's stand-in: reads the relay's hello and two frames, then
    // answers both in one write.
    let runtime = tokio::spawn(async move {
        let (tcp, _) = upstream.accept().await.unwrap();
        let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
        let mut got = Vec::new();
        while got.len() < 3 {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => got.push(t.to_string()),
                Some(Ok(_)) => {}
                other => panic!("upstream ended early, after {got:?}: {other:?}"),
            }
        }
        let mut both = text_frame(r#"{"type":"pong","payload":"r1"}"#, false);
        both.extend(text_frame(r#"{"type":"pong","payload":"r2"}"#, false));
        ws.get_mut().write_all(&both).await.unwrap();
        // Open until the relay closes it.
        while let Some(Ok(_)) = ws.next().await {}
        got
    });
    let handle = start_fixed_relay(fixed_directory("burst", token), upstream_addr, |_| {}).await;
    let mut browser = connect_browser(&handle, token, "").await.unwrap();
    let mut both = text_frame(r#"{"type":"ping","id":"b1","payload":1}"#, true);
    both.extend(text_frame(r#"{"type":"ping","id":"b2","payload":2}"#, true));
    match browser.get_mut() {
        MaybeTlsStream::Plain(tcp) => tcp.write_all(&both).await.unwrap(),
        _ => unreachable!("plain ws://"),
    }
    let mut replies = Vec::new();
    while replies.len() < 2 {
        let v = next_json(&mut browser, 5)
            .await
            .unwrap_or_else(|e| panic!("after {replies:?}: {e}"));
        replies.push(v["payload"].clone());
    }
    assert_eq!(replies, vec![json!("r1"), json!("r2")]);
    browser.close(None).await.unwrap();
    handle.shutdown().await;
    let got = runtime.await.unwrap();
    assert!(got[0].contains("hello"), "the relay's hello first: {got:?}");
    assert!(got[1].contains("b1") && got[2].contains("b2"), "{got:?}");
}

/// A browser that stops reading while its runtime keeps sending: the relay
/// stops reading the runtime (backpressure, no buffer grows) and, once a
/// write to the browser has waited `write_timeout`, ends the session rather
/// than hold it, its task and its VM connection forever. No cluster here: a
/// fixed directory and a flooding upstream in-process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_that_stops_reading_is_dropped_after_the_write_timeout() {
    let token = "5ee0000011112222333344445555aaaa";
    let directory = fixed_directory("slow", token);
    // The runtime's stand-in: after the first frame, 64 KiB frames forever.
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_addr = upstream.local_addr().unwrap();
    let (flood_done_tx, flood_done) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (tcp, _) = upstream.accept().await.unwrap();
        let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
        ws.next().await; // the relay's hello
        let chunk = Message::binary(vec![7u8; 64 * 1024]);
        let mut sent = 0usize;
        while ws.send(chunk.clone()).await.is_ok() {
            sent += 1;
        }
        let _ = flood_done_tx.send(sent);
    });
    let handle = start_fixed_relay(directory, upstream_addr, |c| {
        c.write_timeout = Duration::from_millis(300)
    })
    .await;
    let mut browser = connect_browser(&handle, token, "").await.unwrap();
    // A data frame makes the session connect its upstream.
    send(&mut browser, json!({"type": "ping", "payload": {}})).await;
    let relay = handle.relay().clone();
    let active = |want: i64| {
        let relay = relay.clone();
        async move {
            match relay.metrics.sessions_active.get() {
                n if n == want => Ok(()),
                n => Err(format!("{n} sessions active")),
            }
        }
    };
    eventually("the session started", 10, || active(1)).await;
    // The browser now reads nothing: the flood fills the kernel's buffers,
    // the relay's write waits, and the timeout ends the session.
    let sent = tokio::time::timeout(Duration::from_secs(30), flood_done)
        .await
        .expect("the relay closed the upstream once the session ended")
        .unwrap();
    assert!(
        sent > 1,
        "the upstream was relayed from before it stalled ({sent} frames)"
    );
    eventually("the stalled session ended", 10, || active(0)).await;
    drop(browser);
    handle.shutdown().await;
}

/// Large frames both ways, faster than the sockets drain: the session's
/// poll writes what a socket has room for and finishes the rest as the
/// socket takes more (a mistake in where it resumes duplicates or drops
/// bytes). Every frame arrives whole, once, in order, text and binary
/// alike, with its bytes unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_frames_written_in_parts_arrive_whole_and_in_order() {
    large_frames_both_ways("1a46e000111122223333444455556666", false).await;
}

/// The same against a runtime that stops reading until its reply is taken,
/// as the runtime's server does (it awaits each reply inside its read
/// loop): with both directions full, a relay that waited on one write at a
/// time, reading neither side meanwhile, deadlocked with it until the write
/// timeout (this test hung in 1 to 3 runs of 4 against that session loop,
/// session 11: the deadlock needs both buffers full at once). Each
/// direction now waits for its own peer only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_directions_full_against_a_runtime_that_replies_before_reading_on() {
    large_frames_both_ways("1a46e000111122223333444455557777", true).await;
}

/// `coupled`: the runtime's stand-in reads its next frame only once its
/// last echo is written; else it reads on while its echoes wait.
async fn large_frames_both_ways(token: &str, coupled: bool) {
    const FRAMES: usize = 48;
    const SIZE: usize = 192 * 1024;
    // The runtime's stand-in: echoes every data frame as it came, after a
    // pause in which the relay's writes to it fill its socket.
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_addr = upstream.local_addr().unwrap();
    tokio::spawn(async move {
        let (tcp, _) = upstream.accept().await.unwrap();
        let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
        ws.next().await; // the relay's hello
        tokio::time::sleep(Duration::from_millis(300)).await;
        if coupled {
            // Each echo written before the next read, as the runtime does.
            while let Some(Ok(m)) = ws.next().await {
                if (m.is_text() || m.is_binary()) && ws.send(m).await.is_err() {
                    break;
                }
            }
            return;
        }
        // A task each way: it reads on while its echoes wait.
        let (mut tx, mut rx) = ws.split();
        let (echo_tx, mut echo_rx) = tokio::sync::mpsc::channel::<Message>(FRAMES);
        tokio::spawn(async move {
            while let Some(m) = echo_rx.recv().await {
                if tx.send(m).await.is_err() {
                    break;
                }
            }
        });
        while let Some(Ok(m)) = rx.next().await {
            if (m.is_text() || m.is_binary()) && echo_tx.send(m).await.is_err() {
                break;
            }
        }
    });
    let handle = start_fixed_relay(
        fixed_directory(if coupled { "coupled" } else { "large" }, token),
        upstream_addr,
        |_| {},
    )
    .await;
    let browser = connect_browser(&handle, token, "").await.unwrap();
    let (mut tx, mut rx) = browser.split();
    // Frame i: text for even i, binary for odd, its bytes all different.
    let frame = |i: usize| {
        let body: String = (0..SIZE)
            .map(|j| char::from(b'a' + ((i * 7 + j) % 26) as u8))
            .collect();
        if i.is_multiple_of(2) {
            Message::text(format!(r#"{{"type":"note","payload":"{i}:{body}"}}"#))
        } else {
            Message::binary(format!("{i}:{body}").into_bytes())
        }
    };
    let writer = tokio::spawn(async move {
        for i in 0..FRAMES {
            tx.send(frame(i)).await.expect("send");
        }
        tx
    });
    for i in 0..FRAMES {
        // A slow start: the relay's writes to the browser fill its socket
        // and then go in parts, while the browser's frames back up on the
        // way in.
        if i < 8 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let got = tokio::time::timeout(Duration::from_secs(20), rx.next())
            .await
            .unwrap_or_else(|_| panic!("frame {i} within 20 s"))
            .expect("open")
            .expect("a frame");
        assert!(got == frame(i), "frame {i} back whole and in order");
    }
    let down = handle
        .relay()
        .metrics
        .frames
        .get_or_create(&relay::metrics::DirectionLabels { direction: "down" })
        .get();
    assert_eq!(down, FRAMES as u64, "each frame relayed to the browser once");
    let mut browser = writer.await.unwrap().reunite(rx).unwrap();
    browser.close(None).await.unwrap();
    handle.shutdown().await;
}

/// While a session is live the relay pings the runtime (keeping its VM
/// awake) and the browser, each at its interval; the pings go out without
/// the loop waiting on them (`Socket::try_ping`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_pings_the_runtime_and_the_browser_at_their_intervals() {
    let token = "0a1e0000111122223333444455556666";
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_addr = upstream.local_addr().unwrap();
    let (pings_tx, mut pings_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let (tcp, _) = upstream.accept().await.unwrap();
        let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
        while let Some(Ok(m)) = ws.next().await {
            if m.is_ping() {
                let _ = pings_tx.send(());
            }
        }
    });
    let handle = start_fixed_relay(fixed_directory("pings", token), upstream_addr, |c| {
        c.keepalive_interval = Duration::from_millis(100);
        c.browser_ping_interval = Duration::from_millis(100);
    })
    .await;
    let mut browser = connect_browser(&handle, token, "").await.unwrap();
    // A data frame makes the session connect its upstream.
    send(&mut browser, json!({"type": "note", "payload": "x"})).await;
    let mut browser_pings = 0;
    let until = tokio::time::Instant::now() + Duration::from_millis(800);
    while let Ok(Some(Ok(m))) = tokio::time::timeout_at(until, browser.next()).await {
        if m.is_ping() {
            browser_pings += 1;
        }
    }
    let mut runtime_pings = 0;
    while pings_rx.try_recv().is_ok() {
        runtime_pings += 1;
    }
    assert!(
        browser_pings >= 3,
        "{browser_pings} pings to the browser in 800 ms"
    );
    assert!(
        runtime_pings >= 3,
        "{runtime_pings} pings to the runtime in 800 ms"
    );
    browser.close(None).await.unwrap();
    handle.shutdown().await;
}

/// More frames in one burst than a poll relays before it yields (the
/// session's budget of 64): the session yields and goes on, and every
/// frame is relayed, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_over_the_poll_budget_is_relayed_whole() {
    use tokio::io::AsyncWriteExt;
    const BURST: usize = 300;
    let token = "b0a5e000111122223333444455556666";
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_addr = upstream.local_addr().unwrap();
    tokio::spawn(async move {
        let (tcp, _) = upstream.accept().await.unwrap();
        let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
        ws.next().await; // the relay's hello
        while let Some(Ok(m)) = ws.next().await {
            if m.is_text() && ws.send(m).await.is_err() {
                break;
            }
        }
    });
    let handle = start_fixed_relay(fixed_directory("burst2", token), upstream_addr, |_| {}).await;
    let mut browser = connect_browser(&handle, token, "").await.unwrap();
    // The first frame connects the upstream; the burst then comes at once.
    send(&mut browser, json!({"type": "note", "payload": 0})).await;
    assert_eq!(next_json(&mut browser, 5).await.unwrap()["payload"], json!(0));
    let mut burst = Vec::new();
    for i in 1..=BURST {
        burst.extend(text_frame(&format!(r#"{{"type":"note","payload":{i}}}"#), true));
    }
    match browser.get_mut() {
        MaybeTlsStream::Plain(tcp) => tcp.write_all(&burst).await.unwrap(),
        _ => unreachable!("plain ws://"),
    }
    for i in 1..=BURST {
        let v = next_json(&mut browser, 5)
            .await
            .unwrap_or_else(|e| panic!("frame {i}: {e}"));
        assert_eq!(v["payload"], json!(i), "in order");
    }
    browser.close(None).await.unwrap();
    handle.shutdown().await;
}
