//! Wire types of the Sprites.dev API, shared by the client and the simulator so that both speak
//! one shape. Field names follow docs/sprites-api.md.

use serde::{Deserialize, Serialize};

/// Machine size and placement, as `config` in create and in the sprite object.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpriteConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ram_mb: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_gb: Option<u32>,
}

impl SpriteConfig {
    fn is_empty(&self) -> bool {
        self == &SpriteConfig::default()
    }
}

/// Body of `POST /v1/sprites`: only the fields the Go SDK sends.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateSprite {
    pub name: String,
    #[serde(default, skip_serializing_if = "SpriteConfig::is_empty")]
    pub config: SpriteConfig,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UrlSettings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_access: Option<bool>,
}

/// The sprite object. Everything but `name` is optional on the wire: list entries may be sparse.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Sprite {
    #[serde(default)]
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub organization: String,
    /// `running`, `warm` or `cold`.
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub config: SpriteConfig,
    #[serde(default)]
    pub environment: std::collections::BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<String>,
    #[serde(default)]
    pub url: String,
    #[serde(default)]
    pub url_settings: UrlSettings,
    #[serde(default, deserialize_with = "null_as_empty")]
    pub labels: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_running_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_warming_at: Option<String>,
}

fn null_as_empty<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    Ok(Option::<Vec<String>>::deserialize(d)?.unwrap_or_default())
}

/// One page of `GET /v1/sprites`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SpritePage {
    #[serde(default)]
    pub sprites: Vec<Sprite>,
    #[serde(default)]
    pub has_more: bool,
    #[serde(default)]
    pub next_continuation_token: Option<String>,
}

/// Body of `PUT /v1/sprites/{name}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateSprite {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_settings: Option<UrlSettings>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clear_labels: Option<bool>,
}

/// An exec session as `GET /v1/sprites/{name}/exec` lists it. `id` may be a number or a string on
/// the wire; it is kept as a string.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Session {
    #[serde(deserialize_with = "string_or_number")]
    pub id: String,
    #[serde(default)]
    pub command: String,
    #[serde(default)]
    pub workdir: String,
    #[serde(default)]
    pub created: Option<String>,
    #[serde(default)]
    pub bytes_per_second: f64,
    #[serde(default)]
    pub is_active: bool,
    #[serde(default)]
    pub last_activity: Option<String>,
    #[serde(default)]
    pub tty: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SessionList {
    #[serde(default)]
    pub sessions: Vec<Session>,
}

pub(crate) fn string_or_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    match serde_json::Value::deserialize(d)? {
        serde_json::Value::String(s) => Ok(s),
        serde_json::Value::Number(n) => Ok(n.to_string()),
        other => Err(serde::de::Error::custom(format!(
            "expected a string or number, got {other}"
        ))),
    }
}

/// A checkpoint as the bare JSON array of `GET .../checkpoints` lists it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub id: String,
    #[serde(default)]
    pub create_time: String,
    #[serde(default)]
    pub comment: String,
    #[serde(default)]
    pub is_auto: bool,
    #[serde(default, deserialize_with = "null_as_empty")]
    pub history: Vec<String>,
}

/// One NDJSON line of a checkpoint or restore stream.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StreamMessage {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
}

/// One entry of `GET .../fs/list`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsEntry {
    pub name: String,
    pub path: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub size: u64,
    /// Octal string such as `0644`.
    #[serde(default)]
    pub mode: String,
    #[serde(rename = "modTime", default)]
    pub mod_time: String,
    #[serde(rename = "isDir", default)]
    pub is_dir: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsList {
    #[serde(default)]
    pub path: String,
    #[serde(default)]
    pub entries: Vec<FsEntry>,
    #[serde(default)]
    pub count: usize,
}

/// What a finished command left behind.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecOutput {
    /// 0–255: the wire carries one byte.
    pub exit_code: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// Output beyond the request's cap was dropped.
    pub truncated: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_body_omits_empty_parts() {
        let body = CreateSprite {
            name: "a".into(),
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_string(&body).ok().as_deref(),
            Some(r#"{"name":"a"}"#)
        );
    }

    #[test]
    fn sparse_sprite_and_null_labels_decode() {
        let s: Sprite = serde_json::from_str(r#"{"name":"a","labels":null}"#).expect("decodes");
        assert!(s.labels.is_empty());
        assert_eq!(s.status, "");
    }

    #[test]
    fn session_id_may_be_a_number() {
        let s: Session = serde_json::from_str(r#"{"id":42}"#).expect("decodes");
        assert_eq!(s.id, "42");
        let s: Session = serde_json::from_str(r#"{"id":"7"}"#).expect("decodes");
        assert_eq!(s.id, "7");
    }
}
