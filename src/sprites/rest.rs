//! Sprite metadata calls: create, get, list, update, delete. None of them wakes a VM.

use http::Method;
use serde::de::DeserializeOwned;

use super::client::{Body, Call, Idempotency, SpritesClient};
use super::error::Error;
use super::redact::url_for_log;
use super::types::{CreateSprite, Sprite, SpritePage, UpdateSprite};

/// Page size asked for when listing; servers clamp it.
pub const LIST_PAGE_SIZE: u32 = 50;
/// Bound on pages followed, against a server that never says `has_more: false`.
const MAX_PAGES: usize = 10_000;

/// Query of one list page.
pub(crate) fn list_query(prefix: Option<&str>, token: Option<&str>) -> Vec<(&'static str, String)> {
    let mut q = vec![("max_results", LIST_PAGE_SIZE.to_string())];
    if let Some(p) = prefix.filter(|p| !p.is_empty()) {
        q.push(("prefix", p.to_string()));
    }
    if let Some(t) = token.filter(|t| !t.is_empty()) {
        q.push(("continuation_token", t.to_string()));
    }
    q
}

pub(crate) fn decode<T: DeserializeOwned>(url: &url::Url, body: &[u8]) -> Result<T, Error> {
    serde_json::from_slice(body).map_err(|e| Error::Decode {
        url: url_for_log(url),
        message: format!("bad JSON: {e}"),
    })
}

pub(crate) fn json_body<T: serde::Serialize>(value: &T) -> Result<Body, Error> {
    serde_json::to_vec(value)
        .map(Body::Json)
        .map_err(|e| Error::InvalidRequest(format!("cannot encode body: {e}")))
}

impl SpritesClient {
    /// `POST /v1/sprites`. A name that is taken gives [`Error::AlreadyExists`]; retried only on
    /// errors that prove nothing was created.
    pub async fn create_sprite(&self, request: &CreateSprite) -> Result<Sprite, Error> {
        let url = self.url(&["sprites"]);
        let body = self
            .call(Call {
                method: Method::POST,
                url: url.clone(),
                body: json_body(request)?,
                timeout: self
                    .inner
                    .timeouts
                    .request
                    .max(std::time::Duration::from_secs(120)),
                idempotency: Idempotency::OnlyIfNothingDone,
                create_name: Some(request.name.clone()),
            })
            .await?;
        decode(&url, &body)
    }

    /// `GET /v1/sprites/{name}`.
    pub async fn get_sprite(&self, name: &str) -> Result<Sprite, Error> {
        let url = self.url(&["sprites", name]);
        let body = self.get(url.clone()).await?;
        decode(&url, &body)
    }

    /// One page of `GET /v1/sprites`.
    pub async fn list_sprites_page(
        &self,
        prefix: Option<&str>,
        continuation_token: Option<&str>,
    ) -> Result<SpritePage, Error> {
        let mut url = self.url(&["sprites"]);
        url.query_pairs_mut()
            .extend_pairs(list_query(prefix, continuation_token));
        let body = self.get(url.clone()).await?;
        decode(&url, &body)
    }

    /// Every sprite (optionally with a name prefix), following continuation tokens.
    pub async fn list_sprites(&self, prefix: Option<&str>) -> Result<Vec<Sprite>, Error> {
        let mut all = Vec::new();
        let mut token: Option<String> = None;
        for _ in 0..MAX_PAGES {
            let page = self.list_sprites_page(prefix, token.as_deref()).await?;
            all.extend(page.sprites);
            match page
                .next_continuation_token
                .filter(|t| page.has_more && !t.is_empty())
            {
                Some(next) => token = Some(next),
                None => return Ok(all),
            }
        }
        Err(Error::Decode {
            url: url_for_log(&self.url(&["sprites"])),
            message: "too many pages".into(),
        })
    }

    /// `PUT /v1/sprites/{name}` replacing the labels.
    pub async fn update_labels(&self, name: &str, labels: Vec<String>) -> Result<Sprite, Error> {
        let update = UpdateSprite {
            labels: Some(labels),
            ..Default::default()
        };
        self.update_sprite(name, &update).await
    }

    /// `PUT /v1/sprites/{name}`.
    pub async fn update_sprite(&self, name: &str, update: &UpdateSprite) -> Result<Sprite, Error> {
        let url = self.url(&["sprites", name]);
        let body = self
            .call(Call {
                method: Method::PUT,
                url: url.clone(),
                body: json_body(update)?,
                timeout: self.inner.timeouts.request,
                idempotency: Idempotency::Idempotent,
                create_name: None,
            })
            .await?;
        // The Go SDK ignores this body; fall back to a get when a server sends none.
        match decode(&url, &body) {
            Ok(sprite) => Ok(sprite),
            Err(_) => self.get_sprite(name).await,
        }
    }

    /// `DELETE /v1/sprites/{name}`; 404 gives [`Error::NotFound`].
    pub async fn delete_sprite(&self, name: &str) -> Result<(), Error> {
        self.delete(self.url(&["sprites", name])).await
    }

    /// A DELETE with no body; deleting is idempotent, so it may be retried.
    pub(crate) async fn delete(&self, url: url::Url) -> Result<(), Error> {
        self.call(Call {
            method: Method::DELETE,
            url,
            body: Body::Empty,
            timeout: self.inner.timeouts.request,
            idempotency: Idempotency::Idempotent,
            create_name: None,
        })
        .await
        .map(drop)
    }

    pub(crate) async fn get(&self, url: url::Url) -> Result<bytes::Bytes, Error> {
        self.call(Call {
            method: Method::GET,
            url,
            body: Body::Empty,
            timeout: self.inner.timeouts.request,
            idempotency: Idempotency::Idempotent,
            create_name: None,
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_query_golden() {
        assert_eq!(list_query(None, None), vec![("max_results", "50".to_string())]);
        assert_eq!(
            list_query(Some("ns-"), Some("tok")),
            vec![
                ("max_results", "50".to_string()),
                ("prefix", "ns-".to_string()),
                ("continuation_token", "tok".to_string())
            ]
        );
        assert_eq!(list_query(Some(""), Some("")).len(), 1);
    }
}
