//! Signed webhooks (issue 32), on both backends, against a local HTTP
//! receiver: order, signatures (verified with the `standardwebhooks`
//! crate, which nobody here wrote), retries and Retry-After, the failure
//! window, filters and types, rotation, the network guard, a slow endpoint
//! beside a fast one, replays, and a deliverer that dies between an answer
//! and recording it. On SQLite the server delivers; on Postgres a `relay`
//! process (without NATS) does, under its lease.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use metadata_service::events::BrokerOptions;
use metadata_service::proto::v1::metadata_webhook_service_client::MetadataWebhookServiceClient;
use metadata_service::proto::v1::{
    CreateWebhookRequest, DeleteWebhookRequest, GetWebhookRequest, ListWebhooksRequest,
    MergeOrganizationMetadataRequest, ReplayWebhookRequest, RotateWebhookSecretRequest,
    UpdateWebhookRequest, Webhook,
};
use metadata_service::reason::Reason;
use metadata_service::relay::{self, RelayProcessConfig, RunningRelay};
use metadata_service::store::StoreOptions;
use metadata_service::webhook::{AllowedNetworks, WebhookOptions};
use serde_json::{Value as Json, json};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tonic::transport::Channel;

use crate::common::Backend;
use crate::common::json::structure;
use crate::common::wait::until;
use crate::error_details::expect;
use crate::harness::{self, TestServer, write};

const WAIT: Duration = Duration::from_secs(20);

type Hooks = MetadataWebhookServiceClient<Channel>;

/// One request the receiver got.
#[derive(Clone, Debug)]
struct Delivery {
    id: String,
    timestamp: String,
    signature: String,
    body: Bytes,
    headers: HeaderMap,
    at: Instant,
    /// What the receiver answered.
    status: u16,
}

impl Delivery {
    fn json(&self) -> Json {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }

    fn revision(&self) -> u64 {
        self.json()["revision"].as_str().unwrap().parse().unwrap()
    }

    /// Whether `secret` verifies it, as a receiver would.
    fn verifies_with(&self, secret: &str) -> bool {
        let mut headers = http::HeaderMap::new();
        for name in ["webhook-id", "webhook-timestamp", "webhook-signature"] {
            headers.insert(name, self.headers[name].clone());
        }
        standardwebhooks::Webhook::new(secret)
            .unwrap()
            .verify(&self.body, &headers)
            .is_ok()
    }
}

