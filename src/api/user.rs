//! The `User` resource: one person or tenant of the platform, with a plan.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::sprite::SpriteTemplateSpec;

/// A platform user: their plan, their primary Sprite and their gateway token.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "sprite-operator.dev",
    version = "v1alpha1",
    kind = "User",
    doc = "A platform user (or tenant): their tier, their primary Sprite, their gateway token and their usage.",
    plural = "users",
    shortname = "su",
    category = "sprite-operator",
    namespaced,
    status = "UserStatus",
    derive = "PartialEq",
    printcolumn = r#"{"name":"Tier","type":"string","jsonPath":".spec.tier"}"#,
    printcolumn = r#"{"name":"Sprites","type":"integer","jsonPath":".status.sprites"}"#,
    printcolumn = r#"{"name":"Usage","type":"string","jsonPath":".status.usage.estimatedCost","description":"Estimated cost this month in USD"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct UserSpec {
    /// Contact address, for the platform's own use.
    #[schemars(length(min = 3, max = 254), regex(pattern = r"^[^@\s]+@[^@\s]+\.[^@\s]+$"))]
    pub email: String,
    /// The identity provider's user id (a JWT's `sub`); the relay routes
    /// sessions of this subject to this User's Sprites.
    #[schemars(length(min = 1, max = 255))]
    pub subject: String,
    /// The plan; its limits come from the operator's tier configuration.
    pub tier: Tier,
    /// Template of the user's primary Sprite, created as `<user>-primary` and
    /// owned by this User. Template changes flow into that Sprite.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sprite: Option<SpriteTemplateSpec>,
    /// Suspend every Sprite of this User.
    #[serde(default)]
    pub suspend: bool,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    Free,
    Starter,
    Growth,
    Enterprise,
}

impl Tier {
    pub const ALL: [Tier; 4] = [Tier::Free, Tier::Starter, Tier::Growth, Tier::Enterprise];

    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Free => "free",
            Tier::Starter => "starter",
            Tier::Growth => "growth",
            Tier::Enterprise => "enterprise",
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum UserPhase {
    Pending,
    Active,
    Suspended,
    OverBudget,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UserStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<UserPhase>,
    /// Sprites that name this User in `userRef`.
    #[serde(default)]
    pub sprites: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// The month's usage per Sprite (by UID), kept when a Sprite is deleted:
    /// `usage` is its sum, so deleting a Sprite does not refund the budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ledger: Option<Ledger>,
    /// The Secret holding the user's gateway token (key `token`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway_secret_ref: Option<SecretRef>,
    /// SHA-256 (hex) of the gateway token: the relay compares hashes and never
    /// reads Secrets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway_token_sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Usage {
    /// Start of the current billing period (the month, in UTC).
    pub period_start: Time,
    /// Active VM seconds of this User's Sprites in the period.
    pub runtime_seconds: i64,
    /// Estimated cost in USD in the period, as a decimal string.
    pub estimated_cost: String,
}

/// Usage of the period per Sprite.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Ledger {
    pub period_start: Time,
    /// By Sprite UID.
    #[serde(default)]
    pub sprites: std::collections::BTreeMap<String, LedgerEntry>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LedgerEntry {
    /// The Sprite's name when last seen.
    pub name: String,
    pub runtime_seconds: i64,
    /// USD, as a decimal string.
    pub estimated_cost: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct SecretRef {
    pub name: String,
}
