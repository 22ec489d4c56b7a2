//! Browsers (issue 31): gRPC-Web and native gRPC on one port, over
//! HTTP/1.1 as a browser sends it (a client written here from the
//! gRPC-Web wire format, independent of tonic-web); CORS for the allowed
//! origins only; a frontend token watching its own record, masked.

use std::net::SocketAddr;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use metadata_service::proto::v1::{
    GetUserMetadataRequest, MergeUserMetadataRequest, UserMetadata, WatchUserMetadataRequest,
    WatchUserMetadataResponse, watch_user_metadata_response,
};
use metadata_service::reason::Reason;
use prost::Message;
use serde_json::json;
use tokio::net::TcpStream;
use tokio_stream::StreamExt;
use tonic::Code;

use crate::auth::{BACKEND_KEY, SECRET, USER, authenticator, session, with_token};
use crate::common::Backend;
use crate::common::json::{field, structure};
use crate::error_details::expect;
use crate::harness::start_with;

const PAGE: &str = "http://127.0.0.1:8080";

/// One gRPC-Web call over a fresh HTTP/1.1 connection: the response's
/// headers and its body frames (data frames, then the trailers frame).
struct WebCall {
    status: hyper::StatusCode,
    headers: hyper::HeaderMap,
    body: hyper::body::Incoming,
}

