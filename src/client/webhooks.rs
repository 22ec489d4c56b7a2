//! `metadata-service webhook create|list|get|update|delete|rotate-secret|
//! replay`: webhook endpoints (`metadata.v1.MetadataWebhookService`), with
//! the connection, input and exit-status handling of the rest of the
//! client. Prints each answer in its proto3 JSON form (a created or
//! rotated endpoint's secret beside it: shown once).

use std::io::IsTerminal;
use std::time::Duration;

use clap::{Args, Subcommand};
use prost::Message;
use prost_reflect::{DynamicMessage, SerializeOptions};
use serde_json::{Value, json};

use super::{Connection, Failure, connect, first_call, output};
use crate::proto::v1::metadata_webhook_service_client::MetadataWebhookServiceClient;
use crate::proto::v1::{
    CreateWebhookRequest, DeleteWebhookRequest, GetWebhookRequest, ListWebhooksRequest,
    ReplayWebhookRequest, RotateWebhookSecretRequest, UpdateWebhookRequest, Webhook,
};

#[derive(Debug, Args)]
pub struct WebhookCommand {
    #[command(subcommand)]
    pub action: WebhookAction,
    #[command(flatten)]
    pub connection: Connection,
}

/// What an endpoint is: the fields create sets and update changes.
#[derive(Debug, Args)]
pub struct EndpointFields {
    /// Where deliveries go: https://..., or http:// within the server's
    /// --webhook-allow-networks.
    #[arg(long)]
    pub url: Option<String>,
    #[arg(long)]
    pub description: Option<String>,
    /// An event type to deliver (repeat for more): user.metadata.updated,
    /// user.metadata.deleted, organization.metadata.updated,
    /// organization.metadata.deleted. None: all.
    #[arg(long = "event-type")]
    pub event_types: Vec<String>,
    /// Deliver every event type again (update only; clears --event-type).
    #[arg(long, conflicts_with = "event_types")]
    pub all_event_types: bool,
    /// A filter as Watch's, e.g. `public_metadata.plan = "pro"` (an event
    /// whose before or after matches is delivered); "" for none.
    #[arg(long)]
    pub filter: Option<String>,
    /// Stop (true) or resume (false) deliveries.
    #[arg(long)]
    pub disabled: Option<bool>,
}

#[derive(Debug, Subcommand)]
pub enum WebhookAction {
    /// Create an endpoint; prints it and its signing secret (shown once).
    Create {
        #[command(flatten)]
        fields: EndpointFields,
        /// The first revision to deliver (0: the first after now).
        #[arg(long, default_value_t = 0)]
        start_revision: u64,
    },
    /// List the endpoints, ordered by id (secrets are never listed).
    List {
        #[arg(long, default_value_t = 0)]
        page_size: i32,
        #[arg(long, default_value = "")]
        page_token: String,
    },
    /// Print an endpoint: its position, failures and why it is disabled.
    Get {
        id: String,
    },
    /// Change the fields given (and only those).
    Update {
        id: String,
        #[command(flatten)]
        fields: EndpointFields,
    },
    Delete {
        id: String,
    },
    /// A new signing secret; the old one keeps signing beside it for the
    /// grace period.
    RotateSecret {
        id: String,
        /// e.g. 24h (the default), 30m, 0s (the old secret stops at once).
        #[arg(long, value_parser = humantime::parse_duration)]
        grace_period: Option<Duration>,
    },
    /// Deliver again from a revision (with the same webhook-id as before).
    Replay {
        id: String,
        #[arg(long)]
        revision: u64,
    },
}

/// An update's endpoint and the mask naming what it changes.
fn update(id: String, fields: EndpointFields) -> Result<UpdateWebhookRequest, Failure> {
    let EndpointFields {
        url,
        description,
        event_types,
        all_event_types,
        filter,
        disabled,
    } = fields;
    let mut paths = Vec::new();
    let mut named = |given: bool, path: &str| {
        if given {
            paths.push(path.to_owned());
        }
    };
    named(url.is_some(), "url");
    named(description.is_some(), "description");
    named(!event_types.is_empty() || all_event_types, "event_types");
    named(filter.is_some(), "filter");
    named(disabled.is_some(), "disabled");
    if paths.is_empty() {
        return Err(Failure::Input(
            "nothing to update: give --url, --description, --event-type, --all-event-types, \
             --filter or --disabled"
                .into(),
        ));
    }
    Ok(UpdateWebhookRequest {
        webhook: Some(Webhook {
            id,
            url: url.unwrap_or_default(),
            description: description.unwrap_or_default(),
            event_types,
            filter: filter.unwrap_or_default(),
            disabled: disabled.unwrap_or_default(),
            ..Default::default()
        }),
        update_mask: Some(prost_types::FieldMask { paths }),
    })
}

