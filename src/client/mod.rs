//! The command-line client: `metadata-service user|org get|merge|replace|
//! delete|watch|batch-get|list`, and `metadata-service schema get|set|delete`
//! (`schemas.rs`), `metadata-service txn --file FILE|-`
//! (`transaction.rs`), and `metadata-service webhook create|list|get|update|
//! delete|rotate-secret|replay` (`webhooks.rs`). Values are JSON given inline, as `@file.json`, or `-` for
//! standard input (a schema: `--file path` or `--file -`), and are all
//! parsed before any call is made. Results are printed as JSON (indented on
//! a terminal, one line when piped).
//!
//! Exit status: 0 success; 2 bad input (with the position of a JSON error);
//! 1 when the server could not be reached (connection or TLS trouble before
//! it answered); 64 + the gRPC code for an error status (as grpcurl does:
//! INVALID_ARGUMENT is 67, NOT_FOUND 69, ...).

mod output;
mod records;
pub mod schemas;
pub mod transaction;
pub mod webhooks;

use std::error::Error as _;
use std::io::{IsTerminal, Read};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use serde_json::Value;
use tokio_stream::StreamExt;
use tonic::Status;
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::api::{ApiKind, Organizations, Users, WriteParts};
use crate::convert::proto_from_json;
use crate::model::{Field, Kind};
use crate::proto::v1::organization_metadata_service_client::OrganizationMetadataServiceClient;
use crate::proto::v1::user_metadata_service_client::UserMetadataServiceClient;
use records::{Calls, Intercepted};
pub use schemas::SchemaCommand;
pub use transaction::TxnCommand;
pub use webhooks::WebhookCommand;

/// What the client is asked to do.
#[derive(Debug)]
pub enum Invocation {
    /// `user ...` or `org ...`: one kind's metadata.
    Metadata(Kind, ClientCommand),
    /// `schema ...`: the JSON Schemas of the metadata fields.
    Schema(SchemaCommand),
    /// `txn ...`: several writes, all or none.
    Txn(TxnCommand),
    /// `webhook ...`: webhook endpoints.
    Webhook(WebhookCommand),
}

impl Invocation {
    fn connection(&self) -> &Connection {
        match self {
            Invocation::Metadata(_, command) => &command.connection,
            Invocation::Schema(command) => &command.connection,
            Invocation::Txn(command) => &command.connection,
            Invocation::Webhook(command) => &command.connection,
        }
    }
}

#[derive(Debug, Args)]
pub struct ClientCommand {
    #[command(subcommand)]
    pub action: Action,
    #[command(flatten)]
    pub connection: Connection,
}

#[derive(Debug, Args)]
pub struct Connection {
    /// Server to call: http://host:port, or https:// with --ca.
    #[arg(
        long,
        env = "METADATA_ADDR",
        default_value = "http://127.0.0.1:50051",
        global = true
    )]
    pub addr: String,
    /// Bearer credential: a backend API key or a frontend session token.
    /// Prefer the variable: a flag is visible to other users in `ps`.
    #[arg(long, env = "METADATA_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<Token>,
    /// PEM CA certificate to trust for https:// (the system store is not used).
    #[arg(long, global = true)]
    pub ca: Option<PathBuf>,
    /// PEM client certificate, for servers that require mTLS.
    #[arg(long, requires = "client_key", global = true)]
    pub client_cert: Option<PathBuf>,
    /// PEM private key of --client-cert.
    #[arg(long, requires = "client_cert", global = true)]
    pub client_key: Option<PathBuf>,
    /// W3C trace context to send (00-<trace id>-<parent id>-<flags>): the
    /// server's spans join that trace.
    #[arg(long, env = "TRACEPARENT", global = true, value_parser = crate::otel::check_traceparent)]
    pub traceparent: Option<String>,
}

/// A bearer credential, kept out of `Debug` output.
#[derive(Clone)]
pub struct Token(String);

