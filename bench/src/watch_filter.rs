//! Watch with a filter (issue 17): the watch fan-out of watch.rs, but each
//! subscriber's stream carries a filter, so that it is owed only a share of
//! the events, and the server evaluates every subscriber's filter on every
//! event.
//!
//! - Subscriber n watches `public_metadata.group = n % G` (G groups,
//!   `--watch-groups`).
//! - The open-loop writer merges `{"watched": <random>, "group": i % G}`
//!   into a random id i: the group of an id never changes, so every event
//!   of id i matches exactly the subscribers of group i % G (its `after`
//!   does; a first write of the group into a seeded record is a record
//!   entering the result set, its `before` does not match).
//! - Each subscriber must receive exactly the acknowledged writes of its
//!   group, once, in order: missed, repeated or out of order, and any
//!   revision it was not owed, are counted, as for the unfiltered Watch.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use metadata_service::proto::v1::user_metadata_service_client::UserMetadataServiceClient;
use metadata_service::proto::v1::watch_user_metadata_response::Response;
use metadata_service::proto::v1::{MergeUserMetadataRequest, WatchUserMetadataRequest};
use prost_types::value::Kind as ProtoKind;
use prost_types::{Struct, Value as ProtoValue};
use rand::Rng;
use tokio_stream::StreamExt;

use crate::db::id;
use crate::process::channel;
use crate::watch::{self, Delivery, STREAMS_PER_CONNECTION, Subscribers, WatchOutcome, Written};

/// The filter of subscriber n, as the report names it.
pub fn describe(groups: usize) -> String {
    format!("public_metadata.group = n % {groups}")
}

fn filter(group: usize) -> String {
    format!("public_metadata.group = {group}")
}

/// What the writer did, by group.
pub struct GroupedWrites {
    pub written: Written,
    /// The acknowledged revisions of each group, sorted.
    pub by_group: Vec<Vec<u64>>,
}

/// `count` filtered Watch streams on `server`; `owed` is filled in, before
/// the subscribers are told to finish, with each group's newest revision.
pub async fn subscribe(
    server: SocketAddr,
    count: usize,
    groups: usize,
    owed: Arc<OnceLock<Vec<u64>>>,
) -> anyhow::Result<Subscribers> {
    let mut channels = Vec::new();
    for _ in 0..count.div_ceil(STREAMS_PER_CONNECTION) {
        channels.push(channel(server).await?);
    }
    Subscribers::spawn(count, |n, ready, last| {
        let mut users =
            UserMetadataServiceClient::new(channels[n / STREAMS_PER_CONNECTION].clone());
        let group = n % groups;
        let owed = owed.clone();
        async move {
            let request = WatchUserMetadataRequest {
                filter: filter(group),
                ..Default::default()
            };
            let mut stream = users
                .watch(request)
                .await
                .context("Watch refused")?
                .into_inner();
            let first = stream.message().await?.context("stream ended at once")?;
            if !matches!(first.response, Some(Response::Progress(_))) {
                bail!("the first message is not a progress message");
            }
            ready.done();
            let deliveries = stream.map(|message| {
                Ok(match message?.response {
                    Some(Response::Event(event)) => vec![Delivery {
                        revision: event.revision,
                        committed: event.committed_at.map(|at| {
                            SystemTime::UNIX_EPOCH
                                + Duration::new(at.seconds as u64, at.nanos as u32)
                        }),
                    }],
                    _ => Vec::new(),
                })
            });
            // Until the writer is done, the newest revision owed is
            // unknown: wait for everything.
            let until = move |_newest: u64| owed.get().map_or(u64::MAX, |last| last[group]);
            watch::receive_until(last, until, deliveries).await
        }
    })
    .await
}

/// Merges at `rate` per second for `duration` through `server`, each
/// setting the written id's group.
pub async fn write(
    server: SocketAddr,
    rate: u32,
    duration: Duration,
    ids: u64,
    groups: usize,
) -> anyhow::Result<GroupedWrites> {
    let users = UserMetadataServiceClient::new(channel(server).await?);
    let acknowledged = Arc::new(Mutex::new(Vec::new()));
    let written = watch::open_loop(rate, duration, || {
        let mut users = users.clone();
        let acknowledged = acknowledged.clone();
        let (n, value) = {
            let mut rng = rand::rng();
            (
                rng.random_range(0..ids),
                rng.random_range(0..1_000_000) as f64,
            )
        };
        let group = (n % groups as u64) as usize;
        async move {
            let number = |n: f64| ProtoValue {
                kind: Some(ProtoKind::NumberValue(n)),
            };
            let patch = Struct {
                fields: [
                    ("watched".to_string(), number(value)),
                    ("group".to_string(), number(group as f64)),
                ]
                .into(),
            };
            let request = MergeUserMetadataRequest {
                user_id: id(n),
                public_metadata: Some(patch),
                ..Default::default()
            };
            let revision = users
                .merge(request)
                .await
                .map(|r| r.into_inner().revision)
                .map_err(|status| format!("{:?}: {}", status.code(), status.message()))?;
            acknowledged.lock().unwrap().push((revision, group));
            Ok(revision)
        }
    })
    .await?;
    let mut by_group = vec![Vec::new(); groups];
    for (revision, group) in acknowledged.lock().unwrap().iter() {
        by_group[*group].push(*revision);
    }
    for revisions in &mut by_group {
        revisions.sort_unstable();
    }
    Ok(GroupedWrites { written, by_group })
}

/// Filtered subscribers, and what they are owed once the writer is done.
pub struct Filtered {
    subscribers: Subscribers,
    groups: usize,
    owed: Arc<OnceLock<Vec<u64>>>,
}

/// Opens `watchers` filtered streams on `watched` (each registered when
/// this returns).
pub async fn open(watched: SocketAddr, watchers: usize, groups: usize) -> anyhow::Result<Filtered> {
    let groups = groups.max(1);
    let owed = Arc::new(OnceLock::new());
    let subscribers = subscribe(watched, watchers, groups, owed.clone()).await?;
    Ok(Filtered {
        subscribers,
        groups,
        owed,
    })
}

impl Filtered {
    /// Writes through `writer`, then compares what each subscriber
    /// received with the writes of its group.
    pub async fn run(
        self,
        writer: SocketAddr,
        rate: u32,
        duration: Duration,
        ids: u64,
    ) -> anyhow::Result<(WatchOutcome, Written)> {
        let Filtered {
            subscribers,
            groups,
            owed,
        } = self;
        let GroupedWrites { written, by_group } =
            write(writer, rate, duration, ids, groups).await?;
        let newest_of_group: Vec<u64> = by_group
            .iter()
            .map(|revisions| revisions.last().copied().unwrap_or(0))
            .collect();
        owed.set(newest_of_group)
            .map_err(|_| anyhow::anyhow!("owed revisions set twice"))?;
        let outcome = subscribers
            .finish_each(
                written.revisions.last().copied().unwrap_or(0),
                written.revisions.len() as u64,
                |n| &by_group[n % groups],
                Duration::from_secs(30),
            )
            .await?;
        Ok((outcome, written))
    }
}
