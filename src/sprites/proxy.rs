//! TCP through the proxy WebSocket, as a byte stream the caller reads and writes like a socket.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::{Sink, SinkExt, Stream, StreamExt, ready};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig, frame::coding::CloseCode};
use tokio_tungstenite::tungstenite::{self, Message};

use super::client::{Dial, SpritesClient, TokioDial, WsStream, to_ws_url};
use super::error::Error;
use super::redact::url_for_log;
use crate::timers::Timers;

/// The proxy WebSocket's initial read buffer; a larger message grows it.
const READ_BUFFER: usize = 4 * 1024;
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

/// A TCP connection to a port inside a sprite. Reading gives the bytes the VM's process sends
/// (EOF when it, or the proxy, closes); each write goes out as one binary message.
///
/// The stream is the WebSocket itself, not a task bridging it to an in-memory pipe: an idle
/// connection then holds no task, pipe or copy buffer (the relay keeps one per browser
/// session; the bridge made a deployed relay's idle session ~160 KiB, docs/relay.md), and
/// a message is not copied and handed between tasks on its way.
pub struct ProxyStream<S = tokio::net::TcpStream> {
    /// Boxed: the WebSocket is ~1.4 KiB, and the relay's session future
    /// holds a stream in several of its states. None once dropped.
    ws: Option<Box<WsStream<S>>>,
    /// What the last binary message held beyond what the reader took.
    pending: Bytes,
    /// The server's Close came, or the connection ended: reads give EOF.
    eof: bool,
    /// Our Close went out (shutdown): nothing to do on drop.
    closed: bool,
    target: String,
    /// Where the closing handshake's timeout goes when dropped.
    timers: Timers,
    /// The closing handshake when dropped, on the runtime that drives `S`
    /// ([`Dial::spawn_detached`]).
    close_detached: fn(Box<WsStream<S>>, Timers),
}

impl<S> std::fmt::Debug for ProxyStream<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyStream")
            .field("target", &self.target)
            .field("pending", &self.pending.len())
            .field("eof", &self.eof)
            .finish()
    }
}

impl<S> ProxyStream<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    /// The address the server says it connected to.
    pub fn target(&self) -> &str {
        &self.target
    }

    fn ws(&mut self) -> Pin<&mut WsStream<S>> {
        Pin::new(&mut **self.ws.as_mut().expect("present until drop"))
    }
}

