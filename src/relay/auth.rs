//! Who is connecting: the token from the request (subprotocol, bearer header,
//! or, behind a flag, the query), then either a gateway token compared by
//! SHA-256 with `User.status.gatewayTokenSha256`, or a JWT whose `sub` names
//! a User's `spec.subject`. Every check here happens before any upstream work.

use std::path::Path;
use std::sync::Arc;

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::error::Error;
use crate::api::User;
use crate::api::conditions::is_true;

/// The subprotocol browsers offer next to their token and the relay answers.
pub const SUBPROTOCOL: &str = "sprite-relay.v1";
/// Condition the User reconciler sets when several Users share a subject.
pub const DUPLICATE_SUBJECT: &str = "DuplicateSubject";

/// Longest token accepted; anything longer is refused without parsing (a
/// JWT with a few claims is well under 2 KiB).
const MAX_TOKEN_LEN: usize = 8 * 1024;
/// Shortest gateway token: 128 bits as hex is 32 characters, as base64url 22.
const MIN_GATEWAY_TOKEN_LEN: usize = 22;

/// Where the client put its token; browsers can only use the subprotocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenSource {
    Subprotocol,
    Header,
    Query,
}

impl TokenSource {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenSource::Subprotocol => "subprotocol",
            TokenSource::Header => "header",
            TokenSource::Query => "query",
        }
    }
}

/// What a request carries, before any check. Its Debug hides the token.
pub struct Credentials<'a> {
    pub token: &'a str,
    pub source: TokenSource,
}

impl std::fmt::Debug for Credentials<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("token", &"<redacted>")
            .field("source", &self.source)
            .finish()
    }
}

/// Picks the token out of a request. `offered` are the subprotocols the
/// client offered. Exactly one token must be presented: two (say a
/// subprotocol and a header) are refused rather than guessed between.
pub fn credentials<'a>(
    offered: &[&'a str],
    authorization: Option<&'a str>,
    query_token: Option<&'a str>,
    allow_query: bool,
) -> Result<Credentials<'a>, Error> {
    let mut found: Vec<Credentials<'a>> = vec![];
    if offered.contains(&SUBPROTOCOL) {
        let others: Vec<&str> = offered.iter().copied().filter(|p| *p != SUBPROTOCOL).collect();
        match others.as_slice() {
            [token] => found.push(Credentials {
                token,
                source: TokenSource::Subprotocol,
            }),
            [] => {}
            _ => return Err(Error::Unauthorized("more than one token offered")),
        }
    }
    if let Some(h) = authorization {
        let token = h
            .strip_prefix("Bearer ")
            .or_else(|| h.strip_prefix("bearer "))
            .ok_or(Error::Unauthorized("authorization is not a bearer token"))?;
        found.push(Credentials {
            token: token.trim(),
            source: TokenSource::Header,
        });
    }
    if let Some(t) = query_token {
        if !allow_query {
            return Err(Error::Unauthorized("token in the query is not allowed"));
        }
        found.push(Credentials {
            token: t,
            source: TokenSource::Query,
        });
    }
    match found.len() {
        0 => Err(Error::Unauthorized("no token")),
        1 => Ok(found.pop().expect("one")),
        _ => Err(Error::Unauthorized("more than one token presented")),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenKind {
    /// A per-user random token (hex or base64url without padding).
    Gateway,
    /// Three base64url segments joined by dots.
    Jwt,
}

fn is_b64url(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Tells a gateway token from a JWT by shape alone, refusing anything else
/// (padding, spaces, other characters) so that junk never reaches a parser.
pub fn classify(token: &str) -> Result<TokenKind, Error> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(Error::Unauthorized("token too long"));
    }
    let parts: Vec<&str> = token.split('.').collect();
    match parts.as_slice() {
        [one] if one.len() >= MIN_GATEWAY_TOKEN_LEN && is_b64url(one) => Ok(TokenKind::Gateway),
        [h, p, s] if is_b64url(h) && is_b64url(p) && is_b64url(s) => Ok(TokenKind::Jwt),
        // `alg: none` tokens end with an empty signature: refused here already.
        _ => Err(Error::Unauthorized("malformed token")),
    }
}

