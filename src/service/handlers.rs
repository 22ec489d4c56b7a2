//! The handlers of every RPC, written once for both kinds. Each one: take
//! the request apart (`kind.rs`), authorize the caller for what it asks,
//! pass admission, then do the work in [`Core`] within the call's
//! budget. The generated tonic traits delegate here (`adapters.rs`).

use std::collections::HashMap;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;

use prost::Message;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use super::{Core, authorize};
use crate::api::{ApiKind, WriteParts};
use crate::auth::{Action, Caller, FieldSet, Operation};
use crate::convert::{Shown, TreeConvert};
use crate::model::{CommitCommand, Mode, Origin, TxnCommand};
use crate::store::{Sent, TxnDone};
use crate::validation::{JsonPath, Problem, ValidationError};

/// Most bytes of records in one List page, encoded: under the 4 MiB a
/// gRPC client accepts by default.
pub const MAX_PAGE_BYTES: usize = 3_500_000;

/// Most bytes of records in one BatchGet answer, encoded (duplicates
/// count each time). Clients reading large batches raise their receive
/// limit to this (the CLI does).
pub const MAX_BATCH_BYTES: usize = 64 * 1024 * 1024;

/// A stream of one kind's Watch responses, encoded per stream.
pub type WatchStream<K> =
    Pin<Box<dyn Stream<Item = Result<<K as ApiKind>::WatchResponse, Status>> + Send>>;

/// `items` encoded in order, up to the one whose bytes would pass
/// [`MAX_PAGE_BYTES`] (at least one: a page always moves on); and, when
/// the page was cut there, the key of its last item, where the next page
/// starts after.
fn within_page_budget<T, M: Message, K>(
    items: impl IntoIterator<Item = T>,
    key: impl Fn(&T) -> K,
    encode: impl Fn(T) -> M,
) -> (Vec<M>, Option<K>) {
    let mut messages = Vec::new();
    let mut bytes = 0;
    let mut last = None;
    for item in items {
        let item_key = key(&item);
        let message = encode(item);
        bytes += message.encoded_len() + 8;
        if bytes > MAX_PAGE_BYTES && !messages.is_empty() {
            return (messages, last);
        }
        messages.push(message);
        last = Some(item_key);
    }
    (messages, None)
}

/// Who makes a write, as its event records it.
pub(super) fn origin(caller: &Caller, headers: &tonic::metadata::MetadataMap) -> Origin {
    Origin {
        actor: caller.actor(),
        trace_id: crate::otel::trace_id(headers.as_ref()),
        transaction_id: String::new(),
    }
}

/// One kind's service: the handlers, over [`Core`].
pub struct Handlers<K> {
    pub(super) core: Arc<Core>,
    kind: PhantomData<fn() -> K>,
}

impl<K> Handlers<K> {
    pub fn new(core: Arc<Core>) -> Self {
        Handlers {
            core,
            kind: PhantomData,
        }
    }
}

impl<K: ApiKind> Handlers<K> {
    pub async fn get(&self, request: Request<K::Get>) -> Result<Response<K::Record>, Status> {
        let (headers, extensions, message) = request.into_parts();
        let (id, revision) = K::get(message);
        let operation = Operation {
            kind: K::KIND,
            action: Action::Get,
            id: &id,
            written: FieldSet::NONE,
        };
        let (_, fields) = authorize(&extensions, &operation)?;
        let call = self.core.admission.unary(&headers)?;
        let record = match revision {
            None => call.run(self.core.get(K::KIND, &id)).await?,
            Some(revision) => call.run(self.core.get_at(K::KIND, &id, revision)).await?,
        };
        Ok(Response::new(K::record(Shown {
            record: &record,
            fields,
        })))
    }

    /// Every id is authorized as a Get of it; the fields shown are the same
    /// for all (a frontend token may name only its own id). Each distinct
    /// record is encoded once, and the answer is bounded in bytes, since
    /// duplicates repeat it.
    pub async fn batch_get(
        &self,
        request: Request<K::BatchGet>,
    ) -> Result<Response<K::BatchGot>, Status> {
        let (headers, extensions, message) = request.into_parts();
        let (ids, at) = K::batch_get(message);
        let mut fields = None;
        // No id at all is authorized as an empty one, so that the refusal
        // of a caller comes before the request's own errors.
        let names = if ids.is_empty() {
            &[String::new()][..]
        } else {
            &ids[..]
        };
        for id in names {
            let operation = Operation {
                kind: K::KIND,
                action: Action::BatchGet,
                id,
                written: FieldSet::NONE,
            };
            fields = Some(authorize(&extensions, &operation)?.1);
        }
        let fields = fields.unwrap_or(FieldSet::NONE);
        let call = self.core.admission.unary(&headers)?;
        let (distinct, revision) = call.run(self.core.batch_get(K::KIND, &ids, at)).await?;
        let encoded: HashMap<String, (K::Record, usize)> = distinct
            .into_iter()
            .map(|record| {
                let id = record.id.clone();
                let message = K::record(Shown {
                    record: &record,
                    fields,
                });
                let size = message.encoded_len();
                (id, (message, size))
            })
            .collect();
        // The store answers every distinct id (an empty record for one
        // never written).
        let answer = |id: &String| {
            encoded
                .get(id)
                .ok_or_else(|| super::error::internal("a requested id was not answered"))
        };
        let mut total = 0;
        for id in &ids {
            total += answer(id)?.1 + 8;
        }
        if total > MAX_BATCH_BYTES {
            return Err(ValidationError::new(
                JsonPath::root(K::KIND.ids_field()),
                Problem::AnswerTooLarge {
                    bytes: total,
                    limit: MAX_BATCH_BYTES,
                },
            )
            .into());
        }
        let records = ids
            .iter()
            .map(|id| answer(id).map(|(record, _)| record.clone()))
            .collect::<Result<_, _>>()?;
        Ok(Response::new(K::batch_got(records, revision)))
    }

