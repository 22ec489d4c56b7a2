//! What an endpoint may be, checked when it is created or changed: each
//! refusal names the request field (`webhook.url`, `webhook.event_types[1]`).

use std::net::IpAddr;
use std::time::Duration;

use super::envelope::EVENT_TYPES;
use super::network::{self, AllowedNetworks, Reach};
use crate::model::Kind;
use crate::validation::{JsonPath, Problem, ValidationError};

pub const MAX_URL_BYTES: usize = 2048;
pub const MAX_DESCRIPTION_BYTES: usize = 1024;
/// How long a rotated-out secret signs beside the new one, by default and
/// at most.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(24 * 3600);
pub const MAX_GRACE: Duration = Duration::from_secs(7 * 24 * 3600);

/// A new endpoint's id: `wh_` and 32 hex digits.
pub fn new_id() -> String {
    format!("wh_{}", uuid::Uuid::new_v4().simple())
}

fn refused(field: &str, why: impl Into<String>) -> ValidationError {
    ValidationError::new(JsonPath::root(field), Problem::WebhookUrl(why.into()))
}

/// The URL as it will be stored, or why it is refused: https, or http to
/// a host in the allowed networks; no credentials; an address written in
/// it must be one deliveries may reach. A host name is resolved here only
/// for plain http (every address must be in the allowed networks); https
/// names are checked at each delivery, where the connection is made.
pub async fn check_url(
    text: &str,
    field: &str,
    allowed: &AllowedNetworks,
) -> Result<String, ValidationError> {
    if text.len() > MAX_URL_BYTES {
        return Err(ValidationError::new(
            JsonPath::root(field),
            Problem::TextTooLong {
                len: text.len(),
                limit: MAX_URL_BYTES,
            },
        ));
    }
    let url = url::Url::parse(text)
        .map_err(|err| refused(field, format!("does not parse as a URL: {err}")))?;
    let reach = match url.scheme() {
        "https" => Reach::Public,
        "http" => Reach::AllowedOnly,
        other => {
            return Err(refused(
                field,
                format!("scheme {other:?} is not https (or http within --webhook-allow-networks)"),
            ));
        }
    };
    if !url.username().is_empty() || url.password().is_some() {
        return Err(refused(
            field,
            "must not carry credentials (user:password@): the signature authenticates the \
             service to the receiver",
        ));
    }
    let host = match url.host() {
        Some(url::Host::Ipv4(v4)) => Host::Address(IpAddr::V4(v4)),
        Some(url::Host::Ipv6(v6)) => Host::Address(IpAddr::V6(v6)),
        Some(url::Host::Domain(name)) => Host::Name(name.to_owned()),
        None => return Err(refused(field, "has no host")),
    };
    let port = url.port_or_known_default().unwrap_or(443);
    match (host, reach) {
        (Host::Address(address), reach) => network::check(address, reach, allowed)
            .map_err(|err| refused(field, err.to_string()))?,
        (Host::Name(_), Reach::AllowedOnly) if allowed.is_empty() => {
            return Err(refused(
                field,
                "plain http:// may only reach --webhook-allow-networks (none listed): use https://",
            ));
        }
        (Host::Name(name), Reach::AllowedOnly) => {
            let addresses: Vec<IpAddr> = tokio::net::lookup_host((name.as_str(), port))
                .await
                .map_err(|err| refused(field, format!("cannot resolve {name:?}: {err}")))?
                .map(|address| address.ip())
                .collect();
            for address in addresses {
                network::check(address, reach, allowed)
                    .map_err(|err| refused(field, format!("{name} resolves to {err}")))?;
            }
        }
        (Host::Name(_), Reach::Public) => {}
    }
    Ok(url.to_string())
}

enum Host {
    Address(IpAddr),
    Name(String),
}

pub fn check_description(text: &str, field: &str) -> Result<(), ValidationError> {
    if text.len() > MAX_DESCRIPTION_BYTES {
        return Err(ValidationError::new(
            JsonPath::root(field),
            Problem::TextTooLong {
                len: text.len(),
                limit: MAX_DESCRIPTION_BYTES,
            },
        ));
    }
    Ok(())
}