/// SHA-256 of a gateway token's characters, lowercase hex: what the User
/// reconciler writes into `status.gatewayTokenSha256`.
pub fn gateway_token_sha256(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Constant-time comparison of a token's digest with a stored hex digest. An
/// unparsable stored value never matches.
pub fn digest_matches(digest: &[u8; 32], stored_hex: &str) -> bool {
    let mut stored = [0u8; 32];
    if hex::decode_to_slice(stored_hex.trim(), &mut stored).is_err() {
        return false;
    }
    digest.ct_eq(&stored).into()
}

/// The User a gateway token belongs to. Every User's digest is compared (no
/// early exit), so timing says nothing about which one matched.
pub fn user_by_gateway_token(token: &str, users: &[Arc<User>]) -> Result<Arc<User>, Error> {
    let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
    let mut found: Option<Arc<User>> = None;
    let mut matches = 0usize;
    for u in users {
        let stored = u
            .status
            .as_ref()
            .and_then(|s| s.gateway_token_sha256.as_deref())
            .unwrap_or("");
        if digest_matches(&digest, stored) {
            matches += 1;
            found = Some(u.clone());
        }
    }
    match (matches, found) {
        (1, Some(u)) => Ok(u),
        (0, _) => Err(Error::Unauthorized("unknown token")),
        // Only a reused token could do this: refuse rather than pick one.
        _ => Err(Error::Forbidden("token matches several users")),
    }
}

/// The User whose `spec.subject` is `sub`. A subject held by several Users
/// (anywhere the relay watches) is refused: the relay cannot tell whose
/// Sprites the token may reach.
pub fn user_by_subject(sub: &str, users: &[Arc<User>]) -> Result<Arc<User>, Error> {
    let mut hits = users.iter().filter(|u| u.spec.subject == sub);
    let first = hits.next().ok_or(Error::Forbidden("no user has this subject"))?;
    if hits.next().is_some() {
        return Err(Error::Forbidden("subject shared by several users"));
    }
    Ok(first.clone())
}

/// Whether a User may keep a session: checked at connect and again while
/// the session lives (a User suspended or out of budget meanwhile loses it).
pub fn may_have_session(user: &User) -> Result<(), Error> {
    if user.spec.suspend {
        return Err(Error::Forbidden("user suspended"));
    }
    // A session keeps the VM awake, which is billed: a User whose month's
    // budget is spent gets none (decision 9).
    if user.status.as_ref().and_then(|s| s.phase) == Some(crate::api::user::UserPhase::OverBudget) {
        return Err(Error::Forbidden("user over budget"));
    }
    Ok(())
}

/// Checks that apply to a User however it authenticated.
pub fn check_user(user: &User, users: &[Arc<User>]) -> Result<(), Error> {
    may_have_session(user)?;
    let conditions = user
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or(&[]);
    let shared = users
        .iter()
        .filter(|u| u.spec.subject == user.spec.subject)
        .count()
        > 1;
    if shared || is_true(conditions, DUPLICATE_SUBJECT) {
        return Err(Error::Forbidden("subject shared by several users"));
    }
    Ok(())
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
}

/// A verification key and the one algorithm it may be used with: the
/// allow-list that stops key confusion (an HMAC token "signed" with an RSA
/// public key never meets the RSA key, because HS256 only looks at the
/// configured shared secret).
struct Key {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
}

/// JWT verification settings: keys, and optional issuer and audience.
pub struct JwtVerifier {
    keys: Vec<Key>,
    issuer: Option<String>,
    audience: Option<String>,
    leeway_secs: u64,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let algs: Vec<_> = self.keys.iter().map(|k| (k.kid.clone(), k.alg)).collect();
        f.debug_struct("JwtVerifier")
            .field("keys", &algs)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .finish()
    }
}

