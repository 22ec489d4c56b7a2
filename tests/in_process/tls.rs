//! TLS and mutual TLS, with certificates made in the test.

use std::net::SocketAddr;
use std::time::Duration;

use metadata_service::proto::v1::GetUserMetadataRequest;
use metadata_service::proto::v1::user_metadata_service_client::UserMetadataServiceClient;
use metadata_service::server::{self, RunningServer, TlsConfig};
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use crate::common::tls::{Ca, Leaf};
use crate::common::{self, Backend, TestDb};

async fn start(tls: TlsConfig) -> (TestDb, RunningServer) {
    let db = TestDb::create(Backend::Sqlite).await.unwrap();
    let mut config = common::config(db.url());
    config.tls = Some(tls);
    let server = server::start(&config).await.expect("TLS server starts");
    (db, server)
}

fn server_tls(ca: &Ca, client_ca: Option<&Ca>) -> TlsConfig {
    let leaf = ca.server_leaf();
    TlsConfig {
        cert: leaf.cert.into_bytes(),
        key: leaf.key.into_bytes(),
        client_ca: client_ca.map(|ca| ca.pem.clone().into_bytes()),
    }
}

/// Calls Get over a channel built with `tls` (None: plaintext) and returns
/// the outcome: Ok, or the code of the failure (connection failures count
/// as UNAVAILABLE).
async fn get(addr: SocketAddr, tls: Option<ClientTlsConfig>) -> Result<(), Code> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = Channel::from_shared(format!("{scheme}://localhost:{}", addr.port()))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5));
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls).unwrap();
    }
    let channel = endpoint.connect().await.map_err(|_| Code::Unavailable)?;
    let request = GetUserMetadataRequest {
        user_id: "user_1".into(),
        revision: None,
    };
    UserMetadataServiceClient::new(channel)
        .get(request)
        .await
        .map(|_| ())
        .map_err(|status| status.code())
}

fn trusting(ca: &Ca) -> ClientTlsConfig {
    ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&ca.pem))
        .domain_name("localhost")
}

fn with_identity(tls: ClientTlsConfig, leaf: &Leaf) -> ClientTlsConfig {
    tls.identity(Identity::from_pem(&leaf.cert, &leaf.key))
}

#[tokio::test]
async fn tls_serves_clients_that_trust_the_certificate() {
    let ca = Ca::new("server CA");
    let (_db, server) = start(server_tls(&ca, None)).await;
    let addr = server.local_addr();
    assert_eq!(get(addr, Some(trusting(&ca))).await, Ok(()));
    // A client that does not trust the issuer, and one without TLS.
    let stranger = Ca::new("another CA");
    assert!(get(addr, Some(trusting(&stranger))).await.is_err());
    assert!(get(addr, None).await.is_err());
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn mtls_refuses_clients_without_a_certificate_from_the_client_ca() {
    let server_ca = Ca::new("server CA");
    let client_ca = Ca::new("client CA");
    let (_db, server) = start(server_tls(&server_ca, Some(&client_ca))).await;
    let addr = server.local_addr();

    let good = client_ca.client_leaf("billing-service");
    let with_good = with_identity(trusting(&server_ca), &good);
    assert_eq!(get(addr, Some(with_good)).await, Ok(()));

    assert!(get(addr, Some(trusting(&server_ca))).await.is_err());
    let rogue = Ca::new("rogue CA").client_leaf("billing-service");
    let with_rogue = with_identity(trusting(&server_ca), &rogue);
    assert!(get(addr, Some(with_rogue)).await.is_err());
    assert!(get(addr, None).await.is_err());

    // Refused clients do not disturb the next good one.
    let with_good = with_identity(trusting(&server_ca), &good);
    assert_eq!(get(addr, Some(with_good)).await, Ok(()));
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn invalid_certificate_or_key_stops_the_start() {
    let db = TestDb::create(Backend::Sqlite).await.unwrap();
    let ca = Ca::new("server CA");
    let leaf = ca.server_leaf();
    let other = ca.server_leaf();
    for (cert, key) in [
        (b"not a certificate".to_vec(), leaf.key.clone().into_bytes()),
        (leaf.cert.clone().into_bytes(), b"not a key".to_vec()),
        // A certificate with the key of another certificate.
        (
            leaf.cert.clone().into_bytes(),
            other.key.clone().into_bytes(),
        ),
    ] {
        let mut config = common::config(db.url());
        config.tls = Some(TlsConfig {
            cert,
            key,
            client_ca: None,
        });
        let err = server::start(&config).await.err().expect("start refused");
        assert!(
            format!("{err:#}").contains("invalid TLS certificate or key"),
            "{err:#}"
        );
    }
}
