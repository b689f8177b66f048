//! The SQLite file: accounts, events (unique by the client's event id, so that a repeated
//! post is stored once) and the alerts outbox.
//!
//! Both services (flowline's and the naive one) open it the same way: WAL journal,
//! `synchronous = NORMAL` and a 64 MiB page cache (a commit is durable at the next checkpoint, not fsynced per
//! transaction), so that a comparison measures how the work is organised, not the settings.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OptionalExtension, params};

use crate::event::{Account, Event};

/// A connection shared by the tasks that write; SQLite has one writer at a time anyway.
pub type Db = Arc<Mutex<Connection>>;

/// Writes to the database off the async workers, tracked so that a stop can wait for them.
/// A stage that is cancelled stops waiting for its `spawn_blocking`, but the write goes on
/// to its commit: the service must not call itself stopped (and a restart must not read
/// the outbox) before that commit has landed.
#[derive(Clone, Default)]
pub struct Writes(Arc<tokio::sync::RwLock<()>>);

impl Writes {
    /// Runs `f` on `db` on the blocking pool; the write runs to its end even if the caller
    /// stops waiting.
    /// Its error is [`classify`]'d: a busy database is transient.
    pub async fn run<R: Send + 'static>(
        &self,
        db: &Db,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<R> + Send + 'static,
    ) -> Result<R, flowline::BoxError> {
        // Each write holds a read guard until it ends; `settled` takes the write side.
        let running = self.0.clone().read_owned().await;
        let db = db.clone();
        tokio::task::spawn_blocking(move || {
            let _running = running;
            let mut conn = db
                .lock()
                .map_err(|_| flowline::Permanent::new("database lock poisoned"))?;
            f(&mut conn).map_err(classify)
        })
        .await
        .map_err(|e| flowline::BoxError::from(flowline::Permanent::new(e)))?
    }

    /// Waits until every write started has ended.
    pub async fn settled(&self) {
        let _ = self.0.write().await;
    }
}

/// Opens (creating if needed) the database at `path` with the schema and `demo_accounts`
/// accounts `key-1` ... `key-N` (kept if they exist).
pub fn open(path: &Path, demo_accounts: u32) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    // 64 MiB of page cache (the default is 2 MiB): the id index of a few million events
    // stays in memory instead of being read back from the OS per insert.
    conn.pragma_update(None, "cache_size", -65536)?;
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS accounts (
             id INTEGER PRIMARY KEY,
             api_key TEXT NOT NULL UNIQUE,
             name TEXT NOT NULL,
             contact TEXT NOT NULL
         );
         -- Rows are appended in arrival order (rowid); the client's id is a unique key
         -- beside them. Keyed by the id itself, rows would land all over the tree and a
         -- commit would write a page per row.
         CREATE TABLE IF NOT EXISTS events (
             seq INTEGER PRIMARY KEY,
             id TEXT NOT NULL UNIQUE,
             account_id INTEGER NOT NULL,
             kind TEXT NOT NULL,
             severity INTEGER NOT NULL,
             message TEXT NOT NULL,
             received_ms INTEGER NOT NULL
         );
         CREATE TABLE IF NOT EXISTS alerts (
             event_id TEXT PRIMARY KEY,
             status TEXT NOT NULL,
             attempts INTEGER NOT NULL DEFAULT 0,
             error TEXT
         ) WITHOUT ROWID;",
    )?;
    // Columns added since the first schema: a file written by an older build gets them.
    add_column(&conn, "events", "time_ms", "INTEGER")?;
    add_column(&conn, "events", "source", "TEXT")?;
    add_column(&conn, "alerts", "rule", "TEXT")?;
    let tx = conn.unchecked_transaction()?;
    for i in 1..=demo_accounts {
        tx.execute(
            "INSERT OR IGNORE INTO accounts (id, api_key, name, contact) VALUES (?1, ?2, ?3, ?4)",
            params![
                i,
                format!("key-{i}"),
                format!("account {i}"),
                format!("+1555000{i:04}")
            ],
        )?;
    }
    tx.commit()?;
    Ok(conn)
}

fn add_column(conn: &Connection, table: &str, column: &str, ty: &str) -> rusqlite::Result<()> {
    let has: bool = conn.query_row(
        &format!("SELECT COUNT(*) > 0 FROM pragma_table_info('{table}') WHERE name = ?1"),
        [column],
        |r| r.get(0),
    )?;
    if !has {
        conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {ty}"))?;
    }
    Ok(())
}