    /// A page ends at the page size, or earlier where its encoded records
    /// would pass [`MAX_PAGE_BYTES`] (at least one record per page).
    pub async fn list(&self, request: Request<K::List>) -> Result<Response<K::Listed>, Status> {
        let (headers, extensions, message) = request.into_parts();
        let operation = Operation {
            kind: K::KIND,
            action: Action::List,
            id: "",
            written: FieldSet::NONE,
        };
        let (_, fields) = authorize(&extensions, &operation)?;
        let query = K::list(message)?;
        let call = self.core.admission.unary(&headers)?;
        let page = call.run(self.core.list(&query)).await?;
        let (records, cut_after) = within_page_budget(
            page.records,
            |record| record.id.clone(),
            |record| {
                K::record(Shown {
                    record: &record,
                    fields,
                })
            },
        );
        let next_page_token = match (cut_after, page.next_after) {
            (Some(last), _) | (None, Some(last)) => query.next_token(&last),
            (None, None) => String::new(),
        };
        Ok(Response::new(K::listed(
            records,
            next_page_token,
            page.revision,
        )))
    }

    /// A frontend token sees its own record's history, of the fields it
    /// may read: events that changed none of them are left out. A page
    /// ends at the page size, or earlier where its encoded events would
    /// pass [`MAX_PAGE_BYTES`] (at least one event per page).
    pub async fn history(
        &self,
        request: Request<K::History>,
    ) -> Result<Response<K::HistoryPage>, Status> {
        let (headers, extensions, message) = request.into_parts();
        let query = K::history(message)?;
        let operation = Operation {
            kind: K::KIND,
            action: Action::History,
            id: &query.id,
            written: FieldSet::NONE,
        };
        let (_, fields) = authorize(&extensions, &operation)?;
        let call = self.core.admission.unary(&headers)?;
        let page = call.run(self.core.history(&query, fields)).await?;
        let (events, cut_after) = within_page_budget(
            &page.events,
            |event| event.revision,
            |event| K::shown_event(event, fields),
        );
        let next_page_token = match (cut_after, page.next_cursor) {
            (Some(last), _) | (None, Some(last)) => query.next_token(last),
            (None, None) => String::new(),
        };
        Ok(Response::new(K::history_page(
            events,
            next_page_token,
            page.oldest_revision,
        )))
    }

    pub async fn restore(
        &self,
        request: Request<K::Restore>,
    ) -> Result<Response<K::Record>, Status> {
        let (headers, extensions, message) = request.into_parts();
        let command = K::restore(message);
        let operation = Operation {
            kind: K::KIND,
            action: Action::Restore,
            id: &command.id,
            written: FieldSet::ALL,
        };
        let (caller, fields) = authorize(&extensions, &operation)?;
        let call = self.core.admission.unary(&headers)?;
        let sent = Sent::default();
        let origin = origin(&caller, &headers);
        let restore = self.core.restore(&caller, command, sent.clone(), origin);
        let record = call.run_write(&sent, restore).await?;
        Ok(Response::new(K::record(Shown {
            record: &record,
            fields,
        })))
    }

    pub async fn merge(&self, request: Request<K::Merge>) -> Result<Response<K::Record>, Status> {
        let (headers, extensions, message) = request.into_parts();
        self.write(&headers, &extensions, Mode::Merge, K::merge(message))
            .await
    }

    pub async fn replace(
        &self,
        request: Request<K::Replace>,
    ) -> Result<Response<K::Record>, Status> {
        let (headers, extensions, message) = request.into_parts();
        self.write(&headers, &extensions, Mode::Replace, K::replace(message))
            .await
    }

