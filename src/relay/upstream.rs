//! The connection to the runtime: a WebSocket client handshake over the
//! Sprites.dev TCP proxy to the runtime's port inside the VM (which wakes
//! the VM), or, for benchmarks and local development only, straight to a
//! fixed WebSocket URL.

use std::io;
use std::net::{IpAddr, SocketAddr};

use tokio_util::either::Either;

use super::error::Error;
use super::routing::Target;
use super::wire::{self, Role, Socket};
use crate::event_loop::{self, TcpStream};
use crate::sprites::{Dial, ProxyStream, SpritesClient};
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
/// TCP (a fixed URL); either way over a socket of the relay's event loop.
pub type UpstreamIo = Either<ProxyStream<TcpStream>, TcpStream>;

/// Connections on the relay's event loop (`crate::event_loop`), where the
/// session that uses them runs; host names are resolved on a tokio runtime
/// (`dns`: the relay's background one), since the loop has no blocking pool.
#[derive(Clone, Debug)]
pub struct LoopDial {
    pub dns: tokio::runtime::Handle,
}

impl Dial for LoopDial {
    type Stream = TcpStream;

    async fn dial(&self, host: &str, port: u16) -> io::Result<TcpStream> {
        let addrs: Vec<SocketAddr> = match host.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) => {
                let name = format!("{host}:{port}");
                self.dns
                    .spawn(async move { tokio::net::lookup_host(name).await.map(Iterator::collect) })
                    .await
                    .map_err(io::Error::other)??
            }
        };
        let mut last = io::Error::new(io::ErrorKind::NotFound, format!("{host} has no address"));
        for addr in addrs {
            match TcpStream::connect(addr).await {
                Ok(tcp) => {
                    tcp.set_nodelay(true)?;
                    return Ok(tcp);
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    fn spawn_detached(task: futures::future::BoxFuture<'static, ()>) {
        // Dropped on the loop, as the relay's sessions drop their upstreams.
        let _ = event_loop::spawn_local(task);
    }
}

pub type Upstream = Socket<UpstreamIo>;

impl Connector {
    /// Its timers in `timers` (the relay's background runtime).
    pub fn with_timers(self, timers: Timers) -> Self {
        match self {
            Connector::Sprites(client) => Connector::Sprites(client.with_timers(timers)),
            fixed @ Connector::Fixed(_) => fixed,
        }
    }

    /// Opens the runtime's WebSocket for `target`, on the event loop of
    /// this thread.
    pub async fn connect(
        &self,
        target: &Target,
        limits: wire::Limits,
        dial: &LoopDial,
    ) -> Result<Upstream, Error> {
        let (mut io, host, path) = match self {
            Connector::Sprites(client) => {
                let stream = client
                    .proxy_via(&target.vm, "localhost", target.port, dial)
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
                let tcp = dial
                    .dial(host.trim_start_matches('[').trim_end_matches(']'), port)
                    .await
                    .map_err(|e| Error::Upstream(format!("connect {host}:{port}: {e}")))?;
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
