//! Running commands over the exec WebSocket (non-TTY framing), and exec sessions.

use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http::Method;
use tokio_tungstenite::tungstenite::Message;

use super::client::{Body, Call, Idempotency, SpritesClient, WsStream, to_ws_url};
use super::error::Error;
use super::frame::Frame;
use super::redact::url_for_log;
use super::rest::decode;
use super::types::{ExecOutput, Session, SessionList};

/// Stdin is sent in chunks of this size.
const STDIN_CHUNK: usize = 32 * 1024;
/// How long `exec_detached` waits for the `session_info` message.
const SESSION_INFO_WAIT: Duration = Duration::from_secs(10);

/// A command to run in a sprite. Built with chained setters:
/// `ExecRequest::new(["sh", "-c", "echo hi"]).env("K", "V").dir("/workspace")`.
#[derive(Clone)]
pub struct ExecRequest {
    cmd: Vec<String>,
    env: Vec<(String, String)>,
    dir: Option<String>,
    stdin: Option<Bytes>,
    max_run_after_disconnect: Option<Duration>,
    timeout: Duration,
    output_limit: usize,
}

// Env values may be credentials: Debug shows only their names.
impl fmt::Debug for ExecRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExecRequest")
            .field("cmd", &self.cmd)
            .field(
                "env_keys",
                &self.env.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
            )
            .field("dir", &self.dir)
            .field("stdin_bytes", &self.stdin.as_ref().map(Bytes::len))
            .field("max_run_after_disconnect", &self.max_run_after_disconnect)
            .field("timeout", &self.timeout)
            .field("output_limit", &self.output_limit)
            .finish()
    }
}

impl ExecRequest {
    pub fn new<I, S>(cmd: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            cmd: cmd.into_iter().map(Into::into).collect(),
            env: Vec::new(),
            dir: None,
            stdin: None,
            max_run_after_disconnect: None,
            timeout: Duration::from_secs(600),
            output_limit: 16 * 1024 * 1024,
        }
    }

    /// Adds `KEY=VALUE`. Any `env` replaces the VM's default environment. The values travel in the
    /// URL query: never pass secrets this way (decision 6).
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    pub fn dir(mut self, dir: impl Into<String>) -> Self {
        self.dir = Some(dir.into());
        self
    }

    pub fn stdin(mut self, data: impl Into<Bytes>) -> Self {
        self.stdin = Some(data.into());
        self
    }

    /// How long the process may outlive the socket; zero keeps it running for good.
    pub fn max_run_after_disconnect(mut self, d: Duration) -> Self {
        self.max_run_after_disconnect = Some(d);
        self
    }

    /// Deadline for the whole command in `exec_collect`.
    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = d;
        self
    }

    /// Bytes of stdout and of stderr kept each; the rest is dropped and `truncated` set.
    pub fn output_limit(mut self, bytes: usize) -> Self {
        self.output_limit = bytes;
        self
    }

    /// The query string the exec endpoint takes, in the order sprites-py sends it.
    pub fn query(&self) -> Vec<(&'static str, String)> {
        let mut q: Vec<(&'static str, String)> = self.cmd.iter().map(|c| ("cmd", c.clone())).collect();
        if let Some(first) = self.cmd.first() {
            q.push(("path", first.clone()));
        }
        q.extend(self.env.iter().map(|(k, v)| ("env", format!("{k}={v}"))));
        if let Some(dir) = &self.dir {
            q.push(("dir", dir.clone()));
        }
        q.push(("stdin", self.stdin.is_some().to_string()));
        if let Some(d) = self.max_run_after_disconnect {
            q.push(("max_run_after_disconnect", go_duration(d)));
        }
        q
    }
}

/// A duration the way Go's `time.ParseDuration` reads it.
pub fn go_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 && d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// The URL of `/v1/sprites/{name}/exec` with the request's query.
pub(crate) fn exec_url(client: &SpritesClient, name: &str, req: &ExecRequest) -> url::Url {
    let mut url = to_ws_url(client.url(&["sprites", name, "exec"]));
    url.query_pairs_mut().extend_pairs(req.query());
    url
}

/// Appends up to the cap; says whether anything was dropped.
fn append_capped(buf: &mut Vec<u8>, data: &[u8], cap: usize) -> bool {
    let room = cap.saturating_sub(buf.len());
    buf.extend_from_slice(&data[..data.len().min(room)]);
    data.len() > room
}

/// What a server text message means to a non-TTY client.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum TextEvent {
    SessionInfo(String),
    Exit(i32),
    Other,
}

