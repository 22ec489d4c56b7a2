//! The NATS JetStream relay against a real NATS (TEST_NATS_URL): what the
//! stream holds after writes on two replicas, crashes at the worst
//! moments (test pause points), a NATS outage (a proxy the test cuts), two
//! relays at once, and the errors that stop it. The relay runs in this
//! process (`relay::start_process`, as `metadata-service relay` does);
//! `real_binary/relay.rs` kills the real binary with SIGKILL.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use metadata_service::events::BrokerOptions;
use metadata_service::model::Kind;
use metadata_service::proto::v1::organization_metadata_service_client::OrganizationMetadataServiceClient;
use metadata_service::proto::v1::user_metadata_service_client::UserMetadataServiceClient;
use metadata_service::proto::v1::watch_organization_metadata_response::Response as OrgResponse;
use metadata_service::proto::v1::watch_user_metadata_response::Response as UserResponse;
use metadata_service::proto::v1::*;
use metadata_service::relay::{
    self, Format, NatsOptions, RelayOptions, RelayProcessConfig, RunningRelay, subject,
};
use metadata_service::store::{Store, StoreOptions};
use prost::Message;
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;
use tokio::task::JoinHandle;

use crate::common::Backend;
use crate::common::json::structure;
use crate::common::nats::{self, Stored, TestStream};
use crate::common::wait::until;
use crate::harness::{self, TestServer, connect, write};

const WAIT: Duration = Duration::from_secs(20);

/// The relay's options for `stream` on the NATS at `url`, quick to take
/// over and to time out (also the consumer example's).
pub(crate) fn options(stream: &TestStream, url: &str) -> RelayOptions {
    RelayOptions {
        nats: NatsOptions {
            url: url.to_owned(),
            stream: stream.name.clone(),
            subject_prefix: stream.prefix.clone(),
            creds: None,
            user: None,
            password: None,
            tls_ca: None,
            max_age: Duration::from_secs(3600),
            duplicate_window: Duration::from_secs(120),
            replicas: 1,
            timeout: Duration::from_secs(2),
        },
        format: Format::Protobuf,
        from_now: false,
        batch: 512,
        lease_interval: Duration::from_millis(200),
        pauses: Default::default(),
    }
}

fn process_config(server: &TestServer, relay: RelayOptions) -> RelayProcessConfig {
    RelayProcessConfig {
        database_url: server.db.url().to_owned(),
        store: StoreOptions::default(),
        broker: BrokerOptions {
            poll_interval: Duration::from_millis(200),
            ..BrokerOptions::default()
        },
        relay: Some(relay),
        webhooks: Default::default(),
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: Some("127.0.0.1:0".parse().unwrap()),
    }
}

async fn start_relay(server: &TestServer, relay: RelayOptions) -> RunningRelay {
    relay::start_process(process_config(server, relay))
        .await
        .expect("relay starts")
}

/// A Postgres server and a NATS stream of the test's own; None when either
/// is not configured (CI requires both).
async fn setup() -> Option<(TestServer, TestStream)> {
    let url = nats::url()?;
    let server = harness::start(Backend::Postgres).await?;
    let stream = TestStream::new(&url).await;
    Some((server, stream))
}

/// Ids a subject token cannot hold as they are.
const AWKWARD: &[&str] = &["plain", "a.b", "star*", "gt>", "pct%2E", "x.y.z"];

/// Every id's events as Watch sends them, by revision, both kinds.
async fn watched(server: &TestServer, users: usize, orgs: usize) -> HashMap<u64, Vec<u8>> {
    let mut out = HashMap::new();
    let mut user_stream = server
        .users
        .clone()
        .watch(WatchUserMetadataRequest {
            start_revision: 1,
            ..Default::default()
        })
        .await
        .expect("watch users")
        .into_inner();
    while out.len() < users {
        let message = tokio::time::timeout(WAIT, user_stream.message())
            .await
            .expect("user events within the wait")
            .expect("stream healthy")
            .expect("stream open");
        if let Some(UserResponse::Event(event)) = message.response {
            out.insert(event.revision, event.encode_to_vec());
        }
    }
    let mut org_stream = server
        .orgs
        .clone()
        .watch(WatchOrganizationMetadataRequest {
            start_revision: 1,
            ..Default::default()
        })
        .await
        .expect("watch organizations")
        .into_inner();
    while out.len() < users + orgs {
        let message = tokio::time::timeout(WAIT, org_stream.message())
            .await
            .expect("organization events within the wait")
            .expect("stream healthy")
            .expect("stream open");
        if let Some(OrgResponse::Event(event)) = message.response {
            out.insert(event.revision, event.encode_to_vec());
        }
    }
    out
}

