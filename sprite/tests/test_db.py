"""Schema application: idempotent, versioned, and the `db.py init` CLI."""

import json
import os
import sqlite3
import subprocess
import sys

import pytest

import db
from conftest import SPRITE_DIR, SRC_DIR

EXPECTED_TABLES = {"documents", "ocr_results", "extractions", "missions",
                   "processed_messages", "canvas", "memory_fts", "schema_migrations"}


def tables(path) -> set[str]:
    conn = sqlite3.connect(path)
    try:
        return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    finally:
        conn.close()


def migrations(path) -> list[int]:
    conn = sqlite3.connect(path)
    try:
        return [r[0] for r in conn.execute("SELECT version FROM schema_migrations ORDER BY 1")]
    finally:
        conn.close()


async def test_schema_applies_once_and_is_idempotent(tmp_path):
    path = tmp_path / "agent.db"
    first = await db.init_database(path)
    latest = db.parse_schema(db.find_schema_file().read_text()).latest
    assert first.applied == list(range(1, latest + 1))
    assert EXPECTED_TABLES <= tables(path)

    second = await db.init_database(path)
    assert second.applied == []
    assert second.version == latest
    assert migrations(path) == list(range(1, latest + 1))  # one row per migration


async def test_memory_fts_is_a_working_fts5_table(tmp_path):
    database = await db.Database.open(tmp_path / "agent.db")
    try:
        async with database.transaction() as tx:
            await tx.execute("INSERT INTO memory_fts (path, content) VALUES (?, ?)",
                             ("user.md", "prefers concise answers in French"))
        rows = await database.fetchall(
            "SELECT path FROM memory_fts WHERE memory_fts MATCH 'french'")
        assert rows == [("user.md",)]
    finally:
        await database.close()


async def test_new_migration_is_applied_on_top(tmp_path):
    path = tmp_path / "agent.db"
    await db.init_database(path)
    text = db.find_schema_file().read_text()
    latest = db.parse_schema(text).latest
    extended = db.parse_schema(
        text + f"\n-- migration: {latest + 1} add notes\nCREATE TABLE notes (body TEXT);\n")
    database = await db.Database.open(path, migrate=False)
    try:
        report = await database.migrate(extended)
        again = await database.migrate(extended)
    finally:
        await database.close()
    assert report.applied == [latest + 1]
    assert again.applied == []
    assert "notes" in tables(path)


async def test_failed_migration_leaves_no_trace(tmp_path):
    path = tmp_path / "agent.db"
    schema = db.parse_schema(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY,"
        " applied_at TEXT NOT NULL);\n"
        "-- migration: 1 ok\nCREATE TABLE a (x);\n"
        "-- migration: 2 broken\nCREATE TABLE b (x);\nCREATE TABLE a (y);\n")
    database = await db.Database.open(path, migrate=False)
    try:
        with pytest.raises(sqlite3.OperationalError):
            await database.migrate(schema)
    finally:
        await database.close()
    assert migrations(path) == [1]
    assert "b" not in tables(path)  # migration 2 rolled back as a whole


@pytest.mark.parametrize("text", [
    "-- migration: 2 starts at two\nCREATE TABLE a (x);",
    "-- migration: 1 a\nCREATE TABLE a (x);\n-- migration: 1 again\nCREATE TABLE b (x);",
    "-- migration: 1 a\nCREATE TABLE a (x);\n-- migration: 3 gap\nCREATE TABLE b (x);",
])
def test_migration_numbers_must_be_contiguous(text):
    with pytest.raises(db.SchemaError):
        db.parse_schema(text)


def test_split_statements_keeps_triggers_whole():
    sql = ("-- comment\nCREATE TABLE t (x);\n"
           "CREATE TRIGGER tr AFTER INSERT ON t BEGIN\n  UPDATE t SET x = 1;\nEND;\n")
    statements = db.split_statements(sql)
    assert len(statements) == 2
    assert statements[1].startswith("CREATE TRIGGER") and statements[1].endswith("END;")


def run_cli(workspace, *args):
    env = {**os.environ, "SPRITE_WORKSPACE": str(workspace)}
    return subprocess.run([sys.executable, str(SRC_DIR / "db.py"), *args], env=env,
                          capture_output=True, text=True, timeout=60)


def test_cli_init_creates_and_migrates(tmp_path):
    workspace = tmp_path / "ws"
    first = run_cli(workspace, "init")
    assert first.returncode == 0, first.stderr
    report = json.loads(first.stdout)
    assert report["ok"] is True and report["applied"] == [1]
    assert EXPECTED_TABLES <= tables(workspace / "agent.db")

    second = run_cli(workspace, "init")
    assert second.returncode == 0
    assert json.loads(second.stdout)["applied"] == []


def test_cli_init_fails_on_a_corrupt_database(tmp_path):
    (tmp_path / "agent.db").write_bytes(b"this is not a sqlite database" * 100)
    result = run_cli(tmp_path, "init")
    assert result.returncode == 1
    assert json.loads(result.stdout)["ok"] is False
    assert "db.py init failed" in result.stderr


def test_schema_is_read_next_to_db_py_when_deployed(tmp_path):
    """On the VM schema.sql sits in /workspace/src next to db.py."""
    src = tmp_path / "src"
    src.mkdir()
    for path in SRC_DIR.glob("*.py"):
        (src / path.name).write_text(path.read_text())
    (src / "schema.sql").write_text((SPRITE_DIR / "schema.sql").read_text())
    env = {**os.environ, "SPRITE_WORKSPACE": str(tmp_path)}
    result = subprocess.run([sys.executable, str(src / "db.py"), "init"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "memory_fts" in tables(tmp_path / "agent.db")
