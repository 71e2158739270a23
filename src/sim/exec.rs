//! Exec: commands really run, inside the VM's namespaces, framed over a WebSocket; sessions
//! outlive their socket per `max_run_after_disconnect`.

use std::path::{Component, Path as FsPath};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::body::{Body, Bytes};
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequestParts, Path, RawQuery, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::{SinkExt, StreamExt};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

use super::app::{ApiError, Sim, lock};
use super::faults::Class;
use super::ns::{self, ChildSetup, WORKSPACE};
use super::state::{Cause, rfc3339};
use crate::sprites::frame::Frame;
use crate::sprites::{Session as SessionView, SessionList};

const READ_CHUNK: usize = 32 * 1024;
/// Non-TTY default of `max_run_after_disconnect` (documented).
const DEFAULT_MAX_RUN: Duration = Duration::from_secs(10);
/// How long to wait for the client's close after the exit frame.
/// How long a closing handshake may take; under a loaded machine a client
/// can take a while to answer, and the socket is dropped after it anyway.
const CLOSE_LINGER: Duration = Duration::from_secs(10);
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The exec query, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecParams {
    pub cmd: Vec<String>,
    pub program: String,
    pub env: Option<Vec<(String, String)>>,
    pub dir: String,
    pub stdin: bool,
    pub max_run: Duration,
    pub attach_id: Option<String>,
}

/// Go-style durations (`10s`, `1m30s`, `500ms`) or plain seconds.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s.parse().ok().map(Duration::from_secs);
    }
    humantime::parse_duration(s).ok()
}

pub fn parse_exec_query(query: &str) -> Result<ExecParams, String> {
    let mut cmd = Vec::new();
    let mut env: Option<Vec<(String, String)>> = None;
    let (mut path, mut dir, mut stdin, mut max_run, mut id) = (None, None, false, DEFAULT_MAX_RUN, None);
    for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
        match k.as_ref() {
            "cmd" => cmd.push(v.into_owned()),
            "path" => path = Some(v.into_owned()),
            "env" => {
                let (key, value) = v
                    .split_once('=')
                    .ok_or_else(|| format!("env {v:?} is not KEY=VALUE"))?;
                env.get_or_insert_with(Vec::new)
                    .push((key.to_string(), value.to_string()));
            }
            "dir" => dir = Some(v.into_owned()),
            "stdin" => stdin = v == "true",
            "tty" if v == "true" => return Err("TTY mode is not supported by the simulator".into()),
            "max_run_after_disconnect" => {
                max_run = parse_duration(&v).ok_or_else(|| format!("bad max_run_after_disconnect {v:?}"))?
            }
            "id" => id = Some(v.into_owned()),
            _ => {}
        }
    }
    if cmd.is_empty() && id.is_none() {
        return Err("cmd is required".into());
    }
    let program = path
        .filter(|p| !p.is_empty())
        .or_else(|| cmd.first().cloned())
        .unwrap_or_default();
    let dir = match dir.filter(|d| !d.is_empty()) {
        None => WORKSPACE.to_string(),
        Some(d) if d.starts_with('/') => d,
        Some(d) => format!("{WORKSPACE}/{d}"),
    };
    if FsPath::new(&dir).components().any(|c| c == Component::ParentDir) {
        return Err("dir must not contain ..".into());
    }
    Ok(ExecParams {
        cmd,
        program,
        env,
        dir,
        stdin,
        max_run,
        attach_id: id,
    })
}

/// The environment a command gets: `env` replaces the default, plus PATH and HOME if missing.
pub fn child_env(env: Option<&[(String, String)]>) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = env.map(<[_]>::to_vec).unwrap_or_default();
    for (k, v) in [("PATH", DEFAULT_PATH), ("HOME", WORKSPACE)] {
        if !out.iter().any(|(key, _)| key == k) {
            out.push((k.into(), v.into()));
        }
    }
    out
}

/// Exit code as one byte: signals as 128+N, like a shell.
fn exit_byte(status: std::process::ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => (c & 0xff) as u8,
        (None, Some(sig)) => (128 + sig).clamp(0, 255) as u8,
        _ => 255,
    }
}

#[derive(Debug)]
enum Out {
    Stdout(Bytes),
    Stderr(Bytes),
    Exit(u8),
}

