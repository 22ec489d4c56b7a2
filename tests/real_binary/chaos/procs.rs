//! The processes of the chaos test, run as an operator runs them: server
//! replicas and relays of the built binary, on ports of their own that
//! survive a restart (clients and the relay's standby must find the same
//! replica again), their output kept in files for the failure message.
//! Every child is killed when its handle is dropped (`command` sets
//! `kill_on_drop`), so a failing test leaves no process behind.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Child;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::binary::command;
use crate::common::wait::within;

/// How long a started process may take to serve.
const READY_LIMIT: Duration = Duration::from_secs(30);
/// How long a process may take to exit after a signal.
const STOP_LIMIT: Duration = Duration::from_secs(15);
pub const USERS: &str = "metadata.v1.UserMetadataService";

pub fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// A channel that connects on first use and reconnects after its server
/// went away, as a long-lived client's does.
pub fn lazy_channel(addr: SocketAddr) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(1))
        .tcp_nodelay(true)
        .connect_lazy()
}

/// One process of the binary with fixed ports, restartable.
pub struct Proc {
    pub name: String,
    /// gRPC: the server's API, or the relay's health.
    pub addr: SocketAddr,
    pub metrics: SocketAddr,
    args: Vec<String>,
    dir: PathBuf,
    child: Option<Child>,
    starts: u32,
}

impl Proc {
    /// A server replica on `database_url`; short intervals, so that faults
    /// are noticed and recovered from within the test's few seconds.
    pub fn replica(name: &str, dir: &Path, database_url: &str) -> Proc {
        let args = [
            "--database-url",
            database_url,
            "--db-timeout",
            "2s",
            "--db-connect-timeout",
            "2s",
            "--db-health-interval",
            "250ms",
            "--watch-poll-interval",
            "200ms",
            "--watch-progress-interval",
            "1s",
            "--shutdown-grace",
            "5s",
        ];
        Proc::new(name, dir, &args)
    }

    /// A relay of the log to `stream` on `nats_url`.
    pub fn relay(
        name: &str,
        dir: &Path,
        database_url: &str,
        nats_url: &str,
        stream: &crate::common::nats::TestStream,
    ) -> Proc {
        let args = [
            "relay",
            "--database-url",
            database_url,
            "--db-connect-timeout",
            "2s",
            "--watch-poll-interval",
            "200ms",
            "--nats-url",
            nats_url,
            "--nats-stream",
            &stream.name,
            "--nats-subject-prefix",
            &stream.prefix,
            "--nats-timeout",
            "2s",
        ];
        Proc::new(name, dir, &args)
    }

    fn new(name: &str, dir: &Path, args: &[&str]) -> Proc {
        Proc {
            name: name.to_owned(),
            addr: free_addr(),
            metrics: free_addr(),
            args: args.iter().map(|a| a.to_string()).collect(),
            dir: dir.to_owned(),
            child: None,
            starts: 0,
        }
    }

    fn log_path(&self, start: u32) -> PathBuf {
        self.dir.join(format!("{}.{start}.log", self.name))
    }

    /// The last lines of every run's output, for a failure message, but for
    /// the line each write logs, which would crowd out what went wrong.
    pub fn log_tail(&self, lines: usize) -> String {
        let mut out = String::new();
        for start in 1..=self.starts {
            let text = std::fs::read_to_string(self.log_path(start)).unwrap_or_default();
            let all: Vec<&str> = text
                .lines()
                .filter(|l| !l.contains("metadata written"))
                .collect();
            let from = all.len().saturating_sub(lines);
            out.push_str(&format!("--- {} run {start}\n", self.name));
            for line in &all[from..] {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }

    /// Starts the process and waits until it serves. The first start may
    /// find a port taken since it was probed; it then moves to new ones.
    pub async fn start(&mut self) {
        assert!(self.child.is_none(), "{} is already running", self.name);
        // A restart keeps its ports: clients and peers know them.
        let first = self.starts == 0;
        for attempt in 0..3 {
            self.starts += 1;
            let log = std::fs::File::create(self.log_path(self.starts)).unwrap();
            let child = command(&self.dir)
                .args(&self.args)
                .args(["--listen", &self.addr.to_string()])
                .args(["--metrics-listen", &self.metrics.to_string()])
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("spawn metadata-service");
            self.child = Some(child);
            match self.wait_until_ready().await {
                Ok(()) => return,
                Err(status) => {
                    self.child = None;
                    let tail = self.log_tail(20);
                    if first && attempt < 2 && tail.contains("cannot listen") {
                        eprintln!("{}: a port was taken, moving: {tail}", self.name);
                        self.addr = free_addr();
                        self.metrics = free_addr();
                        continue;
                    }
                    panic!("{} exited with {status} while starting:\n{tail}", self.name);
                }
            }
        }
        unreachable!()
    }

    /// A replica serves when its health says SERVING for the server and the
    /// user service; a relay, when its metrics port answers (a standby is
    /// up but does not publish, so health says nothing about readiness).
    async fn wait_until_ready(&mut self) -> Result<(), ExitStatus> {
        // Ok(None) once ready, Ok(Some) once exited.
        let ready = within(READY_LIMIT, async || {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                return Ok(Some(status));
            }
            if self.is_relay() {
                return scrape(self.metrics).await.map(|_| None);
            }
            match self.health().await {
                Ok(statuses) if statuses == [ServingStatus::Serving; 2] => Ok(None),
                Ok(statuses) => Err(format!("{statuses:?}")),
                Err(err) => Err(err),
            }
        })
        .await;
        match ready {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(status),
            Err(last) => panic!(
                "{} not ready within {READY_LIMIT:?} (last: {last}):\n{}",
                self.name,
                self.log_tail(30)
            ),
        }
    }

    fn is_relay(&self) -> bool {
        self.args.first().is_some_and(|a| a == "relay")
    }

    /// Health of the server as a whole and of the user service.
    pub async fn health(&self) -> Result<[ServingStatus; 2], String> {
        health_at(self.addr).await
    }

    /// Whether the process started last is still the one running (it was
    /// neither restarted nor did it exit on its own).
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .and_then(Child::id)
            .expect("process running")
    }

