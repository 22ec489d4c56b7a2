//! gRPC-Web (issue 31, item 5): what the translation costs. A Get of a
//! small record at C clients (16 by default) in a closed loop, over native
//! gRPC (HTTP/2, one connection per client) and over gRPC-Web (HTTP/1.1, as
//! a browser on plain http sends it: tonic-web's client layer over hyper's
//! HTTP/1.1 client, one connection per client, kept alive), against one
//! server, the two arms alternating in rounds (each round in a rotated
//! order) so that drift on the shared machine falls on both. Every answer
//! is checked (the id asked, the version seeded): a fast wrong answer
//! cannot pass.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use metadata_service::proto::v1::user_metadata_service_client::UserMetadataServiceClient;
use metadata_service::proto::v1::{GetUserMetadataRequest, MergeUserMetadataRequest, UserMetadata};
use rand::Rng;
use serde::Serialize;
use tonic_web::GrpcWebClientLayer;

use crate::db::BenchDb;
use crate::load::{self, Measured};
use crate::ms;
use crate::process::{ServerProcess, channel};

/// Users seeded, each read at random.
pub const USERS: u64 = 100;

pub struct Settings<'a> {
    pub binary: &'a Path,
    pub server_args: &'a [String],
    pub server_env: &'a [(String, String)],
    pub clients: usize,
    pub rounds: usize,
    /// Unmeasured, per arm, once before the first round.
    pub warmup: Duration,
    /// Measured time of each arm, over all rounds.
    pub duration: Duration,
    pub progress: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Arm {
    Native,
    Web,
}

