//! The TCP proxy: connects inside the VM's network namespace and relays bytes both ways until
//! either side closes, the VM goes to sleep, or a fault drops the socket.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::response::Response;
use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::app::{ApiError, Sim, lock};
use super::faults::Class;
use super::ns;
use super::state::Cause;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const INIT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Deserialize, PartialEq, Eq)]
pub struct Init {
    #[serde(default)]
    pub host: String,
    pub port: u16,
}

pub fn parse_init(data: &[u8]) -> Result<Init, String> {
    let init: Init = serde_json::from_slice(data).map_err(|e| format!("bad init message: {e}"))?;
    if init.port == 0 {
        return Err("port must be 1-65535".into());
    }
    Ok(Init {
        host: if init.host.is_empty() {
            "localhost".into()
        } else {
            init.host
        },
        port: init.port,
    })
}

pub async fn proxy(
    State(sim): State<Arc<Sim>>,
    Path(name): Path<String>,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    sim.wake(&name, Cause::Proxy).await?;
    let pin = sim.paths(&name).netns();
    ns::ensure_netns(&pin).map_err(|e| ApiError::internal(e.to_string()))?;
    let drop_after = lock(&sim.faults).drop_after(Class::Proxy);
    Ok(ws.on_upgrade(move |socket| async move {
        let guard = sim.active_guard(&name);
        relay(sim.clone(), &name, socket, drop_after).await;
        drop(guard);
    }))
}

async fn reply(socket: &mut WebSocket, value: serde_json::Value) -> bool {
    socket.send(Message::Text(value.to_string().into())).await.is_ok()
}

async fn relay(sim: Arc<Sim>, name: &str, mut socket: WebSocket, drop_after: Option<Duration>) {
    let first = tokio::time::timeout(INIT_TIMEOUT, socket.recv()).await;
    let data = match first {
        Ok(Some(Ok(Message::Text(t)))) => t.as_bytes().to_vec(),
        Ok(Some(Ok(Message::Binary(b)))) => b.to_vec(),
        _ => return,
    };
    let init = match parse_init(&data) {
        Ok(i) => i,
        Err(e) => {
            reply(&mut socket, serde_json::json!({ "status": "error", "error": e })).await;
            return;
        }
    };
    let pin = sim.paths(name).netns();
    let std_stream = match ns::connect_in(&pin, &init.host, init.port, CONNECT_TIMEOUT).await {
        Ok(s) => s,
        Err(e) => {
            let msg = format!("connect {}:{}: {e}", init.host, init.port);
            reply(
                &mut socket,
                serde_json::json!({ "status": "error", "error": msg }),
            )
            .await;
            return;
        }
    };
    let target = std_stream.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    let tcp = match std_stream
        .set_nonblocking(true)
        .and_then(|()| tokio::net::TcpStream::from_std(std_stream))
    {
        Ok(t) => t,
        Err(e) => {
            reply(
                &mut socket,
                serde_json::json!({ "status": "error", "error": e.to_string() }),
            )
            .await;
            return;
        }
    };
    if !reply(
        &mut socket,
        serde_json::json!({ "status": "connected", "target": target }),
    )
    .await
    {
        return;
    }
    tracing::debug!(sprite = name, port = init.port, "sim proxy connected");
    let Some(mut sleeps) = sim.sleep_watch(name) else {
        return;
    };
    sleeps.borrow_and_update();
    let (mut tcp_rd, mut tcp_wr) = tcp.into_split();
    let (mut ws_tx, mut ws_rx) = socket.split();
    let up = async {
        while let Some(Ok(msg)) = ws_rx.next().await {
            match msg {
                Message::Binary(b) => {
                    let Ok(()) = tcp_wr.write_all(&b).await else { break };
                }
                Message::Close(_) => break,
                _ => {}
            }
        }
        let _ = tcp_wr.shutdown().await;
    };
    let down = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match tcp_rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if ws_tx
                        .send(Message::Binary(Bytes::copy_from_slice(&buf[..n])))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
        let _ = ws_tx.send(Message::Close(None)).await;
    };
    let fault = async {
        match drop_after {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    // Whichever side ends first ends the relay: no half-open connections through a proxy.
    tokio::select! {
        _ = up => {}
        _ = down => {}
        _ = sleeps.changed() => tracing::info!(sprite = name, "sim VM slept: cutting proxied connection"),
        _ = fault => tracing::info!(sprite = name, "fault: dropping proxy socket"),
        _ = sim.shutdown.cancelled() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_parsing() {
        assert_eq!(
            parse_init(br#"{"host":"","port":8765}"#),
            Ok(Init {
                host: "localhost".into(),
                port: 8765
            })
        );
        assert_eq!(
            parse_init(br#"{"port":1}"#).map(|i| i.host),
            Ok("localhost".into())
        );
        assert!(parse_init(br#"{"host":"x","port":0}"#).is_err());
        assert!(parse_init(br#"{"host":"x","port":70000}"#).is_err());
        assert!(parse_init(b"junk").is_err());
    }
}
