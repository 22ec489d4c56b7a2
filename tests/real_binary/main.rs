//! Integration tests that run programs: the built `metadata-service` binary
//! (server and CLI), the README's commands, and the real grpcurl. One test
//! binary: the harness and the dependencies are compiled and linked once.

#[path = "../common/mod.rs"]
mod common;
mod programs;
mod served;

mod binary;
mod browser;
mod chaos;
mod cli;
mod grpcurl;
mod readme;
mod relay;
mod webhooks;