impl Arm {
    fn name(self) -> &'static str {
        match self {
            Arm::Native => "get, native gRPC (HTTP/2)",
            Arm::Web => "get, gRPC-Web (HTTP/1.1)",
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct ArmReport {
    pub arm: String,
    pub ops_per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub errors: u64,
    /// Each round's ops/s, apart.
    pub round_ops_per_sec: Vec<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct GrpcWebReport {
    pub clients: usize,
    pub arms: Vec<ArmReport>,
    /// gRPC-Web ops/s over native ops/s.
    pub web_over_native: f64,
}

pub async fn run(db: &BenchDb, settings: &Settings<'_>) -> anyhow::Result<GrpcWebReport> {
    crate::migrate(&settings.binary.to_path_buf(), db.url()).await?;
    let server = ServerProcess::start(
        settings.binary,
        db.url(),
        settings.server_args,
        settings.server_env,
    )
    .await?;
    let result = measure(&server, settings).await;
    server.stop().await?;
    result
}

type WebService = tonic_web::GrpcWebClientService<
    Client<
        hyper_util::client::legacy::connect::HttpConnector,
        tonic_web::GrpcWebCall<tonic::body::Body>,
    >,
>;

/// A client speaking gRPC-Web over HTTP/1.1 to `addr`.
fn web_client(addr: std::net::SocketAddr) -> anyhow::Result<UserMetadataServiceClient<WebService>> {
    let http1 = Client::builder(TokioExecutor::new()).build_http();
    let service = tower::ServiceBuilder::new()
        .layer(GrpcWebClientLayer::new())
        .service(http1);
    let origin = format!("http://{addr}")
        .parse()
        .context("the server's URI")?;
    Ok(UserMetadataServiceClient::with_origin(service, origin))
}

async fn measure(server: &ServerProcess, settings: &Settings<'_>) -> anyhow::Result<GrpcWebReport> {
    let mut seeding = UserMetadataServiceClient::new(channel(server.addr).await?);
    for n in 0..USERS {
        seeding
            .merge(MergeUserMetadataRequest {
                user_id: format!("web_{n}"),
                public_metadata: Some(prost_types::Struct {
                    fields: [("n".to_owned(), prost_types::Value::from(n as f64))].into(),
                }),
                ..Default::default()
            })
            .await
            .context("seeding")?;
    }
    let mut natives = Vec::with_capacity(settings.clients);
    let mut webs = Vec::with_capacity(settings.clients);
    for _ in 0..settings.clients {
        natives.push(UserMetadataServiceClient::new(channel(server.addr).await?));
        webs.push(web_client(server.addr)?);
    }
    // A Web answer checked the same way as a native one.
    let checked = |got: UserMetadata, id: &str| -> Result<(), String> {
        if got.user_id != id {
            return Err(format!("asked {id}, got {}", got.user_id));
        }
        if got.version != 1 {
            return Err(format!("{id}: version {}", got.version));
        }
        Ok(())
    };
    let arm_once = |arm: Arm, duration: Duration| {
        let (natives, webs) = (natives.clone(), webs.clone());
        async move {
            load::closed_loop(settings.clients, duration, move |client, rng| {
                let id = format!("web_{}", rng.random_range(0..USERS));
                let request = GetUserMetadataRequest {
                    user_id: id.clone(),
                    revision: None,
                };
                let (mut native, mut web) = (natives[client].clone(), webs[client].clone());
                async move {
                    let got = match arm {
                        Arm::Native => native.get(request).await,
                        Arm::Web => web.get(request).await,
                    }
                    .map_err(|status| format!("{:?}: {}", status.code(), status.message()))?;
                    checked(got.into_inner(), &id)
                }
            })
            .await
        }
    };
    for arm in [Arm::Native, Arm::Web] {
        let warm = arm_once(arm, settings.warmup).await;
        anyhow::ensure!(
            warm.errors == 0,
            "{} failed while warming up: {:?}",
            arm.name(),
            warm.first_error
        );
    }
    let rounds = settings.rounds.max(1);
    let per_round = settings.duration / rounds as u32;
    let mut measured: Vec<(Arm, Vec<Measured>)> =
        vec![(Arm::Native, Vec::new()), (Arm::Web, Vec::new())];
    for round in 0..rounds {
        for i in 0..measured.len() {
            let index = (i + round) % measured.len();
            let arm = measured[index].0;
            let run = arm_once(arm, per_round).await;
            if settings.progress {
                eprintln!(
                    "  grpc-web round {}: {} {:.0} ops/s",
                    round + 1,
                    arm.name(),
                    run.throughput()
                );
            }
            measured[index].1.push(run);
        }
    }
    let arms: Vec<ArmReport> = measured
        .into_iter()
        .map(|(arm, runs)| {
            let mut latency = load::latency_histogram();
            let (mut ops, mut errors, mut elapsed) = (0u64, 0u64, Duration::ZERO);
            let mut first_error = None;
            let round_ops_per_sec = runs.iter().map(Measured::throughput).collect();
            for run in runs {
                ops += run.ops;
                errors += run.errors;
                elapsed += run.elapsed;
                latency.add(run.latency).expect("same bounds");
                first_error = first_error.or(run.first_error);
            }
            if let Some(err) = first_error {
                eprintln!("  {}: {errors} errors, the first: {err}", arm.name());
            }
            ArmReport {
                arm: arm.name().to_owned(),
                ops_per_sec: ops as f64 / elapsed.as_secs_f64(),
                p50_ms: ms(latency.value_at_quantile(0.5)),
                p99_ms: ms(latency.value_at_quantile(0.99)),
                errors,
                round_ops_per_sec,
            }
        })
        .collect();
    let web_over_native = arms[1].ops_per_sec / arms[0].ops_per_sec;
    Ok(GrpcWebReport {
        clients: settings.clients,
        arms,
        web_over_native,
    })
}

/// The table printed after a run.
pub fn print(report: &GrpcWebReport) {
    println!(
        "\ngrpc-web: Get at {} clients, native gRPC against gRPC-Web",
        report.clients
    );
    println!(
        "{:<30} {:>10} {:>9} {:>9} {:>7}",
        "arm", "ops/s", "p50 ms", "p99 ms", "errors"
    );
    for arm in &report.arms {
        println!(
            "{:<30} {:>10.0} {:>9.3} {:>9.3} {:>7}",
            arm.arm, arm.ops_per_sec, arm.p50_ms, arm.p99_ms, arm.errors
        );
    }
    println!("gRPC-Web / native: {:.2}", report.web_over_native);
}
