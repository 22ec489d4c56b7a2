//! A TCP proxy in front of Postgres that reads what its clients send, so
//! that a test can count the round trips a call costs. The server's own
//! counters count statements, not round trips: they miss sqlx's pings (a
//! bare Sync runs no statement) and the Parse a statement's first use on
//! a connection costs, and `pg_stat_statements` is not installed
//! everywhere.
//!
//! A round trip is what makes the client wait for the server: a simple
//! Query ('Q') or a Sync ('S') of the extended protocol. Everything else is
//! only recorded to say what each round trip was. The proxy refuses
//! encryption itself (it answers 'N' to SSLRequest and GSSENCRequest), so a
//! client must not require it: give it `sslmode=disable`.
//!
//! It lives with its only user, the in-process tests: `tests/common` is
//! compiled into every test binary, where it would be dead code.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

/// Startup-phase request codes (the first message has no type byte).
const SSL_REQUEST: i32 = 80877103;
const GSSENC_REQUEST: i32 = 80877104;
const CANCEL_REQUEST: i32 = 80877102;

/// What a client sent that matters for counting round trips.
#[derive(Clone, Debug)]
pub enum Sent {
    /// 'Q': a simple query, one round trip.
    Query(String),
    /// 'P': a statement prepared (sqlx then describes it and waits: a
    /// round trip of its own before the statement runs).
    Parse(String),
    /// 'B': a prepared statement run, with the SQL it was prepared from.
    Bind(String),
    /// 'S': the end of an extended-protocol exchange, one round trip.
    Sync,
}

/// A message, numbered in the order the proxy read it, across connections.
#[derive(Clone, Debug)]
pub struct Message {
    pub seq: u64,
    pub sent: Sent,
}

/// One round trip: what the client sent, and when (see [`Message`]).
#[derive(Clone, Debug)]
pub struct RoundTrip {
    /// That of the message that made the client wait.
    pub seq: u64,
    pub what: String,
}

/// One client connection as seen so far.
#[derive(Clone, Debug, Default)]
struct Connection {
    /// From the StartupMessage; empty when the client gave none.
    application_name: String,
    /// It sent LISTEN: it waits for notifications.
    listens: bool,
    sent: Vec<Message>,
}

#[derive(Default)]
struct Shared {
    /// Indexed by connection id, in the order they were accepted.
    connections: Mutex<Vec<Connection>>,
    /// Bytes forwarded either way on any connection, to tell when the
    /// traffic has stopped.
    bytes: AtomicU64,
    /// The next message's number.
    seq: AtomicU64,
}

/// How far each connection's log went at one moment.
pub struct Mark(Vec<usize>);

/// What one connection sent after a [`Mark`].
#[derive(Clone, Debug)]
pub struct Activity {
    pub connection: usize,
    pub application_name: String,
    pub listens: bool,
    /// Opened after the mark. Its startup and authentication are not
    /// counted as round trips.
    pub opened: bool,
    pub sent: Vec<Message>,
}

impl Activity {
    /// What each round trip was, in order.
    pub fn round_trips(&self) -> Vec<RoundTrip> {
        let mut trips = Vec::new();
        let mut pending: Vec<String> = Vec::new();
        for Message { seq, sent } in &self.sent {
            let what = match sent {
                Sent::Query(sql) => format!("Query: {}", one_line(sql)),
                Sent::Parse(sql) => {
                    pending.push(format!("Parse+Describe: {}", one_line(sql)));
                    continue;
                }
                Sent::Bind(sql) => {
                    pending.push(format!("Bind+Execute: {}", one_line(sql)));
                    continue;
                }
                Sent::Sync if pending.is_empty() => "Sync alone (a ping)".to_owned(),
                Sent::Sync => format!("Sync after {}", std::mem::take(&mut pending).join("; ")),
            };
            trips.push(RoundTrip { seq: *seq, what });
        }
        trips
    }

    /// Statements prepared in this window, not taken from sqlx's cache.
    pub fn parses(&self) -> usize {
        self.sent
            .iter()
            .filter(|m| matches!(m.sent, Sent::Parse(_)))
            .count()
    }
}