impl JwtVerifier {
    /// No keys: every JWT is refused.
    pub fn none() -> Self {
        Self {
            keys: vec![],
            issuer: None,
            audience: None,
            leeway_secs: 30,
        }
    }

    /// An HS256 shared secret. Short secrets are refused: HS256 with a
    /// guessable secret is a forgeable token.
    pub fn with_hs256_secret(mut self, secret: &[u8]) -> Result<Self, Error> {
        if secret.len() < 32 {
            return Err(Error::Config("the HS256 secret must be at least 32 bytes".into()));
        }
        self.keys.push(Key {
            kid: None,
            alg: Algorithm::HS256,
            key: DecodingKey::from_secret(secret),
        });
        Ok(self)
    }

    /// RSA keys (RS256) and P-256 keys (ES256) from a JWKS document; other
    /// key types, and keys whose `alg` says otherwise, are skipped.
    pub fn with_jwks(mut self, jwks_json: &str) -> Result<Self, Error> {
        let set: JwkSet = serde_json::from_str(jwks_json).map_err(|e| Error::Config(format!("JWKS: {e}")))?;
        let mut used = 0;
        for jwk in &set.keys {
            let alg = match (&jwk.algorithm, jwk.common.key_algorithm) {
                (AlgorithmParameters::RSA(_), None | Some(KeyAlgorithm::RS256)) => Algorithm::RS256,
                (AlgorithmParameters::EllipticCurve(ec), None | Some(KeyAlgorithm::ES256))
                    if ec.curve == EllipticCurve::P256 =>
                {
                    Algorithm::ES256
                }
                _ => {
                    tracing::warn!(kid = ?jwk.common.key_id, "JWKS key skipped: only RS256 and ES256 (P-256) keys are used");
                    continue;
                }
            };
            let key = DecodingKey::from_jwk(jwk).map_err(|e| Error::Config(format!("JWKS key: {e}")))?;
            self.keys.push(Key {
                kid: jwk.common.key_id.clone(),
                alg,
                key,
            });
            used += 1;
        }
        if used == 0 {
            return Err(Error::Config("JWKS has no usable RS256 or ES256 key".into()));
        }
        Ok(self)
    }

    pub fn with_issuer(mut self, issuer: Option<String>) -> Self {
        self.issuer = issuer;
        self
    }

    pub fn with_audience(mut self, audience: Option<String>) -> Self {
        self.audience = audience;
        self
    }

    /// Reads the secret and JWKS files named on the command line.
    pub fn from_files(hs256_secret: Option<&Path>, jwks: Option<&Path>) -> Result<Self, Error> {
        let mut v = Self::none();
        if let Some(p) = hs256_secret {
            let secret = std::fs::read(p).map_err(|e| Error::Config(format!("{}: {e}", p.display())))?;
            // A trailing newline from `echo > file` is not part of the secret.
            let secret = secret.trim_ascii_end();
            v = v.with_hs256_secret(secret)?;
        }
        if let Some(p) = jwks {
            let text =
                std::fs::read_to_string(p).map_err(|e| Error::Config(format!("{}: {e}", p.display())))?;
            v = v.with_jwks(&text)?;
        }
        Ok(v)
    }

