//! The server under test as a child process, and what /proc says about it.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::process::{Child, Command};
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// Linux reports CPU time in clock ticks of 1/100 s (USER_HZ, fixed by the ABI).
const TICKS_PER_SECOND: f64 = 100.0;

pub struct ServerProcess {
    child: Child,
    pub addr: SocketAddr,
    pub pid: u32,
}

/// The `metadata-service` binary next to this one (same cargo profile).
pub fn sibling_binary() -> anyhow::Result<PathBuf> {
    // Both are binaries of the workspace: target/<profile>/bench and
    // target/<profile>/metadata-service.
    let me = std::env::current_exe()?;
    let profile_dir = me
        .parent()
        .ok_or_else(|| anyhow::anyhow!("cannot place {}", me.display()))?;
    let path = profile_dir.join("metadata-service");
    if !path.exists() {
        bail!(
            "{} not found: build it first (cargo build --release --workspace --bins) \
             or pass --server-bin",
            path.display()
        );
    }
    Ok(path)
}

pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl ServerProcess {
    pub async fn start(
        binary: &Path,
        database_url: &str,
        extra: &[String],
        env: &[(String, String)],
    ) -> anyhow::Result<Self> {
        Self::start_command(binary, &[], database_url, extra, env).await
    }

    /// [`ServerProcess::start`] with `command` (e.g. `["relay"]`) before
    /// the options: any subcommand that serves grpc.health.v1 on `--listen`.
    pub async fn start_command(
        binary: &Path,
        command: &[&str],
        database_url: &str,
        extra: &[String],
        env: &[(String, String)],
    ) -> anyhow::Result<Self> {
        let addr: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
        // No metrics port unless asked for (with --server-arg).
        let metrics = if extra.iter().any(|a| a.starts_with("--metrics-listen")) {
            None
        } else {
            Some(["--metrics-listen", "off"])
        };
        let child = Command::new(binary)
            .args(command)
            .args(metrics.iter().flatten())
            .args(["--database-url", database_url])
            .args(["--listen", &addr.to_string()])
            .args(extra)
            .env("RUST_LOG", "warn")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        let pid = child.id().context("server exited at once")?;
        let mut server = ServerProcess { child, addr, pid };
        server.wait_until_serving().await?;
        Ok(server)
    }

    async fn wait_until_serving(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                bail!("server exited during start-up: {status}");
            }
            if let Ok(channel) = channel(self.addr).await {
                let reply = HealthClient::new(channel)
                    .check(HealthCheckRequest::default())
                    .await;
                if reply.is_ok_and(|r| r.into_inner().status() == ServingStatus::Serving) {
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("server not SERVING within 30s")
    }

    pub fn usage(&self) -> anyhow::Result<Usage> {
        Usage::of(self.pid)
    }

    pub async fn stop(mut self) -> anyhow::Result<()> {
        let _ = Command::new("kill")
            .args(["-s", "TERM", &self.pid.to_string()])
            .status()
            .await;
        match tokio::time::timeout(Duration::from_secs(20), self.child.wait()).await {
            Ok(status) => {
                let status = status?;
                if !status.success() {
                    bail!("server exited with {status}");
                }
            }
            Err(_) => {
                self.child.kill().await?;
                bail!("server did not stop within 20s of SIGTERM");
            }
        }
        Ok(())
    }
}

pub async fn channel(addr: SocketAddr) -> anyhow::Result<Channel> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .connect()
        .await?)
}

/// CPU time used so far and resident memory now.
#[derive(Clone, Copy, Debug)]
pub struct Usage {
    pub cpu_seconds: f64,
    pub rss_bytes: u64,
}

impl Usage {
    pub fn of(pid: u32) -> anyhow::Result<Usage> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // The command name may hold spaces; fields count from after its ')'.
        let after = &stat[stat.rfind(')').context("malformed stat")? + 2..];
        let fields: Vec<&str> = after.split_whitespace().collect();
        let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let rss_kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .context("no VmRSS")?
            .parse()?;
        Ok(Usage {
            cpu_seconds: ticks / TICKS_PER_SECOND,
            rss_bytes: rss_kb * 1024,
        })
    }
}
