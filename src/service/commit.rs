//! `metadata.v1.MetadataTransactionService`: Commit (issue 30). Requests
//! are taken apart exhaustively here, each operation by its kind's own
//! conversions (`api::kind`); the work is in [`Core::commit`]
//! (`transaction.rs`) and the store. Backend callers only.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::handlers::origin;
use super::{Core, authorize};
use crate::api::{ApiKind, Organizations, Users, WriteParts};
use crate::auth::{Action, FieldSet, Operation};
use crate::convert::Shown;
use crate::model::{CommitCommand, Kind, TxnCommand};
use crate::proto::v1::metadata_transaction_service_server::MetadataTransactionService;
use crate::proto::v1::transaction_operation::Operation as Op;
use crate::proto::v1::transaction_result::Record as Result_;
use crate::proto::v1::{
    CommitRequest, CommitResponse, DeleteResult, TransactionOperation, TransactionResult,
};
use crate::store::{Committed, Sent, TxnDone};
use crate::validation::{JsonPath, Problem, ValidationError};

pub struct TransactionHandlers {
    core: Arc<Core>,
}

impl TransactionHandlers {
    pub fn new(core: Arc<Core>) -> Self {
        TransactionHandlers { core }
    }
}

#[tonic::async_trait]
impl MetadataTransactionService for TransactionHandlers {
    async fn commit(
        &self,
        request: Request<CommitRequest>,
    ) -> Result<Response<CommitResponse>, Status> {
        let (headers, extensions, message) = request.into_parts();
        let operation = Operation {
            kind: Kind::User,
            action: Action::Commit,
            id: "",
            written: FieldSet::ALL,
        };
        let (caller, _) = authorize(&extensions, &operation)?;
        let call = self.core.admission.unary(&headers)?;
        let fingerprint = fingerprint("Commit", &caller, {
            let mut request = message.clone();
            request.request_id.clear();
            request
        });
        let mut command = commit_command(message)?;
        command.fingerprint = fingerprint;
        let kinds: Vec<Kind> = command
            .operations
            .iter()
            .map(|(_, op)| op.target().0)
            .collect();
        let sent = Sent::default();
        let origin = origin(&caller, &headers);
        let commit = self
            .core
            .commit(&caller, command, sent.clone(), origin, false);
        let committed = call.run_write(&sent, commit).await?;
        Ok(Response::new(commit_response(&kinds, committed)))
    }
}

/// The request as the command it asks for; each operation's errors are
/// located inside it (`operations[2].merge_user.public_metadata`).
pub fn commit_command(request: CommitRequest) -> Result<CommitCommand, ValidationError> {
    let CommitRequest {
        operations,
        request_id,
    } = request;
    let operations = operations
        .into_iter()
        .enumerate()
        .map(|(index, operation)| {
            let TransactionOperation { operation } = operation;
            let root = format!("operations[{index}]");
            let Some(operation) = operation else {
                return Err(ValidationError::new(
                    JsonPath::root(&root),
                    Problem::Unspecified,
                ));
            };
            let (name, command) = match operation {
                Op::MergeUser(r) => ("merge_user", Users::merge_command(r).map(TxnCommand::Write)),
                Op::ReplaceUser(r) => (
                    "replace_user",
                    Users::replace_command(r).map(TxnCommand::Write),
                ),
                Op::PatchUser(r) => ("patch_user", patch::<Users>(Users::patch(r))),
                Op::DeleteUser(r) => ("delete_user", Ok(TxnCommand::Delete(Users::delete(r)))),
                Op::MergeOrganization(r) => (
                    "merge_organization",
                    Organizations::merge_command(r).map(TxnCommand::Write),
                ),
                Op::ReplaceOrganization(r) => (
                    "replace_organization",
                    Organizations::replace_command(r).map(TxnCommand::Write),
                ),
                Op::PatchOrganization(r) => (
                    "patch_organization",
                    patch::<Organizations>(Organizations::patch(r)),
                ),
                Op::DeleteOrganization(r) => (
                    "delete_organization",
                    Ok(TxnCommand::Delete(Organizations::delete(r))),
                ),
            };
            let at = format!("{root}.{name}");
            let command = command.map_err(|mut err| {
                err.path = err.path.within(&at);
                err
            })?;
            Ok((at, command))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(CommitCommand {
        operations,
        request_id,
        fingerprint: String::new(),
    })
}

/// What a retry with the same request id must repeat: the method, the
/// caller and the request without its id, as a SHA-256 digest.
pub(super) fn fingerprint(
    method: &str,
    caller: &crate::auth::Caller,
    request: impl prost::Message,
) -> String {
    use sha2::{Digest, Sha256};
    let mut digest = Sha256::new();
    digest.update(method.as_bytes());
    digest.update([0]);
    digest.update(caller.actor().as_bytes());
    digest.update([0]);
    digest.update(request.encode_to_vec());
    hex::encode(digest.finalize())
}

/// A Patch inside a transaction: the transaction's request id covers it.
fn patch<K: ApiKind>(
    parts: WriteParts<prost_types::ListValue>,
) -> Result<TxnCommand, ValidationError> {
    if !parts.request_id.is_empty() {
        return Err(ValidationError::new(
            JsonPath::root("request_id"),
            Problem::RequestIdInOperation,
        ));
    }
    parts
        .command(K::KIND, crate::model::Mode::Patch)
        .map(TxnCommand::Write)
}

/// One result per operation, in order; a backend caller sees every field.
fn commit_response(kinds: &[Kind], committed: Committed) -> CommitResponse {
    let Committed {
        results,
        revision,
        transaction_id,
    } = committed;
    let results = kinds
        .iter()
        .zip(results)
        .map(|(kind, done)| {
            let record = match done {
                TxnDone::Deleted { existed } => Result_::Deleted(DeleteResult { existed }),
                TxnDone::Written(outcome) => {
                    let shown = Shown {
                        record: &outcome.record,
                        fields: FieldSet::ALL,
                    };
                    match kind {
                        Kind::User => Result_::User(Users::record(shown)),
                        Kind::Organization => Result_::Organization(Organizations::record(shown)),
                    }
                }
            };
            TransactionResult {
                record: Some(record),
            }
        })
        .collect();
    CommitResponse {
        results,
        revision,
        transaction_id,
    }
}
