pub mod event;
pub mod metadata;
pub mod revision;
pub mod webhook;
