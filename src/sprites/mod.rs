//! Async client for the Sprites.dev API: sprite metadata (REST), exec and sessions (WebSocket),
//! the filesystem API, the TCP proxy and checkpoints. Wire facts: `docs/sprites-api.md`.
//!
//! Every call has a timeout; idempotent calls are retried with jittered exponential backoff and
//! 429 `Retry-After` is honoured. The token never appears in Debug output, logs or errors, and
//! URLs in errors and logs carry no query string.

mod checkpoints;
mod client;
mod error;
mod exec;
pub mod frame;
mod fs;
mod proxy;
mod rate;
mod redact;
mod rest;
mod types;

pub use client::{Dial, RetryPolicy, SpritesClient, Timeouts, TokioDial};
pub use error::Error;
pub use exec::{ExecRequest, go_duration};
pub use proxy::ProxyStream;
pub use redact::{Token, url_for_log};
pub use rest::LIST_PAGE_SIZE;
pub use types::{
    Checkpoint, CreateSprite, ExecOutput, FsEntry, FsList, Session, SessionList, Sprite, SpriteConfig,
    SpritePage, StreamMessage, UpdateSprite, UrlSettings,
};
