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
//! It can also cut a connection at a chosen message ([`PgProxy::cut`]):
//! after the server has answered it, or before the server hears it, with
//! the server's side left open, as a network partition leaves it (issue
//! 27: a write whose connection is lost after its COMMIT was sent).
//!
//! It lives with its only user, the in-process tests: `tests/common` is
//! compiled into every test binary, where it would be dead code.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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

/// Where a [`PgProxy::cut`] ends the client's connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cut {
    /// The message (and whatever the client sent with it) reaches the
    /// server, which does the work and answers; the answer never reaches
    /// the client, whose connection is closed once the server is ready
    /// for the next query.
    AfterServerAnswers,
    /// The message and everything after it are dropped and the client's
    /// connection is closed; the server's side stays open until the proxy
    /// stops, as after a partition: its session, with any transaction it
    /// has open and the locks it holds, goes on until it is terminated.
    BeforeServerHears,
}

type Matcher = Box<dyn Fn(&Sent) -> bool + Send + Sync>;

/// A cut armed and waiting for its message.
struct Armed {
    when: Matcher,
    how: Cut,
    /// Then the database is out of reach (see [`PgProxy::set_reachable`]).
    then_unreachable: bool,
}

struct Shared {
    /// One cut at a time, taken by the first message it matches.
    armed: Mutex<Option<Armed>>,
    /// Cuts made so far.
    cuts: AtomicU64,
    /// False: every connection is closed and new ones are refused.
    reachable: tokio::sync::watch::Sender<bool>,
    /// Server sides of connections cut with [`Cut::BeforeServerHears`].
    held_open: Mutex<Vec<OwnedWriteHalf>>,
    /// Indexed by connection id, in the order they were accepted.
    connections: Mutex<Vec<Connection>>,
    /// Bytes forwarded either way on any connection, to tell when the
    /// traffic has stopped.
    bytes: AtomicU64,
    /// The next message's number.
    seq: AtomicU64,
}

impl Default for Shared {
    fn default() -> Self {
        Shared {
            armed: Mutex::default(),
            cuts: AtomicU64::default(),
            reachable: tokio::sync::watch::Sender::new(true),
            held_open: Mutex::default(),
            connections: Mutex::default(),
            bytes: AtomicU64::default(),
            seq: AtomicU64::default(),
        }
    }
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
                    if !*shared.reachable.borrow() {
                        continue;
                    }
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
            // Time is what is awaited: quiet is a span with no traffic, and
            // nothing marks the end of the pool's own last exchange.
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

    /// Arms a cut: the next message any client sends that `when` matches
    /// ends its connection as `how` says. One cut at a time; it fires once.
    pub fn cut(&self, when: impl Fn(&Sent) -> bool + Send + Sync + 'static, how: Cut) {
        self.arm(Box::new(when), how, false);
    }

    /// [`PgProxy::cut`], after which the database is out of reach until
    /// [`PgProxy::set_reachable`] says otherwise.
    pub fn cut_then_unreachable(
        &self,
        when: impl Fn(&Sent) -> bool + Send + Sync + 'static,
        how: Cut,
    ) {
        self.arm(Box::new(when), how, true);
    }

    fn arm(&self, when: Matcher, how: Cut, then_unreachable: bool) {
        *self.shared.armed.lock().unwrap() = Some(Armed {
            when,
            how,
            then_unreachable,
        });
    }

    /// Unreachable: every connection through the proxy is closed and new
    /// ones are closed as they come, as when the database's host is down.
    pub fn set_reachable(&self, reachable: bool) {
        self.shared.reachable.send_replace(reachable);
    }

