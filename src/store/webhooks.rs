//! Webhook endpoints and their delivery state (issue 32), the same on both
//! backends: a small table written off the hot path, through sea-orm.
//!
//! The deliverer moves an endpoint's position only from the position it
//! read (`next_revision = from` in each update's WHERE): a deliverer that
//! lost its lease while a delivery was in flight, or a Replay or an
//! UpdateWebhook that moved the position meanwhile, makes its update match
//! no row instead of moving the position back or past what was delivered.

use chrono::{DateTime, Utc};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveModelTrait, ColumnTrait, EntityTrait, IntoActiveModel, QueryFilter, QueryOrder,
    QuerySelect, Set,
};

use super::entities::webhook::{self, Column, Entity};
use super::{Store, StoreError};

/// An endpoint as stored, its secrets included: the service never returns
/// them but on create and rotate.
#[derive(Clone, PartialEq)]
pub struct StoredWebhook {
    pub id: String,
    pub url: String,
    pub description: String,
    /// Empty: all.
    pub event_types: Vec<String>,
    pub filter: String,
    pub disabled: bool,
    pub disabled_reason: String,
    pub next_revision: u64,
    pub secret: String,
    /// The secret before the last rotation, and until when it signs too.
    pub previous_secret: Option<(String, DateTime<Utc>)>,
    pub attempts: u32,
    pub last_error: String,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub failing_since: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl std::fmt::Debug for StoredWebhook {
    // Never the secrets: a debug line must not leak them.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredWebhook")
            .field("id", &self.id)
            .field("disabled", &self.disabled)
            .field("next_revision", &self.next_revision)
            .field("attempts", &self.attempts)
            .finish_non_exhaustive()
    }
}

impl StoredWebhook {
    /// The secrets that sign a delivery at `now`: the current one, and the
    /// previous one during its grace period.
    pub fn signing_secrets(&self, now: DateTime<Utc>) -> Vec<&str> {
        let mut secrets = vec![self.secret.as_str()];
        if let Some((previous, until)) = &self.previous_secret
            && *until > now
        {
            secrets.push(previous);
        }
        secrets
    }
}

/// A new endpoint, checked by the caller.
#[derive(Clone, Debug)]
pub struct NewWebhook {
    pub id: String,
    pub url: String,
    pub description: String,
    pub event_types: Vec<String>,
    pub filter: String,
    pub disabled: bool,
    pub next_revision: u64,
    pub secret: String,
}

/// The fields an UpdateWebhook changes; None leaves one as it is.
#[derive(Clone, Debug, Default)]
pub struct WebhookUpdate {
    pub url: Option<String>,
    pub description: Option<String>,
    pub event_types: Option<Vec<String>>,
    pub filter: Option<String>,
    pub disabled: Option<bool>,
}

/// Why an endpoint was disabled by its caller (created disabled, or
/// UpdateWebhook).
pub const DISABLED_ON_REQUEST: &str = "disabled on request (CreateWebhook or UpdateWebhook)";