/// The event types, each known, each once (in the order first given).
pub fn check_event_types(types: Vec<String>, field: &str) -> Result<Vec<String>, ValidationError> {
    let mut kept: Vec<String> = Vec::with_capacity(types.len());
    for (index, name) in types.into_iter().enumerate() {
        if !EVENT_TYPES.contains(&name.as_str()) {
            return Err(ValidationError::new(
                JsonPath::root(field).index(index),
                Problem::UnknownEventType {
                    name,
                    known: EVENT_TYPES.join(", "),
                },
            ));
        }
        if !kept.contains(&name) {
            kept.push(name);
        }
    }
    Ok(kept)
}

/// A filter as Watch's, over either kind's fields (an organization has no
/// unsafe_metadata: a condition on it matches no organization).
pub fn check_filter(text: &str, field: &str) -> Result<(), ValidationError> {
    crate::query::parse(text, Kind::User.fields())
        .map(|_| ())
        .map_err(|err| ValidationError::new(JsonPath::root(field), Problem::Filter(err)))
}

/// A rotation's grace period: unset is [`DEFAULT_GRACE`]; over
/// [`MAX_GRACE`] is refused.
pub fn check_grace(given: Option<Duration>, field: &str) -> Result<Duration, ValidationError> {
    let grace = given.unwrap_or(DEFAULT_GRACE);
    if grace > MAX_GRACE {
        return Err(ValidationError::new(
            JsonPath::root(field),
            Problem::DurationTooLong {
                given: humantime::format_duration(grace).to_string(),
                limit: humantime::format_duration(MAX_GRACE).to_string(),
            },
        ));
    }
    Ok(grace)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(err: ValidationError) -> String {
        format!("{err}")
    }

    #[tokio::test]
    async fn urls_are_https_or_http_to_allowed_networks_without_credentials() {
        let none = AllowedNetworks::default();
        let loopback = AllowedNetworks::parse("127.0.0.0/8").unwrap();
        let field = "webhook.url";
        assert_eq!(
            check_url("https://hooks.example.com/in?x=1", field, &none)
                .await
                .unwrap(),
            "https://hooks.example.com/in?x=1"
        );
        for (url, allowed, why) in [
            ("ftp://example.com/", &none, "scheme \"ftp\""),
            ("not a url", &none, "does not parse"),
            ("https://user:pw@example.com/", &none, "credentials"),
            ("http://example.com/", &none, "plain http://"),
            ("http://127.0.0.1:9/", &none, "plain http://"),
            ("https://127.0.0.1/", &none, "loopback"),
            ("https://[::ffff:10.0.0.1]/", &none, "private"),
            ("https://169.254.169.254/latest", &none, "link-local"),
            ("http://1.1.1.1/", &loopback, "use https://"),
        ] {
            let err = check_url(url, field, allowed).await.unwrap_err();
            assert_eq!(err.path.to_string(), field);
            assert_eq!(
                err.problem.reason(),
                crate::reason::Reason::InvalidWebhookUrl
            );
            assert!(reason(err.clone()).contains(why), "{url}: {err}");
        }
        assert!(
            check_url("http://127.0.0.1:9/hook", field, &loopback)
                .await
                .is_ok()
        );
        assert!(
            check_url("http://localhost:9/hook", field, &loopback)
                .await
                .is_ok()
        );
        assert!(
            check_url("http://localhost:9/hook", field, &none)
                .await
                .is_err()
        );
        let long = format!("https://example.com/{}", "a".repeat(MAX_URL_BYTES));
        assert!(check_url(&long, field, &none).await.is_err());
    }

    #[test]
    fn event_types_are_known_and_kept_once() {
        let types = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        let kept = check_event_types(
            types(&[
                "user.metadata.deleted",
                "user.metadata.deleted",
                "organization.metadata.updated",
            ]),
            "webhook.event_types",
        )
        .unwrap();
        assert_eq!(
            kept,
            types(&["user.metadata.deleted", "organization.metadata.updated"])
        );
        let err = check_event_types(
            types(&["user.metadata.updated", "user.created"]),
            "webhook.event_types",
        )
        .unwrap_err();
        assert_eq!(err.path.to_string(), "webhook.event_types[1]");
        assert!(err.to_string().contains("\"user.created\""), "{err}");
    }

    #[test]
    fn grace_periods_default_and_are_bounded() {
        assert_eq!(check_grace(None, "grace_period").unwrap(), DEFAULT_GRACE);
        assert_eq!(
            check_grace(Some(Duration::ZERO), "grace_period").unwrap(),
            Duration::ZERO
        );
        let err = check_grace(Some(MAX_GRACE * 2), "grace_period").unwrap_err();
        assert_eq!(err.problem.reason(), crate::reason::Reason::DurationTooLong);
    }
}