/// A database error as the retrying side sees it: a busy or locked database (another
/// writer, a checkpoint) or a file that cannot be opened for now is [`Transient`]; the
/// rest (a constraint, a full disk, a corrupt file) is [`Permanent`]: trying again does
/// not fix it.
///
/// [`Transient`]: flowline::Transient
/// [`Permanent`]: flowline::Permanent
pub fn classify(e: rusqlite::Error) -> flowline::BoxError {
    use rusqlite::ErrorCode::{CannotOpen, DatabaseBusy, DatabaseLocked};
    match e.sqlite_error_code() {
        Some(DatabaseBusy | DatabaseLocked | CannotOpen) => Box::new(flowline::Transient::new(e)),
        _ => Box::new(flowline::Permanent::new(e)),
    }
}

/// The accounts of the given API keys (one query for all; a key not found is left out).
pub fn accounts_by_key(
    conn: &Connection,
    keys: &[String],
) -> rusqlite::Result<HashMap<String, Account>> {
    let mut stmt =
        conn.prepare_cached("SELECT id, name, contact FROM accounts WHERE api_key = ?1")?;
    let mut found = HashMap::with_capacity(keys.len());
    for key in keys {
        let acc = stmt
            .query_row([key], |r| {
                Ok(Account {
                    id: r.get(0)?,
                    name: r.get(1)?,
                    contact: r.get(2)?,
                })
            })
            .optional()?;
        if let Some(acc) = acc {
            found.insert(key.clone(), acc);
        }
    }
    Ok(found)
}

/// Inserts one event, and a pending alert if it calls for one, unless its id is already
/// stored; returns whether it was new. Not a transaction of its own: the caller's.
pub fn insert_event(conn: &Connection, e: &Event) -> rusqlite::Result<bool> {
    let account_id = e.account.as_ref().map_or(0, |a| a.id);
    let new =
        conn.prepare_cached(
            "INSERT OR IGNORE INTO events
                 (id, account_id, kind, severity, message, received_ms, time_ms, source)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )?
        .execute(params![
            e.id,
            account_id,
            e.kind,
            e.severity,
            e.message,
            e.received_ms,
            e.time_ms,
            e.source
        ])? == 1;
    if new && e.alert {
        conn.prepare_cached(
            "INSERT OR IGNORE INTO alerts (event_id, status, rule) VALUES (?1, 'pending', ?2)",
        )?
        .execute(params![e.id, e.rule])?;
    }
    Ok(new)
}

/// Inserts a batch in one transaction (one commit for all: the cost of a commit is paid
/// once per batch, not per event); returns, per event, whether it was new.
pub fn insert_batch(conn: &mut Connection, events: &[Event]) -> rusqlite::Result<Vec<bool>> {
    let tx = conn.transaction()?;
    let mut new = Vec::with_capacity(events.len());
    for e in events {
        new.push(insert_event(&tx, e)?);
    }
    tx.commit()?;
    Ok(new)
}

/// What became of an alert (also sent to the page as it is).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AlertOutcome {
    /// The event it is about.
    pub event_id: String,
    /// `sent` or `failed`.
    pub status: &'static str,
    /// Calls made.
    pub attempts: u32,
    /// The last error, when failed.
    pub error: Option<String>,
    /// The event's account.
    pub account_id: i64,
    /// The correlation rule that raised it, if a rule did.
    pub rule: Option<String>,
    /// The event's severity.
    pub severity: u8,
    /// The event's kind.
    pub kind: String,
}

impl AlertOutcome {
    /// The outcome of `e`'s alert.
    pub fn of(e: Event, status: &'static str, attempts: u32, error: Option<String>) -> Self {
        AlertOutcome {
            account_id: e.account_id(),
            event_id: e.id,
            status,
            attempts,
            error,
            rule: e.rule,
            severity: e.severity,
            kind: e.kind,
        }
    }
}

/// Records alert outcomes in one transaction.
pub fn record_alerts(conn: &mut Connection, outcomes: &[AlertOutcome]) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    {
        let mut stmt = tx.prepare_cached(
            "INSERT INTO alerts (event_id, status, attempts, error) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (event_id) DO UPDATE SET status = ?2, attempts = ?3, error = ?4",
        )?;
        for o in outcomes {
            stmt.execute(params![o.event_id, o.status, o.attempts, o.error])?;
        }
    }
    tx.commit()
}

