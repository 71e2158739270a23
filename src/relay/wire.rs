//! WebSocket frames as they are on the wire, for relaying.
//!
//! The relay is a server to the browser and a client to the runtime, and a
//! frame is valid on the other side as it came: a browser's frames are masked
//! (clients must mask) and the runtime expects masked frames from its client;
//! the runtime's frames are unmasked and so must be the relay's frames to the
//! browser. So a message is forwarded as the bytes it arrived as, with no
//! unmasking, UTF-8 check, re-masking or copy into a write buffer: the
//! payload is unmasked only when the relay reads it (a text frame's `type`
//! and `id`), and never for binary frames. tokio-tungstenite re-encodes
//! every message; without it the relay's throughput of 16 KiB frames went
//! from about nginx's to nearly twice it, and its CPU per 64 B round trip
//! from 11 µs above nginx's to 4 µs above in the quieter of the recorded
//! runs (docs/relay.md).
//!
//! Neither side negotiates an extension (the relay offers none upstream and
//! accepts none from browsers), so frames with RSV bits are refused, and the
//! wire format of a message is the same on both connections.
//!
//! Frame formatting is tungstenite's; the reading loop, the header parse
//! (`parse_header`, tested against tungstenite's), message assembly and the
//! client handshake are ours.

use std::borrow::Cow;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_tungstenite::tungstenite::handshake::client::generate_key;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Control, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::{Frame, FrameHeader};
use tokio_util::io::poll_read_buf;

use crate::timers::Timers;

/// Which end of the connection the relay is: it decides which frames must
/// be masked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Towards the browser: incoming frames are masked, ours are not.
    Server,
    /// Towards the runtime: incoming frames are unmasked, ours are masked.
    Client,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Text,
    Binary,
    Ping,
    Pong,
    Close,
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("message of {0} bytes or more is over the size cap")]
    TooBig(u64),
    #[error("websocket protocol: {0}")]
    Protocol(&'static str),
    #[error("websocket handshake: {0}")]
    Handshake(String),
}

/// A whole message as read.
#[derive(Clone, Debug)]
pub struct Msg {
    pub kind: Kind,
    /// Its frames exactly as received: forward these to the other side.
    pub wire: Bytes,
    payload: Payload,
}

/// Where a message's payload is. Offsets into `wire` rather than slices of
/// it: a `Bytes` slice is one more reference count to take and drop per
/// message.
#[derive(Clone, Debug)]
enum Payload {
    /// One unmasked frame: its payload starts at this offset of `wire`.
    Plain(usize),
    /// One masked frame: its payload starts at this offset of `wire`.
    Masked(usize, [u8; 4]),
    /// A fragmented message, assembled (and unmasked) while reading.
    Assembled(Bytes),
}

impl Msg {
    /// The payload, unmasked (a copy only if it was masked).
    pub fn payload(&self) -> Cow<'_, [u8]> {
        match &self.payload {
            Payload::Plain(at) => Cow::Borrowed(&self.wire[*at..]),
            Payload::Assembled(b) => Cow::Borrowed(b),
            Payload::Masked(at, mask) => {
                let mut p = self.wire[*at..].to_vec();
                unmask(&mut p, *mask);
                Cow::Owned(p)
            }
        }
    }

    /// The payload as it is in `wire` and the key it is masked with (zeros
    /// if it is not), for a look at it without a copy
    /// ([`super::outbox::may_matter`]).
    pub fn masked_payload(&self) -> (&[u8], [u8; 4]) {
        match &self.payload {
            Payload::Plain(at) => (&self.wire[*at..], [0; 4]),
            Payload::Masked(at, mask) => (&self.wire[*at..], *mask),
            Payload::Assembled(b) => (b, [0; 4]),
        }
    }

    /// Payload length.
    pub fn len(&self) -> usize {
        match &self.payload {
            Payload::Plain(at) | Payload::Masked(at, _) => self.wire.len() - at,
            Payload::Assembled(b) => b.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A Close frame's status code, if it carries one.
    pub fn close_code(&self) -> Option<u16> {
        let p = self.payload();
        (self.kind == Kind::Close && p.len() >= 2).then(|| u16::from_be_bytes([p[0], p[1]]))
    }
}

fn unmask(buf: &mut [u8], mask: [u8; 4]) {
    let word = u32::from_ne_bytes(mask);
    let mut chunks = buf.chunks_exact_mut(4);
    for c in &mut chunks {
        let v = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]) ^ word;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    for (b, m) in chunks.into_remainder().iter_mut().zip(mask) {
        *b ^= m;
    }
}

