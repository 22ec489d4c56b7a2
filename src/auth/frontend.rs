//! Frontend session tokens: JWTs signed by the identity provider. The key
//! fixes the algorithm family, so a token cannot pick a weaker check (no
//! `alg: none`, no HMAC with a public key as the secret).

use std::time::Duration;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

/// HMAC secrets shorter than this are refused at start-up (RFC 7518 3.2).
const MIN_SECRET_BYTES: usize = 32;

#[derive(Clone, Debug)]
pub struct FrontendConfig {
    /// An HMAC secret, or a PEM public key (RSA, EC P-256/P-384 or Ed25519).
    pub key: Vec<u8>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    /// Clock skew allowed on `exp` and `nbf`.
    pub leeway: Duration,
}

/// The claims a frontend caller is known by.
#[derive(Debug, Deserialize)]
pub struct Claims {
    /// Defaulted so that a missing sub is reported as such by the claim
    /// validation rather than as a decoding error.
    #[serde(default)]
    pub sub: String,
    #[serde(default)]
    pub org_id: Option<String>,
}

pub struct FrontendTokens {
    key: DecodingKey,
    validation: Validation,
}

impl FrontendTokens {
    pub fn new(config: &FrontendConfig) -> Result<FrontendTokens, String> {
        let key = decoding_key(&config.key)?;
        let mut validation = Validation::new_for_family(key.family());
        validation.leeway = config.leeway.as_secs();
        validation.validate_nbf = true;
        let mut required = vec!["exp", "sub"];
        if let Some(issuer) = &config.issuer {
            validation.set_issuer(&[issuer]);
            required.push("iss");
        }
        match &config.audience {
            Some(audience) => {
                validation.set_audience(&[audience]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        Ok(FrontendTokens { key, validation })
    }

    /// The claims of a valid token, or why it is not valid (safe to return
    /// to the caller: it never repeats the token).
    pub fn verify(&self, token: &str) -> Result<Claims, String> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map_err(|err| describe(err.kind()))?;
        if data.claims.sub.is_empty() {
            return Err("the sub claim is empty".into());
        }
        Ok(data.claims)
    }

    pub fn algorithms(&self) -> &[Algorithm] {
        &self.validation.algorithms
    }
}

fn decoding_key(key: &[u8]) -> Result<DecodingKey, String> {
    let text = String::from_utf8_lossy(key);
    let text = text.trim();
    if !text.starts_with("-----BEGIN") {
        if key.len() < MIN_SECRET_BYTES {
            return Err(format!(
                "the frontend JWT secret must be at least {MIN_SECRET_BYTES} bytes \
                 (or a PEM public key)"
            ));
        }
        return Ok(DecodingKey::from_secret(key));
    }
    if text.lines().next().is_some_and(|l| l.contains("PRIVATE")) {
        return Err(
            "the frontend JWT key is a private key; configure the public key (PEM \"PUBLIC KEY\")"
                .into(),
        );
    }
    let pem = text.as_bytes();
    DecodingKey::from_rsa_pem(pem)
        .or_else(|_| DecodingKey::from_ec_pem(pem))
        .or_else(|_| DecodingKey::from_ed_pem(pem))
        .map_err(|_| {
            "the frontend JWT key is not an RSA, EC or Ed25519 public key in PEM".to_string()
        })
}

/// What an expired token is refused with (its reason is TOKEN_EXPIRED).
pub const EXPIRED: &str = "expired";

fn describe(kind: &ErrorKind) -> String {
    match kind {
        ErrorKind::ExpiredSignature => EXPIRED.into(),
        ErrorKind::ImmatureSignature => "not valid yet (nbf)".into(),
        ErrorKind::InvalidSignature => "bad signature".into(),
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
            "algorithm not accepted for the configured key".into()
        }
        ErrorKind::InvalidIssuer => "wrong issuer".into(),
        ErrorKind::InvalidAudience => "wrong audience".into(),
        ErrorKind::MissingRequiredClaim(claim) => format!("missing the {claim} claim"),
        ErrorKind::InvalidClaimFormat(claim) => format!("malformed {claim} claim"),
        ErrorKind::Json(_) => "malformed claims".into(),
        _ => "malformed token".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::json;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn now() -> i64 {
        chrono::Utc::now().timestamp()
    }

    fn tokens(issuer: Option<&str>, audience: Option<&str>) -> FrontendTokens {
        FrontendTokens::new(&FrontendConfig {
            key: SECRET.to_vec(),
            issuer: issuer.map(Into::into),
            audience: audience.map(Into::into),
            leeway: Duration::from_secs(5),
        })
        .unwrap()
    }

    fn sign(claims: serde_json::Value) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap()
    }

    #[test]
    fn accepts_a_valid_token() {
        let claims = tokens(None, None)
            .verify(&sign(
                json!({"sub": "user_1", "org_id": "org_1", "exp": now() + 60}),
            ))
            .unwrap();
        assert_eq!(claims.sub, "user_1");
        assert_eq!(claims.org_id.as_deref(), Some("org_1"));
    }

    #[test]
    fn rejects_expired_immature_and_incomplete_tokens() {
        let t = tokens(None, None);
        let check =
            |claims, expected: &str| assert_eq!(t.verify(&sign(claims)).unwrap_err(), expected);
        check(json!({"sub": "u", "exp": now() - 60}), "expired");
        check(
            json!({"sub": "u", "exp": now() + 60, "nbf": now() + 60}),
            "not valid yet (nbf)",
        );
        check(json!({"sub": "u"}), "missing the exp claim");
        check(json!({"exp": now() + 60}), "missing the sub claim");
        check(
            json!({"sub": "", "exp": now() + 60}),
            "the sub claim is empty",
        );
        check(json!({"sub": 7, "exp": now() + 60}), "malformed claims");
    }

    #[test]
    fn checks_issuer_and_audience_when_configured() {
        let t = tokens(Some("https://issuer"), Some("metadata"));
        let ok = json!({"sub": "u", "exp": now() + 60, "iss": "https://issuer", "aud": "metadata"});
        assert!(t.verify(&sign(ok)).is_ok());
        let wrong_iss = json!({"sub": "u", "exp": now() + 60, "iss": "x", "aud": "metadata"});
        assert_eq!(t.verify(&sign(wrong_iss)).unwrap_err(), "wrong issuer");
        let wrong_aud = json!({"sub": "u", "exp": now() + 60, "iss": "https://issuer", "aud": "x"});
        assert_eq!(t.verify(&sign(wrong_aud)).unwrap_err(), "wrong audience");
        let no_iss = json!({"sub": "u", "exp": now() + 60, "aud": "metadata"});
        assert_eq!(
            t.verify(&sign(no_iss)).unwrap_err(),
            "missing the iss claim"
        );
    }

    #[test]
    fn refuses_weak_or_private_keys() {
        let config = |key: &[u8]| FrontendConfig {
            key: key.to_vec(),
            issuer: None,
            audience: None,
            leeway: Duration::ZERO,
        };
        assert!(
            FrontendTokens::new(&config(b"short"))
                .err()
                .unwrap()
                .contains("at least 32")
        );
        let private =
            b"-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----\n";
        assert!(
            FrontendTokens::new(&config(private))
                .err()
                .unwrap()
                .contains("private key")
        );
        let garbage = b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n";
        assert!(
            FrontendTokens::new(&config(garbage))
                .err()
                .unwrap()
                .contains("not an RSA")
        );
    }
}
