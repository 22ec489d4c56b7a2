//! Authentication and per-field authorization on a running server, for
//! users and organizations: the identity x RPC x field matrix of each kind,
//! every way a frontend token is refused, and the safe default for servers
//! with no credentials.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use metadata_service::auth::{ApiKeys, Authenticator, FrontendConfig, FrontendTokens, hash_key};
use metadata_service::model::Field;
use metadata_service::server::{self, ServerConfig};
use serde_json::{Value as Json, json};
use tonic::{Code, Request, Status};

use crate::common::json::json;
use crate::common::{self, Backend};
use crate::harness::{TestServer, start_with};
use crate::kinds::{
    Delete, Get, History, Kind, Merge, Record, Replace, Restore, Watch, WatchMessage,
};

pub(crate) const BACKEND_KEY: &str = "test-backend-key-5b1c0f3e9a7d";
pub(crate) const SECRET: &[u8] = b"test-frontend-secret-0123456789abcdef";
const RSA_PRIVATE: &[u8] = include_bytes!("../fixtures/jwt-rsa-private.pem");
const RSA_PUBLIC: &[u8] = include_bytes!("../fixtures/jwt-rsa-public.pem");

pub(crate) const USER: &str = "user_1";
pub(crate) const ORG: &str = "org_1";

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

pub(crate) fn authenticator(frontend_key: &[u8]) -> Arc<Authenticator> {
    let keys = ApiKeys::parse(&format!("ci-backend:{}", hash_key(BACKEND_KEY)), "test").unwrap();
    let frontend = FrontendTokens::new(&FrontendConfig {
        key: frontend_key.to_vec(),
        issuer: None,
        audience: None,
        leeway: Duration::ZERO,
    })
    .unwrap();
    Arc::new(Authenticator::new(keys, Some(frontend)))
}

async fn secured(frontend_key: &[u8]) -> TestServer {
    let auth = authenticator(frontend_key);
    start_with(Backend::Sqlite, |c| c.auth = auth)
        .await
        .expect("SQLite always runs")
}

fn sign(algorithm: Algorithm, key: &EncodingKey, claims: &Json) -> String {
    jsonwebtoken::encode(&Header::new(algorithm), claims, key).unwrap()
}

fn hs256(claims: Json) -> String {
    sign(Algorithm::HS256, &EncodingKey::from_secret(SECRET), &claims)
}

pub(crate) fn session(sub: &str, org: Option<&str>) -> String {
    let mut claims = json!({"sub": sub, "exp": now() + 600, "iat": now()});
    if let Some(org) = org {
        claims["org_id"] = json!(org);
    }
    hs256(claims)
}

/// A session token that expired a minute ago.
pub(crate) fn expired_session(sub: &str) -> String {
    hs256(json!({"sub": sub, "exp": now() - 60, "iat": now() - 600}))
}

pub(crate) fn with_token<T>(message: T, token: Option<&str>) -> Request<T> {
    let mut request = Request::new(message);
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    request
}

#[derive(Clone, Copy, Debug)]
enum Identity {
    None,
    BadKey,
    BackendKey,
    FrontendOwnUser,
    FrontendOtherUser,
    FrontendWithOrg,
}

impl Identity {
    fn token(self) -> Option<String> {
        match self {
            Identity::None => None,
            Identity::BadKey => Some("not-a-configured-key".into()),
            Identity::BackendKey => Some(BACKEND_KEY.into()),
            Identity::FrontendOwnUser => Some(session(USER, None)),
            Identity::FrontendOtherUser => Some(session("user_2", None)),
            Identity::FrontendWithOrg => Some(session(USER, Some(ORG))),
        }
    }
}

/// An RPC of either kind; a write provides one field.
#[derive(Clone, Copy, Debug)]
enum Op {
    Get,
    Merge(Field),
    Replace(Field),
    Delete,
    Watch,
    /// Get as of the seeded revision.
    GetAt,
    History,
    /// Restore to the seeded revision.
    Restore,
}

use Field::{Private, Public, Unsafe};

