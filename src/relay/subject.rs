//! NATS subjects of relayed events: `<prefix>.user.<id>` and
//! `<prefix>.organization.<id>`, with the id encoded so that it is always
//! exactly one subject token.
//!
//! Ids are printable ASCII without spaces; of those characters a subject
//! token cannot hold `.` (the token separator) and the wildcards `*` and
//! `>`. Those three, and `%` (the escape itself), are written as `%` and
//! two upper-case hex digits, as in a URL: `a.b*c>d%e` becomes
//! `a%2Eb%2Ac%3Ed%25e`. Every other id travels as it is, so a consumer of
//! one ordinary id subscribes to it by name.

use crate::model::Kind;

/// The subject token of `kind`.
pub fn kind_token(kind: Kind) -> &'static str {
    match kind {
        Kind::User => "user",
        Kind::Organization => "organization",
    }
}

/// `id` as one subject token.
pub fn encode_id(id: &str) -> String {
    let mut token = String::with_capacity(id.len());
    for c in id.chars() {
        match c {
            '.' | '*' | '>' | '%' => token.push_str(&format!("%{:02X}", c as u32)),
            c => token.push(c),
        }
    }
    token
}

/// The id a token stands for; None for a token [`encode_id`] cannot have
/// made.
pub fn decode_id(token: &str) -> Option<String> {
    let mut id = String::with_capacity(token.len());
    let mut rest = token;
    while let Some(at) = rest.find('%') {
        id.push_str(&rest[..at]);
        let hex = rest.get(at + 1..at + 3)?;
        let c = match hex {
            "2E" => '.',
            "2A" => '*',
            "3E" => '>',
            "25" => '%',
            _ => return None,
        };
        id.push(c);
        rest = &rest[at + 3..];
    }
    if rest.contains(['.', '*', '>']) {
        return None;
    }
    id.push_str(rest);
    Some(id)
}

/// The subject an event of `kind` for `id` is published on.
pub fn event_subject(prefix: &str, kind: Kind, id: &str) -> String {
    format!("{prefix}.{}.{}", kind_token(kind), encode_id(id))
}

/// The subject of the relay's own markers (see `relay::message`). `relay`
/// is no kind, so a consumer of `<prefix>.user.>` never sees them.
pub fn marker_subject(prefix: &str) -> String {
    format!("{prefix}.relay.marker")
}

/// Checks a subject prefix: one or more tokens, no wildcard.
pub fn check_prefix(prefix: &str) -> Result<(), String> {
    let bad_token = prefix.split('.').find(|token| {
        token.is_empty()
            || token
                .chars()
                .any(|c| c == '*' || c == '>' || c.is_whitespace() || c.is_control())
    });
    match bad_token {
        Some(token) => Err(format!(
            "--nats-subject-prefix {prefix:?}: token {token:?} is empty or holds a wildcard or a space"
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn encodes_only_what_a_token_cannot_hold() {
        assert_eq!(encode_id("user_123-ABC"), "user_123-ABC");
        assert_eq!(encode_id("a.b*c>d%e"), "a%2Eb%2Ac%3Ed%25e");
        assert_eq!(
            event_subject("metadata", Kind::Organization, "acme.com"),
            "metadata.organization.acme%2Ecom"
        );
        assert_eq!(
            event_subject("corp.md", Kind::User, "u1"),
            "corp.md.user.u1"
        );
    }

    #[test]
    fn decode_refuses_what_encode_never_makes() {
        for bad in ["a%2", "a%41", "a.b", "a*", "%zz", "a%2e"] {
            assert_eq!(decode_id(bad), None, "{bad}");
        }
    }

    #[test]
    fn prefixes() {
        for good in ["metadata", "corp.metadata", "a-b_c"] {
            assert!(check_prefix(good).is_ok(), "{good}");
        }
        for bad in ["", "a.", ".a", "a..b", "a.*", "a.>", "a b"] {
            assert!(check_prefix(bad).is_err(), "{bad:?}");
        }
    }

    proptest! {
        /// Every id (printable ASCII without spaces) is one token, and
        /// comes back as it was.
        #[test]
        fn round_trips(id in "[!-~]{1,64}") {
            let token = encode_id(&id);
            prop_assert!(!token.contains(['.', '*', '>', ' ']));
            prop_assert_eq!(decode_id(&token), Some(id));
        }
    }
}
