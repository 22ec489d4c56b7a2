//! Who is calling, and what they may do. Pure apart from reading key files
//! at start-up: the gRPC layer asks [`Authenticator`] for a [`Caller`] and
//! [`policy::authorize`] for the fields that caller may see.

mod api_keys;
mod frontend;
pub mod policy;

use std::fmt;
use std::sync::Arc;

pub use api_keys::{ApiKeys, hash_key};
pub use frontend::{FrontendConfig, FrontendTokens};
pub use policy::{Action, Denied, FieldSet, Operation, authorize};

use crate::logging::Escaped;

/// The identity a call was made with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// No credentials are configured: the server trusts its network, and
    /// every caller has the access of a backend.
    Open,
    /// A backend service, known by the name of its API key.
    Backend { name: Arc<str> },
    /// A signed-in end user, by the `sub` and `org_id` claims of a token.
    Frontend {
        user_id: String,
        org_id: Option<String>,
    },
}

impl Caller {
    /// Who the events of this caller's writes name: `key:<name>` for an API
    /// key, `frontend:<sub>` for a token, nobody on an open server.
    pub fn actor(&self) -> String {
        match self {
            Caller::Open => String::new(),
            Caller::Backend { name } => format!("key:{name}"),
            Caller::Frontend { user_id, .. } => format!("frontend:{user_id}"),
        }
    }
}

impl fmt::Display for Caller {
    /// Names the caller in logs; never contains a credential. A token's
    /// `sub` is whatever its issuer signed, so names are escaped.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Caller::Open => f.write_str("unauthenticated"),
            Caller::Backend { name } => write!(f, "backend:{}", Escaped(name)),
            Caller::Frontend { user_id, .. } => write!(f, "frontend:{}", Escaped(user_id)),
        }
    }
}

/// Why a call carries no usable identity (UNAUTHENTICATED).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("missing credentials: send the header `authorization: Bearer <API key or token>`")]
    Missing,
    #[error("the authorization header must be `Bearer <API key or token>`")]
    Malformed,
    #[error("unknown API key")]
    UnknownKey,
    #[error("invalid token: {0}")]
    Token(String),
}

impl AuthError {
    /// Its stable code (see `crate::reason`).
    pub fn reason(&self) -> crate::reason::Reason {
        use crate::reason::Reason;
        match self {
            AuthError::Missing => Reason::MissingCredentials,
            AuthError::Malformed => Reason::MalformedAuthorization,
            AuthError::UnknownKey => Reason::UnknownApiKey,
            AuthError::Token(why) if why == frontend::EXPIRED => Reason::TokenExpired,
            AuthError::Token(_) => Reason::InvalidToken,
        }
    }
}

/// Turns the `authorization` header into a [`Caller`].
#[derive(Default)]
pub struct Authenticator {
    api_keys: ApiKeys,
    frontend: Option<FrontendTokens>,
}

impl Authenticator {
    pub fn new(api_keys: ApiKeys, frontend: Option<FrontendTokens>) -> Self {
        Authenticator { api_keys, frontend }
    }

    /// True when no credentials are configured, so every call is [`Caller::Open`].
    pub fn is_open(&self) -> bool {
        self.api_keys.is_empty() && self.frontend.is_none()
    }

    /// `header` is the value of `authorization`, if the call sent one.
    pub fn authenticate(&self, header: Option<&[u8]>) -> Result<Caller, AuthError> {
        if self.is_open() {
            return Ok(Caller::Open);
        }
        let header = header.ok_or(AuthError::Missing)?;
        let token = bearer_token(header).ok_or(AuthError::Malformed)?;
        if let Some(name) = self.api_keys.find(token) {
            return Ok(Caller::Backend { name });
        }
        match &self.frontend {
            // An API key never has the three dot-separated parts of a JWT.
            Some(frontend) if token.split('.').count() == 3 => {
                let claims = frontend.verify(token).map_err(AuthError::Token)?;
                Ok(Caller::Frontend {
                    user_id: claims.sub,
                    org_id: claims.org_id,
                })
            }
            _ => Err(AuthError::UnknownKey),
        }
    }
}

/// Describes the configuration for logs: counts and algorithms, no keys.
impl fmt::Display for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_open() {
            return f.write_str("none (every caller has full access)");
        }
        let keys = self.api_keys.len();
        write!(f, "{keys} API key{}", if keys == 1 { "" } else { "s" })?;
        match &self.frontend {
            Some(frontend) => write!(f, ", frontend tokens ({:?})", frontend.algorithms()),
            None => f.write_str(", no frontend tokens"),
        }
    }
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Authenticator({self})")
    }
}

fn bearer_token(header: &[u8]) -> Option<&str> {
    let header = std::str::from_utf8(header).ok()?;
    let (scheme, token) = header.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_key(name: &str, key: &str) -> Authenticator {
        let keys = ApiKeys::parse(&format!("{name}:{}", hash_key(key)), "test").unwrap();
        Authenticator::new(keys, None)
    }

    #[test]
    fn open_without_credentials() {
        let auth = Authenticator::default();
        assert!(auth.is_open());
        assert_eq!(auth.authenticate(None), Ok(Caller::Open));
        assert_eq!(auth.authenticate(Some(b"Bearer x")), Ok(Caller::Open));
    }

    #[test]
    fn api_key_names_the_backend() {
        let auth = with_key("billing", "s3cret-key");
        assert!(!auth.is_open());
        assert_eq!(
            auth.authenticate(Some(b"Bearer s3cret-key")),
            Ok(Caller::Backend {
                name: "billing".into()
            })
        );
        assert_eq!(
            auth.authenticate(Some(b"bearer  s3cret-key ")),
            Ok(Caller::Backend {
                name: "billing".into()
            })
        );
    }

    #[test]
    fn bad_credentials() {
        let auth = with_key("billing", "s3cret-key");
        assert_eq!(auth.authenticate(None), Err(AuthError::Missing));
        assert_eq!(
            auth.authenticate(Some(b"s3cret-key")),
            Err(AuthError::Malformed)
        );
        assert_eq!(
            auth.authenticate(Some(b"Basic s3cret-key")),
            Err(AuthError::Malformed)
        );
        assert_eq!(
            auth.authenticate(Some(b"Bearer ")),
            Err(AuthError::Malformed)
        );
        assert_eq!(
            auth.authenticate(Some(b"Bearer s3cret-kez")),
            Err(AuthError::UnknownKey)
        );
        // A JWT-shaped token with no frontend key configured.
        assert_eq!(
            auth.authenticate(Some(b"Bearer a.b.c")),
            Err(AuthError::UnknownKey)
        );
    }

    #[test]
    fn display_never_shows_credentials() {
        let backend = Caller::Backend {
            name: "billing".into(),
        };
        assert_eq!(backend.to_string(), "backend:billing");
        let frontend = Caller::Frontend {
            user_id: "user_1".into(),
            org_id: Some("org_1".into()),
        };
        assert_eq!(frontend.to_string(), "frontend:user_1");
    }

    #[test]
    fn display_cannot_start_a_log_line() {
        let forged = Caller::Frontend {
            user_id: "u\n2026-01-01T00:00:00Z  INFO x\u{1b}[31m\r".into(),
            org_id: None,
        };
        assert_eq!(
            forged.to_string(),
            "frontend:u\\n2026-01-01T00:00:00Z\\u{20}\\u{20}INFO\\u{20}x\\u{1b}[31m\\r"
        );
    }
}