/// The stream is the event log: a start marker, then every event of the
/// table once, in revision order, on its id's subject, each body exactly
/// what Watch sends for that revision.
async fn assert_stream_is_the_log(server: &TestServer, stream: &TestStream) -> Vec<Stored> {
    let messages = stream.messages().await;
    let (first, rest) = messages.split_first().expect("the stream holds messages");
    assert_eq!(first.header("Metadata-Marker"), Some("start"), "{first:?}");
    assert_eq!(first.revision(), 0);
    assert!(rest.iter().all(|m| !m.is_marker()), "one marker only");
    let revisions: Vec<u64> = rest.iter().map(Stored::revision).collect();
    assert_eq!(
        revisions,
        server.db.event_revisions().await,
        "the stream's events are the table's, once each, in order"
    );
    let users = rest
        .iter()
        .filter(|m| m.header("Metadata-Kind") == Some("user"))
        .count();
    let expected = watched(server, users, rest.len() - users).await;
    for message in rest {
        let revision = message.revision();
        assert_eq!(
            message.header("Nats-Msg-Id"),
            Some(revision.to_string().as_str())
        );
        assert_eq!(
            message.payload.as_ref(),
            expected[&revision].as_slice(),
            "the body of revision {revision} is what Watch sends"
        );
        let (kind, id) = match message.header("Metadata-Kind") {
            Some("user") => {
                let event = UserMetadataEvent::decode(message.payload.as_ref()).unwrap();
                assert_eq!(
                    message.header("Content-Type"),
                    Some("application/protobuf; proto=metadata.v1.UserMetadataEvent")
                );
                (Kind::User, event.user_id)
            }
            Some("organization") => {
                let event = OrganizationMetadataEvent::decode(message.payload.as_ref()).unwrap();
                (Kind::Organization, event.organization_id)
            }
            other => panic!("unexpected kind {other:?}"),
        };
        assert_eq!(
            message.subject,
            subject::event_subject(&stream.prefix, kind, &id)
        );
        let token = message.subject.rsplit('.').next().unwrap();
        assert_eq!(subject::decode_id(token).as_deref(), Some(id.as_str()));
        assert!(message.header("Metadata-Change-Type").is_some());
    }
    messages
}

async fn merge_org(orgs: &mut harness::Orgs, id: &str, n: i64) {
    orgs.merge(MergeOrganizationMetadataRequest {
        organization_id: id.into(),
        public_metadata: Some(structure(&json!({ "n": n }))),
        ..Default::default()
    })
    .await
    .expect("merge organization");
}

async fn relays_writes_of_two_replicas_once_in_order() {
    let Some((server, stream)) = setup().await else {
        return;
    };
    let relay = start_relay(&server, options(&stream, &stream.url)).await;
    let second = server.another_server().await;
    let second_channel = connect(second.local_addr()).await;
    let mut writers = Vec::new();
    for (w, channel) in [server.channel().await, second_channel]
        .into_iter()
        .enumerate()
    {
        writers.push(tokio::spawn(async move {
            let mut users = UserMetadataServiceClient::new(channel.clone());
            let mut orgs = OrganizationMetadataServiceClient::new(channel);
            for n in 0..40i64 {
                let id = format!("{}-{w}", AWKWARD[n as usize % AWKWARD.len()]);
                if n % 4 == 3 {
                    merge_org(&mut orgs, &id, n).await;
                } else {
                    write(&mut users, &id, json!({ "n": n, "w": w })).await;
                }
                if n % 10 == 9 {
                    users
                        .delete(DeleteUserMetadataRequest {
                            user_id: id,
                            expected_version: None,
                        })
                        .await
                        .expect("delete");
                }
            }
        }));
    }
    for writer in writers {
        writer.await.unwrap();
    }
    let newest = *server.db.event_revisions().await.last().unwrap();
    stream.wait_for(newest, WAIT).await;
    let messages = assert_stream_is_the_log(&server, &stream).await;
    assert!(messages.len() > 80, "{}", messages.len());
    assert!(relay.state.holds_lease());
    let metrics = reqwest_metrics(relay.metrics_addr().unwrap()).await;
    assert_eq!(
        harness::metric(&metrics, "metadata_relay_published_total"),
        (messages.len() - 1) as f64
    );
    assert_eq!(harness::metric(&metrics, "metadata_relay_lease_held"), 1.0);
    assert_eq!(
        harness::metric(&metrics, "metadata_relay_lag_revisions"),
        0.0
    );
    assert_eq!(
        harness::metric(&metrics, "metadata_relay_revision"),
        newest as f64
    );
    relay.shutdown().await.unwrap();
    second.shutdown().await.unwrap();
}

/// GET /metrics over plain HTTP/1.1.
async fn reqwest_metrics(addr: SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut socket = TcpStream::connect(addr).await.unwrap();
    socket
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    socket.read_to_string(&mut text).await.unwrap();
    text
}

