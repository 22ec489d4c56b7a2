//! The test harness itself: Postgres tests create their databases from any
//! reachable server, even one without the database TEST_DATABASE_URL names
//! (a fresh PostgreSQL has no `test`), through its `postgres` database.

use sea_orm::{ConnectionTrait, Database};

use crate::common::PgDatabase;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_test_database_falls_back_to_postgres() {
    let Ok(url) = std::env::var("TEST_DATABASE_URL") else {
        assert!(
            std::env::var_os("METADATA_REQUIRE_POSTGRES").is_none(),
            "METADATA_REQUIRE_POSTGRES is set but TEST_DATABASE_URL is not"
        );
        return;
    };
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, format!("?{query}")),
        None => (url.as_str(), String::new()),
    };
    let server = &base[..base.rfind('/').expect("a database in the URL")];
    let missing = format!(
        "{server}/mdtest_no_such_{}{query}",
        uuid::Uuid::new_v4().simple()
    );
    let db = PgDatabase::create(missing).await;
    assert!(
        db.admin_url.contains("/postgres"),
        "created from the server's postgres database: {}",
        db.admin_url
    );
    let connection = Database::connect(&db.url).await.expect("the new database");
    connection.execute_unprepared("SELECT 1").await.unwrap();
    connection.close().await.unwrap();
}
