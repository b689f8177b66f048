//! The floor under the `siem_events` case: a bare service doing only what any
//! implementation of `POST /events` must, written plainly (axum and rusqlite, no flowline),
//! so that the bench can say how far from this machine's limit both services are.
//!
//! - [`Floor::Stored`]: check the API key against the accounts (in memory), require JSON,
//!   parse and validate the body (typed, unknown fields refused, bounds checked), hand it to
//!   one writer thread that commits whatever is waiting in one transaction (a group commit;
//!   the same table and the same settings as the service: WAL, `synchronous = NORMAL`,
//!   64 MiB cache, checkpoints off the writer once a second), then broadcast each new
//!   event's JSON to the websocket clients and answer 202.
//! - [`Floor::HttpOnly`]: the same without the database: parse, broadcast, 202.
//!
//! No metrics, no alerts, no rules, no account details in the broadcast event: what is left
//! is the HTTP, JSON, SQLite and websocket work that no organisation of the code avoids.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::ws::{Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::{SinkExt as _, StreamExt as _};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

/// Which floor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Floor {
    /// Parse, group commit, broadcast, 202.
    Stored,
    /// Parse, broadcast, 202: no database.
    HttpOnly,
}

/// The body, as the service accepts it.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Incoming {
    id: String,
    kind: String,
    severity: u8,
    #[serde(default)]
    message: String,
    time: Option<i64>,
    source: Option<String>,
}

/// The event as stored and broadcast.
#[derive(serde::Serialize)]
struct Stored {
    id: String,
    account_id: i64,
    kind: String,
    severity: u8,
    message: String,
    received_ms: i64,
    time_ms: i64,
    source: Option<String>,
}

impl Incoming {
    /// The same bounds as the service's (id ≤ 128, kind ≤ 64, message ≤ 4096 bytes,
    /// severity ≤ 10, time in 2000..2100, source an IP address).
    fn valid(&self) -> bool {
        !self.id.trim().is_empty()
            && self.id.len() <= 128
            && !self.kind.trim().is_empty()
            && self.kind.len() <= 64
            && self.message.len() <= 4096
            && self.severity <= 10
            && self
                .time
                .is_none_or(|t| (946_684_800_000..4_102_444_800_000).contains(&t))
            && self
                .source
                .as_deref()
                .is_none_or(|s| s.len() <= 64 && s.parse::<std::net::IpAddr>().is_ok())
    }
}

/// A stored event on its way to the writer: its row, its JSON, the sender of its 202.
type ToWrite = (Stored, Utf8Bytes, oneshot::Sender<()>);

#[derive(Clone)]
struct St {
    keys: Arc<HashSet<String>>,
    token: Arc<str>,
    hub: broadcast::Sender<Utf8Bytes>,
    writer: Option<mpsc::UnboundedSender<ToWrite>>,
    stop: watch::Receiver<bool>,
}

/// A running floor service.
pub struct Running {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    server: tokio::task::JoinHandle<()>,
    writer: Option<std::thread::JoinHandle<()>>,
}

impl Running {
    /// Starts `floor` on a free port, over the database at `db` (created) for
    /// [`Floor::Stored`], with accounts `key-1` ... `key-{accounts}`.
    pub async fn start(floor: Floor, db: &Path, accounts: u32, token: &str) -> Running {
        let (hub, _) = broadcast::channel(65_536);
        let (stop_tx, stop) = watch::channel(false);
        let (writer_tx, writer) = match floor {
            Floor::HttpOnly => (None, None),
            Floor::Stored => {
                let (tx, rx) = mpsc::unbounded_channel();
                let conn = open(db);
                let hub = hub.clone();
                let checkpoints = open(db);
                let stop = stop.clone();
                std::thread::spawn(move || {
                    while !*stop.borrow() {
                        std::thread::sleep(Duration::from_secs(1));
                        let _ = checkpoints.execute_batch("PRAGMA wal_checkpoint(PASSIVE)");
                    }
                });
                let writer = std::thread::spawn(move || write_loop(conn, rx, hub));
                (Some(tx), Some(writer))
            }
        };
        let st = St {
            keys: Arc::new((1..=accounts).map(|i| format!("key-{i}")).collect()),
            token: token.into(),
            hub,
            writer: writer_tx,
            stop,
        };
        let app = Router::new()
            .route("/events", post(post_event))
            .route("/ws", get(ws))
            .with_state(st);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        let mut stopped = stop_tx.subscribe();
        let server = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stopped.wait_for(|s| *s).await;
                })
                .await
                .expect("serve");
        });
        Running {
            addr,
            stop: stop_tx,
            server,
            writer,
        }
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops it: the websocket clients get what was broadcast, then a close frame.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.server.await;
        if let Some(w) = self.writer {
            tokio::task::spawn_blocking(move || w.join().expect("writer"))
                .await
                .expect("writer joined");
        }
    }
}