/// Events stored.
pub fn count_events(conn: &Connection) -> rusqlite::Result<u64> {
    conn.query_row("SELECT COUNT(*) FROM events", [], |r| r.get(0))
}

/// Alerts by status (`pending`, `sent`, `failed`).
pub fn count_alerts(conn: &Connection, status: &str) -> rusqlite::Result<u64> {
    conn.query_row(
        "SELECT COUNT(*) FROM alerts WHERE status = ?1",
        [status],
        |r| r.get(0),
    )
}

/// The columns of an event row, for [`event_row`].
const EVENT_COLUMNS: &str = "e.seq, e.id, e.kind, e.severity, e.message, e.received_ms,
     e.time_ms, e.source, a.id, a.name, a.contact, p.status, p.rule";

/// An event read back (with its alert's status and rule, when it has one).
fn event_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(i64, Event)> {
    let account = match r.get::<_, Option<i64>>(8)? {
        Some(id) => Some(std::sync::Arc::new(Account {
            id,
            name: r.get(9)?,
            contact: r.get(10)?,
        })),
        None => None,
    };
    let received_ms: i64 = r.get(5)?;
    let status: Option<String> = r.get(11)?;
    Ok((
        r.get(0)?,
        Event {
            id: r.get(1)?,
            api_key: String::new(),
            account,
            kind: r.get(2)?,
            severity: r.get(3)?,
            message: r.get(4)?,
            received_ms,
            time_ms: r.get::<_, Option<i64>>(6)?.unwrap_or(received_ms),
            source: r.get(7)?,
            status: "stored",
            alert: status.is_some(),
            rule: r.get(12)?,
        },
    ))
}

/// The outbox: alerts still `pending` whose event comes after `cursor` (an event's `seq`),
/// oldest first, at most `limit`; and the cursor to read from next. The alert lane is fed
/// from here only, so that an alert is sent once per run whatever the lane's size: what it
/// has no room for stays in the database and is read when there is room.
pub fn pending_alerts_after(
    conn: &Connection,
    cursor: i64,
    limit: usize,
) -> rusqlite::Result<(Vec<Event>, i64)> {
    let tx = conn.unchecked_transaction()?; // one snapshot for both reads
    let last: i64 = tx.query_row("SELECT COALESCE(MAX(seq), 0) FROM events", [], |r| r.get(0))?;
    let rows = {
        let mut stmt = tx.prepare_cached(&format!(
            "SELECT {EVENT_COLUMNS}
             FROM events e JOIN alerts p ON p.event_id = e.id
             LEFT JOIN accounts a ON a.id = e.account_id
             WHERE e.seq > ?1 AND e.seq <= ?2 AND p.status = 'pending'
             ORDER BY e.seq LIMIT ?3"
        ))?;
        stmt.query_map(params![cursor, last, limit as i64], event_row)?
            .collect::<rusqlite::Result<Vec<_>>>()?
    };
    tx.finish()?;
    // A full page may have more after it; a short one read everything up to `last`.
    let next = if rows.len() == limit {
        rows.last().map_or(cursor, |(seq, _)| *seq)
    } else {
        last
    };
    Ok((rows.into_iter().map(|(_, e)| e).collect(), next))
}

/// The latest `limit` events, newest first; only `account`'s when given.
pub fn recent_events(
    conn: &Connection,
    account: Option<i64>,
    limit: usize,
) -> rusqlite::Result<Vec<Event>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {EVENT_COLUMNS}
         FROM events e LEFT JOIN alerts p ON p.event_id = e.id
         LEFT JOIN accounts a ON a.id = e.account_id
         WHERE ?1 IS NULL OR e.account_id = ?1
         ORDER BY e.seq DESC LIMIT ?2"
    ))?;
    let rows = stmt.query_map(params![account, limit as i64], event_row)?;
    rows.map(|r| r.map(|(_, e)| e)).collect()
}

/// An alert as the page shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AlertRow {
    /// The event it is about.
    pub event_id: String,
    /// `pending`, `sent` or `failed`.
    pub status: String,
    /// Calls made to the notifier.
    pub attempts: u32,
    /// The last error, when failed.
    pub error: Option<String>,
    /// The correlation rule that raised it; none when the event's severity did.
    pub rule: Option<String>,
    /// The event's severity.
    pub severity: u8,
    /// The event's kind.
    pub kind: String,
    /// The account's id.
    pub account_id: i64,
    /// When the event was received.
    pub received_ms: i64,
}

