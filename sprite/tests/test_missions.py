"""mission messages with and without a configured model."""

import asyncio
import os

import pytest

import llm
from conftest import API_KEY, db_rows

NO_MODEL = "no model is configured: set SPRITE_LLM_URL and SPRITE_LLM_API_KEY"


def is_mission_outcome(msg):
    return msg["type"] == "agent_event" and msg["payload"]["event"] in (
        "mission_result", "mission_error")


async def test_mission_without_model_is_queued_and_reports_mission_error(workspace, client):
    await client.send("mission", {"text": "Summarise my invoices", "priority": "high"},
                      msg_id="m-1")
    ack, queued, error = await client.recv_n(3)
    assert ack["payload"] == {"id": "m-1", "status": "processed"}
    assert queued["payload"]["event"] == "mission_queued"
    mission_id = queued["payload"]["mission_id"]
    assert error["payload"] == {"event": "mission_error", "mission_id": mission_id,
                                "error": NO_MODEL}
    rows = db_rows(workspace, "SELECT id, text, status, result FROM missions")
    assert rows == [(mission_id, "Summarise my invoices", "queued", None)]


@pytest.mark.parametrize("payload", [{}, {"text": ""}, {"text": "   "}, {"text": 3}])
async def test_mission_needs_text(workspace, client, payload):
    await client.send("mission", payload, msg_id="m-bad")
    error, ack = await client.recv_n(2)
    assert error["payload"]["code"] == "invalid_payload"
    assert ack["payload"]["status"] == "rejected"
    assert db_rows(workspace, "SELECT COUNT(*) FROM missions") == [(0,)]


async def test_mission_with_model_returns_the_model_answer(workspace, model_env, client):
    (workspace / "memory").mkdir(exist_ok=True)
    (workspace / "memory" / "soul.md").write_text("I am terse.")
    model_env.body = {"choices": [{"message": {"content": "The answer is 42."}}]}
    await client.send("mission", {"text": "What is the answer?"}, msg_id="m-2")
    result, seen = await client.until(is_mission_outcome)
    assert [m["type"] for m in seen[:2]] == ["ack", "agent_event"]
    assert result["payload"]["event"] == "mission_result"
    assert result["payload"]["text"] == "The answer is 42."
    mission_id = result["payload"]["mission_id"]
    assert db_rows(workspace, "SELECT id, status, result FROM missions") == [
        (mission_id, "done", "The answer is 42.")]

    (request,) = model_env.requests
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["Authorization"] == f"Bearer {API_KEY}"
    assert request["json"]["model"] == "test-model"
    system, user = request["json"]["messages"]
    assert system["role"] == "system" and "I am terse." in system["content"]
    assert user == {"role": "user", "content": "What is the answer?"}


async def test_model_failure_marks_mission_failed_without_leaking_the_key(
        workspace, model_env, client):
    model_env.status = 401
    model_env.body = f'{{"error": "invalid key {API_KEY}"}}'
    await client.send("mission", {"text": "hi"})
    result, _ = await client.until(is_mission_outcome)
    assert result["payload"]["event"] == "mission_error"
    assert "HTTP 401" in result["payload"]["error"]
    assert API_KEY not in result["payload"]["error"]
    assert "[redacted]" in result["payload"]["error"]
    rows = db_rows(workspace, "SELECT status, error FROM missions")
    assert rows[0][0] == "failed" and API_KEY not in rows[0][1]


async def test_unexpected_model_response_fails_the_mission(workspace, model_env, client):
    model_env.body = {"unexpected": True}
    await client.send("mission", {"text": "hi"})
    result, _ = await client.until(is_mission_outcome)
    assert result["payload"]["error"] == "model endpoint returned an unexpected response shape"
    assert db_rows(workspace, "SELECT status FROM missions") == [("failed",)]


async def test_secrets_file_configures_the_model(tmp_path, workspace, fake_model, monkeypatch,
                                                 client):
    secrets = tmp_path / "secrets.env"
    secrets.write_text(f"# sprite secrets\nexport SPRITE_LLM_URL={fake_model.url}\n"
                       f"SPRITE_LLM_API_KEY=\"{API_KEY}\"\n")
    os.chmod(secrets, 0o600)
    monkeypatch.setenv("SPRITE_SECRETS_FILE", str(secrets))
    await client.send("mission", {"text": "hi"})
    result, _ = await client.until(is_mission_outcome)
    assert result["payload"]["event"] == "mission_result"
    assert result["payload"]["text"] == "42"
    assert fake_model.requests[0]["headers"]["Authorization"] == f"Bearer {API_KEY}"
    assert "model" not in fake_model.requests[0]["json"]  # SPRITE_LLM_MODEL unset


async def test_readable_secrets_file_is_refused(tmp_path, workspace, fake_model, monkeypatch,
                                                client):
    secrets = tmp_path / "secrets.env"
    secrets.write_text(f"SPRITE_LLM_URL={fake_model.url}\nSPRITE_LLM_API_KEY={API_KEY}\n")
    os.chmod(secrets, 0o644)
    monkeypatch.setenv("SPRITE_SECRETS_FILE", str(secrets))
    await client.send("mission", {"text": "hi"})
    result, _ = await client.until(is_mission_outcome)
    assert result["payload"]["event"] == "mission_error"
    assert "chmod 600" in result["payload"]["error"]
    assert API_KEY not in result["payload"]["error"]
    assert fake_model.requests == []
    assert db_rows(workspace, "SELECT status FROM missions") == [("queued",)]


def test_missing_secrets_file_means_no_model(tmp_path):
    assert llm.load_config({"SPRITE_SECRETS_FILE": str(tmp_path / "absent")}) is None


def test_environment_overrides_secrets_file(tmp_path):
    secrets = tmp_path / "s.env"
    secrets.write_text("SPRITE_LLM_URL=http://file/\nSPRITE_LLM_API_KEY=from-file\n")
    os.chmod(secrets, 0o600)
    config = llm.load_config({"SPRITE_SECRETS_FILE": str(secrets),
                              "SPRITE_LLM_API_KEY": "from-env"})
    assert (config.url, config.api_key) == ("http://file/", "from-env")
    assert "from-env" not in repr(config)


async def test_shutdown_during_a_model_call_requeues_the_mission(workspace, model_env,
                                                                  start_server, connect_client):
    model_env.delay_s = 5
    srv = await start_server()
    client = await connect_client(srv)
    await client.send("mission", {"text": "slow"}, msg_id="m-slow")
    await client.recv_n(2)  # ack, mission_queued
    for _ in range(200):  # until the model call is in flight
        if db_rows(workspace, "SELECT status FROM missions") == [("running",)]:
            break
        await asyncio.sleep(0.05)
    assert db_rows(workspace, "SELECT status FROM missions") == [("running",)]
    await srv.close()
    assert db_rows(workspace, "SELECT status FROM missions") == [("queued",)]
