//! The relay's side of NATS: connecting, making sure the stream exists and
//! is ours, reading where it ends, and publishing with an ack and a fence.
//!
//! Every publish carries `Nats-Expected-Last-Sequence`: JetStream stores it
//! only if the stream still ends where this relay last saw it end. Two
//! relays that both believe they hold the lease (one cut off from Postgres
//! a moment too long) can therefore never interleave or repeat events; the
//! one refused reads the stream's end again and goes on from there.

use std::path::PathBuf;
use std::time::Duration;

use async_nats::jetstream::{self, context::PublishErrorKind, stream};

use super::RelayError;
use super::message::{self, Outgoing};
use crate::pause::PausePoint;

/// How to reach NATS and which stream to write.
#[derive(Clone, Debug)]
pub struct NatsOptions {
    pub url: String,
    pub stream: String,
    pub subject_prefix: String,
    /// A `.creds` file (JWT and NKey seed), as NGS and operator-mode
    /// clusters issue them.
    pub creds: Option<PathBuf>,
    pub user: Option<String>,
    pub password: Option<String>,
    /// PEM CA certificates to verify the server's TLS certificate with;
    /// setting it requires TLS.
    pub tls_ca: Option<PathBuf>,
    /// Stream settings, used when the relay creates it.
    pub max_age: Duration,
    pub duplicate_window: Duration,
    pub replicas: usize,
    /// How long to wait for a connection and for each acknowledgement.
    pub timeout: Duration,
}

/// Where the stream ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamEnd {
    /// Nothing was ever stored.
    Empty,
    /// Messages were stored and none is left (expired or purged): where the
    /// relay stopped is unknown.
    Emptied { last_sequence: u64 },
    /// The last message is complete up to `revision`; it was stored `age`
    /// ago.
    At {
        revision: u64,
        sequence: u64,
        age: Duration,
    },
}

pub struct JetStream {
    client: async_nats::Client,
    context: jetstream::Context,
    options: NatsOptions,
    /// The stream's own max age, read by [`JetStream::ensure_stream`].
    max_age: Duration,
}

/// How long ago a time given in nanoseconds since the epoch was; zero for
/// one in the future (clocks differ).
fn age_of(unix_nanos: i128) -> Duration {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as i128;
    Duration::from_nanos(u64::try_from(now - unix_nanos).unwrap_or(0))
}