fn one_line(sql: &str) -> String {
    sql.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The proxy; it stops, closing every connection through it, when dropped.
pub struct PgProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

impl PgProxy {
    /// Listens on 127.0.0.1:0 and forwards every connection to `upstream`
    /// (host and port; each address of the host is tried).
    pub async fn start(upstream: (String, u16)) -> PgProxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared::default());
        let accept = tokio::spawn({
            let shared = shared.clone();
            async move {
                // Owned here: aborting this task aborts every connection.
                let mut connections = JoinSet::new();
                while let Ok((client, _)) = listener.accept().await {
                    let id = {
                        let mut all = shared.connections.lock().unwrap();
                        all.push(Connection::default());
                        all.len() - 1
                    };
                    connections.spawn(serve(client, upstream.clone(), id, shared.clone()));
                }
            }
        });
        PgProxy {
            addr,
            shared,
            accept,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Waits until nothing has crossed the proxy for `quiet`: a call's
    /// response comes before all of its traffic (sqlx pings a connection
    /// returned to its pool from a task of its own, after the caller has
    /// its rows). Panics after `timeout`.
    pub async fn settle(&self, quiet: Duration, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let before = self.shared.bytes.load(Ordering::SeqCst);
            tokio::time::sleep(quiet).await;
            if self.shared.bytes.load(Ordering::SeqCst) == before {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the traffic through the Postgres proxy did not stop for {quiet:?} within {timeout:?}"
            );
        }
    }

    pub fn mark(&self) -> Mark {
        let all = self.shared.connections.lock().unwrap();
        Mark(all.iter().map(|c| c.sent.len()).collect())
    }

    /// What each connection sent after `mark`; connections that sent
    /// nothing and were not opened since are left out.
    pub fn since(&self, mark: &Mark) -> Vec<Activity> {
        let all = self.shared.connections.lock().unwrap();
        all.iter()
            .enumerate()
            .filter_map(|(id, c)| {
                let seen = mark.0.get(id).copied();
                let sent = c.sent[seen.unwrap_or(0)..].to_vec();
                (seen.is_none() || !sent.is_empty()).then(|| Activity {
                    connection: id,
                    application_name: c.application_name.clone(),
                    listens: c.listens,
                    opened: seen.is_none(),
                    sent,
                })
            })
            .collect()
    }

    /// Every connection so far, with all it sent.
    pub fn everything(&self) -> Vec<Activity> {
        self.since(&Mark(Vec::new()))
    }
}

impl Drop for PgProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// One proxied connection, until either side closes it.
async fn serve(mut client: TcpStream, upstream: (String, u16), id: usize, shared: Arc<Shared>) {
    let Ok(Some((startup, application_name))) = startup(&mut client).await else {
        return;
    };
    shared.connections.lock().unwrap()[id].application_name = application_name;
    let Ok(mut server) = TcpStream::connect((upstream.0.as_str(), upstream.1)).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    if server.write_all(&startup).await.is_err() {
        return;
    }
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    // Either side closing ends both directions: dropping the halves
    // closes the other socket too.
    tokio::select! {
        () = from_client(client_read, server_write, id, &shared) => {}
        () = copy(server_read, client_write, &shared) => {}
    }
}

/// Reads the startup phase: refuses encryption, and returns the message to
/// forward (a StartupMessage or CancelRequest) with the application_name
/// it gives. None when the client went away first.
async fn startup(client: &mut TcpStream) -> std::io::Result<Option<(Vec<u8>, String)>> {
    loop {
        let len = client.read_i32().await?;
        let Some(body_len) = usize::try_from(len).ok().and_then(|l| l.checked_sub(4)) else {
            return Ok(None);
        };
        let mut body = vec![0; body_len];
        client.read_exact(&mut body).await?;
        let code = body
            .get(..4)
            .map_or(0, |c| i32::from_be_bytes(c.try_into().unwrap()));
        if code == SSL_REQUEST || code == GSSENC_REQUEST {
            // Plain text, or nothing could be read.
            client.write_all(b"N").await?;
            continue;
        }
        let application_name = if code == CANCEL_REQUEST {
            "(cancel request)".to_owned()
        } else {
            startup_parameter(&body[4..], "application_name").unwrap_or_default()
        };
        let mut message = len.to_be_bytes().to_vec();
        message.extend_from_slice(&body);
        return Ok(Some((message, application_name)));
    }
}