/// The relay dies at `pause` (publish sent and not acked, or acked and not
/// yet recorded); a new one goes on with no event lost or repeated.
async fn crash_at(pick: fn(&relay::RelayPauses) -> &metadata_service::pause::PausePoint) {
    let Some((mut server, stream)) = setup().await else {
        return;
    };
    let relayed = options(&stream, &stream.url);
    let relay = start_relay(&server, relayed.clone()).await;
    for n in 0..5 {
        write(&mut server.users, "before", json!({ "n": n })).await;
    }
    stream.wait_for(5, WAIT).await;
    let pause = pick(&relayed.pauses).clone();
    pause.arm(1);
    write(&mut server.users, "crash", json!({ "n": 6 })).await;
    assert!(
        pause.reached(WAIT).await,
        "the relay reached the pause point"
    );
    relay.kill();
    pause.release();
    for n in 0..5 {
        write(&mut server.users, "after", json!({ "n": n })).await;
    }
    let restarted = start_relay(&server, relayed).await;
    stream.wait_for(11, WAIT).await;
    assert_eq!(stream.event_revisions().await, (1..=11).collect::<Vec<_>>());
    assert_stream_is_the_log(&server, &stream).await;
    restarted.shutdown().await.unwrap();
}

async fn crash_after_publish_before_ack() {
    crash_at(|pauses| &pauses.sent).await
}

async fn crash_after_ack_before_moving_on() {
    crash_at(|pauses| &pauses.acked).await
}

