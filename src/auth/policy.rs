//! Who may read and write which metadata field (the reference API's rules):
//! private is backend-only; public is read by the frontend and written by
//! the backend; unsafe is read and merged by the frontend, for its own user
//! only. Organizations have no unsafe field, so the frontend only reads the
//! public metadata of the organization named in its token.

use crate::model::{Field, Kind};
use crate::reason::Reason;

use super::Caller;

/// A set of metadata fields.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FieldSet(u8);

impl FieldSet {
    pub const NONE: FieldSet = FieldSet(0);
    pub const ALL: FieldSet = FieldSet(0b111);

    const fn bit(field: Field) -> u8 {
        match field {
            Field::Public => 1,
            Field::Private => 2,
            Field::Unsafe => 4,
        }
    }

    pub fn of(fields: impl IntoIterator<Item = Field>) -> FieldSet {
        fields
            .into_iter()
            .fold(FieldSet::NONE, |set, f| FieldSet(set.0 | Self::bit(f)))
    }

    pub fn contains(self, field: Field) -> bool {
        self.0 & Self::bit(field) != 0
    }

    pub fn iter(self) -> impl Iterator<Item = Field> {
        Field::ALL.into_iter().filter(move |f| self.contains(*f))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Get,
    Merge,
    Patch,
    Replace,
    Delete,
    Watch,
    BatchGet,
    List,
    History,
    Restore,
    /// A transaction (MetadataTransactionService.Commit), of any kinds.
    Commit,
    SetSchema,
    GetSchema,
    DeleteSchema,
    /// Any call of MetadataWebhookService (endpoints, of no kind).
    Webhooks,
}

impl Action {
    pub const fn rpc(self) -> &'static str {
        match self {
            Action::Get => "Get",
            Action::Merge => "Merge",
            Action::Patch => "Patch",
            Action::Replace => "Replace",
            Action::Delete => "Delete",
            Action::Watch => "Watch",
            Action::BatchGet => "BatchGet",
            Action::List => "List",
            Action::History => "ListHistory",
            Action::Restore => "Restore",
            Action::Commit => "Commit",
            Action::SetSchema => "SetSchema",
            Action::GetSchema => "GetSchema",
            Action::DeleteSchema => "DeleteSchema",
            Action::Webhooks => "MetadataWebhookService",
        }
    }
}

/// What a call asks to do, known before its values are decoded.
#[derive(Clone, Copy, Debug)]
pub struct Operation<'a> {
    pub kind: Kind,
    pub action: Action,
    /// The user or organization id (BatchGet: each id in turn); empty for
    /// Watch and List.
    pub id: &'a str,
    /// The fields the request provides values for.
    pub written: FieldSet,
}

/// PERMISSION_DENIED, with a message saying what the caller may do instead.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{message}")]
pub struct Denied {
    pub reason: Reason,
    pub message: String,
}

