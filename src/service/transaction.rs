//! Commit, independent of protobuf: checks a transaction as a whole (its
//! size, each record once) and each operation as its single call would,
//! then has the store apply them all or none.

use std::collections::HashMap;

use crate::auth::Caller;
use crate::json;
use crate::logging::Escaped;
use crate::model::{ChangeType, CommitCommand, Field, Fields, Mode, Origin, TxnCommand};
use crate::store::{Committed, Compute, Sent, StoreError, TxnAction, TxnDone, TxnOp};
use crate::validation::{JsonPath, Problem, ValidationError};

use super::core::Core;

/// Most operations in one Commit: bounds how long a transaction holds its
/// rows (and, on Postgres, the revision allocation) locked.
pub const MAX_OPERATIONS: usize = 100;

/// A committed transaction and its id ("" when it changed nothing).
pub struct CommitOutcome {
    pub committed: Committed,
    pub transaction_id: String,
}

impl Core {
    pub async fn commit(
        &self,
        caller: &Caller,
        command: CommitCommand,
        sent: Sent,
        mut origin: Origin,
    ) -> Result<CommitOutcome, StoreError> {
        let CommitCommand {
            operations,
            request_id: _,
        } = command;
        validate(&operations, &self.limits)?;
        let transaction_id = uuid::Uuid::new_v4().to_string();
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
        let committed = self.store.commit(ops, sent, origin).await?;
        let mut changed = 0usize;
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
            changed += 1;
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
                transaction_id = %transaction_id,
                "metadata written in a transaction"
            );
        }
        Ok(CommitOutcome {
            transaction_id: if changed > 0 {
                transaction_id
            } else {
                String::new()
            },
            committed,
        })
    }
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