/// Every RPC of a kind, with a write of each of its fields on its own.
#[rustfmt::skip]
const USER_OPS: [Op; 12] = [
    Op::Get, Op::Merge(Public), Op::Merge(Private), Op::Merge(Unsafe),
    Op::Replace(Public), Op::Replace(Private), Op::Replace(Unsafe), Op::Delete, Op::Watch,
    Op::GetAt, Op::History, Op::Restore,
];
#[rustfmt::skip]
const ORG_OPS: [Op; 10] = [
    Op::Get, Op::Merge(Public), Op::Merge(Private),
    Op::Replace(Public), Op::Replace(Private), Op::Delete, Op::Watch,
    Op::GetAt, Op::History, Op::Restore,
];

const OK: Code = Code::Ok;
const UNAUTH: Code = Code::Unauthenticated;
const DENIED: Code = Code::PermissionDenied;

/// The expected code of every cell, written out by hand (columns as in
/// USER_OPS and ORG_OPS).
#[rustfmt::skip]
const USER_MATRIX: [(Identity, [Code; 12]); 6] = [
    //                             Get     M.pub   M.priv  M.unsafe R.pub  R.priv  R.unsafe Delete Watch   GetAt   History Restore
    (Identity::None,              [UNAUTH, UNAUTH, UNAUTH, UNAUTH, UNAUTH, UNAUTH, UNAUTH, UNAUTH, UNAUTH, UNAUTH, UNAUTH, UNAUTH]),
    (Identity::BadKey,            [UNAUTH, UNAUTH, UNAUTH, UNAUTH, UNAUTH, UNAUTH, UNAUTH, UNAUTH, UNAUTH, UNAUTH, UNAUTH, UNAUTH]),
    (Identity::BackendKey,        [OK,     OK,     OK,     OK,     OK,     OK,     OK,     OK,     OK,     OK,     OK,     OK]),
    (Identity::FrontendOwnUser,   [OK,     DENIED, DENIED, OK,     DENIED, DENIED, DENIED, DENIED, DENIED, OK,     OK,     DENIED]),
    (Identity::FrontendOtherUser, [DENIED, DENIED, DENIED, DENIED, DENIED, DENIED, DENIED, DENIED, DENIED, DENIED, DENIED, DENIED]),
    (Identity::FrontendWithOrg,   [OK,     DENIED, DENIED, OK,     DENIED, DENIED, DENIED, DENIED, DENIED, OK,     OK,     DENIED]),
];
#[rustfmt::skip]
const ORG_MATRIX: [(Identity, [Code; 10]); 6] = [
    //                             Get     M.pub   M.priv  R.pub   R.priv  Delete  Watch   GetAt   History Restore
    (Identity::None,              [UNAUTH, UNAUTH, UNAUTH, UNAUTH, UNAUTH, UNAUTH, UNAUTH, UNAUTH, UNAUTH, UNAUTH]),
    (Identity::BadKey,            [UNAUTH, UNAUTH, UNAUTH, UNAUTH, UNAUTH, UNAUTH, UNAUTH, UNAUTH, UNAUTH, UNAUTH]),
    (Identity::BackendKey,        [OK,     OK,     OK,     OK,     OK,     OK,     OK,     OK,     OK,     OK]),
    (Identity::FrontendOwnUser,   [DENIED, DENIED, DENIED, DENIED, DENIED, DENIED, DENIED, DENIED, DENIED, DENIED]),
    (Identity::FrontendOtherUser, [DENIED, DENIED, DENIED, DENIED, DENIED, DENIED, DENIED, DENIED, DENIED, DENIED]),
    (Identity::FrontendWithOrg,   [OK,     DENIED, DENIED, DENIED, DENIED, DENIED, DENIED, OK,     OK,     DENIED]),
];

/// The ops of `kind` and, for each identity, the expected code of each.
fn matrix(kind: Kind) -> (Vec<Op>, Vec<(Identity, Vec<Code>)>) {
    fn rows<const N: usize>(rows: [(Identity, [Code; N]); 6]) -> Vec<(Identity, Vec<Code>)> {
        rows.into_iter()
            .map(|(i, codes)| (i, codes.to_vec()))
            .collect()
    }
    match kind {
        Kind::User => (USER_OPS.to_vec(), rows(USER_MATRIX)),
        Kind::Organization => (ORG_OPS.to_vec(), rows(ORG_MATRIX)),
    }
}

/// What a successful call returned: the metadata fields present in the
/// returned record (None for Delete and Watch).
type Outcome = Result<Option<Vec<Field>>, Status>;