impl std::str::FromStr for Token {
    type Err = std::convert::Infallible;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Ok(Token(text.to_string()))
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

#[derive(Debug, Subcommand)]
pub enum Action {
    /// Print the stored metadata.
    Get {
        id: String,
        /// As it was right after this revision (within the event retention).
        #[arg(long)]
        at: Option<u64>,
    },
    /// Deep-merge the given fields (null removes a key at any level).
    Merge {
        id: String,
        #[command(flatten)]
        values: FieldFlags,
        /// Only if the stored version is still this one.
        #[arg(long)]
        expected_version: Option<u64>,
    },
    /// Replace each given field in full (`{}` clears, null stores null).
    Replace {
        id: String,
        #[command(flatten)]
        values: FieldFlags,
        #[arg(long)]
        expected_version: Option<u64>,
    },
    /// Apply an RFC 6902 JSON Patch to one field: a JSON list of
    /// operations, from a file or `-` for standard input. A failed `test`
    /// operation writes nothing (exit status 74, Aborted).
    Patch {
        id: String,
        #[arg(long, value_enum)]
        field: schemas::FieldName,
        /// The patch: a file, or `-` for standard input.
        #[arg(long)]
        ops: String,
        #[arg(long)]
        expected_version: Option<u64>,
    },
    /// Remove all metadata of the id.
    Delete {
        id: String,
        #[arg(long)]
        expected_version: Option<u64>,
    },
    /// Print every change, one JSON object per line (all ids, or those given).
    Watch {
        ids: Vec<String>,
        /// First revision to print (0: only changes from now on).
        #[arg(long, default_value_t = 0)]
        from_revision: u64,
        /// Exit after this many events.
        #[arg(long)]
        max_events: Option<u64>,
        /// Only events whose before or after matches (the filter of list).
        #[arg(long, default_value = "")]
        filter: String,
    },
    /// Print the stored metadata of several ids at once, in their order.
    BatchGet {
        #[arg(required = true)]
        ids: Vec<String>,
        /// As they were right after this revision.
        #[arg(long)]
        at: Option<u64>,
    },
    /// Print the records whose metadata matches a filter, ordered by id:
    /// one page as a JSON object, or with --all every record, one per line.
    List {
        /// e.g. 'public_metadata.plan = "gold" AND public_metadata.seats > 10'.
        #[arg(long, default_value = "")]
        filter: String,
        /// Records per page (the server's default: 50; at most 1000).
        #[arg(long, default_value_t = 0)]
        page_size: i32,
        /// Continue from a next_page_token (with the same filter).
        #[arg(long, default_value = "", conflicts_with = "all")]
        page_token: String,
        /// Follow every page to the end.
        #[arg(long)]
        all: bool,
    },
    /// Print the id's changes, newest first, one JSON object per line (as
    /// far back as the event retention keeps them).
    History {
        id: String,
        /// Print at most this many events.
        #[arg(long, default_value_t = 50)]
        limit: u64,
        /// Oldest first.
        #[arg(long)]
        oldest_first: bool,
    },
    /// Put back every field as it was right after a revision (deletes the
    /// record if it did not exist then).
    Restore {
        id: String,
        /// The revision to go back to.
        #[arg(long)]
        to: u64,
        #[arg(long)]
        expected_version: Option<u64>,
    },
}

/// JSON for each field: inline, `@file.json`, or `-` for standard input.
#[derive(Debug, Default, Args)]
pub struct FieldFlags {
    #[arg(long)]
    pub public: Option<String>,
    #[arg(long)]
    pub private: Option<String>,
    /// User metadata only.
    #[arg(long = "unsafe")]
    pub unsafe_: Option<String>,
}

enum Failure {
    /// Bad input, found before anything was sent.
    Input(String),
    /// No connection could be made.
    Connection(String),
    /// The first call failed on this side of the connection (a status made
    /// from a transport error): the server never answered. A refused TLS
    /// client certificate shows up only here.
    Unreached(Status),
    /// The server's answer, or a failure after it had answered.
    Rpc(Status),
}

impl From<Status> for Failure {
    fn from(status: Status) -> Self {
        Failure::Rpc(status)
    }
}

/// How the first call failed; see [`Failure::Unreached`].
fn first_call(status: Status) -> Failure {
    match status.source() {
        Some(_) => Failure::Unreached(status),
        None => Failure::Rpc(status),
    }
}

pub async fn run(invocation: Invocation) -> ExitCode {
    let connection = invocation.connection();
    let addr = connection.addr.clone();
    // A server that requires mTLS closes the connection without saying why.
    let hint = match addr.starts_with("https://") && connection.client_cert.is_none() {
        true => " (if the server requires client certificates: --client-cert, --client-key)",
        false => "",
    };
    let done = match invocation {
        Invocation::Metadata(kind, command) => execute(kind, command).await,
        Invocation::Schema(command) => schemas::execute(command).await,
        Invocation::Txn(command) => transaction::execute(command).await,
        Invocation::Webhook(command) => webhooks::execute(command).await,
    };
    match done {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Input(message)) => {
            eprintln!("error: {message}");
            ExitCode::from(2)
        }
        Err(Failure::Connection(message)) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
        Err(Failure::Unreached(status)) => {
            let cause = status.source().map_or_else(|| status.to_string(), causes);
            eprintln!(
                "error: cannot connect to {addr}: {:?}: {cause}{hint}",
                status.code()
            );
            ExitCode::FAILURE
        }
        Err(Failure::Rpc(status)) => {
            eprintln!("error: {:?}: {}", status.code(), status.message());
            for line in details(&status) {
                eprintln!("  {line}");
            }
            ExitCode::from(64 + status.code() as u8)
        }
    }
}