/// `message` in its proto3 JSON form.
fn proto_json<M: Message>(name: &str, message: &M) -> Value {
    let descriptor = crate::proto::descriptor_pool()
        .get_message_by_name(name)
        .expect("the service's messages are in its descriptor set");
    let dynamic = DynamicMessage::decode(descriptor, message.encode_to_vec().as_slice())
        .expect("a message this process encoded decodes");
    dynamic
        .serialize_with_options(serde_json::value::Serializer, &SerializeOptions::new())
        .expect("serializing into memory cannot fail")
}

fn webhook_json(webhook: &Webhook) -> Value {
    proto_json("metadata.v1.Webhook", webhook)
}

/// A request, its input checked.
enum Call {
    Create(CreateWebhookRequest),
    List(ListWebhooksRequest),
    Get(GetWebhookRequest),
    Update(UpdateWebhookRequest),
    Delete(DeleteWebhookRequest),
    Rotate(RotateWebhookSecretRequest),
    Replay(ReplayWebhookRequest),
}

fn prepare(action: WebhookAction) -> Result<Call, Failure> {
    Ok(match action {
        WebhookAction::Create {
            fields,
            start_revision,
        } => {
            let EndpointFields {
                url,
                description,
                event_types,
                all_event_types: _,
                filter,
                disabled,
            } = fields;
            Call::Create(CreateWebhookRequest {
                webhook: Some(Webhook {
                    url: url.unwrap_or_default(),
                    description: description.unwrap_or_default(),
                    event_types,
                    filter: filter.unwrap_or_default(),
                    disabled: disabled.unwrap_or_default(),
                    ..Default::default()
                }),
                start_revision,
            })
        }
        WebhookAction::List {
            page_size,
            page_token,
        } => Call::List(ListWebhooksRequest {
            page_size,
            page_token,
        }),
        WebhookAction::Get { id } => Call::Get(GetWebhookRequest { id }),
        WebhookAction::Update { id, fields } => Call::Update(update(id, fields)?),
        WebhookAction::Delete { id } => Call::Delete(DeleteWebhookRequest { id }),
        WebhookAction::RotateSecret { id, grace_period } => {
            let grace_period = grace_period.map(|grace| prost_types::Duration {
                seconds: grace.as_secs().min(i64::MAX as u64) as i64,
                nanos: grace.subsec_nanos() as i32,
            });
            Call::Rotate(RotateWebhookSecretRequest { id, grace_period })
        }
        WebhookAction::Replay { id, revision } => {
            Call::Replay(ReplayWebhookRequest { id, revision })
        }
    })
}

/// An endpoint with its secret: what create and rotate answer.
fn with_secret(webhook: Option<Webhook>, secret: String) -> Value {
    json!({
        "webhook": webhook.as_ref().map(webhook_json),
        "secret": secret,
    })
}

pub(super) async fn execute(command: WebhookCommand) -> Result<(), Failure> {
    let call = prepare(command.action)?;
    let (channel, bearer) = connect(&command.connection).await?;
    let mut client = MetadataWebhookServiceClient::with_interceptor(channel, bearer);
    let answer = match call {
        Call::Create(request) => client.create_webhook(request).await.map(|r| {
            let created = r.into_inner();
            with_secret(created.webhook, created.secret)
        }),
        Call::List(request) => client
            .list_webhooks(request)
            .await
            .map(|r| proto_json("metadata.v1.ListWebhooksResponse", &r.into_inner())),
        Call::Get(request) => client
            .get_webhook(request)
            .await
            .map(|r| webhook_json(&r.into_inner())),
        Call::Update(request) => client
            .update_webhook(request)
            .await
            .map(|r| webhook_json(&r.into_inner())),
        Call::Delete(request) => client
            .delete_webhook(request)
            .await
            .map(|r| json!({ "existed": r.into_inner().existed })),
        Call::Rotate(request) => client.rotate_webhook_secret(request).await.map(|r| {
            let rotated = r.into_inner();
            with_secret(rotated.webhook, rotated.secret)
        }),
        Call::Replay(request) => client
            .replay_webhook(request)
            .await
            .map(|r| webhook_json(&r.into_inner())),
    };
    output::print(
        &answer.map_err(first_call)?,
        std::io::stdout().is_terminal(),
    );
    Ok(())
}
