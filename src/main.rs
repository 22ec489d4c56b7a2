use std::process::ExitCode;

/// mimalloc rather than the system's malloc: a call's messages are trees
/// of small allocations (JSON values, protobuf Structs, maps), and glibc's
/// malloc and free were a sixth of the server's CPU under a history page
/// load (BENCHMARKS.md, issue 29).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use metadata_service::config::{Cli, Run, ServerRun};
use metadata_service::{client, logging, server};

#[tokio::main]
async fn main() -> ExitCode {
    let run = match Cli::read() {
        // The client subcommands print results, not logs.
        Run::Client(invocation) => return client::run(invocation).await,
        Run::Server(run) => run,
    };
    let observability = run.observability();
    let telemetry = match logging::init(
        observability.log_format,
        &observability.log_filter,
        observability.otlp_endpoint.as_deref(),
    ) {
        Ok(telemetry) => telemetry,
        Err(err) => {
            eprintln!("error: {err:#}");
            return ExitCode::FAILURE;
        }
    };
    let result = server_process(run).await;
    // The spans of the last calls (and of a failed start) are still buffered.
    telemetry.shutdown().await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // One line with the whole cause chain, no backtrace.
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn server_process(run: ServerRun) -> anyhow::Result<()> {
    match run {
        ServerRun::Migrate(args) => {
            let options = args.database.store_options();
            metadata_service::store::Store::open(&args.database.database_url, &options)
                .await?
                .close()
                .await?;
            tracing::info!("migrations applied");
            Ok(())
        }
        ServerRun::Relay(args) => {
            let config = args.process_config()?;
            let stop = shutdown_signal()?;
            tokio::pin!(stop);
            let mut running = tokio::select! {
                running = metadata_service::relay::start_process(config) => running?,
                () = &mut stop => {
                    tracing::info!("stopped during start-up");
                    return Ok(());
                }
            };
            tokio::select! {
                // Only an error no retry mends ends the relay by itself.
                stopped = running.stopped() => stopped,
                () = stop => {
                    tracing::info!("shutting down");
                    running.shutdown().await
                }
            }
        }
        ServerRun::Serve(args) => {
            let config = args.server_config()?;
            // Listen for signals before starting, so that one arriving while
            // connecting or migrating stops the start cleanly.
            let stop = shutdown_signal()?;
            tokio::pin!(stop);
            let running = tokio::select! {
                running = server::start(&config) => running?,
                () = &mut stop => {
                    tracing::info!("stopped during start-up");
                    return Ok(());
                }
            };
            stop.await;
            running.shutdown().await
        }
    }
}

/// Resolves on the first SIGINT or SIGTERM.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
    })
}
