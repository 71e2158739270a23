"""Shared fixtures: a workspace in tmp_path, an in-process server, a client,
and a fake OpenAI-compatible model endpoint on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import socket
import sqlite3
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from websockets.asyncio.client import connect

SPRITE_DIR = Path(__file__).resolve().parents[1]
SRC_DIR = SPRITE_DIR / "src"
sys.path.insert(0, str(SRC_DIR))

import server as sprite_server  # noqa: E402
from settings import Settings  # noqa: E402

RECV_TIMEOUT_S = 10.0
ENV_VARS = ("SPRITE_LLM_URL", "SPRITE_LLM_API_KEY", "SPRITE_LLM_MODEL", "SPRITE_SECRETS_FILE",
            "SPRITE_PORT", "SPRITE_HOST", "SPRITE_MAX_MESSAGE_BYTES", "SPRITE_MAX_UPLOAD_BYTES")


@pytest.fixture
def workspace(tmp_path, monkeypatch) -> Path:
    ws = tmp_path / "workspace"
    ws.mkdir()
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SPRITE_WORKSPACE", str(ws))
    return ws


@pytest.fixture
async def start_server(workspace):
    """Factory: await start_server(**settings_overrides) -> RunningServer."""
    running = []

    async def start(dedup_window: int = 10_000, **overrides):
        settings = Settings(workspace=workspace, host="127.0.0.1", port=0, **overrides)
        srv = await sprite_server.start(settings, dedup_window=dedup_window)
        running.append(srv)
        return srv

    yield start
    for srv in running:
        if srv.server.is_serving():
            await srv.close()


@pytest.fixture
async def server(start_server):
    return await start_server()


class Client:
    def __init__(self, ws):
        self.ws = ws

    async def send(self, msg_type, payload=None, msg_id=None, **extra):
        frame = {"type": msg_type, "payload": payload, "timestamp": "2025-01-01T00:00:00Z"}
        if msg_id is not None:
            frame["id"] = msg_id
        frame.update(extra)
        await self.ws.send(json.dumps(frame))

    async def send_raw(self, data):
        await self.ws.send(data)

    async def recv(self) -> dict:
        raw = await asyncio.wait_for(self.ws.recv(), RECV_TIMEOUT_S)
        return json.loads(raw)

    async def recv_n(self, count: int) -> list[dict]:
        return [await self.recv() for _ in range(count)]

    async def until(self, predicate) -> tuple[dict, list[dict]]:
        """Receive until predicate(msg); returns (that msg, all messages seen)."""
        seen = []
        while True:
            msg = await self.recv()
            seen.append(msg)
            if predicate(msg):
                return msg, seen

    async def roundtrip(self) -> None:
        """Ping and wait for the pong: every earlier frame has been handled."""
        await self.send("ping", {"sync": True})
        await self.until(lambda m: m["type"] == "pong" and m["payload"]["echo"] == {"sync": True})


@pytest.fixture
async def connect_client():
    """Factory: await connect_client(server) -> Client (closed at teardown)."""
    sockets = []

    async def open_client(srv):
        ws = await connect(f"ws://127.0.0.1:{srv.port}", max_size=None)
        sockets.append(ws)
        return Client(ws)

    yield open_client
    for ws in sockets:
        await ws.close()


@pytest.fixture
async def client(server, connect_client):
    return await connect_client(server)


def db_rows(workspace: Path, sql: str, params=()) -> list[tuple]:
    conn = sqlite3.connect(workspace / "agent.db")
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class FakeModel:
    """An OpenAI-compatible chat completions endpoint that records requests."""

    def __init__(self):
        self.requests: list[dict] = []
        self.status = 200
        self.body: dict | str = {"choices": [{"message": {"role": "assistant", "content": "42"}}]}
        self.delay_s = 0.0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                fake.requests.append({
                    "path": self.path,
                    "headers": dict(self.headers),
                    "json": json.loads(self.rfile.read(length)),
                })
                if fake.delay_s:
                    threading.Event().wait(fake.delay_s)
                body = fake.body if isinstance(fake.body, str) else json.dumps(fake.body)
                data = body.encode()
                try:
                    self.send_response(fake.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass  # the client gave up (timeout tests)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1/chat/completions"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake_model():
    model = FakeModel()
    yield model
    model.close()


API_KEY = "sk-test-SECRET-0123456789"


@pytest.fixture
def model_env(fake_model, monkeypatch):
    """Configure the fake model through the environment."""
    monkeypatch.setenv("SPRITE_LLM_URL", fake_model.url)
    monkeypatch.setenv("SPRITE_LLM_API_KEY", API_KEY)
    monkeypatch.setenv("SPRITE_LLM_MODEL", "test-model")
    return fake_model
