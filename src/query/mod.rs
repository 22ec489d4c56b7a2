//! Queries over stored metadata (issue 17, in progress): the filter
//! language that List and Watch accept. Pure logic, no storage.

pub mod filter;