/// The frame header at the start of `buf` (RFC 6455 section 5.2), its
/// payload length and its own length; None until all of it is there.
/// Reserved opcodes come back as `OpCode::*::Reserved` for the caller to
/// refuse. Written out rather than tungstenite's `FrameHeader::parse`, which
/// reads through an `io::Read` cursor with a trace point per field: that
/// parse was about 200 of the relay's ~4 600 instructions per relayed
/// message (callgrind, docs/relay.md). The tests check ours against it.
fn parse_header(buf: &[u8]) -> Option<(FrameHeader, u64, usize)> {
    let [first, second, ..] = *buf else {
        return None;
    };
    let (len, mut at) = match second & 0x7f {
        126 => (u64::from(u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?)), 4),
        127 => (u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?), 10),
        n => (u64::from(n), 2),
    };
    let mask = if second & 0x80 != 0 {
        let m: [u8; 4] = buf.get(at..at + 4)?.try_into().ok()?;
        at += 4;
        Some(m)
    } else {
        None
    };
    let header = FrameHeader {
        is_final: first & 0x80 != 0,
        rsv1: first & 0x40 != 0,
        rsv2: first & 0x20 != 0,
        rsv3: first & 0x10 != 0,
        opcode: OpCode::from(first & 0x0f),
        mask,
    };
    Some((header, len, at))
}

/// A message being assembled from fragments.
struct Partial {
    kind: Kind,
    wire: BytesMut,
    payload: BytesMut,
}

/// Sizes and bounds of one socket.
#[derive(Clone, Debug)]
pub struct Limits {
    /// The read buffer's size when idle; a large message grows it for its
    /// own duration only.
    pub read_buffer: usize,
    /// Largest message read (larger: [`WireError::TooBig`]).
    pub max_message: usize,
    /// Longest a write may wait for the peer to read (like nginx's
    /// `send_timeout`): a peer that stops reading must not hold a session,
    /// and its task, forever.
    pub write_timeout: Duration,
    /// Where the write timeout's timer goes (`crate::timers`).
    pub timers: Timers,
}

/// One WebSocket connection after its handshake. Reading is cancel-safe
/// (bytes are kept in the socket's buffer until a whole message is there),
/// so `next` can sit in a `select!` and `poll_next` in the session loop;
/// writes go straight to the socket.
pub struct Socket<S> {
    io: S,
    role: Role,
    rbuf: BytesMut,
    limits: Limits,
    partial: Option<Partial>,
    /// A frame the socket took in part ([`Socket::try_relay`]), how far it
    /// got, and since when it waits: finished before anything else is
    /// written, so nothing interleaves with it.
    pending: Option<Pending>,
}

