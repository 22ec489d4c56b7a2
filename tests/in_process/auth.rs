//! Authentication and per-field authorization on a running server: the
//! identity x RPC x field matrix, every way a frontend token is refused, and
//! the safe default for servers with no credentials.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use metadata_service::auth::{ApiKeys, Authenticator, FrontendConfig, FrontendTokens, hash_key};
use metadata_service::model::Field;
use metadata_service::proto::v1::*;
use metadata_service::server::{self, ServerConfig};
use serde_json::{Value as Json, json};
use tonic::{Code, Request, Status};

use crate::common::json::{json, structure, value};
use crate::common::{self, Backend};
use crate::harness::{TestServer, start_with};

const BACKEND_KEY: &str = "test-backend-key-5b1c0f3e9a7d";
const SECRET: &[u8] = b"test-frontend-secret-0123456789abcdef";
const RSA_PRIVATE: &[u8] = include_bytes!("../fixtures/jwt-rsa-private.pem");
const RSA_PUBLIC: &[u8] = include_bytes!("../fixtures/jwt-rsa-public.pem");

const USER: &str = "user_1";
const ORG: &str = "org_1";

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

fn authenticator(frontend_key: &[u8]) -> Arc<Authenticator> {
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

fn session(sub: &str, org: Option<&str>) -> String {
    let mut claims = json!({"sub": sub, "exp": now() + 600, "iat": now()});
    if let Some(org) = org {
        claims["org_id"] = json!(org);
    }
    hs256(claims)
}

fn with_token<T>(message: T, token: Option<&str>) -> Request<T> {
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

#[derive(Clone, Copy, Debug)]
enum Op {
    UserGet,
    UserMerge(Field),
    UserReplace(Field),
    UserDelete,
    UserWatch,
    OrgGet,
    OrgMerge(Field),
    OrgReplace(Field),
    OrgDelete,
    OrgWatch,
}

use Field::{Private, Public, Unsafe};
use Op::*;

const OPS: [Op; 16] = [
    UserGet,
    UserMerge(Public),
    UserMerge(Private),
    UserMerge(Unsafe),
    UserReplace(Public),
    UserReplace(Private),
    UserReplace(Unsafe),
    UserDelete,
    UserWatch,
    OrgGet,
    OrgMerge(Public),
    OrgMerge(Private),
    OrgReplace(Public),
    OrgReplace(Private),
    OrgDelete,
    OrgWatch,
];

const OK: Code = Code::Ok;
const UNAUTH: Code = Code::Unauthenticated;
const DENIED: Code = Code::PermissionDenied;

/// The expected code of every cell, written out by hand (columns as in OPS).
#[rustfmt::skip]
const MATRIX: [(Identity, [Code; 16]); 6] = [
    //                             user: Get  M.pub   M.priv  M.unsafe R.pub  R.priv  R.unsafe Delete Watch   org: Get  M.pub   M.priv  R.pub   R.priv  Delete  Watch
    (Identity::None,              [UNAUTH, UNAUTH, UNAUTH, UNAUTH, UNAUTH, UNAUTH, UNAUTH, UNAUTH, UNAUTH, UNAUTH, UNAUTH, UNAUTH, UNAUTH, UNAUTH, UNAUTH, UNAUTH]),
    (Identity::BadKey,            [UNAUTH, UNAUTH, UNAUTH, UNAUTH, UNAUTH, UNAUTH, UNAUTH, UNAUTH, UNAUTH, UNAUTH, UNAUTH, UNAUTH, UNAUTH, UNAUTH, UNAUTH, UNAUTH]),
    (Identity::BackendKey,        [OK,     OK,     OK,     OK,     OK,     OK,     OK,     OK,     OK,     OK,     OK,     OK,     OK,     OK,     OK,     OK]),
    (Identity::FrontendOwnUser,   [OK,     DENIED, DENIED, OK,     DENIED, DENIED, DENIED, DENIED, DENIED, DENIED, DENIED, DENIED, DENIED, DENIED, DENIED, DENIED]),
    (Identity::FrontendOtherUser, [DENIED, DENIED, DENIED, DENIED, DENIED, DENIED, DENIED, DENIED, DENIED, DENIED, DENIED, DENIED, DENIED, DENIED, DENIED, DENIED]),
    (Identity::FrontendWithOrg,   [OK,     DENIED, DENIED, OK,     DENIED, DENIED, DENIED, DENIED, DENIED, OK,     DENIED, DENIED, DENIED, DENIED, DENIED, DENIED]),
];

/// What a successful call returned: the metadata fields present in the
/// returned record (None for Delete and Watch).
type Outcome = Result<Option<Vec<Field>>, Status>;

fn present(fields: [(Field, &Option<prost_types::Value>); 3]) -> Option<Vec<Field>> {
    Some(
        fields
            .into_iter()
            .filter(|(_, v)| v.is_some())
            .map(|(f, _)| f)
            .collect(),
    )
}

fn user_fields(m: &UserMetadata) -> Option<Vec<Field>> {
    present([
        (Public, &m.public_metadata),
        (Private, &m.private_metadata),
        (Unsafe, &m.unsafe_metadata),
    ])
}

fn org_fields(m: &OrganizationMetadata) -> Option<Vec<Field>> {
    present([
        (Public, &m.public_metadata),
        (Private, &m.private_metadata),
        (Unsafe, &None),
    ])
}

fn patch(op_field: Field, field: Field) -> Option<prost_types::Struct> {
    (op_field == field).then(|| structure(&json!({"written": "by the test"})))
}

fn whole(op_field: Field, field: Field) -> Option<prost_types::Value> {
    (op_field == field).then(|| value(&json!({"written": "by the test"})))
}

async fn call(server: &TestServer, op: Op, token: Option<&str>) -> Outcome {
    let mut users = server.users.clone();
    let mut orgs = server.orgs.clone();
    let user_id = USER.to_string();
    let organization_id = ORG.to_string();
    Ok(match op {
        UserGet => {
            let r = users.get(with_token(GetUserMetadataRequest { user_id }, token));
            user_fields(&r.await?.into_inner())
        }
        UserMerge(f) => {
            let request = MergeUserMetadataRequest {
                user_id,
                public_metadata: patch(f, Public),
                private_metadata: patch(f, Private),
                unsafe_metadata: patch(f, Unsafe),
                expected_version: None,
            };
            user_fields(&users.merge(with_token(request, token)).await?.into_inner())
        }
        UserReplace(f) => {
            let request = ReplaceUserMetadataRequest {
                user_id,
                public_metadata: whole(f, Public),
                private_metadata: whole(f, Private),
                unsafe_metadata: whole(f, Unsafe),
                expected_version: None,
            };
            user_fields(
                &users
                    .replace(with_token(request, token))
                    .await?
                    .into_inner(),
            )
        }
        UserDelete => {
            let request = DeleteUserMetadataRequest {
                user_id,
                expected_version: None,
            };
            assert!(
                users
                    .delete(with_token(request, token))
                    .await?
                    .into_inner()
                    .existed
            );
            None
        }
        UserWatch => {
            let request = WatchUserMetadataRequest::default();
            let stream = users.watch(with_token(request, token)).await?;
            assert_opened(stream.into_inner()).await;
            None
        }
        OrgGet => {
            let r = orgs.get(with_token(
                GetOrganizationMetadataRequest { organization_id },
                token,
            ));
            org_fields(&r.await?.into_inner())
        }
        OrgMerge(f) => {
            let request = MergeOrganizationMetadataRequest {
                organization_id,
                public_metadata: patch(f, Public),
                private_metadata: patch(f, Private),
                expected_version: None,
            };
            org_fields(&orgs.merge(with_token(request, token)).await?.into_inner())
        }
        OrgReplace(f) => {
            let request = ReplaceOrganizationMetadataRequest {
                organization_id,
                public_metadata: whole(f, Public),
                private_metadata: whole(f, Private),
                expected_version: None,
            };
            org_fields(&orgs.replace(with_token(request, token)).await?.into_inner())
        }
        OrgDelete => {
            let request = DeleteOrganizationMetadataRequest {
                organization_id,
                expected_version: None,
            };
            assert!(
                orgs.delete(with_token(request, token))
                    .await?
                    .into_inner()
                    .existed
            );
            None
        }
        OrgWatch => {
            let request = WatchOrganizationMetadataRequest::default();
            let stream = orgs.watch(with_token(request, token)).await?;
            assert_opened(stream.into_inner()).await;
            None
        }
    })
}

/// A Watch stream that was let in starts with a progress message.
async fn assert_opened<T: std::fmt::Debug>(mut stream: tonic::Streaming<T>) {
    let first = tokio::time::timeout(Duration::from_secs(10), stream.message()).await;
    assert!(
        matches!(first, Ok(Ok(Some(_)))),
        "first watch message: {first:?}"
    );
}

/// Writes known values to every field of USER and ORG as the backend, and
/// returns both versions.
async fn seed(server: &TestServer) -> (UserMetadata, OrganizationMetadata) {
    let backend = Some(BACKEND_KEY);
    let user = ReplaceUserMetadataRequest {
        user_id: USER.into(),
        public_metadata: Some(value(&json!({"seeded": "public"}))),
        private_metadata: Some(value(&json!({"seeded": "private"}))),
        unsafe_metadata: Some(value(&json!({"seeded": "unsafe"}))),
        expected_version: None,
    };
    let org = ReplaceOrganizationMetadataRequest {
        organization_id: ORG.into(),
        public_metadata: Some(value(&json!({"seeded": "public"}))),
        private_metadata: Some(value(&json!({"seeded": "private"}))),
        expected_version: None,
    };
    let (mut users, mut orgs) = (server.users.clone(), server.orgs.clone());
    let user = users.replace(with_token(user, backend)).await.unwrap();
    let org = orgs.replace(with_token(org, backend)).await.unwrap();
    (user.into_inner(), org.into_inner())
}

async fn stored(server: &TestServer) -> (UserMetadata, OrganizationMetadata) {
    let backend = Some(BACKEND_KEY);
    let user = GetUserMetadataRequest {
        user_id: USER.into(),
    };
    let org = GetOrganizationMetadataRequest {
        organization_id: ORG.into(),
    };
    let (mut users, mut orgs) = (server.users.clone(), server.orgs.clone());
    let user = users.get(with_token(user, backend)).await.unwrap();
    let org = orgs.get(with_token(org, backend)).await.unwrap();
    (user.into_inner(), org.into_inner())
}

/// The fields each identity sees in a returned record.
fn visible(identity: Identity, op: Op) -> Vec<Field> {
    let org = matches!(op, OrgGet | OrgMerge(_) | OrgReplace(_));
    match (identity, org) {
        (Identity::BackendKey, false) => vec![Public, Private, Unsafe],
        (Identity::BackendKey, true) => vec![Public, Private],
        (_, false) => vec![Public, Unsafe],
        (_, true) => vec![Public],
    }
}

async fn identity_rpc_field_matrix(backend: Backend) {
    let auth = authenticator(SECRET);
    let Some(server) = start_with(backend, |c| c.auth = auth).await else {
        return;
    };
    let mut failures = Vec::new();
    for (identity, codes) in MATRIX {
        let token = identity.token();
        for (op, expected) in OPS.into_iter().zip(codes) {
            let before = seed(&server).await;
            let outcome = call(&server, op, token.as_deref()).await;
            let code = outcome.as_ref().map_or_else(|s| s.code(), |_| Code::Ok);
            if code != expected {
                failures.push(format!(
                    "{identity:?} {op:?}: {outcome:?}, expected {expected:?}"
                ));
                continue;
            }
            match outcome {
                Ok(Some(fields)) if fields != visible(identity, op) => {
                    failures.push(format!("{identity:?} {op:?}: response shows {fields:?}"));
                }
                Ok(_) => {}
                Err(status) => {
                    if status.message().is_empty() {
                        failures.push(format!("{identity:?} {op:?}: status without a message"));
                    }
                    let after = stored(&server).await;
                    if (after.0.version, after.1.version) != (before.0.version, before.1.version) {
                        failures.push(format!("{identity:?} {op:?}: refused but written"));
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

backend_tests!(identity_rpc_field_matrix);

#[tokio::test]
async fn frontend_sees_the_values_it_may_see() {
    let server = secured(SECRET).await;
    seed(&server).await;
    let token = session(USER, Some(ORG));
    let request = GetUserMetadataRequest {
        user_id: USER.into(),
    };
    let (mut users, mut orgs) = (server.users.clone(), server.orgs.clone());
    let user = users.get(with_token(request, Some(&token))).await;
    let user = user.unwrap().into_inner();
    assert_eq!(
        json(user.public_metadata.as_ref().unwrap()),
        json!({"seeded": "public"})
    );
    assert_eq!(
        json(user.unsafe_metadata.as_ref().unwrap()),
        json!({"seeded": "unsafe"})
    );
    assert_eq!(user.private_metadata, None);

    let merge = MergeUserMetadataRequest {
        user_id: USER.into(),
        unsafe_metadata: Some(structure(&json!({"theme": "dark", "seeded": null}))),
        ..Default::default()
    };
    let merged = users.merge(with_token(merge, Some(&token))).await;
    let merged = merged.unwrap().into_inner();
    assert_eq!(
        json(merged.unsafe_metadata.as_ref().unwrap()),
        json!({"theme": "dark"})
    );
    assert_eq!(merged.private_metadata, None);
    assert_eq!(merged.version, user.version + 1);

    let (user, org) = stored(&server).await;
    assert_eq!(
        json(user.private_metadata.as_ref().unwrap()),
        json!({"seeded": "private"})
    );
    let request = GetOrganizationMetadataRequest {
        organization_id: ORG.into(),
    };
    let seen = orgs.get(with_token(request, Some(&token))).await;
    let seen = seen.unwrap().into_inner();
    assert_eq!(seen.public_metadata, org.public_metadata);
    assert_eq!(seen.private_metadata, None);
}

#[tokio::test]
async fn refusals_name_what_is_allowed() {
    let server = secured(SECRET).await;
    let token = session(USER, None);
    let merge = MergeUserMetadataRequest {
        user_id: USER.into(),
        public_metadata: Some(structure(&json!({"plan": "pro"}))),
        unsafe_metadata: Some(structure(&json!({"theme": "dark"}))),
        ..Default::default()
    };
    let err = server
        .users
        .clone()
        .merge(with_token(merge, Some(&token)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("public_metadata"), "{err:?}");
    assert!(err.message().contains("only unsafe_metadata"), "{err:?}");

    let err = server
        .users
        .clone()
        .get(with_token(GetUserMetadataRequest::default(), None))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("authorization"), "{err:?}");
}

/// Asks for USER with `token` and returns the code and message.
async fn get_with(server: &TestServer, token: &str) -> (Code, String) {
    let request = GetUserMetadataRequest {
        user_id: USER.into(),
    };
    match server
        .users
        .clone()
        .get(with_token(request, Some(token)))
        .await
    {
        Ok(_) => (Code::Ok, String::new()),
        Err(status) => (status.code(), status.message().to_string()),
    }
}

async fn assert_refused(server: &TestServer, token: &str, reason: &str) {
    let (code, message) = get_with(server, token).await;
    assert_eq!(code, Code::Unauthenticated, "{message}");
    assert!(
        message.contains(reason),
        "expected {reason:?} in {message:?}"
    );
    assert!(!message.contains(token), "the message repeats the token");
}

#[tokio::test]
async fn token_with_alg_none_is_refused() {
    let server = secured(SECRET).await;
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
    let claims = json!({"sub": USER, "exp": now() + 600});
    let claims = URL_SAFE_NO_PAD.encode(claims.to_string());
    assert_refused(&server, &format!("{header}.{claims}."), "invalid token").await;
    // The same claims, correctly signed, are accepted.
    assert_eq!(get_with(&server, &session(USER, None)).await.0, Code::Ok);
}

#[tokio::test]
async fn token_signed_with_another_key_is_refused() {
    let server = secured(SECRET).await;
    let claims = json!({"sub": USER, "exp": now() + 600});
    let other = EncodingKey::from_secret(b"another-secret-of-enough-length-0123456789");
    let token = sign(Algorithm::HS256, &other, &claims);
    assert_refused(&server, &token, "bad signature").await;
    // A valid token whose signature was altered.
    let mut token = session(USER, None);
    let last = token.pop().unwrap();
    token.push(if last == 'A' { 'B' } else { 'A' });
    assert_refused(&server, &token, "invalid token").await;
}

#[tokio::test]
async fn hmac_token_keyed_with_the_rsa_public_key_is_refused() {
    // The classic algorithm-confusion attack: the server holds an RSA public
    // key, and the attacker signs HS256 with that (public) key as the secret.
    let server = secured(RSA_PUBLIC).await;
    let claims = json!({"sub": USER, "exp": now() + 600});
    let forged = sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(RSA_PUBLIC),
        &claims,
    );
    assert_refused(&server, &forged, "algorithm not accepted").await;
    let genuine = sign(
        Algorithm::RS256,
        &EncodingKey::from_rsa_pem(RSA_PRIVATE).unwrap(),
        &claims,
    );
    assert_eq!(get_with(&server, &genuine).await.0, Code::Ok);
}

#[tokio::test]
async fn rsa_token_on_an_hmac_server_is_refused() {
    let server = secured(SECRET).await;
    let claims = json!({"sub": USER, "exp": now() + 600});
    let token = sign(
        Algorithm::RS256,
        &EncodingKey::from_rsa_pem(RSA_PRIVATE).unwrap(),
        &claims,
    );
    assert_refused(&server, &token, "algorithm not accepted").await;
}

#[tokio::test]
async fn expired_token_is_refused() {
    let server = secured(SECRET).await;
    let token = hs256(json!({"sub": USER, "exp": now() - 5}));
    assert_refused(&server, &token, "expired").await;
}

#[tokio::test]
async fn token_not_valid_yet_is_refused() {
    let server = secured(SECRET).await;
    let token = hs256(json!({"sub": USER, "exp": now() + 600, "nbf": now() + 300}));
    assert_refused(&server, &token, "not valid yet").await;
}

#[tokio::test]
async fn token_without_subject_is_refused() {
    let server = secured(SECRET).await;
    let token = hs256(json!({"exp": now() + 600}));
    assert_refused(&server, &token, "missing the sub claim").await;
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
    let good = json!({"sub": USER, "exp": now() + 600, "iss": "https://clerk.example.com", "aud": "metadata"});
    assert_eq!(get_with(&server, &hs256(good.clone())).await.0, Code::Ok);
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
    let claims = json!({"sub": USER, "exp": now() + 600});
    for (algorithm, public, private) in [rsa, ec, ed] {
        let server = secured(&public).await;
        let token = sign(algorithm, &private, &claims);
        assert_eq!(get_with(&server, &token).await.0, Code::Ok, "{algorithm:?}");
        let hmac = hs256(claims.clone());
        assert_refused(&server, &hmac, "algorithm not accepted").await;
    }
}

#[tokio::test]
async fn health_needs_no_credentials() {
    let server = secured(SECRET).await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(server.channel().await);
    let reply = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "metadata.v1.UserMetadataService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        reply.status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
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
    let merge = MergeUserMetadataRequest {
        user_id: USER.into(),
        private_metadata: Some(structure(&json!({"k": 1}))),
        ..Default::default()
    };
    let merged = server.users.clone().merge(with_token(merge, None)).await;
    assert_eq!(merged.unwrap().into_inner().version, 1);
    // A token is ignored rather than refused: nothing is configured to check it.
    assert_eq!(get_with(&server, "anything").await.0, Code::Ok);
}