async fn web_call(
    addr: SocketAddr,
    path: &str,
    message: &impl Message,
    token: Option<&str>,
) -> WebCall {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    let mut frame = BytesMut::new();
    let encoded = message.encode_to_vec();
    frame.put_u8(0);
    frame.put_u32(encoded.len() as u32);
    frame.put_slice(&encoded);
    let mut request = Request::post(path)
        .header("host", addr.to_string())
        .header("content-type", "application/grpc-web+proto")
        .header("x-grpc-web", "1")
        .header("origin", PAGE);
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let response = sender
        .send_request(request.body(Full::new(frame.freeze())).unwrap())
        .await
        .unwrap();
    let (parts, body) = response.into_parts();
    WebCall {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// A gRPC-Web body frame: a message, or the trailers.
#[derive(Debug)]
enum Frame {
    Message(Bytes),
    Trailers(String),
}

impl WebCall {
    /// The frames that arrived until `enough` says so (or the body ended).
    async fn frames(&mut self, enough: impl Fn(&[Frame]) -> bool) -> Vec<Frame> {
        let mut buffer = BytesMut::new();
        let mut frames = Vec::new();
        while !enough(&frames) {
            let Some(chunk) = self.body.frame().await else {
                break;
            };
            if let Ok(data) = chunk.unwrap().into_data() {
                buffer.extend_from_slice(&data);
            }
            while buffer.len() >= 5 {
                let flag = buffer[0];
                let len = u32::from_be_bytes([buffer[1], buffer[2], buffer[3], buffer[4]]) as usize;
                if buffer.len() < 5 + len {
                    break;
                }
                buffer.advance(5);
                let payload = buffer.split_to(len).freeze();
                frames.push(match flag & 0x80 {
                    0 => Frame::Message(payload),
                    _ => Frame::Trailers(String::from_utf8_lossy(&payload).into_owned()),
                });
            }
        }
        frames
    }
}

fn grpc_status(frames: &[Frame]) -> Option<String> {
    frames.iter().find_map(|frame| match frame {
        Frame::Trailers(text) => text
            .lines()
            .find_map(|line| line.strip_prefix("grpc-status:"))
            .map(|code| code.trim().to_owned()),
        Frame::Message(_) => None,
    })
}

const GET: &str = "/metadata.v1.UserMetadataService/Get";
const WATCH: &str = "/metadata.v1.UserMetadataService/Watch";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_web_and_grpc_share_the_port() {
    let s = start_with(Backend::Sqlite, |c| {
        c.auth = authenticator(SECRET);
        c.cors_allowed_origins = vec![PAGE.parse().unwrap()];
    })
    .await
    .unwrap();
    let mut users = s.users.clone();
    users
        .merge(with_token(
            MergeUserMetadataRequest {
                user_id: USER.into(),
                public_metadata: Some(structure(&json!({"plan": "pro"}))),
                private_metadata: Some(structure(&json!({"secret": 1}))),
                ..Default::default()
            },
            Some(BACKEND_KEY),
        ))
        .await
        .unwrap();

    // gRPC-Web over HTTP/1.1, with a frontend token: its own user, masked.
    let token = session(USER, None);
    let get = GetUserMetadataRequest {
        user_id: USER.into(),
        revision: None,
    };
    let mut call = web_call(s.addr, GET, &get, Some(&token)).await;
    assert_eq!(call.status, 200);
    assert!(
        call.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/grpc-web"),
        "{:?}",
        call.headers
    );
    assert_eq!(call.headers["access-control-allow-origin"], PAGE);
    // What a page may read of an answer: its status and details.
    let exposed = call.headers["access-control-expose-headers"]
        .to_str()
        .unwrap();
    for name in ["grpc-status", "grpc-message", "grpc-status-details-bin"] {
        assert!(exposed.contains(name), "{name}: {exposed}");
    }
    let frames = call.frames(|_| false).await;
    assert_eq!(grpc_status(&frames).as_deref(), Some("0"), "{frames:?}");
    let Frame::Message(bytes) = &frames[0] else {
        panic!("{frames:?}")
    };
    let got = UserMetadata::decode(bytes.clone()).unwrap();
    assert_eq!(field(&got.public_metadata), json!({"plan": "pro"}));
    assert_eq!(got.private_metadata, None, "hidden from a frontend token");

    // Another user's record: an error is a trailers-only answer, its status
    // in the headers (or a trailers frame), readable by the page.
    let other = GetUserMetadataRequest {
        user_id: "user_2".into(),
        revision: None,
    };
    let mut refused = web_call(s.addr, GET, &other, Some(&token)).await;
    let frames = refused.frames(|_| false).await;
    let status = refused
        .headers
        .get("grpc-status")
        .map(|v| v.to_str().unwrap().to_owned());
    assert_eq!(
        status.or(grpc_status(&frames)).as_deref(),
        Some("7"),
        "PERMISSION_DENIED: {:?} {frames:?}",
        refused.headers
    );
    assert_eq!(refused.headers["access-control-allow-origin"], PAGE);

    // Native gRPC on the same port, unchanged.
    let native = users
        .get(with_token(get.clone(), Some(BACKEND_KEY)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(field(&native.private_metadata), json!({"secret": 1}));

    // Watch (server streaming) over gRPC-Web: its own record, masked.
    let watch = WatchUserMetadataRequest {
        user_ids: vec![USER.into()],
        ..Default::default()
    };
    let mut stream = web_call(s.addr, WATCH, &watch, Some(&token)).await;
    assert_eq!(stream.status, 200);
    let first = stream.frames(|frames| !frames.is_empty()).await;
    assert!(
        matches!(first[0], Frame::Message(_)),
        "progress first: {first:?}"
    );
    users
        .merge(with_token(
            MergeUserMetadataRequest {
                user_id: USER.into(),
                private_metadata: Some(structure(&json!({"secret": 2}))),
                unsafe_metadata: Some(structure(&json!({"theme": "dark"}))),
                ..Default::default()
            },
            Some(BACKEND_KEY),
        ))
        .await
        .unwrap();
    let next = stream.frames(|frames| !frames.is_empty()).await;
    let Frame::Message(bytes) = &next[0] else {
        panic!("{next:?}")
    };
    let response = WatchUserMetadataResponse::decode(bytes.clone()).unwrap();
    let Some(watch_user_metadata_response::Response::Event(event)) = response.response else {
        panic!("{response:?}")
    };
    assert_eq!(
        event.changed_fields,
        ["unsafe_metadata"],
        "private left out"
    );
    let after = event.after.unwrap();
    assert_eq!(after.private_metadata, None);
    assert_eq!(field(&after.unsafe_metadata), json!({"theme": "dark"}));
    assert_eq!(event.before.unwrap().private_metadata, None);
}

/// A preflight from an allowed origin is answered with what gRPC-Web
/// needs (the exposed headers come with the answers themselves, above);
/// from any other origin, with no CORS header at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_answers_allowed_origins_only() {
    let s = start_with(Backend::Sqlite, |c| {
        c.cors_allowed_origins = vec![PAGE.parse().unwrap()];
    })
    .await
    .unwrap();
    let preflight = |origin: &'static str| async move {
        let stream = TcpStream::connect(s.addr).await.unwrap();
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(connection);
        let request = Request::options(GET)
            .header("host", s.addr.to_string())
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization,content-type,x-grpc-web,x-user-agent,grpc-timeout",
            )
            .body(Full::new(Bytes::new()))
            .unwrap();
        sender.send_request(request).await.unwrap()
    };
    let allowed = preflight(PAGE).await;
    let headers = allowed.headers();
    assert_eq!(headers["access-control-allow-origin"], PAGE);
    let allowed_headers = headers["access-control-allow-headers"].to_str().unwrap();
    for name in [
        "authorization",
        "content-type",
        "x-grpc-web",
        "x-user-agent",
        "grpc-timeout",
    ] {
        assert!(allowed_headers.contains(name), "{name}: {allowed_headers}");
    }
    assert!(headers.get("access-control-allow-credentials").is_none());

    let refused = preflight("http://evil.example").await;
    assert!(
        refused
            .headers()
            .keys()
            .all(|name| !name.as_str().starts_with("access-control-allow")),
        "{:?}",
        refused.headers()
    );
}

/// A frontend token watches its own record only, and filters on what it
/// may read only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frontend_watch_rules() {
    let s = start_with(Backend::Sqlite, |c| c.auth = authenticator(SECRET))
        .await
        .unwrap();
    let token = session(USER, Some("org_1"));
    let mut users = s.users.clone();
    let watch = |ids: Vec<&str>, filter: &str| WatchUserMetadataRequest {
        user_ids: ids.into_iter().map(Into::into).collect(),
        filter: filter.into(),
        ..Default::default()
    };
    for (ids, reason) in [
        (vec!["user_2"], Reason::NotOwnRecord),
        (vec![], Reason::NotOwnRecord),
        (vec![USER, "user_2"], Reason::NotOwnRecord),
    ] {
        let err = users
            .watch(with_token(watch(ids.clone(), ""), Some(&token)))
            .await
            .unwrap_err();
        expect(&err, reason);
    }
    let err = users
        .watch(with_token(
            watch(vec![USER], "private_metadata.secret = 1"),
            Some(&token),
        ))
        .await
        .unwrap_err();
    expect(&err, Reason::FieldNotReadable);
    assert!(err.message().contains("private_metadata"), "{err:?}");
    let mut own = users
        .watch(with_token(
            watch(vec![USER], r#"unsafe_metadata.theme = "dark""#),
            Some(&token),
        ))
        .await
        .unwrap()
        .into_inner();
    own.next().await.unwrap().unwrap();
    users
        .merge(with_token(
            MergeUserMetadataRequest {
                user_id: USER.into(),
                private_metadata: Some(structure(&json!({"secret": 1}))),
                unsafe_metadata: Some(structure(&json!({"theme": "dark"}))),
                ..Default::default()
            },
            Some(BACKEND_KEY),
        ))
        .await
        .unwrap();
    let event = loop {
        let next = own.next().await.unwrap().unwrap();
        if let Some(watch_user_metadata_response::Response::Event(e)) = next.response {
            break e;
        }
    };
    assert_eq!(event.after.unwrap().private_metadata, None);
    assert_eq!(event.changed_fields, ["unsafe_metadata"]);
    // The organization in its claim, and no other.
    let mut orgs = s.orgs.clone();
    let org_watch = |id: &str| metadata_service::proto::v1::WatchOrganizationMetadataRequest {
        organization_ids: vec![id.into()],
        ..Default::default()
    };
    orgs.watch(with_token(org_watch("org_1"), Some(&token)))
        .await
        .unwrap();
    let err = orgs
        .watch(with_token(org_watch("org_2"), Some(&token)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
}
