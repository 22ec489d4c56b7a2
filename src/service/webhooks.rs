//! `metadata.v1.MetadataWebhookService`: webhook endpoints as data
//! (issue 32). Requests are taken apart exhaustively here and checked by
//! `webhook::endpoint`; endpoints are the store's (`store/webhooks.rs`);
//! deliveries are the deliverer's (`webhook/deliverer.rs`), which this
//! service pokes after each change. Backend callers only.

use std::sync::Arc;

use base64::Engine;
use chrono::Utc;
use tokio::sync::Notify;
use tonic::{Request, Response, Status};

use super::{Core, authorize};
use crate::auth::{Action, FieldSet, Operation};
use crate::convert::timestamp;
use crate::events::Broker;
use crate::model::Kind;
use crate::proto::v1::metadata_webhook_service_server::MetadataWebhookService;
use crate::proto::v1::{
    CreateWebhookRequest, CreateWebhookResponse, DeleteWebhookRequest, DeleteWebhookResponse,
    GetWebhookRequest, ListWebhooksRequest, ListWebhooksResponse, ReplayWebhookRequest,
    RotateWebhookSecretRequest, RotateWebhookSecretResponse, UpdateWebhookRequest, Webhook,
};
use crate::store::{NewWebhook, StoreError, StoredWebhook, WebhookUpdate};
use crate::validation::{JsonPath, Problem, ValidationError};
use crate::webhook::{AllowedNetworks, endpoint, signing};

pub struct WebhookHandlers {
    core: Arc<Core>,
    broker: Arc<Broker>,
    allowed: Arc<AllowedNetworks>,
    /// Poked after every change: a deliverer in this process reads the
    /// endpoints again at once.
    changed: Arc<Notify>,
}

/// The paths UpdateWebhook may name.
const UPDATABLE: &str = "url, description, event_types, filter, disabled";

impl WebhookHandlers {
    pub fn new(
        core: Arc<Core>,
        broker: Arc<Broker>,
        allowed: Arc<AllowedNetworks>,
        changed: Arc<Notify>,
    ) -> Self {
        WebhookHandlers {
            core,
            broker,
            allowed,
            changed,
        }
    }

    fn admit<T>(&self, request: &Request<T>) -> Result<super::admission::Call, Status> {
        let operation = Operation {
            kind: Kind::User,
            action: Action::Webhooks,
            id: "",
            written: FieldSet::NONE,
        };
        authorize(request.extensions(), &operation)?;
        self.core.admission.unary(request.metadata())
    }

    /// The revision a new endpoint starts at, or a Replay goes back to:
    /// 0 is the first after the current one.
    async fn position(&self, requested: u64, field: &str) -> Result<u64, Status> {
        let head = self.broker.settle().await?;
        if requested == 0 {
            return Ok(head + 1);
        }
        if requested > i64::MAX as u64 {
            return Err(ValidationError::new(
                JsonPath::root(field),
                Problem::RevisionTooLarge {
                    limit: i64::MAX as u64,
                },
            )
            .into());
        }
        let compacted = self.core.store.compacted_revision().await?;
        if requested <= compacted {
            return Err(StoreError::RevisionCompacted {
                requested,
                oldest: compacted + 1,
            }
            .into());
        }
        Ok(requested)
    }
}

fn required(id: &str, field: &str) -> Result<(), ValidationError> {
    if id.is_empty() {
        return Err(ValidationError::new(
            JsonPath::root(field),
            Problem::Unspecified,
        ));
    }
    Ok(())
}

fn found(stored: Option<StoredWebhook>, id: &str) -> Result<StoredWebhook, Status> {
    stored.ok_or_else(|| StoreError::WebhookNotFound { id: id.to_owned() }.into())
}

/// The endpoint as callers see it: never its secrets.
fn webhook_message(stored: StoredWebhook) -> Webhook {
    let StoredWebhook {
        id,
        url,
        description,
        event_types,
        filter,
        disabled,
        disabled_reason,
        next_revision,
        secret: _,
        previous_secret: _,
        attempts,
        last_error,
        next_attempt_at,
        failing_since,
        created_at,
        updated_at: _,
    } = stored;
    Webhook {
        id,
        url,
        description,
        event_types,
        filter,
        disabled,
        disabled_reason,
        next_revision,
        created_at: Some(timestamp(created_at)),
        attempts,
        last_error,
        next_attempt_at: next_attempt_at.map(timestamp),
        failing_since: failing_since.map(timestamp),
    }
}

