//! The consumer's logic, kept apart from its `main` so that a test can run
//! it against a server it restarts.
//!
//! The pattern: keep the revision of the last applied event durably; on
//! start, Watch from the revision after it; apply each event, then store its
//! revision (so a crash between the two replays one event, which the
//! version check makes harmless). When the server no longer has that
//! revision (FAILED_PRECONDITION: pruned), open a live Watch first, then
//! re-read every known id with Get, and go on with the live stream: every
//! change after the Gets arrives on the stream, none is lost.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use metadata_service::proto::v1::user_metadata_service_client::UserMetadataServiceClient;
use metadata_service::proto::v1::watch_user_metadata_response::Response;
use metadata_service::proto::v1::{
    GetUserMetadataRequest, UserMetadata, UserMetadataEvent, WatchUserMetadataRequest,
};
use tonic::Code;
use tonic::transport::Channel;

/// What the consumer keeps: the newest version of every user it has seen.
/// A real consumer would write to its own database instead.
#[derive(Debug, Default)]
pub struct Replica {
    pub users: BTreeMap<String, UserMetadata>,
    /// Every event applied, in order: (revision, user id, version).
    pub applied: Vec<(u64, String, u64)>,
    pub resyncs: u64,
    /// Print one JSON line per applied event (the example binary does).
    pub echo: bool,
}

impl Replica {
    /// Applies an event unless the replica already holds that version or a
    /// newer one (a replay after a crash, or after a resync).
    fn apply(&mut self, event: &UserMetadataEvent) {
        let Some(after) = &event.after else { return };
        let known = self.users.get(&event.user_id).map_or(0, |u| u.version);
        let deleted = after.version == 0;
        if after.version > known || (deleted && known > 0) {
            self.users.insert(event.user_id.clone(), after.clone());
            self.applied
                .push((event.revision, event.user_id.clone(), after.version));
            if self.echo {
                println!(
                    r#"{{"revision":{},"user_id":{:?},"version":{}}}"#,
                    event.revision, event.user_id, after.version
                );
            }
        }
    }
}

/// The durable position: the revision of the last applied event.
pub struct Position {
    path: PathBuf,
}

impl Position {
    pub fn new(path: &Path) -> Self {
        Position {
            path: path.to_owned(),
        }
    }

    pub fn load(&self) -> anyhow::Result<u64> {
        match std::fs::read_to_string(&self.path) {
            Ok(text) => text.trim().parse().context("unreadable position file"),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(err) => Err(err.into()),
        }
    }

    /// Written to a temporary file, synced, then renamed over the old one:
    /// a crash leaves the old position or the new one, never half of one.
    pub fn store(&self, revision: u64) -> anyhow::Result<()> {
        let tmp = self.path.with_extension("tmp");
        {
            use std::io::Write;
            let mut file = std::fs::File::create(&tmp)?;
            writeln!(file, "{revision}")?;
            file.sync_all()?;
        }
        std::fs::rename(&tmp, &self.path)?;
        Ok(())
    }
}

/// Follows the changes until the stream ends (the server stopped) or
/// `max_events` were applied; returns how it ended.
pub async fn follow(
    channel: Channel,
    position: &Position,
    replica: &mut Replica,
    max_events: Option<usize>,
) -> anyhow::Result<()> {
    let mut users = UserMetadataServiceClient::new(channel);
    let last = position.load()?;
    let request = WatchUserMetadataRequest {
        // 0 would mean "from now"; the first event of all is revision 1.
        start_revision: last + 1,
        ..Default::default()
    };
    let mut stream = match users.watch(request).await {
        Ok(response) => response.into_inner(),
        Err(status) if status.code() == Code::FailedPrecondition => {
            resync(&mut users, position, replica).await?
        }
        Err(status) => return Err(status.into()),
    };
    let mut applied = 0;
    loop {
        let message = match stream.message().await {
            Ok(Some(message)) => message,
            Ok(None) => return Ok(()),
            // A stream can also end this way while it catches up, if the
            // events it was replaying are pruned under it.
            Err(status) if status.code() == Code::FailedPrecondition => {
                stream = resync(&mut users, position, replica).await?;
                continue;
            }
            Err(status) => return Err(status.into()),
        };
        match message.response {
            Some(Response::Event(event)) => {
                replica.apply(&event);
                position.store(event.revision)?;
                applied += 1;
                if max_events.is_some_and(|max| applied >= max) {
                    return Ok(());
                }
            }
            // Nothing to apply, but every event up to here was seen.
            Some(Response::Progress(progress)) if progress.revision > position.load()? => {
                position.store(progress.revision)?;
            }
            _ => {}
        }
    }
}

/// Too far behind: watch live from now, then re-read what we know.
async fn resync(
    users: &mut UserMetadataServiceClient<Channel>,
    position: &Position,
    replica: &mut Replica,
) -> anyhow::Result<tonic::Streaming<metadata_service::proto::v1::WatchUserMetadataResponse>> {
    replica.resyncs += 1;
    let mut stream = users
        .watch(WatchUserMetadataRequest::default())
        .await?
        .into_inner();
    // The first message says where the live stream starts.
    let start = match stream.message().await?.and_then(|m| m.response) {
        Some(Response::Progress(progress)) => progress.revision,
        _ => anyhow::bail!("a Watch must start with a progress message"),
    };
    let ids: Vec<String> = replica.users.keys().cloned().collect();
    for user_id in ids {
        let user = users
            .get(GetUserMetadataRequest {
                user_id: user_id.clone(),
                revision: None,
            })
            .await?
            .into_inner();
        replica.users.insert(user_id, user);
    }
    position.store(start)?;
    Ok(stream)
}