/// How the receiver answers a request.
#[derive(Clone, Debug)]
enum Reply {
    Status(u16),
    StatusBody(u16, &'static str),
    RetryAfter(u16, &'static str),
}

#[derive(Default)]
struct ReceiverState {
    requests: Mutex<Vec<Delivery>>,
    /// Answers to give first, in order; then `otherwise`.
    script: Mutex<VecDeque<Reply>>,
    otherwise: Mutex<Option<Reply>>,
    /// When set, each request waits for a permit before it is answered.
    gate: Option<Arc<Semaphore>>,
}

/// A local HTTP endpoint that records every request.
struct Receiver {
    addr: SocketAddr,
    state: Arc<ReceiverState>,
}

impl Receiver {
    async fn start() -> Receiver {
        Receiver::with_state(ReceiverState::default()).await
    }

    /// A receiver that answers only as permits are added to its gate.
    async fn gated(gate: Arc<Semaphore>) -> Receiver {
        Receiver::with_state(ReceiverState {
            gate: Some(gate),
            ..ReceiverState::default()
        })
        .await
    }

    async fn with_state(state: ReceiverState) -> Receiver {
        let state = Arc::new(state);
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(receive))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Receiver { addr, state }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook", self.addr.port())
    }

    fn script(&self, replies: impl IntoIterator<Item = Reply>) {
        self.state.script.lock().unwrap().extend(replies);
    }

    fn answer_otherwise(&self, reply: Option<Reply>) {
        *self.state.otherwise.lock().unwrap() = reply;
    }

    fn requests(&self) -> Vec<Delivery> {
        self.state.requests.lock().unwrap().clone()
    }

    /// The requests answered 2xx.
    fn delivered(&self) -> Vec<Delivery> {
        self.requests()
            .into_iter()
            .filter(|d| (200..300).contains(&d.status))
            .collect()
    }

    async fn wait_delivered(&self, count: usize) -> Vec<Delivery> {
        until("deliveries", WAIT, async || {
            let delivered = self.delivered();
            if delivered.len() >= count {
                Ok(delivered)
            } else {
                Err(format!(
                    "{} delivered, {} requests",
                    delivered.len(),
                    self.requests().len()
                ))
            }
        })
        .await
    }
}

async fn receive(
    State(state): State<Arc<ReceiverState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(gate) = &state.gate {
        gate.acquire().await.unwrap().forget();
    }
    let reply = state
        .script
        .lock()
        .unwrap()
        .pop_front()
        .or_else(|| state.otherwise.lock().unwrap().clone())
        .unwrap_or(Reply::Status(204));
    let header = |name: &str| {
        headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default()
    };
    let status = match &reply {
        Reply::Status(code) | Reply::StatusBody(code, _) | Reply::RetryAfter(code, _) => *code,
    };
    state.requests.lock().unwrap().push(Delivery {
        id: header("webhook-id"),
        timestamp: header("webhook-timestamp"),
        signature: header("webhook-signature"),
        body,
        headers: headers.clone(),
        at: Instant::now(),
        status,
    });
    let code = StatusCode::from_u16(status).unwrap();
    match reply {
        Reply::Status(_) => code.into_response(),
        Reply::StatusBody(_, text) => (code, text).into_response(),
        Reply::RetryAfter(_, after) => (code, [("retry-after", after)]).into_response(),
    }
}

/// The server, a webhook client, and on Postgres the relay process that
/// delivers.
struct Setup {
    server: TestServer,
    hooks: Hooks,
    relay: Option<RunningRelay>,
    options: WebhookOptions,
}

fn options(allowed: &str) -> WebhookOptions {
    WebhookOptions {
        allowed: Arc::new(AllowedNetworks::parse(allowed).unwrap()),
        schedule: vec![Duration::from_millis(100)],
        refresh: Duration::from_millis(200),
        lease_interval: Duration::from_millis(200),
        timeout: Duration::from_secs(5),
        ..WebhookOptions::default()
    }
}

async fn setup(backend: Backend) -> Option<Setup> {
    setup_with(backend, options("127.0.0.0/8")).await
}

async fn setup_with(backend: Backend, options: WebhookOptions) -> Option<Setup> {
    setup_custom(backend, options, |_| {}).await
}

async fn setup_custom(
    backend: Backend,
    options: WebhookOptions,
    customize: impl FnOnce(&mut metadata_service::server::ServerConfig),
) -> Option<Setup> {
    let server = harness::start_with(backend, |config| {
        config.webhooks = options.clone();
        config.events.broker.poll_interval = Duration::from_millis(200);
        customize(config);
    })
    .await?;
    let hooks = MetadataWebhookServiceClient::new(server.channel().await);
    let mut setup = Setup {
        server,
        hooks,
        relay: None,
        options,
    };
    if backend == Backend::Postgres {
        setup.relay = Some(setup.start_relay().await);
    }
    Some(setup)
}

impl Setup {
    /// A `relay` process that only delivers webhooks (Postgres).
    async fn start_relay(&self) -> RunningRelay {
        relay::start_process(RelayProcessConfig {
            database_url: self.server.db.url().to_owned(),
            store: StoreOptions::default(),
            broker: BrokerOptions {
                poll_interval: Duration::from_millis(200),
                ..BrokerOptions::default()
            },
            relay: None,
            webhooks: self.options.clone(),
            listen: "127.0.0.1:0".parse().unwrap(),
            metrics_listen: None,
        })
        .await
        .expect("the relay starts")
    }

    async fn create(&mut self, webhook: Webhook) -> (Webhook, String) {
        let created = self
            .hooks
            .create_webhook(CreateWebhookRequest {
                webhook: Some(webhook),
                start_revision: 0,
            })
            .await
            .expect("created")
            .into_inner();
        (created.webhook.unwrap(), created.secret)
    }

    async fn get(&mut self, id: &str) -> Webhook {
        self.hooks
            .get_webhook(GetWebhookRequest { id: id.into() })
            .await
            .unwrap()
            .into_inner()
    }

    /// Waits until the endpoint, as GetWebhook shows it, is as `wanted`.
    async fn wait_until(&self, id: &str, what: &str, wanted: impl Fn(&Webhook) -> bool) -> Webhook {
        let mut hooks = self.hooks.clone();
        until(what, WAIT, async || {
            let hook = hooks
                .get_webhook(GetWebhookRequest { id: id.into() })
                .await
                .unwrap()
                .into_inner();
            if wanted(&hook) { Ok(hook) } else { Err(hook) }
        })
        .await
    }

    /// Waits until the endpoint's position is past `revision` (delivered
    /// or skipped).
    async fn wait_past(&mut self, id: &str, revision: u64) -> Webhook {
        self.wait_until(id, "the endpoint's position", |h| {
            h.next_revision > revision
        })
        .await
    }

