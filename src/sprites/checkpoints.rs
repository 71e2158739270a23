//! Checkpoints: create and restore stream NDJSON until done; list returns a bare JSON array.

use http::Method;

use super::client::{Body, Call, Idempotency, SpritesClient};
use super::error::Error;
use super::rest::{decode, json_body};
use super::types::{Checkpoint, StreamMessage};

/// Parses an NDJSON stream; blank and non-JSON lines are skipped, as sprites-py does.
pub(crate) fn parse_ndjson(body: &[u8]) -> Vec<StreamMessage> {
    body.split(|b| *b == b'\n')
        .filter(|line| !line.iter().all(u8::is_ascii_whitespace))
        .filter_map(|line| serde_json::from_slice(line).ok())
        .collect()
}

/// The first `error` message's text, if the stream reported one.
pub(crate) fn stream_error(messages: &[StreamMessage]) -> Option<String> {
    messages.iter().find(|m| m.kind == "error").map(|m| {
        m.error
            .clone()
            .or_else(|| {
                m.data
                    .as_ref()
                    .map(|d| d.as_str().map_or_else(|| d.to_string(), str::to_string))
            })
            .unwrap_or_else(|| "unspecified error".into())
    })
}

/// The id in a completion text such as `Checkpoint v8 created` (the documented wording).
pub(crate) fn id_from_messages(messages: &[StreamMessage]) -> Option<String> {
    messages.iter().rev().find_map(|m| {
        let text = m.data.as_ref()?.as_str()?;
        let mut words = text.split_whitespace();
        while let Some(w) = words.next() {
            if w.eq_ignore_ascii_case("checkpoint") {
                let id = words.next()?;
                return (words.next() == Some("created")).then(|| id.to_string());
            }
        }
        None
    })
}

impl SpritesClient {
    /// `POST /v1/sprites/{name}/checkpoint`, read to the end; returns the new checkpoint's id
    /// (from the completion message, else the newest non-automatic checkpoint listed afterwards).
    pub async fn create_checkpoint(&self, name: &str, comment: &str) -> Result<String, Error> {
        let url = self.url(&["sprites", name, "checkpoint"]);
        let body = self
            .call(Call {
                method: Method::POST,
                url,
                body: json_body(&serde_json::json!({ "comment": comment }))?,
                timeout: self.inner.timeouts.checkpoint,
                idempotency: Idempotency::OnlyIfNothingDone,
                create_name: None,
            })
            .await?;
        let messages = parse_ndjson(&body);
        if let Some(message) = stream_error(&messages) {
            return Err(Error::Remote { message });
        }
        if let Some(id) = id_from_messages(&messages) {
            return Ok(id);
        }
        let listed = self.list_checkpoints(name).await?;
        newest(&listed)
            .map(|c| c.id.clone())
            .ok_or_else(|| Error::Remote {
                message: "checkpoint stream ended but no checkpoint is listed".into(),
            })
    }

    /// `GET /v1/sprites/{name}/checkpoints`.
    pub async fn list_checkpoints(&self, name: &str) -> Result<Vec<Checkpoint>, Error> {
        let url = self.url(&["sprites", name, "checkpoints"]);
        let body = self.get(url.clone()).await?;
        decode(&url, &body)
    }

    /// `POST /v1/sprites/{name}/checkpoints/{id}/restore`, read to the end. Restoring the same
    /// checkpoint twice gives the same state, so it is retried like an idempotent call.
    pub async fn restore_checkpoint(&self, name: &str, id: &str) -> Result<(), Error> {
        let url = self.url(&["sprites", name, "checkpoints", id, "restore"]);
        let body = self
            .call(Call {
                method: Method::POST,
                url,
                body: Body::Empty,
                timeout: self.inner.timeouts.checkpoint,
                idempotency: Idempotency::Idempotent,
                create_name: None,
            })
            .await?;
        match stream_error(&parse_ndjson(&body)) {
            Some(message) => Err(Error::Remote { message }),
            None => Ok(()),
        }
    }
}

/// The most recent manual checkpoint (RFC 3339 times of one format compare as strings).
fn newest(list: &[Checkpoint]) -> Option<&Checkpoint> {
    list.iter()
        .filter(|c| !c.is_auto)
        .max_by(|a, b| a.create_time.cmp(&b.create_time))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ndjson_parsing() {
        let body = b"{\"type\":\"info\",\"data\":\"Creating checkpoint...\"}\n\nnot json\n\
            {\"type\":\"complete\",\"data\":\"Checkpoint v8 created\",\"time\":\"2026-01-01T00:00:00Z\"}\n";
        let msgs = parse_ndjson(body);
        assert_eq!(msgs.len(), 2);
        assert_eq!(id_from_messages(&msgs).as_deref(), Some("v8"));
        assert_eq!(stream_error(&msgs), None);
        let err = parse_ndjson(b"{\"type\":\"error\",\"error\":\"disk full\"}");
        assert_eq!(stream_error(&err).as_deref(), Some("disk full"));
    }

    #[test]
    fn newest_skips_auto() {
        let cp = |id: &str, t: &str, auto| Checkpoint {
            id: id.into(),
            create_time: t.into(),
            is_auto: auto,
            ..Default::default()
        };
        let list = [
            cp("v1", "2026-01-01T00:00:01Z", false),
            cp("auto-1", "2026-01-02T00:00:00Z", true),
        ];
        assert_eq!(newest(&list).map(|c| c.id.as_str()), Some("v1"));
    }
}