struct Pending {
    wire: Bytes,
    at: usize,
    since: tokio::time::Instant,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Socket<S> {
    /// `already_read`: bytes that came after the handshake, in the same read.
    pub fn new(io: S, role: Role, already_read: BytesMut, limits: Limits) -> Self {
        let mut rbuf = BytesMut::with_capacity(limits.read_buffer.max(already_read.len()));
        rbuf.extend_from_slice(&already_read);
        Self {
            io,
            role,
            rbuf,
            limits,
            partial: None,
            pending: None,
        }
    }

    /// Where this socket's timers go.
    pub fn timers(&self) -> &Timers {
        &self.limits.timers
    }

    /// The next message (control frames included, as they arrive); None
    /// when the peer closed the connection between messages.
    pub async fn next(&mut self) -> Result<Option<Msg>, WireError> {
        std::future::poll_fn(|cx| self.poll_next(cx)).await
    }

    /// [`Socket::next`] as a poll, for the session loop, which polls each
    /// socket with a waker of its own (`wakeups`). `Ready` does not mean the
    /// read side registered `cx`: poll again until `Pending` before waiting.
    pub fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Msg>, WireError>> {
        loop {
            if let Some(m) = self.parse()? {
                return Poll::Ready(Ok(Some(m)));
            }
            if self.rbuf.capacity() - self.rbuf.len() < 512 {
                if self.rbuf.is_empty() {
                    // A fresh buffer of the idle size, not a reclaimed one
                    // that a large message may have grown.
                    self.rbuf = BytesMut::with_capacity(self.limits.read_buffer);
                } else {
                    self.rbuf.reserve(self.limits.read_buffer);
                }
            }
            if ready!(poll_read_buf(Pin::new(&mut self.io), cx, &mut self.rbuf))? == 0 {
                if self.rbuf.is_empty() && self.partial.is_none() {
                    return Poll::Ready(Ok(None));
                }
                return Poll::Ready(Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()));
            }
        }
    }

    /// One message from the buffer, if a whole one is there.
    fn parse(&mut self) -> Result<Option<Msg>, WireError> {
        loop {
            let Some((header, len, head_len)) = parse_header(&self.rbuf) else {
                return Ok(None);
            };
            if header.rsv1 || header.rsv2 || header.rsv3 {
                return Err(WireError::Protocol("reserved bits set"));
            }
            if header.mask.is_some() != (self.role == Role::Server) {
                return Err(WireError::Protocol(match self.role {
                    Role::Server => "unmasked frame from a client",
                    Role::Client => "masked frame from a server",
                }));
            }
            let so_far = self.partial.as_ref().map_or(0, |p| p.payload.len() as u64);
            if len.saturating_add(so_far) > self.limits.max_message as u64 {
                return Err(WireError::TooBig(len.saturating_add(so_far)));
            }
            let total = head_len + len as usize;
            if self.rbuf.len() < total {
                self.rbuf.reserve(total - self.rbuf.len());
                return Ok(None);
            }
            let wire = self.rbuf.split_to(total).freeze();
            let payload = match header.mask {
                None => Payload::Plain(head_len),
                Some(mask) => Payload::Masked(head_len, mask),
            };
            match header.opcode {
                OpCode::Control(c) => {
                    if !header.is_final || len > 125 {
                        return Err(WireError::Protocol("fragmented or long control frame"));
                    }
                    let kind = match c {
                        Control::Ping => Kind::Ping,
                        Control::Pong => Kind::Pong,
                        Control::Close => Kind::Close,
                        Control::Reserved(_) => return Err(WireError::Protocol("reserved opcode")),
                    };
                    return Ok(Some(Msg { kind, wire, payload }));
                }
                OpCode::Data(d) => {
                    let kind = match (d, self.partial.is_some()) {
                        (Data::Text, false) => Kind::Text,
                        (Data::Binary, false) => Kind::Binary,
                        (Data::Continue, true) => self.partial.as_ref().expect("checked").kind,
                        (Data::Continue, false) => {
                            return Err(WireError::Protocol("continuation of nothing"));
                        }
                        (Data::Text | Data::Binary, true) => {
                            return Err(WireError::Protocol("new message inside a fragmented one"));
                        }
                        (Data::Reserved(_), _) => return Err(WireError::Protocol("reserved opcode")),
                    };
                    if header.is_final && self.partial.is_none() {
                        return Ok(Some(Msg { kind, wire, payload }));
                    }
                    let p = self.partial.get_or_insert_with(|| Partial {
                        kind,
                        wire: BytesMut::new(),
                        payload: BytesMut::new(),
                    });
                    p.wire.extend_from_slice(&wire);
                    let at = p.payload.len();
                    p.payload.extend_from_slice(&wire[head_len..]);
                    if let Some(mask) = header.mask {
                        unmask(&mut p.payload[at..], mask);
                    }
                    if header.is_final {
                        let p = self.partial.take().expect("present");
                        return Ok(Some(Msg {
                            kind: p.kind,
                            wire: p.wire.freeze(),
                            payload: Payload::Assembled(p.payload.freeze()),
                        }));
                    }
                }
            }
        }
    }

