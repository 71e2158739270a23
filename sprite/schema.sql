-- Schema of /workspace/agent.db, the single source of truth for db.py.
--
-- Layout rules (parsed by db.py):
--   * Everything before the first "-- migration: N" marker is the preamble.
--     It runs on every start, so it must be idempotent (IF NOT EXISTS).
--   * Each "-- migration: N <title>" marker starts migration N. Migrations are
--     numbered 1, 2, 3, ... without gaps and each runs exactly once, inside one
--     transaction together with its row in schema_migrations.
--   * Never edit a migration that has shipped: append a new one instead.

CREATE TABLE IF NOT EXISTS schema_migrations (
    version    INTEGER PRIMARY KEY,
    applied_at TEXT NOT NULL
);

-- migration: 1 core tables

-- Files received through file_upload; the bytes live in documents/.
CREATE TABLE documents (
    id          TEXT PRIMARY KEY,          -- uuid4 hex, also the file name prefix
    session     TEXT NOT NULL,
    filename    TEXT NOT NULL,             -- name as sent by the client
    stored_name TEXT NOT NULL,             -- sanitized name inside documents/
    path        TEXT NOT NULL,             -- absolute path at upload time
    size        INTEGER NOT NULL,
    sha256      TEXT NOT NULL,
    created_at  TEXT NOT NULL
);

CREATE TABLE ocr_results (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    document_id TEXT NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
    page        INTEGER NOT NULL DEFAULT 1,
    engine      TEXT,
    text        TEXT NOT NULL,
    created_at  TEXT NOT NULL
);
CREATE INDEX ocr_results_document ON ocr_results(document_id);

CREATE TABLE extractions (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    document_id TEXT NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
    kind        TEXT NOT NULL,             -- e.g. "invoice", "entities"
    data        TEXT NOT NULL,             -- JSON
    created_at  TEXT NOT NULL
);
CREATE INDEX extractions_document ON extractions(document_id);

CREATE TABLE missions (
    id          TEXT PRIMARY KEY,          -- uuid4 hex
    session     TEXT NOT NULL,
    text        TEXT NOT NULL,
    payload     TEXT NOT NULL DEFAULT '{}', -- full client payload, JSON
    status      TEXT NOT NULL DEFAULT 'queued'
                CHECK (status IN ('queued', 'running', 'done', 'failed')),
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL,
    result      TEXT,                      -- model answer when done
    error       TEXT                       -- reason when failed
);
CREATE INDEX missions_status ON missions(status, created_at);

-- Message ids already processed, per client session, so a redelivered message
-- is acknowledged but not processed twice, even across server restarts.
-- seq orders the rows so only the newest ids of a session are kept.
CREATE TABLE processed_messages (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    session      TEXT NOT NULL,
    id           TEXT NOT NULL,
    processed_at TEXT NOT NULL,
    UNIQUE (session, id)
);
CREATE INDEX processed_messages_session_seq ON processed_messages(session, seq);

-- canvas_update payloads, newest last.
CREATE TABLE canvas (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    session    TEXT NOT NULL,
    payload    TEXT NOT NULL,              -- JSON object
    created_at TEXT NOT NULL
);

-- Full-text index over the memory files (soul.md, user.md, MEMORY.md, ...).
CREATE VIRTUAL TABLE memory_fts USING fts5(path UNINDEXED, content);