/// A TCP proxy to NATS that the test can cut: while down it closes every
/// connection, open or new.
struct Proxy {
    addr: SocketAddr,
    up: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl Proxy {
    async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = Arc::new(AtomicBool::new(true));
        let connections: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let accept = tokio::spawn({
            let up = up.clone();
            let connections = connections.clone();
            async move {
                loop {
                    let Ok((mut inbound, _)) = listener.accept().await else {
                        return;
                    };
                    if !up.load(Ordering::SeqCst) {
                        continue;
                    }
                    let task = tokio::spawn(async move {
                        if let Ok(mut outbound) = TcpStream::connect(target).await {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                    connections.lock().await.push(task);
                }
            }
        });
        Proxy {
            addr,
            up,
            connections,
            accept,
        }
    }

    async fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        for task in self.connections.lock().await.drain(..) {
            task.abort();
        }
    }

    fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

fn socket_of(url: &str) -> SocketAddr {
    let authority = url.trim_start_matches("nats://");
    let authority = authority.rsplit('@').next().unwrap();
    std::net::ToSocketAddrs::to_socket_addrs(authority)
        .unwrap()
        .next()
        .unwrap()
}

async fn nats_outage_pauses_the_relay_and_loses_nothing() {
    let Some((mut server, stream)) = setup().await else {
        return;
    };
    let proxy = Proxy::start(socket_of(&stream.url)).await;
    let relay = start_relay(&server, options(&stream, &format!("nats://{}", proxy.addr))).await;
    for n in 0..3 {
        write(&mut server.users, "u", json!({ "n": n })).await;
    }
    stream.wait_for(3, WAIT).await;
    proxy.cut().await;
    // Writes go on while NATS is away; the relay pauses, says so in its
    // health, and its lag grows.
    for n in 3..10 {
        write(&mut server.users, "u", json!({ "n": n })).await;
    }
    let state = relay.state.clone();
    until("the relay reports the outage", WAIT, async || {
        (!state.is_healthy()).then_some(()).ok_or("healthy")
    })
    .await;
    let metrics = reqwest_metrics(relay.metrics_addr().unwrap()).await;
    assert_eq!(harness::metric(&metrics, "metadata_relay_healthy"), 0.0);
    assert!(harness::metric(&metrics, "metadata_relay_lag_revisions") >= 1.0);
    assert!(
        harness::metric(
            &metrics,
            "metadata_relay_errors_total{operation=\"publish ack\"}"
        ) >= 1.0
            || metrics.contains("metadata_relay_errors_total{operation=\"publish\"}")
    );
    let mut health =
        tonic_health::pb::health_client::HealthClient::new(connect(relay.local_addr()).await);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "relay".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::NotServing as i32
    );
    proxy.restore();
    stream.wait_for(10, WAIT).await;
    until("the relay reports it is healthy again", WAIT, async || {
        state.is_healthy().then_some(()).ok_or("unhealthy")
    })
    .await;
    assert_eq!(stream.event_revisions().await, (1..=10).collect::<Vec<_>>());
    assert_stream_is_the_log(&server, &stream).await;
    relay.shutdown().await.unwrap();
}

async fn two_relays_take_turns_without_duplicate_or_gap() {
    let Some((mut server, stream)) = setup().await else {
        return;
    };
    let first = start_relay(&server, options(&stream, &stream.url)).await;
    until("the first relay takes the lease", WAIT, async || {
        first.state.holds_lease().then_some(()).ok_or("no lease")
    })
    .await;
    let second = start_relay(&server, options(&stream, &stream.url)).await;
    for n in 0..10 {
        write(&mut server.users, "u", json!({ "n": n })).await;
    }
    stream.wait_for(10, WAIT).await;
    // The standby never published.
    let standby = reqwest_metrics(second.metrics_addr().unwrap()).await;
    assert_eq!(
        harness::metric(&standby, "metadata_relay_published_total"),
        0.0
    );
    assert_eq!(harness::metric(&standby, "metadata_relay_lease_held"), 0.0);
    assert!(second.state.is_healthy(), "a standby is healthy");
    first.kill();
    let taken = tokio::time::Instant::now();
    until("the standby takes over", WAIT, async || {
        second.state.holds_lease().then_some(()).ok_or("no lease")
    })
    .await;
    assert!(
        taken.elapsed() < Duration::from_secs(5),
        "{:?}",
        taken.elapsed()
    );
    for n in 10..20 {
        write(&mut server.users, "u", json!({ "n": n })).await;
    }
    stream.wait_for(20, WAIT).await;
    assert_eq!(stream.event_revisions().await, (1..=20).collect::<Vec<_>>());
    assert_stream_is_the_log(&server, &stream).await;
    let active = reqwest_metrics(second.metrics_addr().unwrap()).await;
    assert_eq!(
        harness::metric(&active, "metadata_relay_published_total"),
        10.0
    );
    second.shutdown().await.unwrap();
}

async fn a_stream_with_other_subjects_is_refused() {
    let Some((server, stream)) = setup().await else {
        return;
    };
    stream
        .context
        .create_stream(async_nats::jetstream::stream::Config {
            name: stream.name.clone(),
            subjects: vec![format!("{}-other.>", stream.prefix)],
            ..Default::default()
        })
        .await
        .unwrap();
    let err = relay::start_process(process_config(&server, options(&stream, &stream.url)))
        .await
        .err()
        .expect("a foreign stream is refused");
    let text = format!("{err:#}");
    assert!(text.contains("not this relay's stream"), "{text}");
    assert!(text.contains(&stream.name), "{text}");
}

async fn unreachable_nats_is_a_start_error() {
    let Some((server, stream)) = setup().await else {
        return;
    };
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("nats://{}", closed.local_addr().unwrap());
    drop(closed);
    let err = relay::start_process(process_config(&server, options(&stream, &url)))
        .await
        .err()
        .expect("unreachable NATS is refused at start");
    let text = format!("{err:#}");
    assert!(
        text.starts_with("cannot connect to NATS at nats://127.0.0.1:"),
        "{text}"
    );
}

/// The stream ends below what the table keeps: the relay stops and says how
/// to reseed; `--from-now` reseeds with a marker and goes on.
async fn past_retention_stops_then_from_now_reseeds() {
    let Some((mut server, stream)) = setup().await else {
        return;
    };
    let relayed = options(&stream, &stream.url);
    let relay = start_relay(&server, relayed.clone()).await;
    write(&mut server.users, "u", json!({ "n": 1 })).await;
    stream.wait_for(1, WAIT).await;
    relay.shutdown().await.unwrap();
    for n in 2..=4 {
        write(&mut server.users, "u", json!({ "n": n })).await;
    }
    let store = Store::connect(server.db.url(), &StoreOptions::default())
        .await
        .unwrap();
    assert!(
        store
            .prune_events(chrono::Utc::now() + chrono::Duration::seconds(1))
            .await
            .unwrap()
            > 0
    );
    store.close().await.unwrap();
    let mut stopped = start_relay(&server, relayed.clone()).await;
    let err = tokio::time::timeout(WAIT, stopped.stopped())
        .await
        .expect("the relay stops by itself")
        .expect_err("with an error");
    let text = format!("{err:#}");
    assert!(text.contains("ends at revision 1"), "{text}");
    assert!(text.contains("--from-now"), "{text}");
    assert_eq!(
        stream.event_revisions().await,
        vec![1],
        "nothing more published"
    );

    let reseeding = RelayOptions {
        from_now: true,
        ..relayed
    };
    let relay = start_relay(&server, reseeding).await;
    // Only writes after the reseed are relayed: wait for its marker.
    until("the reseed marker is stored", WAIT, async || {
        match stream.messages().await {
            messages if messages.len() >= 3 => Ok(()),
            messages => Err(messages),
        }
    })
    .await;
    write(&mut server.users, "u", json!({ "n": 5 })).await;
    stream.wait_for(5, WAIT).await;
    let messages = stream.messages().await;
    let tail: Vec<(Option<&str>, u64)> = messages[2..]
        .iter()
        .map(|m| (m.header("Metadata-Marker"), m.revision()))
        .collect();
    assert_eq!(tail, vec![(Some("reseed"), 4), (None, 5)]);
    relay.shutdown().await.unwrap();
}

async fn a_purged_stream_stops_the_relay() {
    let Some((mut server, stream)) = setup().await else {
        return;
    };
    let relayed = options(&stream, &stream.url);
    let relay = start_relay(&server, relayed.clone()).await;
    write(&mut server.users, "u", json!({ "n": 1 })).await;
    stream.wait_for(1, WAIT).await;
    relay.shutdown().await.unwrap();
    stream
        .context
        .get_stream(&stream.name)
        .await
        .unwrap()
        .purge()
        .await
        .unwrap();
    let mut stopped = start_relay(&server, relayed).await;
    let err = tokio::time::timeout(WAIT, stopped.stopped())
        .await
        .expect("the relay stops by itself")
        .expect_err("with an error");
    assert!(
        format!("{err:#}").contains("has no message left"),
        "{err:#}"
    );
}

/// `--from-now` on a stream that can be continued (a replica that still
/// has the flag takes the lease later) continues it: nothing is skipped.
async fn from_now_continues_a_stream_that_can_be_continued() {
    let Some((mut server, stream)) = setup().await else {
        return;
    };
    let relayed = options(&stream, &stream.url);
    let relay = start_relay(&server, relayed.clone()).await;
    write(&mut server.users, "u", json!({ "n": 1 })).await;
    stream.wait_for(1, WAIT).await;
    relay.shutdown().await.unwrap();
    for n in 2..=3 {
        write(&mut server.users, "u", json!({ "n": n })).await;
    }
    let relay = start_relay(
        &server,
        RelayOptions {
            from_now: true,
            ..relayed
        },
    )
    .await;
    write(&mut server.users, "u", json!({ "n": 4 })).await;
    stream.wait_for(4, WAIT).await;
    assert_eq!(stream.event_revisions().await, vec![1, 2, 3, 4]);
    assert!(
        !stream
            .messages()
            .await
            .iter()
            .any(|m| m.header("Metadata-Marker") == Some("reseed"))
    );
    relay.shutdown().await.unwrap();
}

/// A publish whose fence does not match the stream's end is refused and
/// stores nothing: two relays can never interleave.
async fn a_publish_behind_the_stream_end_is_fenced() {
    let Some((mut server, stream)) = setup().await else {
        return;
    };
    let relay = start_relay(&server, options(&stream, &stream.url)).await;
    write(&mut server.users, "u", json!({ "n": 1 })).await;
    stream.wait_for(1, WAIT).await;
    relay.shutdown().await.unwrap();
    let nats = relay::JetStream::connect(options(&stream, &stream.url).nats)
        .await
        .unwrap();
    let marker =
        relay::message::marker(relay::message::MarkerReason::Reseed, 99, 3, &stream.prefix);
    // The stream ends at sequence 2 (start marker, revision 1).
    let err = nats
        .publish(marker.clone(), 1, &Default::default())
        .await
        .expect_err("fenced");
    assert!(matches!(err, relay::RelayError::Fenced), "{err}");
    assert_eq!(stream.messages().await.len(), 2);
    nats.publish(marker, 2, &Default::default())
        .await
        .expect("at the end it is stored");
    assert_eq!(stream.messages().await.len(), 3);
}

/// Nothing is written for longer than the stream's max age: the relay's
/// progress markers keep the stream's end, so a restarted relay goes on
/// where it was instead of finding an empty stream.
async fn an_idle_stream_keeps_its_end_through_expiry() {
    let Some((mut server, stream)) = setup().await else {
        return;
    };
    let mut relayed = options(&stream, &stream.url);
    relayed.nats.max_age = Duration::from_secs(2);
    relayed.nats.duplicate_window = Duration::from_secs(1);
    let relay = start_relay(&server, relayed.clone()).await;
    write(&mut server.users, "u", json!({ "n": 1 })).await;
    stream.wait_for(1, WAIT).await;
    until("event 1 expires", WAIT, async || {
        match stream.event_revisions().await {
            left if left.is_empty() => Ok(()),
            left => Err(left),
        }
    })
    .await;
    let left = stream.messages().await;
    assert!(!left.is_empty(), "progress markers keep the stream's end");
    assert!(
        left.iter()
            .all(|m| m.header("Metadata-Marker") == Some("progress") && m.revision() == 1),
        "{left:?}"
    );
    relay.shutdown().await.unwrap();
    let restarted = start_relay(&server, relayed).await;
    write(&mut server.users, "u", json!({ "n": 2 })).await;
    stream.wait_for(2, WAIT).await;
    assert_eq!(stream.event_revisions().await, vec![2], "no repeat, no gap");
    restarted.shutdown().await.unwrap();
}

/// The `nats-server` binary, for tests that run a NATS server of their own
/// (with credentials and TLS); None (a note on stderr) when it is not
/// installed, an error when METADATA_REQUIRE_NATS is set.
fn nats_server_binary() -> Option<std::path::PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .chain([std::path::PathBuf::from("/usr/sbin")])
            .map(|dir| dir.join("nats-server"))
            .find(|path| path.is_file())
    });
    if found.is_none() {
        assert!(
            std::env::var_os("METADATA_REQUIRE_NATS").is_none(),
            "METADATA_REQUIRE_NATS is set but nats-server is not installed"
        );
        eprintln!("skipped: nats-server is not installed");
    }
    found
}