    /// Writes frames that came from the other side, unchanged, as far as
    /// the socket takes them without waiting: `None` when all of `wire` is
    /// written and flushed (a socket with room takes a frame whole: the path
    /// of nearly every relayed message), else how many bytes were written,
    /// for [`Self::send_wire`] to finish from there. Polled with a waker that
    /// does nothing: no wake-up is asked for.
    pub fn try_send_wire(&mut self, wire: &[u8]) -> io::Result<Option<usize>> {
        let mut cx = Context::from_waker(Waker::noop());
        let mut io = Pin::new(&mut self.io);
        let written = match io.as_mut().poll_write(&mut cx, wire) {
            Poll::Ready(n) => n?,
            Poll::Pending => 0,
        };
        if written == wire.len()
            && let Poll::Ready(r) = io.poll_flush(&mut cx)
        {
            return r.map(|()| None);
        }
        Ok(Some(written))
    }

    /// Writes `wire` now as far as the socket takes it; the rest stays
    /// [pending](Self::is_writing), for [`Self::poll_pending`] (or the next
    /// write of any kind) to finish. Call it only when nothing is pending.
    /// An error means nothing was written.
    pub fn try_relay(&mut self, wire: &Bytes) -> io::Result<()> {
        debug_assert!(self.pending.is_none(), "a frame is still being written");
        if let Some(at) = self.try_send_wire(wire)? {
            self.pending = Some(Pending {
                wire: wire.clone(),
                at,
                since: tokio::time::Instant::now(),
            });
        }
        Ok(())
    }

    /// Whether a frame taken in part is still being written.
    pub fn is_writing(&self) -> bool {
        self.pending.is_some()
    }

    /// Since when the pending frame waits for the peer, if there is one.
    pub fn writing_since(&self) -> Option<tokio::time::Instant> {
        self.pending.as_ref().map(|p| p.since)
    }

