"""Runtime settings, read once from the environment.

Every path hangs off SPRITE_WORKSPACE so tests can run against a temp dir.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Mapping

SRC_DIR = Path(__file__).resolve().parent
# In the source tree VERSION sits next to src/; on the VM that is /workspace.
SOURCE_VERSION_FILE = SRC_DIR.parent / "VERSION"

DEFAULT_WORKSPACE = "/workspace"
DEFAULT_HOST = "0.0.0.0"
DEFAULT_PORT = 8765
DEFAULT_MAX_MESSAGE_BYTES = 1024 * 1024
DEFAULT_MAX_UPLOAD_BYTES = 10 * 1024 * 1024

WORKSPACE_DIRS = ("documents", "ocr", "artifacts", "memory", "transcripts", "src")


class SettingsError(ValueError):
    """An environment variable has an unusable value."""


def _positive_int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be an integer, got {raw!r}") from None
    if value <= 0:
        raise SettingsError(f"{name} must be positive, got {value}")
    return value


@dataclass(frozen=True)
class Settings:
    workspace: Path
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if env is None else env
        port = _positive_int(env, "SPRITE_PORT", DEFAULT_PORT)
        if port > 65535:
            raise SettingsError(f"SPRITE_PORT out of range: {port}")
        return cls(
            workspace=Path(env.get("SPRITE_WORKSPACE") or DEFAULT_WORKSPACE),
            host=env.get("SPRITE_HOST") or DEFAULT_HOST,
            port=port,
            max_message_bytes=_positive_int(
                env, "SPRITE_MAX_MESSAGE_BYTES", DEFAULT_MAX_MESSAGE_BYTES
            ),
            max_upload_bytes=_positive_int(
                env, "SPRITE_MAX_UPLOAD_BYTES", DEFAULT_MAX_UPLOAD_BYTES
            ),
        )

    @property
    def db_path(self) -> Path:
        return self.workspace / "agent.db"

    @property
    def documents_dir(self) -> Path:
        return self.workspace / "documents"

    @property
    def transcripts_dir(self) -> Path:
        return self.workspace / "transcripts"

    @property
    def memory_dir(self) -> Path:
        return self.workspace / "memory"

    def ensure_dirs(self) -> None:
        for name in WORKSPACE_DIRS:
            (self.workspace / name).mkdir(parents=True, exist_ok=True)

    def version(self) -> str:
        """The deployed runtime version: $WS/VERSION, else the source tree's."""
        for candidate in (self.workspace / "VERSION", SOURCE_VERSION_FILE):
            try:
                text = candidate.read_text(encoding="utf-8").strip()
            except OSError:
                continue
            if text:
                return text
        return "unknown"


def utc_now() -> str:
    """RFC 3339 UTC timestamp with millisecond precision, e.g. 2025-01-31T12:00:00.000Z."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z"
    )
