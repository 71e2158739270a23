"""JSON-lines logging: one object per line with ts, level, msg, fields.

Callers pass structured data as keyword arguments, never secrets:
    log.info("mission queued", mission_id=mid, text_chars=len(text))
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any, TextIO

from settings import utc_now

_LOGGER_NAME = "sprite"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = dict(getattr(record, "fields", {}) or {})
        if record.name != _LOGGER_NAME:
            # Messages from libraries (websockets, httpx) keep their origin.
            fields.setdefault("logger", record.name)
        if record.exc_info:
            fields["exception"] = self.formatException(record.exc_info)
        line = {
            "ts": utc_now(),
            "level": record.levelname.lower(),
            "msg": record.getMessage(),
            "fields": fields,
        }
        return json.dumps(line, ensure_ascii=False, default=str)


def configure(stream: TextIO | None = None, level: int = logging.INFO) -> None:
    """Route all logging (ours and libraries') to `stream` as JSON lines."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stdout)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # httpx logs every request URL at INFO; the URL is config, keep it quiet.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)


class _Log:
    def __init__(self) -> None:
        self._logger = logging.getLogger(_LOGGER_NAME)

    def _emit(self, level: int, msg: str, fields: dict[str, Any], exc: bool) -> None:
        self._logger.log(level, msg, extra={"fields": fields}, exc_info=exc)

    def debug(self, msg: str, **fields: Any) -> None:
        self._emit(logging.DEBUG, msg, fields, False)

    def info(self, msg: str, **fields: Any) -> None:
        self._emit(logging.INFO, msg, fields, False)

    def warning(self, msg: str, **fields: Any) -> None:
        self._emit(logging.WARNING, msg, fields, False)

    def error(self, msg: str, exc_info: bool = False, **fields: Any) -> None:
        self._emit(logging.ERROR, msg, fields, exc_info)


log = _Log()