/// `url` (one NATS URL or several, comma-separated) fit for logs: a
/// password is masked as for the database, and so is a lone user part,
/// which NATS reads as a token (`nats://TOKEN@host`).
pub fn redact_nats_url(url: &str) -> String {
    url.split(',')
        .map(|one| {
            let redacted = crate::store::redact_url(one);
            if redacted != one {
                return redacted;
            }
            let Some(scheme_end) = one.find("://").map(|i| i + 3) else {
                return redacted;
            };
            let authority_end = one[scheme_end..]
                .find(['/', '?'])
                .map_or(one.len(), |i| scheme_end + i);
            match one[scheme_end..authority_end].rfind('@') {
                Some(at) => format!("{}***{}", &one[..scheme_end], &one[scheme_end + at..]),
                None => redacted,
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn nats_error(operation: &'static str, err: impl std::fmt::Display) -> RelayError {
    RelayError::Nats {
        operation,
        message: err.to_string(),
    }
}

impl JetStream {
    /// Connects once, failing at once if NATS cannot be reached or refuses
    /// the credentials (bad configuration is an error at start, not a
    /// retry loop); after that the client reconnects by itself.
    pub async fn connect(options: NatsOptions) -> Result<JetStream, RelayError> {
        let connect_error = |message: String| RelayError::Connect {
            url: redact_nats_url(&options.url),
            message,
        };
        let mut connect = async_nats::ConnectOptions::new()
            .name("metadata-service relay")
            .connection_timeout(options.timeout)
            // Reconnects after the first connection never give up: an
            // outage pauses the relay, it does not end it.
            .max_reconnects(None);
        if let Some(path) = &options.creds {
            connect = connect.credentials_file(path).await.map_err(|e| {
                connect_error(format!("cannot read --nats-creds {}: {e}", path.display()))
            })?;
        }
        if let (Some(user), Some(password)) = (&options.user, &options.password) {
            connect = connect.user_and_password(user.clone(), password.clone());
        }
        if let Some(ca) = &options.tls_ca {
            connect = connect.add_root_certificates(ca.clone()).require_tls(true);
        }
        let client = connect
            // Several servers, comma-separated: one URL each.
            .connect(options.url.split(',').map(str::trim).collect::<Vec<_>>())
            .await
            .map_err(|e| connect_error(e.to_string()))?;
        let mut context = jetstream::new(client.clone());
        context.set_timeout(options.timeout);
        Ok(JetStream {
            client,
            context,
            max_age: options.max_age,
            options,
        })
    }

    /// Max age of the stream's messages; zero: they never expire.
    pub fn max_age(&self) -> Duration {
        self.max_age
    }

    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    fn wanted_subjects(&self) -> Vec<String> {
        vec![format!("{}.>", self.options.subject_prefix)]
    }

    /// Creates the stream if it does not exist; refuses one that holds
    /// other subjects than the relay's (it would mix foreign messages into
    /// the log, or miss ours).
    pub async fn ensure_stream(&mut self) -> Result<(), RelayError> {
        let name = &self.options.stream;
        let wanted = self.wanted_subjects();
        match self.context.get_stream(name).await {
            Ok(mut stream) => {
                let info = stream
                    .info()
                    .await
                    .map_err(|e| nats_error("stream info", e))?;
                if info.config.subjects != wanted {
                    return Err(RelayError::ForeignStream {
                        stream: name.clone(),
                        found: info.config.subjects.clone(),
                        wanted: wanted[0].clone(),
                    });
                }
                self.max_age = info.config.max_age;
                Ok(())
            }
            Err(err) if is_stream_not_found(&err) => {
                let config = stream::Config {
                    name: name.clone(),
                    description: Some(
                        "metadata-service change events, one per revision, in revision order"
                            .into(),
                    ),
                    subjects: wanted,
                    storage: stream::StorageType::File,
                    max_age: self.options.max_age,
                    duplicate_window: self.options.duplicate_window,
                    num_replicas: self.options.replicas,
                    ..Default::default()
                };
                self.context
                    .create_stream(config)
                    .await
                    .map_err(|e| nats_error("create stream", e))?;
                self.max_age = self.options.max_age;
                tracing::info!(stream = %name, "created the NATS stream");
                Ok(())
            }
            Err(err) => Err(nats_error("get stream", err)),
        }
    }

    /// Where the stream ends now.
    pub async fn end(&self) -> Result<StreamEnd, RelayError> {
        let mut stream = self
            .context
            .get_stream(&self.options.stream)
            .await
            .map_err(|e| nats_error("get stream", e))?;
        let state = stream
            .info()
            .await
            .map_err(|e| nats_error("stream info", e))?
            .state
            .clone();
        if state.last_sequence == 0 {
            return Ok(StreamEnd::Empty);
        }
        let emptied = StreamEnd::Emptied {
            last_sequence: state.last_sequence,
        };
        if state.messages == 0 {
            return Ok(emptied);
        }
        let last = match stream.get_raw_message(state.last_sequence).await {
            Ok(last) => last,
            // It expired between the two calls: every earlier one did too.
            Err(err) if is_no_message(&err) => return Ok(emptied),
            Err(err) => return Err(nats_error("get last message", err)),
        };
        match message::stored_revision(Some(&last.headers)) {
            Some(revision) => Ok(StreamEnd::At {
                revision,
                sequence: last.sequence,
                age: age_of(last.time.unix_timestamp_nanos()),
            }),
            None => Err(RelayError::ForeignMessage {
                stream: self.options.stream.clone(),
                sequence: last.sequence,
                subject: crate::logging::Escaped(last.subject.as_str()).to_string(),
            }),
        }
    }

    /// Publishes `outgoing` if the stream still ends at `expected_sequence`
    /// and waits for JetStream's ack: the sequence it was stored at.
    pub async fn publish(
        &self,
        outgoing: Outgoing,
        expected_sequence: u64,
        sent: &PausePoint,
    ) -> Result<u64, RelayError> {
        let subject = outgoing.subject;
        let publish = jetstream::message::PublishMessage::build()
            .payload(outgoing.body)
            .headers(outgoing.headers)
            .expected_last_sequence(expected_sequence);
        let ack = self
            .context
            .send_publish(subject.clone(), publish)
            .await
            .map_err(|e| match e.kind() {
                PublishErrorKind::MaxPayloadExceeded => RelayError::TooLarge {
                    subject: crate::logging::Escaped(subject.as_str()).to_string(),
                    message: e.to_string(),
                },
                _ => nats_error("publish", e),
            })?;
        sent.pass().await;
        let ack = ack.await.map_err(|e| match e.kind() {
            PublishErrorKind::WrongLastSequence => RelayError::Fenced,
            _ => nats_error("publish ack", e),
        })?;
        if ack.duplicate {
            // Stored before, by this relay before a restart or by another
            // one: the stream is not where this relay thought.
            return Err(RelayError::Fenced);
        }
        Ok(ack.sequence)
    }
}

fn is_stream_not_found(err: &jetstream::context::GetStreamError) -> bool {
    matches!(
        err.kind(),
        jetstream::context::GetStreamErrorKind::JetStream(e)
            if e.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
    )
}

fn is_no_message(err: &stream::RawMessageError) -> bool {
    match err.kind() {
        stream::LastRawMessageErrorKind::NoMessageFound => true,
        stream::LastRawMessageErrorKind::JetStream(e) => {
            e.error_code() == jetstream::ErrorCode::NO_MESSAGE_FOUND
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::redact_nats_url;

    #[test]
    fn redacts_tokens_and_passwords_of_every_url() {
        assert_eq!(redact_nats_url("nats://host:4222"), "nats://host:4222");
        assert_eq!(
            redact_nats_url("nats://s3cret@host:4222"),
            "nats://***@host:4222"
        );
        assert_eq!(
            redact_nats_url("nats://u:pw@a:4222,tls://v:pw2@b:4222,nats://tok@c"),
            "nats://u:***@a:4222,tls://v:***@b:4222,nats://***@c"
        );
    }
}
