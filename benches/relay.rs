//! Relay benchmark on loopback: what the relay adds over a direct WebSocket
//! connection, next to what nginx (as a WebSocket proxy) adds.
//!
//! `cargo bench --bench relay` (needs `nginx` on PATH or in /usr/sbin; without
//! it the nginx column is skipped). The upstream is an echo WebSocket server
//! in this process; the relay is the built `sprite-operator` binary run as a
//! child with the development flags `--dev-static` (a User and a Sprite from
//! a file, no cluster) and `--dev-fixed-upstream` (every session goes to the
//! echo server, no Sprites.dev): authentication, routing and the session
//! loop are the production code paths. nginx runs in the foreground as a
//! child from a config written to a temp dir.
//!
//! A fourth path, `tokio pipe`, is this binary re-run as a child with
//! `--tcp-pipe`: a plain TCP byte pipe on a one-thread tokio runtime with
//! no time driver (`copy_bidirectional`), which does not look at frames at
//! all: the floor for a proxy built on tokio, which the relay was until
//! session 10 gave it an event loop of its own (`sprite_operator::
//! event_loop`). `--mio-pipe` is the same pipe on mio's `Poll` directly:
//! what an event loop written for the job costs, the floor of the relay's
//! own. `--tcp-pipe-2` (`pipe+thread`) is the tokio pipe with a second
//! thread that never runs, as the relay has its other runtimes' threads:
//! what merely being a process of two threads costs every socket call
//! (glibc's cancellation bookkeeping, which the relay's own socket calls
//! skip).
//!
//! Figures: round-trip latency of 64 B text messages (p50/p99, sequential;
//! measured twice, as the OS places the processes and then with all of them
//! on one CPU, where the latency target is judged: see `main`),
//! throughput of 16 KiB text frames (pipelined, one connection), and the
//! relay's resident memory per idle relayed session at 1 000 sessions
//! (VmRSS of the relay process before and after; each session has sent one
//! message, so its upstream connection is open too). Memory is measured a
//! second time with the upstream through the Sprites.dev proxy WebSocket of
//! an in-process simulator (`--sprites-api-url`), to an echo server that
//! this binary runs inside the simulated VM: the path a deployed relay
//! takes, with the proxy client's WebSocket per session.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use sprite_operator::sim;
use sprite_operator::sprites::{CreateSprite, ExecRequest, SpritesClient};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

const TOKEN: &str = "be0c4000111122223333444455556666";
const WARMUP_ROUNDS: usize = 500;
const FRAME: usize = 16 * 1024;
const THROUGHPUT_FRAMES: usize = 4096;

fn throughput_frames() -> usize {
    // RELAY_BENCH_FRAMES=1 leaves almost only the latency phase (for profiling).
    std::env::var("RELAY_BENCH_FRAMES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(THROUGHPUT_FRAMES)
}
const WINDOW: usize = 64;
const IDLE_SESSIONS: usize = 1000;

/// An echo WebSocket server: every text or binary message comes back.
async fn echo_server() -> SocketAddr {
    echo_server_on("127.0.0.1:0").await
}

async fn echo_server_on(listen: &str) -> SocketAddr {
    let listener = TcpListener::bind(listen).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let _ = tcp.set_nodelay(true);
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else {
                    return;
                };
                while let Some(Ok(m)) = ws.next().await {
                    if (m.is_text() || m.is_binary()) && ws.send(m).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process stopped with SIGTERM on drop: nginx's master then stops
/// its workers (SIGKILL would orphan them), the relay drains.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Nanoseconds on CPU of every thread of `/proc/{proc_dir}`
/// (`task/TID/schedstat`, first field).
fn threads_cpu_ns(proc_dir: &str) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{proc_dir}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .map(|t| {
            let stat = std::fs::read_to_string(t.path().join("schedstat")).unwrap_or_default();
            stat.split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        })
        .sum()
}

/// Nanoseconds on CPU of a process and its children, all threads.
fn tree_cpu_ns(pid: u32) -> u64 {
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    threads_cpu_ns(&pid.to_string())
        + children
            .split_whitespace()
            .filter_map(|c| c.parse::<u32>().ok())
            .map(tree_cpu_ns)
            .sum::<u64>()
}

/// Nanoseconds on CPU of this process alone (the client and the echo
/// server, with the kernel's work done in their context), all threads.
fn own_cpu_ns() -> u64 {
    threads_cpu_ns("self")
}

/// RSS of a process and its children (nginx: master and workers).
fn tree_rss_kib(pid: u32) -> u64 {
    let mut total = rss_kib(pid);
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    for c in children.split_whitespace().filter_map(|c| c.parse::<u32>().ok()) {
        total += tree_rss_kib(c);
    }
    total
}

/// Where the relay sends its sessions.
enum Upstream<'a> {
    /// `--dev-fixed-upstream`: straight to the echo server.
    Fixed(SocketAddr),
    /// Through the Sprites.dev proxy WebSocket of a simulator, to port 8765
    /// of the VM `SIM_VM`: the production code path.
    Sprites { api_url: &'a str, token_file: &'a Path },
}

fn start_relay(dir: &Path, upstream: Upstream) -> (Proc, SocketAddr) {
    // RELAY_BENCH_BIN: another build of the relay, to compare two builds
    // on the same machine state (the bench itself stays the same).
    let bin = std::env::var_os("RELAY_BENCH_BIN").unwrap_or(env!("CARGO_BIN_EXE_sprite-operator").into());
    start_relay_bin(&bin, dir, upstream)
}

fn start_relay_bin(bin: &std::ffi::OsStr, dir: &Path, upstream: Upstream) -> (Proc, SocketAddr) {
    let directory = format!(
        "apiVersion: sprite-operator.dev/v1alpha1\nkind: User\nmetadata: {{name: bench, namespace: bench}}\n\
         spec: {{email: bench@example.com, subject: bench, tier: free}}\nstatus: {{gatewayTokenSha256: \"{}\"}}\n---\n\
         apiVersion: sprite-operator.dev/v1alpha1\nkind: Sprite\nmetadata: {{name: bench-primary, namespace: bench}}\n\
         spec: {{userRef: {{name: bench}}}}\nstatus: {{ownedVm: {{name: {SIM_VM}, id: {SIM_VM}}}}}\n",
        sprite_operator::relay::gateway_token_sha256(TOKEN)
    );
    let file = dir.join("directory.yaml");
    std::fs::write(&file, directory).unwrap();
    let mut cmd = Command::new(bin);
    // RELAY_THREADS=n runs the relay with --threads n (default: its own, 1).
    if let Ok(n) = std::env::var("RELAY_THREADS") {
        cmd.args(["--threads", &n]);
    }
    cmd.args([
        "relay",
        "--listen",
        "127.0.0.1:0",
        "--max-connections-per-user",
        "5000",
    ])
    .arg("--dev-static")
    .arg(&file);
    match upstream {
        Upstream::Fixed(echo) => cmd.arg("--dev-fixed-upstream").arg(format!("ws://{echo}/")),
        Upstream::Sprites { api_url, token_file } => cmd
            .args(["--sprites-api-url", api_url])
            .arg("--sprites-token-file")
            .arg(token_file),
    };
    let mut child = cmd
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("run the relay");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("relay said {line:?}"))
        .parse()
        .unwrap();
    (Proc(child), addr)
}

