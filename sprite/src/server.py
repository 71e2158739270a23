"""The sprite agent's WebSocket server.

    python3 server.py        # listens on $SPRITE_HOST:$SPRITE_PORT (0.0.0.0:8765)

Protocol summary (README.md has the full description):
  * text frames carry {"type", "payload", "timestamp", "id"};
  * every well-formed frame with an "id" is acknowledged with
    {"type": "ack", "payload": {"id", "status"}}, status one of
    processed | duplicate | rejected; a duplicate is not processed again;
  * ids are remembered per session; "hello" {"session"} as the first frame
    resumes a session across reconnects and server restarts.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sys
import uuid
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

import dedup
import jsonlog
import llm
import missions
import protocol
import uploads
from db import Database, Transaction
from jsonlog import log
from protocol import Envelope, ProtocolError
from settings import Settings, SettingsError, utc_now

SESSION_PATTERN = re.compile(r"^[A-Za-z0-9._:@-]{1,128}$")
# Room for the JSON envelope around a base64 upload.
UPLOAD_ENVELOPE_SLACK = 64 * 1024


@dataclass
class Result:
    """What a handler produced; sent only after its transaction committed."""

    replies: list[str] = field(default_factory=list)
    # Work to start after the ack, e.g. a model call that may take minutes.
    followup: Callable[[], Awaitable[None]] | None = None


Handler = Callable[[Transaction, Envelope], Awaitable[Result]]


@dataclass
class PendingUpload:
    """A file_upload header waiting for its binary frame."""

    envelope: Envelope
    filename: str
    size: int


class App:
    """State shared by all connections: settings, database, dedup memory."""

    def __init__(self, settings: Settings, db: Database, dedup_window: int) -> None:
        self.settings = settings
        self.db = db
        self.dedup_window = dedup_window
        self.seen = dedup.MemoryWindow(dedup_window)
        self.tasks: set[asyncio.Task] = set()
        self.upload_frame_limit = (
            (settings.max_upload_bytes + 2) // 3 * 4 + UPLOAD_ENVELOPE_SLACK
        )
        # Frames above this are refused by websockets itself (close code 1009);
        # anything smaller gets a proper `error` reply from us.
        self.frame_limit = max(settings.max_message_bytes, self.upload_frame_limit)

    async def handle(self, ws: ServerConnection) -> None:
        await Connection(self, ws).run()

    def spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.error("background task failed", error=f"{type(exc).__name__}: {exc}")

    async def shutdown(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        # Let cancelled missions put themselves back in the queue before the
        # database closes.
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.db.close()


class Connection:
    def __init__(self, app: App, ws: ServerConnection) -> None:
        self.app = app
        self.ws = ws
        self.session = f"conn-{uuid.uuid4().hex}"
        self.persistent = False  # True once a hello named the session
        self.hello_allowed = True
        self.pending: PendingUpload | None = None
        self.handlers: dict[str, Handler] = {
            "ping": self.on_ping,
            "mission": self.on_mission,
            "canvas_update": self.on_canvas_update,
            "agent_event": self.on_agent_event,
            "error": self.on_client_error,
            "file_upload": self.on_file_upload,
        }

    async def run(self) -> None:
        remote = _remote(self.ws)
        log.info("client connected", remote=remote)
        try:
            async for frame in self.ws:
                if isinstance(frame, bytes):
                    await self.on_binary(frame)
                else:
                    await self.on_text(frame)
        except ConnectionClosed:
            pass
        finally:
            if not self.persistent:
                self.app.seen.forget(self.session)
            log.info("client disconnected", remote=remote, session=self.session)

    async def send(self, frame: str) -> None:
        try:
            await self.ws.send(frame)
        except ConnectionClosed:
            pass  # the client is gone; anything durable is already in the db

    async def reject(self, exc: ProtocolError) -> None:
        await self.send(protocol.error(exc.code, exc.message, exc.ref))
        if exc.ref is not None:
            await self.send(protocol.ack(exc.ref, "rejected"))

    # -- frames -------------------------------------------------------------

    async def on_text(self, text: str) -> None:
        if self.pending is not None:
            await self.abandon_pending_upload()
        try:
            envelope = protocol.parse_text_frame(
                text, self.app.settings.max_message_bytes, self.app.upload_frame_limit
            )
            if envelope.type == "hello":
                await self.on_hello(envelope)
                return
            self.hello_allowed = False
            if envelope.type == "file_upload" and not _has_inline_content(envelope):
                self.start_binary_upload(envelope)
                return
            await self.process(envelope, self.handlers[envelope.type])
        except ProtocolError as exc:
            log.warning("frame rejected", code=exc.code, reason=exc.message, session=self.session)
            await self.reject(exc)

    async def on_binary(self, data: bytes) -> None:
        self.hello_allowed = False
        pending, self.pending = self.pending, None
        if pending is None:
            await self.reject(ProtocolError(
                "unexpected_binary",
                "binary frame without a preceding file_upload header {filename, size}",
            ))
            return
        if len(data) != pending.size:
            await self.reject(ProtocolError(
                "invalid_payload",
                f"binary frame has {len(data)} bytes but the header declared {pending.size}",
                pending.envelope.id,
            ))
            return

        async def store(tx: Transaction, envelope: Envelope) -> Result:
            return await self.store_upload(tx, envelope, pending.filename, data)

        await self.process(pending.envelope, store)

    async def abandon_pending_upload(self) -> None:
        pending, self.pending = self.pending, None
        await self.reject(ProtocolError(
            "upload_incomplete",
            "expected a binary frame with the file content after the file_upload header",
            pending.envelope.id,
        ))

    # -- processing with ack and duplicate suppression ---------------------------

    async def process(self, envelope: Envelope, handler: Handler) -> None:
        """Run a handler at most once per (session, id), then ack.

        The handler's database writes and the processed-id record commit in
        one transaction: either both happen or neither does.
        """
        msg_id = envelope.id
        if msg_id is not None and self.app.seen.contains(self.session, msg_id):
            await self.send(protocol.ack(msg_id, "duplicate"))
            return
        duplicate, result = False, Result()
        try:
            async with self.app.db.transaction() as tx:
                if msg_id is not None and self.persistent:
                    duplicate = await dedup.is_processed(tx, self.session, msg_id)
                if not duplicate:
                    result = await handler(tx, envelope)
                    if msg_id is not None and self.persistent:
                        await dedup.record(tx, self.session, msg_id, self.app.dedup_window)
        except ProtocolError as exc:
            log.warning("message rejected", type=envelope.type, code=exc.code,
                        reason=exc.message, session=self.session)
            exc.ref = msg_id
            await self.reject(exc)
            return
        except Exception as exc:
            # Not acked: the client keeps the message and may send it again.
            log.error("message processing failed", exc_info=True, type=envelope.type,
                      session=self.session)
            await self.send(protocol.error(
                "internal", f"could not process {envelope.type}: {type(exc).__name__}", msg_id
            ))
            return
        if msg_id is not None:
            self.app.seen.add(self.session, msg_id)
            await self.send(protocol.ack(msg_id, "duplicate" if duplicate else "processed"))
        for reply in result.replies:
            await self.send(reply)
        if result.followup is not None:
            self.app.spawn(result.followup())

    # -- handlers --------------------------------------------------------------

    async def on_hello(self, envelope: Envelope) -> None:
        payload = envelope.object_payload()
        session = payload.get("session")
        if not self.hello_allowed:
            raise ProtocolError("hello_not_first", "hello must be the first frame", envelope.id)
        if not isinstance(session, str) or not SESSION_PATTERN.match(session):
            raise ProtocolError(
                "invalid_session",
                "session must be 1-128 characters of A-Z a-z 0-9 . _ : @ -",
                envelope.id,
            )
        self.hello_allowed = False
        self.session, self.persistent = session, True
        log.info("session resumed", session=session)
        if envelope.id is not None:
            await self.send(protocol.ack(envelope.id, "processed"))
        await self.send(protocol.message(
            "hello", {"session": session, "version": self.app.settings.version()}
        ))

    async def on_ping(self, tx: Transaction, envelope: Envelope) -> Result:
        pong = protocol.message("pong", {
            "server_time": utc_now(),
            "version": self.app.settings.version(),
            "echo": envelope.payload,
        })
        return Result([pong])

    async def on_mission(self, tx: Transaction, envelope: Envelope) -> Result:
        payload = envelope.object_payload()
        text = payload.get("text")
        if not isinstance(text, str) or not text.strip():
            raise ProtocolError("invalid_payload", "mission text must be a non-empty string")
        mission_id = await missions.create(tx, self.session, text, payload)
        log.info("mission queued", mission_id=mission_id, session=self.session,
                 text_chars=len(text))
        return Result(
            [protocol.agent_event("mission_queued", mission_id=mission_id)],
            followup=lambda: self.run_mission(mission_id),
        )

    async def run_mission(self, mission_id: str) -> None:
        """Answer a mission with the model, or say why it cannot be answered."""
        try:
            config = llm.load_config()
        except llm.LLMConfigError as exc:
            await self.mission_error(mission_id, str(exc))
            return
        if config is None:
            # The mission stays queued; a heartbeat runs it once a model exists.
            await self.mission_error(mission_id, llm.NO_MODEL_MESSAGE)
            return
        text = await missions.claim(self.app.db, mission_id)
        if text is None:
            return  # a heartbeat took it first and will record the result
        outcome = await missions.execute(
            self.app.db, config, self.app.settings.memory_dir, mission_id, text, config.timeout_s
        )
        log.info("mission finished", mission_id=mission_id, status=outcome.status)
        if outcome.status == "done":
            await self.send(protocol.agent_event(
                "mission_result", mission_id=mission_id, text=outcome.text
            ))
        else:
            await self.mission_error(mission_id, outcome.text)

    async def mission_error(self, mission_id: str, error: str) -> None:
        log.warning("mission not answered", mission_id=mission_id, error=error)
        await self.send(protocol.agent_event("mission_error", mission_id=mission_id, error=error))

    async def on_canvas_update(self, tx: Transaction, envelope: Envelope) -> Result:
        payload = envelope.object_payload()
        await tx.execute(
            "INSERT INTO canvas (session, payload, created_at) VALUES (?, ?, ?)",
            (self.session, _json(payload), utc_now()),
        )
        return Result()

    async def on_agent_event(self, tx: Transaction, envelope: Envelope) -> Result:
        payload = envelope.object_payload()
        log.info("client agent_event", event=str(payload.get("event"))[:100], session=self.session)
        return Result()

    async def on_client_error(self, tx: Transaction, envelope: Envelope) -> Result:
        payload = envelope.object_payload()
        log.warning("client reported an error", session=self.session,
                    message=str(payload.get("message"))[:500])
        return Result()

    async def on_file_upload(self, tx: Transaction, envelope: Envelope) -> Result:
        payload = envelope.object_payload()
        filename = uploads.validate_filename(payload.get("filename"))
        data = uploads.decode_base64(payload.get("content_base64"),
                                     self.app.settings.max_upload_bytes)
        return await self.store_upload(tx, envelope, filename, data)

    def start_binary_upload(self, envelope: Envelope) -> None:
        """Validate a header now, so a bad one is refused before its bytes arrive."""
        payload = envelope.object_payload()
        filename = uploads.validate_filename(payload.get("filename"), envelope.id)
        if "size" not in payload:
            raise ProtocolError(
                "invalid_payload",
                "file_upload needs content_base64, or size followed by a binary frame",
                envelope.id,
            )
        size = uploads.declared_size(
            payload.get("size"), self.app.settings.max_upload_bytes, envelope.id
        )
        self.pending = PendingUpload(envelope, filename, size)

    async def store_upload(
        self, tx: Transaction, envelope: Envelope, filename: str, data: bytes
    ) -> Result:
        doc_id = uuid.uuid4().hex
        stored = await asyncio.to_thread(
            uploads.store, self.app.settings.documents_dir, doc_id, filename, data
        )
        tx.on_rollback(lambda: stored.path.unlink(missing_ok=True))
        await tx.execute(
            "INSERT INTO documents (id, session, filename, stored_name, path, size, sha256,"
            " created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (doc_id, self.session, filename, stored.stored_name, str(stored.path),
             stored.size, stored.sha256, utc_now()),
        )
        log.info("file stored", document_id=doc_id, size=stored.size, session=self.session)
        return Result([protocol.agent_event(
            "file_stored", document_id=doc_id, path=str(stored.path), size=stored.size
        )])


def _has_inline_content(envelope: Envelope) -> bool:
    return isinstance(envelope.payload, dict) and "content_base64" in envelope.payload


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _remote(ws: ServerConnection) -> str:
    address = ws.remote_address
    return f"{address[0]}:{address[1]}" if address else "unknown"


# -- lifecycle -------------------------------------------------------------------


class RunningServer:
    def __init__(self, app: App, server: Server) -> None:
        self.app = app
        self.server = server

    @property
    def port(self) -> int:
        return self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        self.server.close()  # also closes client connections (code 1001)
        await self.server.wait_closed()
        await self.app.shutdown()


async def start(settings: Settings, dedup_window: int = dedup.DEDUP_WINDOW) -> RunningServer:
    settings.ensure_dirs()
    db = await Database.open(settings.db_path)
    app = App(settings, db, dedup_window)
    try:
        server = await serve(app.handle, settings.host, settings.port, max_size=app.frame_limit)
    except BaseException:
        await db.close()
        raise
    return RunningServer(app, server)


async def run(settings: Settings) -> None:
    running = await start(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("listening", host=settings.host, port=running.port,
             version=settings.version(), workspace=str(settings.workspace))
    await stop.wait()
    log.info("shutting down")
    await running.close()
    log.info("stopped")


def main() -> int:
    jsonlog.configure()
    try:
        settings = Settings.from_env()
        asyncio.run(run(settings))
    except SettingsError as exc:
        log.error("invalid configuration", error=str(exc))
        return 2
    except Exception as exc:
        log.error("server failed", exc_info=True, error=f"{type(exc).__name__}: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
