//! TCP through the proxy WebSocket, as a byte stream the caller reads and writes like a socket.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream, ReadBuf};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, frame::coding::CloseCode};

use super::client::{SpritesClient, WsStream, to_ws_url};
use super::error::Error;
use super::redact::url_for_log;

const BUFFER: usize = 64 * 1024;
/// After our side hung up, how long to wait for the server's close.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// The proxy's first message.
pub(crate) fn init_message(host: &str, port: u16) -> String {
    let host = if host.is_empty() { "localhost" } else { host };
    serde_json::json!({ "host": host, "port": port }).to_string()
}

/// Reads the server's answer to the init message; `Ok(target)` when connected.
pub(crate) fn parse_init_reply(data: &[u8]) -> Result<String, String> {
    let v: serde_json::Value =
        serde_json::from_slice(data).map_err(|_| "proxy reply is not JSON".to_string())?;
    match v.get("status").and_then(|s| s.as_str()) {
        Some("connected") => Ok(v
            .get("target")
            .and_then(|t| t.as_str())
            .unwrap_or_default()
            .to_string()),
        other => {
            let detail = v
                .get("error")
                .or(v.get("message"))
                .and_then(|m| m.as_str())
                .unwrap_or_default();
            Err(format!("unexpected proxy status {other:?} {detail}"))
        }
    }
}

/// A TCP connection to a port inside a sprite. Reading gives the bytes the VM's process sends;
/// EOF when it (or the proxy) closes. A task bridges it to the WebSocket; dropping the stream
/// closes the WebSocket.
#[derive(Debug)]
pub struct ProxyStream {
    io: DuplexStream,
    target: String,
}

impl ProxyStream {
    /// The address the server says it connected to.
    pub fn target(&self) -> &str {
        &self.target
    }
}

impl AsyncRead for ProxyStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for ProxyStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl SpritesClient {
    /// Opens `/v1/sprites/{name}/proxy` to `host:port` inside the VM (wakes it).
    pub async fn proxy(&self, name: &str, host: &str, port: u16) -> Result<ProxyStream, Error> {
        let url = to_ws_url(self.url(&["sprites", name, "proxy"]));
        let log_url = url_for_log(&url);
        let mut ws = self.ws_connect(url).await?;
        let stream_err = |message: String| Error::Stream {
            url: log_url.clone(),
            message,
        };
        ws.send(Message::text(init_message(host, port)))
            .await
            .map_err(|e| stream_err(e.to_string()))?;
        let reply = async {
            while let Some(msg) = ws.next().await {
                match msg.map_err(|e| stream_err(e.to_string()))? {
                    Message::Text(t) => return Ok(t.as_bytes().to_vec()),
                    Message::Binary(b) => return Ok(b.to_vec()),
                    Message::Close(_) => break,
                    _ => {}
                }
            }
            Err(stream_err("closed before the proxy answered".into()))
        };
        let limit = self.inner.timeouts.connect;
        let reply = tokio::time::timeout(limit, reply)
            .await
            .map_err(|_| Error::Timeout {
                method: "GET",
                url: log_url.clone(),
                after: limit,
            })??;
        let target = parse_init_reply(&reply).map_err(stream_err)?;
        let (ours, theirs) = tokio::io::duplex(BUFFER);
        tokio::spawn(bridge(ws, theirs));
        tracing::debug!(sprite = name, port, "proxy connected");
        Ok(ProxyStream { io: ours, target })
    }
}

/// Moves bytes between the WebSocket and the duplex half until either side ends.
async fn bridge(ws: WsStream, local: DuplexStream) {
    let (mut ws_tx, mut ws_rx) = ws.split();
    let (mut rd, mut wr) = tokio::io::split(local);
    let up = async {
        // Capacity, not zeroed bytes: a page of it is resident only once a
        // read has reached it, so an idle connection does not hold 64 KiB.
        let mut buf = Vec::with_capacity(BUFFER);
        loop {
            buf.clear();
            match rd.read_buf(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    if ws_tx.send(Message::binary(buf.clone())).await.is_err() {
                        return;
                    }
                }
            }
        }
        let close = CloseFrame {
            code: CloseCode::Normal,
            reason: "".into(),
        };
        let _ = ws_tx.send(Message::Close(Some(close))).await;
    };
    let down = async {
        while let Some(Ok(msg)) = ws_rx.next().await {
            match msg {
                Message::Binary(b) => {
                    let Ok(()) = wr.write_all(&b).await else { break };
                }
                Message::Close(_) => break,
                _ => {}
            }
        }
        let _ = wr.shutdown().await;
    };
    tokio::pin!(up, down);
    tokio::select! {
        _ = &mut down => {}
        _ = &mut up => {
            let _ = tokio::time::timeout(CLOSE_WAIT, down).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_and_reply_golden() {
        assert_eq!(init_message("", 8765), r#"{"host":"localhost","port":8765}"#);
        assert_eq!(init_message("127.0.0.1", 1), r#"{"host":"127.0.0.1","port":1}"#);
        assert_eq!(
            parse_init_reply(br#"{"status":"connected","target":"127.0.0.1:80"}"#),
            Ok("127.0.0.1:80".into())
        );
        assert!(parse_init_reply(br#"{"status":"error","error":"refused"}"#).is_err());
        assert!(parse_init_reply(b"nope").is_err());
    }
}
