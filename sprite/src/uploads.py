"""Validation and storage of uploaded files under $WS/documents/.

Defence in depth against path traversal:
  1. the client's filename is rejected if it could name another directory
     (separators, "..", NUL, empty, too long);
  2. the on-disk name is rebuilt from a uuid plus a whitelist of characters;
  3. the final path is resolved and must sit directly inside documents/;
  4. the file is created with O_EXCL | O_NOFOLLOW, so a planted symlink is
     never followed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from protocol import ProtocolError

MAX_FILENAME_BYTES = 255
# uuid4 hex (32) + "_" leaves this much of the 255-byte NAME_MAX for the name.
_MAX_SAFE_NAME_BYTES = 255 - 33
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]")


@dataclass(frozen=True)
class StoredFile:
    path: Path
    stored_name: str
    size: int
    sha256: str


def validate_filename(name: object, ref: str | None = None) -> str:
    def reject(reason: str) -> ProtocolError:
        return ProtocolError("invalid_filename", f"invalid filename: {reason}", ref)

    if not isinstance(name, str) or not name:
        raise reject("must be a non-empty string")
    if len(name.encode("utf-8", "surrogatepass")) > MAX_FILENAME_BYTES:
        raise reject(f"longer than {MAX_FILENAME_BYTES} bytes")
    if "\x00" in name:
        raise reject("contains a NUL byte")
    if "/" in name or "\\" in name:
        raise reject("contains a path separator")
    if ".." in name:
        raise reject("contains \"..\"")
    if name.strip() in ("", "."):
        raise reject("is not a file name")
    return name


def safe_name(name: str) -> str:
    """ASCII-only rendering of `name` that fits next to the uuid prefix."""
    safe = _UNSAFE_CHARS.sub("_", name)
    if len(safe) <= _MAX_SAFE_NAME_BYTES:
        return safe
    stem, dot, ext = safe.rpartition(".")
    if dot and 0 < len(ext) <= 16:
        return stem[: _MAX_SAFE_NAME_BYTES - len(ext) - 1] + "." + ext
    return safe[:_MAX_SAFE_NAME_BYTES]


def declared_size(size: object, limit: int, ref: str | None = None) -> int:
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ProtocolError("invalid_payload", "size must be a non-negative integer", ref)
    if size > limit:
        raise ProtocolError("upload_too_large", _too_large(size, limit), ref)
    return size


def decode_base64(content: object, limit: int, ref: str | None = None) -> bytes:
    if not isinstance(content, str):
        raise ProtocolError("invalid_payload", "content_base64 must be a string", ref)
    # Refuse before decoding: 4 base64 chars carry 3 bytes.
    if len(content) > (limit + 2) // 3 * 4:
        raise ProtocolError("upload_too_large", _too_large(len(content) * 3 // 4, limit), ref)
    try:
        data = base64.b64decode(content, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError("invalid_payload", "content_base64 is not valid base64", ref) from None
    if len(data) > limit:
        raise ProtocolError("upload_too_large", _too_large(len(data), limit), ref)
    return data


def _too_large(size: int, limit: int) -> str:
    return f"upload of {size} bytes exceeds the limit of {limit} bytes"


def target_path(documents_dir: Path, doc_id: str, filename: str) -> Path:
    """The path for a new document; raises unless it lies inside documents_dir."""
    root = documents_dir.resolve()
    path = (root / f"{doc_id}_{safe_name(filename)}").resolve()
    if path.parent != root:
        raise ProtocolError("invalid_filename", "invalid filename: escapes documents/")
    return path


def store(documents_dir: Path, doc_id: str, filename: str, data: bytes) -> StoredFile:
    """Write `data` durably (temp file, fsync, rename) and return where it went."""
    path = target_path(documents_dir, doc_id, filename)
    tmp = path.with_name(f".{doc_id}.part")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(tmp, flags, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return StoredFile(path, path.name, len(data), hashlib.sha256(data).hexdigest())
