"""One heartbeat tick, run by the operator:

    python3 heartbeat.py --duration SECONDS

Within at most SECONDS it re-queues missions orphaned by a crash, re-indexes
the memory files into memory_fts, and runs queued missions through the model
when one is configured (without a model nothing is marked done). It appends a
line to $WS/transcripts/heartbeat-YYYY-MM-DD.jsonl and prints the same JSON
object as the only line on stdout (logs go to stderr).

outcome: idle (nothing queued) | no_model | ok (every queued mission was
attempted) | timeout (time ran out first) | error (exit code 1).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import jsonlog
import llm
import missions
from db import Database
from jsonlog import log
from settings import Settings, utc_now

DEFAULT_DURATION_S = 60.0
# Starting a model call with less time left than this would only be cut off.
MIN_CALL_S = 1.0


async def index_memory(db: Database, memory_dir: Path) -> int:
    """Rebuild memory_fts from the *.md files in memory/; returns the file count."""
    files = sorted(memory_dir.glob("*.md")) if memory_dir.is_dir() else []
    async with db.transaction() as tx:
        await tx.execute("DELETE FROM memory_fts")
        for path in files:
            text = path.read_text(encoding="utf-8", errors="replace")
            await tx.execute(
                "INSERT INTO memory_fts (path, content) VALUES (?, ?)", (path.name, text)
            )
    return len(files)


async def tick(settings: Settings, duration_s: float) -> dict:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + duration_s
    summary: dict = {"missions_seen": 0, "missions_done": 0, "missions_failed": 0}
    db = await Database.open(settings.db_path)
    try:
        summary["requeued_stale"] = await missions.requeue_stale(db)
        summary["memory_indexed"] = await index_memory(db, settings.memory_dir)
        pending = await missions.queued(db)
        summary["missions_seen"] = len(pending)
        try:
            config, config_error = llm.load_config(), None
        except llm.LLMConfigError as exc:
            config, config_error = None, str(exc)
        summary["model_configured"] = config is not None
        if not pending:
            summary["outcome"] = "idle"
        elif config is None:
            summary["outcome"] = "no_model"
            summary["detail"] = config_error or llm.NO_MODEL_MESSAGE
        else:
            summary["outcome"] = await _run_missions(
                db, config, settings, pending, lambda: deadline - loop.time(), summary
            )
    finally:
        await db.close()
    return summary


async def _run_missions(db, config, settings, pending, remaining, summary) -> str:
    for mission_id, _ in pending:
        if remaining() < MIN_CALL_S:
            return "timeout"
        text = await missions.claim(db, mission_id)
        if text is None:
            continue  # the server is already running it
        try:
            outcome = await missions.execute(
                db, config, settings.memory_dir, mission_id, text,
                min(remaining(), config.timeout_s),
            )
        except asyncio.TimeoutError:
            return "timeout"  # execute() put the mission back in the queue
        key = "missions_done" if outcome.status == "done" else "missions_failed"
        summary[key] += 1
        log.info("mission finished", mission_id=mission_id, status=outcome.status)
    return "ok"


def write_transcript(transcripts_dir: Path, summary: dict) -> None:
    day = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    transcripts_dir.mkdir(parents=True, exist_ok=True)
    with open(transcripts_dir / f"heartbeat-{day}.jsonl", "a", encoding="utf-8") as handle:
        handle.write(json.dumps(summary, ensure_ascii=False) + "\n")


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be a positive number of seconds")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="heartbeat.py", description="run one heartbeat tick")
    parser.add_argument("--duration", type=_positive_float, default=DEFAULT_DURATION_S,
                        help="time budget in seconds (default %(default)s)")
    args = parser.parse_args(argv)
    # stdout carries only the summary line, so the operator can parse it.
    jsonlog.configure(sys.stderr)

    started, ts = time.monotonic(), utc_now()
    code, settings = 0, None
    try:
        settings = Settings.from_env()
        summary = asyncio.run(tick(settings, args.duration))
    except Exception as exc:  # report any failure as one parseable line
        code = 1
        summary = {"outcome": "error", "error": f"{type(exc).__name__}: {exc}"}
        log.error("heartbeat failed", error=summary["error"])
    summary = {"ts": ts, "duration_s": round(time.monotonic() - started, 3),
               "budget_s": args.duration, **summary}
    if settings is not None:
        try:
            write_transcript(settings.transcripts_dir, summary)
        except OSError as exc:
            log.error("cannot write transcript", error=str(exc))
            if code == 0:
                code = 1
                summary.update(outcome="error", error=f"cannot write transcript: {exc}")
    print(json.dumps(summary, ensure_ascii=False))
    return code


if __name__ == "__main__":
    sys.exit(main())