/// The status's details, a line each, for a person reading stderr: the
/// reason and its metadata, each invalid field, each failed precondition,
/// when to retry. Nothing when it has none (or they do not decode).
fn details(status: &Status) -> Vec<String> {
    use tonic_types::StatusExt;
    let Ok(details) = status.check_error_details() else {
        return Vec::new();
    };
    let mut lines = Vec::new();
    if let Some(info) = details.error_info() {
        let mut metadata: Vec<_> = info.metadata.iter().collect();
        metadata.sort();
        let metadata: Vec<String> = metadata.iter().map(|(k, v)| format!("{k}={v}")).collect();
        lines.push(
            format!("reason: {} {}", info.reason, metadata.join(" "))
                .trim_end()
                .to_owned(),
        );
    }
    for violation in details
        .bad_request()
        .map_or(&[][..], |b| &b.field_violations)
    {
        lines.push(format!(
            "field {}: {} ({})",
            violation.field, violation.description, violation.reason
        ));
    }
    for violation in details
        .precondition_failure()
        .map_or(&[][..], |p| &p.violations)
    {
        lines.push(format!(
            "precondition {}: {}",
            violation.subject, violation.description
        ));
    }
    if let Some(delay) = details.retry_info().and_then(|r| r.retry_delay) {
        lines.push(format!("retry after: {delay:?}"));
    }
    lines
}

/// An error and its sources, outermost first: tonic's own message is only
/// "transport error", the reason (an unknown issuer, a refused
/// certificate) is further down.
fn causes(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let next = cause.to_string();
        if !text.ends_with(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = cause.source();
    }
    text
}