/// A NATS server of the test's own with a password and TLS (a CA made in
/// the test): the relay needs both the credentials and the CA, and says
/// which failed without printing the password.
async fn a_secured_nats_needs_its_credentials_and_ca() {
    let Some((mut server, stream)) = setup().await else {
        return;
    };
    let Some(nats_server) = nats_server_binary() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let ca = crate::common::tls::Ca::new("nats test CA");
    let leaf = ca.server_leaf();
    let path = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let (cert, key, ca_file) = (
        path("cert.pem", &leaf.cert),
        path("key.pem", &leaf.key),
        path("ca.pem", &ca.pem),
    );
    let port = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let _secured = tokio::process::Command::new(nats_server)
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
        .arg(dir.path().join("store"))
        .args([
            "--user",
            "relay",
            "--pass",
            "s3cret-pw",
            "--tls",
            "--tlscert",
        ])
        .arg(&cert)
        .arg("--tlskey")
        .arg(&key)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start nats-server");
    until("nats-server listens", WAIT, async || {
        TcpStream::connect(("127.0.0.1", port)).await.map(drop)
    })
    .await;
    let secured = |user: &str, password: &str, ca: Option<&std::path::Path>| {
        let mut relayed = options(&stream, &format!("tls://localhost:{port}"));
        relayed.nats.user = Some(user.into());
        relayed.nats.password = Some(password.into());
        relayed.nats.tls_ca = ca.map(|p| p.to_owned());
        relayed
    };
    for (relayed, why) in [
        (
            secured("relay", "wrong-pw", Some(&ca_file)),
            "a wrong password",
        ),
        (
            secured("relay", "s3cret-pw", None),
            "no CA for the server's certificate",
        ),
    ] {
        let err = relay::start_process(process_config(&server, relayed))
            .await
            .err()
            .unwrap_or_else(|| panic!("{why} is refused"));
        let text = format!("{err:#}");
        assert!(
            text.starts_with("cannot connect to NATS at tls://"),
            "{why}: {text}"
        );
        assert!(!text.contains("pw"), "{why}: {text}");
    }
    let relay = start_relay(&server, secured("relay", "s3cret-pw", Some(&ca_file))).await;
    write(&mut server.users, "u", json!({ "n": 1 })).await;
    let state = relay.state.clone();
    until("the event is relayed", WAIT, async || {
        match state.revision() {
            0 => Err(0),
            revision => Ok(revision),
        }
    })
    .await;
    let metrics = reqwest_metrics(relay.metrics_addr().unwrap()).await;
    assert_eq!(
        harness::metric(&metrics, "metadata_relay_published_total"),
        1.0
    );
    relay.shutdown().await.unwrap();
}

