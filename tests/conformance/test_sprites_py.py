"""Conformance: the official sprites-py SDK, unchanged, against `sprite-operator sim`.

Run by the Rust integration test `sprites_conformance`, which starts a simulator and sets
SIM_URL and SIM_TOKEN. Only /workspace is served by the simulator's filesystem API.
"""

import os
import uuid

import pytest
from sprites import (
    AuthenticationError,
    FileNotFoundError_,
    NotFoundError,
    SpritesClient,
)
from sprites.exceptions import APIError

SIM_URL = os.environ.get("SIM_URL")
SIM_TOKEN = os.environ.get("SIM_TOKEN")

pytestmark = pytest.mark.skipif(not SIM_URL or not SIM_TOKEN, reason="SIM_URL/SIM_TOKEN not set")


@pytest.fixture(scope="module")
def client():
    os.environ.setdefault("SPRITES_CLIENT_SIGNALS", "0")
    with SpritesClient(SIM_TOKEN, base_url=SIM_URL, timeout=30.0) as c:
        yield c


@pytest.fixture(scope="module")
def sprite(client):
    name = f"conf-{uuid.uuid4().hex[:8]}"
    created = client.create_sprite(name)
    assert created.name == name
    yield client.sprite(name)
    client.delete_sprite(name)


def test_create_and_get(client, sprite):
    info = client.get_sprite(sprite.name)
    assert info.name == sprite.name
    assert info.status in ("cold", "warm", "running")


def test_exec_exit_codes_and_stderr(sprite):
    ok = sprite.run("sh", "-c", "echo out; echo err >&2", capture_output=True)
    assert ok.returncode == 0
    assert ok.stdout == b"out\n"
    assert ok.stderr == b"err\n"
    failed = sprite.run("sh", "-c", "exit 42", capture_output=True)
    assert failed.returncode == 42


def test_exec_env_and_cwd(sprite):
    fs = sprite.filesystem("/")
    (fs / "workspace/conf-dir/.keep").write_bytes(b"")
    res = sprite.run(
        "sh", "-c", 'echo "$GREETING"; pwd', capture_output=True, env={"GREETING": "hello sim"},
        cwd="/workspace/conf-dir",
    )
    assert res.returncode == 0
    assert res.stdout == b"hello sim\n/workspace/conf-dir\n"


def test_binary_file_round_trip(sprite):
    data = bytes(range(256)) * 1024 + os.urandom(4096)
    path = sprite.filesystem("/") / "workspace/conf/blob.bin"
    path.write_bytes(data)
    assert path.read_bytes() == data
    seen = sprite.run("sha256sum", "/workspace/conf/blob.bin", capture_output=True)
    assert seen.returncode == 0
    import hashlib

    assert seen.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()


def test_checkpoint_and_restore(sprite):
    path = sprite.filesystem("/") / "workspace/conf/state.txt"
    path.write_bytes(b"before")
    messages = list(sprite.create_checkpoint("conformance"))
    assert messages, "the checkpoint stream carries messages"
    assert not [m for m in messages if m.type == "error"]
    checkpoints = sprite.list_checkpoints()
    ours = [c for c in checkpoints if c.comment == "conformance"]
    assert ours, checkpoints
    path.write_bytes(b"after")
    restored = list(sprite.restore_checkpoint(ours[0].id))
    assert not [m for m in restored if m.type == "error"]
    assert path.read_bytes() == b"before"


def test_missing_file(sprite):
    with pytest.raises(FileNotFoundError_):
        (sprite.filesystem("/") / "workspace/does/not/exist").read_bytes()


def test_wrong_token():
    with SpritesClient("not-the-token", base_url=SIM_URL) as bad:
        with pytest.raises(AuthenticationError):
            bad.get_sprite("anything")
        with pytest.raises(AuthenticationError):
            bad.create_sprite("conf-unauthorized")


def test_unknown_sprite(client):
    with pytest.raises(NotFoundError):
        client.get_sprite("conf-no-such-sprite")
    with pytest.raises(APIError) as err:
        client.sprite("conf-no-such-sprite").run("true")
    assert err.value.status_code == 404
