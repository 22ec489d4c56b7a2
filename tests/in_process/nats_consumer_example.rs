//! The NATS consumer example (`examples/nats_consumer/`) on a stream the
//! server relays to: every user change once, in order, across a restart of
//! the consumer, with its position kept by NATS.

#[path = "../../examples/nats_consumer/consumer.rs"]
mod consumer;

use std::time::Duration;

use serde_json::json;

use crate::common::Backend;
use crate::common::nats::{self, TestStream};
use crate::harness::{self, write};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumes_after_a_restart_without_repeats() {
    let Some(url) = nats::url() else {
        return;
    };
    let stream = TestStream::new(&url).await;
    let relay = crate::relay::options(&stream, &url);
    let mut server = harness::start_with(Backend::Sqlite, |config| config.relay = Some(relay))
        .await
        .unwrap();
    for n in 0..4 {
        write(
            &mut server.users,
            &format!("user.{}", n % 2),
            json!({ "n": n }),
        )
        .await;
    }
    let mut applied = consumer::Applied::default();
    run(&stream, &mut applied, 4).await;
    // A restart: a new consumer process with the same durable name.
    let mut restarted = consumer::Applied {
        last_revision: applied.last_revision,
        changes: Vec::new(),
    };
    for n in 4..7 {
        write(&mut server.users, "user.0", json!({ "n": n })).await;
    }
    run(&stream, &mut restarted, 3).await;
    let revisions = |a: &consumer::Applied| a.changes.iter().map(|c| c.0).collect::<Vec<_>>();
    assert_eq!(revisions(&applied), vec![1, 2, 3, 4]);
    assert_eq!(
        revisions(&restarted),
        vec![5, 6, 7],
        "resumed after the last ack"
    );
    assert_eq!(
        applied.changes[1],
        (2, "user.1".to_owned(), "merged".to_owned())
    );
}

/// Runs the example's consumer until it has received `max` messages.
async fn run(stream: &TestStream, applied: &mut consumer::Applied, max: usize) {
    tokio::time::timeout(
        Duration::from_secs(20),
        consumer::consume(
            &stream.url,
            &stream.name,
            &stream.prefix,
            "example",
            applied,
            Some(max),
            |_| {},
        ),
    )
    .await
    .expect("the consumer receives them in time")
    .expect("the consumer works");
}
