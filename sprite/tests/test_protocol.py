"""Envelope handling, ping, malformed frames, hello, canvas and agent events."""

import json
from datetime import datetime

import pytest

from conftest import SPRITE_DIR, db_rows


def parse_rfc3339(text: str) -> datetime:
    assert text.endswith("Z"), text
    parsed = datetime.fromisoformat(text[:-1] + "+00:00")
    assert parsed.utcoffset().total_seconds() == 0
    return parsed


async def test_server_frames_use_the_envelope(client):
    await client.send("ping", {"n": 1})
    pong = await client.recv()
    assert set(pong) == {"type", "payload", "timestamp", "id"}
    assert pong["type"] == "pong"
    assert isinstance(pong["id"], str) and pong["id"]
    parse_rfc3339(pong["timestamp"])


async def test_ping_reports_deployed_version_and_echoes(workspace, client):
    (workspace / "VERSION").write_text("9.9.9-deployed\n")
    await client.send("ping", {"hello": ["world", 1]})
    pong = await client.recv()
    assert pong["payload"]["version"] == "9.9.9-deployed"
    assert pong["payload"]["echo"] == {"hello": ["world", 1]}
    parse_rfc3339(pong["payload"]["server_time"])


async def test_ping_version_falls_back_to_source_tree(workspace, client):
    assert not (workspace / "VERSION").exists()
    await client.send("ping")
    pong = await client.recv()
    expected = (SPRITE_DIR / "VERSION").read_text().strip()
    assert pong["payload"]["version"] == expected
    assert pong["payload"]["echo"] is None


async def test_ping_with_id_gets_ack_then_pong(client):
    await client.send("ping", {}, msg_id="p-1")
    ack, pong = await client.recv_n(2)
    assert ack["type"] == "ack"
    assert ack["payload"] == {"id": "p-1", "status": "processed"}
    assert pong["type"] == "pong"


@pytest.mark.parametrize(
    "frame, code",
    [
        ("this is not json", "invalid_json"),
        ("{\"type\": \"ping\"", "invalid_json"),
        ("[1, 2, 3]", "not_object"),
        ("\"ping\"", "not_object"),
        ("{\"payload\": {}}", "missing_type"),
        ("{\"type\": \"launch_rockets\"}", "unknown_type"),
        ("{\"type\": 7}", "unknown_type"),
        ("{\"type\": \"pong\"}", "unknown_type"),
        ("{\"type\": \"ping\", \"id\": 12}", "invalid_id"),
        ("{\"type\": \"ping\", \"id\": \"\"}", "invalid_id"),
        ("{\"type\": \"mission\", \"payload\": [\"x\"]}", "invalid_payload"),
    ],
)
async def test_malformed_frames_get_an_error_and_the_connection_stays_open(client, frame, code):
    await client.send_raw(frame)
    error = await client.recv()
    assert error["type"] == "error"
    assert error["payload"]["code"] == code
    assert error["payload"]["message"]
    await client.roundtrip()  # still usable


async def test_unknown_type_with_id_is_acked_as_rejected(client):
    await client.send("teleport", {}, msg_id="t-1")
    error, ack = await client.recv_n(2)
    assert error["payload"]["code"] == "unknown_type"
    assert error["payload"]["ref"] == "t-1"
    assert ack["payload"] == {"id": "t-1", "status": "rejected"}


async def test_oversized_frame_is_refused_and_connection_stays_open(client):
    big = json.dumps({"type": "canvas_update", "payload": {"blob": "x" * (1024 * 1024 + 10)},
                      "id": "big-1"})
    await client.send_raw(big)
    error, ack = await client.recv_n(2)
    assert error["payload"]["code"] == "too_large"
    assert "exceeds the limit of 1048576 bytes" in error["payload"]["message"]
    assert ack["payload"]["status"] == "rejected"
    await client.roundtrip()


async def test_oversized_non_json_frame_is_refused(start_server, connect_client):
    srv = await start_server(max_message_bytes=1000)
    client = await connect_client(srv)
    await client.send_raw("x" * 5000)
    error = await client.recv()
    assert error["payload"]["code"] == "too_large"
    await client.roundtrip()


async def test_canvas_update_is_stored_and_acked(workspace, client):
    await client.send("canvas_update", {"nodes": [{"id": "a"}], "title": "plan"}, msg_id="c-1")
    ack = await client.recv()
    assert ack["payload"] == {"id": "c-1", "status": "processed"}
    rows = db_rows(workspace, "SELECT payload FROM canvas")
    assert [json.loads(r[0]) for r in rows] == [{"nodes": [{"id": "a"}], "title": "plan"}]


async def test_canvas_update_needs_an_object(workspace, client):
    await client.send("canvas_update", "not an object", msg_id="c-2")
    error, ack = await client.recv_n(2)
    assert error["payload"]["code"] == "invalid_payload"
    assert ack["payload"]["status"] == "rejected"
    assert db_rows(workspace, "SELECT COUNT(*) FROM canvas") == [(0,)]


async def test_agent_event_and_client_error_are_acked(client):
    await client.send("agent_event", {"event": "viewed", "doc": "x"}, msg_id="e-1")
    await client.send("error", {"message": "client hiccup"}, msg_id="e-2")
    acks = await client.recv_n(2)
    assert [a["payload"] for a in acks] == [
        {"id": "e-1", "status": "processed"},
        {"id": "e-2", "status": "processed"},
    ]


async def test_hello_names_the_session(client):
    await client.send("hello", {"session": "user-42.tab_1"}, msg_id="h-1")
    ack, hello = await client.recv_n(2)
    assert ack["payload"] == {"id": "h-1", "status": "processed"}
    assert hello["type"] == "hello"
    assert hello["payload"]["session"] == "user-42.tab_1"


@pytest.mark.parametrize("session", ["", "a b", "../x", "x" * 129, 5, None])
async def test_hello_rejects_bad_session_ids(client, session):
    await client.send("hello", {"session": session})
    error = await client.recv()
    assert error["payload"]["code"] == "invalid_session"
    # A rejected hello does not use up the right to send a good one.
    await client.send("hello", {"session": "good"})
    assert (await client.recv())["type"] == "hello"


async def test_hello_must_come_first(client):
    await client.send("ping")
    await client.recv()
    await client.send("hello", {"session": "late"}, msg_id="h-2")
    error, ack = await client.recv_n(2)
    assert error["payload"]["code"] == "hello_not_first"
    assert ack["payload"]["status"] == "rejected"