fn present(record: &Record) -> Option<Vec<Field>> {
    Some(
        Field::ALL
            .into_iter()
            .filter(|f| record.field(*f).is_some())
            .collect(),
    )
}

/// The id of `kind` every call of the matrix is about.
fn id(kind: Kind) -> &'static str {
    match kind {
        Kind::User => USER,
        Kind::Organization => ORG,
    }
}

/// Calls `op` on `kind` with `token`, after `seeded` was written.
async fn call(
    server: &TestServer,
    kind: Kind,
    op: Op,
    token: Option<&str>,
    seeded: &(Record, Record),
) -> Outcome {
    let mut client = kind.client(server);
    let id = id(kind);
    let written = json!({"written": "by the test"});
    Ok(match op {
        Op::Get => present(&client.get(with_token(Get::new(id), token)).await?),
        Op::Merge(f) => {
            let request = Merge::new(id).json(f, written);
            present(&client.merge(with_token(request, token)).await?)
        }
        Op::Replace(f) => {
            let request = Replace::new(id).json(f, written);
            present(&client.replace(with_token(request, token)).await?)
        }
        Op::Delete => {
            assert!(client.delete(with_token(Delete::new(id), token)).await?);
            None
        }
        Op::Watch => {
            let mut stream = client.watch(with_token(Watch, token)).await?;
            // A stream that was let in starts with a progress message, after
            // the newest revision.
            let newest = seeded.0.revision.max(seeded.1.revision);
            let first = tokio::time::timeout(Duration::from_secs(10), stream.message()).await;
            match first {
                Ok(Ok(Some(WatchMessage::Progress(revision)))) if revision >= newest => {}
                Ok(Ok(Some(WatchMessage::Event(revision)))) => {
                    panic!("{kind:?} watch: an event at {revision} before any progress")
                }
                other => panic!("{kind:?} watch, first message: {other:?}, newest {newest}"),
            }
            None
        }
        Op::GetAt => {
            let seeded = match kind {
                Kind::User => seeded.0.revision,
                Kind::Organization => seeded.1.revision,
            };
            present(&client.get(with_token(Get::at(id, seeded), token)).await?)
        }
        Op::History => {
            let request = History::of(id);
            let page = client.history(with_token(request, token)).await?;
            present(&page.events.first().expect("the seed's event").after)
        }
        Op::Restore => {
            let revision = match kind {
                Kind::User => seeded.0.revision,
                Kind::Organization => seeded.1.revision,
            };
            let request = Restore {
                id: id.into(),
                revision,
                expected_version: None,
            };
            present(&client.restore(with_token(request, token)).await?)
        }
    })
}

/// Writes known values to every field of USER and ORG as the backend, and
/// returns both records.
async fn seed(server: &TestServer) -> (Record, Record) {
    let backend = Some(BACKEND_KEY);
    let user = Replace::new(USER)
        .public(json!({"seeded": "public"}))
        .private(json!({"seeded": "private"}))
        .unsafe_(json!({"seeded": "unsafe"}));
    let org = Replace::new(ORG)
        .public(json!({"seeded": "public"}))
        .private(json!({"seeded": "private"}));
    let mut users = Kind::User.client(server);
    let mut orgs = Kind::Organization.client(server);
    let user = users.replace(with_token(user, backend)).await.unwrap();
    let org = orgs.replace(with_token(org, backend)).await.unwrap();
    (user, org)
}

async fn stored(server: &TestServer) -> (Record, Record) {
    let backend = Some(BACKEND_KEY);
    let mut users = Kind::User.client(server);
    let mut orgs = Kind::Organization.client(server);
    let user = users.get(with_token(Get::new(USER), backend)).await;
    let org = orgs.get(with_token(Get::new(ORG), backend)).await;
    (user.unwrap(), org.unwrap())
}

/// The fields each identity sees in a returned record.
fn visible(identity: Identity, kind: Kind) -> Vec<Field> {
    match (identity, kind) {
        (Identity::BackendKey, Kind::User) => vec![Public, Private, Unsafe],
        (Identity::BackendKey, Kind::Organization) => vec![Public, Private],
        (_, Kind::User) => vec![Public, Unsafe],
        (_, Kind::Organization) => vec![Public],
    }
}

