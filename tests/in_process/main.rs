//! Integration tests that run the server inside the test process
//! (`metadata_service::server::start` on 127.0.0.1:0, a fresh database per
//! test, generated clients), and tests of the library's pure parts. One
//! test binary: the harness and the dependencies are compiled and linked
//! once.
//!
//! A test's name says where it runs: `watch::sqlite::name` on SQLite
//! (`backend_tests!`), `semantics::organizations::postgres::name` for
//! organizations on Postgres (`kind_tests!` in `kinds.rs`).

/// Declares each listed `async fn name(backend: Backend)` as two tests,
/// `sqlite::name` and `postgres::name`.
macro_rules! backend_tests {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Backend::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Backend::Postgres).await
                }
            )*
        }
    };
}

#[path = "../common/mod.rs"]
mod common;
mod harness;
mod pg_proxy;
#[macro_use]
mod kinds;

mod auth;
mod bad_input;
mod batch_get;
mod consumer_example;
mod error_details;
mod fuzz_corpus;
mod history;
mod in_doubt;
mod integrity;
mod list;
mod metrics;
mod nats_consumer_example;
mod notifications;
mod patch;
mod properties;
mod queries;
mod relay;
mod round_trips;
mod schema_rules;
mod schemas;
mod semantics;
mod test_databases;
mod tls;
mod transactions;
mod watch;
mod watch_limits;
mod web;
mod webhooks;