/// The fields a write gives, parsed from their flags and converted with
/// `convert` (which gets the flag's name for its messages).
fn write_parts<K: ApiKind, T>(
    id: String,
    flags: &FieldFlags,
    expected_version: Option<u64>,
    convert: impl Fn(&str, Value) -> Result<T, Failure>,
) -> Result<WriteParts<T>, Failure> {
    if flags.unsafe_.is_some() && !K::FIELDS.contains(&Field::Unsafe) {
        return Err(Failure::Input(format!(
            "--unsafe: {}s have no unsafe metadata",
            K::KIND.as_str()
        )));
    }
    let mut stdin_used = false;
    let mut parse = |flag: &str, text: &Option<String>| -> Result<Option<T>, Failure> {
        let Some(text) = text else { return Ok(None) };
        let source = if text == "-" {
            if std::mem::replace(&mut stdin_used, true) {
                return Err(Failure::Input(format!(
                    "--{flag}: standard input is already used by another field"
                )));
            }
            read_stdin(flag)?
        } else if let Some(path) = text.strip_prefix('@') {
            read_file(flag, path)?
        } else {
            text.clone()
        };
        convert(flag, parse_json(flag, &source)?).map(Some)
    };
    Ok(WriteParts {
        id,
        public: parse("public", &flags.public)?,
        private: parse("private", &flags.private)?,
        unsafe_: parse("unsafe", &flags.unsafe_)?,
        expected_version,
        request_id: String::new(),
    })
}

/// All of standard input, for `--flag -`.
fn read_stdin(flag: &str) -> Result<String, Failure> {
    use std::io::IsTerminal;
    if std::io::stdin().is_terminal() {
        // Otherwise it would look as if the command hung.
        eprintln!("--{flag}: reading JSON from standard input; end it with Ctrl-D");
    }
    let mut input = String::new();
    std::io::stdin()
        .read_to_string(&mut input)
        .map_err(|e| Failure::Input(format!("--{flag}: cannot read standard input: {e}")))?;
    Ok(input)
}

fn read_file(flag: &str, path: &str) -> Result<String, Failure> {
    std::fs::read_to_string(path)
        .map_err(|e| Failure::Input(format!("--{flag}: cannot read {path}: {e}")))
}

/// `source` as JSON; serde_json's message ends with the line and column.
fn parse_json(flag: &str, source: &str) -> Result<Value, Failure> {
    serde_json::from_str(source).map_err(|e| Failure::Input(format!("--{flag}: invalid JSON: {e}")))
}

/// `value` as a protobuf Struct, which only a JSON object is; `what` names
/// it in the message.
fn object(flag: &str, value: Value, what: &str) -> Result<prost_types::Struct, Failure> {
    match proto_from_json(&value).kind {
        Some(prost_types::value::Kind::StructValue(object)) => Ok(object),
        _ => Err(Failure::Input(format!(
            "--{flag}: {what} must be a JSON object"
        ))),
    }
}

/// A merge patch must be an object (a protobuf Struct).
fn patch(flag: &str, value: Value) -> Result<prost_types::Struct, Failure> {
    object(flag, value, "a merge patch")
}

/// A JSON Patch must be a list of operations (a protobuf ListValue).
fn json_patch(flag: &str, value: Value) -> Result<prost_types::ListValue, Failure> {
    match proto_from_json(&value).kind {
        Some(prost_types::value::Kind::ListValue(list)) => Ok(list),
        _ => Err(Failure::Input(format!(
            "--{flag}: a JSON Patch must be a JSON list of operations"
        ))),
    }
}

/// A call with every value parsed and converted: what is left can only
/// fail on the way to the server or there.
enum Call {
    Get {
        id: String,
        at: Option<u64>,
    },
    Merge(WriteParts<prost_types::Struct>),
    Replace(WriteParts<prost_types::Value>),
    Patch(WriteParts<prost_types::ListValue>),
    Delete {
        id: String,
        expected: Option<u64>,
    },
    Watch {
        ids: Vec<String>,
        from_revision: u64,
        max_events: Option<u64>,
        filter: String,
    },
    BatchGet {
        ids: Vec<String>,
        at: Option<u64>,
    },
    List {
        filter: String,
        page_size: i32,
        page_token: String,
        all: bool,
    },
    History {
        id: String,
        limit: u64,
        oldest_first: bool,
    },
    Restore {
        id: String,
        to: u64,
        expected: Option<u64>,
    },
}