/// A connection to `db` with the service's settings; the schema is the service's own
/// (made by opening the file the way the service does).
fn open(db: &Path) -> rusqlite::Connection {
    flowline_siem::counts(db).expect("the service's schema");
    let conn = rusqlite::Connection::open(db).expect("database");
    conn.execute_batch(
        "PRAGMA busy_timeout = 10000; PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;
         PRAGMA cache_size = -65536; PRAGMA wal_autocheckpoint = 0;",
    )
    .expect("settings");
    conn
}

/// The group commit: everything waiting, one transaction, then the broadcast and the 202s.
fn write_loop(
    mut conn: rusqlite::Connection,
    mut rx: mpsc::UnboundedReceiver<ToWrite>,
    hub: broadcast::Sender<Utf8Bytes>,
) {
    let mut batch = Vec::new();
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        while let Ok(more) = rx.try_recv() {
            batch.push(more);
        }
        let tx = conn.transaction().expect("begin");
        let mut new = Vec::with_capacity(batch.len());
        {
            let mut stmt = tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO events
                         (id, account_id, kind, severity, message, received_ms, time_ms, source)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                )
                .expect("prepare");
            for (e, _, _) in &batch {
                let n = stmt
                    .execute((
                        &e.id,
                        e.account_id,
                        &e.kind,
                        e.severity,
                        &e.message,
                        e.received_ms,
                        e.time_ms,
                        &e.source,
                    ))
                    .expect("insert");
                new.push(n == 1);
            }
        }
        tx.commit().expect("commit");
        for ((_, json, answer), new) in batch.drain(..).zip(new) {
            if new {
                let _ = hub.send(json);
            }
            let _ = answer.send(());
        }
    }
}

fn status(code: StatusCode) -> Response {
    code.into_response()
}

async fn post_event(State(s): State<St>, headers: HeaderMap, body: Bytes) -> Response {
    let Some(account_id) = headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .filter(|k| s.keys.contains(*k))
        .and_then(|k| k.strip_prefix("key-")?.parse::<i64>().ok())
    else {
        return status(StatusCode::UNAUTHORIZED);
    };
    let json_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !json_type {
        return status(StatusCode::UNSUPPORTED_MEDIA_TYPE);
    }
    let e: Incoming = match serde_json::from_slice(&body) {
        Ok(e) => e,
        Err(_) => return status(StatusCode::BAD_REQUEST),
    };
    if !e.valid() {
        return status(StatusCode::BAD_REQUEST);
    }
    let received_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let stored = Stored {
        time_ms: e.time.unwrap_or(received_ms),
        id: e.id,
        account_id,
        kind: e.kind,
        severity: e.severity,
        message: e.message,
        received_ms,
        source: e.source,
    };
    let json = Utf8Bytes::from(serde_json::to_string(&stored).expect("serializes"));
    let answer = format!(
        r#"{{"id":{}}}"#,
        serde_json::Value::from(stored.id.as_str())
    );
    match &s.writer {
        None => {
            let _ = s.hub.send(json);
        }
        Some(w) => {
            let (tx, rx) = oneshot::channel();
            if w.send((stored, json, tx)).is_err() || rx.await.is_err() {
                return status(StatusCode::SERVICE_UNAVAILABLE);
            }
        }
    }
    (
        StatusCode::ACCEPTED,
        [(header::CONTENT_TYPE, "application/json")],
        answer,
    )
        .into_response()
}

#[derive(serde::Deserialize)]
struct Token {
    token: Option<String>,
}

async fn ws(State(s): State<St>, Query(q): Query<Token>, up: WebSocketUpgrade) -> Response {
    if q.token.as_deref() != Some(&*s.token) {
        return status(StatusCode::UNAUTHORIZED);
    }
    let events = s.hub.subscribe();
    up.on_upgrade(move |socket| serve_client(socket, events, s.stop))
}

/// Writes what the hub has (in bursts, one flush each) until the stop, then what is left,
/// then a close frame.
async fn serve_client(
    socket: WebSocket,
    mut events: broadcast::Receiver<Utf8Bytes>,
    mut stop: watch::Receiver<bool>,
) {
    let (mut tx, mut rx) = socket.split();
    // Nothing the clients send matters; reading keeps pings answered.
    tokio::spawn(async move { while let Some(Ok(_)) = rx.next().await {} });
    let mut stopping = false;
    loop {
        let first = if stopping {
            match events.try_recv() {
                Ok(m) => m,
                Err(_) => break,
            }
        } else {
            tokio::select! {
                got = events.recv() => match got {
                    Ok(m) => m,
                    Err(_) => break,
                },
                _ = stop.wait_for(|s| *s) => { stopping = true; continue; }
            }
        };
        if tx.feed(Message::Text(first)).await.is_err() {
            return;
        }
        for _ in 1..256 {
            match events.try_recv() {
                Ok(m) => {
                    if tx.feed(Message::Text(m)).await.is_err() {
                        return;
                    }
                }
                Err(_) => break,
            }
        }
        if tx.flush().await.is_err() {
            return;
        }
    }
    let _ = tx.send(Message::Close(None)).await;
    let _ = tx.close().await;
}
