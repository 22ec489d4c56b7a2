use std::process::ExitCode;

use clap::Parser;
use metadata_service::config::{Cli, Command};
use metadata_service::model::Kind;
use metadata_service::{client, logging, server};

#[tokio::main]
async fn main() -> ExitCode {
    let mut cli = Cli::parse();
    // The client subcommands print results, not logs.
    let server_command = match cli.command.take() {
        Some(Command::User(command)) => return client::run(Kind::User, command).await,
        Some(Command::Org(command)) => return client::run(Kind::Organization, command).await,
        Some(Command::Migrate) => ServerCommand::Migrate,
        Some(Command::Serve) | None => ServerCommand::Serve,
    };
    let observability = &cli.observability;
    if let Err(err) = logging::init(observability.log_format, &observability.log_filter) {
        eprintln!("error: {err:#}");
        return ExitCode::FAILURE;
    }
    match run(cli, server_command).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // One line with the whole cause chain, no backtrace.
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// What the process itself does, once the client subcommands are set aside.
enum ServerCommand {
    Serve,
    Migrate,
}

async fn run(cli: Cli, command: ServerCommand) -> anyhow::Result<()> {
    match command {
        ServerCommand::Migrate => {
            let options = cli.database.store_options();
            server::open_store(&cli.database.database_url, &options)
                .await?
                .close()
                .await?;
            tracing::info!("migrations applied");
            Ok(())
        }
        ServerCommand::Serve => {
            let config = cli.server_config()?;
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