fn from_row(row: webhook::Model) -> StoredWebhook {
    let event_types = match row.event_types {
        serde_json::Value::Array(items) => items
            .into_iter()
            .filter_map(|item| item.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    };
    let previous_secret = match (row.previous_secret.is_empty(), row.previous_secret_until) {
        (false, Some(until)) => Some((row.previous_secret, until)),
        _ => None,
    };
    StoredWebhook {
        id: row.id,
        url: row.url,
        description: row.description,
        event_types,
        filter: row.filter,
        disabled: row.disabled,
        disabled_reason: row.disabled_reason,
        next_revision: row.next_revision.max(0) as u64,
        secret: row.secret,
        previous_secret,
        attempts: row.attempts.max(0) as u32,
        last_error: row.last_error,
        next_attempt_at: row.next_attempt_at,
        failing_since: row.failing_since,
        created_at: row.created_at,
        updated_at: row.updated_at,
    }
}

/// How a failed attempt is recorded.
#[derive(Clone, Debug)]
pub struct Failure {
    pub attempts: u32,
    pub error: String,
    pub next_attempt_at: DateTime<Utc>,
    pub failing_since: DateTime<Utc>,
}

impl Store {
    pub async fn create_webhook(&self, new: NewWebhook) -> Result<StoredWebhook, StoreError> {
        let now = Utc::now();
        let row = webhook::ActiveModel {
            id: Set(new.id),
            url: Set(new.url),
            description: Set(new.description),
            event_types: Set(serde_json::json!(new.event_types)),
            filter: Set(new.filter),
            disabled: Set(new.disabled),
            disabled_reason: Set(if new.disabled {
                DISABLED_ON_REQUEST.to_owned()
            } else {
                String::new()
            }),
            next_revision: Set(new.next_revision as i64),
            secret: Set(new.secret),
            previous_secret: Set(String::new()),
            previous_secret_until: Set(None),
            attempts: Set(0),
            last_error: Set(String::new()),
            next_attempt_at: Set(None),
            failing_since: Set(None),
            created_at: Set(now),
            updated_at: Set(now),
        };
        Ok(from_row(row.insert(&self.shared.db).await?))
    }

    pub async fn webhook(&self, id: &str) -> Result<Option<StoredWebhook>, StoreError> {
        Ok(Entity::find_by_id(id.to_owned())
            .one(&self.shared.db)
            .await?
            .map(from_row))
    }

    /// Up to `limit` endpoints ordered by id, after `after`.
    pub async fn webhooks(
        &self,
        after: Option<&str>,
        limit: u64,
    ) -> Result<Vec<StoredWebhook>, StoreError> {
        let mut query = Entity::find().order_by_asc(Column::Id).limit(limit);
        if let Some(after) = after {
            query = query.filter(Column::Id.gt(after));
        }
        Ok(query
            .all(&self.shared.db)
            .await?
            .into_iter()
            .map(from_row)
            .collect())
    }

    /// Changes what `update` names. Re-enabling, or a new URL, clears the
    /// failures, so that deliveries resume at once from the endpoint's
    /// position.
    pub async fn update_webhook(
        &self,
        id: &str,
        update: WebhookUpdate,
    ) -> Result<Option<StoredWebhook>, StoreError> {
        let Some(row) = Entity::find_by_id(id.to_owned())
            .one(&self.shared.db)
            .await?
        else {
            return Ok(None);
        };
        let was_disabled = row.disabled;
        let moved = update.url.as_ref().is_some_and(|url| *url != row.url);
        let mut active = row.into_active_model();
        if let Some(url) = update.url {
            active.url = Set(url);
        }
        if moved {
            // A new address is tried at once, its failures counted afresh:
            // the old one's are no reason to wait.
            clear_failures(&mut active);
        }
        if let Some(description) = update.description {
            active.description = Set(description);
        }
        if let Some(event_types) = update.event_types {
            active.event_types = Set(serde_json::json!(event_types));
        }
        if let Some(filter) = update.filter {
            active.filter = Set(filter);
        }
        match update.disabled {
            Some(true) if !was_disabled => {
                active.disabled = Set(true);
                active.disabled_reason = Set(DISABLED_ON_REQUEST.to_owned());
            }
            Some(false) if was_disabled => {
                active.disabled = Set(false);
                active.disabled_reason = Set(String::new());
                clear_failures(&mut active);
            }
            _ => {}
        }
        active.updated_at = Set(Utc::now());
        Ok(Some(from_row(active.update(&self.shared.db).await?)))
    }

    pub async fn delete_webhook(&self, id: &str) -> Result<bool, StoreError> {
        let deleted = Entity::delete_by_id(id.to_owned())
            .exec(&self.shared.db)
            .await?;
        Ok(deleted.rows_affected > 0)
    }

    /// A new secret; the current one signs beside it until
    /// `previous_until` (None: not at all).
    pub async fn rotate_webhook_secret(
        &self,
        id: &str,
        secret: String,
        previous_until: Option<DateTime<Utc>>,
    ) -> Result<Option<StoredWebhook>, StoreError> {
        let Some(row) = Entity::find_by_id(id.to_owned())
            .one(&self.shared.db)
            .await?
        else {
            return Ok(None);
        };
        let previous = row.secret.clone();
        let mut active = row.into_active_model();
        active.secret = Set(secret);
        match previous_until {
            Some(until) => {
                active.previous_secret = Set(previous);
                active.previous_secret_until = Set(Some(until));
            }
            None => {
                active.previous_secret = Set(String::new());
                active.previous_secret_until = Set(None);
            }
        }
        active.updated_at = Set(Utc::now());
        Ok(Some(from_row(active.update(&self.shared.db).await?)))
    }

    /// Sets the endpoint's position to `revision` and clears its failures.
    pub async fn replay_webhook(
        &self,
        id: &str,
        revision: u64,
    ) -> Result<Option<StoredWebhook>, StoreError> {
        let Some(row) = Entity::find_by_id(id.to_owned())
            .one(&self.shared.db)
            .await?
        else {
            return Ok(None);
        };
        let mut active = row.into_active_model();
        active.next_revision = Set(revision as i64);
        clear_failures(&mut active);
        active.updated_at = Set(Utc::now());
        Ok(Some(from_row(active.update(&self.shared.db).await?)))
    }

    /// The deliverer: everything before `to` is delivered (or skipped),
    /// if the position is still `from`. False when it moved meanwhile.
    pub async fn webhook_delivered(
        &self,
        id: &str,
        from: u64,
        to: u64,
    ) -> Result<bool, StoreError> {
        let updated = Entity::update_many()
            .col_expr(Column::NextRevision, Expr::value(to as i64))
            .col_expr(Column::Attempts, Expr::value(0))
            .col_expr(Column::LastError, Expr::value(""))
            .col_expr(
                Column::NextAttemptAt,
                Expr::value(Option::<DateTime<Utc>>::None),
            )
            .col_expr(
                Column::FailingSince,
                Expr::value(Option::<DateTime<Utc>>::None),
            )
            .filter(Column::Id.eq(id))
            .filter(Column::NextRevision.eq(from as i64))
            .exec(&self.shared.db)
            .await?;
        Ok(updated.rows_affected == 1)
    }

    /// The deliverer: the attempt at `at` failed. False when the position
    /// moved meanwhile.
    pub async fn webhook_failed(
        &self,
        id: &str,
        at: u64,
        failure: &Failure,
    ) -> Result<bool, StoreError> {
        let updated = Entity::update_many()
            .col_expr(Column::Attempts, Expr::value(failure.attempts as i32))
            .col_expr(Column::LastError, Expr::value(failure.error.clone()))
            .col_expr(
                Column::NextAttemptAt,
                Expr::value(Some(failure.next_attempt_at)),
            )
            .col_expr(
                Column::FailingSince,
                Expr::value(Some(failure.failing_since)),
            )
            .filter(Column::Id.eq(id))
            .filter(Column::NextRevision.eq(at as i64))
            .exec(&self.shared.db)
            .await?;
        Ok(updated.rows_affected == 1)
    }

    /// The deliverer: disables the endpoint at `at`, saying why. False
    /// when the position moved meanwhile.
    pub async fn webhook_disable(
        &self,
        id: &str,
        at: u64,
        reason: &str,
    ) -> Result<bool, StoreError> {
        let updated = Entity::update_many()
            .col_expr(Column::Disabled, Expr::value(true))
            .col_expr(Column::DisabledReason, Expr::value(reason.to_owned()))
            .col_expr(
                Column::NextAttemptAt,
                Expr::value(Option::<DateTime<Utc>>::None),
            )
            .col_expr(Column::UpdatedAt, Expr::value(Utc::now()))
            .filter(Column::Id.eq(id))
            .filter(Column::NextRevision.eq(at as i64))
            .filter(Column::Disabled.eq(false))
            .exec(&self.shared.db)
            .await?;
        Ok(updated.rows_affected == 1)
    }
}

fn clear_failures(active: &mut webhook::ActiveModel) {
    active.attempts = Set(0);
    active.last_error = Set(String::new());
    active.next_attempt_at = Set(None);
    active.failing_since = Set(None);
}
