"""SQLite access for the sprite agent (aiosqlite) and the `db.py init` CLI.

The schema lives in schema.sql, read from the directory of this file (the
operator deploys it to /workspace/src/schema.sql) or, in the source tree, from
its parent directory (sprite/schema.sql). See schema.sql for the migration
markers.

    python3 db.py init [--db PATH]   # create or migrate $SPRITE_WORKSPACE/agent.db
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sqlite3
import sys
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterable, Sequence

import aiosqlite

from settings import SRC_DIR, Settings, utc_now

SCHEMA_CANDIDATES = (SRC_DIR / "schema.sql", SRC_DIR.parent / "schema.sql")
_MARKER = re.compile(r"^--\s*migration:\s*(\d+)\b(.*)$", re.MULTILINE)
BUSY_TIMEOUT_MS = 10_000


class SchemaError(RuntimeError):
    """schema.sql is missing or its migrations are not numbered 1..N."""


@dataclass(frozen=True)
class Migration:
    version: int
    title: str
    sql: str


@dataclass(frozen=True)
class Schema:
    preamble: str
    migrations: tuple[Migration, ...]

    @property
    def latest(self) -> int:
        return self.migrations[-1].version if self.migrations else 0


def find_schema_file() -> Path:
    for candidate in SCHEMA_CANDIDATES:
        if candidate.is_file():
            return candidate
    raise SchemaError(
        "schema.sql not found; looked in " + ", ".join(map(str, SCHEMA_CANDIDATES))
    )


def parse_schema(text: str) -> Schema:
    markers = list(_MARKER.finditer(text))
    preamble = text[: markers[0].start()] if markers else text
    migrations = []
    for index, marker in enumerate(markers):
        end = markers[index + 1].start() if index + 1 < len(markers) else len(text)
        version = int(marker.group(1))
        if version != index + 1:
            raise SchemaError(
                f"migration numbers must be 1, 2, 3, ... without gaps; "
                f"found {version} at position {index + 1}"
            )
        migrations.append(
            Migration(version, marker.group(2).strip(), text[marker.end() : end])
        )
    return Schema(preamble, tuple(migrations))


def split_statements(sql: str) -> list[str]:
    """Split a script into complete statements.

    executescript() would COMMIT any open transaction first (Python < 3.12),
    which breaks "a migration and its schema_migrations row commit together";
    so statements are executed one by one inside our own transaction.
    """
    statements, current = [], ""
    for line in sql.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            if _strip_comments(current):
                statements.append(current.strip())
            current = ""
    if _strip_comments(current):
        raise SchemaError(f"incomplete SQL statement: {current.strip()[:80]!r}")
    return statements


def _strip_comments(sql: str) -> str:
    lines = (line for line in sql.splitlines() if not line.strip().startswith("--"))
    return "\n".join(lines).strip()


class Transaction:
    """An open BEGIN IMMEDIATE transaction; see Database.transaction()."""

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self.conn = conn
        self._rollback_hooks: list[Callable[[], None]] = []

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one statement; returns the number of rows changed."""
        cursor = await self.conn.execute(sql, params)
        rowcount = cursor.rowcount
        await cursor.close()
        return rowcount

    async def fetchone(self, sql: str, params: Sequence[Any] = ()) -> tuple | None:
        async with self.conn.execute(sql, params) as cursor:
            return await cursor.fetchone()

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        async with self.conn.execute(sql, params) as cursor:
            return list(await cursor.fetchall())

    def on_rollback(self, hook: Callable[[], None]) -> None:
        """Undo a side effect outside the database (e.g. a written file)."""
        self._rollback_hooks.append(hook)

    def _run_rollback_hooks(self) -> None:
        for hook in reversed(self._rollback_hooks):
            try:
                hook()
            except Exception:  # cleanup must not hide the original error
                pass


@dataclass
class MigrationReport:
    version: int
    applied: list[int] = field(default_factory=list)


class Database:
    """One aiosqlite connection shared by the whole process.

    All work goes through transaction(), which holds an asyncio lock: the
    connection is shared by every WebSocket client, and sqlite has one
    transaction per connection, so coroutines must not interleave inside one.
    """

    def __init__(self, conn: aiosqlite.Connection, path: Path) -> None:
        self.conn = conn
        self.path = path
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: Path, migrate: bool = True) -> "Database":
        path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we issue BEGIN/COMMIT ourselves.
        conn = await aiosqlite.connect(str(path), isolation_level=None)
        db = cls(conn, path)
        try:
            await conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            # WAL lets the heartbeat process read while the server writes.
            await conn.execute("PRAGMA journal_mode = WAL")
            await conn.execute("PRAGMA foreign_keys = ON")
            if migrate:
                await db.migrate()
        except BaseException:
            await conn.close()
            raise
        return db

    async def close(self) -> None:
        await self.conn.close()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Transaction]:
        async with self._lock:
            tx = Transaction(self.conn)
            await self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield tx
            except BaseException:
                await self.conn.execute("ROLLBACK")
                tx._run_rollback_hooks()
                raise
            try:
                await self.conn.execute("COMMIT")
            except BaseException:
                if self.conn.in_transaction:
                    await self.conn.execute("ROLLBACK")
                tx._run_rollback_hooks()
                raise

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        async with self.transaction() as tx:
            return await tx.fetchall(sql, params)

    async def migrate(self, schema: Schema | None = None) -> MigrationReport:
        """Apply the preamble, then each pending migration in its own transaction.

        The current version is re-read inside each transaction, so two
        processes migrating at once (server and heartbeat) cannot both apply
        the same migration.
        """
        schema = schema or parse_schema(find_schema_file().read_text("utf-8"))
        async with self.transaction() as tx:
            for statement in split_statements(schema.preamble):
                await tx.execute(statement)
        report = MigrationReport(version=0)
        for migration in schema.migrations:
            async with self.transaction() as tx:
                current = await _current_version(tx)
                if current >= migration.version:
                    report.version = current
                    continue
                for statement in split_statements(migration.sql):
                    await tx.execute(statement)
                await tx.execute(
                    "INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)",
                    (migration.version, utc_now()),
                )
                report.applied.append(migration.version)
                report.version = migration.version
        return report


async def _current_version(tx: Transaction) -> int:
    row = await tx.fetchone("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
    return int(row[0]) if row else 0


async def init_database(path: Path) -> MigrationReport:
    db = await Database.open(path, migrate=False)
    try:
        return await db.migrate()
    finally:
        await db.close()


def _cli(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="db.py", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    init = sub.add_parser("init", help="create or migrate the database, then exit")
    init.add_argument("--db", type=Path, help="database path (default $SPRITE_WORKSPACE/agent.db)")
    args = parser.parse_args(list(argv) if argv is not None else None)

    path = args.db or Settings.from_env().db_path
    try:
        report = asyncio.run(init_database(path))
    except (OSError, sqlite3.Error, SchemaError) as exc:
        print(json.dumps({"ok": False, "db": str(path), "error": str(exc)}))
        print(f"db.py init failed: {exc}", file=sys.stderr)
        return 1
    print(
        json.dumps(
            {"ok": True, "db": str(path), "schema_version": report.version,
             "applied": report.applied}
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(_cli())
