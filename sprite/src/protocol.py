"""The WebSocket message envelope: parsing client frames, building replies.

Every frame is a JSON object {"type", "payload", "timestamp", "id"}.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from settings import utc_now

# Types a client may send. Server-only types: pong, ack (and error,
# agent_event, hello sent back as replies).
CLIENT_TYPES = frozenset(
    {"hello", "ping", "mission", "canvas_update", "agent_event", "file_upload", "error"}
)
MAX_ID_CHARS = 200


class ProtocolError(Exception):
    """A frame or payload the server rejects; becomes an `error` reply.

    `code` is stable and machine-readable, `message` is for humans.
    """

    def __init__(self, code: str, message: str, ref: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.ref = ref  # id of the offending message, when it could be read


@dataclass(frozen=True)
class Envelope:
    type: str
    payload: Any
    id: str | None
    timestamp: Any

    def object_payload(self) -> dict:
        """The payload as a JSON object ({} when absent)."""
        if self.payload is None:
            return {}
        if not isinstance(self.payload, dict):
            raise ProtocolError(
                "invalid_payload", f"{self.type} payload must be a JSON object", self.id
            )
        return self.payload


def parse_text_frame(text: str, max_bytes: int, allow_large_upload: int) -> Envelope:
    """Parse and validate one text frame.

    Frames over `max_bytes` are only accepted when they turn out to be a
    file_upload that fits `allow_large_upload` (base64 content is big).
    """
    size = len(text.encode("utf-8"))
    if size > max(max_bytes, allow_large_upload):
        raise ProtocolError("too_large", _too_large(size, max_bytes))
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if size > max_bytes:
            raise ProtocolError("too_large", _too_large(size, max_bytes)) from None
        raise ProtocolError("invalid_json", f"frame is not valid JSON: {exc.msg}") from None
    if not isinstance(data, dict):
        if size > max_bytes:
            raise ProtocolError("too_large", _too_large(size, max_bytes))
        raise ProtocolError(
            "not_object", f"frame must be a JSON object, got {_json_kind(data)}"
        )
    msg_id = _read_id(data)
    if size > max_bytes and data.get("type") != "file_upload":
        raise ProtocolError("too_large", _too_large(size, max_bytes), msg_id)
    if "type" not in data:
        raise ProtocolError("missing_type", "frame has no \"type\" field", msg_id)
    msg_type = data["type"]
    if not isinstance(msg_type, str) or msg_type not in CLIENT_TYPES:
        raise ProtocolError(
            "unknown_type",
            f"unknown message type {msg_type!r}; expected one of "
            + ", ".join(sorted(CLIENT_TYPES)),
            msg_id,
        )
    return Envelope(msg_type, data.get("payload"), msg_id, data.get("timestamp"))


def _read_id(data: dict) -> str | None:
    msg_id = data.get("id")
    if msg_id is None:
        return None
    if not isinstance(msg_id, str) or not msg_id or len(msg_id) > MAX_ID_CHARS:
        raise ProtocolError(
            "invalid_id", f"\"id\" must be a non-empty string of at most {MAX_ID_CHARS} characters"
        )
    return msg_id


def _too_large(size: int, limit: int) -> str:
    return f"frame of {size} bytes exceeds the limit of {limit} bytes"


def _json_kind(value: Any) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


def message(msg_type: str, payload: Any) -> str:
    """A server frame. Server ids are fresh uuids; clients need not ack them."""
    return json.dumps(
        {"type": msg_type, "payload": payload, "timestamp": utc_now(), "id": uuid.uuid4().hex},
        ensure_ascii=False,
    )


def error(code: str, text: str, ref: str | None = None) -> str:
    payload = {"code": code, "message": text}
    if ref is not None:
        payload["ref"] = ref
    return message("error", payload)


def ack(msg_id: str, status: str) -> str:
    """status: processed | duplicate | rejected."""
    return message("ack", {"id": msg_id, "status": status})


def agent_event(event: str, **fields: Any) -> str:
    return message("agent_event", {"event": event, **fields})
