"""server.py as a real process: JSON logs, no secrets in them, clean SIGTERM."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

from websockets.asyncio.client import connect

from conftest import API_KEY, SRC_DIR, Client, db_rows, free_port


def start_process(workspace, port, **env_overrides):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPRITE_")}
    env.update(SPRITE_WORKSPACE=str(workspace), SPRITE_PORT=str(port), SPRITE_HOST="127.0.0.1",
               **env_overrides)
    return subprocess.Popen([sys.executable, str(SRC_DIR / "server.py")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


async def connect_when_ready(port, proc, timeout_s=15):
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return await connect(f"ws://127.0.0.1:{port}")
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


def stop(proc, sig=signal.SIGTERM):
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=15)
    return proc.returncode, out, err


async def test_server_process_logs_json_and_stops_cleanly(workspace, fake_model):
    port = free_port()
    proc = start_process(workspace, port, SPRITE_LLM_URL=fake_model.url,
                         SPRITE_LLM_API_KEY=API_KEY)
    try:
        ws = await connect_when_ready(port, proc)
        client = Client(ws)
        await client.send("mission", {"text": "hello"}, msg_id="m-1")
        result, _ = await client.until(lambda m: m["type"] == "agent_event"
                                       and m["payload"]["event"] == "mission_result")
        assert result["payload"]["text"] == "42"
    finally:
        # In a thread, so this loop keeps serving the client's side of the
        # close handshake that the shutting-down server starts.
        code, out, err = await asyncio.to_thread(stop, proc)

    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert lines, "no log lines"
    for line in lines:
        assert set(line) == {"ts", "level", "msg", "fields"}
    messages = [line["msg"] for line in lines]
    assert "listening" in messages and messages[-1] == "stopped"
    listening = next(line for line in lines if line["msg"] == "listening")
    assert listening["fields"]["port"] == port
    assert API_KEY not in out + err
    assert "hello" not in json.dumps([line["fields"] for line in lines])  # no mission text
    assert db_rows(workspace, "SELECT status FROM missions") == [("done",)]


async def test_sigint_also_stops_cleanly(workspace):
    port = free_port()
    proc = start_process(workspace, port)
    try:
        ws = await connect_when_ready(port, proc)
        await ws.close()
    finally:
        code, out, _ = await asyncio.to_thread(stop, proc, signal.SIGINT)
    assert code == 0
    assert json.loads(out.splitlines()[-1])["msg"] == "stopped"


def test_bad_configuration_exits_non_zero(workspace):
    proc = start_process(workspace, 1, SPRITE_MAX_UPLOAD_BYTES="lots")
    out, _ = proc.communicate(timeout=15)
    assert proc.returncode == 2
    error = json.loads(out.splitlines()[-1])
    assert error["level"] == "error"
    assert "SPRITE_MAX_UPLOAD_BYTES" in error["fields"]["error"]