    /// Writes on the pending frame; `Ready(Ok)` once there is none.
    pub fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some(p) = &mut self.pending {
            if p.at < p.wire.len() {
                let n = ready!(Pin::new(&mut self.io).poll_write(cx, &p.wire[p.at..]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                p.at += n;
                continue;
            }
            ready!(Pin::new(&mut self.io).poll_flush(cx))?;
            self.pending = None;
        }
        Poll::Ready(Ok(()))
    }

    /// The pending frame, whole, taken off the socket (its connection is
    /// being given up: the frame can go again on another).
    pub fn take_pending(&mut self) -> Option<Bytes> {
        self.pending.take().map(|p| p.wire)
    }

    /// [`Self::try_send_wire`], then the rest with the task's waker; a
    /// pending frame is finished first. The
    /// timer is armed only if the socket cannot take the frames at once: a
    /// timer per message would cost every message a trip through the timer
    /// wheel, and the `write_all` future alone made the path of every
    /// relayed message longer (callgrind).
    pub async fn send_wire(&mut self, wire: &[u8]) -> io::Result<()> {
        let written = match self.pending {
            None => match self.try_send_wire(wire)? {
                None => return Ok(()),
                Some(written) => written,
            },
            Some(_) => 0,
        };
        let rest = &wire[written..];
        let (timers, limit) = (self.limits.timers.clone(), self.limits.write_timeout);
        let write = async {
            std::future::poll_fn(|cx| self.poll_pending(cx)).await?;
            self.io.write_all(rest).await?;
            self.io.flush().await
        };
        timers
            .timeout(limit, write)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "the peer stopped reading"))?
    }

    /// Writes a frame of the relay's own, masked if we are the client.
    pub async fn send(&mut self, frame: Frame) -> io::Result<()> {
        let out = self.encode(frame)?;
        self.send_wire(&out).await
    }

    fn encode(&self, mut frame: Frame) -> io::Result<Vec<u8>> {
        if self.role == Role::Client {
            frame.header_mut().mask = Some(rand::random());
        }
        let mut out = Vec::with_capacity(frame.len());
        frame.format(&mut out).map_err(io::Error::other)?;
        Ok(out)
    }

    /// A ping, without waiting: written as [`Self::try_relay`] writes, or
    /// not at all while a frame is still being written (the connection is
    /// busy, which keeps it alive as well as a ping would). Waiting here
    /// would hold the session's loop on this peer alone.
    pub fn try_ping(&mut self) -> io::Result<()> {
        if self.is_writing() {
            return Ok(());
        }
        let out = Bytes::from(self.encode(Frame::ping(Bytes::new()))?);
        self.try_relay(&out)
    }

    pub async fn send_text(&mut self, text: String) -> io::Result<()> {
        self.send(Frame::message(text, OpCode::Data(Data::Text), true))
            .await
    }

    /// Answers a ping with its payload.
    pub async fn pong(&mut self, ping: &Msg) -> io::Result<()> {
        self.send(Frame::pong(Bytes::copy_from_slice(&ping.payload())))
            .await
    }

    /// Sends a Close frame (no code: an empty one).
    pub async fn close(&mut self, code: Option<u16>, reason: &str) -> io::Result<()> {
        let mut payload = Vec::new();
        if let Some(code) = code {
            payload.extend_from_slice(&code.to_be_bytes());
            payload.extend_from_slice(reason.as_bytes());
        }
        let header = FrameHeader {
            opcode: OpCode::Control(Control::Close),
            ..FrameHeader::default()
        };
        self.send(Frame::from_payload(header, payload.into())).await?;
        self.io.shutdown().await
    }
}

