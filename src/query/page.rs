//! List's paging (AIP-158): page sizes, and page tokens that carry the last
//! id returned (keyset paging: the next page starts after it, so a write or
//! delete between pages neither repeats nor skips a record that matches
//! throughout). A token is opaque to callers and names its kind and a
//! digest of its filter, so that it cannot be reused for another query.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};

use crate::json::validate_id;
use crate::model::Kind;
use crate::validation::{JsonPath, Problem, ValidationError};

/// Page size when the request names none.
pub const DEFAULT_PAGE_SIZE: u64 = 50;
/// Largest page; larger requests get this many.
pub const MAX_PAGE_SIZE: u64 = 1000;

/// Bumped if the layout below changes: older tokens are then refused.
const TOKEN_VERSION: u8 = 1;
pub(super) const DIGEST_BYTES: usize = 8;

/// The page size a request asks for, as AIP-158 reads it.
pub fn page_size(requested: i32) -> Result<u64, ValidationError> {
    match requested {
        0 => Ok(DEFAULT_PAGE_SIZE),
        n if n < 0 => Err(ValidationError::new(
            JsonPath::root("page_size"),
            Problem::NegativePageSize,
        )),
        n => Ok((n as u64).min(MAX_PAGE_SIZE)),
    }
}

/// Where the next page of a listing starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageToken {
    pub kind: Kind,
    /// The last id of the previous page.
    pub after: String,
    filter: [u8; DIGEST_BYTES],
}

pub(super) fn digest(filter: &str) -> [u8; DIGEST_BYTES] {
    let hash = Sha256::digest(filter.as_bytes());
    let mut digest = [0; DIGEST_BYTES];
    digest.copy_from_slice(&hash[..DIGEST_BYTES]);
    digest
}

impl PageToken {
    pub fn new(kind: Kind, filter: &str, after: String) -> Self {
        PageToken {
            kind,
            after,
            filter: digest(filter),
        }
    }

    pub fn encode(&self) -> String {
        let mut bytes = vec![TOKEN_VERSION, kind_byte(self.kind)];
        bytes.extend_from_slice(&self.filter);
        bytes.extend_from_slice(self.after.as_bytes());
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// The token of a request for `kind` with `filter`; None for an empty
    /// token (the first page).
    pub fn decode(text: &str, kind: Kind, filter: &str) -> Result<Option<Self>, ValidationError> {
        if text.is_empty() {
            return Ok(None);
        }
        let refused =
            |why| ValidationError::new(JsonPath::root("page_token"), Problem::PageToken(why));
        let not_ours = || {
            refused("is not a page token of this service (pass next_page_token as it was returned)")
        };
        let bytes = URL_SAFE_NO_PAD.decode(text).map_err(|_| not_ours())?;
        let header = 2 + DIGEST_BYTES;
        if bytes.len() <= header || bytes[0] != TOKEN_VERSION {
            return Err(not_ours());
        }
        if bytes[1] != kind_byte(kind) {
            return Err(refused("was issued by the List of the other kind"));
        }
        if bytes[2..header] != digest(filter) {
            return Err(refused(
                "was issued for another filter; a token continues the listing it came from",
            ));
        }
        let after = String::from_utf8(bytes[header..].to_vec()).map_err(|_| not_ours())?;
        validate_id(kind, &after).map_err(|_| not_ours())?;
        Ok(Some(PageToken::new(kind, filter, after)))
    }
}

pub(super) fn kind_byte(kind: Kind) -> u8 {
    match kind {
        Kind::User => 1,
        Kind::Organization => 2,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_sizes() {
        assert_eq!(page_size(0).unwrap(), 50);
        assert_eq!(page_size(7).unwrap(), 7);
        assert_eq!(page_size(5000).unwrap(), 1000);
        let err = page_size(-1).unwrap_err();
        assert_eq!(err.to_string(), "page_size: must not be negative");
    }

    #[test]
    fn a_token_continues_only_its_own_listing() {
        let filter = r#"public_metadata.plan = "gold""#;
        let token = PageToken::new(Kind::User, filter, "user_42".into()).encode();
        let back = PageToken::decode(&token, Kind::User, filter)
            .unwrap()
            .unwrap();
        assert_eq!(back.after, "user_42");
        assert_eq!(PageToken::decode("", Kind::User, filter).unwrap(), None);

        let other_filter = PageToken::decode(&token, Kind::User, "").unwrap_err();
        assert!(
            other_filter
                .to_string()
                .starts_with("page_token: was issued for another filter")
        );
        let other_kind = PageToken::decode(&token, Kind::Organization, filter).unwrap_err();
        assert!(
            other_kind.to_string().contains("other kind"),
            "{other_kind}"
        );
        for garbage in ["%%%", "AAAA", &token[..token.len() - 1].replace('A', "B")] {
            let err = PageToken::decode(garbage, Kind::User, filter).unwrap_err();
            assert!(err.to_string().starts_with("page_token: "), "{err}");
        }
    }
}