/// A parameter of a StartupMessage: name and value pairs of C strings.
fn startup_parameter(mut parameters: &[u8], wanted: &str) -> Option<String> {
    while let (Some(name), rest) = cstring(parameters) {
        let (value, rest) = cstring(rest);
        if name.is_empty() {
            return None;
        }
        if name == wanted {
            return value;
        }
        parameters = rest;
    }
    None
}

/// The C string at the start of `bytes`, and what follows it.
fn cstring(bytes: &[u8]) -> (Option<String>, &[u8]) {
    match bytes.iter().position(|&b| b == 0) {
        Some(end) => (
            Some(String::from_utf8_lossy(&bytes[..end]).into_owned()),
            &bytes[end + 1..],
        ),
        None => (None, &[]),
    }
}

/// Forwards what the client sends, recording each message before the
/// server can answer it (so a settled log holds everything answered).
async fn from_client(
    mut client: OwnedReadHalf,
    mut server: OwnedWriteHalf,
    id: usize,
    shared: &Shared,
) {
    let mut unparsed = Vec::new();
    // Statement name -> SQL, to name what a Bind runs ("" is the unnamed one).
    let mut statements = HashMap::new();
    let mut chunk = vec![0; 64 * 1024];
    loop {
        let n = match client.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        unparsed.extend_from_slice(&chunk[..n]);
        let mut start = 0;
        // Every message after the startup one: type byte, i32 length
        // (counting itself), body.
        while let Some(header) = unparsed.get(start..start + 5) {
            let len = i32::from_be_bytes(header[1..5].try_into().unwrap());
            let end = start + 1 + usize::try_from(len).unwrap_or(0).max(4);
            let Some(body) = unparsed.get(start + 5..end) else {
                break;
            };
            record(header[0], body, id, shared, &mut statements);
            start = end;
        }
        unparsed.drain(..start);
        shared.bytes.fetch_add(n as u64, Ordering::SeqCst);
        if server.write_all(&chunk[..n]).await.is_err() {
            return;
        }
    }
}

fn record(
    kind: u8,
    body: &[u8],
    id: usize,
    shared: &Shared,
    statements: &mut HashMap<String, String>,
) {
    let sent = match kind {
        b'Q' => Sent::Query(cstring(body).0.unwrap_or_default()),
        b'P' => {
            let (name, rest) = cstring(body);
            let sql = cstring(rest).0.unwrap_or_default();
            statements.insert(name.unwrap_or_default(), sql.clone());
            Sent::Parse(sql)
        }
        b'B' => {
            let (_portal, rest) = cstring(body);
            let name = cstring(rest).0.unwrap_or_default();
            Sent::Bind(
                statements
                    .get(&name)
                    .cloned()
                    .unwrap_or_else(|| format!("(statement {name:?}, never seen parsed)")),
            )
        }
        b'S' => Sent::Sync,
        // Terminate, Describe, Execute, Close, Flush, authentication: no
        // round trip of their own, or none a call makes.
        _ => return,
    };
    let mut all = shared.connections.lock().unwrap();
    let connection = &mut all[id];
    if let Sent::Query(sql) = &sent {
        connection.listens |= sql.trim_start().to_ascii_uppercase().starts_with("LISTEN");
    }
    // Taken under the lock: numbers and log order agree.
    let seq = shared.seq.fetch_add(1, Ordering::SeqCst);
    connection.sent.push(Message { seq, sent });
}

/// Forwards what the server sends, counting only its bytes.
async fn copy(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, shared: &Shared) {
    let mut chunk = vec![0; 64 * 1024];
    loop {
        let n = match from.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        shared.bytes.fetch_add(n as u64, Ordering::SeqCst);
        if to.write_all(&chunk[..n]).await.is_err() {
            return;
        }
    }
}
