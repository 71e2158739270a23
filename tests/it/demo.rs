//! `sprite-operator demo` end to end: the page's message round-trips through
//! the relay to the runtime's server.py in the demo Sprite.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use sprite_operator::demo::{self, DemoOptions};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::common::plane;
use crate::sprite_controller::test_config;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_page_round_trips_a_message_to_the_sprite() {
    let Some(plane) = plane() else { return };
    let running = demo::start(DemoOptions {
        kubeconfig: Some(plane.kubeconfig_path().to_path_buf()),
        listen: "127.0.0.1:0".into(),
        sim_dir: None,
        examples: std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples"),
        pip_args: test_config().pip_args,
    })
    .await
    .expect("demo starts");

    // What a browser does: load the page, read its config, open the socket
    // with the two subprotocols, send a message, read the reply.
    let http = reqwest::Client::new();
    let page = http
        .get(&running.page_url)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        page.contains("Talk to your Sprite") && page.contains("sprite-relay.v1"),
        "{page}"
    );
    let cfg: Value = http
        .get(format!("{}config.json", running.page_url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut req = cfg["ws_url"].as_str().unwrap().into_client_request().unwrap();
    let protocols = format!("sprite-relay.v1, {}", cfg["token"].as_str().unwrap());
    req.headers_mut()
        .insert("sec-websocket-protocol", protocols.parse().unwrap());
    let (mut ws, resp) = tokio_tungstenite::connect_async(req)
        .await
        .expect("relay accepts the page");
    assert_eq!(resp.headers()["sec-websocket-protocol"], "sprite-relay.v1");
    let msg = json!({"type": "ping", "id": "page-1", "payload": {"text": "hello sprite"}});
    ws.send(Message::Text(msg.to_string().into())).await.unwrap();
    let pong = loop {
        let m = tokio::time::timeout(Duration::from_secs(20), ws.next())
            .await
            .expect("a reply")
            .expect("open")
            .unwrap();
        if let Message::Text(t) = m {
            let v: Value = serde_json::from_str(&t).unwrap();
            if v["type"] == "pong" {
                break v;
            }
        }
    };
    assert_eq!(pong["payload"]["echo"]["text"], "hello sprite");
    assert_eq!(
        pong["payload"]["version"].as_str().map(str::trim),
        Some(sprite_operator::runtime::EMBEDDED_VERSION.trim())
    );
    drop(ws);
    running.shutdown().await;
}
