//! A change-event consumer for metadata-service: follows user metadata
//! changes, keeps its position in a file, and resumes after a restart (its
//! own or the server's) without missing or repeating an event.
//!
//! ```sh
//! cargo run --example consumer -- http://127.0.0.1:50051 consumer.position
//! ```

mod consumer;

use std::path::PathBuf;
use std::time::Duration;

use consumer::{Position, Replica, follow};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr = args
        .next()
        .unwrap_or_else(|| "http://127.0.0.1:50051".to_string());
    let position = Position::new(&PathBuf::from(
        args.next()
            .unwrap_or_else(|| "consumer.position".to_string()),
    ));
    let mut replica = Replica {
        echo: true,
        ..Replica::default()
    };
    loop {
        let outcome = match tonic::transport::Endpoint::from_shared(addr.clone())?
            .connect()
            .await
        {
            Ok(channel) => follow(channel, &position, &mut replica, None).await,
            Err(err) => Err(err.into()),
        };
        match outcome {
            Ok(()) => eprintln!("the stream ended (server stopping?); reconnecting"),
            Err(err) => eprintln!("{err:#}; reconnecting"),
        }
        // The position file is the memory; the list of applied events is not.
        replica.applied.clear();
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