fn prepare<K: ApiKind>(action: Action) -> Result<Call, Failure> {
    Ok(match action {
        Action::Get { id, at } => Call::Get { id, at },
        Action::Merge {
            id,
            values,
            expected_version,
        } => Call::Merge(write_parts::<K, _>(id, &values, expected_version, patch)?),
        Action::Replace {
            id,
            values,
            expected_version,
        } => Call::Replace(write_parts::<K, _>(
            id,
            &values,
            expected_version,
            |_, v| Ok(proto_from_json(&v)),
        )?),
        Action::Patch {
            id,
            field,
            ops,
            expected_version,
        } => {
            let source = match ops.as_str() {
                "-" => ops,
                path => format!("@{path}"),
            };
            let mut flags = FieldFlags::default();
            *match field {
                schemas::FieldName::Public => &mut flags.public,
                schemas::FieldName::Private => &mut flags.private,
                schemas::FieldName::Unsafe => &mut flags.unsafe_,
            } = Some(source);
            Call::Patch(write_parts::<K, _>(
                id,
                &flags,
                expected_version,
                json_patch,
            )?)
        }
        Action::Delete {
            id,
            expected_version,
        } => Call::Delete {
            id,
            expected: expected_version,
        },
        Action::Watch {
            ids,
            from_revision,
            max_events,
            filter,
        } => Call::Watch {
            ids,
            from_revision,
            max_events,
            filter,
        },
        Action::BatchGet { ids, at } => Call::BatchGet { ids, at },
        Action::History {
            id,
            limit,
            oldest_first,
        } => Call::History {
            id,
            limit,
            oldest_first,
        },
        Action::Restore {
            id,
            to,
            expected_version,
        } => Call::Restore {
            id,
            to,
            expected: expected_version,
        },
        Action::List {
            filter,
            page_size,
            page_token,
            all,
        } => Call::List {
            filter,
            page_size,
            page_token,
            all,
        },
    })
}

/// The metadata every call carries: the credential and the trace context.
#[derive(Clone)]
struct Bearer {
    token: Option<MetadataValue<tonic::metadata::Ascii>>,
    traceparent: Option<MetadataValue<tonic::metadata::Ascii>>,
}

impl Interceptor for Bearer {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(token) = &self.token {
            request
                .metadata_mut()
                .insert("authorization", token.clone());
        }
        if let Some(traceparent) = &self.traceparent {
            request
                .metadata_mut()
                .insert("traceparent", traceparent.clone());
        }
        Ok(request)
    }
}

async fn connect(connection: &Connection) -> Result<(Channel, Bearer), Failure> {
    let token = match &connection.token {
        Some(Token(token)) => Some(format!("Bearer {token}").parse().map_err(|_| {
            Failure::Input("--token/METADATA_TOKEN: not a valid header value".into())
        })?),
        None => None,
    };
    let mut endpoint = Endpoint::from_shared(connection.addr.clone())
        .map_err(|e| Failure::Input(format!("--addr/METADATA_ADDR: {e}")))?;
    if connection.addr.starts_with("https://") {
        let read = |path: &PathBuf| {
            std::fs::read(path)
                .map_err(|e| Failure::Input(format!("cannot read {}: {e}", path.display())))
        };
        let ca = connection.ca.as_ref().ok_or_else(|| {
            Failure::Input("https:// needs --ca (the system store is not used)".into())
        })?;
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca)?));
        if let (Some(cert), Some(key)) = (&connection.client_cert, &connection.client_key) {
            tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| Failure::Connection(format!("TLS: {e}")))?;
    }
    let channel = endpoint.connect().await.map_err(|e| {
        Failure::Connection(format!(
            "cannot connect to {}: {}",
            connection.addr,
            causes(&e)
        ))
    })?;
    // Checked when the command line was read: hex and dashes only.
    let traceparent = connection.traceparent.as_ref().map(|text| {
        text.parse()
            .expect("a checked traceparent is a header value")
    });
    Ok((channel, Bearer { token, traceparent }))
}

async fn execute(kind: Kind, command: ClientCommand) -> Result<(), Failure> {
    match kind {
        Kind::User => execute_as::<Users, UserMetadataServiceClient<Intercepted>>(command).await,
        Kind::Organization => {
            execute_as::<Organizations, OrganizationMetadataServiceClient<Intercepted>>(command)
                .await
        }
    }
}

