//! A server running in this test process on a fresh database, for the
//! programs under test (the CLI, grpcurl) to call.

use std::net::SocketAddr;

use metadata_service::server::{self, RunningServer, ServerConfig};

use crate::common::{self, Backend, TestDb};

pub struct TestServer {
    pub addr: SocketAddr,
    _server: RunningServer,
    // Declared last: the database outlives the server using it.
    pub db: TestDb,
}

impl TestServer {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

pub async fn start(backend: Backend) -> Option<TestServer> {
    start_with(backend, |_| {}).await
}

pub async fn start_with(
    backend: Backend,
    customize: impl FnOnce(&mut ServerConfig),
) -> Option<TestServer> {
    let db = TestDb::create(backend).await?;
    let mut config = common::config(db.url());
    customize(&mut config);
    let server = server::start(&config).await.expect("server starts");
    Some(TestServer {
        addr: server.local_addr(),
        _server: server,
        db,
    })
}
