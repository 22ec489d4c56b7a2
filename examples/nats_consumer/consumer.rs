//! A consumer of the relay's NATS stream: a durable pull consumer (NATS
//! keeps its position), each event applied, then acknowledged. A restart
//! resumes after the last acknowledged event; an event applied and not yet
//! acknowledged when the consumer died comes again, and is skipped because
//! its revision is not above the last one applied.

use async_nats::jetstream::{self, consumer::AckPolicy, consumer::DeliverPolicy, consumer::pull};
use metadata_service::proto::v1::UserMetadataEvent;
use metadata_service::relay::subject;
use prost::Message;
use tokio_stream::StreamExt;

/// What this consumer keeps: here the changes it applied, in order; a real
/// one keeps its own state, with the last revision beside it.
#[derive(Debug, Default)]
pub struct Applied {
    pub last_revision: u64,
    /// (revision, user id, change type) of each change applied.
    pub changes: Vec<(u64, String, String)>,
}

impl Applied {
    fn apply(&mut self, message: &jetstream::Message) -> anyhow::Result<()> {
        let header = |name: &str| {
            message
                .headers
                .as_ref()
                .and_then(|h| h.get(name))
                .map(|v| v.as_str().to_owned())
        };
        let revision: u64 = header("Metadata-Revision")
            .ok_or_else(|| anyhow::anyhow!("no Metadata-Revision"))?
            .parse()?;
        if revision <= self.last_revision {
            // Delivered again after a crash before its ack: already applied.
            return Ok(());
        }
        let event = UserMetadataEvent::decode(message.payload.as_ref())?;
        let token = message.subject.rsplit('.').next().unwrap_or_default();
        anyhow::ensure!(subject::decode_id(token).as_deref() == Some(event.user_id.as_str()));
        self.changes.push((
            revision,
            event.user_id,
            header("Metadata-Change-Type").unwrap_or_default(),
        ));
        self.last_revision = revision;
        Ok(())
    }
}

/// Applies user events from `stream` through the durable consumer
/// `durable` until `max` were received (None: forever).
pub async fn consume(
    nats_url: &str,
    stream: &str,
    subject_prefix: &str,
    durable: &str,
    applied: &mut Applied,
    max: Option<usize>,
    mut each: impl FnMut(&(u64, String, String)),
) -> anyhow::Result<()> {
    let client = async_nats::connect(nats_url).await?;
    let context = jetstream::new(client);
    let consumer: jetstream::consumer::PullConsumer = context
        .get_stream(stream)
        .await?
        .get_or_create_consumer(
            durable,
            pull::Config {
                durable_name: Some(durable.to_owned()),
                // Users only; `<prefix>.>` would add organizations and the
                // relay's markers.
                filter_subject: format!("{subject_prefix}.user.>"),
                deliver_policy: DeliverPolicy::All,
                ack_policy: AckPolicy::Explicit,
                ..Default::default()
            },
        )
        .await?;
    let mut messages = consumer.messages().await?;
    let mut received = 0;
    while max.is_none_or(|max| received < max) {
        let Some(message) = messages.next().await else {
            break;
        };
        let message = message.map_err(|e| anyhow::anyhow!(e))?;
        let before = applied.changes.len();
        applied.apply(&message)?;
        applied.changes[before..].iter().for_each(&mut each);
        // Acknowledged once applied, and confirmed by the server, so that a
        // restart does not receive it again (if it does, it is skipped).
        message.double_ack().await.map_err(|e| anyhow::anyhow!(e))?;
        received += 1;
    }
    Ok(())
}