/// The VM the Sprites path goes to: the default VM name (`<namespace>-<name>`)
/// of the Sprite in the relay's directory.
const SIM_VM: &str = "bench-bench-primary";
const SIM_TOKEN: &str = "relay-bench-sim-token";

/// A Sprites.dev simulator in this process with one VM, `SIM_VM`, whose
/// port 8765 is an echo server (this binary with `--echo-server`, started
/// by exec as the operator starts the runtime), and the token file for the
/// relay. Err, with the reason, where the simulator cannot run commands
/// (it needs network namespaces).
async fn sprites_path(dir: &Path) -> Result<(sim::SimHandle, PathBuf), String> {
    let data = dir.join("sim");
    std::fs::create_dir_all(&data).map_err(|e| e.to_string())?;
    let mut config = sim::SimConfig::new(&data, SIM_TOKEN);
    // The sessions keep the VM awake with pings; this only guards the gaps
    // between the phases.
    config.idle_timeout = Duration::from_secs(600);
    let handle = sim::start(config).await.map_err(|e| e.to_string())?;
    let client = SpritesClient::new(&handle.url(), SIM_TOKEN).map_err(|e| e.to_string())?;
    client
        .create_sprite(&CreateSprite {
            name: SIM_VM.into(),
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())?;
    let exe = std::env::current_exe().unwrap().display().to_string();
    let echo = ExecRequest::new([exe.as_str(), "--echo-server", "127.0.0.1:8765"])
        .max_run_after_disconnect(Duration::ZERO);
    client
        .exec_detached(SIM_VM, &echo)
        .await
        .map_err(|e| format!("start the echo server in the VM: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while let Err(e) = client.proxy(SIM_VM, "localhost", 8765).await {
        if Instant::now() > deadline {
            return Err(format!("the echo server in the VM is not reachable: {e}"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let token_file = dir.join("sprites-token");
    std::fs::write(&token_file, SIM_TOKEN).map_err(|e| e.to_string())?;
    Ok((handle, token_file))
}

/// The `tokio pipe` child: accepts on `listen`, pipes every connection to
/// `upstream` byte for byte.
fn run_tcp_pipe(listen: &str, upstream: &str, second_thread: bool) {
    // One thread and no time driver, which would cost every wake-up: the
    // best a tokio runtime does for this (the relay ran on one such until
    // it had an event loop of its own, `sprite_operator::event_loop`).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .unwrap();
    if second_thread {
        // `pipe+thread`: a thread that never runs, as the relay's background
        // runtime mostly does not. Its mere existence makes every socket
        // call of the process dearer (glibc wraps each in cancellation
        // bookkeeping once a process has a second thread), and this row
        // measures by how much.
        std::thread::spawn(|| {
            loop {
                std::thread::park();
            }
        });
    }
    rt.block_on(async {
        let listener = TcpListener::bind(listen).await.unwrap();
        loop {
            let (mut a, _) = listener.accept().await.unwrap();
            let upstream = upstream.to_string();
            tokio::spawn(async move {
                let _ = a.set_nodelay(true);
                let Ok(mut b) = TcpStream::connect(upstream).await else {
                    return;
                };
                let _ = b.set_nodelay(true);
                let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
            });
        }
    });
}

/// The `mio pipe` child: the tokio pipe's job written on mio's `Poll`
/// directly, one thread, no runtime. It is what an event loop written for
/// this one job costs in Rust, next to nginx's in C: the instruction count
/// (`benches/relay-instructions.sh`) puts it beside tokio's floor
/// (docs/relay.md).
mod mio_pipe {
    use std::io::{ErrorKind, Read, Write};
    use std::net::SocketAddr;

    use mio::net::{TcpListener, TcpStream};
    use mio::{Events, Interest, Poll, Token};

    const LISTENER: Token = Token(usize::MAX);

    /// One socket of a piped pair.
    struct Side {
        sock: TcpStream,
        /// Index of the other socket.
        peer: usize,
        /// Read from the peer, not yet taken by this socket: while any is
        /// left, the peer is not read (backpressure).
        pending: Vec<u8>,
    }

    pub fn run(listen: &str, upstream: &str) {
        let upstream: SocketAddr = upstream.parse().unwrap();
        let mut poll = Poll::new().unwrap();
        let mut listener = TcpListener::bind(listen.parse().unwrap()).unwrap();
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)
            .unwrap();
        let mut sides: Vec<Option<Side>> = Vec::new();
        let mut events = Events::with_capacity(256);
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            if let Err(e) = poll.poll(&mut events, None) {
                assert_eq!(e.kind(), ErrorKind::Interrupted, "poll: {e}");
                continue;
            }
            for ev in events.iter() {
                if ev.token() == LISTENER {
                    while let Ok((a, _)) = listener.accept() {
                        // A blocking connect on loopback: instant, and the
                        // pipe then starts with both ends connected.
                        let Ok(b) = std::net::TcpStream::connect(upstream) else {
                            continue;
                        };
                        b.set_nonblocking(true).unwrap();
                        let b = TcpStream::from_std(b);
                        let i = free_pair(&mut sides);
                        let j = i + 1;
                        for (k, sock, peer) in [(i, a, j), (j, b, i)] {
                            let _ = sock.set_nodelay(true);
                            let mut side = Side {
                                sock,
                                peer,
                                pending: Vec::new(),
                            };
                            poll.registry()
                                .register(&mut side.sock, Token(k), Interest::READABLE | Interest::WRITABLE)
                                .unwrap();
                            sides[k] = Some(side);
                        }
                    }
                    continue;
                }
                let i = ev.token().0;
                // A writable edge comes with every ACK: only one that
                // drained what was pending lets the peer be read again
                // (reading it otherwise is a wasted EAGAIN per message).
                let had_pending = sides[i].as_ref().is_some_and(|s| !s.pending.is_empty());
                if ev.is_writable() && had_pending && flush(&mut sides, i) {
                    // Room again: what the peer holds can come through.
                    let peer = sides[i].as_ref().map(|s| s.peer);
                    if let Some(p) = peer {
                        pump(&mut sides, p, &mut buf, &poll);
                    }
                }
                if ev.is_readable() {
                    pump(&mut sides, i, &mut buf, &poll);
                }
            }
        }
    }

    /// The first index of a free pair of slots: a pair's sockets sit at
    /// 2k and 2k + 1 and are freed together.
    fn free_pair(sides: &mut Vec<Option<Side>>) -> usize {
        match sides.chunks(2).position(|c| c.iter().all(Option::is_none)) {
            Some(k) => 2 * k,
            None => {
                sides.resize_with(sides.len() + 2, || None);
                sides.len() - 2
            }
        }
    }

    /// Writes what `i` has pending; true if nothing is left.
    fn flush(sides: &mut [Option<Side>], i: usize) -> bool {
        let Some(side) = sides[i].as_mut() else {
            return false;
        };
        while !side.pending.is_empty() {
            match side.sock.write(&side.pending) {
                Ok(n) => {
                    side.pending.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
                Err(_) => return false,
            }
        }
        true
    }

    /// Reads `i` until it is drained (edge-triggered) and writes each read
    /// to its peer; stops while the peer has bytes pending. A read shorter
    /// than the buffer drained the socket (as tokio assumes too): reading on
    /// to EAGAIN would cost a syscall per message that no other path makes.
    fn pump(sides: &mut [Option<Side>], i: usize, buf: &mut [u8], poll: &Poll) {
        loop {
            let Some(peer) = sides[i].as_ref().map(|s| s.peer) else {
                return;
            };
            if sides[peer].as_ref().is_none_or(|p| !p.pending.is_empty()) {
                return;
            }
            let n = match sides[i].as_mut().expect("present").sock.read(buf) {
                Ok(0) => return close(sides, i, poll),
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return close(sides, i, poll),
            };
            let p = sides[peer].as_mut().expect("present");
            match p.sock.write(&buf[..n]) {
                Ok(w) => p.pending.extend_from_slice(&buf[w..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => p.pending.extend_from_slice(&buf[..n]),
                Err(_) => return close(sides, i, poll),
            }
            if n < buf.len() {
                return;
            }
        }
    }

    fn close(sides: &mut [Option<Side>], i: usize, poll: &Poll) {
        let Some(mut side) = sides[i].take() else {
            return;
        };
        let _ = poll.registry().deregister(&mut side.sock);
        if let Some(mut peer) = sides[side.peer].take() {
            let _ = poll.registry().deregister(&mut peer.sock);
        }
    }
}

/// A pipe child: `--tcp-pipe` (tokio) or `--mio-pipe`.
fn start_pipe(kind: &str, echo: SocketAddr) -> (Proc, SocketAddr) {
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let child = Command::new(std::env::current_exe().unwrap())
        .args([kind, &addr.to_string(), &echo.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("run the pipe");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "the pipe did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    (Proc(child), addr)
}

fn nginx_binary() -> Option<String> {
    ["nginx", "/usr/sbin/nginx"]
        .into_iter()
        .find(|b| {
            Command::new(b)
                .arg("-v")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .map(String::from)
}

fn start_nginx(bin: &str, dir: &Path, echo: SocketAddr) -> (Proc, SocketAddr) {
    let port = free_port();
    let d = dir.display();
    for sub in ["tmp", "logs"] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
    }
    let conf = format!(
        "worker_processes auto;\nerror_log {d}/logs/error.log warn;\npid {d}/nginx.pid;\n\
         events {{ worker_connections 8192; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/tmp/body;\n  proxy_temp_path {d}/tmp/proxy;\n\
           fastcgi_temp_path {d}/tmp/fcgi;\n  uwsgi_temp_path {d}/tmp/uwsgi;\n  scgi_temp_path {d}/tmp/scgi;\n\
           server {{\n    listen 127.0.0.1:{port};\n    location / {{\n      proxy_pass http://{echo};\n\
               proxy_http_version 1.1;\n      proxy_set_header Upgrade $http_upgrade;\n\
               proxy_set_header Connection \"upgrade\";\n      proxy_read_timeout 1h;\n      proxy_buffering off;\n\
             }}\n  }}\n}}\n"
    );
    let conf_path = dir.join("nginx.conf");
    std::fs::write(&conf_path, conf).unwrap();
    let child = Command::new(bin)
        .arg("-p")
        .arg(dir)
        .arg("-e")
        .arg(dir.join("logs/error.log"))
        .arg("-c")
        .arg(&conf_path)
        .args(["-g", "daemon off;"])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("run nginx");
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(
            Instant::now() < deadline,
            "nginx did not start; see {d}/logs/error.log"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (Proc(child), addr)
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// Straight to the echo server, or through a proxy that does not look
    /// at the WebSocket (nginx, the tokio pipe): same URL.
    Plain,
    Relay,
}

async fn connect(mode: Mode, addr: SocketAddr) -> Ws {
    let url = match mode {
        Mode::Relay => format!("ws://{addr}/ws"),
        Mode::Plain => format!("ws://{addr}/"),
    };
    let mut req = url.into_client_request().unwrap();
    if mode == Mode::Relay {
        req.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            format!("{}, {TOKEN}", sprite_operator::relay::SUBPROTOCOL)
                .parse()
                .unwrap(),
        );
    }
    let (ws, _) = tokio_tungstenite::connect_async(req).await.expect("connect");
    if let MaybeTlsStream::Plain(tcp) = ws.get_ref() {
        let _ = tcp.set_nodelay(true);
    }
    ws
}

async fn round_trip(ws: &mut Ws, msg: &Message) {
    ws.send(msg.clone()).await.unwrap();
    loop {
        match ws.next().await.expect("open").expect("ok") {
            Message::Text(_) | Message::Binary(_) => return,
            _ => {}
        }
    }
}

/// 64 B text: an envelope without id, as a keepalive-sized message.
fn small_message() -> Message {
    let mut s = String::from(r#"{"type":"ping","payload":""#);
    while s.len() < 62 {
        s.push('x');
    }
    s.push_str("\"}");
    assert_eq!(s.len(), 64);
    Message::text(s)
}

fn big_message() -> Message {
    let head = r#"{"type":"canvas_update","payload":{"d":""#;
    let tail = "\"}}";
    let s = format!("{head}{}{tail}", "y".repeat(FRAME - head.len() - tail.len()));
    assert_eq!(s.len(), FRAME);
    Message::text(s)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// What one path's latency turns measured.
struct LatencyPath {
    /// The proxy's process, for its CPU time; None: direct.
    pid: Option<u32>,
    times: Vec<Duration>,
    /// The median of each turn, in the order of the rounds: paired by round
    /// with another path's (`paired_difference`).
    turn_p50s: Vec<Duration>,
    cpu_ns: u64,
    /// This process's CPU time (client and echo server) in the path's turns.
    bench_ns: u64,
}

/// One path's latency figures.
#[derive(Clone)]
struct Latency {
    p50: Duration,
    p99: Duration,
    cpu: Duration,
    bench_cpu: Duration,
    turn_p50s: Vec<Duration>,
}

/// p50 and p99 of the round trip, the proxy's CPU time per round trip
/// (user and system, all its threads and processes) and the bench's own
/// (the client's and the echo server's), for every path,
/// measured in turns: each path makes TURN round trips in a row on its own
/// connection, then the next path has its turn, until each has made
/// TURNS x TURN. Turns a few milliseconds long pair the paths in time: load
/// that comes and goes on a shared machine falls on all of them alike,
/// where whole trials in turn, seconds apart, let a burst land on one path
/// and not another. The order rotates each round, so that no path always
/// follows the same one (whose work would have left the caches in a given
/// state).
async fn latencies(targets: &[(Mode, SocketAddr, Option<u32>)]) -> Vec<Latency> {
    let msg = small_message();
    let mut paths = Vec::new();
    let mut sockets = Vec::new();
    for &(mode, addr, pid) in targets {
        let mut ws = connect(mode, addr).await;
        for _ in 0..WARMUP_ROUNDS {
            round_trip(&mut ws, &msg).await;
        }
        sockets.push(ws);
        paths.push(LatencyPath {
            pid,
            times: Vec::with_capacity(TURNS * TURN),
            turn_p50s: Vec::with_capacity(TURNS),
            cpu_ns: 0,
            bench_ns: 0,
        });
    }
    for round in 0..TURNS {
        for k in 0..paths.len() {
            let i = (round + k) % paths.len();
            let (p, ws) = (&mut paths[i], &mut sockets[i]);
            let cpu_before = p.pid.map_or(0, tree_cpu_ns);
            let bench_before = own_cpu_ns();
            for _ in 0..TURN {
                let t = Instant::now();
                round_trip(ws, &msg).await;
                p.times.push(t.elapsed());
            }
            let mut turn = p.times[p.times.len() - TURN..].to_vec();
            turn.sort();
            p.turn_p50s.push(percentile(&turn, 0.5));
            p.bench_ns += own_cpu_ns().saturating_sub(bench_before);
            p.cpu_ns += p.pid.map_or(0, tree_cpu_ns).saturating_sub(cpu_before);
        }
    }
    for mut ws in sockets {
        let _ = ws.close(None).await;
    }
    paths
        .into_iter()
        .map(|mut p| {
            p.times.sort();
            Latency {
                p50: percentile(&p.times, 0.50),
                p99: percentile(&p.times, 0.99),
                cpu: Duration::from_nanos(p.cpu_ns / p.times.len() as u64),
                bench_cpu: Duration::from_nanos(p.bench_ns / p.times.len() as u64),
                turn_p50s: p.turn_p50s,
            }
        })
        .collect()
}

/// MB/s of payload echoed back, at most WINDOW frames in flight.
async fn throughput(mode: Mode, addr: SocketAddr) -> f64 {
    let ws = connect(mode, addr).await;
    let (mut tx, mut rx) = ws.split();
    let msg = big_message();
    // Warm up the path (the relay connects its upstream on the first frame).
    tx.send(msg.clone()).await.unwrap();
    rx.next().await.unwrap().unwrap();
    let window = Arc::new(tokio::sync::Semaphore::new(WINDOW));
    let start = Instant::now();
    let w = window.clone();
    let writer = tokio::spawn(async move {
        for _ in 0..throughput_frames() {
            w.acquire().await.unwrap().forget();
            tx.send(msg.clone()).await.unwrap();
        }
        tx
    });
    let mut got = 0usize;
    while got < throughput_frames() {
        if let Message::Text(t) = rx.next().await.unwrap().unwrap() {
            assert_eq!(t.len(), FRAME);
            got += 1;
            window.add_permits(1);
        }
    }
    let elapsed = start.elapsed();
    let mut tx = writer.await.unwrap();
    let _ = tx.close().await;
    (throughput_frames() * FRAME) as f64 / elapsed.as_secs_f64() / 1e6
}

/// KiB of the proxy's RSS per idle session, over IDLE_SESSIONS sessions.
async fn memory_per_session(mode: Mode, addr: SocketAddr, pid: u32) -> (u64, u64, f64) {
    // One session first, so that lazily built state (pools, the allocator's
    // first arenas) is not charged to the idle sessions.
    let mut first = connect(mode, addr).await;
    round_trip(&mut first, &small_message()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = tree_rss_kib(pid);
    let mut sessions = Vec::with_capacity(IDLE_SESSIONS);
    for _ in 0..IDLE_SESSIONS {
        let mut ws = connect(mode, addr).await;
        round_trip(&mut ws, &small_message()).await;
        sessions.push(ws);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = tree_rss_kib(pid);
    let per = after.saturating_sub(before) as f64 / IDLE_SESSIONS as f64;
    for mut ws in sessions {
        let _ = ws.close(None).await;
    }
    (before, after, per)
}

/// `pid`, its threads and its children's, recursively (nginx: its master
/// and workers).
fn tree_tids(pid: u32) -> Vec<u32> {
    let mut tids: Vec<u32> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.flatten()
                .filter_map(|t| t.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    for c in children.split_whitespace().filter_map(|c| c.parse::<u32>().ok()) {
        tids.extend(tree_tids(c));
    }
    tids
}

/// The CPUs this process may run on.
fn own_cpus() -> libc::cpu_set_t {
    // SAFETY: a zeroed cpu_set_t is an empty set; the kernel fills it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a cpu_set_t of the size passed.
    let r = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    assert_eq!(r, 0, "sched_getaffinity: {}", std::io::Error::last_os_error());
    set
}

/// Puts every thread of this process and of the `pids`' trees on `set`.
/// Threads made later inherit their maker's.
fn place(pids: &[u32], set: &libc::cpu_set_t) {
    let mut tids = tree_tids(std::process::id());
    for &pid in pids {
        tids.extend(tree_tids(pid));
    }
    for tid in tids {
        // SAFETY: `set` is a valid cpu_set_t of the size passed. A thread
        // that ended meanwhile gives ESRCH, which is fine.
        unsafe { libc::sched_setaffinity(tid as libc::pid_t, std::mem::size_of::<libc::cpu_set_t>(), set) };
    }
}

/// The last CPU of `set`, alone.
fn last_cpu_of(set: &libc::cpu_set_t) -> (usize, libc::cpu_set_t) {
    let cpu = (0..libc::CPU_SETSIZE as usize)
        .rev()
        // SAFETY: a read of a bit of a valid set, in range.
        .find(|&c| unsafe { libc::CPU_ISSET(c, set) })
        .expect("this process runs on some CPU");
    // SAFETY: as in own_cpus.
    let mut one: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: a write of a bit of a valid set, in range.
    unsafe { libc::CPU_SET(cpu, &mut one) };
    (cpu, one)
}

/// The median over rounds of `a`'s turn median minus `b`'s in the same
/// round, in µs, and a 95% confidence interval for it (distribution-free:
/// the order statistics of the sign test, n/2 -+ 1.96 sqrt(n)/2). Two paths'
/// turns in one round are milliseconds apart, so the pairs share the
/// machine's state of the moment; the interval says how far apart the two
/// paths are beyond what the machine's swings between rounds explain.
fn paired_difference(a: &[Duration], b: &[Duration]) -> (f64, f64, f64) {
    let mut d: Vec<f64> = a.iter().zip(b).map(|(x, y)| us(*x) - us(*y)).collect();
    d.sort_by(|x, y| x.total_cmp(y));
    let n = d.len() as f64;
    let half = 1.96 * n.sqrt() / 2.0;
    let lo = ((n / 2.0 - half).floor().max(0.0)) as usize;
    let hi = ((n / 2.0 + half).ceil() as usize).min(d.len() - 1);
    (d[d.len() / 2], d[lo], d[hi])
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Throughput trials, run in turns (direct, pipes, nginx, relay, direct,
/// ...) for the same reason as the latency turns; each path's figure is the
/// median over its trials.
const TRIALS: usize = 9;
/// Latency: rounds of turns, and round trips per turn (`latencies`).
const TURNS: usize = 270;
const TURN: usize = 100;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Every path's figures as placed by the OS, its latency on one CPU, and
/// that CPU.
type Figures = (Vec<(&'static str, Medians)>, Vec<(&'static str, Latency)>, usize);

#[derive(Clone)]
struct Medians {
    p50: f64,
    p99: f64,
    /// The proxy's CPU time per round trip (two relayed messages).
    cpu: f64,
    /// The bench's own (client and echo server) per round trip.
    bench_cpu: f64,
    mbps: f64,
    turn_p50s: Vec<Duration>,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--tcp-pipe" || a == "--tcp-pipe-2") {
        run_tcp_pipe(&args[i + 1], &args[i + 2], args[i] == "--tcp-pipe-2");
        return;
    }
    if let Some(i) = args.iter().position(|a| a == "--mio-pipe") {
        mio_pipe::run(&args[i + 1], &args[i + 2]);
        return;
    }
    if let Some(i) = args.iter().position(|a| a == "--echo-server") {
        // Inside a simulated VM (see `sprites_path`): serve until killed.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            echo_server_on(&args[i + 1]).await;
            std::future::pending::<()>().await
        });
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let echo = echo_server().await;
        let tmp = tempfile::tempdir().unwrap();
        let nginx_bin = nginx_binary();
        if nginx_bin.is_none() {
            eprintln!("nginx not found: its column is skipped (apt-get install nginx)");
        }
        let nginx_dir = tmp.path().join("nginx");
        std::fs::create_dir_all(&nginx_dir).unwrap();

        // RELAY_BENCH_COMPARE=path: a second relay build in the same
        // turns and trials (latency and throughput only), for A/B
        // comparisons finer than the noise between two runs.
        let compare = std::env::var_os("RELAY_BENCH_COMPARE");
        // The latency phase twice: as the OS places the processes, then
        // with every one of them (this one too) on one CPU, the last this
        // process may use (docs/relay.md, session 11: on this 2-CPU VM the
        // first moves by tens of µs between runs with the wake-ups across
        // CPUs; on one CPU the proxies' own work decides the figure).
        let (figures, one_cpu, cpu): Figures = {
            let ng = nginx_bin.as_ref().map(|b| start_nginx(b, &nginx_dir, echo));
            let (pipe_proc, pipe_addr) = start_pipe("--tcp-pipe", echo);
            let (pipe2_proc, pipe2_addr) = start_pipe("--tcp-pipe-2", echo);
            let (mio_proc, mio_addr) = start_pipe("--mio-pipe", echo);
            let (relay_proc, relay_addr) = start_relay(tmp.path(), Upstream::Fixed(echo));
            let other = compare
                .as_ref()
                .map(|bin| start_relay_bin(bin, tmp.path(), Upstream::Fixed(echo)));
            let mut paths = vec![
                ("direct", Mode::Plain, echo, None),
                ("tokio pipe", Mode::Plain, pipe_addr, Some(pipe_proc.0.id())),
                ("pipe+thread", Mode::Plain, pipe2_addr, Some(pipe2_proc.0.id())),
                ("mio pipe", Mode::Plain, mio_addr, Some(mio_proc.0.id())),
            ];
            if let Some((p, addr)) = &ng {
                paths.push(("nginx", Mode::Plain, *addr, Some(p.0.id())));
            }
            paths.push(("relay", Mode::Relay, relay_addr, Some(relay_proc.0.id())));
            if let Some((p, addr)) = &other {
                paths.push(("relay B", Mode::Relay, *addr, Some(p.0.id())));
            }
            let targets: Vec<_> = paths.iter().map(|&(_, mode, addr, pid)| (mode, addr, pid)).collect();
            let latency = latencies(&targets).await;
            let all_cpus = own_cpus();
            let (cpu, one) = last_cpu_of(&all_cpus);
            let pids: Vec<u32> = targets.iter().filter_map(|t| t.2).collect();
            place(&pids, &one);
            let pinned = latencies(&targets).await;
            place(&pids, &all_cpus);
            let mut mbps = vec![Vec::new(); paths.len()];
            for _ in 0..TRIALS {
                for (i, &(_, mode, addr, _)) in paths.iter().enumerate() {
                    mbps[i].push(throughput(mode, addr).await);
                }
            }
            let figures = paths
                .iter()
                .zip(latency)
                .zip(mbps)
                .map(|((&(name, ..), l), mbps)| {
                    (
                        name,
                        Medians {
                            p50: us(l.p50),
                            p99: us(l.p99),
                            cpu: us(l.cpu),
                            bench_cpu: us(l.bench_cpu),
                            mbps: median(mbps),
                            turn_p50s: l.turn_p50s,
                        },
                    )
                })
                .collect();
            let one_cpu = paths.iter().map(|p| p.0).zip(pinned).collect();
            (figures, one_cpu, cpu)
        };
        let fig = |name: &str| figures.iter().find(|f| f.0 == name).map(|f| f.1.clone());
        let pinned = |name: &str| one_cpu.iter().find(|f| f.0 == name).map(|f| f.1.clone());
        // Memory on fresh processes, one at a time.
        let nginx_mem = match &nginx_bin {
            Some(b) => {
                let (p, addr) = start_nginx(b, &nginx_dir, echo);
                Some(memory_per_session(Mode::Plain, addr, p.0.id()).await)
            }
            None => None,
        };
        let relay_mem = {
            let (p, addr) = start_relay(tmp.path(), Upstream::Fixed(echo));
            memory_per_session(Mode::Relay, addr, p.0.id()).await
        };
        // The same, with each session's upstream through the Sprites.dev
        // proxy WebSocket (the simulator's): what a deployed relay holds.
        let sprites_mem = match sprites_path(tmp.path()).await {
            Ok((sim, token_file)) => {
                let api_url = sim.url();
                let (p, addr) = start_relay(
                    tmp.path(),
                    Upstream::Sprites {
                        api_url: &api_url,
                        token_file: &token_file,
                    },
                );
                let mem = memory_per_session(Mode::Relay, addr, p.0.id()).await;
                drop(p);
                let _ = sim.shutdown().await;
                Some(mem)
            }
            Err(why) => {
                eprintln!("the Sprites proxy path is skipped: {why}");
                None
            }
        };

        println!();
        println!(
            "relay bench (loopback; latency: {} round trips of 64 B per path, in turns of {TURN}; throughput: median \
             of {TRIALS} trials, in turns, of {} x 16 KiB text frames with {WINDOW} in flight; memory at \
             {IDLE_SESSIONS} idle sessions)",
            TURNS * TURN,
            throughput_frames()
        );
        println!(
            "{:<11} {:>9} {:>9} {:>11} {:>11} {:>14} {:>12} {:>10} {:>16}",
            "path", "p50 us", "p99 us", "+p50 us", "+p99 us", "CPU us/round", "bench CPU", "MB/s", "KiB/idle session"
        );
        let d = fig("direct").expect("measured");
        println!(
            "{:<11} {:>9.1} {:>9.1} {:>11} {:>11} {:>14} {:>12.1} {:>10.0} {:>16}",
            "direct", d.p50, d.p99, "-", "-", "-", d.bench_cpu, d.mbps, "-"
        );
        let row = |name: &str, f: &Medians, mem: Option<(u64, u64, f64)>| {
            println!(
                "{:<11} {:>9.1} {:>9.1} {:>11.1} {:>11.1} {:>14.1} {:>12.1} {:>10.0} {:>16}",
                name,
                f.p50,
                f.p99,
                f.p50 - d.p50,
                f.p99 - d.p99,
                f.cpu,
                f.bench_cpu,
                f.mbps,
                mem.map_or("-".to_string(), |m| format!("{:.1}", m.2))
            );
        };
        let pf = fig("tokio pipe").expect("measured");
        row("tokio pipe", &pf, None);
        row("pipe+thread", &fig("pipe+thread").expect("measured"), None);
        row("mio pipe", &fig("mio pipe").expect("measured"), None);
        let n = fig("nginx").zip(nginx_mem);
        if let Some((f, m)) = &n {
            row("nginx", f, Some(*m));
        }
        let r = fig("relay").expect("measured");
        row("relay", &r, Some(relay_mem));
        if let (Some(bin), Some(b)) = (&compare, fig("relay B")) {
            row("relay B", &b, None);
            eprintln!("relay B: {}", bin.to_string_lossy());
            let (m, lo, hi) = paired_difference(&b.turn_p50s, &r.turn_p50s);
            eprintln!("relay B - relay per round: median {m:+.1} us, 95% CI [{lo:+.1}, {hi:+.1}]");
        }
        println!();
        println!("latency again, every process on CPU {cpu} (this one, its children and their threads):");
        println!(
            "{:<11} {:>9} {:>9} {:>11} {:>11} {:>14} {:>12}",
            "path", "p50 us", "p99 us", "+p50 us", "+p99 us", "CPU us/round", "bench CPU"
        );
        let pd = pinned("direct").expect("measured");
        for (name, l) in &one_cpu {
            let added = |x: Duration, y: Duration| {
                if *name == "direct" { "-".to_string() } else { format!("{:.1}", us(x) - us(y)) }
            };
            println!(
                "{:<11} {:>9.1} {:>9.1} {:>11} {:>11} {:>14} {:>12.1}",
                name,
                us(l.p50),
                us(l.p99),
                added(l.p50, pd.p50),
                added(l.p99, pd.p99),
                if *name == "direct" { "-".to_string() } else { format!("{:.1}", us(l.cpu)) },
                us(l.bench_cpu)
            );
        }
        if let (Some(b), Some(r)) = (pinned("relay B"), pinned("relay")) {
            let (m, lo, hi) = paired_difference(&b.turn_p50s, &r.turn_p50s);
            eprintln!("relay B - relay per round there: median {m:+.1} us, 95% CI [{lo:+.1}, {hi:+.1}]");
        }
        if let Some((_, m)) = n {
            eprintln!("nginx RSS (master + workers): {} KiB -> {} KiB", m.0, m.1);
        }
        eprintln!("relay RSS: {} KiB -> {} KiB", relay_mem.0, relay_mem.1);
        if let Some(m) = sprites_mem {
            eprintln!("relay via the Sprites proxy RSS: {} KiB -> {} KiB", m.0, m.1);
        }

        println!();
        println!(
            "relay above the tokio pipe: {:+.1} us p50, {:+.1} us CPU per round trip",
            r.p50 - pf.p50,
            r.cpu - pf.cpu
        );
        if let Some((nf, _)) = &n {
            // Judged where the figure is the proxies' own (above); as the
            // OS places them, printed with how far apart the two paths are
            // beyond the machine's swings between rounds.
            let (rp, np) = (pinned("relay").expect("measured"), pinned("nginx").expect("measured"));
            let (added, n_added) = (us(rp.p50) - us(pd.p50), us(np.p50) - us(pd.p50));
            println!(
                "target: relay added p50 <= nginx's, every process on CPU {cpu} ({added:.1} vs {n_added:.1} us): {}",
                if added <= n_added { "met" } else { "NOT met" }
            );
            let (m, lo, hi) = paired_difference(&rp.turn_p50s, &np.turn_p50s);
            println!("  relay - nginx per round there: median {m:+.1} us, 95% CI [{lo:+.1}, {hi:+.1}]");
            let (m, lo, hi) = paired_difference(&r.turn_p50s, &nf.turn_p50s);
            println!(
                "  as the OS places them: relay added p50 {:.1} vs nginx's {:.1} us; relay - nginx per round: \
                 median {m:+.1} us, 95% CI [{lo:+.1}, {hi:+.1}]",
                r.p50 - d.p50,
                nf.p50 - d.p50
            );
            println!(
                "target: relay throughput >= 0.9 x nginx's ({:.0} vs {:.0} MB/s): {}",
                r.mbps,
                0.9 * nf.mbps,
                if r.mbps >= 0.9 * nf.mbps { "met" } else { "NOT met" }
            );
        }
        println!(
            "target: <= 32 KiB per idle session ({:.1} KiB): {}",
            relay_mem.2,
            if relay_mem.2 <= 32.0 { "met" } else { "NOT met" }
        );
        if let Some(m) = sprites_mem {
            println!(
                "target: <= 32 KiB per idle session through the Sprites proxy ({:.1} KiB): {}",
                m.2,
                if m.2 <= 32.0 { "met" } else { "NOT met" }
            );
        }
    });
}