/// What a create or an update provides, checked: each refusal names its
/// field under `webhook.`.
struct Checked {
    url: String,
    description: String,
    event_types: Vec<String>,
    filter: String,
}

async fn check(
    allowed: &AllowedNetworks,
    url: &str,
    description: String,
    event_types: Vec<String>,
    filter: String,
) -> Result<Checked, ValidationError> {
    required(url, "webhook.url")?;
    let url = endpoint::check_url(url, "webhook.url", allowed).await?;
    endpoint::check_description(&description, "webhook.description")?;
    let event_types = endpoint::check_event_types(event_types, "webhook.event_types")?;
    endpoint::check_filter(&filter, "webhook.filter")?;
    Ok(Checked {
        url,
        description,
        event_types,
        filter,
    })
}

/// List's page token: the last id of the page, base64url (opaque to
/// callers; an id is printable, so any token that decodes is an id).
fn page_token(last: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(last)
}

fn after_token(token: &str) -> Result<Option<String>, ValidationError> {
    if token.is_empty() {
        return Ok(None);
    }
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .map(Some)
        .ok_or_else(|| {
            ValidationError::new(
                JsonPath::root("page_token"),
                Problem::PageToken("is not a token ListWebhooks issued"),
            )
        })
}

#[tonic::async_trait]
impl MetadataWebhookService for WebhookHandlers {
    async fn create_webhook(
        &self,
        request: Request<CreateWebhookRequest>,
    ) -> Result<Response<CreateWebhookResponse>, Status> {
        let call = self.admit(&request)?;
        let CreateWebhookRequest {
            webhook,
            start_revision,
        } = request.into_inner();
        let Webhook {
            // Output only: made or kept by the service.
            id: _,
            url,
            description,
            event_types,
            filter,
            disabled,
            disabled_reason: _,
            next_revision: _,
            created_at: _,
            attempts: _,
            last_error: _,
            next_attempt_at: _,
            failing_since: _,
        } = webhook.unwrap_or_default();
        let checked = check(&self.allowed, &url, description, event_types, filter).await?;
        let next_revision = self.position(start_revision, "start_revision").await?;
        let secret = signing::new_secret();
        let new = NewWebhook {
            id: endpoint::new_id(),
            url: checked.url,
            description: checked.description,
            event_types: checked.event_types,
            filter: checked.filter,
            disabled,
            next_revision,
            secret: secret.clone(),
        };
        let stored = call.run(self.core.store.create_webhook(new)).await?;
        tracing::info!(webhook = %stored.id, next_revision, "webhook endpoint created");
        self.changed.notify_one();
        Ok(Response::new(CreateWebhookResponse {
            webhook: Some(webhook_message(stored)),
            secret,
        }))
    }

    async fn get_webhook(
        &self,
        request: Request<GetWebhookRequest>,
    ) -> Result<Response<Webhook>, Status> {
        let call = self.admit(&request)?;
        let GetWebhookRequest { id } = request.into_inner();
        required(&id, "id")?;
        let stored = call.run(self.core.store.webhook(&id)).await?;
        Ok(Response::new(webhook_message(found(stored, &id)?)))
    }

    async fn list_webhooks(
        &self,
        request: Request<ListWebhooksRequest>,
    ) -> Result<Response<ListWebhooksResponse>, Status> {
        let call = self.admit(&request)?;
        let ListWebhooksRequest {
            page_size,
            page_token: token,
        } = request.into_inner();
        let size = crate::query::page_size(page_size)?;
        let after = after_token(&token)?;
        let mut page = call
            .run(self.core.store.webhooks(after.as_deref(), size + 1))
            .await?;
        let more = page.len() as u64 > size;
        page.truncate(size as usize);
        let next_page_token = match (more, page.last()) {
            (true, Some(last)) => page_token(&last.id),
            _ => String::new(),
        };
        Ok(Response::new(ListWebhooksResponse {
            webhooks: page.into_iter().map(webhook_message).collect(),
            next_page_token,
        }))
    }