/// SQLite: the server relays its own events (`serve --relay-nats-url`),
/// here as proto3 JSON.
async fn sqlite_server_relays_json() {
    let Some(url) = nats::url() else {
        return;
    };
    let stream = TestStream::new(&url).await;
    let mut relayed = options(&stream, &url);
    relayed.format = Format::Json;
    let Some(mut server) = harness::start_with(Backend::Sqlite, |config| {
        config.relay = Some(relayed);
    })
    .await
    else {
        return;
    };
    write(&mut server.users, "a.b", json!({ "lang": "fr" })).await;
    merge_org(&mut server.orgs, "acme", 1).await;
    server
        .users
        .delete(DeleteUserMetadataRequest {
            user_id: "a.b".into(),
            expected_version: None,
        })
        .await
        .unwrap();
    stream.wait_for(3, WAIT).await;
    let messages = stream.messages().await;
    let bodies: Vec<serde_json::Value> = messages[1..]
        .iter()
        .map(|m| {
            assert!(
                m.header("Content-Type")
                    .unwrap()
                    .starts_with("application/json")
            );
            serde_json::from_slice(&m.payload).unwrap()
        })
        .collect();
    assert_eq!(bodies[0]["revision"], "1");
    assert_eq!(bodies[0]["changeType"], "CHANGE_TYPE_MERGED");
    // An open server names nobody: no header, and proto3 JSON leaves the
    // empty actor out.
    assert_eq!(messages[1].header("Metadata-Actor"), None);
    assert_eq!(bodies[0].get("actor"), None);
    assert_eq!(bodies[0]["userId"], "a.b");
    assert_eq!(
        bodies[0]["after"]["publicMetadata"],
        json!({ "lang": "fr" })
    );
    assert_eq!(bodies[1]["organizationId"], "acme");
    assert_eq!(
        messages[2].subject,
        format!("{}.organization.acme", stream.prefix)
    );
    assert_eq!(bodies[2]["changeType"], "CHANGE_TYPE_DELETED");
    assert_eq!(messages[3].subject, format!("{}.user.a%2Eb", stream.prefix));
    assert_eq!(
        harness::metric(&server.metrics().render(), "metadata_relay_published_total"),
        3.0
    );
}

/// A TCP proxy to NATS that, once armed, drops the first chunk from the
/// server that holds `pattern` (a JetStream publish ack), as when the
/// connection fails after the server stored a message and before its ack
/// arrives.
struct AckDropper {
    addr: SocketAddr,
    armed: Arc<AtomicBool>,
    accept: JoinHandle<()>,
}

