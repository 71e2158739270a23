"""Mission lifecycle shared by the server and the heartbeat.

    queued --claim--> running --> done | failed
       ^                 |
       +----requeue------+   (cancelled, out of time, or stale after a crash)

claim() is a conditional UPDATE, so the server and a heartbeat running at the
same time never both run one mission.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import llm
from db import Database, Transaction
from settings import utc_now

MEMORY_FILES = ("soul.md", "user.md", "MEMORY.md")
MAX_MEMORY_CHARS = 16_000  # per file, keeps the system prompt bounded
# A mission still "running" after this long was orphaned by a crash.
STALE_RUNNING_S = 15 * 60
BASE_PROMPT = (
    "You are the personal agent running on the user's Sprite microVM. "
    "Answer the mission below directly and concisely."
)


@dataclass(frozen=True)
class Outcome:
    status: str  # "done" or "failed"
    text: str  # the answer when done, the error when failed


async def create(tx: Transaction, session: str, text: str, payload: dict) -> str:
    mission_id = uuid.uuid4().hex
    now = utc_now()
    await tx.execute(
        "INSERT INTO missions (id, session, text, payload, status, created_at, updated_at)"
        " VALUES (?, ?, ?, ?, 'queued', ?, ?)",
        (mission_id, session, text, json.dumps(payload, ensure_ascii=False), now, now),
    )
    return mission_id


async def claim(db: Database, mission_id: str) -> str | None:
    """Move a queued mission to running; returns its text, or None if taken."""
    async with db.transaction() as tx:
        changed = await tx.execute(
            "UPDATE missions SET status = 'running', updated_at = ?"
            " WHERE id = ? AND status = 'queued'",
            (utc_now(), mission_id),
        )
        if not changed:
            return None
        row = await tx.fetchone("SELECT text FROM missions WHERE id = ?", (mission_id,))
    return row[0] if row else None


async def requeue(db: Database, mission_id: str) -> None:
    async with db.transaction() as tx:
        await tx.execute(
            "UPDATE missions SET status = 'queued', updated_at = ?"
            " WHERE id = ? AND status = 'running'",
            (utc_now(), mission_id),
        )


async def requeue_stale(db: Database, older_than_s: float = STALE_RUNNING_S) -> int:
    cutoff = datetime.now(timezone.utc) - timedelta(seconds=older_than_s)
    cutoff_text = cutoff.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    async with db.transaction() as tx:
        return await tx.execute(
            "UPDATE missions SET status = 'queued', updated_at = ?"
            " WHERE status = 'running' AND updated_at < ?",
            (utc_now(), cutoff_text),
        )


async def queued(db: Database) -> list[tuple[str, str]]:
    """(id, text) of queued missions, oldest first."""
    rows = await db.fetchall(
        "SELECT id, text FROM missions WHERE status = 'queued' ORDER BY created_at, id"
    )
    return [(row[0], row[1]) for row in rows]


async def _finish(db: Database, mission_id: str, outcome: Outcome) -> None:
    column = "result" if outcome.status == "done" else "error"
    async with db.transaction() as tx:
        await tx.execute(
            f"UPDATE missions SET status = ?, {column} = ?, updated_at = ? WHERE id = ?",
            (outcome.status, outcome.text, utc_now(), mission_id),
        )


def system_prompt(memory_dir: Path) -> str:
    """The base prompt followed by the agent's memory files, when present."""
    parts = [BASE_PROMPT]
    for name in MEMORY_FILES:
        try:
            content = (memory_dir / name).read_text(encoding="utf-8").strip()
        except OSError:
            continue
        if content:
            parts.append(f"## {name}\n{content[:MAX_MEMORY_CHARS]}")
    return "\n\n".join(parts)


async def execute(
    db: Database,
    config: llm.LLMConfig,
    memory_dir: Path,
    mission_id: str,
    text: str,
    timeout_s: float,
) -> Outcome:
    """Run a claimed mission through the model and record the outcome.

    If the call is cancelled or runs out of time the mission goes back to
    queued (a later heartbeat retries it) and the exception propagates.
    """
    try:
        answer = await asyncio.wait_for(
            llm.complete(config, system_prompt(memory_dir), text), timeout_s
        )
        outcome = Outcome("done", answer)
    except llm.LLMError as exc:
        outcome = Outcome("failed", str(exc))
    except BaseException:
        await asyncio.shield(requeue(db, mission_id))
        raise
    await _finish(db, mission_id, outcome)
    return outcome