    async fn update_webhook(
        &self,
        request: Request<UpdateWebhookRequest>,
    ) -> Result<Response<Webhook>, Status> {
        let call = self.admit(&request)?;
        let UpdateWebhookRequest {
            webhook,
            update_mask,
        } = request.into_inner();
        let Webhook {
            id,
            url,
            description,
            event_types,
            filter,
            disabled,
            disabled_reason: _,
            next_revision: _,
            created_at: _,
            attempts: _,
            last_error: _,
            next_attempt_at: _,
            failing_since: _,
        } = webhook.unwrap_or_default();
        required(&id, "webhook.id")?;
        let paths = update_mask.map(|mask| mask.paths).unwrap_or_default();
        let all = paths.is_empty();
        for (index, path) in paths.iter().enumerate() {
            if !UPDATABLE.split(", ").any(|known| known == path) {
                return Err(ValidationError::new(
                    JsonPath::root("update_mask.paths").index(index),
                    Problem::UnknownMaskPath {
                        path: path.clone(),
                        known: UPDATABLE,
                    },
                )
                .into());
            }
        }
        let named = |name: &str| all || paths.iter().any(|path| path == name);
        let mut update = WebhookUpdate::default();
        if named("url") {
            required(&url, "webhook.url")?;
            update.url = Some(endpoint::check_url(&url, "webhook.url", &self.allowed).await?);
        }
        if named("description") {
            endpoint::check_description(&description, "webhook.description")?;
            update.description = Some(description);
        }
        if named("event_types") {
            update.event_types = Some(endpoint::check_event_types(
                event_types,
                "webhook.event_types",
            )?);
        }
        if named("filter") {
            endpoint::check_filter(&filter, "webhook.filter")?;
            update.filter = Some(filter);
        }
        if named("disabled") {
            update.disabled = Some(disabled);
        }
        let stored = call
            .run(self.core.store.update_webhook(&id, update))
            .await?;
        let stored = found(stored, &id)?;
        self.changed.notify_one();
        Ok(Response::new(webhook_message(stored)))
    }

    async fn delete_webhook(
        &self,
        request: Request<DeleteWebhookRequest>,
    ) -> Result<Response<DeleteWebhookResponse>, Status> {
        let call = self.admit(&request)?;
        let DeleteWebhookRequest { id } = request.into_inner();
        required(&id, "id")?;
        let existed = call.run(self.core.store.delete_webhook(&id)).await?;
        self.changed.notify_one();
        Ok(Response::new(DeleteWebhookResponse { existed }))
    }

    async fn rotate_webhook_secret(
        &self,
        request: Request<RotateWebhookSecretRequest>,
    ) -> Result<Response<RotateWebhookSecretResponse>, Status> {
        let call = self.admit(&request)?;
        let RotateWebhookSecretRequest { id, grace_period } = request.into_inner();
        required(&id, "id")?;
        let given = match grace_period {
            None => None,
            Some(duration) => Some(std::time::Duration::try_from(duration).map_err(|_| {
                ValidationError::new(
                    JsonPath::root("grace_period"),
                    Problem::DurationTooLong {
                        given: "negative".into(),
                        limit: humantime::format_duration(endpoint::MAX_GRACE).to_string(),
                    },
                )
            })?),
        };
        let grace = endpoint::check_grace(given, "grace_period")?;
        let previous_until = (!grace.is_zero())
            .then(|| Utc::now() + chrono::Duration::from_std(grace).unwrap_or_default());
        let secret = signing::new_secret();
        let stored = call
            .run(
                self.core
                    .store
                    .rotate_webhook_secret(&id, secret.clone(), previous_until),
            )
            .await?;
        let stored = found(stored, &id)?;
        tracing::info!(webhook = %stored.id, grace = %humantime::format_duration(grace), "webhook secret rotated");
        self.changed.notify_one();
        Ok(Response::new(RotateWebhookSecretResponse {
            webhook: Some(webhook_message(stored)),
            secret,
        }))
    }

    async fn replay_webhook(
        &self,
        request: Request<ReplayWebhookRequest>,
    ) -> Result<Response<Webhook>, Status> {
        let call = self.admit(&request)?;
        let ReplayWebhookRequest { id, revision } = request.into_inner();
        required(&id, "id")?;
        if revision == 0 {
            return Err(
                ValidationError::new(JsonPath::root("revision"), Problem::Unspecified).into(),
            );
        }
        let revision = self.position(revision, "revision").await?;
        let stored = call
            .run(self.core.store.replay_webhook(&id, revision))
            .await?;
        let stored = found(stored, &id)?;
        tracing::info!(webhook = %stored.id, revision, "webhook replayed");
        self.changed.notify_one();
        Ok(Response::new(webhook_message(stored)))
    }
}