pub(crate) fn parse_text(text: &str) -> TextEvent {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(text) else {
        return TextEvent::Other;
    };
    match v.get("type").and_then(|t| t.as_str()) {
        Some("session_info") => match v.get("session_id") {
            Some(serde_json::Value::String(s)) => TextEvent::SessionInfo(s.clone()),
            Some(serde_json::Value::Number(n)) => TextEvent::SessionInfo(n.to_string()),
            _ => TextEvent::Other,
        },
        Some("exit") => TextEvent::Exit(v.get("exit_code").and_then(|c| c.as_i64()).unwrap_or(0) as i32),
        _ => TextEvent::Other,
    }
}

impl SpritesClient {
    /// Runs a command to its end and returns its exit code and output. A socket that closes before
    /// the exit frame is an [`Error::Stream`]; the command is not repeated (it may have run).
    pub async fn exec_collect(&self, name: &str, req: &ExecRequest) -> Result<ExecOutput, Error> {
        let url = exec_url(self, name, req);
        let log_url = url_for_log(&url);
        let ws = self.ws_connect(url).await?;
        let run = collect(ws, req, &log_url);
        match self.inner.timers.timeout(req.timeout, run).await {
            Ok(result) => result,
            Err(_) => Err(Error::Timeout {
                method: "GET",
                url: log_url,
                after: req.timeout,
            }),
        }
    }

    /// Starts a command and returns its session id without waiting for it. Unless the request says
    /// otherwise, `max_run_after_disconnect` is 0, so the process keeps running after we hang up.
    pub async fn exec_detached(&self, name: &str, req: &ExecRequest) -> Result<String, Error> {
        let mut req = req.clone();
        if req.max_run_after_disconnect.is_none() {
            req.max_run_after_disconnect = Some(Duration::ZERO);
        }
        let url = exec_url(self, name, &req);
        let log_url = url_for_log(&url);
        let mut ws = self.ws_connect(url).await?;
        let stream_err = |message: String| Error::Stream {
            url: log_url.clone(),
            message,
        };
        let wait = async {
            while let Some(msg) = ws.next().await {
                match msg.map_err(|e| stream_err(e.to_string()))? {
                    Message::Text(t) => {
                        if let TextEvent::SessionInfo(id) = parse_text(&t) {
                            return Ok(id);
                        }
                    }
                    Message::Binary(b) if matches!(Frame::decode(&b), Ok(Frame::Exit(_))) => {
                        return Err(stream_err("command ended before its session_info".into()));
                    }
                    _ => {}
                }
            }
            Err(stream_err("closed before session_info".into()))
        };
        let id = self
            .inner
            .timers
            .timeout(SESSION_INFO_WAIT, wait)
            .await
            .map_err(|_| Error::Timeout {
                method: "GET",
                url: log_url.clone(),
                after: SESSION_INFO_WAIT,
            })??;
        send_stdin(&mut ws, req.stdin.as_ref())
            .await
            .map_err(|e| stream_err(e.to_string()))?;
        let _ = ws.close(None).await;
        tracing::debug!(sprite = name, session = %id, "detached exec started");
        Ok(id)
    }

    /// `GET /v1/sprites/{name}/exec` (no upgrade): the sprite's exec sessions.
    pub async fn list_sessions(&self, name: &str) -> Result<Vec<Session>, Error> {
        let url = self.url(&["sprites", name, "exec"]);
        let body = self.get(url.clone()).await?;
        Ok(decode::<SessionList>(&url, &body)?.sessions)
    }

