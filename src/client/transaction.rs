//! `metadata-service txn --file FILE|-`: one Commit
//! (`metadata.v1.MetadataTransactionService`) from a CommitRequest in
//! proto3 JSON, the form grpcurl takes (field names in camelCase or as in
//! the proto), with the connection, input and exit-status handling of the
//! rest of the client. Prints the answer as the rest of the client prints
//! records.

use clap::Args;
use prost::Message;
use prost_reflect::{DeserializeOptions, DynamicMessage, MessageDescriptor};
use serde_json::{Value, json};

use super::{Connection, Failure, connect, first_call, output, read_file, read_stdin};
use crate::api::{ApiKind, Organizations, Users};
use crate::model::Kind;
use crate::proto::v1::metadata_transaction_service_client::MetadataTransactionServiceClient;
use crate::proto::v1::transaction_result::Record;
use crate::proto::v1::{CommitRequest, CommitResponse, DeleteResult, TransactionResult};

#[derive(Debug, Args)]
pub struct TxnCommand {
    /// The CommitRequest as JSON, e.g. {"operations": [{"patchUser":
    /// {"userId": "u1", "publicMetadata": [{"op": "add", "path": "/n",
    /// "value": 1}]}}]}: a file, or `-` for standard input.
    #[arg(long)]
    pub file: String,
    /// A UUID that makes a retry of this transaction safe (overrides the
    /// file's requestId).
    #[arg(long)]
    pub request_id: Option<String>,
    #[command(flatten)]
    pub connection: Connection,
}

pub(super) async fn execute(command: TxnCommand) -> Result<(), Failure> {
    let TxnCommand {
        file,
        request_id,
        connection,
    } = command;
    let source = match file.as_str() {
        "-" => read_stdin("file")?,
        path => read_file("file", path)?,
    };
    let mut request = parse(&source)?;
    if let Some(request_id) = request_id {
        request.request_id = request_id;
    }
    let (channel, bearer) = connect(&connection).await?;
    let mut client = MetadataTransactionServiceClient::with_interceptor(channel, bearer);
    let response = client
        .commit(request)
        .await
        .map_err(first_call)?
        .into_inner();
    let pretty = std::io::IsTerminal::is_terminal(&std::io::stdout());
    output::print(&printed(response), pretty);
    Ok(())
}

/// The answer as the rest of the client prints records: each result in
/// order (a record, or `{"deleted": {"existed": ...}}`), the revision of
/// the transaction's last event and its id.
fn printed(response: CommitResponse) -> Value {
    let CommitResponse {
        results,
        revision,
        transaction_id,
    } = response;
    let results: Vec<Value> = results
        .into_iter()
        .map(|TransactionResult { record }| match record {
            Some(Record::User(user)) => output::record(Kind::User, &Users::record_view(user)),
            Some(Record::Organization(org)) => {
                output::record(Kind::Organization, &Organizations::record_view(org))
            }
            Some(Record::Deleted(DeleteResult { existed })) => {
                json!({ "deleted": { "existed": existed } })
            }
            None => Value::Null,
        })
        .collect();
    json!({
        "results": results,
        "revision": revision,
        "transaction_id": transaction_id,
    })
}

/// A CommitRequest from its proto3 JSON; an unknown field or a value of the
/// wrong type is bad input, with serde's position.
fn parse(source: &str) -> Result<CommitRequest, Failure> {
    let descriptor = descriptor("metadata.v1.CommitRequest");
    let mut deserializer = serde_json::Deserializer::from_str(source);
    let dynamic = DynamicMessage::deserialize_with_options(
        descriptor,
        &mut deserializer,
        &DeserializeOptions::new(),
    )
    .and_then(|message| deserializer.end().map(|()| message))
    .map_err(|e| Failure::Input(format!("--file: not a CommitRequest: {e}")))?;
    CommitRequest::decode(dynamic.encode_to_vec().as_slice())
        .map_err(|e| Failure::Input(format!("--file: not a CommitRequest: {e}")))
}

fn descriptor(name: &str) -> MessageDescriptor {
    crate::proto::descriptor_pool()
        .get_message_by_name(name)
        .expect("the service's messages are in its descriptor set")
}
