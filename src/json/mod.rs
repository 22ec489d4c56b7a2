//! Pure JSON logic: merge, replace, JSON Patch and validation. No I/O here, so every rule
//! is unit-tested on its own and the store only calls [`apply`].

mod apply;
mod merge;
mod number;
pub mod patch;
mod validate;

pub use apply::apply;
pub use merge::merge_patch;
pub use number::{canonical_numbers, json_number};
pub use validate::{
    Limits, MAX_BATCH_IDS, MAX_WATCH_IDS, measure, validate_batch_ids, validate_command,
    validate_delete, validate_id, validate_watch_ids,
};