    /// `POST /v1/sprites/{name}/exec/{id}/kill?signal=TERM&timeout=0s`. A session that already
    /// ended (410) counts as killed. `signal` is a name without `SIG` (`TERM`, `KILL`, `INT`…).
    pub async fn kill_session(&self, name: &str, id: &str, signal: &str) -> Result<(), Error> {
        let mut url = self.url(&["sprites", name, "exec", id, "kill"]);
        url.query_pairs_mut()
            .append_pair("signal", signal)
            .append_pair("timeout", "0s");
        let result = self
            .call(Call {
                method: Method::POST,
                url,
                body: Body::Empty,
                timeout: self.inner.timeouts.request,
                idempotency: Idempotency::Idempotent,
                create_name: None,
            })
            .await;
        match result {
            Ok(_) | Err(Error::Api { status: 410, .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

async fn send_stdin(
    ws: &mut WsStream,
    stdin: Option<&Bytes>,
) -> Result<(), tokio_tungstenite::tungstenite::Error> {
    if let Some(data) = stdin {
        for chunk in data.chunks(STDIN_CHUNK) {
            ws.send(Message::Binary(
                Frame::Stdin(Bytes::copy_from_slice(chunk)).encode(),
            ))
            .await?;
        }
    }
    ws.send(Message::Binary(Frame::StdinEof.encode())).await
}

async fn collect(ws: WsStream, req: &ExecRequest, log_url: &str) -> Result<ExecOutput, Error> {
    let stream_err = |message: String| Error::Stream {
        url: log_url.to_string(),
        message,
    };
    let (mut sink, mut stream) = ws.split();
    // Stdin goes out while output comes in, so a command that echoes a large input cannot stall.
    let stdin = req.stdin.clone();
    let writer = async move {
        if let Some(data) = stdin {
            for chunk in data.chunks(STDIN_CHUNK) {
                let frame = Frame::Stdin(Bytes::copy_from_slice(chunk)).encode();
                sink.send(Message::Binary(frame)).await?;
            }
        }
        sink.send(Message::Binary(Frame::StdinEof.encode())).await?;
        Ok::<_, tokio_tungstenite::tungstenite::Error>(sink)
    };
    let reader = async {
        let mut out = ExecOutput::default();
        while let Some(msg) = stream.next().await {
            match msg.map_err(|e| stream_err(e.to_string()))? {
                Message::Binary(b) => match Frame::decode(&b) {
                    Ok(Frame::Stdout(d)) => {
                        out.truncated |= append_capped(&mut out.stdout, &d, req.output_limit)
                    }
                    Ok(Frame::Stderr(d)) => {
                        out.truncated |= append_capped(&mut out.stderr, &d, req.output_limit)
                    }
                    Ok(Frame::Exit(code)) => {
                        out.exit_code = i32::from(code);
                        return Ok(out);
                    }
                    Ok(_) => {}
                    Err(e) => return Err(stream_err(e.to_string())),
                },
                Message::Text(t) => {
                    if let TextEvent::Exit(code) = parse_text(&t) {
                        out.exit_code = code;
                        return Ok(out);
                    }
                }
                Message::Close(_) => break,
                _ => {}
            }
        }
        Err(stream_err("closed before the exit frame".into()))
    };
    let (written, read) = tokio::join!(writer, reader);
    let output = read?;
    if let Ok(mut sink) = written {
        // The exit frame is the end; the server tolerates an abrupt close after it.
        let _ = sink.close().await;
    }
    Ok(output)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_query_golden() {
        let req = ExecRequest::new(["sh", "-c", "echo $A"])
            .env("A", "1=2")
            .dir("/workspace/x")
            .max_run_after_disconnect(Duration::ZERO);
        let client = SpritesClient::new("http://127.0.0.1:7070", "t").expect("client");
        let url = exec_url(&client, "my-vm", &req);
        assert_eq!(
            url.as_str(),
            "ws://127.0.0.1:7070/v1/sprites/my-vm/exec?cmd=sh&cmd=-c&cmd=echo+%24A&path=sh&env=A%3D1%3D2\
             &dir=%2Fworkspace%2Fx&stdin=false&max_run_after_disconnect=0s"
        );
        let with_stdin = ExecRequest::new(["cat"]).stdin(Bytes::from_static(b"x"));
        assert_eq!(
            with_stdin.query(),
            vec![
                ("cmd", "cat".to_string()),
                ("path", "cat".to_string()),
                ("stdin", "true".to_string())
            ]
        );
    }

    #[test]
    fn go_durations() {
        assert_eq!(go_duration(Duration::ZERO), "0s");
        assert_eq!(go_duration(Duration::from_secs(10)), "10s");
        assert_eq!(go_duration(Duration::from_millis(1500)), "1500ms");
    }

    #[test]
    fn debug_hides_env_values() {
        let req = ExecRequest::new(["env"]).env("API_KEY", "sk-very-secret");
        let shown = format!("{req:?}");
        assert!(shown.contains("API_KEY") && !shown.contains("sk-very-secret"));
    }

    #[test]
    fn caps_output() {
        let mut buf = Vec::new();
        assert!(!append_capped(&mut buf, b"abc", 4));
        assert!(append_capped(&mut buf, b"de", 4));
        assert_eq!(buf, b"abcd");
    }

    #[test]
    fn text_messages() {
        assert_eq!(
            parse_text(r#"{"type":"session_info","session_id":"12"}"#),
            TextEvent::SessionInfo("12".into())
        );
        assert_eq!(
            parse_text(r#"{"type":"session_info","session_id":12}"#),
            TextEvent::SessionInfo("12".into())
        );
        assert_eq!(parse_text(r#"{"type":"exit","exit_code":3}"#), TextEvent::Exit(3));
        assert_eq!(parse_text("control:{}"), TextEvent::Other);
    }
}