/// A running command.
#[derive(Debug)]
pub struct Session {
    pub id: String,
    pub vm: String,
    pub command: String,
    pub workdir: String,
    pub created: SystemTime,
    /// 0 for an emulated command (benchmark VMs): no process to signal.
    pgid: i32,
    /// An emulated command's exit, set when it is killed.
    emulated_exit: Option<watch::Sender<Option<u8>>>,
    attached: Mutex<Option<mpsc::Sender<Out>>>,
    /// Unbounded: a bounded queue here could block the socket loop, which also drains the
    /// output that the child may be blocked on (a deadlock with `cat` and large input).
    stdin: Mutex<Option<mpsc::UnboundedSender<Bytes>>>,
    exit: watch::Receiver<Option<u8>>,
    /// Bumped at each attach, so a stale disconnect timer does not kill a re-attached session.
    attach_gen: AtomicU64,
}

impl Session {
    pub fn kill(&self, sig: Signal) {
        if self.exit.borrow().is_some() {
            return;
        }
        match &self.emulated_exit {
            Some(tx) => {
                let _ = tx.send(Some((128 + sig as i32).clamp(0, 255) as u8));
            }
            None => {
                let _ = killpg(Pid::from_raw(self.pgid), sig);
            }
        }
    }

    pub async fn wait_exit(&self, limit: Duration) {
        let mut rx = self.exit.clone();
        let _ = tokio::time::timeout(limit, rx.wait_for(Option::is_some)).await;
    }

    fn view(&self) -> SessionView {
        SessionView {
            id: self.id.clone(),
            command: self.command.clone(),
            workdir: self.workdir.clone(),
            created: Some(rfc3339(self.created)),
            bytes_per_second: 0.0,
            is_active: lock(&self.attached).is_some(),
            last_activity: Some(rfc3339(SystemTime::now())),
            tty: false,
        }
    }

    async fn forward(&self, out: Out) {
        let tx = lock(&self.attached).clone();
        if let Some(tx) = tx {
            let _ = tx.send(out).await;
        }
    }

    fn attach(&self) -> (mpsc::Receiver<Out>, u64) {
        let (tx, rx) = mpsc::channel(64);
        *lock(&self.attached) = Some(tx);
        (rx, self.attach_gen.fetch_add(1, Ordering::SeqCst) + 1)
    }

    fn detach(&self, generation: u64) {
        if self.attach_gen.load(Ordering::SeqCst) == generation {
            *lock(&self.attached) = None;
        }
    }
}