/// The fields the caller may see in the response, or why it may not call.
pub fn authorize(caller: &Caller, op: &Operation) -> Result<FieldSet, Denied> {
    let (user_id, org_id) = match caller {
        Caller::Open | Caller::Backend { .. } => return Ok(FieldSet::ALL),
        Caller::Frontend { user_id, org_id } => (user_id, org_id),
    };
    match (op.kind, op.action) {
        (
            Kind::User,
            Action::Get
            | Action::BatchGet
            | Action::History
            | Action::Watch
            | Action::Merge
            | Action::Patch,
        ) if op.id != user_id => Err(Denied {
            reason: Reason::NotOwnRecord,
            message: format!(
                "a frontend token may {} only its own user (the token's sub)",
                op.action.rpc()
            ),
        }),
        (Kind::User, Action::Get | Action::BatchGet | Action::History | Action::Watch) => {
            Ok(FieldSet::of([Field::Public, Field::Unsafe]))
        }
        (Kind::User, Action::Merge | Action::Patch) => {
            match op.written.iter().find(|f| *f != Field::Unsafe) {
                Some(field) => Err(Denied {
                    reason: Reason::FieldNotWritable,
                    message: format!(
                        "{} is written by backend callers only; a frontend token may {} only unsafe_metadata",
                        field.name(),
                        op.action.rpc()
                    ),
                }),
                None => Ok(FieldSet::of([Field::Public, Field::Unsafe])),
            }
        }
        (Kind::Organization, Action::Get | Action::BatchGet | Action::History | Action::Watch)
            if org_id.as_deref() == Some(op.id) =>
        {
            Ok(FieldSet::of([Field::Public]))
        }
        (Kind::Organization, Action::Get | Action::BatchGet | Action::History | Action::Watch) => {
            Err(Denied {
                reason: Reason::NotOwnRecord,
                message: format!(
                    "a frontend token may {} only the organization in its org_id claim",
                    op.action.rpc()
                ),
            })
        }
        (_, Action::Webhooks) => Err(Denied {
            reason: Reason::BackendOnly,
            message: "MetadataWebhookService is for backend callers only".to_owned(),
        }),
        (kind, action) => Err(Denied {
            reason: Reason::BackendOnly,
            message: format!(
                "{} on {} metadata is for backend callers only",
                action.rpc(),
                kind.as_str()
            ),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ACTIONS: [Action; 15] = [
        Action::Webhooks,
        Action::SetSchema,
        Action::GetSchema,
        Action::DeleteSchema,
        Action::Get,
        Action::Merge,
        Action::Patch,
        Action::Replace,
        Action::Delete,
        Action::Watch,
        Action::BatchGet,
        Action::List,
        Action::History,
        Action::Restore,
        Action::Commit,
    ];

    fn frontend(org: Option<&str>) -> Caller {
        Caller::Frontend {
            user_id: "user_1".into(),
            org_id: org.map(Into::into),
        }
    }

    fn op(kind: Kind, action: Action, id: &str, written: &[Field]) -> Operation<'static> {
        Operation {
            kind,
            action,
            id: Box::leak(id.to_string().into_boxed_str()),
            written: FieldSet::of(written.iter().copied()),
        }
    }

    #[test]
    fn backend_and_open_callers_may_do_everything() {
        let backend = Caller::Backend { name: "b".into() };
        for caller in [Caller::Open, backend] {
            for kind in [Kind::User, Kind::Organization] {
                for action in ACTIONS {
                    let op = op(kind, action, "x", &Field::ALL);
                    assert_eq!(authorize(&caller, &op), Ok(FieldSet::ALL));
                }
            }
        }
    }

    #[test]
    fn frontend_reads_public_and_unsafe_of_its_own_user() {
        let seen = authorize(&frontend(None), &op(Kind::User, Action::Get, "user_1", &[])).unwrap();
        assert_eq!(
            seen.iter().collect::<Vec<_>>(),
            [Field::Public, Field::Unsafe]
        );
        let other = authorize(&frontend(None), &op(Kind::User, Action::Get, "user_2", &[]));
        let denied = other.unwrap_err();
        assert!(denied.message.contains("only its own user"));
        assert_eq!(denied.reason, Reason::NotOwnRecord);
    }

    #[test]
    fn frontend_merges_only_unsafe_of_its_own_user() {
        let caller = frontend(None);
        let own = op(Kind::User, Action::Merge, "user_1", &[Field::Unsafe]);
        assert!(authorize(&caller, &own).is_ok());
        for field in [Field::Public, Field::Private] {
            let op = op(Kind::User, Action::Merge, "user_1", &[Field::Unsafe, field]);
            let denied = authorize(&caller, &op).unwrap_err();
            assert!(denied.message.starts_with(field.name()), "{denied}");
            assert_eq!(denied.reason, Reason::FieldNotWritable);
        }
        let other = op(Kind::User, Action::Merge, "user_2", &[Field::Unsafe]);
        assert!(authorize(&caller, &other).is_err());
    }

    #[test]
    fn frontend_watches_only_its_own_record() {
        let caller = frontend(Some("org_1"));
        let own = authorize(&caller, &op(Kind::User, Action::Watch, "user_1", &[])).unwrap();
        assert_eq!(own, FieldSet::of([Field::Public, Field::Unsafe]));
        let org = authorize(
            &caller,
            &op(Kind::Organization, Action::Watch, "org_1", &[]),
        );
        assert_eq!(org.unwrap(), FieldSet::of([Field::Public]));
        for (kind, id) in [
            (Kind::User, "user_2"),
            (Kind::User, ""),
            (Kind::Organization, "org_2"),
            (Kind::Organization, ""),
        ] {
            let denied = authorize(&caller, &op(kind, Action::Watch, id, &[])).unwrap_err();
            assert_eq!(denied.reason, Reason::NotOwnRecord, "{kind:?} {id:?}");
        }
    }

    #[test]
    fn frontend_may_not_replace_delete_or_list() {
        for kind in [Kind::User, Kind::Organization] {
            for action in [
                Action::Replace,
                Action::Delete,
                Action::List,
                Action::Restore,
                Action::Commit,
                Action::SetSchema,
                Action::GetSchema,
                Action::DeleteSchema,
                Action::Webhooks,
            ] {
                let op = op(kind, action, "user_1", &[Field::Unsafe]);
                let denied = authorize(&frontend(Some("user_1")), &op).unwrap_err();
                assert!(denied.message.contains("backend callers only"), "{denied}");
                assert_eq!(denied.reason, Reason::BackendOnly);
            }
        }
    }

    #[test]
    fn frontend_batch_gets_only_what_it_may_get() {
        let caller = frontend(Some("org_1"));
        let own = authorize(&caller, &op(Kind::User, Action::BatchGet, "user_1", &[]));
        assert_eq!(own, Ok(FieldSet::of([Field::Public, Field::Unsafe])));
        let other = authorize(&caller, &op(Kind::User, Action::BatchGet, "user_2", &[]));
        assert!(
            other
                .unwrap_err()
                .message
                .contains("BatchGet only its own user")
        );
        let org = authorize(
            &caller,
            &op(Kind::Organization, Action::BatchGet, "org_1", &[]),
        );
        assert_eq!(org, Ok(FieldSet::of([Field::Public])));
        let other = authorize(
            &caller,
            &op(Kind::Organization, Action::BatchGet, "org_2", &[]),
        );
        assert!(other.is_err());
    }

    #[test]
    fn frontend_reads_the_history_of_its_own_records_only() {
        let caller = frontend(Some("org_1"));
        let history = |kind, id| authorize(&caller, &op(kind, Action::History, id, &[]));
        assert_eq!(
            history(Kind::User, "user_1"),
            Ok(FieldSet::of([Field::Public, Field::Unsafe]))
        );
        assert_eq!(
            history(Kind::User, "user_2").unwrap_err().reason,
            Reason::NotOwnRecord
        );
        assert_eq!(
            history(Kind::Organization, "org_1"),
            Ok(FieldSet::of([Field::Public]))
        );
        assert!(history(Kind::Organization, "org_2").is_err());
    }

    #[test]
    fn frontend_reads_public_of_the_organization_in_its_claim() {
        let get = |org: Option<&str>, id: &str| {
            authorize(
                &frontend(org),
                &op(Kind::Organization, Action::Get, id, &[]),
            )
        };
        assert_eq!(
            get(Some("org_1"), "org_1"),
            Ok(FieldSet::of([Field::Public]))
        );
        assert!(get(Some("org_1"), "org_2").is_err());
        assert!(get(None, "org_1").is_err());
        assert!(get(None, "").is_err());
        let merge = op(Kind::Organization, Action::Merge, "org_1", &[Field::Public]);
        assert!(authorize(&frontend(Some("org_1")), &merge).is_err());
    }
}