/// The client side of the opening handshake on `io` (RFC 6455 section 4.1),
/// offering no extension. Returns the bytes read past the response.
pub async fn client_handshake<S>(io: &mut S, host: &str, path: &str) -> Result<BytesMut, WireError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    const MAX_RESPONSE_HEAD: usize = 16 * 1024;
    let key = generate_key();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n\r\n"
    );
    io.write_all(request.as_bytes()).await?;
    io.flush().await?;
    let mut buf = BytesMut::with_capacity(1024);
    loop {
        if io.read_buf(&mut buf).await? == 0 {
            return Err(WireError::Handshake(
                "connection closed during the handshake".into(),
            ));
        }
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        let head_len = match resp.parse(&buf) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) if buf.len() < MAX_RESPONSE_HEAD => continue,
            Ok(httparse::Status::Partial) => {
                return Err(WireError::Handshake("response head too large".into()));
            }
            Err(e) => return Err(WireError::Handshake(e.to_string())),
        };
        if resp.code != Some(101) {
            return Err(WireError::Handshake(format!("status {:?}", resp.code)));
        }
        let header = |name: &str| {
            resp.headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .map(|h| h.value)
        };
        if header("Sec-WebSocket-Accept") != Some(derive_accept_key(key.as_bytes()).as_bytes()) {
            return Err(WireError::Handshake("wrong Sec-WebSocket-Accept".into()));
        }
        if header("Sec-WebSocket-Extensions").is_some_and(|v| !v.is_empty()) {
            return Err(WireError::Handshake(
                "the server chose an extension we did not offer".into(),
            ));
        }
        return Ok(buf.split_off(head_len));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::WebSocketStream;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::{Role as TRole, WebSocketConfig};

    const MAX: usize = 1 << 20;

    fn limits(read_buffer: usize, max_message: usize) -> Limits {
        Limits {
            read_buffer,
            max_message,
            write_timeout: Duration::from_secs(10),
            timers: Timers::current(),
        }
    }

    /// A tokio-tungstenite peer on one end of a pipe and our socket on the other.
    async fn pair(
        our_role: Role,
    ) -> (
        Socket<tokio::io::DuplexStream>,
        WebSocketStream<tokio::io::DuplexStream>,
    ) {
        let (a, b) = tokio::io::duplex(1 << 20);
        let peer_role = match our_role {
            Role::Server => TRole::Client,
            Role::Client => TRole::Server,
        };
        let peer = WebSocketStream::from_raw_socket(b, peer_role, Some(WebSocketConfig::default())).await;
        (Socket::new(a, our_role, BytesMut::new(), limits(64, MAX)), peer)
    }

    #[tokio::test]
    async fn reads_masked_text_from_a_client_and_unmasks_only_on_demand() {
        let (mut ours, mut browser) = pair(Role::Server).await;
        browser.send(Message::text("{\"type\":\"ping\"}")).await.unwrap();
        let m = ours.next().await.unwrap().unwrap();
        assert_eq!(m.kind, Kind::Text);
        assert_eq!(&*m.payload(), b"{\"type\":\"ping\"}");
        // Masked on the wire: the payload bytes differ from the text.
        assert_ne!(&m.wire[m.wire.len() - m.len()..], &*m.payload());
        // As it is on the wire, with its key: the same bytes once unmasked.
        let (raw, mask) = m.masked_payload();
        assert_ne!(mask, [0; 4]);
        let unmasked: Vec<u8> = raw.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]).collect();
        assert_eq!(unmasked, b"{\"type\":\"ping\"}");
    }

    #[tokio::test]
    async fn forwarded_wire_bytes_are_valid_for_the_other_side() {
        // browser (client) -> ours (server) ... ours (client) -> runtime (server), and back.
        let (mut from_browser, mut browser) = pair(Role::Server).await;
        let (mut to_runtime, mut runtime) = pair(Role::Client).await;
        let big = "x".repeat(70_000);
        for m in [
            Message::text("hello"),
            Message::binary(vec![1u8, 2, 3]),
            Message::text(big.clone()),
        ] {
            browser.send(m.clone()).await.unwrap();
            let got = from_browser.next().await.unwrap().unwrap();
            to_runtime.send_wire(&got.wire).await.unwrap();
            assert_eq!(runtime.next().await.unwrap().unwrap(), m);
            runtime.send(m.clone()).await.unwrap();
            let back = to_runtime.next().await.unwrap().unwrap();
            from_browser.send_wire(&back.wire).await.unwrap();
            assert_eq!(browser.next().await.unwrap().unwrap(), m);
        }
    }

    #[tokio::test]
    async fn assembles_fragments_around_an_interleaved_ping() {
        let (mut ours, mut peer) = pair(Role::Client).await;
        // As a server would send them: text "ab" in two fragments, a ping between.
        peer.send(Message::Frame(Frame::message(
            "a",
            OpCode::Data(Data::Text),
            false,
        )))
        .await
        .unwrap();
        peer.send(Message::Ping(Bytes::from_static(b"p"))).await.unwrap();
        peer.send(Message::Frame(Frame::message(
            "b",
            OpCode::Data(Data::Continue),
            true,
        )))
        .await
        .unwrap();
        let ping = ours.next().await.unwrap().unwrap();
        assert_eq!((ping.kind, &*ping.payload()), (Kind::Ping, &b"p"[..]));
        let text = ours.next().await.unwrap().unwrap();
        assert_eq!((text.kind, &*text.payload()), (Kind::Text, &b"ab"[..]));
        // Both fragments, as they came.
        assert_eq!(text.wire.len(), 2 * (2 + 1));
    }

    #[tokio::test]
    async fn a_write_to_a_peer_that_stopped_reading_times_out() {
        // A pipe of 64 bytes that nobody reads: the first write fills it.
        let (a, _unread) = tokio::io::duplex(64);
        let mut ours = Socket::new(
            a,
            Role::Server,
            BytesMut::new(),
            Limits {
                write_timeout: Duration::from_millis(100),
                ..limits(64, MAX)
            },
        );
        ours.send_wire(&[0u8; 64]).await.expect("fits at once, no timer");
        let started = std::time::Instant::now();
        let err = ours.send_wire(&[0u8; 64]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= Duration::from_millis(100));
    }

    #[tokio::test]
    async fn a_write_the_socket_takes_in_part_is_finished_once() {
        // The first write takes 64 bytes: the rest goes out once the peer
        // reads, after them, and nothing twice.
        let (a, mut peer) = tokio::io::duplex(64);
        let mut ours = Socket::new(a, Role::Server, BytesMut::new(), limits(64, MAX));
        let frame: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            peer.read_to_end(&mut got).await.unwrap();
            got
        });
        ours.send_wire(&frame).await.unwrap();
        drop(ours);
        assert_eq!(reader.await.unwrap(), frame);
    }

    #[tokio::test]
    async fn a_message_over_the_cap_is_refused_before_its_payload_is_read() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let mut peer = WebSocketStream::from_raw_socket(b, TRole::Client, None).await;
        let mut ours = Socket::new(a, Role::Server, BytesMut::new(), limits(64, 100));
        tokio::spawn(async move {
            let _ = peer.send(Message::binary(vec![0u8; 1000])).await;
            peer
        });
        assert!(matches!(ours.next().await, Err(WireError::TooBig(1000))));
    }

    #[test]
    fn header_parse_agrees_with_tungstenites() {
        let mut cases: Vec<Vec<u8>> = Vec::new();
        for (len, mask) in [
            (0usize, None),
            (5, Some([1, 2, 3, 4])),
            (125, None),
            (126, Some([9; 4])),
            (65_535, None),
            (65_536, Some([7; 4])),
        ] {
            for opcode in [
                OpCode::Data(Data::Text),
                OpCode::Data(Data::Binary),
                OpCode::Data(Data::Continue),
                OpCode::Control(Control::Ping),
            ] {
                for is_final in [true, false] {
                    let header = FrameHeader {
                        is_final,
                        opcode,
                        mask,
                        rsv2: !is_final,
                        ..FrameHeader::default()
                    };
                    let mut out = Vec::new();
                    header.format(len as u64, &mut out).unwrap();
                    cases.push(out);
                }
            }
        }
        // Reserved opcodes parse (the caller refuses them).
        cases.push(vec![0x83, 0x00]);
        cases.push(vec![0x8b, 0x00]);
        for case in cases {
            for cut in 0..=case.len() {
                let buf = &case[..cut];
                let theirs = FrameHeader::parse(&mut std::io::Cursor::new(buf)).ok().flatten();
                let ours = parse_header(buf);
                match (theirs, ours) {
                    (None, None) => {}
                    (Some((h, len)), Some((o, olen, head_len))) => {
                        assert_eq!(
                            (format!("{h:?}"), len, cut),
                            (format!("{o:?}"), olen, head_len),
                            "{case:?}"
                        );
                    }
                    (None, Some(_)) if matches!(buf[0] & 0x0f, 3..=7 | 11..=15) => {}
                    (t, o) => panic!("{buf:?}: tungstenite {t:?}, ours {o:?}"),
                }
            }
        }
    }

    #[tokio::test]
    async fn refuses_frames_with_the_wrong_masking_or_reserved_bits() {
        // An unmasked frame to a server.
        let (a, mut b) = tokio::io::duplex(1024);
        let mut ours = Socket::new(a, Role::Server, BytesMut::new(), limits(64, MAX));
        b.write_all(&[0x81, 0x01, b'x']).await.unwrap();
        assert!(matches!(ours.next().await, Err(WireError::Protocol(_))));
        // RSV1 (a compressed frame) to a client.
        let (a, mut b) = tokio::io::duplex(1024);
        let mut ours = Socket::new(a, Role::Client, BytesMut::new(), limits(64, MAX));
        b.write_all(&[0xc1, 0x01, b'x']).await.unwrap();
        assert!(matches!(ours.next().await, Err(WireError::Protocol(_))));
    }

    #[tokio::test]
    async fn reading_byte_by_byte_and_cancelled_reads_lose_nothing() {
        let (a, mut b) = tokio::io::duplex(1024);
        let mut ours = Socket::new(a, Role::Client, BytesMut::new(), limits(64, MAX));
        let mut wire = Vec::new();
        Frame::message("hello", OpCode::Data(Data::Text), true)
            .format(&mut wire)
            .unwrap();
        for byte in &wire {
            b.write_all(std::slice::from_ref(byte)).await.unwrap();
            // A select! that picks another branch drops the read future.
            let r = tokio::time::timeout(std::time::Duration::from_millis(5), ours.next()).await;
            if let Ok(m) = r {
                assert_eq!(&*m.unwrap().unwrap().payload(), b"hello");
                return;
            }
        }
        panic!("the message never completed");
    }

    #[tokio::test]
    async fn a_clean_close_between_messages_is_the_end_and_a_cut_frame_an_error() {
        let (a, b) = tokio::io::duplex(1024);
        let mut ours = Socket::new(a, Role::Client, BytesMut::new(), limits(64, MAX));
        drop(b);
        assert!(ours.next().await.unwrap().is_none());
        let (a, mut b) = tokio::io::duplex(1024);
        let mut ours = Socket::new(a, Role::Client, BytesMut::new(), limits(64, MAX));
        b.write_all(&[0x81, 0x05, b'h']).await.unwrap();
        drop(b);
        assert!(matches!(ours.next().await, Err(WireError::Io(_))));
    }

    #[tokio::test]
    async fn our_frames_are_masked_only_towards_a_server() {
        let (mut to_runtime, mut runtime) = pair(Role::Client).await;
        to_runtime.send_text("hi".into()).await.unwrap();
        assert_eq!(runtime.next().await.unwrap().unwrap(), Message::text("hi"));
        to_runtime.close(Some(1000), "bye").await.unwrap();
        match runtime.next().await.unwrap().unwrap() {
            Message::Close(Some(f)) => assert_eq!((u16::from(f.code), f.reason.as_str()), (1000, "bye")),
            other => panic!("{other:?}"),
        }
        let (mut to_browser, mut browser) = pair(Role::Server).await;
        to_browser.send_text("hi".into()).await.unwrap();
        assert_eq!(browser.next().await.unwrap().unwrap(), Message::text("hi"));
    }

    #[tokio::test]
    async fn client_handshake_checks_the_accept_key_and_keeps_early_bytes() {
        let (mut a, b) = tokio::io::duplex(4096);
        let server = tokio::spawn(async move {
            let mut ws = tokio_tungstenite::accept_async(b).await.unwrap();
            // Sent right after the handshake: may arrive with the response.
            ws.send(Message::text("first")).await.unwrap();
            ws
        });
        let early = client_handshake(&mut a, "localhost:8765", "/").await.unwrap();
        let _server = server.await.unwrap();
        let mut ours = Socket::new(a, Role::Client, early, limits(64, MAX));
        assert_eq!(&*ours.next().await.unwrap().unwrap().payload(), b"first");

        // A server that answers with the wrong key.
        let (mut a, mut b) = tokio::io::duplex(4096);
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let _ = b.read(&mut buf).await;
            let _ = b
                .write_all(
                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                      Sec-WebSocket-Accept: bm90IHRoZSByaWdodCBrZXk=\r\n\r\n",
                )
                .await;
            b
        });
        assert!(matches!(
            client_handshake(&mut a, "h", "/").await,
            Err(WireError::Handshake(_))
        ));
    }
}