/// Starts the command in the VM; the session is registered and its output waits for a socket.
/// The starting socket is attached from the first byte on, so fast commands lose no output.
async fn spawn(
    sim: &Arc<Sim>,
    name: &str,
    p: &ExecParams,
) -> Result<(Arc<Session>, mpsc::Receiver<Out>, u64), std::io::Error> {
    if sim.settings.bench_vms {
        return spawn_emulated(sim, name, p);
    }
    let paths = sim.paths(name);
    let setup = ChildSetup::new(&paths.netns(), &paths.workspace(), &p.dir)?;
    let mut cmd = tokio::process::Command::new(&p.program);
    cmd.args(p.cmd.iter().skip(1))
        .env_clear()
        .envs(child_env(p.env.as_deref()))
        .stdin(if p.stdin { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(false);
    if let Some(arg0) = p.cmd.first() {
        cmd.arg0(arg0);
    }
    // SAFETY: `apply` makes only async-signal-safe syscalls and does not allocate.
    unsafe {
        cmd.pre_exec(move || setup.apply());
    }
    let mut child = cmd.spawn()?;
    let pid = child
        .id()
        .ok_or_else(|| std::io::Error::other("child exited at once"))? as i32;
    let (exit_tx, exit_rx) = watch::channel(None);
    let (stdin_tx, mut stdin_rx) = mpsc::unbounded_channel::<Bytes>();
    let (out_tx, out_rx) = mpsc::channel(64);
    let session = Arc::new(Session {
        id: pid.to_string(),
        vm: name.to_string(),
        command: p.cmd.join(" "),
        workdir: p.dir.clone(),
        created: SystemTime::now(),
        pgid: pid,
        emulated_exit: None,
        attached: Mutex::new(Some(out_tx)),
        stdin: Mutex::new(p.stdin.then_some(stdin_tx)),
        exit: exit_rx,
        attach_gen: AtomicU64::new(1),
    });
    lock(&sim.sessions).insert(session.id.clone(), session.clone());
    if let Some(mut child_in) = child.stdin.take() {
        tokio::spawn(async move {
            while let Some(data) = stdin_rx.recv().await {
                if child_in.write_all(&data).await.is_err() {
                    break;
                }
            }
            // Dropping the pipe is the child's EOF.
        });
    }
    let mut readers = Vec::new();
    if let Some(out) = child.stdout.take() {
        readers.push(pump(session.clone(), out, true));
    }
    if let Some(err) = child.stderr.take() {
        readers.push(pump(session.clone(), err, false));
    }
    let (sim2, s2) = (sim.clone(), session.clone());
    tokio::spawn(async move {
        for r in readers {
            let _ = r.await;
        }
        let code = match child.wait().await {
            Ok(status) => exit_byte(status),
            Err(_) => 255,
        };
        tracing::debug!(sprite = %s2.vm, session = %s2.id, code, "sim exec ended");
        let _ = exit_tx.send(Some(code));
        s2.forward(Out::Exit(code)).await;
        lock(&sim2.sessions).remove(&s2.id);
    });
    Ok((session, out_rx, 1))
}

/// A benchmark VM's command: answered by `emulate`, no process.
fn spawn_emulated(
    sim: &Arc<Sim>,
    name: &str,
    p: &ExecParams,
) -> Result<(Arc<Session>, mpsc::Receiver<Out>, u64), std::io::Error> {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let outcome = super::emulate::run(&p.cmd, &sim.paths(name).workspace())?;
    let (exit_tx, exit_rx) = watch::channel(outcome.exit);
    let (out_tx, out_rx) = mpsc::channel(64);
    let session = Arc::new(Session {
        id: format!("e{}", NEXT.fetch_add(1, Ordering::Relaxed)),
        vm: name.to_string(),
        command: p.cmd.join(" "),
        workdir: p.dir.clone(),
        created: SystemTime::now(),
        pgid: 0,
        emulated_exit: Some(exit_tx),
        attached: Mutex::new(Some(out_tx)),
        stdin: Mutex::new(None),
        exit: exit_rx.clone(),
        attach_gen: AtomicU64::new(1),
    });
    lock(&sim.sessions).insert(session.id.clone(), session.clone());
    let (sim2, s2) = (sim.clone(), session.clone());
    let stdout = outcome.stdout;
    tokio::spawn(async move {
        if !stdout.is_empty() {
            s2.forward(Out::Stdout(Bytes::from(stdout))).await;
        }
        let mut exit = exit_rx;
        let code = match exit.wait_for(Option::is_some).await {
            Ok(code) => code.unwrap_or(0),
            Err(_) => 255,
        };
        s2.forward(Out::Exit(code)).await;
        lock(&sim2.sessions).remove(&s2.id);
    });
    Ok((session, out_rx, 1))
}

fn pump<R>(session: Arc<Session>, mut reader: R, stdout: bool) -> tokio::task::JoinHandle<()>
where
    R: tokio::io::AsyncRead + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let mut buf = vec![0u8; READ_CHUNK];
        loop {
            match reader.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let data = Bytes::copy_from_slice(&buf[..n]);
                    session
                        .forward(if stdout {
                            Out::Stdout(data)
                        } else {
                            Out::Stderr(data)
                        })
                        .await;
                }
            }
        }
    })
}

