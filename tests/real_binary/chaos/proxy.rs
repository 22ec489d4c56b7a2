//! A TCP proxy the chaos test puts in front of Postgres and NATS, so that it
//! can take the network away from every process at once without touching
//! the processes or the servers behind it.
//!
//! A cut is what an operator sees when a link or a load balancer fails:
//! every open connection is reset at the same moment (RST, no orderly
//! close, so nothing can be flushed on the way out), and for the cut's
//! duration new connections are accepted and reset at once, as a broken
//! route does, rather than left hanging: the processes must notice and
//! retry, not wait out a kernel timeout.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub struct Proxy {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

struct Shared {
    target: SocketAddr,
    refusing: AtomicBool,
    /// Bumped by each cut: every connection task watches it and ends
    /// (resetting both of its sockets) when it moves.
    generation: watch::Sender<u64>,
    /// Connections reset by cuts, and connections refused during them.
    reset: AtomicU64,
    refused: AtomicU64,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `target`.
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            target,
            refusing: AtomicBool::new(false),
            generation: watch::Sender::new(0),
            reset: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        });
        let accept = tokio::spawn(accept_loop(listener, shared.clone()));
        Proxy {
            addr,
            shared,
            accept,
        }
    }

    /// Resets every open connection and refuses new ones until
    /// [`Proxy::restore`].
    pub fn sever(&self) {
        self.shared.refusing.store(true, Ordering::SeqCst);
        self.shared.generation.send_modify(|g| *g += 1);
    }

    pub fn restore(&self) {
        self.shared.refusing.store(false, Ordering::SeqCst);
    }

    /// (connections reset by cuts, connections refused during cuts)
    pub fn counts(&self) -> (u64, u64) {
        (
            self.shared.reset.load(Ordering::Relaxed),
            self.shared.refused.load(Ordering::Relaxed),
        )
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        // Connection tasks hold `shared` (and so the sender) themselves:
        // only a new generation ends them.
        self.shared.generation.send_modify(|g| *g += 1);
    }
}

/// Dropping a socket with a zero linger sends RST, as a failed link does
/// to whoever still talks on it.
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        // Subscribed before the refusing check: a cut that lands between
        // the two still ends this connection.
        let mut generation = shared.generation.subscribe();
        if shared.refusing.load(Ordering::SeqCst) {
            shared.refused.fetch_add(1, Ordering::Relaxed);
            reset(client);
            continue;
        }
        let shared = shared.clone();
        tokio::spawn(async move {
            let _ = client.set_nodelay(true);
            let upstream = match tokio::time::timeout(
                Duration::from_secs(2),
                TcpStream::connect(shared.target),
            )
            .await
            {
                Ok(Ok(upstream)) => upstream,
                // The server behind is down (a Postgres restart): the
                // client sees its connection closed, as it would directly.
                _ => return reset(client),
            };
            let _ = upstream.set_nodelay(true);
            let (mut client, mut upstream) = (client, upstream);
            let cut = tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => false,
                _ = generation.changed() => true,
            };
            if cut {
                shared.reset.fetch_add(1, Ordering::Relaxed);
                reset(client);
                reset(upstream);
            }
        });
    }
}
