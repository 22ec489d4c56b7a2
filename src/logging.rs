//! Log output: human-readable text (coloured only on a terminal) or one JSON
//! object per line, filtered like RUST_LOG.

use std::io::IsTerminal;

use clap::ValueEnum;
use tracing_subscriber::EnvFilter;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Installs the global subscriber. `filter` uses RUST_LOG syntax
/// (`info`, `metadata_service=debug,h2=info`, ...).
pub fn init(format: LogFormat, filter: &str) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(filter)
        .map_err(|err| anyhow::anyhow!("invalid log filter {filter:?}: {err}"))?;
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Text => builder
            .with_ansi(std::io::stdout().is_terminal())
            .try_init(),
        // The request span's fields (service, method, id, caller) are
        // merged into each line, so every line stands on its own.
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    }
    .map_err(|err| anyhow::anyhow!("cannot install the logger: {err}"))
}
