//! Queries over stored metadata: the filter language that List and Watch
//! accept (`filter.rs`, evaluated in plain Rust), List's page tokens
//! (`page.rs`) and ListHistory's (`history.rs`). No I/O here; a filter's SQL is the store's to render, in
//! its backend's dialect (`store/sql.rs`).

pub mod filter;
pub mod history;
pub mod page;

pub use filter::{Filter, MAX_FILTER_BYTES, parse};
pub use history::HistoryQuery;
pub use page::{PageToken, page_size};

use std::sync::Arc;

use crate::model::{Field, Kind};
use crate::validation::{JsonPath, Problem, ValidationError};

/// The filter of a List or Watch request, parsed for a kind with `fields`;
/// None when empty. An error names the `filter` field and the column.
pub fn parse_filter(text: &str, fields: &[Field]) -> Result<Option<Arc<Filter>>, ValidationError> {
    parse(text, fields)
        .map(|filter| filter.map(Arc::new))
        .map_err(|err| ValidationError::new(JsonPath::root("filter"), Problem::Filter(err)))
}

/// A List request, checked: what to read and where to start.
#[derive(Clone, Debug)]
pub struct ListQuery {
    pub kind: Kind,
    /// As given: a page token is tied to it.
    pub filter_text: String,
    pub filter: Option<Arc<Filter>>,
    pub page_size: u64,
    /// The last id of the previous page.
    pub after: Option<String>,
}

impl ListQuery {
    pub fn new(
        kind: Kind,
        fields: &[Field],
        filter: String,
        page_size: i32,
        page_token: &str,
    ) -> Result<Self, ValidationError> {
        let parsed = parse_filter(&filter, fields)?;
        let page_size = page::page_size(page_size)?;
        let after = PageToken::decode(page_token, kind, &filter)?.map(|token| token.after);
        Ok(ListQuery {
            kind,
            filter_text: filter,
            filter: parsed,
            page_size,
            after,
        })
    }

    /// The token of the page after one that ended with `last`.
    pub fn next_token(&self, last: &str) -> String {
        PageToken::new(self.kind, &self.filter_text, last.to_owned()).encode()
    }
}