    /// Verifies signature, `exp` (required), `nbf` (when present), issuer
    /// and audience (when configured), and returns `sub`.
    pub fn verify(&self, token: &str) -> Result<String, Error> {
        let bad = Error::Unauthorized("invalid token");
        // `alg` values outside the library's enum, `none` among them, fail here.
        let header = jsonwebtoken::decode_header(token).map_err(|_| Error::Unauthorized("invalid token"))?;
        let candidates = self.keys.iter().filter(|k| {
            k.alg == header.alg && (header.kid.is_none() || k.kid.is_none() || k.kid == header.kid)
        });
        let mut validation = Validation::new(header.alg);
        validation.algorithms = vec![header.alg];
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = self.leeway_secs;
        match &self.audience {
            Some(a) => validation.set_audience(&[a]),
            None => validation.validate_aud = false,
        }
        if let Some(i) = &self.issuer {
            validation.set_issuer(&[i]);
        }
        let mut last = bad;
        for k in candidates {
            match jsonwebtoken::decode::<Claims>(token, &k.key, &validation) {
                Ok(data) => return Ok(data.claims.sub),
                Err(e) => {
                    last = match e.kind() {
                        jsonwebtoken::errors::ErrorKind::ExpiredSignature => {
                            Error::Unauthorized("token expired")
                        }
                        jsonwebtoken::errors::ErrorKind::ImmatureSignature => {
                            Error::Unauthorized("token not yet valid")
                        }
                        _ => Error::Unauthorized("invalid token"),
                    }
                }
            }
        }
        Err(last)
    }
}

