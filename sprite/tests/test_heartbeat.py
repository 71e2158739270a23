"""heartbeat.py --duration N, run as the operator runs it (a subprocess)."""

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from datetime import datetime, timezone

from conftest import API_KEY, SPRITE_DIR, SRC_DIR, db_rows

NO_MODEL = "no model is configured: set SPRITE_LLM_URL and SPRITE_LLM_API_KEY"


def run_heartbeat(workspace, duration="10", **env_overrides):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPRITE_")}
    env.update(SPRITE_WORKSPACE=str(workspace), **env_overrides)
    return subprocess.run([sys.executable, str(SRC_DIR / "heartbeat.py"), "--duration", duration],
                          env=env, capture_output=True, text=True, timeout=60)


def summary_of(result) -> dict:
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout  # stdout is exactly the summary line
    return json.loads(lines[0])


def transcript_lines(workspace) -> list[dict]:
    day = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    path = workspace / "transcripts" / f"heartbeat-{day}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def queue_missions(workspace, *texts, status="queued", updated_at="2025-01-01T00:00:00.000Z"):
    subprocess.run([sys.executable, str(SRC_DIR / "db.py"), "init"], check=True,
                   env={**os.environ, "SPRITE_WORKSPACE": str(workspace)},
                   capture_output=True)
    conn = sqlite3.connect(workspace / "agent.db")
    with conn:
        for n, text in enumerate(texts):
            conn.execute(
                "INSERT INTO missions (id, session, text, status, created_at, updated_at)"
                " VALUES (?, 's', ?, ?, ?, ?)",
                (f"m{n}", text, status, f"2025-01-01T00:00:0{n}.000Z", updated_at))
    conn.close()


def test_idle_heartbeat_writes_a_transcript_line(workspace):
    result = run_heartbeat(workspace, "5")
    assert result.returncode == 0, result.stderr
    summary = summary_of(result)
    assert summary["outcome"] == "idle"
    assert summary["missions_seen"] == 0 and summary["missions_done"] == 0
    assert summary["budget_s"] == 5.0 and 0 <= summary["duration_s"] < 5
    assert transcript_lines(workspace) == [summary]
    # A second tick appends rather than overwrites.
    run_heartbeat(workspace, "5")
    assert len(transcript_lines(workspace)) == 2


def test_queued_work_without_model_is_left_queued(workspace):
    queue_missions(workspace, "one", "two")
    result = run_heartbeat(workspace)
    assert result.returncode == 0, result.stderr
    summary = summary_of(result)
    assert summary["outcome"] == "no_model"
    assert summary["detail"] == NO_MODEL
    assert summary["model_configured"] is False
    assert (summary["missions_seen"], summary["missions_done"]) == (2, 0)
    assert db_rows(workspace, "SELECT status FROM missions") == [("queued",), ("queued",)]


def test_queued_work_with_model_is_done(workspace, fake_model):
    queue_missions(workspace, "first question", "second question")
    fake_model.body = {"choices": [{"message": {"content": "answered"}}]}
    result = run_heartbeat(workspace, SPRITE_LLM_URL=fake_model.url, SPRITE_LLM_API_KEY=API_KEY)
    assert result.returncode == 0, result.stderr
    summary = summary_of(result)
    assert summary["outcome"] == "ok"
    assert (summary["missions_seen"], summary["missions_done"]) == (2, 2)
    assert db_rows(workspace, "SELECT id, status, result FROM missions ORDER BY id") == [
        ("m0", "done", "answered"), ("m1", "done", "answered")]
    # Oldest first.
    assert [r["json"]["messages"][1]["content"] for r in fake_model.requests] == [
        "first question", "second question"]
    assert API_KEY not in result.stdout + result.stderr


def test_out_of_time_mission_goes_back_to_the_queue(workspace, fake_model):
    queue_missions(workspace, "slow one")
    fake_model.delay_s = 4
    result = run_heartbeat(workspace, "1.5", SPRITE_LLM_URL=fake_model.url,
                           SPRITE_LLM_API_KEY=API_KEY)
    assert result.returncode == 0, result.stderr
    summary = summary_of(result)
    assert summary["outcome"] == "timeout"
    assert summary["missions_done"] == 0
    assert summary["duration_s"] < 3.5
    assert db_rows(workspace, "SELECT status FROM missions") == [("queued",)]


def test_stale_running_mission_is_requeued(workspace):
    queue_missions(workspace, "orphaned", status="running")
    summary = summary_of(run_heartbeat(workspace))
    assert summary["requeued_stale"] == 1
    assert summary["missions_seen"] == 1
    assert db_rows(workspace, "SELECT status FROM missions") == [("queued",)]


def test_memory_files_are_indexed(workspace):
    shutil.copytree(SPRITE_DIR / "memory", workspace / "memory")
    summary = summary_of(run_heartbeat(workspace))
    assert summary["memory_indexed"] == 3
    rows = db_rows(workspace, "SELECT path FROM memory_fts WHERE memory_fts MATCH 'destructive'")
    assert rows == [("soul.md",)]


def test_unreadable_database_fails_with_a_message(workspace):
    (workspace / "agent.db").write_bytes(b"garbage, not sqlite" * 200)
    result = run_heartbeat(workspace)
    assert result.returncode == 1
    summary = summary_of(result)
    assert summary["outcome"] == "error"
    assert "not a database" in summary["error"]
    assert transcript_lines(workspace)[-1]["outcome"] == "error"


def test_duration_must_be_positive(workspace):
    result = run_heartbeat(workspace, "0")
    assert result.returncode == 2
    assert "positive" in result.stderr
