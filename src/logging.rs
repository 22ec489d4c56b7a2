//! Log output: human-readable text (coloured only on a terminal) or one JSON
//! object per line, filtered like RUST_LOG; and [`Escaped`], the form in
//! which every request-derived value goes into a log line.

use std::fmt::{self, Write};
use std::io::IsTerminal;

use clap::ValueEnum;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::otel;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// What [`init`] installed that must be flushed before the process exits.
#[must_use = "spans still buffered are lost unless it is shut down"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports the spans still buffered and stops the exporter. Blocks
    /// until the collector answers or the export times out, so it runs off
    /// the runtime's workers (the export itself needs the runtime).
    pub async fn shutdown(self) {
        if let Some(provider) = self.provider {
            let done = tokio::task::spawn_blocking(move || provider.shutdown()).await;
            if let Ok(Err(err)) = done {
                eprintln!("warning: the last spans may not have been exported: {err}");
            }
        }
    }

    /// The tracer provider, when spans are exported (tests flush it).
    pub fn provider(&self) -> Option<&SdkTracerProvider> {
        self.provider.as_ref()
    }
}

/// Installs the global subscriber. `filter` uses RUST_LOG syntax
/// (`info`, `metadata_service=debug,h2=info`, ...) and chooses log lines
/// only. With `otlp_endpoint`, spans are also exported there: the
/// server's own spans at INFO and above, whatever the log filter, and
/// none of the libraries' (the exporter's own HTTP/2 spans would feed
/// themselves). Must run inside the Tokio runtime.
pub fn init(
    format: LogFormat,
    filter: &str,
    otlp_endpoint: Option<&str>,
) -> anyhow::Result<Telemetry> {
    let log_filter = EnvFilter::try_new(filter)
        .map_err(|err| anyhow::anyhow!("invalid log filter {filter:?}: {err}"))?
        .add_directive(
            format!("{}=off", otel::TARGET)
                .parse()
                .expect("a valid directive"),
        );
    let installed = match otlp_endpoint {
        // The log alone, layered as `tracing_subscriber::fmt()` would: no
        // per-layer filtering to pay for on every event.
        None => {
            return tracing_subscriber::registry()
                .with(fmt_layer(format))
                .with(log_filter)
                .try_init()
                .map(|()| Telemetry { provider: None })
                .map_err(|err| anyhow::anyhow!("cannot install the logger: {err}"));
        }
        Some(endpoint) => {
            let provider = otel::provider(endpoint)?;
            let spans = tracing_opentelemetry::layer()
                .with_tracer(provider.tracer("metadata-service"))
                .with_location(false)
                .with_threads(false)
                .with_filter(Targets::new().with_target("metadata_service", LevelFilter::INFO));
            tracing_subscriber::registry()
                .with(fmt_layer(format).with_filter(log_filter))
                .with(spans)
                .try_init()
                .map(|()| provider)
        }
    };
    let provider = installed.map_err(|err| anyhow::anyhow!("cannot install the logger: {err}"))?;
    otel::set_exporting();
    Ok(Telemetry {
        provider: Some(provider),
    })
}

/// The log lines, as text or JSON.
fn fmt_layer<S>(format: LogFormat) -> Box<dyn Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    let layer = tracing_subscriber::fmt::layer();
    match format {
        LogFormat::Text => layer.with_ansi(std::io::stdout().is_terminal()).boxed(),
        // The request span's fields (service, method, id, caller) are
        // merged into each line, so every line stands on its own.
        LogFormat::Json => layer
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .boxed(),
    }
}

/// A value that came from a request (an id, a token's claim, an error that
/// may quote input), shown so that it cannot forge log lines or fields: a
/// newline would start a line of the caller's making, an ANSI sequence
/// would rewrite the terminal, a space or quote would add a `key=value` of
/// its own. Printable ASCII stays as it is (valid ids are unchanged), a
/// backslash or double quote is escaped, everything else is written as
/// `\n`, `\r`, `\t` or `\u{..}`, and the value is cut after
/// [`Escaped::MAX_BYTES`] so one call cannot write a megabyte line. Text and
/// JSON output show the same characters.
pub struct Escaped<'a>(pub &'a str);

impl Escaped<'_> {
    pub const MAX_BYTES: usize = 1024;
}

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = self.0;
        let mut end = text.len().min(Self::MAX_BYTES);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        for c in text[..end].chars() {
            match c {
                '\\' | '"' | '\n' | '\r' | '\t' => write!(f, "{}", c.escape_default())?,
                '!'..='~' => f.write_char(c)?,
                _ => write!(f, "\\u{{{:x}}}", u32::from(c))?,
            }
        }
        if end < text.len() {
            write!(f, "...({} bytes in all)", text.len())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn escaped(text: &str) -> String {
        Escaped(text).to_string()
    }

    #[test]
    fn printable_ascii_is_unchanged() {
        assert_eq!(escaped("user_2abc-XYZ.~!'"), "user_2abc-XYZ.~!'");
        assert_eq!(escaped("backend:billing"), "backend:billing");
    }

    #[test]
    fn control_characters_spaces_quotes_and_non_ascii_are_escaped() {
        assert_eq!(
            escaped("x\n2026-01-01T00:00:00Z  INFO forged"),
            "x\\n2026-01-01T00:00:00Z\\u{20}\\u{20}INFO\\u{20}forged"
        );
        assert_eq!(escaped("a\rb\tc"), "a\\rb\\tc");
        assert_eq!(escaped("\u{1b}[31mred"), "\\u{1b}[31mred");
        assert_eq!(escaped("q\"x\\y"), "q\\\"x\\\\y");
        assert_eq!(
            escaped("\0\u{7f}é\u{202e}"),
            "\\u{0}\\u{7f}\\u{e9}\\u{202e}"
        );
        // Nothing escaped is a control character or a space any more.
        let out = escaped("\u{0}\u{1}\u{1b}\u{7f}\u{85}\u{2028} \n\r");
        assert!(out.chars().all(|c| c.is_ascii_graphic()), "{out}");
    }

    #[test]
    fn long_values_are_cut_on_a_character_boundary() {
        let long = "é".repeat(Escaped::MAX_BYTES);
        let out = escaped(&long);
        assert!(
            out.ends_with(&format!("...({} bytes in all)", long.len())),
            "{out}"
        );
        assert_eq!(out.matches("\\u{e9}").count(), Escaped::MAX_BYTES / 2);
        let exact = "a".repeat(Escaped::MAX_BYTES);
        assert_eq!(escaped(&exact), exact);
    }
}
