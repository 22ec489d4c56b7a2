//! One delivery over HTTP: the signed POST, and what its answer means.
//!
//! Two clients, one per scheme, each keeping its connections for reuse and
//! each with its own resolver guard (`network.rs`): https may reach public
//! addresses and the allowed networks, plain http only the allowed
//! networks. No redirects are followed (a 3xx is a failure: following one
//! would reach an address nobody checked) and no proxy from the
//! environment is used (it would connect where the guard never looked).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use super::network::{self, AllowedNetworks, GuardedResolver, Reach};
use super::{envelope, schedule, signing};
use crate::model::Event;
use crate::store::StoredWebhook;

/// The most of a response body read: enough for a short error text, never
/// a receiver's whole page.
const MAX_RESPONSE_BYTES: usize = 4096;
/// The most of a response body kept in `last_error`.
const MAX_ERROR_EXCERPT: usize = 200;

/// Why an attempt failed, and when the endpoint asked to be tried again.
#[derive(Clone, Debug)]
pub struct Failed {
    /// For GetWebhook: the status and an excerpt of the response's body.
    pub error: String,
    /// For logs: the status or the transport error, never the body.
    pub summary: String,
    pub retry_after: Option<Duration>,
}

impl Failed {
    fn new(error: impl Into<String>) -> Failed {
        let error = error.into();
        Failed {
            summary: error.clone(),
            error,
            retry_after: None,
        }
    }
}

pub struct Sender {
    https: reqwest::Client,
    http: reqwest::Client,
    allowed: Arc<AllowedNetworks>,
    timeout: Duration,
}

impl Sender {
    pub fn new(allowed: Arc<AllowedNetworks>, timeout: Duration) -> anyhow::Result<Sender> {
        let client = |reach| {
            reqwest::Client::builder()
                .dns_resolver(Arc::new(GuardedResolver {
                    reach,
                    allowed: allowed.clone(),
                }))
                .redirect(reqwest::redirect::Policy::none())
                .no_proxy()
                .connect_timeout(timeout.min(Duration::from_secs(10)))
                .timeout(timeout)
                .pool_idle_timeout(Duration::from_secs(60))
                .user_agent(concat!("metadata-service/", env!("CARGO_PKG_VERSION")))
                .build()
        };
        Ok(Sender {
            https: client(Reach::Public)?,
            http: client(Reach::AllowedOnly)?,
            allowed,
            timeout,
        })
    }

    /// POSTs `event` to `hook`, signed at `now`: Ok on a 2xx answer.
    /// Returns how long the request took, whatever its outcome.
    pub async fn deliver(
        &self,
        hook: &StoredWebhook,
        event: &Event,
        now: DateTime<Utc>,
    ) -> (Result<(), Failed>, Duration) {
        let started = Instant::now();
        let outcome = self.attempt(hook, event, now).await;
        (outcome, started.elapsed())
    }

    async fn attempt(
        &self,
        hook: &StoredWebhook,
        event: &Event,
        now: DateTime<Utc>,
    ) -> Result<(), Failed> {
        let url = reqwest::Url::parse(&hook.url)
            .map_err(|err| Failed::new(format!("the URL does not parse: {err}")))?;
        let reach = match url.scheme() {
            "https" => Reach::Public,
            "http" => Reach::AllowedOnly,
            other => return Err(Failed::new(format!("scheme {other:?} is not http(s)"))),
        };
        // An address written in the URL is connected to without the
        // resolver: checked here instead.
        let literal = match url.host() {
            Some(url::Host::Ipv4(v4)) => Some(IpAddr::V4(v4)),
            Some(url::Host::Ipv6(v6)) => Some(IpAddr::V6(v6)),
            _ => None,
        };
        if let Some(address) = literal {
            network::check(address, reach, &self.allowed)
                .map_err(|e| Failed::new(e.to_string()))?;
        }
        let client = match reach {
            Reach::Public => &self.https,
            Reach::AllowedOnly => &self.http,
        };
        let body = envelope::body(event);
        let id = envelope::message_id(&hook.id, event.revision);
        let timestamp = now.timestamp();
        let signature =
            signing::signature_header(&hook.signing_secrets(now), &id, timestamp, &body)
                .map_err(Failed::new)?;
        let sent = client
            .post(url)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header("webhook-id", &id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(body)
            .send()
            .await;
        let mut response = match sent {
            Ok(response) => response,
            Err(err) => return Err(Failed::new(self.describe(err))),
        };
        let status = response.status();
        let retry_after = response
            .headers()
            .get(http::header::RETRY_AFTER)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| schedule::retry_after(value, Utc::now()));
        // Read a little of the body (the connection is reused only once it
        // is read to its end; a long one is cut).
        let mut excerpt = Vec::new();
        while excerpt.len() < MAX_RESPONSE_BYTES {
            match response.chunk().await {
                Ok(Some(chunk)) => excerpt.extend_from_slice(&chunk),
                _ => break,
            }
        }
        if status.is_success() {
            return Ok(());
        }
        let summary = format!("HTTP {}", status.as_u16());
        let text = printable(&excerpt);
        let error = match text.is_empty() {
            true => summary.clone(),
            false => format!("{summary}: {text}"),
        };
        Err(Failed {
            error,
            summary,
            retry_after,
        })
    }

    /// A transport error in words, without the URL (it may carry a token).
    fn describe(&self, err: reqwest::Error) -> String {
        let timed_out = err.is_timeout();
        let connect = err.is_connect();
        let mut cause = String::new();
        let mut source = std::error::Error::source(&err);
        while let Some(inner) = source {
            cause = inner.to_string();
            source = inner.source();
        }
        match (timed_out, connect) {
            (true, _) => format!("no answer within {:?}", self.timeout),
            (false, true) => format!("cannot connect: {cause}"),
            (false, false) if cause.is_empty() => err.without_url().to_string(),
            (false, false) => format!("{}: {cause}", err.without_url()),
        }
    }
}

/// The first [`MAX_ERROR_EXCERPT`] characters of a response body, on one
/// line, control characters replaced: safe to show in GetWebhook.
fn printable(body: &[u8]) -> String {
    String::from_utf8_lossy(body)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX_ERROR_EXCERPT)
        .collect::<String>()
        .trim()
        .to_owned()
}