/// Turns a presented token into the User it authenticates, refusing
/// suspended Users and shared subjects.
pub fn authenticate(token: &str, jwt: &JwtVerifier, users: &[Arc<User>]) -> Result<Arc<User>, Error> {
    let user = match classify(token)? {
        TokenKind::Gateway => user_by_gateway_token(token, users)?,
        TokenKind::Jwt => {
            let sub = jwt.verify(token)?;
            user_by_subject(&sub, users)?
        }
    };
    check_user(&user, users)?;
    Ok(user)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use base64::Engine;
    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::json;

    pub const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef-test-secret";

    pub fn user(ns: &str, name: &str, subject: &str, token: Option<&str>) -> Arc<User> {
        let mut v = json!({
            "apiVersion": "sprite-operator.dev/v1alpha1", "kind": "User",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"email": "a@b.cd", "subject": subject, "tier": "free"},
        });
        if let Some(t) = token {
            v["status"] = json!({"gatewayTokenSha256": gateway_token_sha256(t)});
        }
        Arc::new(serde_json::from_value(v).unwrap())
    }

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    fn hs(claims: serde_json::Value, secret: &[u8]) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret),
        )
        .unwrap()
    }

    fn b64(v: &[u8]) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v)
    }

    /// An ES256 key made at test time and its JWKS.
    fn es256(kid: &str) -> (EncodingKey, String) {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let raw = kp.public_key_raw();
        assert_eq!(raw[0], 4, "uncompressed point");
        let (x, y) = raw[1..].split_at(32);
        let jwks = json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": kid, "use": "sig",
            "x": b64(x), "y": b64(y)}]});
        let enc = EncodingKey::from_ec_pem(kp.serialize_pem().as_bytes()).unwrap();
        (enc, jwks.to_string())
    }

    #[test]
    fn token_sources() {
        let c = credentials(&[SUBPROTOCOL, "abc"], None, None, false).unwrap();
        assert_eq!((c.token, c.source), ("abc", TokenSource::Subprotocol));
        let c = credentials(&[], Some("Bearer xyz"), None, false).unwrap();
        assert_eq!((c.token, c.source), ("xyz", TokenSource::Header));
        assert!(
            credentials(&[], None, Some("q"), false).is_err(),
            "query needs the flag"
        );
        let c = credentials(&[], None, Some("q"), true).unwrap();
        assert_eq!(c.source, TokenSource::Query);
        assert!(credentials(&[], None, None, true).is_err());
        assert!(credentials(&[SUBPROTOCOL], None, None, true).is_err());
        assert!(credentials(&[SUBPROTOCOL, "a", "b"], None, None, true).is_err());
        assert!(credentials(&[SUBPROTOCOL, "a"], Some("Bearer b"), None, true).is_err());
        assert!(credentials(&[], Some("Basic abc"), None, true).is_err());
        // The token offered without our subprotocol is not taken as a token.
        assert!(credentials(&["abc"], None, None, false).is_err());
        let debug = format!(
            "{:?}",
            credentials(&[], Some("Bearer secret"), None, false).unwrap()
        );
        assert!(!debug.contains("secret"), "{debug}");
    }

    #[test]
    fn token_shapes() {
        assert_eq!(classify(&"ab".repeat(16)).unwrap(), TokenKind::Gateway);
        assert_eq!(classify("AbC-_0123456789abcdefgh").unwrap(), TokenKind::Gateway);
        assert_eq!(classify("a.b.c").unwrap(), TokenKind::Jwt);
        assert!(classify("short").is_err());
        assert!(classify("abcdefghijklmnopqrstuvw=").is_err(), "padding");
        assert!(classify("a.b.").is_err(), "unsigned JWT");
        assert!(classify("a.b").is_err());
        assert!(classify(&"a".repeat(MAX_TOKEN_LEN + 1)).is_err());
    }

    #[test]
    fn gateway_hash_compare() {
        let t = "9f86d081884c7d659a2feaa0c55ad015";
        let d: [u8; 32] = Sha256::digest(t.as_bytes()).into();
        assert!(digest_matches(&d, &gateway_token_sha256(t)));
        assert!(digest_matches(&d, &gateway_token_sha256(t).to_uppercase()));
        assert!(!digest_matches(
            &d,
            &gateway_token_sha256("other-token-of-some-length")
        ));
        assert!(!digest_matches(&d, ""));
        assert!(!digest_matches(&d, "zz"));
        // Known vector: SHA-256("abc").
        assert_eq!(
            gateway_token_sha256("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn gateway_token_finds_its_user() {
        let ta = "a".repeat(32);
        let tb = "b".repeat(32);
        let users = vec![
            user("ns", "alice", "s-a", Some(&ta)),
            user("ns", "bob", "s-b", Some(&tb)),
            user("ns", "carol", "s-c", None),
        ];
        let v = JwtVerifier::none();
        assert_eq!(
            authenticate(&ta, &v, &users).unwrap().metadata.name.as_deref(),
            Some("alice")
        );
        assert_eq!(
            authenticate(&tb, &v, &users).unwrap().metadata.name.as_deref(),
            Some("bob")
        );
        assert!(matches!(
            authenticate(&"c".repeat(32), &v, &users),
            Err(Error::Unauthorized(_))
        ));
    }

    #[test]
    fn shared_subject_and_suspension_are_forbidden() {
        let ta = "a".repeat(32);
        let users = vec![
            user("ns", "alice", "dup", Some(&ta)),
            user("other", "alice2", "dup", None),
        ];
        let v = JwtVerifier::none().with_hs256_secret(SECRET).unwrap();
        assert!(matches!(authenticate(&ta, &v, &users), Err(Error::Forbidden(_))));
        let jwt = hs(json!({"sub": "dup", "exp": now() + 600}), SECRET);
        assert!(matches!(authenticate(&jwt, &v, &users), Err(Error::Forbidden(_))));

        let mut u: User = (*user("ns", "s", "x", Some(&ta))).clone();
        u.spec.suspend = true;
        assert!(matches!(
            authenticate(&ta, &v, &[Arc::new(u)]),
            Err(Error::Forbidden(_))
        ));

        // The reconciler's condition alone is enough.
        let mut u: User = (*user("ns", "d", "y", Some(&ta))).clone();
        u.status.as_mut().unwrap().conditions.push(
            serde_json::from_value(json!({
            "type": DUPLICATE_SUBJECT, "status": "True", "reason": "Shared", "message": "",
            "lastTransitionTime": "2025-01-01T00:00:00Z"}))
            .unwrap(),
        );
        assert!(matches!(
            authenticate(&ta, &v, &[Arc::new(u)]),
            Err(Error::Forbidden(_))
        ));

        // A spent budget: refused, as a session would keep the VM awake.
        let mut u: User = (*user("ns", "b", "z", Some(&ta))).clone();
        u.status.as_mut().unwrap().phase = Some(crate::api::user::UserPhase::OverBudget);
        assert!(matches!(
            authenticate(&ta, &v, &[Arc::new(u.clone())]),
            Err(Error::Forbidden("user over budget"))
        ));
        u.status.as_mut().unwrap().phase = Some(crate::api::user::UserPhase::Active);
        assert!(authenticate(&ta, &v, &[Arc::new(u)]).is_ok());
    }

    #[test]
    fn jwt_matrix() {
        let (es_key, jwks) = es256("k1");
        let v = JwtVerifier::none()
            .with_hs256_secret(SECRET)
            .unwrap()
            .with_jwks(&jwks)
            .unwrap();
        let users = vec![
            user("ns", "alice", "sub-alice", None),
            user("ns", "bob", "sub-bob", None),
        ];
        let name = |r: Result<Arc<User>, Error>| r.map(|u| u.metadata.name.clone().unwrap());

        // Good HS256 and ES256 tokens.
        let good = hs(json!({"sub": "sub-alice", "exp": now() + 600}), SECRET);
        assert_eq!(name(authenticate(&good, &v, &users)).unwrap(), "alice");
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some("k1".into());
        let es = encode(&h, &json!({"sub": "sub-bob", "exp": now() + 600}), &es_key).unwrap();
        assert_eq!(name(authenticate(&es, &v, &users)).unwrap(), "bob");

        // Expired (beyond the leeway), not yet valid, no exp, unknown subject.
        let expired = hs(json!({"sub": "sub-alice", "exp": now() - 120}), SECRET);
        assert!(matches!(
            authenticate(&expired, &v, &users),
            Err(Error::Unauthorized("token expired"))
        ));
        let early = hs(
            json!({"sub": "sub-alice", "exp": now() + 600, "nbf": now() + 300}),
            SECRET,
        );
        assert!(matches!(
            authenticate(&early, &v, &users),
            Err(Error::Unauthorized(_))
        ));
        let no_exp = hs(json!({"sub": "sub-alice"}), SECRET);
        assert!(matches!(
            authenticate(&no_exp, &v, &users),
            Err(Error::Unauthorized(_))
        ));
        let stranger = hs(json!({"sub": "sub-mallory", "exp": now() + 600}), SECRET);
        assert!(matches!(
            authenticate(&stranger, &v, &users),
            Err(Error::Forbidden(_))
        ));

        // Wrong secret; tampered payload.
        let forged = hs(
            json!({"sub": "sub-alice", "exp": now() + 600}),
            b"another-secret-of-32-bytes-or-more!!",
        );
        assert!(matches!(
            authenticate(&forged, &v, &users),
            Err(Error::Unauthorized(_))
        ));
        let mut parts: Vec<String> = good.split('.').map(String::from).collect();
        parts[1] = b64(json!({"sub": "sub-bob", "exp": now() + 600})
            .to_string()
            .as_bytes());
        assert!(authenticate(&parts.join("."), &v, &users).is_err());

        // alg=none, with and without a signature segment.
        let none_header = b64(br#"{"alg":"none","typ":"JWT"}"#);
        let claims = b64(json!({"sub": "sub-alice", "exp": now() + 600})
            .to_string()
            .as_bytes());
        assert!(authenticate(&format!("{none_header}.{claims}."), &v, &users).is_err());
        assert!(authenticate(&format!("{none_header}.{claims}.AAAA"), &v, &users).is_err());

        // ES256 token with a kid the JWKS does not have, and an ES256 token
        // when only HS256 is configured.
        h.kid = Some("k2".into());
        let wrong_kid = encode(&h, &json!({"sub": "sub-bob", "exp": now() + 600}), &es_key).unwrap();
        assert!(authenticate(&wrong_kid, &v, &users).is_err());
        let hs_only = JwtVerifier::none().with_hs256_secret(SECRET).unwrap();
        assert!(authenticate(&es, &hs_only, &users).is_err());

        // Key confusion: HS256 "signed" with the public key's JWKS text (what
        // an attacker can read) is not accepted; nor is any HS256 token when
        // no shared secret is configured.
        let confused = hs(json!({"sub": "sub-alice", "exp": now() + 600}), jwks.as_bytes());
        assert!(authenticate(&confused, &v, &users).is_err());
        let jwks_only = JwtVerifier::none().with_jwks(&jwks).unwrap();
        assert!(authenticate(&confused, &jwks_only, &users).is_err());
        assert!(authenticate(&good, &jwks_only, &users).is_err());

        // No keys at all: every JWT refused.
        assert!(authenticate(&good, &JwtVerifier::none(), &users).is_err());
    }

    fn fixture(name: &str) -> String {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/relay")
            .join(name);
        std::fs::read_to_string(p).unwrap()
    }

    #[test]
    fn rs256_and_rsa_key_confusion() {
        let v = JwtVerifier::none()
            .with_hs256_secret(SECRET)
            .unwrap()
            .with_jwks(&fixture("rsa-test-jwks.json"))
            .unwrap();
        let key = EncodingKey::from_rsa_pem(fixture("rsa-test-key.pem").as_bytes()).unwrap();
        let claims = json!({"sub": "s", "exp": now() + 600});
        let mut h = Header::new(Algorithm::RS256);
        h.kid = Some("test-rsa".into());
        assert_eq!(v.verify(&encode(&h, &claims, &key).unwrap()).unwrap(), "s");
        // No kid: the RSA keys of the set are tried.
        assert_eq!(
            v.verify(&encode(&Header::new(Algorithm::RS256), &claims, &key).unwrap())
                .unwrap(),
            "s"
        );
        // RS384 is not on the allow-list even with the right key.
        let mut h384 = Header::new(Algorithm::RS384);
        h384.kid = Some("test-rsa".into());
        assert!(v.verify(&encode(&h384, &claims, &key).unwrap()).is_err());
        // The classic confusion: HS256 keyed with the public key PEM, with
        // and without the RSA key's kid.
        let public = fixture("rsa-test-pub.pem");
        let mut hh = Header::new(Algorithm::HS256);
        assert!(
            v.verify(&encode(&hh, &claims, &EncodingKey::from_secret(public.as_bytes())).unwrap())
                .is_err()
        );
        hh.kid = Some("test-rsa".into());
        assert!(
            v.verify(&encode(&hh, &claims, &EncodingKey::from_secret(public.as_bytes())).unwrap())
                .is_err()
        );
    }

    #[test]
    fn issuer_and_audience_when_configured() {
        let v = JwtVerifier::none()
            .with_hs256_secret(SECRET)
            .unwrap()
            .with_issuer(Some("https://idp".into()))
            .with_audience(Some("relay".into()));
        let ok = hs(
            json!({"sub": "s", "exp": now() + 60, "iss": "https://idp", "aud": "relay"}),
            SECRET,
        );
        assert_eq!(v.verify(&ok).unwrap(), "s");
        let wrong_aud = hs(
            json!({"sub": "s", "exp": now() + 60, "iss": "https://idp", "aud": "x"}),
            SECRET,
        );
        assert!(v.verify(&wrong_aud).is_err());
        let wrong_iss = hs(
            json!({"sub": "s", "exp": now() + 60, "iss": "https://evil", "aud": "relay"}),
            SECRET,
        );
        assert!(v.verify(&wrong_iss).is_err());
    }

    #[test]
    fn weak_or_empty_keys_are_refused_at_start() {
        assert!(JwtVerifier::none().with_hs256_secret(b"short").is_err());
        assert!(JwtVerifier::none().with_jwks(r#"{"keys": []}"#).is_err());
        assert!(JwtVerifier::none().with_jwks("not json").is_err());
        let oct = r#"{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}"#;
        assert!(
            JwtVerifier::none().with_jwks(oct).is_err(),
            "symmetric keys in a JWKS are not used"
        );
    }
}
