"""Acks and duplicate suppression: per session, across reconnects and restarts."""

from conftest import db_rows


def mission_count(workspace) -> int:
    return db_rows(workspace, "SELECT COUNT(*) FROM missions")[0][0]


async def hello(client, session):
    await client.send("hello", {"session": session})
    reply = await client.recv()
    assert reply["type"] == "hello" and reply["payload"]["session"] == session


async def send_mission(client, msg_id, text="do it") -> dict:
    await client.send("mission", {"text": text}, msg_id=msg_id)
    ack = await client.recv()
    assert ack["type"] == "ack" and ack["payload"]["id"] == msg_id
    return ack


async def test_duplicate_in_the_same_connection_is_acked_not_processed(workspace, client):
    first = await send_mission(client, "m-1")
    assert first["payload"]["status"] == "processed"
    await client.recv_n(2)  # mission_queued, mission_error (no model)
    second = await send_mission(client, "m-1")
    assert second["payload"]["status"] == "duplicate"
    await client.roundtrip()  # no mission events came before the pong
    assert mission_count(workspace) == 1


async def test_duplicate_after_reconnect_with_hello(workspace, server, connect_client):
    first = await connect_client(server)
    await hello(first, "sess-A")
    assert (await send_mission(first, "m-1"))["payload"]["status"] == "processed"
    await first.ws.close()

    second = await connect_client(server)
    await hello(second, "sess-A")
    assert (await send_mission(second, "m-1"))["payload"]["status"] == "duplicate"
    assert (await send_mission(second, "m-2"))["payload"]["status"] == "processed"
    assert mission_count(workspace) == 2
    assert db_rows(workspace, "SELECT session, id FROM processed_messages ORDER BY seq") == [
        ("sess-A", "m-1"), ("sess-A", "m-2")]


async def test_duplicate_after_server_restart(workspace, start_server, connect_client):
    srv = await start_server()
    client = await connect_client(srv)
    await hello(client, "sess-B")
    await send_mission(client, "m-1")
    await srv.close()

    srv2 = await start_server()  # fresh process state, same agent.db
    client2 = await connect_client(srv2)
    await hello(client2, "sess-B")
    assert (await send_mission(client2, "m-1"))["payload"]["status"] == "duplicate"
    assert mission_count(workspace) == 1


async def test_same_id_in_another_session_is_processed(workspace, server, connect_client):
    one = await connect_client(server)
    await hello(one, "sess-1")
    two = await connect_client(server)
    await hello(two, "sess-2")
    assert (await send_mission(one, "m-1"))["payload"]["status"] == "processed"
    assert (await send_mission(two, "m-1"))["payload"]["status"] == "processed"
    assert mission_count(workspace) == 2


async def test_without_hello_each_connection_is_its_own_session(workspace, server,
                                                                connect_client):
    one = await connect_client(server)
    assert (await send_mission(one, "m-1"))["payload"]["status"] == "processed"
    await one.ws.close()
    two = await connect_client(server)
    assert (await send_mission(two, "m-1"))["payload"]["status"] == "processed"
    assert mission_count(workspace) == 2
    # Connection-scoped sessions cannot be resumed, so they are not persisted.
    assert db_rows(workspace, "SELECT COUNT(*) FROM processed_messages") == [(0,)]


async def test_duplicate_upload_is_not_stored_twice(workspace, server, connect_client):
    client = await connect_client(server)
    await hello(client, "sess-U")
    for _ in range(2):
        await client.send("file_upload", {"filename": "a.txt", "size": 2}, msg_id="u-1")
        await client.send_raw(b"hi")
    acks = [m for m in await client.recv_n(3) if m["type"] == "ack"]
    assert [a["payload"]["status"] for a in acks] == ["processed", "duplicate"]
    assert len(list((workspace / "documents").iterdir())) == 1
    assert db_rows(workspace, "SELECT COUNT(*) FROM documents") == [(1,)]


async def test_message_without_id_is_processed_each_time_and_not_acked(workspace, client):
    await client.send("canvas_update", {"v": 1})
    await client.send("canvas_update", {"v": 1})
    await client.roundtrip()
    assert db_rows(workspace, "SELECT COUNT(*) FROM canvas") == [(2,)]


async def test_dedup_window_is_bounded(workspace, start_server, connect_client):
    srv = await start_server(dedup_window=3)
    client = await connect_client(srv)
    await hello(client, "sess-W")
    for n in range(5):
        await client.send("canvas_update", {"n": n}, msg_id=f"c-{n}")
        await client.recv()
    ids = db_rows(workspace, "SELECT id FROM processed_messages WHERE session = 'sess-W'"
                             " ORDER BY seq")
    assert ids == [("c-2",), ("c-3",), ("c-4",)]
    # The newest ids are still suppressed; the evicted oldest one is processed again.
    await client.send("canvas_update", {"n": 4}, msg_id="c-4")
    assert (await client.recv())["payload"]["status"] == "duplicate"
    await client.send("canvas_update", {"n": 0}, msg_id="c-0")
    assert (await client.recv())["payload"]["status"] == "processed"
    assert db_rows(workspace, "SELECT COUNT(*) FROM canvas") == [(6,)]
