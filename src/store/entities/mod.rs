pub mod event;
pub mod metadata;
pub mod revision;
