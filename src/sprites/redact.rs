//! Keeping the API token and query strings out of Debug output, logs and errors.

use std::fmt;

/// The bearer token. Its `Debug` and `Display` never show the value, so it can sit inside structs
/// that derive `Debug` without leaking into logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The raw value, for the `Authorization` header only.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// `Bearer <token>` as a header value marked sensitive (hyper and reqwest then omit it from
    /// their own Debug output).
    pub fn header_value(&self) -> Result<http::HeaderValue, http::header::InvalidHeaderValue> {
        let mut value = http::HeaderValue::from_str(&format!("Bearer {}", self.0))?;
        value.set_sensitive(true);
        Ok(value)
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A URL fit for logs and errors: scheme, host, port and path only. Exec passes the command's
/// environment in the query string, and credentials could sit in the userinfo part.
pub fn url_for_log(url: &url::Url) -> String {
    let mut clean = url.clone();
    clean.set_query(None);
    clean.set_fragment(None);
    // Both calls only fail for URLs that cannot have credentials, which then have none to strip.
    let _ = clean.set_username("");
    let _ = clean.set_password(None);
    clean.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_is_hidden_in_debug_and_display() {
        let token = Token::new("s3cr3t-value");
        assert!(!format!("{token:?}").contains("s3cr3t"));
        assert!(!format!("{token}").contains("s3cr3t"));
        assert_eq!(token.expose(), "s3cr3t-value");
        assert!(token.header_value().is_ok_and(|v| v.is_sensitive()));
    }

    #[test]
    fn query_userinfo_and_fragment_are_stripped() {
        let url = url::Url::parse("wss://u:p@api.example:8443/v1/sprites/a/exec?cmd=sh&env=KEY%3Dv#x")
            .expect("valid url");
        assert_eq!(url_for_log(&url), "wss://api.example:8443/v1/sprites/a/exec");
    }
}