async fn identity_rpc_field_matrix(backend: Backend, kind: Kind) {
    let auth = authenticator(SECRET);
    let Some(server) = start_with(backend, |c| c.auth = auth).await else {
        return;
    };
    let (ops, matrix) = matrix(kind);
    let mut failures = Vec::new();
    for (identity, codes) in matrix {
        assert_eq!(codes.len(), ops.len(), "{identity:?}: a code per op");
        let token = identity.token();
        for (op, expected) in ops.iter().copied().zip(codes) {
            let before = seed(&server).await;
            let outcome = call(&server, kind, op, token.as_deref(), &before).await;
            let code = outcome.as_ref().map_or_else(|s| s.code(), |_| Code::Ok);
            if code != expected {
                failures.push(format!(
                    "{identity:?} {op:?}: {outcome:?}, expected {expected:?}"
                ));
                continue;
            }
            match outcome {
                Ok(Some(fields)) if fields != visible(identity, kind) => {
                    failures.push(format!("{identity:?} {op:?}: response shows {fields:?}"));
                }
                Ok(_) => {}
                Err(status) => {
                    if status.message().is_empty() {
                        failures.push(format!("{identity:?} {op:?}: status without a message"));
                    }
                    // Of neither kind.
                    let after = stored(&server).await;
                    if (after.0.version, after.1.version) != (before.0.version, before.1.version) {
                        failures.push(format!("{identity:?} {op:?}: refused but written"));
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "{kind:?}:\n{}", failures.join("\n"));
}

#[tokio::test]
async fn frontend_sees_the_values_it_may_see() {
    let server = secured(SECRET).await;
    seed(&server).await;
    let token = session(USER, Some(ORG));
    let mut users = Kind::User.client(&server);
    let mut orgs = Kind::Organization.client(&server);
    let user = users.get(with_token(Get::new(USER), Some(&token))).await;
    let user = user.unwrap();
    assert_eq!(
        json(user.public.as_ref().unwrap()),
        json!({"seeded": "public"})
    );
    assert_eq!(
        json(user.unsafe_.as_ref().unwrap()),
        json!({"seeded": "unsafe"})
    );
    assert_eq!(user.private, None);

    let merge = Merge::new(USER).unsafe_(json!({"theme": "dark", "seeded": null}));
    let merged = users.merge(with_token(merge, Some(&token))).await;
    let merged = merged.unwrap();
    assert_eq!(
        json(merged.unsafe_.as_ref().unwrap()),
        json!({"theme": "dark"})
    );
    assert_eq!(merged.private, None);
    assert_eq!(merged.version, user.version + 1);

    let (user, org) = stored(&server).await;
    assert_eq!(
        json(user.private.as_ref().unwrap()),
        json!({"seeded": "private"})
    );
    let seen = orgs.get(with_token(Get::new(ORG), Some(&token))).await;
    let seen = seen.unwrap();
    assert_eq!(seen.public, org.public);
    assert_eq!(seen.private, None);
}

/// A refused frontend call says what the token may do instead: a write
/// names the field it may write (users) or who may write (organizations),
/// a read of another id names the claim that decides; no token at all is
/// told what to send.
async fn refusals_name_what_is_allowed(kind: Kind) {
    let server = secured(SECRET).await;
    // A session of USER; for the organization, in ORG.
    let (token, write, other_id, write_says, read_says): (_, _, _, &[&str], &[&str]) = match kind {
        Kind::User => (
            session(USER, None),
            Merge::new(USER)
                .public(json!({"plan": "pro"}))
                .unsafe_(json!({"theme": "dark"})),
            "user_2",
            &["public_metadata", "only unsafe_metadata"],
            &["only its own user", "sub"],
        ),
        Kind::Organization => (
            session(USER, Some(ORG)),
            Merge::new(ORG).public(json!({"plan": "pro"})),
            "org_2",
            &["Merge", "backend callers only"],
            &["only the organization in its org_id claim"],
        ),
    };
    let mut client = kind.client(&server);
    let err = client
        .merge(with_token(write, Some(&token)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    for says in write_says {
        assert!(err.message().contains(says), "{err:?} lacks {says:?}");
    }

    let err = client
        .get(with_token(Get::new(other_id), Some(&token)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    for says in read_says {
        assert!(err.message().contains(says), "{err:?} lacks {says:?}");
    }

    let err = client
        .get(with_token(Get::new(""), None))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("authorization"), "{err:?}");
}

kind_tests!(
    identity_rpc_field_matrix;
    kind_only: refusals_name_what_is_allowed,
);

/// Claims a frontend may Get both USER and ORG with.
fn claims() -> Json {
    json!({"sub": USER, "org_id": ORG, "exp": now() + 600})
}

/// Asks for USER or ORG with `token` and returns the code and message.
async fn get_with(server: &TestServer, kind: Kind, token: &str) -> (Code, String) {
    let request = with_token(Get::new(id(kind)), Some(token));
    match kind.client(server).get(request).await {
        Ok(_) => (Code::Ok, String::new()),
        Err(status) => (status.code(), status.message().to_string()),
    }
}

/// `token` lets its holder Get both USER and ORG.
async fn assert_accepted(server: &TestServer, token: &str) {
    for kind in Kind::ALL {
        let (code, message) = get_with(server, kind, token).await;
        assert_eq!(code, Code::Ok, "{kind:?}: {message}");
    }
}

/// `token` is refused for `reason` by both kinds' services.
async fn assert_refused(server: &TestServer, token: &str, reason: &str) {
    for kind in Kind::ALL {
        let (code, message) = get_with(server, kind, token).await;
        assert_eq!(code, Code::Unauthenticated, "{kind:?}: {message}");
        assert!(
            message.contains(reason),
            "{kind:?}: expected {reason:?} in {message:?}"
        );
        assert!(!message.contains(token), "the message repeats the token");
    }
}

#[tokio::test]
async fn token_with_alg_none_is_refused() {
    let server = secured(SECRET).await;
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
    let claims = URL_SAFE_NO_PAD.encode(claims().to_string());
    assert_refused(&server, &format!("{header}.{claims}."), "invalid token").await;
    // The same claims, correctly signed, are accepted.
    assert_accepted(&server, &session(USER, Some(ORG))).await;
}

#[tokio::test]
async fn token_signed_with_another_key_is_refused() {
    let server = secured(SECRET).await;
    let other = EncodingKey::from_secret(b"another-secret-of-enough-length-0123456789");
    let token = sign(Algorithm::HS256, &other, &claims());
    assert_refused(&server, &token, "bad signature").await;
    // A valid token whose signature was altered.
    let mut token = session(USER, Some(ORG));
    let last = token.pop().unwrap();
    token.push(if last == 'A' { 'B' } else { 'A' });
    assert_refused(&server, &token, "invalid token").await;
}

#[tokio::test]
async fn hmac_token_keyed_with_the_rsa_public_key_is_refused() {
    // The classic algorithm-confusion attack: the server holds an RSA public
    // key, and the attacker signs HS256 with that (public) key as the secret.
    let server = secured(RSA_PUBLIC).await;
    let forged = sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(RSA_PUBLIC),
        &claims(),
    );
    assert_refused(&server, &forged, "algorithm not accepted").await;
    let genuine = sign(
        Algorithm::RS256,
        &EncodingKey::from_rsa_pem(RSA_PRIVATE).unwrap(),
        &claims(),
    );
    assert_accepted(&server, &genuine).await;
}

#[tokio::test]
async fn rsa_token_on_an_hmac_server_is_refused() {
    let server = secured(SECRET).await;
    let token = sign(
        Algorithm::RS256,
        &EncodingKey::from_rsa_pem(RSA_PRIVATE).unwrap(),
        &claims(),
    );
    assert_refused(&server, &token, "algorithm not accepted").await;
}

#[tokio::test]
async fn expired_token_is_refused() {
    let server = secured(SECRET).await;
    let mut claims = claims();
    claims["exp"] = json!(now() - 5);
    assert_refused(&server, &hs256(claims), "expired").await;
}

#[tokio::test]
async fn token_not_valid_yet_is_refused() {
    let server = secured(SECRET).await;
    let mut claims = claims();
    claims["nbf"] = json!(now() + 300);
    assert_refused(&server, &hs256(claims), "not valid yet").await;
}

#[tokio::test]
async fn token_without_subject_is_refused() {
    let server = secured(SECRET).await;
    let mut claims = claims();
    claims.as_object_mut().unwrap().remove("sub");
    assert_refused(&server, &hs256(claims), "missing the sub claim").await;
}

#[tokio::test]
async fn issuer_and_audience_are_checked_when_configured() {
    let keys = ApiKeys::default();
    let frontend = FrontendTokens::new(&FrontendConfig {
        key: SECRET.to_vec(),
        issuer: Some("https://clerk.example.com".into()),
        audience: Some("metadata".into()),
        leeway: Duration::ZERO,
    })
    .unwrap();
    let auth = Arc::new(Authenticator::new(keys, Some(frontend)));
    let server = start_with(Backend::Sqlite, |c| c.auth = auth)
        .await
        .unwrap();
    let mut good = claims();
    good["iss"] = json!("https://clerk.example.com");
    good["aud"] = json!("metadata");
    assert_accepted(&server, &hs256(good.clone())).await;
    let mut wrong_issuer = good.clone();
    wrong_issuer["iss"] = json!("https://evil.example.com");
    assert_refused(&server, &hs256(wrong_issuer), "wrong issuer").await;
    let mut wrong_audience = good;
    wrong_audience["aud"] = json!("billing");
    assert_refused(&server, &hs256(wrong_audience), "wrong audience").await;
}

/// Public keys of every supported family verify the tokens of their
/// private key, and only those.
#[tokio::test]
async fn rsa_ec_and_ed25519_public_keys_are_accepted() {
    let rsa = (
        Algorithm::RS256,
        RSA_PUBLIC.to_vec(),
        EncodingKey::from_rsa_pem(RSA_PRIVATE).unwrap(),
    );
    let ec = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let ec = (
        Algorithm::ES256,
        ec.public_key_pem().into_bytes(),
        EncodingKey::from_ec_pem(ec.serialize_pem().as_bytes()).unwrap(),
    );
    let ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let ed = (
        Algorithm::EdDSA,
        ed.public_key_pem().into_bytes(),
        EncodingKey::from_ed_pem(ed.serialize_pem().as_bytes()).unwrap(),
    );
    for (algorithm, public, private) in [rsa, ec, ed] {
        let server = secured(&public).await;
        let token = sign(algorithm, &private, &claims());
        assert_accepted(&server, &token).await;
        let hmac = hs256(claims());
        assert_refused(&server, &hmac, "algorithm not accepted").await;
    }
}

#[tokio::test]
async fn health_needs_no_credentials() {
    let server = secured(SECRET).await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(server.channel().await);
    for service in [
        "metadata.v1.UserMetadataService",
        "metadata.v1.OrganizationMetadataService",
    ] {
        let reply = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            reply.status(),
            tonic_health::pb::health_check_response::ServingStatus::Serving,
            "{service}"
        );
    }
}

fn open_config(listen: &str) -> (tempfile::TempDir, ServerConfig) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("m.db").display());
    let mut config = common::config(&url);
    config.listen = listen.parse().unwrap();
    (dir, config)
}

#[tokio::test]
async fn open_server_refuses_a_public_address() {
    let (_dir, config) = open_config("0.0.0.0:0");
    let err = server::start(&config).await.err().expect("refused");
    let message = format!("{err:#}");
    assert!(
        message.contains("refusing to listen on 0.0.0.0:0"),
        "{message}"
    );
    assert!(message.contains("--allow-unauthenticated"), "{message}");
    assert!(message.contains("METADATA_API_KEYS"), "{message}");
}

#[tokio::test]
async fn open_server_starts_on_a_public_address_when_allowed_or_secured() {
    let (_dir, mut config) = open_config("0.0.0.0:0");
    config.allow_unauthenticated = true;
    server::start(&config)
        .await
        .unwrap()
        .shutdown()
        .await
        .unwrap();
    let (_dir, mut config) = open_config("0.0.0.0:0");
    config.auth = authenticator(SECRET);
    server::start(&config)
        .await
        .unwrap()
        .shutdown()
        .await
        .unwrap();
}

#[tokio::test]
async fn open_server_on_loopback_lets_everyone_in() {
    let server = start_with(Backend::Sqlite, |_| {}).await.unwrap();
    for kind in Kind::ALL {
        let merge = Merge::new(id(kind)).private(json!({"k": 1}));
        let merged = kind.client(&server).merge(with_token(merge, None)).await;
        assert_eq!(merged.unwrap().version, 1, "{kind:?}");
    }
    // A token is ignored rather than refused: nothing is configured to check it.
    assert_accepted(&server, "anything").await;
}