fn io_error(e: tungstenite::Error) -> io::Error {
    match e {
        tungstenite::Error::Io(e) => e,
        tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed => {
            io::Error::from(io::ErrorKind::BrokenPipe)
        }
        e => io::Error::other(e),
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for ProxyStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.pending.is_empty() {
                let n = this.pending.len().min(buf.remaining());
                buf.put_slice(&this.pending.split_to(n));
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            match ready!(this.ws().poll_next(cx)) {
                Some(Ok(Message::Binary(data))) => this.pending = data,
                // The server closed (the VM slept, its process exited): EOF,
                // as a TCP peer's FIN would be.
                Some(Ok(Message::Close(_))) | None => this.eof = true,
                // Pings are answered by tungstenite; the proxy sends no text.
                Some(Ok(_)) => {}
                Some(Err(tungstenite::Error::ConnectionClosed)) => this.eof = true,
                Some(Err(e)) => return Poll::Ready(Err(io_error(e))),
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for ProxyStream<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        ready!(self.ws().poll_ready(cx)).map_err(io_error)?;
        self.ws()
            .start_send(Message::binary(Bytes::copy_from_slice(buf)))
            .map_err(io_error)?;
        // Sent at once (no write buffer, see `config`); what the socket did
        // not take yet goes with the next write or flush.
        if let Poll::Ready(Err(e)) = self.ws().poll_flush(cx) {
            return Poll::Ready(Err(io_error(e)));
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.ws().poll_flush(cx).map_err(io_error)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = ready!(self.ws().poll_close(cx));
        self.closed = true;
        match r {
            Ok(()) | Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                Poll::Ready(Ok(()))
            }
            Err(e) => Poll::Ready(Err(io_error(e))),
        }
    }
}

impl<S> Drop for ProxyStream<S> {
    /// Dropped without a shutdown (the usual end of a relay session): close
    /// the WebSocket politely, as a socket's drop sends a FIN, in a task so
    /// that the drop does not wait, and bounded so that a silent server
    /// does not hold it.
    fn drop(&mut self) {
        let Some(ws) = self.ws.take() else { return };
        if self.closed || self.eof {
            return;
        }
        (self.close_detached)(ws, self.timers.clone());
    }
}

/// The closing handshake of a dropped stream, as a task where `D`'s
/// streams run.
fn close_detached<D: Dial>(ws: Box<WsStream<D::Stream>>, timers: Timers) {
    D::spawn_detached(Box::pin(async move {
        let mut ws = *ws;
        let close = async {
            let frame = CloseFrame {
                code: CloseCode::Normal,
                reason: "".into(),
            };
            if ws.close(Some(frame)).await.is_ok() {
                // Until the server's Close: the handshake's end.
                while let Some(Ok(_)) = ws.next().await {}
            }
        };
        let _ = timers.timeout(CLOSE_WAIT, close).await;
    }));
}

/// The proxy WebSocket's settings. tungstenite's defaults suit bulk
/// transfer: a 128 KiB read buffer per connection and writes held until
/// 128 KiB are buffered. A relay keeps one such connection per idle browser
/// session and writes small messages that wait for an answer.
fn config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(0)
}

impl SpritesClient {
    /// Opens `/v1/sprites/{name}/proxy` to `host:port` inside the VM (wakes it).
    pub async fn proxy(&self, name: &str, host: &str, port: u16) -> Result<ProxyStream, Error> {
        self.proxy_via(name, host, port, &TokioDial).await
    }

    /// [`Self::proxy`] over a connection from `dial`.
    pub async fn proxy_via<D: Dial>(
        &self,
        name: &str,
        host: &str,
        port: u16,
        dial: &D,
    ) -> Result<ProxyStream<D::Stream>, Error> {
        let url = to_ws_url(self.url(&["sprites", name, "proxy"]));
        let log_url = url_for_log(&url);
        let mut ws = self.ws_connect_with(url, Some(config()), dial).await?;
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
        let reply = self
            .inner
            .timers
            .timeout(limit, reply)
            .await
            .map_err(|_| Error::Timeout {
                method: "GET",
                url: log_url.clone(),
                after: limit,
            })??;
        let target = parse_init_reply(&reply).map_err(stream_err)?;
        tracing::debug!(sprite = name, port, "proxy connected");
        Ok(ProxyStream {
            ws: Some(Box::new(ws)),
            pending: Bytes::new(),
            eof: false,
            closed: false,
            target,
            timers: self.inner.timers.clone(),
            close_detached: close_detached::<D>,
        })
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

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_tungstenite::tungstenite::protocol::Role;
    use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

    /// A ProxyStream over a loopback WebSocket, and the server's end.
    async fn pair() -> (ProxyStream, WebSocketStream<tokio::net::TcpStream>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ours = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (theirs, _) = listener.accept().await.unwrap();
        let ws =
            WebSocketStream::from_raw_socket(MaybeTlsStream::Plain(ours), Role::Client, Some(config())).await;
        let server = WebSocketStream::from_raw_socket(theirs, Role::Server, None).await;
        let stream = ProxyStream {
            ws: Some(Box::new(ws)),
            pending: Bytes::new(),
            eof: false,
            closed: false,
            target: "127.0.0.1:8765".into(),
            timers: Timers::current(),
            close_detached: close_detached::<TokioDial>,
        };
        (stream, server)
    }

    #[tokio::test]
    async fn reads_messages_as_a_byte_stream_and_writes_one_message_per_write() {
        let (mut stream, mut server) = pair().await;
        server.send(Message::binary(&b"hello world"[..])).await.unwrap();
        server
            .send(Message::Ping(Bytes::from_static(b"p")))
            .await
            .unwrap();
        server.send(Message::binary(&b"!"[..])).await.unwrap();
        // A reader with less room than a message gets the rest next time.
        let mut got = Vec::new();
        let mut buf = [0u8; 5];
        while got.len() < 12 {
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0 && n <= 5);
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, b"hello world!");

        stream.write_all(b"abc").await.unwrap();
        stream.flush().await.unwrap();
        // The ping was answered, then the write came as one binary message.
        let mut seen = Vec::new();
        while let Some(m) = server.next().await {
            let m = m.unwrap();
            let done = m.is_binary();
            seen.push(m);
            if done {
                break;
            }
        }
        assert_eq!(
            seen,
            [
                Message::Pong(Bytes::from_static(b"p")),
                Message::binary(&b"abc"[..])
            ]
        );

        // The server's Close is the end of the stream.
        server.close(None).await.unwrap();
        assert_eq!(stream.read(&mut buf).await.unwrap(), 0);
        assert_eq!(stream.read(&mut buf).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn dropping_the_stream_closes_the_websocket_with_a_normal_close() {
        let (stream, mut server) = pair().await;
        drop(stream);
        let msg = tokio::time::timeout(Duration::from_secs(5), server.next())
            .await
            .expect("a Close within 5 s")
            .expect("a message")
            .unwrap();
        match msg {
            Message::Close(Some(f)) => assert_eq!(f.code, CloseCode::Normal),
            other => panic!("expected a Close, got {other:?}"),
        }
    }
}
