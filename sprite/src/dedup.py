"""Which client message ids were already processed, per session.

Two layers with the same bound (the newest DEDUP_WINDOW ids of a session):
  * MemoryWindow: fast path, lost on restart;
  * processed_messages table: survives restarts, written in the same
    transaction as the message's effects, so an id is recorded if and only if
    its effects were committed.
An id older than the window would be processed again: clients resend only
unacknowledged messages, which are far newer than 10000 messages back.
"""

from __future__ import annotations

from collections import OrderedDict

from db import Transaction
from settings import utc_now

DEDUP_WINDOW = 10_000
MAX_SESSIONS_IN_MEMORY = 1_000


class MemoryWindow:
    def __init__(self, window: int = DEDUP_WINDOW, max_sessions: int = MAX_SESSIONS_IN_MEMORY):
        self.window = window
        self.max_sessions = max_sessions
        self._sessions: OrderedDict[str, OrderedDict[str, None]] = OrderedDict()

    def contains(self, session: str, msg_id: str) -> bool:
        ids = self._sessions.get(session)
        return ids is not None and msg_id in ids

    def add(self, session: str, msg_id: str) -> None:
        ids = self._sessions.get(session)
        if ids is None:
            ids = self._sessions[session] = OrderedDict()
        self._sessions.move_to_end(session)
        ids[msg_id] = None
        ids.move_to_end(msg_id)
        while len(ids) > self.window:
            ids.popitem(last=False)
        while len(self._sessions) > self.max_sessions:
            self._sessions.popitem(last=False)  # least recently used session

    def forget(self, session: str) -> None:
        self._sessions.pop(session, None)


async def is_processed(tx: Transaction, session: str, msg_id: str) -> bool:
    row = await tx.fetchone(
        "SELECT 1 FROM processed_messages WHERE session = ? AND id = ?", (session, msg_id)
    )
    return row is not None


async def record(tx: Transaction, session: str, msg_id: str, window: int = DEDUP_WINDOW) -> None:
    """Remember msg_id and drop ids that fell out of the session's window."""
    await tx.execute(
        "INSERT INTO processed_messages (session, id, processed_at) VALUES (?, ?, ?)",
        (session, msg_id, utc_now()),
    )
    await tx.execute(
        "DELETE FROM processed_messages WHERE session = ? AND seq <= ("
        " SELECT seq FROM processed_messages WHERE session = ?"
        " ORDER BY seq DESC LIMIT 1 OFFSET ?)",
        (session, session, window),
    )
