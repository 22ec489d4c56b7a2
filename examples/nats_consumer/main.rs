//! Follows user changes from the relay's NATS stream with a durable pull
//! consumer, printing one line per change:
//!
//!     cargo run --example nats_consumer -- nats://127.0.0.1:4222 METADATA metadata my-app

mod consumer;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [url, stream, prefix, durable] = args.as_slice() else {
        anyhow::bail!("usage: nats_consumer NATS_URL STREAM SUBJECT_PREFIX DURABLE_NAME");
    };
    let mut applied = consumer::Applied::default();
    consumer::consume(
        url,
        stream,
        prefix,
        durable,
        &mut applied,
        None,
        |(revision, id, change)| println!("{revision} {change} {id}"),
    )
    .await
}
