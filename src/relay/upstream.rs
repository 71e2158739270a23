//! The connection to the runtime: a WebSocket client handshake over the
//! Sprites.dev TCP proxy to the runtime's port inside the VM (which wakes
//! the VM), or, for benchmarks and local development only, straight to a
//! fixed WebSocket URL.

use tokio::net::TcpStream;
use tokio_util::either::Either;

use super::error::Error;
use super::routing::Target;
use super::wire::{self, Role, Socket};
use crate::sprites::{ProxyStream, SpritesClient};
use crate::timers::Timers;

/// How the relay reaches runtimes.
#[derive(Clone, Debug)]
pub enum Connector {
    /// Through the Sprites.dev proxy (production).
    Sprites(SpritesClient),
    /// Every session goes to this `ws://host:port/path`, whatever its
    /// Sprite: for benchmarks and development without Sprites.dev. Never use
    /// it in production: it bypasses the VM routing.
    Fixed(url::Url),
}

/// The byte stream under the upstream WebSocket: the Sprites.dev proxy, or
/// TCP (a fixed URL).
pub type UpstreamIo = Either<ProxyStream, TcpStream>;

pub type Upstream = Socket<UpstreamIo>;

impl Connector {
    /// Its timers in `timers` (the relay's background runtime).
    pub fn with_timers(self, timers: Timers) -> Self {
        match self {
            Connector::Sprites(client) => Connector::Sprites(client.with_timers(timers)),
            fixed @ Connector::Fixed(_) => fixed,
        }
    }

    /// Opens the runtime's WebSocket for `target`.
    pub async fn connect(&self, target: &Target, limits: wire::Limits) -> Result<Upstream, Error> {
        let (mut io, host, path) = match self {
            Connector::Sprites(client) => {
                let stream = client
                    .proxy(&target.vm, "localhost", target.port)
                    .await
                    .map_err(|e| Error::Upstream(e.to_string()))?;
                // The Host header names the VM-local address the runtime
                // listens on; the runtime does not check it.
                (
                    Either::Left(stream),
                    format!("localhost:{}", target.port),
                    "/".to_string(),
                )
            }
            Connector::Fixed(url) => {
                let host = url.host_str().unwrap_or("127.0.0.1");
                let port = url.port_or_known_default().unwrap_or(80);
                let tcp = TcpStream::connect((host, port))
                    .await
                    .map_err(|e| Error::Upstream(format!("connect {host}:{port}: {e}")))?;
                let _ = tcp.set_nodelay(true);
                (
                    Either::Right(tcp),
                    format!("{host}:{port}"),
                    url.path().to_string(),
                )
            }
        };
        let early = wire::client_handshake(&mut io, &host, &path)
            .await
            .map_err(|e| Error::Upstream(format!("runtime handshake: {e}")))?;
        Ok(Socket::new(io, Role::Client, early, limits))
    }
}