    async fn merge_org(&mut self, id: &str, public: Json) -> u64 {
        let org = self
            .server
            .orgs
            .merge(MergeOrganizationMetadataRequest {
                organization_id: id.into(),
                public_metadata: Some(structure(&public)),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        org.revision
    }

    async fn delete_user(&mut self, id: &str) -> u64 {
        self.server
            .users
            .delete(metadata_service::proto::v1::DeleteUserMetadataRequest {
                user_id: id.into(),
                ..Default::default()
            })
            .await
            .unwrap();
        // A deleted id keeps its row at the delete's revision.
        self.server
            .users
            .get(metadata_service::proto::v1::GetUserMetadataRequest {
                user_id: id.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .revision
    }

    async fn finish(self) {
        if let Some(relay) = self.relay {
            relay.shutdown().await.unwrap();
        }
    }
}

fn endpoint(url: String) -> Webhook {
    Webhook {
        url,
        description: "test".into(),
        ..Default::default()
    }
}

async fn every_change_is_delivered_in_order_and_signed(backend: Backend) {
    let Some(mut setup) = setup(backend).await else {
        return;
    };
    let receiver = Receiver::start().await;
    let (hook, secret) = setup.create(endpoint(receiver.url())).await;
    assert!(
        secret.starts_with("whsec_") && secret.len() == 6 + 44,
        "{secret}"
    );
    assert!(hook.id.starts_with("wh_"), "{}", hook.id);
    let first = write(&mut setup.server.users, "ada", json!({"plan": "pro"}))
        .await
        .revision;
    assert_eq!(
        first, hook.next_revision,
        "the endpoint starts after the create"
    );
    write(&mut setup.server.users, "bob", json!({"n": 1})).await;
    setup.merge_org("acme", json!({"seats": 3})).await;
    let last = setup.delete_user("ada").await;
    let delivered = receiver.wait_delivered(4).await;
    assert_eq!(delivered.len(), 4, "each event once");
    let revisions: Vec<u64> = delivered.iter().map(Delivery::revision).collect();
    assert_eq!(revisions, (first..=last).collect::<Vec<_>>());
    let types: Vec<String> = delivered
        .iter()
        .map(|d| d.json()["type"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        types,
        [
            "user.metadata.updated",
            "user.metadata.updated",
            "organization.metadata.updated",
            "user.metadata.deleted"
        ]
    );
    for delivery in &delivered {
        assert_eq!(delivery.id, format!("{}_{}", hook.id, delivery.revision()));
        assert!(delivery.verifies_with(&secret), "{delivery:?}");
        assert!(!delivery.verifies_with(&metadata_service::webhook::signing::new_secret()));
        assert_eq!(
            delivery.headers["content-type"].to_str().unwrap(),
            "application/json"
        );
        let now = chrono::Utc::now().timestamp();
        let sent: i64 = delivery.timestamp.parse().unwrap();
        assert!((now - sent).abs() < 60, "{sent} vs {now}");
    }
    // The data is the Watch event in proto3 JSON.
    let first = delivered[0].json();
    assert_eq!(first["data"]["revision"], json!(first["revision"]));
    assert_eq!(first["data"]["userId"], json!("ada"));
    assert_eq!(
        first["data"]["after"]["publicMetadata"],
        json!({"plan": "pro"})
    );
    assert_eq!(first["data"]["changeType"], json!("CHANGE_TYPE_MERGED"));
    assert!(first["timestamp"].as_str().unwrap().ends_with('Z'));
    let org = delivered[2].json();
    assert_eq!(org["data"]["organizationId"], json!("acme"));
    let deleted = delivered[3].json();
    assert_eq!(
        deleted["data"]["before"]["publicMetadata"],
        json!({"plan": "pro"})
    );
    let stored = setup.wait_past(&hook.id, last).await;
    assert_eq!(stored.next_revision, last + 1);
    assert_eq!((stored.attempts, stored.last_error.as_str()), (0, ""));
    setup.finish().await;
}

async fn filters_and_types_choose_what_is_delivered(backend: Backend) {
    let Some(mut setup) = setup(backend).await else {
        return;
    };
    let (deletes, pro, orgs) = (
        Receiver::start().await,
        Receiver::start().await,
        Receiver::start().await,
    );
    let (deletes_hook, _) = setup
        .create(Webhook {
            event_types: vec!["user.metadata.deleted".into()],
            ..endpoint(deletes.url())
        })
        .await;
    let (pro_hook, _) = setup
        .create(Webhook {
            filter: "public_metadata.plan = \"pro\"".into(),
            ..endpoint(pro.url())
        })
        .await;
    let (orgs_hook, _) = setup
        .create(Webhook {
            event_types: vec!["organization.metadata.updated".into()],
            ..endpoint(orgs.url())
        })
        .await;
    let a = write(&mut setup.server.users, "a", json!({"plan": "pro"}))
        .await
        .revision;
    let b = write(&mut setup.server.users, "b", json!({"plan": "free"}))
        .await
        .revision;
    let c = setup.merge_org("o", json!({"plan": "pro"})).await;
    // Leaving the result is a change to it (its before matches).
    let d = write(&mut setup.server.users, "a", json!({"plan": "free"}))
        .await
        .revision;
    let e = setup.delete_user("b").await;
    for id in [&deletes_hook.id, &pro_hook.id, &orgs_hook.id] {
        setup.wait_past(id, e).await;
    }
    let revisions = |r: &Receiver| {
        r.delivered()
            .iter()
            .map(Delivery::revision)
            .collect::<Vec<_>>()
    };
    assert_eq!(revisions(&deletes), [e]);
    assert_eq!(revisions(&pro), [a, c, d]);
    assert_eq!(revisions(&orgs), [c]);
    let _ = b;
    setup.finish().await;
}

async fn failures_are_retried_with_the_same_id_and_retry_after(backend: Backend) {
    let Some(mut setup) = setup(backend).await else {
        return;
    };
    let receiver = Receiver::start().await;
    receiver.script([
        Reply::Status(503),
        Reply::StatusBody(500, "boom\r\nX-Injected: 1"),
        Reply::RetryAfter(429, "1"),
    ]);
    let (hook, secret) = setup.create(endpoint(receiver.url())).await;
    let revision = write(&mut setup.server.users, "u", json!({"n": 1}))
        .await
        .revision;
    let delivered = receiver.wait_delivered(1).await;
    let requests = receiver.requests();
    assert_eq!(
        requests.iter().map(|r| r.status).collect::<Vec<_>>(),
        [503, 500, 429, 204]
    );
    for request in &requests {
        assert_eq!(request.id, format!("{}_{revision}", hook.id));
        assert_eq!(request.body, delivered[0].body);
        assert!(request.verifies_with(&secret));
    }
    // The schedule's 100 ms (±20%) between the first ones; the endpoint's
    // Retry-After (1 s) before the last.
    assert!(requests[1].at - requests[0].at >= Duration::from_millis(80));
    assert!(
        requests[3].at - requests[2].at >= Duration::from_secs(1),
        "{:?}",
        requests[3].at - requests[2].at
    );
    let stored = setup.wait_past(&hook.id, revision).await;
    assert_eq!((stored.attempts, stored.last_error.as_str()), (0, ""));
    // While failing, the endpoint says how, on one line.
    receiver.answer_otherwise(Some(Reply::StatusBody(500, "down\nfor maintenance")));
    let second = write(&mut setup.server.users, "u", json!({"n": 2}))
        .await
        .revision;
    let failing = setup
        .wait_until(&hook.id, "a recorded failure", |h| h.attempts >= 2)
        .await;
    assert_eq!(failing.last_error, "HTTP 500: down for maintenance");
    assert!(failing.failing_since.is_some() && failing.next_attempt_at.is_some());
    assert!(!failing.disabled);
    // A new URL clears the failures: the next attempt goes there.
    let fixed = Receiver::start().await;
    let moved = setup
        .hooks
        .update_webhook(UpdateWebhookRequest {
            webhook: Some(Webhook {
                id: hook.id.clone(),
                url: fixed.url(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["url".into()],
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((moved.attempts, moved.last_error.as_str()), (0, ""));
    assert!(moved.failing_since.is_none() && moved.next_attempt_at.is_none());
    let delivered = fixed.wait_delivered(1).await;
    assert_eq!(delivered[0].revision(), second);
    setup.finish().await;
}

async fn an_endpoint_failing_past_its_window_is_disabled_then_resumes(backend: Backend) {
    let mut options = options("127.0.0.0/8");
    options.failure_window = Duration::from_secs(1);
    options.schedule = vec![Duration::from_millis(200)];
    let Some(mut setup) = setup_with(backend, options).await else {
        return;
    };
    let receiver = Receiver::start().await;
    receiver.answer_otherwise(Some(Reply::Status(500)));
    let (hook, _) = setup.create(endpoint(receiver.url())).await;
    let first = write(&mut setup.server.users, "u", json!({"n": 1}))
        .await
        .revision;
    let second = write(&mut setup.server.users, "u", json!({"n": 2}))
        .await
        .revision;
    let disabled = setup
        .wait_until(&hook.id, "the endpoint is disabled", |h| h.disabled)
        .await;
    assert!(
        disabled.disabled_reason.starts_with("failing since ")
            && disabled.disabled_reason.ends_with(": HTTP 500"),
        "{}",
        disabled.disabled_reason
    );
    assert_eq!(disabled.next_revision, first, "it stops where it failed");
    assert!(receiver.delivered().is_empty());
    // Disabled, it is left alone.
    let attempts = receiver.requests().len();
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(receiver.requests().len(), attempts);
    // Re-enabled, it resumes from where it stopped.
    receiver.answer_otherwise(None);
    let enabled = setup
        .hooks
        .update_webhook(UpdateWebhookRequest {
            webhook: Some(Webhook {
                id: hook.id.clone(),
                disabled: false,
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["disabled".into()],
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!enabled.disabled && enabled.disabled_reason.is_empty());
    assert_eq!(enabled.url, receiver.url(), "the mask left the URL alone");
    let delivered = receiver.wait_delivered(2).await;
    assert_eq!(
        delivered.iter().map(Delivery::revision).collect::<Vec<_>>(),
        [first, second]
    );
    setup.finish().await;
}

async fn rotated_secrets_sign_side_by_side_during_the_grace_period(backend: Backend) {
    let Some(mut setup) = setup(backend).await else {
        return;
    };
    let receiver = Receiver::start().await;
    let (hook, first_secret) = setup.create(endpoint(receiver.url())).await;
    write(&mut setup.server.users, "u", json!({"n": 1})).await;
    let before = receiver.wait_delivered(1).await;
    assert_eq!(before[0].signature.split(' ').count(), 1);
    let rotate = |grace: Option<prost_types::Duration>| RotateWebhookSecretRequest {
        id: hook.id.clone(),
        grace_period: grace,
    };
    let rotated = setup
        .hooks
        .rotate_webhook_secret(rotate(Some(prost_types::Duration {
            seconds: 3600,
            nanos: 0,
        })))
        .await
        .unwrap()
        .into_inner();
    let second_secret = rotated.secret;
    assert_ne!(second_secret, first_secret);
    write(&mut setup.server.users, "u", json!({"n": 2})).await;
    let during = receiver.wait_delivered(2).await;
    assert_eq!(
        during[1].signature.split(' ').count(),
        2,
        "{}",
        during[1].signature
    );
    assert!(during[1].verifies_with(&first_secret));
    assert!(during[1].verifies_with(&second_secret));
    let third_secret = setup
        .hooks
        .rotate_webhook_secret(rotate(Some(prost_types::Duration::default())))
        .await
        .unwrap()
        .into_inner()
        .secret;
    write(&mut setup.server.users, "u", json!({"n": 3})).await;
    let after = receiver.wait_delivered(3).await;
    assert_eq!(after[2].signature.split(' ').count(), 1);
    assert!(after[2].verifies_with(&third_secret));
    assert!(!after[2].verifies_with(&second_secret));
    assert!(!after[2].verifies_with(&first_secret));
    // Over 7 days of grace is refused.
    let refused = setup
        .hooks
        .rotate_webhook_secret(rotate(Some(prost_types::Duration {
            seconds: 8 * 24 * 3600,
            nanos: 0,
        })))
        .await
        .unwrap_err();
    expect(&refused, Reason::DurationTooLong);
    setup.finish().await;
}

async fn deliveries_reach_only_allowed_networks(backend: Backend) {
    // Loopback is not allowed here: only a network nothing listens on.
    let Some(mut setup) = setup_with(backend, options("10.0.0.0/8")).await else {
        return;
    };
    let receiver = Receiver::start().await;
    for (url, why) in [
        (receiver.url(), "plain http://"),
        (
            format!("https://127.0.0.1:{}/hook", receiver.addr.port()),
            "loopback",
        ),
        (
            "https://169.254.169.254/latest/meta-data".into(),
            "link-local",
        ),
        ("https://[fd00::1]/".into(), "unique local"),
        (
            "https://user:secret@hooks.example.com/".into(),
            "credentials",
        ),
        ("ftp://hooks.example.com/".into(), "scheme"),
    ] {
        let status = setup
            .hooks
            .create_webhook(CreateWebhookRequest {
                webhook: Some(endpoint(url.clone())),
                start_revision: 0,
            })
            .await
            .unwrap_err();
        let said = expect(&status, Reason::InvalidWebhookUrl);
        assert_eq!(said.metadata["field"], "webhook.url");
        assert!(
            status.message().contains(why),
            "{url}: {}",
            status.message()
        );
        assert!(
            !status.message().contains("secret@"),
            "{}",
            status.message()
        );
    }
    // A name is checked where it is connected to: `localhost` passes the
    // create (https), and its loopback address is refused at delivery.
    let (hook, _) = setup
        .create(endpoint(format!(
            "https://localhost:{}/hook",
            receiver.addr.port()
        )))
        .await;
    write(&mut setup.server.users, "u", json!({"n": 1})).await;
    let refused = setup
        .wait_until(&hook.id, "a refused delivery", |h| h.attempts >= 1)
        .await;
    assert!(
        refused.last_error.contains("loopback") && refused.last_error.contains("localhost"),
        "{}",
        refused.last_error
    );
    assert!(
        receiver.requests().is_empty(),
        "nothing reached the receiver"
    );
    setup.finish().await;
}

async fn a_slow_endpoint_does_not_hold_up_a_fast_one(backend: Backend) {
    let Some(mut setup) = setup(backend).await else {
        return;
    };
    let gate = Arc::new(Semaphore::new(0));
    let slow = Receiver::gated(gate.clone()).await;
    let fast = Receiver::start().await;
    setup.create(endpoint(slow.url())).await;
    setup.create(endpoint(fast.url())).await;
    let mut revisions = Vec::new();
    for n in 0..5 {
        revisions.push(
            write(&mut setup.server.users, "u", json!({"n": n}))
                .await
                .revision,
        );
    }
    // Every event reached the fast endpoint while the slow one has not
    // answered its first.
    let fast_got = fast.wait_delivered(5).await;
    assert_eq!(
        fast_got.iter().map(Delivery::revision).collect::<Vec<_>>(),
        revisions
    );
    assert!(
        slow.requests().is_empty(),
        "the slow one is still on its first"
    );
    gate.add_permits(5);
    let slow_got = slow.wait_delivered(5).await;
    assert_eq!(
        slow_got.iter().map(Delivery::revision).collect::<Vec<_>>(),
        revisions
    );
    setup.finish().await;
}

async fn replay_delivers_again_with_the_same_ids(backend: Backend) {
    let Some(mut setup) = setup(backend).await else {
        return;
    };
    let receiver = Receiver::start().await;
    let (hook, _) = setup.create(endpoint(receiver.url())).await;
    let mut revisions = Vec::new();
    for n in 0..3 {
        revisions.push(
            write(&mut setup.server.users, "u", json!({"n": n}))
                .await
                .revision,
        );
    }
    let first = receiver.wait_delivered(3).await;
    let replayed = setup
        .hooks
        .replay_webhook(ReplayWebhookRequest {
            id: hook.id.clone(),
            revision: revisions[1],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(replayed.next_revision, revisions[1]);
    let again = receiver.wait_delivered(5).await;
    let ids = |ds: &[Delivery]| ds.iter().map(|d| d.id.clone()).collect::<Vec<_>>();
    assert_eq!(ids(&again[3..]), ids(&first[1..]));
    assert_eq!(again[3].body, first[1].body);
    let status = setup
        .hooks
        .replay_webhook(ReplayWebhookRequest {
            id: hook.id.clone(),
            revision: 0,
        })
        .await
        .unwrap_err();
    expect(&status, Reason::Unspecified);
    setup.finish().await;
}

async fn endpoints_are_listed_updated_and_deleted(backend: Backend) {
    let Some(mut setup) = setup(backend).await else {
        return;
    };
    let receiver = Receiver::start().await;
    let mut created = Vec::new();
    for n in 0..3 {
        let (hook, _) = setup
            .create(Webhook {
                description: format!("endpoint {n}"),
                ..endpoint(receiver.url())
            })
            .await;
        created.push(hook.id);
    }
    created.sort();
    let mut listed = Vec::new();
    let mut token = String::new();
    loop {
        let page = setup
            .hooks
            .list_webhooks(ListWebhooksRequest {
                page_size: 2,
                page_token: token.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.webhooks.len() <= 2);
        listed.extend(page.webhooks.into_iter().map(|w| w.id));
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    assert_eq!(listed, created);
    let updated = setup
        .hooks
        .update_webhook(UpdateWebhookRequest {
            webhook: Some(Webhook {
                id: created[0].clone(),
                description: "renamed".into(),
                event_types: vec!["user.metadata.deleted".into()],
                url: "ignored: not in the mask".into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["description".into(), "event_types".into()],
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(updated.description, "renamed");
    assert_eq!(updated.event_types, ["user.metadata.deleted"]);
    assert_eq!(updated.url, receiver.url());
    assert_eq!(setup.get(&created[0]).await, updated);
    let bad_mask = setup
        .hooks
        .update_webhook(UpdateWebhookRequest {
            webhook: Some(Webhook {
                id: created[0].clone(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["description".into(), "secret".into()],
            }),
        })
        .await
        .unwrap_err();
    let said = expect(&bad_mask, Reason::InvalidUpdateMask);
    assert_eq!(said.metadata["field"], "update_mask.paths[1]");
    for (webhook, reason, field) in [
        (
            Webhook {
                event_types: vec!["user.created".into()],
                ..endpoint(receiver.url())
            },
            Reason::UnknownEventType,
            "webhook.event_types[0]",
        ),
        (
            Webhook {
                filter: "public_metadata.plan = ".into(),
                ..endpoint(receiver.url())
            },
            Reason::InvalidFilter,
            "webhook.filter",
        ),
        (endpoint(String::new()), Reason::Unspecified, "webhook.url"),
        (
            Webhook {
                description: "x".repeat(1025),
                ..endpoint(receiver.url())
            },
            Reason::TooLarge,
            "webhook.description",
        ),
    ] {
        let status = setup
            .hooks
            .create_webhook(CreateWebhookRequest {
                webhook: Some(webhook),
                start_revision: 0,
            })
            .await
            .unwrap_err();
        let said = expect(&status, reason);
        assert_eq!(said.metadata["field"], field, "{status:?}");
    }
    let missing = setup
        .hooks
        .get_webhook(GetWebhookRequest {
            id: "wh_missing".into(),
        })
        .await
        .unwrap_err();
    let said = expect(&missing, Reason::WebhookNotFound);
    assert_eq!(said.metadata["id"], "wh_missing");
    let delete = |id: &str| DeleteWebhookRequest { id: id.into() };
    assert!(
        setup
            .hooks
            .delete_webhook(delete(&created[1]))
            .await
            .unwrap()
            .into_inner()
            .existed
    );
    assert!(
        !setup
            .hooks
            .delete_webhook(delete(&created[1]))
            .await
            .unwrap()
            .into_inner()
            .existed
    );
    let secrets_listed = setup
        .hooks
        .list_webhooks(ListWebhooksRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(secrets_listed.webhooks.len(), 2);
    assert!(!format!("{secrets_listed:?}").contains("whsec_"));
    setup.finish().await;
}

async fn pruned_events_disable_an_endpoint_until_replayed(backend: Backend) {
    let mut options = options("127.0.0.0/8");
    options.schedule = vec![Duration::from_millis(300)];
    let Some(mut setup) = setup_custom(backend, options, |config| {
        config.events.retention = Duration::from_millis(300);
        config.events.prune_interval = Duration::from_millis(100);
    })
    .await
    else {
        return;
    };
    let receiver = Receiver::start().await;
    receiver.answer_otherwise(Some(Reply::Status(503)));
    let (hook, _) = setup.create(endpoint(receiver.url())).await;
    let first = write(&mut setup.server.users, "u", json!({"n": 1}))
        .await
        .revision;
    write(&mut setup.server.users, "u", json!({"n": 2})).await;
    setup.server.db.until_pruned().await;
    let disabled = setup
        .wait_until(&hook.id, "the endpoint is disabled", |h| h.disabled)
        .await;
    assert!(
        disabled
            .disabled_reason
            .starts_with(&format!("events {first} to ")),
        "{}",
        disabled.disabled_reason
    );
    assert!(disabled.disabled_reason.contains("pruned"));
    // Too old to replay from.
    let status = setup
        .hooks
        .replay_webhook(ReplayWebhookRequest {
            id: hook.id.clone(),
            revision: first,
        })
        .await
        .unwrap_err();
    expect(&status, Reason::RevisionCompacted);
    // From now on, and enabled again, it delivers.
    receiver.answer_otherwise(None);
    let next = write(&mut setup.server.users, "u", json!({"n": 3}))
        .await
        .revision;
    setup
        .hooks
        .replay_webhook(ReplayWebhookRequest {
            id: hook.id.clone(),
            revision: next,
        })
        .await
        .unwrap();
    setup
        .hooks
        .update_webhook(UpdateWebhookRequest {
            webhook: Some(Webhook {
                id: hook.id.clone(),
                disabled: false,
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["disabled".into()],
            }),
        })
        .await
        .unwrap();
    let delivered = receiver.wait_delivered(1).await;
    assert_eq!(delivered[0].revision(), next);
    setup.finish().await;
}

/// The deliverer's metrics and health, where it runs inside the server
/// (SQLite).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_health_follow_each_endpoint() {
    let mut setup = setup(Backend::Sqlite).await.unwrap();
    let (good, bad) = (Receiver::start().await, Receiver::start().await);
    bad.answer_otherwise(Some(Reply::Status(500)));
    let (good_hook, _) = setup.create(endpoint(good.url())).await;
    let (bad_hook, secret) = setup.create(endpoint(bad.url())).await;
    for n in 0..3 {
        write(&mut setup.server.users, "u", json!({"n": n})).await;
    }
    good.wait_delivered(3).await;
    let series = |text: &str, name: &str, id: &str, more: &str| -> Option<f64> {
        text.lines()
            .filter(|line| line.starts_with(name) && line.contains(&format!("webhook=\"{id}\"")))
            .find(|line| line.contains(more))
            .and_then(|line| line.rsplit(' ').next()?.parse().ok())
    };
    let metrics = setup.server.metrics().clone();
    let (good_id, bad_id) = (good_hook.id.clone(), bad_hook.id.clone());
    until("the endpoints' series", WAIT, async || {
        let text = metrics.render();
        let seen = (
            series(
                &text,
                "metadata_webhook_deliveries_total",
                &good_id,
                "outcome=\"delivered\"",
            ),
            series(&text, "metadata_webhook_lag_revisions", &good_id, ""),
            series(
                &text,
                "metadata_webhook_deliveries_total",
                &bad_id,
                "outcome=\"failed\"",
            ),
            series(&text, "metadata_webhook_retry_attempts", &bad_id, ""),
            series(&text, "metadata_webhook_lag_revisions", &bad_id, ""),
            series(&text, "metadata_webhook_disabled", &bad_id, ""),
        );
        match seen {
            (Some(3.0), Some(0.0), Some(f), Some(a), Some(3.0), Some(0.0))
                if f >= 2.0 && a >= 1.0 =>
            {
                Ok(())
            }
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let text = metrics.render();
    assert_eq!(harness::metric(&text, "metadata_webhook_lease_held"), 1.0);
    assert!(
        !text.contains(&secret) && !text.contains(&bad.url()),
        "no secret, no URL"
    );
    let mut health =
        tonic_health::pb::health_client::HealthClient::new(setup.server.channel().await);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "webhooks".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status();
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
    // A deleted endpoint's series go.
    setup
        .hooks
        .delete_webhook(DeleteWebhookRequest { id: bad_id.clone() })
        .await
        .unwrap();
    until("the deleted endpoint's series are gone", WAIT, async || {
        let text = metrics.render();
        match series(&text, "metadata_webhook_lag_revisions", &bad_id, "") {
            None => Ok(()),
            Some(value) => Err(value),
        }
    })
    .await;
    setup.finish().await;
}

/// What the deliverer logs names the endpoint by id and the failure by
/// its status: never the URL (it may carry a token), the secret, or the
/// response's body. A current-thread runtime, so that the server's tasks
/// log on the thread whose logs are captured.
#[tokio::test]
async fn logs_carry_no_url_secret_or_response_body() {
    let mut options = options("127.0.0.0/8");
    options.failure_window = Duration::from_millis(300);
    let (captured, _guard) = harness::capture_logs(tracing::Level::INFO);
    let mut setup = setup_with(Backend::Sqlite, options).await.unwrap();
    let receiver = Receiver::start().await;
    receiver.answer_otherwise(Some(Reply::StatusBody(500, "boom-body-text")));
    let (hook, secret) = setup
        .create(endpoint(format!("{}?token=s3cr3t-in-url", receiver.url())))
        .await;
    write(&mut setup.server.users, "u", json!({"n": 1})).await;
    let disabled = setup
        .wait_until(&hook.id, "the endpoint is disabled", |h| h.disabled)
        .await;
    assert!(
        disabled
            .disabled_reason
            .ends_with("HTTP 500: boom-body-text")
    );
    let lines = captured.lines();
    let text = lines.join("\n");
    assert!(text.contains("webhook delivery failed"), "{text}");
    assert!(text.contains("webhook endpoint disabled"), "{text}");
    assert!(
        text.contains(&hook.id) && text.contains("HTTP 500"),
        "{text}"
    );
    for hidden in ["boom-body-text", "s3cr3t-in-url", &secret, "whsec_"] {
        assert!(!text.contains(hidden), "{hidden} in the logs:\n{text}");
    }
    setup.finish().await;
}

backend_tests!(
    pruned_events_disable_an_endpoint_until_replayed,
    every_change_is_delivered_in_order_and_signed,
    filters_and_types_choose_what_is_delivered,
    failures_are_retried_with_the_same_id_and_retry_after,
    an_endpoint_failing_past_its_window_is_disabled_then_resumes,
    rotated_secrets_sign_side_by_side_during_the_grace_period,
    deliveries_reach_only_allowed_networks,
    a_slow_endpoint_does_not_hold_up_a_fast_one,
    replay_delivers_again_with_the_same_ids,
    endpoints_are_listed_updated_and_deleted,
);

/// Two `relay` processes on one Postgres database: the one delivering dies
/// after an event was answered 2xx and before its position was stored;
/// the standby takes the lease and sends that event again, with the same
/// `webhook-id`, then the rest in order. Nothing is skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deliverer_killed_between_answer_and_record_is_taken_over() {
    let Some(mut setup) = setup(Backend::Postgres).await else {
        return;
    };
    let first = setup.relay.take().unwrap();
    until("the first relay delivers", WAIT, async || {
        first.webhooks.holds_lease().then_some(()).ok_or("no lease")
    })
    .await;
    let second = setup.start_relay().await;
    let receiver = Receiver::start().await;
    let (hook, secret) = setup.create(endpoint(receiver.url())).await;
    let mut revisions = Vec::new();
    for n in 0..3 {
        revisions.push(
            write(&mut setup.server.users, "u", json!({"n": n}))
                .await
                .revision,
        );
    }
    receiver.wait_delivered(3).await;
    let pause = setup.options.pauses.delivered.clone();
    pause.arm(1);
    revisions.push(
        write(&mut setup.server.users, "u", json!({"n": 3}))
            .await
            .revision,
    );
    assert!(pause.reached(WAIT).await, "the deliverer got its 2xx");
    first.kill();
    // Dead once its lease is gone (dropping the deliverer releases the
    // lease and aborts its endpoint tasks): only then may the paused task
    // be let go, as a killed process never goes on.
    until("the standby takes over", WAIT, async || {
        second
            .webhooks
            .holds_lease()
            .then_some(())
            .ok_or("no lease")
    })
    .await;
    pause.release();
    for n in 4..6 {
        revisions.push(
            write(&mut setup.server.users, "u", json!({"n": n}))
                .await
                .revision,
        );
    }
    let delivered = receiver.wait_delivered(7).await;
    let got: Vec<u64> = delivered.iter().map(Delivery::revision).collect();
    let mut expected = revisions.clone();
    expected.insert(4, revisions[3]);
    assert_eq!(
        got, expected,
        "the answered event again, then the rest in order"
    );
    assert_eq!(
        delivered[3].id, delivered[4].id,
        "the repeat has the same webhook-id"
    );
    assert!(delivered.iter().all(|d| d.verifies_with(&secret)));
    let stored = setup.wait_past(&hook.id, revisions[5]).await;
    assert_eq!(stored.next_revision, revisions[5] + 1);
    second.shutdown().await.unwrap();
}