fn is_upgrade(req: &Request) -> bool {
    req.headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

async fn upgrade_of(req: Request) -> Result<WebSocketUpgrade, Response> {
    let (mut parts, _) = req.into_parts();
    WebSocketUpgrade::from_request_parts(&mut parts, &())
        .await
        .map_err(IntoResponse::into_response)
}

/// `GET /v1/sprites/{name}/exec`: a WebSocket runs a command (or attaches with `?id=`); plain
/// GET or HEAD lists sessions.
pub async fn exec_root(
    State(sim): State<Arc<Sim>>,
    Path(name): Path<String>,
    RawQuery(query): RawQuery,
    req: Request,
) -> Result<Response, ApiError> {
    if !is_upgrade(&req) {
        sim.check_vm(&name)?;
        let sessions = sim.sessions_of(&name).iter().map(|s| s.view()).collect();
        return Ok(axum::Json(SessionList { sessions }).into_response());
    }
    let params = parse_exec_query(query.as_deref().unwrap_or("")).map_err(ApiError::bad_request)?;
    match params.attach_id.clone() {
        Some(id) => attach(sim, name, id, req).await,
        None => start(sim, name, params, req).await,
    }
}

/// `GET /v1/sprites/{name}/exec/{id}` (WebSocket): attach to a running session.
pub async fn exec_attach(
    State(sim): State<Arc<Sim>>,
    Path((name, id)): Path<(String, String)>,
    req: Request,
) -> Result<Response, ApiError> {
    if !is_upgrade(&req) {
        return Err(ApiError::bad_request("attach needs a WebSocket upgrade"));
    }
    attach(sim, name, id, req).await
}

async fn start(sim: Arc<Sim>, name: String, params: ExecParams, req: Request) -> Result<Response, ApiError> {
    sim.wake(&name, Cause::Exec).await?;
    if !sim.settings.bench_vms {
        let pin = sim.paths(&name).netns();
        ns::ensure_netns(&pin).map_err(|e| ApiError::internal(e.to_string()))?;
    }
    let ws = upgrade_of(req)
        .await
        .map_err(|_| ApiError::bad_request("bad WebSocket upgrade"))?;
    let drop_after = lock(&sim.faults).drop_after(Class::Exec);
    Ok(ws
        .max_message_size(64 << 20)
        .on_upgrade(move |socket| async move {
            let guard = sim.active_guard(&name);
            match spawn(&sim, &name, &params).await {
                Ok((session, out, generation)) => {
                    let attachment = (out, generation);
                    serve(
                        sim.clone(),
                        socket,
                        session,
                        attachment,
                        params.max_run,
                        drop_after,
                    )
                    .await
                }
                Err(e) => refuse(socket, &params, e).await,
            }
            drop(guard);
        }))
}

async fn attach(sim: Arc<Sim>, name: String, id: String, req: Request) -> Result<Response, ApiError> {
    sim.wake(&name, Cause::Exec).await?;
    let session = lock(&sim.sessions)
        .get(&id)
        .filter(|s| s.vm == name)
        .cloned()
        .ok_or_else(|| ApiError::not_found(format!("no session {id}")))?;
    let ws = upgrade_of(req)
        .await
        .map_err(|_| ApiError::bad_request("bad WebSocket upgrade"))?;
    let drop_after = lock(&sim.faults).drop_after(Class::Exec);
    Ok(ws.on_upgrade(move |socket| async move {
        let guard = sim.active_guard(&name);
        let attachment = session.attach();
        serve(
            sim.clone(),
            socket,
            session,
            attachment,
            DEFAULT_MAX_RUN,
            drop_after,
        )
        .await;
        drop(guard);
    }))
}

fn session_info(id: &str, command: &str) -> String {
    serde_json::json!({
        "type": "session_info",
        "session_id": id,
        "command": command,
        "created": SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        "cols": 0,
        "rows": 0,
        "is_owner": true,
        "tty": false,
    })
    .to_string()
}

/// A command that could not start reads like a shell's failure: a message and 127/126.
async fn refuse(socket: WebSocket, params: &ExecParams, e: std::io::Error) {
    let code = if e.kind() == std::io::ErrorKind::NotFound {
        127
    } else {
        126
    };
    let text = format!("exec {}: {e}\n", params.program);
    let frames = [
        Message::Text(session_info("0", &params.cmd.join(" ")).into()),
        Message::Binary(Frame::Stderr(Bytes::from(text)).encode()),
        Message::Binary(Frame::Exit(code).encode()),
    ];
    let (mut tx, rx) = socket.split();
    for f in frames {
        if tx.send(f).await.is_err() {
            return;
        }
    }
    close_gracefully(tx, rx).await;
}

/// Sends Close and finishes the closing handshake: dropping the socket with
/// the client's last frames (its stdin EOF) unread would reset the
/// connection, and the client could lose the exit frame it had not read yet.
async fn close_gracefully(
    mut tx: futures::stream::SplitSink<WebSocket, Message>,
    mut rx: futures::stream::SplitStream<WebSocket>,
) {
    let close = CloseFrame {
        code: 1000,
        reason: "".into(),
    };
    let _ = tx.send(Message::Close(Some(close))).await;
    let drain = async {
        while let Some(Ok(m)) = rx.next().await {
            if matches!(m, Message::Close(_)) {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(CLOSE_LINGER, drain).await;
}

/// Relays one socket to a session until the exit frame, a disconnect, or a fault drop.
async fn serve(
    sim: Arc<Sim>,
    socket: WebSocket,
    session: Arc<Session>,
    (mut out, generation): (mpsc::Receiver<Out>, u64),
    max_run: Duration,
    drop_after: Option<Duration>,
) {
    let (mut tx, mut rx) = socket.split();
    if tx
        .send(Message::Text(session_info(&session.id, &session.command).into()))
        .await
        .is_err()
    {
        session.detach(generation);
        return after_disconnect(session, generation, max_run);
    }
    if session.exit.borrow().is_some() {
        // Attached after the end: only the code is left to tell.
        let code = session.exit.borrow().unwrap_or(0);
        let _ = tx.send(Message::Binary(Frame::Exit(code).encode())).await;
        close_gracefully(tx, rx).await;
        return;
    }
    let drop_timer = async {
        match drop_after {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(drop_timer);
    let exited = loop {
        tokio::select! {
            msg = rx.next() => match msg {
                Some(Ok(Message::Binary(b))) => match Frame::decode(&b) {
                    Ok(Frame::Stdin(data)) => {
                        if let Some(s) = lock(&session.stdin).as_ref() {
                            let _ = s.send(data);
                        }
                    }
                    Ok(Frame::StdinEof) => drop(lock(&session.stdin).take()),
                    _ => {}
                },
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break false,
                Some(Ok(_)) => {}
            },
            item = out.recv() => {
                let (frame, done) = match item {
                    Some(Out::Stdout(d)) => (Frame::Stdout(d), false),
                    Some(Out::Stderr(d)) => (Frame::Stderr(d), false),
                    Some(Out::Exit(code)) => (Frame::Exit(code), true),
                    None => break false,
                };
                if tx.send(Message::Binary(frame.encode())).await.is_err() {
                    break false;
                }
                if done {
                    break true;
                }
            }
            _ = &mut drop_timer => {
                tracing::info!(sprite = %session.vm, session = %session.id, "fault: dropping exec socket");
                break false;
            }
            _ = sim.shutdown.cancelled() => break false,
        }
    };
    session.detach(generation);
    if exited {
        close_gracefully(tx, rx).await;
        return;
    }
    // The socket went away first: stdin ends, and the process lives on for max_run.
    drop(lock(&session.stdin).take());
    after_disconnect(session, generation, max_run);
}

fn after_disconnect(session: Arc<Session>, generation: u64, max_run: Duration) {
    if max_run.is_zero() {
        tracing::debug!(sprite = %session.vm, session = %session.id, "exec detached, keeps running");
        return;
    }
    tokio::spawn(async move {
        tokio::time::sleep(max_run).await;
        if session.attach_gen.load(Ordering::SeqCst) == generation && session.exit.borrow().is_none() {
            tracing::info!(sprite = %session.vm, session = %session.id, "killing exec after disconnect");
            session.kill(Signal::SIGKILL);
        }
    });
}

/// Signal names as the SDKs send them: `TERM` (Go) or `SIGTERM` (Python).
pub fn parse_signal(name: &str) -> Option<Signal> {
    let upper = name.trim().to_ascii_uppercase();
    let short = upper.strip_prefix("SIG").unwrap_or(&upper);
    Some(match short {
        "INT" => Signal::SIGINT,
        "TERM" => Signal::SIGTERM,
        "HUP" => Signal::SIGHUP,
        "KILL" => Signal::SIGKILL,
        "QUIT" => Signal::SIGQUIT,
        "USR1" => Signal::SIGUSR1,
        "USR2" => Signal::SIGUSR2,
        _ => return None,
    })
}

/// `POST /v1/sprites/{name}/exec/{id}/kill`: signal from `?signal=` (Go) or a JSON body
/// `{"signal": "SIGTERM"}` (Python); answers NDJSON.
pub async fn exec_kill(
    State(sim): State<Arc<Sim>>,
    Path((name, id)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Result<Response, ApiError> {
    sim.wake(&name, Cause::Exec).await?;
    let from_query = url::form_urlencoded::parse(query.as_deref().unwrap_or("").as_bytes())
        .find(|(k, _)| k == "signal")
        .map(|(_, v)| v.into_owned());
    let from_body = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("signal").and_then(|s| s.as_str()).map(str::to_string));
    let name_of_signal = from_query.or(from_body).unwrap_or_else(|| "TERM".into());
    let signal = parse_signal(&name_of_signal)
        .ok_or_else(|| ApiError::bad_request(format!("bad signal {name_of_signal:?}")))?;
    let session = lock(&sim.sessions).get(&id).filter(|s| s.vm == name).cloned();
    let Some(session) = session else {
        return Err(ApiError::new(
            StatusCode::GONE,
            "session_gone",
            format!("no running session {id}"),
        ));
    };
    session.kill(signal);
    let line = |kind: &str, data: &str| {
        serde_json::json!({ "type": kind, "data": data, "time": rfc3339(SystemTime::now()) }).to_string()
            + "\n"
    };
    let body = line("info", &format!("sent {signal} to session {id}")) + &line("complete", "signal sent");
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], Body::from(body)).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_query_parsing() {
        let p = parse_exec_query("cmd=sh&cmd=-c&cmd=echo+%24A&path=sh&env=A%3D1%3D2&dir=sub&stdin=true")
            .expect("valid");
        assert_eq!(p.cmd, vec!["sh", "-c", "echo $A"]);
        assert_eq!(p.program, "sh");
        assert_eq!(p.env, Some(vec![("A".to_string(), "1=2".to_string())]));
        assert_eq!(p.dir, "/workspace/sub");
        assert!(p.stdin);
        assert_eq!(p.max_run, DEFAULT_MAX_RUN);
        let p = parse_exec_query("cmd=true&max_run_after_disconnect=0").expect("valid");
        assert_eq!(
            (p.max_run, p.env, p.dir.as_str()),
            (Duration::ZERO, None, "/workspace")
        );
        assert!(parse_exec_query("").is_err());
        assert!(parse_exec_query("cmd=x&env=NOEQUALS").is_err());
        assert!(parse_exec_query("cmd=x&tty=true").is_err());
        assert!(parse_exec_query("cmd=x&dir=/workspace/../etc").is_err());
        assert!(parse_exec_query("cmd=x&max_run_after_disconnect=soon").is_err());
        assert_eq!(
            parse_exec_query("id=12").map(|p| p.attach_id),
            Ok(Some("12".into()))
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("0"), Some(Duration::ZERO));
        assert_eq!(parse_duration("0s"), Some(Duration::ZERO));
        assert_eq!(parse_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration(""), None);
    }

    #[test]
    fn env_defaults() {
        let env = child_env(None);
        assert!(
            env.iter().any(|(k, _)| k == "PATH") && env.iter().any(|(k, v)| k == "HOME" && v == WORKSPACE)
        );
        let env = child_env(Some(&[("PATH".into(), "/x".into())]));
        assert_eq!(env.iter().filter(|(k, _)| k == "PATH").count(), 1);
        assert!(env.contains(&("PATH".into(), "/x".into())));
    }

    #[test]
    fn signals() {
        assert_eq!(parse_signal("TERM"), Some(Signal::SIGTERM));
        assert_eq!(parse_signal("SIGKILL"), Some(Signal::SIGKILL));
        assert_eq!(parse_signal("sigint"), Some(Signal::SIGINT));
        assert_eq!(parse_signal("BOGUS"), None);
    }

    #[test]
    fn session_info_shape() {
        let v: serde_json::Value = serde_json::from_str(&session_info("42", "sh -c x")).expect("json");
        assert_eq!(v["type"], "session_info");
        assert_eq!(v["session_id"], "42");
        assert_eq!(v["tty"], false);
    }
}