/// One flow for both kinds: [`ApiKind`] builds and reads the messages,
/// [`Calls`] makes the calls.
async fn execute_as<K: ApiKind, C: Calls<K>>(command: ClientCommand) -> Result<(), Failure> {
    // Every value is parsed and checked before anything is sent.
    let call = prepare::<K>(command.action)?;
    let (channel, bearer) = connect(&command.connection).await?;
    let pretty = std::io::stdout().is_terminal();
    let mut client = C::connect(channel, bearer);
    let printed = |record: K::Record| output::record(K::KIND, &K::record_view(record));
    let result = match call {
        Call::Get { id, at } => client.get(K::get_request(id, at)).await.map(printed),
        Call::Restore { id, to, expected } => client
            .restore(K::restore_request(id, to, expected))
            .await
            .map(printed),
        Call::History {
            id,
            limit,
            oldest_first,
        } => {
            let mut printed = 0;
            let mut page_token = String::new();
            while printed < limit {
                let page_size = (limit - printed).min(1000) as i32;
                let request = K::history_request(id.clone(), page_size, page_token, oldest_first);
                let page = client.history(request).await.map_err(first_call)?;
                let (events, next, oldest) = K::history_view(page);
                for event in events.iter().take((limit - printed) as usize) {
                    output::print(&output::event(K::KIND, event), false);
                    printed += 1;
                }
                if next.is_empty() {
                    if oldest > 1 {
                        eprintln!(
                            "note: the log holds events from revision {oldest} on \
                             (older ones passed the event retention)"
                        );
                    }
                    break;
                }
                page_token = next;
            }
            return Ok(());
        }
        Call::Merge(parts) => client.merge(K::merge_request(parts)).await.map(printed),
        Call::Replace(parts) => client.replace(K::replace_request(parts)).await.map(printed),
        Call::Patch(parts) => client.patch(K::patch_request(parts)).await.map(printed),
        Call::Delete { id, expected } => client
            .delete(K::delete_request(id, expected))
            .await
            .map(|deleted| serde_json::json!({ "existed": K::existed(deleted) })),
        Call::BatchGet { ids, at } => {
            client
                .batch_get(K::batch_get_request(ids, at))
                .await
                .map(|response| {
                    let (records, revision) = K::batch_got_view(response);
                    output::records(K::KIND, &records, None, revision)
                })
        }
        Call::List {
            filter,
            page_size,
            mut page_token,
            all: true,
        } => {
            // Every record, one per line, page after page.
            loop {
                let request = K::list_request(filter.clone(), page_size, page_token);
                let page = client.list(request).await.map_err(first_call)?;
                let (records, next, _) = K::listed_view(page);
                for record in &records {
                    output::print(&output::record(K::KIND, record), false);
                }
                if next.is_empty() {
                    return Ok(());
                }
                page_token = next;
            }
        }
        Call::List {
            filter,
            page_size,
            page_token,
            all: false,
        } => client
            .list(K::list_request(filter, page_size, page_token))
            .await
            .map(|page| {
                let (records, next, revision) = K::listed_view(page);
                output::records(K::KIND, &records, Some(next), revision)
            }),
        Call::Watch {
            ids,
            from_revision,
            max_events,
            filter,
        } => {
            let request = K::watch_request(from_revision, ids, false, filter);
            let mut responses = client.watch(request).await.map_err(first_call)?;
            let mut printed = 0;
            while max_events.is_none_or(|max| printed < max) {
                let Some(response) = responses.next().await.transpose()? else {
                    break;
                };
                // Progress messages are not printed.
                if let Some(event) = K::event_view(response) {
                    output::print(&output::event(K::KIND, &event), false);
                    printed += 1;
                }
            }
            return Ok(());
        }
    };
    output::print(&result.map_err(first_call)?, pretty);
    Ok(())
}
