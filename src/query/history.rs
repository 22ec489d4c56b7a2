//! ListHistory's paging: a page token carries the revision of the last
//! event returned (the next page starts strictly past it, in the page's
//! direction, so events written meanwhile neither repeat nor shift a
//! page), and a digest of the record and the direction, so that it cannot
//! continue another history.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use super::page::{DIGEST_BYTES, digest, kind_byte};
use crate::json::validate_id;
use crate::model::Kind;
use crate::validation::{JsonPath, Problem, ValidationError};

/// Distinct from List's tokens (version 1): neither is taken for the other.
const TOKEN_VERSION: u8 = 2;

/// A ListHistory request, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistoryQuery {
    pub kind: Kind,
    pub id: String,
    pub page_size: u64,
    pub oldest_first: bool,
    /// The revision of the previous page's last event.
    pub cursor: Option<u64>,
}

impl HistoryQuery {
    pub fn new(
        kind: Kind,
        id: String,
        page_size: i32,
        page_token: &str,
        oldest_first: bool,
    ) -> Result<Self, ValidationError> {
        validate_id(kind, &id)?;
        let page_size = super::page_size(page_size)?;
        let cursor = decode(page_token, kind, &scope(&id, oldest_first))?;
        Ok(HistoryQuery {
            kind,
            id,
            page_size,
            oldest_first,
            cursor,
        })
    }

    /// The token of the page after one that ended with `last`.
    pub fn next_token(&self, last: u64) -> String {
        let mut bytes = vec![TOKEN_VERSION, kind_byte(self.kind)];
        bytes.extend_from_slice(&digest(&scope(&self.id, self.oldest_first)));
        bytes.extend_from_slice(&last.to_be_bytes());
        URL_SAFE_NO_PAD.encode(bytes)
    }
}

/// What a token is tied to.
fn scope(id: &str, oldest_first: bool) -> String {
    format!("history\u{0}{id}\u{0}{oldest_first}")
}

fn decode(text: &str, kind: Kind, scope: &str) -> Result<Option<u64>, ValidationError> {
    if text.is_empty() {
        return Ok(None);
    }
    let refused = |why| ValidationError::new(JsonPath::root("page_token"), Problem::PageToken(why));
    let not_ours = || {
        refused(
            "is not a history page token of this service (pass next_page_token as it was returned)",
        )
    };
    let bytes = URL_SAFE_NO_PAD.decode(text).map_err(|_| not_ours())?;
    let header = 2 + DIGEST_BYTES;
    if bytes.len() != header + 8 || bytes[0] != TOKEN_VERSION {
        return Err(not_ours());
    }
    if bytes[1] != kind_byte(kind) {
        return Err(refused("was issued by the ListHistory of the other kind"));
    }
    if bytes[2..header] != digest(scope) {
        return Err(refused(
            "was issued for another record or order; a token continues the history it came from",
        ));
    }
    let mut revision = [0; 8];
    revision.copy_from_slice(&bytes[header..]);
    Ok(Some(u64::from_be_bytes(revision)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_continues_only_its_own_history() {
        let query = HistoryQuery::new(Kind::User, "u1".into(), 0, "", false).unwrap();
        assert_eq!((query.page_size, query.cursor), (50, None));
        let token = query.next_token(42);
        let next = HistoryQuery::new(Kind::User, "u1".into(), 10, &token, false).unwrap();
        assert_eq!(next.cursor, Some(42));

        for (kind, id, oldest_first) in [
            (Kind::User, "u2", false),
            (Kind::User, "u1", true),
            (Kind::Organization, "u1", false),
        ] {
            let err = HistoryQuery::new(kind, id.into(), 0, &token, oldest_first).unwrap_err();
            assert!(err.to_string().starts_with("page_token: "), "{err}");
        }
        // List's tokens are not history tokens.
        let list = super::super::PageToken::new(Kind::User, "", "u1".into()).encode();
        let err = HistoryQuery::new(Kind::User, "u1".into(), 0, &list, false).unwrap_err();
        assert!(
            err.to_string().contains("not a history page token"),
            "{err}"
        );
        let err = HistoryQuery::new(Kind::User, String::new(), 0, "", false).unwrap_err();
        assert_eq!(err.path.to_string(), "user_id");
    }
}