impl AckDropper {
    async fn start(target: SocketAddr, pattern: String) -> AckDropper {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let armed = Arc::new(AtomicBool::new(false));
        let accept = tokio::spawn({
            let armed = armed.clone();
            async move {
                while let Ok((inbound, _)) = listener.accept().await {
                    let Ok(outbound) = TcpStream::connect(target).await else {
                        continue;
                    };
                    let (mut in_read, mut in_write) = inbound.into_split();
                    let (mut out_read, mut out_write) = outbound.into_split();
                    tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut in_read, &mut out_write).await;
                    });
                    let armed = armed.clone();
                    let pattern = pattern.clone().into_bytes();
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = match out_read.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            let chunk = &buf[..n];
                            if chunk
                                .windows(pattern.len())
                                .any(|w| w == pattern.as_slice())
                                && armed.swap(false, Ordering::SeqCst)
                            {
                                continue;
                            }
                            if in_write.write_all(chunk).await.is_err() {
                                return;
                            }
                        }
                    });
                }
            }
        });
        AckDropper {
            addr,
            armed,
            accept,
        }
    }
}

impl Drop for AckDropper {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// `--from-now` whose reseed marker is stored but whose ack is lost: the
/// relay must not reseed a second time at a later head, which would skip
/// the revisions committed in between.
async fn a_lost_reseed_ack_does_not_skip_revisions() {
    let Some((mut server, stream)) = setup().await else {
        return;
    };
    write(&mut server.users, "u", json!({ "n": 1 })).await;
    let dropper = AckDropper::start(
        socket_of(&stream.url),
        format!("{{\"stream\":\"{}\"", stream.name),
    )
    .await;
    dropper.armed.store(true, Ordering::SeqCst);
    let mut relayed = options(&stream, &format!("nats://{}", dropper.addr));
    relayed.from_now = true;
    let relay = start_relay(&server, relayed).await;
    // The reseed marker (at revision 1) is stored; its ack never arrives.
    until("the reseed marker is stored", WAIT, async || {
        match stream.messages().await.len() {
            0 => Err("no message"),
            _ => Ok(()),
        }
    })
    .await;
    assert!(!dropper.armed.load(Ordering::SeqCst), "the ack was dropped");
    // Revisions committed while the relay waits for that ack.
    write(&mut server.users, "u", json!({ "n": 2 })).await;
    write(&mut server.users, "u", json!({ "n": 3 })).await;
    // Past the ack timeout and the retry, the relay publishes again: what
    // it publishes first (2 and 3, or a second reseed marker) is checked
    // below.
    until(
        "the relay publishes after the lost ack",
        WAIT,
        async || match stream.messages().await {
            messages if messages.len() > 1 => Ok(()),
            messages => Err(messages),
        },
    )
    .await;
    write(&mut server.users, "u", json!({ "n": 4 })).await;
    stream.wait_for(4, WAIT).await;
    let messages = stream.messages().await;
    let seen: Vec<(Option<&str>, u64)> = messages
        .iter()
        .map(|m| (m.header("Metadata-Marker"), m.revision()))
        .collect();
    assert_eq!(
        seen,
        vec![(Some("reseed"), 1), (None, 2), (None, 3), (None, 4)],
        "revisions 2 and 3 were committed after the reseed: they are in the stream"
    );
    relay.shutdown().await.unwrap();
}

/// A stream whose messages never expire (`--nats-max-age 0s`, and the
/// duplicate window JetStream's default) needs no progress markers; an
/// idle relay must not write them in a loop.
async fn an_unlimited_max_age_writes_no_marker_storm() {
    let Some((mut server, stream)) = setup().await else {
        return;
    };
    let mut relayed = options(&stream, &stream.url);
    relayed.nats.max_age = Duration::ZERO;
    relayed.nats.duplicate_window = Duration::ZERO;
    let relay = start_relay(&server, relayed).await;
    write(&mut server.users, "u", json!({ "n": 1 })).await;
    stream.wait_for(1, WAIT).await;
    // Time is what is tested: a storm is a rate, seen only over a while of
    // idleness.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let count = stream.messages().await.len();
    assert!(
        count <= 3,
        "an idle second wrote {count} messages (start marker, event 1, at most one more)"
    );
    relay.shutdown().await.unwrap();
}

/// A NATS token in the URL (`nats://TOKEN@host`) is a secret: it must not
/// appear in the error line.
async fn a_nats_token_in_the_url_is_not_logged() {
    let Some((server, stream)) = setup().await else {
        return;
    };
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("nats://s3cr3tToken@{}", closed.local_addr().unwrap());
    drop(closed);
    let err = relay::start_process(process_config(&server, options(&stream, &url)))
        .await
        .err()
        .expect("unreachable NATS is refused at start");
    let text = format!("{err:#}");
    assert!(text.starts_with("cannot connect to NATS at"), "{text}");
    assert!(!text.contains("s3cr3tToken"), "{text}");
}

/// `--nats-url` takes several servers, comma-separated, as documented.
async fn comma_separated_nats_urls_connect() {
    let Some((mut server, stream)) = setup().await else {
        return;
    };
    let url = format!("{},{}", stream.url, stream.url);
    let relay = relay::start_process(process_config(&server, options(&stream, &url)))
        .await
        .expect("a list of NATS servers is accepted");
    write(&mut server.users, "u", json!({ "n": 1 })).await;
    stream.wait_for(1, WAIT).await;
    relay.shutdown().await.unwrap();
}

mod postgres {
    macro_rules! tests {
        ($($name:ident),* $(,)?) => {$(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                super::$name().await
            }
        )*};
    }
    tests!(
        relays_writes_of_two_replicas_once_in_order,
        crash_after_publish_before_ack,
        crash_after_ack_before_moving_on,
        nats_outage_pauses_the_relay_and_loses_nothing,
        two_relays_take_turns_without_duplicate_or_gap,
        a_stream_with_other_subjects_is_refused,
        unreachable_nats_is_a_start_error,
        past_retention_stops_then_from_now_reseeds,
        a_purged_stream_stops_the_relay,
        a_publish_behind_the_stream_end_is_fenced,
        an_idle_stream_keeps_its_end_through_expiry,
        from_now_continues_a_stream_that_can_be_continued,
        a_secured_nats_needs_its_credentials_and_ca,
        a_lost_reseed_ack_does_not_skip_revisions,
        an_unlimited_max_age_writes_no_marker_storm,
        a_nats_token_in_the_url_is_not_logged,
        comma_separated_nats_urls_connect,
    );
}

