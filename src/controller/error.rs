//! The reconcilers' one error type. Each variant maps to a condition reason,
//! a metric label and a retry policy: transient errors back off and retry,
//! permanent ones wait for a change to the object.

use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("Sprites.dev API: {0}")]
    Sprites(#[from] crate::sprites::Error),
    #[error("command {step} exited {code}: {stderr}")]
    Command { step: String, code: i32, stderr: String },
    #[error("invalid spec: {0}")]
    InvalidSpec(String),
    #[error("runtime source: {0}")]
    Runtime(String),
    #[error("secret {0}")]
    Secret(String),
    /// A Sprite named a Secret it may not read (docs/tenancy.md).
    #[error("secret {name} may not be used by a Sprite: {why}")]
    SecretRefused { name: String, why: String },
}

impl Error {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Sprites(e) => e.metric_label(),
            Error::Command { .. } => "command_failed",
            Error::InvalidSpec(_) => "invalid_spec",
            Error::Runtime(_) => "runtime_source",
            Error::Secret(_) => "secret",
            Error::SecretRefused { .. } => "secret_refused",
        }
    }

    /// Condition reason for this error (CamelCase, stable).
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Kube(_) => "KubernetesError",
            Error::Sprites(crate::sprites::Error::Unauthorized { .. }) => "Unauthorized",
            Error::Sprites(crate::sprites::Error::RateLimited { .. }) => "RateLimited",
            Error::Sprites(_) => "SpritesApiError",
            Error::Command { .. } => "CommandFailed",
            Error::InvalidSpec(_) => "InvalidSpec",
            Error::Runtime(_) => "RuntimeUnavailable",
            Error::Secret(_) => "SecretUnavailable",
            Error::SecretRefused { .. } => "SecretRefused",
        }
    }

    /// Permanent errors need a change to the object (or its Secret or
    /// ConfigMap, which trigger a reconcile), not a hot retry.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            Error::InvalidSpec(_)
                | Error::SecretRefused { .. }
                | Error::Sprites(crate::sprites::Error::Unauthorized { .. })
                | Error::Sprites(crate::sprites::Error::InvalidRequest(_))
        )
    }

    /// How long to wait before retrying, given how many attempts failed in a
    /// row: exponential from 1 s, capped at 5 minutes, honouring Retry-After.
    pub fn backoff(&self, attempts: u32) -> Duration {
        if self.is_permanent() {
            return Duration::from_secs(300);
        }
        if let Error::Sprites(e) = self
            && let Some(after) = e.retry_after()
        {
            return after;
        }
        let exp = Duration::from_secs(1u64 << attempts.min(8));
        exp.min(Duration::from_secs(300))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let e = Error::Command {
            step: "pip".into(),
            code: 1,
            stderr: String::new(),
        };
        assert_eq!(e.backoff(0), Duration::from_secs(1));
        assert_eq!(e.backoff(3), Duration::from_secs(8));
        assert_eq!(e.backoff(30), Duration::from_secs(256));
        assert!(!e.is_permanent());
    }

    #[test]
    fn permanent_errors_do_not_retry_hot() {
        let e = Error::InvalidSpec("bad schedule".into());
        assert!(e.is_permanent());
        assert_eq!(e.backoff(0), Duration::from_secs(300));
        assert_eq!(e.reason(), "InvalidSpec");
    }
}