    /// With a request id, the patch runs as a transaction of one, whose
    /// outcome answers its retries (`store/requests.rs`).
    pub async fn patch(&self, request: Request<K::Patch>) -> Result<Response<K::Record>, Status> {
        let (headers, extensions, message) = request.into_parts();
        let mut parts = K::patch(message);
        if parts.request_id.is_empty() {
            return self.write(&headers, &extensions, Mode::Patch, parts).await;
        }
        let (caller, fields) = authorize(&extensions, &parts.operation(K::KIND, Action::Patch))?;
        let call = self.core.admission.unary(&headers)?;
        let request_id = std::mem::take(&mut parts.request_id);
        let method = match K::KIND {
            crate::model::Kind::User => "UserMetadataService.Patch",
            crate::model::Kind::Organization => "OrganizationMetadataService.Patch",
        };
        let fingerprint =
            super::commit::fingerprint(method, &caller, K::patch_request(parts.clone()));
        let command = CommitCommand {
            operations: vec![(
                String::new(),
                TxnCommand::Write(parts.command(K::KIND, Mode::Patch)?),
            )],
            request_id,
            fingerprint,
        };
        let sent = Sent::default();
        let origin = origin(&caller, &headers);
        let commit = self
            .core
            .commit(&caller, command, sent.clone(), origin, true);
        let committed = call.run_write(&sent, commit).await?;
        let Some(TxnDone::Written(outcome)) = committed.results.into_iter().next() else {
            return Err(super::error::internal("a patch answered no record"));
        };
        Ok(Response::new(K::record(Shown {
            record: &outcome.record,
            fields,
        })))
    }

    async fn write<T: TreeConvert>(
        &self,
        headers: &tonic::metadata::MetadataMap,
        extensions: &tonic::Extensions,
        mode: Mode,
        parts: WriteParts<T>,
    ) -> Result<Response<K::Record>, Status> {
        let action = match mode {
            Mode::Merge => Action::Merge,
            Mode::Replace => Action::Replace,
            Mode::Patch => Action::Patch,
        };
        let (caller, fields) = authorize(extensions, &parts.operation(K::KIND, action))?;
        let call = self.core.admission.unary(headers)?;
        let command = parts.command(K::KIND, mode)?;
        let sent = Sent::default();
        let origin = origin(&caller, headers);
        let write = self.core.write(&caller, command, sent.clone(), origin);
        let record = call.run_write(&sent, write).await?;
        Ok(Response::new(K::record(Shown {
            record: &record,
            fields,
        })))
    }

    pub async fn delete(
        &self,
        request: Request<K::Delete>,
    ) -> Result<Response<K::Deleted>, Status> {
        let (headers, extensions, message) = request.into_parts();
        let command = K::delete(message);
        let operation = Operation {
            kind: K::KIND,
            action: Action::Delete,
            id: &command.id,
            written: FieldSet::ALL,
        };
        let (caller, _) = authorize(&extensions, &operation)?;
        let call = self.core.admission.unary(&headers)?;
        let sent = Sent::default();
        let origin = origin(&caller, &headers);
        let delete = self.core.delete(&caller, command, sent.clone(), origin);
        let existed = call.run_write(&sent, delete).await?;
        Ok(Response::new(K::deleted(existed)))
    }

    /// Watch with each message encoded by its own stream: what the
    /// generated service serves. The server mounts Watch through
    /// `watch::Routed` instead, which encodes each event once for all.
    pub async fn watch(
        &self,
        request: Request<K::Watch>,
    ) -> Result<Response<WatchStream<K>>, Status> {
        let (items, permit, fields) = self.open_watch(request).await?;
        let stream = ReceiverStream::new(items).map(move |item| {
            item.map(|item| K::shown_watch_response(item, fields))
                .map_err(Status::from)
        });
        Ok(Response::new(Box::pin(permit.hold(stream))))
    }

    /// Authorizes, admits and starts a Watch; the permit must live as long
    /// as the stream, whose events show the fields returned. A frontend
    /// token watches exactly its own record (its one id), and filters on
    /// none of the fields it may not read.
    pub(super) async fn open_watch(
        &self,
        request: Request<K::Watch>,
    ) -> Result<(super::WatchItems, super::StreamPermit, FieldSet), Status> {
        let (headers, extensions, message) = request.into_parts();
        let watch = K::watch(message)?;
        let id = match watch.ids.len() {
            1 => watch.ids.iter().next().map_or("", String::as_str),
            _ => "",
        };
        let operation = Operation {
            kind: K::KIND,
            action: Action::Watch,
            id,
            written: FieldSet::NONE,
        };
        let (_, fields) = authorize(&extensions, &operation)?;
        let hidden = watch
            .filter
            .as_ref()
            .and_then(|filter| filter.fields().into_iter().find(|f| !fields.contains(*f)));
        if let Some(field) = hidden {
            return Err(crate::auth::Denied {
                reason: crate::reason::Reason::FieldNotReadable,
                message: format!(
                    "filter: {} is not readable with this token; filter on what it may read",
                    field.name()
                ),
            }
            .into());
        }
        let (call, permit) = self.core.admission.stream(&headers)?;
        let items = call.run(self.core.watch(watch)).await?;
        Ok((items, permit, fields))
    }
}
