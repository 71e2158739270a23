"""file_upload: inline base64 and binary frames, size limits, path traversal."""

import base64
import hashlib
import os
from pathlib import Path

import pytest

import uploads
from conftest import db_rows
from protocol import ProtocolError


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def documents(workspace: Path) -> list[str]:
    return sorted(p.name for p in (workspace / "documents").iterdir())


async def test_base64_upload_is_stored_with_a_row(workspace, client):
    data = b"%PDF-1.7\x00\x01binary\xff"
    await client.send("file_upload", {"filename": "Report 2024.pdf", "content_base64": b64(data)},
                      msg_id="u-1")
    ack, stored = await client.recv_n(2)
    assert ack["payload"] == {"id": "u-1", "status": "processed"}
    event = stored["payload"]
    assert stored["type"] == "agent_event" and event["event"] == "file_stored"
    assert event["size"] == len(data)
    path = Path(event["path"])
    assert path.parent == (workspace / "documents").resolve()
    assert path.name == f"{event['document_id']}_Report_2024.pdf"
    assert path.read_bytes() == data
    rows = db_rows(workspace, "SELECT id, filename, size, sha256, path FROM documents")
    assert rows == [(event["document_id"], "Report 2024.pdf", len(data),
                     hashlib.sha256(data).hexdigest(), str(path))]


async def test_binary_upload_follows_its_header(workspace, client):
    data = os.urandom(3000)
    await client.send("file_upload", {"filename": "photo.jpg", "size": len(data)}, msg_id="u-2")
    await client.send_raw(data)
    ack, stored = await client.recv_n(2)
    assert ack["payload"] == {"id": "u-2", "status": "processed"}
    assert Path(stored["payload"]["path"]).read_bytes() == data
    assert db_rows(workspace, "SELECT filename, size FROM documents") == [("photo.jpg", 3000)]


async def test_binary_size_must_match_header(workspace, client):
    await client.send("file_upload", {"filename": "a.bin", "size": 10}, msg_id="u-3")
    await client.send_raw(b"123")
    error, ack = await client.recv_n(2)
    assert error["payload"]["code"] == "invalid_payload"
    assert ack["payload"] == {"id": "u-3", "status": "rejected"}
    assert documents(workspace) == []


async def test_binary_frame_without_header_is_refused(client):
    await client.send_raw(b"stray bytes")
    error = await client.recv()
    assert error["payload"]["code"] == "unexpected_binary"
    await client.roundtrip()


async def test_text_frame_instead_of_binary_abandons_the_upload(workspace, client):
    await client.send("file_upload", {"filename": "a.bin", "size": 3}, msg_id="u-4")
    await client.send("ping", {}, msg_id="p-9")
    error, rejected, ack, pong = await client.recv_n(4)
    assert error["payload"]["code"] == "upload_incomplete"
    assert rejected["payload"] == {"id": "u-4", "status": "rejected"}
    assert ack["payload"] == {"id": "p-9", "status": "processed"}
    assert pong["type"] == "pong"
    assert documents(workspace) == []


@pytest.fixture
async def small_limit_client(start_server, connect_client):
    srv = await start_server(max_upload_bytes=100)
    return await connect_client(srv)


async def test_base64_upload_over_the_limit_is_refused(workspace, small_limit_client):
    client = small_limit_client
    await client.send("file_upload", {"filename": "big.bin", "content_base64": b64(b"x" * 101)},
                      msg_id="big")
    error, ack = await client.recv_n(2)
    assert error["payload"]["code"] == "upload_too_large"
    assert "limit of 100 bytes" in error["payload"]["message"]
    assert ack["payload"]["status"] == "rejected"
    # Exactly at the limit is fine.
    await client.send("file_upload", {"filename": "ok.bin", "content_base64": b64(b"x" * 100)})
    stored = await client.recv()
    assert stored["payload"]["size"] == 100
    assert db_rows(workspace, "SELECT filename FROM documents") == [("ok.bin",)]


async def test_binary_upload_over_the_limit_is_refused_at_the_header(workspace, small_limit_client):
    client = small_limit_client
    await client.send("file_upload", {"filename": "big.bin", "size": 101}, msg_id="big2")
    error, ack = await client.recv_n(2)
    assert error["payload"]["code"] == "upload_too_large"
    assert ack["payload"]["status"] == "rejected"
    await client.send_raw(b"x" * 101)  # the bytes that follow are not stored
    assert (await client.recv())["payload"]["code"] == "unexpected_binary"
    assert documents(workspace) == []


async def test_invalid_base64_is_refused(workspace, client):
    await client.send("file_upload", {"filename": "a.txt", "content_base64": "!!notbase64!!"})
    error = await client.recv()
    assert error["payload"]["code"] == "invalid_payload"
    assert documents(workspace) == []


TRAVERSAL_NAMES = [
    "../evil.txt",
    "../../etc/passwd",
    "/etc/passwd",
    "/tmp/evil",
    "..",
    "a/../../b",
    "evil\x00.txt",
    "..\\evil.txt",
    "dir\\file.txt",
    "C:\\Windows\\evil",
    "",
    ".",
    "x" * 256,
    "é" * 128,  # 256 bytes in UTF-8
]


@pytest.mark.parametrize("name", TRAVERSAL_NAMES)
@pytest.mark.parametrize("mode", ["base64", "binary"])
async def test_path_traversal_and_bad_names_are_refused(tmp_path, workspace, client, name, mode):
    if mode == "base64":
        await client.send("file_upload", {"filename": name, "content_base64": b64(b"pwn")},
                          msg_id="t")
    else:
        await client.send("file_upload", {"filename": name, "size": 3}, msg_id="t")
    error, ack = await client.recv_n(2)
    assert error["payload"]["code"] == "invalid_filename"
    assert ack["payload"] == {"id": "t", "status": "rejected"}
    assert documents(workspace) == []
    # Nothing was written anywhere under tmp_path outside the workspace either.
    written = [p for p in tmp_path.rglob("*") if p.is_file() and "workspace" not in p.parts]
    assert written == []
    assert db_rows(workspace, "SELECT COUNT(*) FROM documents") == [(0,)]


async def test_non_string_filename_is_refused(client):
    await client.send("file_upload", {"filename": ["a"], "content_base64": ""})
    assert (await client.recv())["payload"]["code"] == "invalid_filename"


def test_safe_name_whitelists_characters_and_fits_name_max():
    assert uploads.safe_name("Ré sumé (1).pdf") == "R__sum___1_.pdf"
    long = uploads.safe_name("a" * 255 + ".docx")
    assert long.endswith(".docx") and len(long) == 255 - 33


def test_target_path_stays_inside_documents(tmp_path):
    docs = tmp_path / "documents"
    docs.mkdir()
    path = uploads.target_path(docs, "abc", "x.txt")
    assert path.parent == docs.resolve()
    # Even if validation were bypassed, the rebuilt name has no separators.
    sneaky = uploads.target_path(docs, "abc", "../../etc/passwd")
    assert sneaky.parent == docs.resolve()


def test_store_never_follows_a_planted_symlink(tmp_path):
    docs = tmp_path / "documents"
    docs.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("original")
    (docs / ".doc1.part").symlink_to(victim)
    with pytest.raises(OSError):
        uploads.store(docs, "doc1", "a.txt", b"overwrite")
    assert victim.read_text() == "original"


def test_validate_filename_accepts_ordinary_names():
    for name in ("a.txt", "Invoice 2024-01.pdf", ".hidden", "naïve café.md"):
        assert uploads.validate_filename(name) == name
    with pytest.raises(ProtocolError):
        uploads.validate_filename("a..b")