    /// How many cuts have fired.
    pub fn cuts(&self) -> u64 {
        self.shared.cuts.load(Ordering::SeqCst)
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
    let answered = Arc::new(tokio::sync::Notify::new());
    let withhold = Arc::new(AtomicBool::new(false));
    let mut reachable = shared.reachable.subscribe();
    // Either side closing ends both directions: dropping the halves
    // closes the other socket too.
    tokio::select! {
        _ = reachable.wait_for(|reachable| !reachable) => {}
        (held, then_unreachable) = from_client(client_read, server_write, id, &shared, &withhold, &answered) => {
            if let Some(server_write) = held {
                shared.held_open.lock().unwrap().push(server_write);
            }
            if then_unreachable {
                shared.reachable.send_replace(false);
            }
        }
        () = copy(server_read, client_write, &shared, &withhold, &answered) => {}
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
/// Returns the server's side when a cut leaves it open, and whether the
/// cut makes the database unreachable.
async fn from_client(
    mut client: OwnedReadHalf,
    mut server: OwnedWriteHalf,
    id: usize,
    shared: &Shared,
    withhold: &AtomicBool,
    answered: &tokio::sync::Notify,
) -> (Option<OwnedWriteHalf>, bool) {
    let mut unparsed = Vec::new();
    // Statement name -> SQL, to name what a Bind runs ("" is the unnamed one).
    let mut statements = HashMap::new();
    let mut chunk = vec![0; 64 * 1024];
    loop {
        let n = match client.read(&mut chunk).await {
            Ok(0) | Err(_) => return (None, false),
            Ok(n) => n,
        };
        unparsed.extend_from_slice(&chunk[..n]);
        let mut start = 0;
        let mut cut = None;
        // Every message after the startup one: type byte, i32 length
        // (counting itself), body.
        while let Some(header) = unparsed.get(start..start + 5) {
            let len = i32::from_be_bytes(header[1..5].try_into().unwrap());
            let end = start + 1 + usize::try_from(len).unwrap_or(0).max(4);
            let Some(body) = unparsed.get(start + 5..end) else {
                break;
            };
            let sent = record(header[0], body, id, shared, &mut statements);
            if cut.is_none() {
                cut = sent
                    .and_then(|sent| fires(shared, &sent))
                    .map(|(how, then_unreachable)| (how, then_unreachable, start));
            }
            start = end;
        }
        // Whole messages only are forwarded: the rest waits for its end.
        let forward: Vec<u8> = unparsed.drain(..start).collect();
        shared
            .bytes
            .fetch_add(forward.len() as u64, Ordering::SeqCst);
        match cut {
            None => {
                if server.write_all(&forward).await.is_err() {
                    return (None, false);
                }
            }
            Some((Cut::BeforeServerHears, then_unreachable, at)) => {
                let _ = server.write_all(&forward[..at]).await;
                return (Some(server), then_unreachable);
            }
            Some((Cut::AfterServerAnswers, then_unreachable, _)) => {
                // Set before the server can answer: `copy` keeps the
                // answer from the client and says when it is complete.
                withhold.store(true, Ordering::SeqCst);
                let notified = answered.notified();
                if server.write_all(&forward).await.is_err() {
                    return (None, then_unreachable);
                }
                notified.await;
                return (None, then_unreachable);
            }
        }
    }
}

/// Takes the armed cut if `sent` is its message.
fn fires(shared: &Shared, sent: &Sent) -> Option<(Cut, bool)> {
    let mut armed = shared.armed.lock().unwrap();
    let (how, then_unreachable) = armed
        .as_ref()
        .filter(|a| (a.when)(sent))
        .map(|a| (a.how, a.then_unreachable))?;
    *armed = None;
    shared.cuts.fetch_add(1, Ordering::SeqCst);
    Some((how, then_unreachable))
}

fn record(
    kind: u8,
    body: &[u8],
    id: usize,
    shared: &Shared,
    statements: &mut HashMap<String, String>,
) -> Option<Sent> {
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
        _ => return None,
    };
    let mut all = shared.connections.lock().unwrap();
    let connection = &mut all[id];
    if let Sent::Query(sql) = &sent {
        connection.listens |= sql.trim_start().to_ascii_uppercase().starts_with("LISTEN");
    }
    // Taken under the lock: numbers and log order agree.
    let seq = shared.seq.fetch_add(1, Ordering::SeqCst);
    connection.sent.push(Message {
        seq,
        sent: sent.clone(),
    });
    Some(sent)
}

/// ReadyForQuery: the server has answered everything sent before it.
const READY_FOR_QUERY: u8 = b'Z';

/// Forwards what the server sends, counting its bytes. Once `withhold` is
/// set, nothing more reaches the client, and `answered` is notified at the
/// server's next ReadyForQuery.
async fn copy(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    shared: &Shared,
    withhold: &AtomicBool,
    answered: &tokio::sync::Notify,
) {
    let mut chunk = vec![0; 64 * 1024];
    // Every message the server sends is typed: type byte, i32 length.
    let mut unparsed = Vec::new();
    loop {
        let n = match from.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        shared.bytes.fetch_add(n as u64, Ordering::SeqCst);
        if withhold.load(Ordering::SeqCst) {
            unparsed.extend_from_slice(&chunk[..n]);
            let mut start = 0;
            while let Some(header) = unparsed.get(start..start + 5) {
                let len = i32::from_be_bytes(header[1..5].try_into().unwrap());
                let end = start + 1 + usize::try_from(len).unwrap_or(0).max(4);
                if unparsed.len() < end {
                    break;
                }
                if header[0] == READY_FOR_QUERY {
                    // `from_client` ends the connection.
                    answered.notify_one();
                }
                start = end;
            }
            unparsed.drain(..start);
            continue;
        }
        if to.write_all(&chunk[..n]).await.is_err() {
            return;
        }
    }
}

/// Where the database server of `url` listens (TCP only: the proxy
/// forwards TCP).
pub fn upstream(url: &str) -> (String, u16) {
    let options: sea_orm::sqlx::postgres::PgConnectOptions =
        url.parse().expect("a postgres:// URL");
    assert!(
        options.get_socket().is_none(),
        "TEST_DATABASE_URL must name a TCP host for this test, not a Unix socket"
    );
    (options.get_host().to_owned(), options.get_port())
}

/// `url` with the proxy as host and port, and without encryption, which
/// would hide the protocol from the proxy.
pub fn through(url: &str, proxy: SocketAddr) -> String {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let authority_start = base.find("://").expect("a URL") + 3;
    let path_start = base[authority_start..]
        .find('/')
        .map_or(base.len(), |i| authority_start + i);
    let userinfo = base[authority_start..path_start]
        .rsplit_once('@')
        .map_or(String::new(), |(userinfo, _)| format!("{userinfo}@"));
    let parameters: Vec<&str> = query
        .split('&')
        .filter(|p| {
            !p.is_empty()
                && !["sslmode=", "host=", "hostaddr=", "port="]
                    .iter()
                    .any(|name| p.starts_with(name))
        })
        .chain(["sslmode=disable"])
        .collect();
    format!(
        "{}{userinfo}{proxy}{}?{}",
        &base[..authority_start],
        &base[path_start..],
        parameters.join("&")
    )
}

#[test]
fn the_url_through_the_proxy_keeps_user_and_database() {
    let proxy: SocketAddr = "127.0.0.1:7000".parse().unwrap();
    assert_eq!(
        through("postgres://postgres@db.example:5432/mdtest_1", proxy),
        "postgres://postgres@127.0.0.1:7000/mdtest_1?sslmode=disable"
    );
    assert_eq!(
        through(
            "postgres://u:p@w@h/x?sslmode=require&application_name=a",
            proxy
        ),
        "postgres://u:p@w@127.0.0.1:7000/x?application_name=a&sslmode=disable"
    );
}