    /// SIGKILL: no chance to finish anything.
    pub async fn kill9(&mut self) {
        let mut child = self.child.take().expect("process running");
        child.start_kill().expect("send SIGKILL");
        let status = tokio::time::timeout(STOP_LIMIT, child.wait())
            .await
            .expect("a killed process ends")
            .unwrap();
        assert_eq!(status.code(), None, "{} killed by a signal", self.name);
    }

    /// SIGTERM, then the exit, which must be clean (status 0) and within
    /// the shutdown grace plus slack.
    pub async fn sigterm(&mut self) {
        let pid = self.pid().to_string();
        let kill = tokio::process::Command::new("kill")
            .args(["-s", "TERM", &pid])
            .status()
            .await
            .expect("run kill");
        assert!(kill.success(), "kill -s TERM {pid}");
        let mut child = self.child.take().unwrap();
        let status = tokio::time::timeout(STOP_LIMIT, child.wait())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{} still running {STOP_LIMIT:?} after SIGTERM:\n{}",
                    self.name,
                    self.log_tail(30)
                )
            })
            .unwrap();
        assert_eq!(
            status.code(),
            Some(0),
            "{} after SIGTERM: {status}\n{}",
            self.name,
            self.log_tail(30)
        );
    }

    /// Every sample of this process's metrics.
    pub async fn metrics(&self) -> Result<BTreeMap<String, f64>, String> {
        scrape(self.metrics).await
    }
}

/// Health of the server at `addr` as a whole and of its user service, on
/// a connection of its own (bounded: the server may be gone).
pub async fn health_at(addr: SocketAddr) -> Result<[ServingStatus; 2], String> {
    let check = async {
        let channel = Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_timeout(Duration::from_secs(1))
            .connect()
            .await
            .map_err(|e| e.to_string())?;
        let mut health = HealthClient::new(channel);
        let mut out = [ServingStatus::Unknown; 2];
        for (slot, service) in out.iter_mut().zip(["", USERS]) {
            let response = health
                .check(HealthCheckRequest {
                    service: service.into(),
                })
                .await
                .map_err(|s| s.to_string())?;
            *slot = response.into_inner().status();
        }
        Ok(out)
    };
    tokio::time::timeout(Duration::from_secs(3), check)
        .await
        .unwrap_or_else(|_| Err("health check timed out".into()))
}

/// GET /metrics over HTTP/1.1, bounded: the process may be gone.
async fn scrape(addr: SocketAddr) -> Result<BTreeMap<String, f64>, String> {
    let get = async {
        let mut stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
            .await
            .map_err(|e| e.to_string())?;
        let mut response = String::new();
        stream
            .read_to_string(&mut response)
            .await
            .map_err(|e| e.to_string())?;
        if !response.starts_with("HTTP/1.1 200") {
            return Err(format!("not 200: {response}"));
        }
        let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        Ok(body
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .filter_map(|l| {
                let (name, value) = l.rsplit_once(' ')?;
                Some((name.to_string(), value.parse().ok()?))
            })
            .collect())
    };
    tokio::time::timeout(Duration::from_secs(2), get)
        .await
        .unwrap_or_else(|_| Err("metrics timed out".into()))
}