/// The latest `limit` alerts, newest first; only `account`'s when given.
pub fn recent_alerts(
    conn: &Connection,
    account: Option<i64>,
    limit: usize,
) -> rusqlite::Result<Vec<AlertRow>> {
    let mut stmt = conn.prepare_cached(
        "SELECT p.event_id, p.status, p.attempts, p.error, p.rule, e.severity, e.kind,
                e.account_id, e.received_ms
         FROM alerts p JOIN events e ON e.id = p.event_id
         WHERE ?1 IS NULL OR e.account_id = ?1
         ORDER BY e.seq DESC LIMIT ?2",
    )?;
    let rows = stmt.query_map(params![account, limit as i64], |r| {
        Ok(AlertRow {
            event_id: r.get(0)?,
            status: r.get(1)?,
            attempts: r.get(2)?,
            error: r.get(3)?,
            rule: r.get(4)?,
            severity: r.get(5)?,
            kind: r.get(6)?,
            account_id: r.get(7)?,
            received_ms: r.get(8)?,
        })
    })?;
    rows.collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn open_makes_the_schema_and_the_demo_accounts() {
        let dir = tempfile::tempdir().unwrap();
        let conn = super::open(&dir.path().join("siem.db"), 2).unwrap();
        let acc = super::accounts_by_key(&conn, &["key-2".into()]).unwrap();
        assert_eq!(acc["key-2"].name, "account 2");
    }

    use super::*;
    use crate::event::Incoming;

    /// Polls `f` once: `Some` with its output if it was ready.
    async fn poll_once<F: std::future::Future + Unpin>(f: &mut F) -> Option<F::Output> {
        std::future::poll_fn(|cx| {
            std::task::Poll::Ready(match std::pin::Pin::new(&mut *f).poll(cx) {
                std::task::Poll::Ready(out) => Some(out),
                std::task::Poll::Pending => None,
            })
        })
        .await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_whose_caller_stopped_waiting_is_settled_before_a_stop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.db");
        let db: Db = Arc::new(Mutex::new(open(&path, 1).unwrap()));
        let writes = Writes::default();
        // The write says when it has started and waits to be let go: no clock involved.
        let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let mut slow = Box::pin(writes.run(&db, move |conn| {
            started_tx.send(()).unwrap();
            go_rx.recv().unwrap();
            conn.execute_batch("UPDATE accounts SET name = 'written'")
        }));
        assert!(poll_once(&mut slow).await.is_none());
        tokio::task::spawn_blocking(move || started_rx.recv().unwrap())
            .await
            .unwrap();
        // The caller gives up (a cancelled stage); the write is still on the blocking pool.
        drop(slow);
        let mut settled = Box::pin(writes.settled());
        assert!(
            poll_once(&mut settled).await.is_none(),
            "settled while a write was running"
        );
        go_tx.send(()).unwrap();
        settled.await;
        // Read as a restart would, on a connection of its own (not through the writer's
        // lock).
        let name: String = open(&path, 0)
            .unwrap()
            .query_row("SELECT name FROM accounts", [], |r| r.get(0))
            .unwrap();
        assert_eq!(name, "written");
    }

    #[test]
    fn a_repeated_id_is_stored_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = open(&dir.path().join("t.db"), 1).unwrap();
        let inc = Incoming::parse(br#"{"id":"x","kind":"k","severity":9}"#).unwrap();
        let mut e = Event::accepted(inc, "key-1".into());
        e.alert = true;
        let new = insert_batch(&mut conn, &[e.clone(), e.clone()]).unwrap();
        assert_eq!(new, vec![true, false]);
        assert_eq!(insert_batch(&mut conn, &[e]).unwrap(), vec![false]);
        assert_eq!(count_events(&conn).unwrap(), 1);
        assert_eq!(count_alerts(&conn, "pending").unwrap(), 1);
        let (pending, next) = pending_alerts_after(&conn, 0, 10).unwrap();
        assert_eq!((pending.len(), next), (1, 1));
        assert!(pending_alerts_after(&conn, next, 10).unwrap().0.is_empty());
    }
}