/// SQLite: the relayed message names who made the change, in the body
/// (`actor`, `traceId`) and in the `Metadata-Actor` header, which a server
/// without credentials leaves out.
async fn sqlite_relayed_messages_name_the_actor() {
    use crate::auth::{BACKEND_KEY, SECRET, authenticator, with_token};
    let Some(url) = nats::url() else {
        return;
    };
    let stream = TestStream::new(&url).await;
    let mut relayed = options(&stream, &url);
    relayed.format = Format::Json;
    let Some(mut server) = harness::start_with(Backend::Sqlite, |config| {
        config.relay = Some(relayed);
        config.auth = authenticator(SECRET);
    })
    .await
    else {
        return;
    };
    let mut request = with_token(harness::merge("u", json!({ "n": 1 })), Some(BACKEND_KEY));
    let trace = "0af7651916cd43dd8448eb211c80319c";
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace}-b7ad6b7169203331-01").parse().unwrap(),
    );
    server.users.merge(request).await.unwrap();
    stream.wait_for(1, WAIT).await;
    let messages = stream.messages().await;
    let event = &messages[1];
    assert_eq!(event.header("Metadata-Actor"), Some("key:ci-backend"));
    let body: serde_json::Value = serde_json::from_slice(&event.payload).unwrap();
    assert_eq!(body["actor"], "key:ci-backend");
    assert_eq!(body["traceId"], trace);
    assert_eq!(
        messages[0].header("Metadata-Actor"),
        None,
        "a marker names nobody"
    );
}

/// SQLite: a transaction's messages carry its id and the revision of its
/// last event, so that a consumer can hold them until it has them all;
/// a single write's carry neither. The relay reads in batches of 2 here:
/// a transaction of 5 events is still published whole, in order.
async fn sqlite_relayed_transactions_name_their_end() {
    use metadata_service::proto::v1::metadata_transaction_service_client::MetadataTransactionServiceClient;
    use metadata_service::proto::v1::transaction_operation::Operation;
    use metadata_service::proto::v1::{CommitRequest, TransactionOperation};
    let Some(url) = nats::url() else {
        return;
    };
    let stream = TestStream::new(&url).await;
    let mut relayed = options(&stream, &url);
    relayed.batch = 2;
    let Some(mut server) = harness::start_with(Backend::Sqlite, |config| {
        config.relay = Some(relayed);
    })
    .await
    else {
        return;
    };
    server
        .users
        .merge(harness::merge("single", json!({"n": 0})))
        .await
        .unwrap();
    let mut txn = MetadataTransactionServiceClient::new(server.channel().await);
    let operations = (0..5)
        .map(|i| TransactionOperation {
            operation: Some(Operation::MergeUser(harness::merge(
                &format!("t{i}"),
                json!({ "n": i }),
            ))),
        })
        .collect();
    let done = txn
        .commit(CommitRequest {
            operations,
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(done.revision, 6);
    stream.wait_for(6, WAIT).await;
    let messages = stream.messages().await;
    let events: Vec<_> = messages[1..].iter().collect();
    assert_eq!(events[0].header("Metadata-Transaction-Id"), None);
    assert_eq!(events[0].header("Metadata-Transaction-End"), None);
    for (i, event) in events[1..].iter().enumerate() {
        assert_eq!(
            event.header("Metadata-Revision"),
            Some((i + 2).to_string().as_str())
        );
        assert_eq!(
            event.header("Metadata-Transaction-Id"),
            Some(done.transaction_id.as_str())
        );
        assert_eq!(event.header("Metadata-Transaction-End"), Some("6"));
    }
}

mod sqlite {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn relayed_transactions_name_their_end() {
        super::sqlite_relayed_transactions_name_their_end().await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn server_relays_json() {
        super::sqlite_server_relays_json().await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn relayed_messages_name_the_actor() {
        super::sqlite_relayed_messages_name_the_actor().await
    }
}
