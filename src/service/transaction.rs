//! Commit, independent of protobuf: checks a transaction as a whole (its
//! size, each record once) and each operation as its single call would,
//! then has the store apply them all or none.

use std::collections::HashMap;

use crate::auth::Caller;
use crate::json;
use crate::logging::Escaped;
use crate::model::{ChangeType, CommitCommand, Field, Fields, Mode, Origin, TxnCommand};
use crate::store::{Committed, Compute, RequestKey, Sent, StoreError, TxnAction, TxnDone, TxnOp};
use crate::validation::{JsonPath, Problem, ValidationError};

use super::core::Core;

/// Most operations in one Commit: bounds how long a transaction holds its
/// rows (and, on Postgres, the revision allocation) locked.
pub const MAX_OPERATIONS: usize = 100;

impl Core {
    pub async fn commit(
        &self,
        caller: &Caller,
        command: CommitCommand,
        sent: Sent,
        mut origin: Origin,
        single: bool,
    ) -> Result<Committed, StoreError> {
        let CommitCommand {
            operations,
            request_id,
            fingerprint,
        } = command;
        validate(&operations, &self.limits)?;
        let request = validate_request_id(&request_id)?.then_some(RequestKey {
            id: request_id,
            fingerprint,
            ttl: self.request_id_ttl,
        });
        // A single write retried by its request id runs as a transaction
        // of one, and its event names no transaction.
        let transaction_id = match single {
            true => String::new(),
            false => uuid::Uuid::new_v4().to_string(),
        };
        origin.transaction_id = transaction_id.clone();
        let ops = operations
            .into_iter()
            .map(|(at, command)| match command {
                TxnCommand::Write(command) => {
                    let (change, provided, compute) =
                        self.computation(command.mode, command.values);
                    TxnOp {
                        at,
                        kind: command.kind,
                        id: command.id,
                        expected_version: command.expected_version,
                        action: TxnAction::Write {
                            change,
                            provided,
                            compute,
                        },
                    }
                }
                TxnCommand::Delete(command) => TxnOp {
                    at,
                    kind: command.kind,
                    id: command.id,
                    expected_version: command.expected_version,
                    action: TxnAction::Delete,
                },
            })
            .collect::<Vec<_>>();
        let targets: Vec<_> = ops.iter().map(|op| (op.kind, op.id.clone())).collect();
        let committed = self.store.commit(ops, sent, origin, request).await?;
        for ((kind, id), done) in targets.iter().zip(&committed.results) {
            let (wrote, version, revision) = match done {
                TxnDone::Written(outcome) => (
                    outcome.changed,
                    outcome.record.version,
                    outcome.record.revision,
                ),
                TxnDone::Deleted { existed } => (*existed, 0, 0),
            };
            if !wrote {
                continue;
            }
            self.metrics
                .events_written
                .with_label_values(&[kind.as_str()])
                .inc();
            tracing::info!(
                caller = %caller,
                rpc = %"Commit",
                kind = %kind.as_str(),
                id = %Escaped(id),
                version,
                revision,
                transaction_id = %committed.transaction_id,
                "metadata written in a transaction"
            );
        }
        Ok(committed)
    }
}

/// Whether the request carries a request id; INVALID_ARGUMENT if it is not
/// a UUID (AIP-155).
fn validate_request_id(request_id: &str) -> Result<bool, ValidationError> {
    if request_id.is_empty() {
        return Ok(false);
    }
    uuid::Uuid::try_parse(request_id).map_err(|_| {
        ValidationError::new(JsonPath::root("request_id"), Problem::InvalidRequestId)
    })?;
    Ok(true)
}

/// The transaction's shape, then each operation as its own call checks it,
/// errors located inside the operation.
fn validate(
    operations: &[(String, TxnCommand)],
    limits: &json::Limits,
) -> Result<(), ValidationError> {
    let root = || JsonPath::root("operations");
    if operations.is_empty() {
        return Err(ValidationError::new(root(), Problem::NoOperations));
    }
    if operations.len() > MAX_OPERATIONS {
        return Err(ValidationError::new(
            root(),
            Problem::TooManyOperations {
                count: operations.len(),
                limit: MAX_OPERATIONS,
            },
        ));
    }
    let mut seen = HashMap::with_capacity(operations.len());
    for (index, (at, command)) in operations.iter().enumerate() {
        let checked = match command {
            TxnCommand::Write(command) => json::validate_command(command, limits),
            TxnCommand::Delete(command) => json::validate_delete(command),
        };
        checked.map_err(|mut err| {
            err.path = err.path.within(at);
            err
        })?;
        if let Some(first) = seen.insert(command.target(), index) {
            return Err(ValidationError::new(
                JsonPath::root(at),
                Problem::DuplicateRecord { first },
            ));
        }
    }
    Ok(())
}

impl Core {
    /// A write's values as the store runs them: its change type, the
    /// fields it gives, and how it computes the new fields.
    pub(super) fn computation(
        &self,
        mode: Mode,
        values: Vec<(Field, serde_json::Value)>,
    ) -> (ChangeType, Vec<Field>, Compute) {
        let change = match mode {
            // A patch changes parts of fields, as a merge does.
            Mode::Merge | Mode::Patch => ChangeType::Merged,
            Mode::Replace => ChangeType::Replaced,
        };
        let limits = self.limits;
        let provided = values.iter().map(|(field, _)| *field).collect();
        let compute =
            Box::new(move |current: &Fields| json::apply(mode, &values, current, &limits));
        (change, provided, compute)
    }
}
