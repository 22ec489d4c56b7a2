//! NATS JetStream for the relay's tests: where it is, a stream name of the
//! test's own, and everything a stream holds, read back by sequence.
//!
//! Tests that need NATS run when TEST_NATS_URL is set; CI sets it and
//! METADATA_REQUIRE_NATS, so that a missing NATS fails instead of skipping.

use async_nats::jetstream;

/// The NATS URL, or None (with a note on stderr) when TEST_NATS_URL is not
/// set.
pub fn url() -> Option<String> {
    match std::env::var("TEST_NATS_URL") {
        Ok(url) => Some(url),
        Err(_) => {
            assert!(
                std::env::var_os("METADATA_REQUIRE_NATS").is_none(),
                "METADATA_REQUIRE_NATS is set but TEST_NATS_URL is not"
            );
            eprintln!("skipped: TEST_NATS_URL is not set, NATS test not run");
            None
        }
    }
}

/// A stream name and subject prefix no other test uses; the stream is
/// deleted when this is dropped.
pub struct TestStream {
    pub url: String,
    pub name: String,
    pub prefix: String,
    pub context: jetstream::Context,
}

/// A message as stored.
#[derive(Clone, Debug)]
pub struct Stored {
    pub subject: String,
    pub headers: Vec<(String, String)>,
    pub payload: bytes::Bytes,
}

impl Stored {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn revision(&self) -> u64 {
        self.header("Metadata-Revision")
            .expect("every relayed message has Metadata-Revision")
            .parse()
            .expect("a number")
    }

    pub fn is_marker(&self) -> bool {
        self.header("Metadata-Marker").is_some()
    }
}

impl TestStream {
    pub async fn new(url: &str) -> TestStream {
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let client = async_nats::connect(url).await.expect("connect to NATS");
        TestStream {
            url: url.to_owned(),
            name: format!("TEST_{}", &suffix[..12]),
            prefix: format!("test{}", &suffix[..12]),
            context: jetstream::new(client),
        }
    }

    /// Every message the stream holds, in sequence order.
    pub async fn messages(&self) -> Vec<Stored> {
        let mut stream = match self.context.get_stream(&self.name).await {
            Ok(stream) => stream,
            Err(_) => return Vec::new(),
        };
        let state = stream.info().await.expect("stream info").state.clone();
        let mut out = Vec::new();
        if state.messages == 0 {
            return out;
        }
        for sequence in state.first_sequence..=state.last_sequence {
            let Ok(message) = stream.get_raw_message(sequence).await else {
                continue;
            };
            out.push(Stored {
                subject: message.subject.to_string(),
                headers: message
                    .headers
                    .iter()
                    .flat_map(|(name, values)| {
                        values
                            .iter()
                            .map(move |v| (name.to_string(), v.as_str().to_owned()))
                    })
                    .collect(),
                payload: message.payload,
            });
        }
        out
    }

    /// The revisions of the events (not markers) in the stream, in stream
    /// order.
    pub async fn event_revisions(&self) -> Vec<u64> {
        self.messages()
            .await
            .iter()
            .filter(|m| !m.is_marker())
            .map(Stored::revision)
            .collect()
    }

    /// Waits until the stream holds an event with revision `revision` or
    /// later; panics after `wait`.
    pub async fn wait_for(&self, revision: u64, wait: std::time::Duration) {
        let what = format!("stream {} reaches revision {revision}", self.name);
        super::wait::until(&what, wait, async || {
            let last = self.event_revisions().await.last().copied().unwrap_or(0);
            if last >= revision {
                Ok(())
            } else {
                Err(format!("at revision {last}"))
            }
        })
        .await
    }
}

impl Drop for TestStream {
    fn drop(&mut self) {
        let context = self.context.clone();
        let name = self.name.clone();
        // Best effort, off the test's path: a leftover stream only takes
        // disk on the test machine.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = context.delete_stream(&name).await;
            });
        }
    }
}
